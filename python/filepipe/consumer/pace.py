"""Pacing reads to the round trip: each read asks for enough entries to keep the stages
busy while a batch waits on Redis and PostgreSQL (bandwidth-delay: the rate the
consumer can go at, times the round trip, times the round trips a batch makes in a
row): beyond CONSUMER_BATCH_SIZE when the round trips call for more and it was left at
its default (one set on purpose is a cap), never beyond FILEPIPE_BATCH_BYTES (at the
sizes of the entries seen last). On a slow network the
loaders double too (SLOW_ROUND_TRIP_S, `Consumer`).

On a local network (round trips under MIN_ROUND_TRIP_S) `ReadSize` doubles up to its
cap as before; at 20 ms it is thousands, and the reads get there after the first batch
instead of after ten doublings of round trips. The round trips are measured at run
time: an empty read or a PING to Redis from the reader, and a `SELECT 1` on a pooled connection from a
loader, every PROBE_INTERVAL_S; the rate is that of the preparer (the stage that does
the consumer's work per file), in entries per second of its own time."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from .. import metrics
from ..db.connection import mark_used
from ..stream import ReadSize

log = logging.getLogger("filepipe")

# A batch is read (one Redis round trip), loaded (a direct COPY: two PostgreSQL round
# trips) and acknowledged (one Redis round trip): the stages overlap, but a batch must
# hold the entries of about that many round trips for none of them to wait.
ROUND_TRIPS = 4
PROBE_INTERVAL_S = 5.0
WINDOW = 8  # round trips kept per service: the estimate is the least of them (queueing only adds)
# Below this the doubling reaches the cover within a few batches of as many round trips
# (a few ms in all), and the reads grow exactly as they would without pacing.
MIN_ROUND_TRIP_S = 0.001
# The longest the reader waits for the first batch to be prepared before it reads the next.
FIRST_WAIT_S = 1.0
# A network this slow (a round trip to another zone, region or cloud; a loaded local
# server answers within a couple of ms) gets twice the loaders (Consumer._double_loaders).
SLOW_ROUND_TRIP_S = 0.005
RATE_WEIGHT = 0.3  # of the newest batch in the preparer's rate (an exponential average)


class Pace:
    """The round trips measured, the preparer's rate, and the read size they call for."""

    def __init__(self, read_size: ReadSize) -> None:
        self.read_size = read_size
        self._lock = threading.Lock()
        self._trips: dict[str, deque[float]] = {s: deque(maxlen=WINDOW) for s in ("Redis", "PostgreSQL")}
        self._probed_at: dict[str, float] = {}
        self.rate = 0.0  # entries per second of the preparer's own time
        self.cover = 0  # entries a read needs to cover the round trips (0: not known yet)
        self._told = 0  # the cover last logged
        self._first = threading.Event()  # the first batch was prepared

    # -- measuring ---------------------------------------------------------------------

    def round_trip(self, service: str | None = None) -> float:
        """The round trip to `service` in seconds (the least of the last few measured),
        or the longer of the two; 0 while none was measured."""
        with self._lock:
            if service is not None:
                trips = self._trips[service]
                return min(trips) if trips else 0.0
            return max((min(t) for t in self._trips.values() if t), default=0.0)

    def slow(self, service: str) -> bool:
        """Whether the round trip to `service` was measured at SLOW_ROUND_TRIP_S or more."""
        return self.round_trip(service) >= SLOW_ROUND_TRIP_S

    def _due(self, service: str) -> bool:
        last = self._probed_at.get(service)
        return last is None or time.monotonic() - last >= PROBE_INTERVAL_S

    def probe_redis(self, r: redis.Redis) -> None:
        """Times a PING, if one is due. Best effort: a fault is the reads' to report."""
        if not self._due("Redis"):
            return
        self._probed_at["Redis"] = time.monotonic()
        try:
            t0 = time.perf_counter()
            r.ping()
            self.record("Redis", time.perf_counter() - t0)
        except (redis.RedisError, RedisClusterException, OSError):
            pass

    def probe_pg(self, pool: Any) -> None:
        """Times a `SELECT 1` on a pooled connection, if one is due. Best effort."""
        if not self._due("PostgreSQL"):
            return
        self._probed_at["PostgreSQL"] = time.monotonic()
        try:
            with pool.connection(timeout=1.0) as conn:
                t0 = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                self.record("PostgreSQL", time.perf_counter() - t0)
                mark_used(conn)  # alive: the next load on it skips the pool's check
        except Exception:  # psycopg errors, the pool's timeout: the loads report faults
            return

    def record(self, service: str, seconds: float) -> None:
        """One round trip to `service` took `seconds` (a probe, or a read that found nothing)."""
        self._probed_at[service] = time.monotonic()
        with self._lock:
            self._trips[service].append(seconds)
        metrics.ROUND_TRIP_SECONDS.labels(service).set(self.round_trip(service))
        # The read size changes in the preparer's thread only (`prepared`), as `ReadSize.observe`
        # does: a raise from another thread could undo the drop after a batch of big entries.

    def prepared(self, entries: int, seconds: float) -> None:
        """The preparer took `seconds` for a batch of `entries` entries (in its thread,
        after `ReadSize.observe`): the read size is raised to cover the round trips."""
        try:
            if entries <= 0 or seconds <= 0:
                return
            rate = entries / seconds
            self.rate = rate if self.rate == 0 else (1 - RATE_WEIGHT) * self.rate + RATE_WEIGHT * rate
            self._update()
        finally:
            self._first.set()

    def first_prepared(self, timeout: float = FIRST_WAIT_S) -> None:
        """Waits (at most `timeout`) until the first batch handed over was prepared, at once
        after that. The first read after a start is small (within the byte budget whatever
        the entries' sizes); read before it was prepared, the second one would be as small,
        and each would take a load and an acknowledgement of its own, round trips that a
        slow network makes long. Sized by what the first showed (the entries' sizes, the
        preparer's rate), the second read is as big as the round trips call for."""
        if not self._first.is_set():
            self._first.wait(timeout)

    # -- the read size -------------------------------------------------------------------

    def _update(self) -> None:
        """Raises the read size to cover the round trips at the preparer's rate (above
        CONSUMER_BATCH_SIZE if need be, never above what FILEPIPE_BATCH_BYTES allows at
        the sizes of the entries seen last); `ReadSize` goes on doubling from there, up to
        CONSUMER_BATCH_SIZE."""
        trip = self.round_trip()
        if trip < MIN_ROUND_TRIP_S or self.rate <= 0:
            return
        size = self.read_size
        before = size.count
        self.cover = math.ceil(ROUND_TRIPS * trip * self.rate)
        size.raise_to(self.cover)
        metrics.READ_SIZE.set(size.count)
        if self.cover >= 2 * max(1, self._told) or self.cover * 2 <= self._told:
            self._told = self.cover
            # Told when it raises the reads (a slow network); on a local one, for --debug.
            log.log(
                logging.INFO if size.count > before else logging.DEBUG,
                "round trip %.1f ms (Redis %.1f ms, PostgreSQL %.1f ms) at %.0f entries/s: reads of "
                "%d entries cover %d of them (reading %d, at most %d)",
                trip * 1000,
                self.round_trip("Redis") * 1000,
                self.round_trip("PostgreSQL") * 1000,
                self.rate,
                self.cover,
                ROUND_TRIPS,
                size.count,
                size.limit,
            )
