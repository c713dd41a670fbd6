"""The dashboard's figures, sampled once per interval by one background thread.

Every page and every poll reads the last snapshot; none of them talks to Redis or
PostgreSQL. What a figure means is `filepipe.observe`'s (the same as `filepipe status`
and `/metrics`); this module only decides how to read it cheaply, every second:

* Redis: one pipeline for every partition, then one of the heartbeats
  (`observe.sample.sample_group`, which `/metrics` of a consumer reads too), and at
  most one read of dead letters not seen yet (their reasons counted incrementally by
  `observe.dead.DeadPages`, never rescanned);
* what the stream keeps and why, its memory and Redis's (`observe.retained`);
* PostgreSQL (`observe.table`): the latest rows by `event_time`, and the row count.

The processing rate comes from the group's own counter: entries read by the group
minus those still pending are the entries acknowledged, by every consumer; rates
are `observe.rates`' (the headline card is the chart's last point, "last 10 s").
While a service does not answer, the last figures stay on screen, flagged: the
consumers seen last are shown as stale.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import asdict
from typing import Any

from ..config import Settings, mask_url
from ..observe import dead, rates
from ..observe.model import ConsumerState
from ..observe.retained import RetentionState, read_retention, retention_json
from ..observe.sample import sample_group
from ..observe.streams import dead_stream_name
from ..observe.table import TableReader
from ..redaction import error_line

log = logging.getLogger("filepipe")

MAX_CONSUMERS = 500  # listed in a snapshot (the summary counts them all)
SHOWN_STATES = ("live", "waiting", "stale", "dead")  # the summary's keys; departed ones are not listed


class Monitor:
    """Samples the pipeline every `interval` seconds and keeps `history_s` of rates."""

    def __init__(
        self,
        settings: Settings,
        *,
        interval: float = 1.0,
        history_s: float = 900.0,
        window_s: float = 300.0,
        latest: int = 12,
    ) -> None:
        self.settings = settings
        self.interval = interval
        self.window_s = window_s
        self.latest_n = latest
        size = max(10, int(history_s / interval) + 1)
        # the group's counters: (time, entries acknowledged), (time, dead letters)
        self.acked: deque[tuple[float, int | None]] = deque(maxlen=size)
        self.dead: deque[tuple[float, int | None]] = deque(maxlen=size)
        self._redis: Any = None
        self._pg: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot: dict[str, Any] = self._empty()
        # dead letters by reason, counted incrementally: dead-letter stream -> tally
        self.dead_pages = dead.DeadPages()
        # consumers' heartbeat history: name -> (updated, loaded) pairs
        self._beats: dict[str, deque[tuple[float, int | None]]] = {}
        self.table = TableReader(settings, min_every=2 * interval)
        # What the stream keeps and why, and Redis's memory, from the last sample.
        self.retention: RetentionState | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Takes a first sample now, then samples in a daemon thread until `stop()`."""
        self.sample()
        self._thread = threading.Thread(target=self._run, name="filepipe-dashboard-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception:  # a bug must not stop the dashboard; say it once per sample
                log.exception("dashboard sample failed")
            self._stop.wait(max(0.05, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._close_redis()
        self._close_pg()

    def snapshot(self) -> dict[str, Any]:
        """The last figures (a new dict each sample; never mutated after)."""
        with self._lock:
            return self._snapshot

    # -- one sample ---------------------------------------------------------------------

    def sample(self) -> dict[str, Any]:
        """Reads every figure once and publishes a new snapshot."""
        now = time.time()
        errors: dict[str, str | None] = {"redis": None, "postgresql": None}
        try:
            red = self._sample_redis(now)
        except Exception as e:
            errors["redis"] = error_line(e)
            self._close_redis()
            red = None
        try:
            pg = self._sample_pg()
        except Exception as e:
            errors["postgresql"] = error_line(e)
            self._close_pg()
            pg = None
        snap = self._build(now, red, pg, errors)
        with self._lock:
            self._snapshot = snap
        return snap

    def _client(self) -> Any:
        if self._redis is None:
            from .. import stream

            self._redis = stream.connect(self.settings, socket_timeout=3.0)
        return self._redis

    def _close_redis(self) -> None:
        if self._redis is not None:
            try:
                self._redis.close()
            finally:
                self._redis = None

    def _sample_redis(self, now: float) -> dict[str, Any]:
        r = self._client()
        g = sample_group(r, self.settings, self.dead_pages)
        # Departed consumers were left out before the list is cut to MAX_CONSUMERS: the
        # group entries of hundreds of restarts cannot hide a live one.
        rows = [self._consumer_row(c) for c in g.consumers]
        seen = {c.name for c in g.consumers}
        for name in list(self._beats):
            if name not in seen:
                del self._beats[name]
        self.acked.append((now, g.acked))
        self.dead.append((now, g.dead_letters))
        out: dict[str, Any] = {
            "stream_length": g.length,
            "dead_letters": g.dead_letters,
            "pending": g.pending,
            "lag": g.lag,
            "group_exists": g.group_exists,
            "acked": g.acked,
            "consumers": rows[:MAX_CONSUMERS],
            "consumer_health": Counter(row["health"] for row in rows),
            "departed": g.departed,
            "dead_reasons": g.dead_reasons,
            "dead_counted": g.dead_counted,
        }
        if self.settings.partitions:
            out["partitions"] = [asdict(p) for p in g.partitions]
        self.retention = read_retention(r, self.settings)
        out["retention"] = None if self.retention is None else retention_json(self.retention)
        return out

    def _consumer_row(self, c: ConsumerState) -> dict[str, Any]:
        row = asdict(c)
        row["health"] = c.state
        row["heartbeat"] = c.heartbeat_age_s is not None
        row["rate_since_start"] = None if c.rate is None else round(c.rate, 2)
        row["rate"] = self._consumer_rate(c)
        if c.heartbeat_age_s is not None:
            row["heartbeat_age_s"] = round(c.heartbeat_age_s, 1)
        row["idle_s"] = round(c.idle_s, 1)
        return row

    def _consumer_rate(self, c: ConsumerState) -> float | None:
        """Files per second over the consumer's heartbeats of the last 10 s (`rates.LAST_10_S`)."""
        if c.updated is None or c.heartbeat_age_s is None:
            return None
        history = self._beats.setdefault(c.name, deque(maxlen=64))
        if not history or history[-1][0] != c.updated:
            history.append((c.updated, c.loaded))
        window = rates.LAST_10_S.seconds or 0.0
        while len(history) > 2 and history[1][0] <= c.updated - window:
            history.popleft()
        if c.heartbeat_age_s > window:
            return 0.0  # nothing written for the whole window
        rate = rates.over(list(history), rates.LAST_10_S)
        if rate is None:
            return None if c.rate is None else round(c.rate, 2)
        return round(rate, 2)

    def _connection(self) -> Any:
        if self._pg is None or self._pg.closed:
            import psycopg

            from ..db import connection_kwargs

            kwargs = connection_kwargs(self.settings)
            kwargs["options"] = "-c statement_timeout=5000"
            kwargs["application_name"] = "filepipe-dashboard"
            self._pg = psycopg.connect(self.settings.pg_uri, autocommit=True, **kwargs)
        return self._pg

    def _close_pg(self) -> None:
        if self._pg is not None:
            try:
                self._pg.close()
            finally:
                self._pg = None

    def _sample_pg(self) -> dict[str, Any]:
        conn = self._connection()
        state = self.table.read(conn, recent=False)
        if not state.exists:
            raise RuntimeError(
                f"table {self.settings.table} does not exist on {mask_url(self.settings.pg_uri)}: "
                "run `filepipe init-db`"
            )
        latest = self.table.latest(conn, self.latest_n)
        return {
            "latest": latest,
            "rows": state.rows_total,
            "rows_exact": not state.rows_estimated,
            "table": state.table,
        }

    # -- the snapshot ------------------------------------------------------------------

    def _processed(
        self, end: int, window: rates.Window, *, whole: bool = False
    ) -> tuple[float | None, float | None]:
        """Files/s loaded (entries acknowledged, dead letters apart) and dead letters/s, over
        `window` ending at sample `end` (`rates.over`)."""
        acked = rates.over(self.acked, window, end, whole=whole)
        dead_rate = rates.over(self.dead, window, end, whole=whole)
        processed = None if acked is None else max(acked - (dead_rate or 0.0), 0.0)
        return processed, dead_rate

    def _series(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"t": [], "processed": [], "dead": []}
        if len(self.acked) < 2:
            return out
        cutoff = self.acked[-1][0] - self.window_s
        for i in range(1, len(self.acked)):
            t = self.acked[i][0]
            if t < cutoff:
                continue
            processed, dead_rate = self._processed(i, rates.LAST_10_S)
            out["t"].append(round(t, 3))
            out["processed"].append(_round(processed))
            out["dead"].append(_round(dead_rate))
        return out

    def _empty(self) -> dict[str, Any]:
        s = self.settings
        return {
            "stream": s.stream,
            "group": s.group,
            "table": s.table,
            "dead_stream": dead_stream_name(s),
            "updated": None,
            "redis_seen": None,  # when Redis last answered a sample
            "interval": self.interval,
            "errors": {"redis": None, "postgresql": None},
            "windows": {
                "rate": rates.LAST_10_S.name,
                "rate_minute": rates.LAST_MINUTE.name,
                "consumer_rate": rates.LAST_10_S.name,
            },
            "rate": None,
            "dead_rate": None,
            "rate_minute": None,
            "series": {"t": [], "processed": [], "dead": []},
            "totals": {},
            "pending": None,
            "lag": None,
            "consumers": [],
            "consumers_summary": dict.fromkeys(SHOWN_STATES, 0),
            "consumers_departed": 0,
            "dead_by_reason": [],
            "dead_counting": False,
            "latest": [],
            "table_figures": None,
            "retention": None,
            **({"partitions": []} if s.partitions else {}),
        }

    def _build(
        self, now: float, red: dict[str, Any] | None, pg: dict[str, Any] | None, errors: dict[str, str | None]
    ) -> dict[str, Any]:
        previous = self.snapshot()
        snap = self._empty()
        snap["updated"] = now
        snap["errors"] = errors
        if red is not None:
            last = len(self.acked) - 1
            rate, dead_rate = self._processed(last, rates.LAST_10_S)
            snap["rate"], snap["dead_rate"] = _round(rate), _round(dead_rate)
            snap["rate_minute"] = _round(self._processed(last, rates.LAST_MINUTE, whole=True)[0])
            snap["series"] = self._series()
        totals: dict[str, Any] = dict(previous.get("totals") or {})
        if red is not None:
            snap["redis_seen"] = now
            totals.update(
                stream_length=red["stream_length"], dead_letters=red["dead_letters"], acked=red["acked"]
            )
            snap["pending"], snap["lag"] = red["pending"], red["lag"]
            snap["consumers"] = red["consumers"]
            summary = red["consumer_health"]
            snap["consumers_summary"] = {h: summary.get(h, 0) for h in SHOWN_STATES}
            snap["consumers_departed"] = red["departed"]
            snap["dead_by_reason"] = [
                {"reason": reason, "count": n} for reason, n in red["dead_reasons"].most_common()
            ]
            snap["dead_counting"] = red["dead_counted"] < red["dead_letters"]
            if "partitions" in red:
                snap["partitions"] = red["partitions"]
            snap["retention"] = red["retention"]
        else:  # keep the last known figures on screen, flagged by the error; nobody is known live
            for key in (
                "pending",
                "lag",
                "dead_by_reason",
                "partitions",
                "retention",
                "redis_seen",
                "consumers_departed",
                "series",
            ):
                if key in snap or key == "series":
                    snap[key] = previous.get(key, snap[key])
            snap["consumers"] = [{**c, "health": "stale"} for c in previous.get("consumers", [])]
            snap["consumers_summary"] = {**dict.fromkeys(SHOWN_STATES, 0), "stale": len(snap["consumers"])}
        if pg is not None:
            totals.update(rows=pg["rows"], rows_exact=pg["rows_exact"])
            snap["latest"], snap["table_figures"] = pg["latest"], pg["table"]
        else:
            snap["latest"], snap["table_figures"] = previous.get("latest", []), previous.get("table_figures")
        snap["totals"] = totals
        return snap


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
