"""The dashboard's figures, sampled once per interval by one background thread.

Every page and every poll reads the last snapshot; none of them talks to Redis or
PostgreSQL. One sample costs a handful of cheap round trips:

* Redis, one pipeline: XINFO GROUPS (pending, lag, entries read), XLEN of the
  stream and of the dead-letter stream, XINFO CONSUMERS; then one MGET of the
  consumers' heartbeat keys, and at most one XRANGE that reads dead letters not
  seen yet (their reasons are counted incrementally, never rescanned);
* with partitions (STREAM_PARTITIONS=P), still one pipeline for all of them (on a
  Redis Cluster, redis-py splits it by node): the same commands per partition, its
  dead letters read by a small script that returns those not seen yet together
  with the stream's length, atomically (a MULTI/EXEC cannot span the hash slots of
  different partitions); then one pipeline of GETs of the heartbeats. The figures
  are summed over the partitions, each consumer shown once;
* what the stream keeps and why, its memory and Redis's against maxmemory: the
  reading `filepipe status` makes (`status.read_retention`: one more pipeline and
  one INFO);
* PostgreSQL: the latest rows by `event_time` (indexed, LIMIT), and a row count
  whose interval grows with its cost (an estimate when counting is too slow).

The processing rate comes from the group's own counter: entries read by the group
minus those still pending are the entries acknowledged, by every consumer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from .. import timescale
from ..config import Settings, mask_url
from ..constants import SAMPLE_PAGE_BYTES, heartbeat_key
from ..heartbeat import Heartbeat
from ..partitions import Partition, partitions
from ..redaction import error_line
from ..status import (
    HISTORY_MINUTES,
    LARGE_TABLE_ROWS,
    ConsumerState,
    DeadTally,
    PartitionState,
    RetentionState,
    count_reasons,
    dead_stream_name,
    merge_consumers,
    read_retention,
    retention_json,
    sum_or_none,
)
from ..stream import ReadSize, entries_bytes

log = logging.getLogger("filepipe")

FRESH_S = 10.0  # a heartbeat older than this: the consumer is stalled (it expires at 30 s)
RATE_WINDOW_S = 5.0  # each chart point is the rate over this many seconds
HEADLINE_WINDOW_S = 10.0
DEAD_SCAN_COUNT = 2000
MAX_CONSUMERS = 500  # listed in a snapshot (the summary counts them all)
BEATS_PER_MGET = 1000

# One partition's dead letters after a cursor (ARGV[1]), at most ARGV[2] of them, and
# its length, read in one atomic step: when the two disagree at the end of the
# stream, entries were deleted or trimmed.
DEAD_PAGE_SCRIPT = """
local n = redis.call('XLEN', KEYS[1])
if n == 0 then return {0, {}} end
return {n, redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
"""


@dataclass
class _StreamSample:
    """What one pipeline said of one (partition) stream."""

    part: Partition
    length: int
    dead: int
    group: dict[str, Any]
    consumers: list[ConsumerState]
    dead_page: list[Any]

    @property
    def pending(self) -> int:
        return int(self.group["pending"]) if self.group else 0

    @property
    def lag(self) -> int | None:
        # Before the first consumer creates the group, every entry is waiting for it.
        lag = self.group.get("lag") if self.group else self.length
        return None if lag is None else int(lag)

    @property
    def entries_read(self) -> int | None:
        read = self.group.get("entries-read") if self.group else 0
        delivered = _text(self.group.get("last-delivered-id")) if self.group else ""
        if read is None and self.part.index is not None and delivered == "0-0":
            # A partition nobody has read from yet: Redis says "unknown", but it is none,
            # and one idle partition must not hide the counters of the others.
            read = 0
        return None if read is None else int(read)


@dataclass
class Sample:
    """The group's counters at one instant."""

    t: float
    acked: int | None
    dead: int | None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _rate_at(samples: list[Sample], i: int, j: int, attr: str) -> float | None:
    a, b = samples[j], samples[i]
    va, vb = getattr(a, attr), getattr(b, attr)
    if va is None or vb is None or b.t <= a.t:
        return None
    return float(max(vb - va, 0) / (b.t - a.t))


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
        self.samples: deque[Sample] = deque(maxlen=max(10, int(history_s / interval) + 1))
        self._redis: Any = None
        self._pg: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot: dict[str, Any] = self._empty()
        # dead letters by reason, counted incrementally: dead-letter stream -> tally
        self._dead: dict[str, DeadTally] = {}
        self._dead_sizes: dict[str, ReadSize] = {}
        # consumers' heartbeat history: name -> (updated, processed) pairs
        self._beats: dict[str, deque[tuple[float, int]]] = {}
        # the table's row count, refreshed less often the more it costs
        self._rows: int | None = None
        self._rows_exact = True
        self._rows_at = 0.0
        self._next_count = 0.0
        # The table's kind, TimescaleDB figures and rate history, read less often the more they cost.
        self._figures = timescale.FiguresCache(min_every=2 * interval)
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
        if self._redis is not None:
            self._redis.close()
        if self._pg is not None:
            self._pg.close()

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
        s = self.settings
        r = self._client()
        parts = partitions(s)
        pipe = r.pipeline(transaction=False)
        for part in parts:
            pipe.xinfo_groups(part.stream)
            pipe.xlen(part.stream)
            if s.partitions:
                # (a cluster pipeline has no eval(): the command itself, routed by its key)
                start = self._dead_start(part.dead_stream)
                pipe.execute_command("EVAL", DEAD_PAGE_SCRIPT, 1, part.dead_stream, start,
                                     self._dead_count(part.dead_stream))
            else:
                pipe.xlen(part.dead_stream)
            pipe.xinfo_consumers(part.stream, s.group)
        replies = pipe.execute(raise_on_error=False)
        streams = [self._stream_sample(part, replies[4 * i : 4 * i + 4]) for i, part in enumerate(parts)]

        pending = sum(st.pending for st in streams)
        lag = sum_or_none([st.lag for st in streams])
        entries_read = sum_or_none([st.entries_read for st in streams])
        dead_len = sum(st.dead for st in streams)

        beats: list[Any] = []
        if s.partitions:
            # Each consumer once; its heartbeat is the same on every partition it reads.
            members = merge_consumers(st.consumers for st in streams)
            if members:
                hb = r.pipeline(transaction=False)
                for member in members:
                    hb.get(heartbeat_key(member.heartbeat_stream, member.name))
                beats = hb.execute()
        else:
            members = streams[0].consumers
            if members:
                hb = r.pipeline(transaction=False)
                for i in range(0, len(members), BEATS_PER_MGET):
                    hb.mget([heartbeat_key(s.stream, m.name) for m in members[i : i + BEATS_PER_MGET]])
                beats = [beat for chunk in hb.execute() for beat in chunk]
        # Departed consumers (no heartbeat, nothing pending) are left out before the list is
        # cut to MAX_CONSUMERS: the group entries of hundreds of restarts cannot hide a live one.
        everyone = self._consumers(now, members, beats)
        listed = everyone[:MAX_CONSUMERS]

        acked: int | None = None
        if entries_read is not None:
            acked = max(entries_read - pending, 0)
        elif any(c["heartbeat"] for c in everyone):
            # Without the group's read counter (Redis < 7), the live consumers' own totals.
            acked = sum(c["inserted"] + c["dead_lettered"] for c in everyone if c["heartbeat"])
        if s.partitions:
            for st in streams:
                self._count_dead(st.part.dead_stream, st.dead_page, st.dead)
        else:
            self._scan_dead(r, s.dead_stream, dead_len)
        self.samples.append(Sample(now, acked, dead_len))
        tallies = [self._dead.get(part.dead_stream) or DeadTally() for part in parts]
        reasons: Counter[str] = Counter()
        for tally in tallies:
            reasons.update(tally.reasons)
        out: dict[str, Any] = {
            "stream_length": sum(st.length for st in streams),
            "dead_letters": dead_len,
            "pending": pending,
            "lag": lag,
            "group_exists": any(st.group for st in streams),
            "acked": acked,
            "consumers": listed,
            "consumer_health": Counter(c["health"] for c in everyone),
            "dead_reasons": reasons,
            "dead_counted": sum(tally.counted for tally in tallies),
        }
        if s.partitions:
            out["partitions"] = [
                asdict(PartitionState(st.part.stream, st.length, st.lag, st.pending, st.dead, bool(st.group)))
                for st in streams
            ]
        self.retention = read_retention(r, s)
        out["retention"] = None if self.retention is None else retention_json(self.retention)
        return out

    def _stream_sample(self, part: Partition, replies: list[Any]) -> _StreamSample:
        """One stream's figures from its four pipeline replies."""
        import redis

        groups, length, dead, consumers = replies
        for reply in (length, dead):
            if isinstance(reply, Exception):
                raise reply
        # A stream or group that does not exist yet is not an error: nothing was produced.
        group: dict[str, Any] = {}
        if not isinstance(groups, redis.ResponseError):
            if isinstance(groups, Exception):
                raise groups
            for g in groups:
                if _text(g.get("name")) == self.settings.group:
                    group = g
        if isinstance(consumers, redis.ResponseError):
            consumers = []
        elif isinstance(consumers, Exception):
            raise consumers
        page: list[Any] = []
        if isinstance(dead, list):  # the script's reply: [length, entries]
            dead, raw = dead
            page = [(entry_id, _pairs(flat)) for entry_id, flat in raw]
        members = [
            ConsumerState(
                name=_text(c["name"]),
                pending=int(c.get("pending", 0)),
                idle_s=int(c.get("idle", 0)) / 1000,
                heartbeat_stream=part.stream,
            )
            for c in consumers
        ]
        return _StreamSample(part, int(length), int(dead), group, members, page)

    def _consumers(self, now: float, members: list[ConsumerState], beats: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for member, raw in zip(members, beats, strict=True):
            name, pending = member.name, member.pending
            beat = Heartbeat.from_json(raw)
            if beat is None and pending == 0:
                continue  # a consumer that left cleanly; its group entry lingers
            seen.add(name)
            age = None if beat is None else max(now - beat.updated, 0.0)
            if beat is None:
                health = "gone"
            elif age is not None and age > FRESH_S:
                health = "stalled"
            else:
                health = "healthy"
            out.append(
                {
                    "name": name,
                    "host": beat.host if beat else "",
                    "pid": beat.pid if beat else None,
                    "health": health,
                    "heartbeat": beat is not None,
                    "heartbeat_age_s": None if age is None else round(age, 1),
                    "rate": self._consumer_rate(name, beat) if beat else None,
                    "inserted": beat.inserted if beat else 0,
                    "dead_lettered": beat.dead_lettered if beat else 0,
                    "batches": beat.batches if beat else 0,
                    "pending": pending,
                    "idle_s": round(member.idle_s, 1),
                    "last_error": beat.last_error if beat else "",
                }
            )
        for name in list(self._beats):
            if name not in seen:
                del self._beats[name]
        order = {"healthy": 0, "stalled": 1, "gone": 2}
        out.sort(key=lambda c: (order[c["health"]], c["name"]))
        return out

    def _consumer_rate(self, name: str, beat: Heartbeat) -> float | None:
        """Entries per second over the consumer's last ~10 s of heartbeats."""
        updated, processed = beat.updated, beat.inserted + beat.dead_lettered
        history = self._beats.setdefault(name, deque(maxlen=64))
        if not history or history[-1][0] != updated:
            history.append((updated, processed))
        while len(history) > 2 and history[1][0] <= updated - HEADLINE_WINDOW_S:
            history.popleft()
        if len(history) < 2:
            return None if beat.rate is None else round(beat.rate, 2)
        (t0, n0), (t1, n1) = history[0], history[-1]
        if time.time() - t1 > FRESH_S:
            return 0.0
        return round(max(n1 - n0, 0) / (t1 - t0), 2) if t1 > t0 else 0.0

    def _dead_start(self, dead_stream: str) -> str:
        """Where the next read of `dead_stream` starts: after the last entry counted."""
        tally = self._dead.get(dead_stream)
        return "(" + tally.last_id if tally is not None and tally.last_id else "-"

    def _dead_count(self, dead_stream: str) -> int:
        """How many dead letters the next sample reads: at most `DEAD_SCAN_COUNT`, and
        about SAMPLE_PAGE_BYTES of them at the sizes seen so far (big ones a few at a time)."""
        size = self._dead_sizes.setdefault(
            dead_stream, ReadSize(DEAD_SCAN_COUNT, SAMPLE_PAGE_BYTES, SAMPLE_PAGE_BYTES // 16)
        )
        return size.count

    def _scan_dead(self, r: Any, dead_stream: str, dead_len: int) -> None:
        """Counts the reasons of dead letters not seen yet, `_dead_count` per sample.
        The read and the length come from one MULTI/EXEC (see `_count_dead`)."""
        tally = self._dead.get(dead_stream)
        if dead_len == 0 and (tally is None or tally.counted == 0):
            return
        pipe = r.pipeline(transaction=True)
        pipe.xrange(dead_stream, self._dead_start(dead_stream), "+", count=self._dead_count(dead_stream))
        pipe.xlen(dead_stream)
        entries, length = pipe.execute()
        self._count_dead(dead_stream, entries, int(length))

    def _count_dead(self, dead_stream: str, entries: list[Any], length: int) -> None:
        """Adds the reasons of `entries`, read after the cursor of `dead_stream` at the
        same instant as its `length`. When the two disagree at the end of the stream,
        entries were deleted or trimmed: the count starts over."""
        tally = self._dead.setdefault(dead_stream, DeadTally())
        count_reasons(tally, entries)
        if entries:
            tally.last_id = _text(entries[-1][0])
        size = self._dead_sizes.get(dead_stream)
        asked = size.count if size is not None else DEAD_SCAN_COUNT
        at_end = len(entries) < asked
        if size is not None and entries:
            size.observe(len(entries), entries_bytes(entries))
        if tally.counted > length or (at_end and tally.counted != length):
            self._dead[dead_stream] = DeadTally()

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
        import psycopg
        from psycopg import sql

        from ..db import table_ident

        conn = self._connection()
        ident = table_ident(self.settings.table)
        latest_sql = sql.SQL(
            "SELECT stream_id, filename, size_bytes, content_type, consumer, storage, event_time, "
            "processed_at FROM {} {} ORDER BY event_time DESC, stream_id DESC LIMIT %s"
        )
        try:
            # Among the last day's events first: a hypertable's older chunks are not even opened.
            day = sql.SQL("WHERE event_time >= now() - interval '24 hours'")
            rows = conn.execute(latest_sql.format(ident, day), (self.latest_n,)).fetchall()
            figures = self._figures.get(conn, self.settings.table, history_minutes=HISTORY_MINUTES)
            if len(rows) < self.latest_n:
                # Then the whole table; of a hypertable with many chunks, the newest chunks only.
                facts = figures.facts
                since: sql.Composable = sql.SQL("")
                interval = facts.chunk_interval
                if facts.chunks > timescale.MAX_COUNTED_CHUNKS and facts.newest_chunk and interval:
                    start = facts.newest_chunk - 2 * interval
                    since = sql.SQL("WHERE event_time >= {}").format(sql.Literal(start))
                rows = conn.execute(latest_sql.format(ident, since), (self.latest_n,)).fetchall()
        except psycopg.errors.UndefinedTable:
            raise RuntimeError(
                f"table {self.settings.table} does not exist on {mask_url(self.settings.pg_uri)}: "
                "run `filepipe init-db`"
            ) from None
        latest = [
            {
                "stream_id": row[0],
                "filename": row[1],
                "size_bytes": row[2],
                "content_type": row[3],
                "consumer": row[4],
                "storage": row[5],
                "event_time": _iso(row[6]),
                "processed_at": _iso(row[7]),
            }
            for row in rows
        ]
        self._count_rows(conn, ident, figures)
        table = figures.to_json()
        return {"latest": latest, "rows": self._rows, "rows_exact": self._rows_exact, "table": table}

    def _count_rows(self, conn: Any, ident: Any, figures: timescale.TableFigures) -> None:
        """An exact count while it is cheap (at most ~2% of the time is spent counting),
        the catalog's chunk-by-chunk estimate for a large table (or one of many chunks) or
        when counting takes longer than the statement timeout."""
        import psycopg
        from psycopg import sql

        now = time.monotonic()
        estimate = figures.estimated_rows
        if not figures.worth_counting(LARGE_TABLE_ROWS):
            self._rows, self._rows_exact, self._rows_at = estimate, False, time.time()
            return
        if now < self._next_count:
            return
        started = time.monotonic()
        try:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
            self._rows, self._rows_exact = int(row[0]), True
            cost = time.monotonic() - started
            self._next_count = time.monotonic() + max(2 * self.interval, 50 * cost)
        except psycopg.errors.QueryCanceled:
            self._rows, self._rows_exact = estimate, False
            self._next_count = time.monotonic() + 300
        self._rows_at = time.time()

    # -- the snapshot ------------------------------------------------------------------

    def _series(self) -> dict[str, list[Any]]:
        samples = list(self.samples)
        out: dict[str, list[Any]] = {"t": [], "processed": [], "dead": []}
        if len(samples) < 2:
            return out
        cutoff = samples[-1].t - self.window_s
        j = 0
        for i in range(1, len(samples)):
            if samples[i].t < cutoff:
                continue
            while j + 1 < i and samples[j + 1].t <= samples[i].t - RATE_WINDOW_S:
                j += 1
            acked = _rate_at(samples, i, j, "acked")
            dead = _rate_at(samples, i, j, "dead")
            processed = None if acked is None else max(acked - (dead or 0.0), 0.0)
            out["t"].append(round(samples[i].t, 3))
            out["processed"].append(None if processed is None else round(processed, 2))
            out["dead"].append(None if dead is None else round(dead, 2))
        return out

    def _headline(self) -> tuple[float | None, float | None]:
        samples = list(self.samples)
        if len(samples) < 2:
            return None, None
        i = len(samples) - 1
        j = i - 1
        while j > 0 and samples[j].t > samples[i].t - HEADLINE_WINDOW_S:
            j -= 1
        acked = _rate_at(samples, i, j, "acked")
        dead = _rate_at(samples, i, j, "dead")
        processed = None if acked is None else max(acked - (dead or 0.0), 0.0)
        return (
            None if processed is None else round(processed, 2),
            None if dead is None else round(dead, 2),
        )

    def _empty(self) -> dict[str, Any]:
        s = self.settings
        return {
            "stream": s.stream,
            "group": s.group,
            "table": s.table,
            "dead_stream": dead_stream_name(s),
            "updated": None,
            "interval": self.interval,
            "errors": {"redis": None, "postgresql": None},
            "rate": None,
            "dead_rate": None,
            "series": {"t": [], "processed": [], "dead": []},
            "totals": {},
            "pending": None,
            "lag": None,
            "consumers": [],
            "consumers_summary": {"healthy": 0, "stalled": 0, "gone": 0},
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
        rate, dead_rate = self._headline()
        snap["rate"], snap["dead_rate"] = rate, dead_rate
        snap["series"] = self._series()
        totals: dict[str, Any] = dict(previous.get("totals") or {})
        if red is not None:
            totals.update(
                stream_length=red["stream_length"], dead_letters=red["dead_letters"], acked=red["acked"]
            )
            snap["pending"], snap["lag"] = red["pending"], red["lag"]
            snap["consumers"] = red["consumers"]
            summary = red["consumer_health"]
            snap["consumers_summary"] = {h: summary.get(h, 0) for h in ("healthy", "stalled", "gone")}
            snap["dead_by_reason"] = [
                {"reason": reason, "count": n} for reason, n in red["dead_reasons"].most_common()
            ]
            snap["dead_counting"] = red["dead_counted"] < red["dead_letters"]
            if "partitions" in red:
                snap["partitions"] = red["partitions"]
            snap["retention"] = red["retention"]
        else:  # keep the last known figures on screen, flagged by the error
            kept = ("pending", "lag", "consumers", "consumers_summary", "dead_by_reason", "partitions")
            for key in (*kept, "retention"):
                if key in snap:
                    snap[key] = previous.get(key, snap[key])
        if pg is not None:
            totals.update(rows=pg["rows"], rows_exact=pg["rows_exact"])
            snap["latest"], snap["table_figures"] = pg["latest"], pg["table"]
        else:
            snap["latest"], snap["table_figures"] = previous.get("latest", []), previous.get("table_figures")
        snap["totals"] = totals
        return snap


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    """`[k1, v1, k2, v2]` (an entry's fields as a script returns them) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
