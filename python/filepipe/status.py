"""`filepipe status`: the whole pipeline at a glance (the seed's `python status.py`).

Redis says what is waiting (stream length, group lag, pending entries, each
consumer's pending and idle time, dead letters by reason); the consumers' heartbeats
say who is alive, where, how fast and what went wrong last; the events table says
what arrived (rows in the last minute and hour, throughput). From those, one health
line and an exit code: 0 healthy, 1 degraded or unreachable.

Every age is measured against the server's own clock (Redis TIME, PostgreSQL
now()), so clock skew between hosts does not distort it.
"""

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
import redis
from psycopg import sql
from redis.exceptions import RedisClusterException

from . import constants as c
from . import db, retention, stream, timescale
from .config import Settings, mask_url
from .constants import HEARTBEAT_TTL_S, STATUS_SCAN_BYTES, heartbeat_key
from .errors import TransientError
from .heartbeat import Heartbeat
from .partitions import Partition, partitions
from .redaction import printable

WINDOW_S = 60  # "last minute": arrivals, dead letters, rows, throughput
ARRIVALS_CAP = 10_000  # entries read to count the last minute's arrivals
DEAD_SCAN_LIMIT = 50_000  # dead letters read to count reasons (the newest ones)
LARGE_TABLE_ROWS = 1_000_000  # above this, the row total is PostgreSQL's estimate
HISTORY_MINUTES = 60  # the rate history: files and bytes per minute and consumer
STATEMENT_TIMEOUT_MS = 15_000

Command = Callable[..., Any]


# -- state ------------------------------------------------------------------------------------


@dataclass
class ConsumerState:
    name: str
    pending: int
    idle_s: float
    host: str | None = None
    pid: int | None = None
    rate: float | None = None
    inserted: int | None = None
    last_error: str = ""
    heartbeat_age_s: float | None = None
    silent: bool = False
    heartbeat_stream: str = ""  # the (partition) stream whose heartbeat key it writes


@dataclass
class PendingEntry:
    id: str
    consumer: str
    age_s: float
    idle_s: float
    deliveries: int
    stream: str = ""


@dataclass
class PartitionState:
    stream: str
    length: int
    lag: int | None
    pending: int
    dead_total: int
    group_exists: bool


@dataclass
class StreamState:
    stream: str = ""
    exists: bool = False
    length: int = 0
    last_entry_id: str = ""
    last_entry_age_s: float | None = None
    entries_added: int | None = None
    group_exists: bool = False
    lag: int | None = None
    lag_capped: bool = False
    entries_read: int | None = None
    waiting_age_s: float | None = None  # the oldest entry not yet delivered
    pending: int = 0
    oldest_pending: PendingEntry | None = None
    arrivals_last_minute: int = 0
    arrivals_capped: bool = False
    consumers: list[ConsumerState] = field(default_factory=list)
    dead_total: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    dead_counted: int = 0  # dead letters whose reason was read (the newest DEAD_SCAN_LIMIT)
    dead_last_minute: int = 0
    dead_last_minute_by_reason: dict[str, int] = field(default_factory=dict)
    groups_missing: list[str] = field(default_factory=list)  # streams with entries and no group
    writes_refused: str = ""  # why Redis refuses writes now (a read-only replica, a failed snapshot)
    partitions: list[PartitionState] = field(default_factory=list)  # STREAM_PARTITIONS > 0


@dataclass
class KeptState:
    """What one (partition) stream keeps in Redis, and why."""

    stream: str
    length: int = 0
    memory_bytes: int = 0
    oldest_id: str = ""
    oldest_age_s: float | None = None
    point: str = ""  # what is below it goes at the next trim
    why: str = ""  # pending | unread | retention | no_group (see retention.TrimResult)
    holder: str = ""  # the group that holds the entries (why pending or unread)
    holder_pending: int = 0
    holder_lag: int | None = None
    trimmable: bool = False  # entries below the point wait for the next pass
    dead_letters: int = 0
    dead_memory_bytes: int = 0


@dataclass
class RedisMemory:
    """Redis's memory against its `maxmemory` (on a cluster: the fullest master)."""

    used_bytes: int = 0
    max_bytes: int = 0  # 0: no maxmemory
    policy: str = ""
    node: str = ""  # on a cluster, which master

    @property
    def share(self) -> float | None:
        return self.used_bytes / self.max_bytes if self.max_bytes else None


@dataclass
class RetentionState:
    """What the stream (every partition) keeps, what Redis has left, and the settings
    that decide it. Read by `read_retention`: status, the dashboard, both /metrics and
    the benchmark all show this one reading."""

    streams: list[KeptState] = field(default_factory=list)
    memory: RedisMemory | None = None
    stream_retention: str = ""  # STREAM_RETENTION as set
    kept_by_retention: str = ""  # what it keeps, in words
    dead_letter_retention: str = ""
    dead_cap: int = 0  # 0: no count limit

    @property
    def length(self) -> int:
        return sum(k.length for k in self.streams)

    @property
    def memory_bytes(self) -> int:
        return sum(k.memory_bytes for k in self.streams)

    @property
    def dead_memory_bytes(self) -> int:
        return sum(k.dead_memory_bytes for k in self.streams)

    @property
    def held(self) -> KeptState | None:
        """The stream that keeps the most entries, if it keeps any."""
        kept = [k for k in self.streams if k.length]
        return max(kept, key=lambda k: k.length) if kept else None

    def reason(self) -> str:
        """Why the entries are kept, in words: `group audit has 5,000 pending (…)`."""
        k = self.held
        if k is None:
            return "nothing: every acknowledged entry is trimmed"
        where = f" on {k.stream}" if len(self.streams) > 1 else ""
        if k.why == "pending":
            age = f", the oldest from {_duration(k.oldest_age_s)} ago" if k.oldest_age_s is not None else ""
            text = f"group {k.holder} has {_entries(k.holder_pending)} pending{where}{age}"
        elif k.why == "unread":
            lag = _entries(k.holder_lag) if k.holder_lag is not None else "entries"
            text = f"group {k.holder} has not read {lag}{where}"
        elif k.why == "retention":
            text = f"STREAM_RETENTION={self.stream_retention} keeps {self.kept_by_retention}"
        elif k.why == "no_group":
            text = f"no consumer group has read {k.stream} yet"
        else:
            text = "-"
        if k.trimmable:
            text += " (the rest goes at the next trim)"
        return text


@dataclass
class TableState:
    exists: bool = False
    rows_total: int = 0
    rows_estimated: bool = False
    rows_last_minute: int = 0
    rows_last_hour: int = 0
    recent_limited_to_day: bool = False  # large table: recent rows counted among the last day's events
    # Its kind, TimescaleDB figures and rate history (`timescale.TableFigures.to_json`).
    table: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Rows per second over the last minute."""
        return self.rows_last_minute / WINDOW_S


@dataclass
class Status:
    stream_name: str
    group: str
    table: str
    dead_stream: str
    redis_url: str
    pg_uri: str
    taken_at: str
    redis: StreamState | None = None
    events: TableState | None = None
    retention: RetentionState | None = None
    partitions: int = 0
    redis_error: str = ""
    pg_error: str = ""
    health: str = "healthy"  # healthy | degraded | unreachable
    unreachable: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.health == "healthy" else 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        if self.events is not None:
            d["events"]["throughput"] = self.events.throughput
        if self.retention is not None:
            d["retention"] = retention_json(self.retention)
        return d


# -- collecting -------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: Any) -> int:
    return int(_text(entry_id).partition("-")[0] or 0)


@dataclass
class DeadTally:
    """What is known of one dead-letter stream between refreshes."""

    reasons: Counter[str] = field(default_factory=Counter)
    counted: int = 0
    last_id: str = ""
    total_seen: int = 0


class Collector:
    """Reads the state of one stream (all its partitions), group and table; keeps its
    connections, and what it has counted of the dead letters, between refreshes
    (`--watch`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = stream.connect(settings, socket_timeout=max(10.0, settings.connect_timeout_s * 2))
        self.pg: psycopg.Connection[Any] | None = None
        self._dead: dict[str, DeadTally] = {}
        self.figures = timescale.FiguresCache()

    def close(self) -> None:
        self.redis.close()
        if self.pg is not None:
            with contextlib.suppress(psycopg.Error):
                self.pg.close()
            self.pg = None

    def collect(self) -> Status:
        s = self.settings
        st = Status(
            stream_name=s.stream,
            group=s.group,
            table=s.table,
            dead_stream=dead_stream_name(s),
            redis_url=mask_url(s.redis_url),
            pg_uri=mask_url(s.pg_uri),
            taken_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            partitions=s.partitions,
        )
        try:
            st.redis = self._collect_redis()
            st.retention = read_retention(self.redis, s)
        except (redis.ConnectionError, redis.TimeoutError, TransientError, RedisClusterException) as e:
            st.redis_error = f"cannot reach Redis at {st.redis_url}: {db.first_line(e)}"
            st.unreachable.append("redis")
        except redis.RedisError as e:
            st.redis_error = f"Redis refused a status query: {db.first_line(e)}"
        try:
            st.events = self._collect_table()
        except psycopg.OperationalError as e:
            st.pg_error = f"cannot reach PostgreSQL at {st.pg_uri}: {db.first_line(e)}"
            st.unreachable.append("postgres")
            self._drop_pg()
        except psycopg.Error as e:
            st.pg_error = f"PostgreSQL refused a status query: {db.first_line(e)}"
            self._drop_pg()
        assess(st, s)
        return st

    # -- Redis --------------------------------------------------------------------------------

    def _collect_redis(self) -> StreamState:
        reply = self.redis.time()
        if isinstance(reply, dict):  # a cluster client asks one node and names it
            reply = next(iter(reply.values()))
        sec, usec = reply
        now_ms = int(sec) * 1000 + int(usec) // 1000
        parts = [self._collect_partition(part, now_ms) for part in partitions(self.settings)]
        out = parts[0] if len(parts) == 1 else _merge(parts)
        out.partitions = (
            [
                PartitionState(p.stream, p.length, p.lag, p.pending, p.dead_total, p.group_exists)
                for p in parts
            ]
            if self.settings.partitions
            else []
        )
        self._collect_heartbeats(out)
        out.writes_refused = self._collect_write_refusal()
        return out

    def _collect_write_refusal(self) -> str:
        """Why Redis takes no write now, from its own state: a replica (as during a
        failover), or a failed snapshot with `stop-writes-on-bgsave-error` (MISCONF).
        A full Redis is seen in the consumers' heartbeats, which still get through."""
        replies = self.redis.info("replication"), self.redis.info("persistence")
        nodes: list[list[dict[str, Any]]] = []
        for reply in replies:
            # A cluster client asks every node: one dict per node.
            values = list(reply.values()) if "role" not in reply and "loading" not in reply else [reply]
            nodes.append([v for v in values if isinstance(v, dict)])
        for info in nodes[0]:
            if info.get("role") == "slave":
                master = f"{info.get('master_host')}:{info.get('master_port')}"
                link = info.get("master_link_status", "down")
                return (f"Redis is a read only replica (of {master}, link {link}): it refuses writes "
                        "(READONLY), and consumers wait for a writable master")
        if any(info.get("rdb_last_bgsave_status") == "err" for info in nodes[1]):
            try:
                config = self.redis.config_get("stop-writes-on-bgsave-error")
                config.update(self.redis.config_get("save"))
            except (redis.RedisError, RedisClusterException):
                config = {}  # CONFIG is often disabled on managed servers
            first = next(iter(config.values()), None)
            if isinstance(first, dict):  # a cluster client: one node's
                config = first
            refusing = _text(config.get("stop-writes-on-bgsave-error", "")) == "yes" and bool(
                _text(config.get("save", "")).strip())
            if refusing or not config:
                return ("Redis refuses writes (MISCONF)" + ("" if refusing else ", if snapshots are on") +
                        ": its last RDB snapshot failed; consumers wait until one succeeds")
        return ""

    def _collect_partition(self, part: Partition, now_ms: int) -> StreamState:
        r = self.redis
        out = StreamState(stream=part.stream)
        try:
            info = r.xinfo_stream(part.stream)
        except redis.ResponseError as e:
            if "no such key" not in str(e).lower():
                raise
            info = None
        if info is not None:
            out.exists = True
            out.length = int(info["length"])
            last = info.get("last-generated-id")
            if last and _text(last) != "0-0":
                out.last_entry_id = _text(last)
                out.last_entry_age_s = max(0.0, (now_ms - _id_ms(last)) / 1000)
            added = info.get("entries-added")
            out.entries_added = None if added is None else int(added)
            self._collect_group(out, part, now_ms)
            since = now_ms - WINDOW_S * 1000
            sampled = (
                None
                if out.entries_added is None
                else retention.arrivals_since(r, part.stream, since, out.entries_added, ARRIVALS_CAP)
            )
            if sampled is not None:
                out.arrivals_last_minute = sampled
            else:
                out.arrivals_last_minute, out.arrivals_capped = _count_range(
                    r, part.stream, f"{since}-0", ARRIVALS_CAP
                )
            if out.length and not out.group_exists:
                out.groups_missing = [part.stream]
        self._collect_dead(out, part.dead_stream, now_ms)
        return out

    def _collect_group(self, out: StreamState, part: Partition, now_ms: int) -> None:
        s, r = self.settings, self.redis
        group = next((g for g in r.xinfo_groups(part.stream) if _text(g["name"]) == s.group), None)
        if group is None:
            return
        out.group_exists = True
        out.pending = int(group["pending"])
        last_delivered = _text(group.get("last-delivered-id", "0-0"))
        read = group.get("entries-read")
        out.entries_read = None if read is None else int(read)
        lag = group.get("lag")
        if lag is not None:
            out.lag = int(lag)
        else:  # Redis cannot tell (entries deleted in between, or Redis < 7): count, up to a cap
            out.lag, out.lag_capped = _count_range(r, part.stream, f"({last_delivered}", ARRIVALS_CAP)
        if out.lag:
            first = r.xrange(part.stream, min=f"({last_delivered}", max="+", count=1)
            if first:
                out.waiting_age_s = max(0.0, (now_ms - _id_ms(first[0][0])) / 1000)
        if out.pending:
            rows = r.xpending_range(part.stream, s.group, min="-", max="+", count=1)
            if rows:
                row = rows[0]
                out.oldest_pending = PendingEntry(
                    id=_text(row["message_id"]),
                    consumer=_text(row["consumer"]),
                    age_s=max(0.0, (now_ms - _id_ms(row["message_id"])) / 1000),
                    idle_s=int(row["time_since_delivered"]) / 1000,
                    deliveries=int(row["times_delivered"]),
                    stream=part.stream,
                )
        for row in r.xinfo_consumers(part.stream, s.group):
            out.consumers.append(
                ConsumerState(
                    name=_text(row["name"]),
                    pending=int(row["pending"]),
                    idle_s=int(row["idle"]) / 1000,
                    heartbeat_stream=part.stream,
                )
            )

    def _collect_heartbeats(self, out: StreamState) -> None:
        """Each consumer's heartbeat (it writes the same one for every partition it reads:
        one is enough)."""
        if not out.consumers:
            return
        pipe = self.redis.pipeline(transaction=False)
        for state in out.consumers:
            key = heartbeat_key(state.heartbeat_stream or self.settings.stream, state.name)
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        for i, state in enumerate(out.consumers):
            _apply_heartbeat(state, replies[2 * i], replies[2 * i + 1])

    def _collect_dead(self, out: StreamState, dead_stream: str, now_ms: int) -> None:
        """Dead letters by reason. The first call reads the newest DEAD_SCAN_LIMIT; later
        calls (`--watch`) read only what was added since, unless the stream shrank or was
        replaced."""
        r = self.redis
        tally = self._dead.setdefault(dead_stream, DeadTally())
        out.dead_total = int(r.xlen(dead_stream))
        gone = bool(tally.last_id) and not r.xrange(
            dead_stream, min=tally.last_id, max=tally.last_id, count=1
        )
        if gone or out.dead_total < tally.total_seen or not out.dead_total:
            tally = self._dead[dead_stream] = DeadTally()
        tally.total_seen = out.dead_total
        if not out.dead_total:
            return
        # Read in pages of about SAMPLE_PAGE_BYTES, at most STATUS_SCAN_BYTES in all: big
        # dead letters are read a few at a time, and only so many.
        if not tally.last_id:
            for page in stream.read_pages(r, dead_stream, "+", "-", reverse=True, limit=DEAD_SCAN_LIMIT,
                                          total_budget=STATUS_SCAN_BYTES):
                if not tally.last_id:
                    tally.last_id = _text(page[0][0])
                count_reasons(tally, page)
        else:
            for page in stream.read_pages(r, dead_stream, f"({tally.last_id}", "+",
                                          total_budget=STATUS_SCAN_BYTES):
                tally.last_id = _text(page[-1][0])
                count_reasons(tally, page)
        out.dead_counted = tally.counted
        out.dead_by_reason = dict(tally.reasons.most_common())
        recent: Counter[str] = Counter()
        since = f"{now_ms - WINDOW_S * 1000}-0"
        for page in stream.read_pages(r, dead_stream, since, "+", limit=ARRIVALS_CAP,
                                      total_budget=STATUS_SCAN_BYTES):
            recent.update(_text((fields or {}).get(b"reason", b"unknown")) for _, fields in page)
        out.dead_last_minute = sum(recent.values())
        out.dead_last_minute_by_reason = dict(recent.most_common())

    # -- PostgreSQL ---------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self.pg is None or self.pg.closed:
            self.pg = db.connect(
                self.settings, autocommit=True, options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
            )
        return self.pg

    def _drop_pg(self) -> None:
        if self.pg is not None:
            with contextlib.suppress(psycopg.Error):
                self.pg.close()
        self.pg = None

    def _collect_table(self) -> TableState:
        table = self.settings.table
        conn = self._connection()
        out = TableState()
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        out.exists = bool(row and row[0])
        if not out.exists:
            return out
        ident = db.table_ident(table)
        figures = self.figures.get(conn, table, history_minutes=HISTORY_MINUTES)
        out.table = figures.to_json()
        if not figures.worth_counting(LARGE_TABLE_ROWS):
            out.rows_total, out.rows_estimated = figures.estimated_rows, True
            out.recent_limited_to_day = True
        else:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
            out.rows_total = int(row[0]) if row else 0
        # processed_at has no index: on a large table, look only at the last day's events
        # (event_time is indexed, and a hypertable skips older chunks).
        day = (
            sql.SQL(" AND event_time >= now() - interval '1 day'")
            if out.recent_limited_to_day
            else sql.SQL("")
        )
        row = conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE processed_at >= now() - make_interval(secs => %s)), count(*) "
                "FROM {} WHERE processed_at >= now() - interval '1 hour'{}"
            ).format(ident, day),
            (WINDOW_S,),
        ).fetchone()
        if row:
            out.rows_last_minute, out.rows_last_hour = int(row[0]), int(row[1])
        return out


def read_retention(r: Any, settings: Settings, now_ms: int | None = None) -> RetentionState | None:
    """What every stream of `settings` keeps and why (the plan script, read-only), their
    memory (MEMORY USAGE) and Redis's against maxmemory (INFO memory; on a cluster, the
    fullest master): one pipeline, and one INFO. None where the server refuses the script
    (before Redis 7.0, which trimming needs too)."""
    if now_ms is None:
        reply = r.time()
        if isinstance(reply, dict):  # a cluster client asks one node and names it
            reply = next(iter(reply.values()))
        now_ms = int(reply[0]) * 1000 + int(reply[1]) // 1000
    parts = partitions(settings)
    pipe = r.pipeline(transaction=False)
    for part in parts:
        pipe.execute_command(*retention.plan_command(part, settings))
        pipe.execute_command("MEMORY", "USAGE", part.stream)
        pipe.execute_command("MEMORY", "USAGE", part.dead_stream)
    replies = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            return None
        if isinstance(reply, Exception):
            raise reply
    out = RetentionState(
        memory=read_memory(r),
        stream_retention=settings.stream_retention or "none",
        kept_by_retention=settings.stream_window.describe(),
        dead_letter_retention=settings.dead_letter_retention,
        dead_cap=0 if settings.dead_window.keep_all else settings.dead_window.count,
    )
    for i, part in enumerate(parts):
        plan = retention.parse_plan(part.stream, replies[3 * i])
        kept = KeptState(
            stream=part.stream,
            length=plan.length,
            memory_bytes=int(replies[3 * i + 1] or 0),
            oldest_id=plan.first_id,
            point=plan.point,
            why=plan.why if plan.length else "",
            holder=plan.holder,
            holder_pending=plan.holder_pending,
            holder_lag=plan.holder_lag,
            trimmable=plan.trimmable,
            dead_letters=plan.dead_letters,
            dead_memory_bytes=int(replies[3 * i + 2] or 0),
        )
        if plan.first_id:
            kept.oldest_age_s = max(0.0, (now_ms - _id_ms(plan.first_id)) / 1000)
        out.streams.append(kept)
    return out


def read_memory(r: Any) -> RedisMemory:
    """INFO memory: used against maxmemory; on a cluster, of the fullest master."""
    if stream.is_cluster(r):
        replies = r.info("memory", target_nodes=r.PRIMARIES)
        nodes = replies.items() if isinstance(replies, dict) and "used_memory" not in replies else []
    else:
        nodes = [("", r.info("memory"))]
    best: RedisMemory | None = None
    for name, info in nodes:
        m = RedisMemory(
            used_bytes=int(info.get("used_memory", 0)),
            max_bytes=int(info.get("maxmemory", 0)),
            policy=str(info.get("maxmemory_policy", "")),
            node=_text(name),
        )
        if best is None or (m.share or 0.0, m.used_bytes) > (best.share or 0.0, best.used_bytes):
            best = m
    return best or RedisMemory()


def retention_json(state: RetentionState) -> dict[str, Any]:
    """`state` as JSON, with its totals and the reason in words."""
    d = asdict(state)
    d.update(length=state.length, memory_bytes=state.memory_bytes, dead_memory_bytes=state.dead_memory_bytes,
             reason=state.reason())
    if state.memory is not None:
        d["memory"]["share"] = state.memory.share
    held = state.held
    d["held"] = None if held is None else {"stream": held.stream, "why": held.why, "group": held.holder}
    return d


def _count_range(r: Any, key: str, start: str, cap: int) -> tuple[int, bool]:
    """How many entries `key` holds from `start` on, counted up to `cap` and reading at
    most STATUS_SCAN_BYTES; and whether the count stopped short (a lower bound)."""
    n = nbytes = 0
    for page in stream.read_pages(r, key, start, "+", limit=cap, total_budget=STATUS_SCAN_BYTES):
        n += len(page)
        nbytes += stream.entries_bytes(page)
    return n, n >= cap or nbytes >= STATUS_SCAN_BYTES


def count_reasons(tally: DeadTally, page: list[Any]) -> None:
    for _entry_id, fields in page:
        tally.reasons[_text((fields or {}).get(b"reason", b"unknown"))] += 1
    tally.counted += len(page)


def sum_or_none(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v or 0 for v in values)


def _merge(parts: list[StreamState]) -> StreamState:
    """One view of a partitioned stream: sums, the oldest of the ages, each consumer once."""
    ages = [p.last_entry_age_s for p in parts if p.last_entry_age_s is not None]
    waiting = [p.waiting_age_s for p in parts if p.waiting_age_s is not None]
    pendings = [p.oldest_pending for p in parts if p.oldest_pending is not None]
    out = StreamState(
        stream="",
        exists=any(p.exists for p in parts),
        length=sum(p.length for p in parts),
        last_entry_age_s=min(ages) if ages else None,
        entries_added=sum_or_none([p.entries_added for p in parts if p.exists]),
        group_exists=any(p.group_exists for p in parts),
        lag=sum_or_none([p.lag for p in parts if p.group_exists])
        if any(p.group_exists for p in parts)
        else None,
        lag_capped=any(p.lag_capped for p in parts),
        entries_read=sum_or_none([p.entries_read for p in parts if p.group_exists]),
        waiting_age_s=max(waiting) if waiting else None,
        pending=sum(p.pending for p in parts),
        oldest_pending=max(pendings, key=lambda e: e.age_s) if pendings else None,
        arrivals_last_minute=sum(p.arrivals_last_minute for p in parts),
        arrivals_capped=any(p.arrivals_capped for p in parts),
        dead_total=sum(p.dead_total for p in parts),
        dead_counted=sum(p.dead_counted for p in parts),
        dead_last_minute=sum(p.dead_last_minute for p in parts),
        groups_missing=[name for p in parts for name in p.groups_missing],
    )
    with_entries = [p for p in parts if p.last_entry_age_s is not None]
    if with_entries:
        out.last_entry_id = min(with_entries, key=lambda p: p.last_entry_age_s or 0.0).last_entry_id
    reasons: Counter[str] = Counter()
    recent: Counter[str] = Counter()
    for p in parts:
        reasons.update(p.dead_by_reason)
        recent.update(p.dead_last_minute_by_reason)
    out.dead_by_reason = dict(reasons.most_common())
    out.dead_last_minute_by_reason = dict(recent.most_common())
    out.consumers = merge_consumers(p.consumers for p in parts)
    return out


def merge_consumers(per_stream: Iterable[Iterable[ConsumerState]]) -> list[ConsumerState]:
    """Each consumer once, by name, whatever the number of partitions it reads: its
    pending entries summed, its shortest idle time, and the stream it was first seen
    on (whose heartbeat key it writes, like every other stream it reads)."""
    consumers: dict[str, ConsumerState] = {}
    for states in per_stream:
        for cs in states:
            seen = consumers.get(cs.name)
            if seen is None:
                consumers[cs.name] = cs
            else:
                seen.pending += cs.pending
                seen.idle_s = min(seen.idle_s, cs.idle_s)
    return sorted(consumers.values(), key=lambda cs: cs.name)


def dead_stream_name(settings: Settings) -> str:
    """The dead-letter stream as shown: `<stream>:dead`, or `<stream>:{i}:dead` for the
    dead-letter streams of every partition."""
    if not settings.partitions:
        return settings.dead_stream
    return c.partition_dead_stream(settings.stream, 0).replace("{0}", "{i}")


def _apply_heartbeat(state: ConsumerState, raw: Any, pttl: Any) -> None:
    beat = Heartbeat.from_json(raw)
    if beat is None:
        return
    state.host = beat.host or None
    state.pid = beat.pid
    state.rate = beat.rate
    state.inserted = beat.inserted
    state.last_error = beat.last_error
    if isinstance(pttl, int) and pttl >= 0:
        # Written with a TTL of HEARTBEAT_TTL_S: what is left of it says how old it is,
        # by the Redis clock alone.
        state.heartbeat_age_s = max(0.0, HEARTBEAT_TTL_S - pttl / 1000)


# -- health -----------------------------------------------------------------------------------


def assess(st: Status, settings: Settings) -> None:
    """Sets `st.health` and `st.problems`: degraded when the backlog grows, a consumer
    holding entries has gone silent, nobody reads a waiting backlog, dead letters are
    being written, or the table is missing; unreachable when a service does not answer."""
    problems: list[str] = []
    if st.redis_error:
        problems.append(st.redis_error)
    if st.pg_error:
        problems.append(st.pg_error)
    silent_after = settings.claim_idle_ms / 1000
    t, e = st.redis, st.events
    if e is not None and not e.exists:
        problems.append(f"table {st.table} does not exist (run `filepipe init-db`)")
    if t is not None:
        if t.writes_refused:
            problems.append(t.writes_refused)
        reported: dict[str, list[str]] = {}
        for c in t.consumers:
            if c.last_error and c.heartbeat_age_s is not None:
                reported.setdefault(c.last_error, []).append(c.name)
        for error, names in reported.items():
            who = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"consumer{'s' if len(names) > 1 else ''} {who} waiting: {error}")
        for c in t.consumers:
            c.silent = (
                c.pending > 0
                and c.idle_s >= silent_after
                and (c.heartbeat_age_s is None or c.heartbeat_age_s >= silent_after)
            )
            if c.silent:
                problems.append(
                    f"consumer {c.name} silent for {_duration(c.idle_s)} with {c.pending} pending "
                    f"entr{'y' if c.pending == 1 else 'ies'}"
                )
        if t.groups_missing:
            where = ", ".join(t.groups_missing[:3]) + (" …" if len(t.groups_missing) > 3 else "")
            problems.append(
                f"consumer group {st.group} does not exist on {where}: no consumer has read it "
                f"({t.length:,} entries)"
            )
        lag = t.lag or 0
        if lag > 0:
            live = [c for c in t.consumers if c.idle_s < silent_after or c.heartbeat_age_s is not None]
            processed = None if e is None or not e.exists else e.rows_last_minute + t.dead_last_minute
            growth = None if processed is None else t.arrivals_last_minute - processed
            if (
                growth is not None
                and growth > max(10, 0.1 * t.arrivals_last_minute)
                and not t.arrivals_capped
            ):
                problems.append(
                    f"lag growing: {lag:,} entries not yet delivered; {t.arrivals_last_minute:,} arrived and "
                    f"{processed:,} were processed in the last minute"
                )
            elif not live and (t.waiting_age_s or 0) >= silent_after:
                problems.append(
                    f"no live consumer: {lag:,} entries waiting for {_duration(t.waiting_age_s or 0)}"
                )
        if t.dead_last_minute:
            detail = ", ".join(f"{r}: {n}" for r, n in t.dead_last_minute_by_reason.items())
            problems.append(f"dead letters rising: {t.dead_last_minute} in the last minute ({detail})")
    problems += retention_problems(st.retention)
    st.problems = problems
    if st.unreachable:
        st.health = "unreachable"
    else:
        st.health = "degraded" if problems else "healthy"


def retention_problems(kept: RetentionState | None) -> list[str]:
    """Redis memory above MEMORY_WARN_SHARE of maxmemory (naming what holds the entries),
    and dead-letter streams above DEAD_LETTER_WARN_SHARE of their cap."""
    if kept is None:
        return []
    problems = []
    m = kept.memory
    if m is not None and m.share is not None and m.share >= c.MEMORY_WARN_SHARE:
        node = f" on {m.node}" if m.node else ""
        if kept.held is not None:
            why = f"the stream keeps {_entries(kept.length)} ({_bytes(kept.memory_bytes)}): {kept.reason()}"
        else:
            why = "the stream keeps nothing: other keys use the memory"
        problems.append(
            f"Redis memory at {m.share:.0%} of maxmemory ({_bytes(m.used_bytes)} of {_bytes(m.max_bytes)}"
            f"{node}): {why}"
        )
    if kept.dead_cap:
        for k in kept.streams:
            if k.dead_letters >= c.DEAD_LETTER_WARN_SHARE * kept.dead_cap:
                problems.append(
                    f"dead letters near their cap: {k.dead_letters:,} of {kept.dead_cap:,} in {k.stream}"
                    f"{c.DEAD_LETTER_SUFFIX} (DEAD_LETTER_RETENTION={kept.dead_letter_retention}: the oldest "
                    "are dropped beyond it; replay or purge them with `filepipe dlq`)"
                )
    return problems


# -- output -----------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} GiB"


def _duration(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d {int(s % 86400 // 3600)}h"


def _line(label: str, value: str, detail: str = "") -> str:
    text = f"  {label + ':':<24}{value:<18}"
    return (text + "  " + detail).rstrip() if detail else text.rstrip()


def _entries(n: int) -> str:
    return f"{n:,} entr{'y' if n == 1 else 'ies'}"


def render(st: Status, previous: Status | None = None, elapsed: float | None = None) -> str:
    """The human report; with `previous` (`--watch`), what changed since then."""
    out = [
        f"filepipe status · Redis {st.redis_url} · PostgreSQL {st.pg_uri} · {st.taken_at}",
        "",
    ]
    t = st.redis
    parts = f", {st.partitions} partitions" if st.partitions else ""
    out.append(f"STREAM {st.stream_name} (group {st.group}{parts})")
    if t is None:
        out.append(f"  ✗ {st.redis_error}")
    elif not t.exists:
        out.append("  (no stream yet: nothing has been produced)")
    else:
        age = f"last entry {_duration(t.last_entry_age_s)} ago" if t.last_entry_age_s is not None else ""
        out.append(_line("Stream length", _entries(t.length), age))
        if t.partitions:
            lengths = [p.length for p in t.partitions]
            worst = max(t.partitions, key=lambda p: p.lag or 0)
            spread = f"lengths {min(lengths):,}–{max(lengths):,}"
            if worst.lag:
                spread += f", most lag {worst.lag:,} on {worst.stream}"
            out.append(_line("Partitions", str(len(t.partitions)), spread))
        if not t.group_exists:
            out.append(_line("Group lag", "no consumer group yet"))
        else:
            lag = f"{'≥' if t.lag_capped else ''}{t.lag or 0:,} not yet delivered"
            waiting = f"oldest waiting {_duration(t.waiting_age_s)}" if t.waiting_age_s is not None else ""
            out.append(_line("Group lag", lag, waiting))
            op = t.oldest_pending
            detail = ""
            if op is not None:
                detail = (
                    f"oldest from {_duration(op.age_s)} ago, idle {_duration(op.idle_s)}, "
                    f"delivered {op.deliveries}x, consumer {op.consumer}"
                )
            out.append(_line("Pending", f"{t.pending:,} unacknowledged", detail))
        cap = "≥" if t.arrivals_capped else ""
        out.append(_line("Arrived (last minute)", f"{cap}{t.arrivals_last_minute:,}"))
        if previous is not None and previous.redis is not None and elapsed:
            out.append(_trend(t, previous.redis, elapsed))
    if t is not None and st.retention is not None:
        out += render_retention(st.retention, stream_exists=t.exists)
    out.append("")

    if t is not None and t.group_exists:
        out.append(f"CONSUMERS ({len(t.consumers)})")
        if not t.consumers:
            out.append("  (none has read yet)")
        else:
            name_w = max(8, *(len(c.name) for c in t.consumers))
            host_w = max(4, *(len(c.host or "-") for c in t.consumers))
            head = f"  {'NAME':<{name_w}}  {'HOST':<{host_w}}  {'PENDING':>7}  {'IDLE':>8}  {'RATE':>17}"
            out.append(head + "  LAST ERROR")
            for c in t.consumers:
                rate = f"{c.rate:,.2f} files/sec" if c.rate is not None else "-"
                note = "(no heartbeat)" if c.heartbeat_age_s is None else c.last_error or "-"
                flag = "  ⚠ silent" if c.silent else ""
                out.append(
                    f"  {c.name:<{name_w}}  {c.host or '-':<{host_w}}  {c.pending:>7,}  "
                    f"{_duration(c.idle_s):>8}  {rate:>17}  {note}{flag}"
                )
        out.append("")

    if t is not None:
        out.append(f"DEAD LETTERS {st.dead_stream}")
        reasons = ", ".join(f"{r}: {n:,}" for r, n in t.dead_by_reason.items())
        if t.dead_counted < t.dead_total:
            reasons += f" (reasons of the newest {t.dead_counted:,})"
        out.append(_line("Total", f"{t.dead_total:,}", reasons))
        out.append(_line("Last minute", f"{t.dead_last_minute:,}"))
        if st.retention is not None:
            kept = st.retention
            each = " each" if len(kept.streams) > 1 else ""
            cap = f"at most {kept.dead_cap:,}{each}" if kept.dead_cap else "no count limit"
            out.append(_line("Kept", cap,
                             f"DEAD_LETTER_RETENTION={kept.dead_letter_retention}, "
                             f"{_bytes(kept.dead_memory_bytes)} in Redis"))
        out.append("")

    e = st.events
    out.append(f"EVENTS TABLE {st.table}")
    if e is None:
        out.append(f"  ✗ {st.pg_error}")
    elif not e.exists:
        out.append("  ✗ does not exist (run `filepipe init-db`)")
    else:
        out.append(
            _line(
                "Rows",
                f"{'~' if e.rows_estimated else ''}{e.rows_total:,}",
                "(estimate)" if e.rows_estimated else "",
            )
        )
        out.append(
            _line("Last minute", f"{e.rows_last_minute:,}", f"Throughput: {e.throughput:,.2f} files/sec")
        )
        out.append(
            _line(
                "Last hour",
                f"{e.rows_last_hour:,}",
                "(of the last day's events)" if e.recent_limited_to_day else "",
            )
        )
        if e.table:
            out.append(_line("History", e.table["history"]["summary"]))
            out += [_line(label, value, detail) for label, value, detail in e.table["lines"]]
    out.append("")

    if st.health == "healthy":
        out.append("✓ HEALTHY")
    else:
        out.append(f"{'✗ UNREACHABLE' if st.health == 'unreachable' else '⚠ DEGRADED'}")
        for p in st.problems:
            out.append(f"  - {p}")
    # Names, hosts and errors come from Redis, written by anyone: each line escaped.
    return "\n".join(printable(line) for line in out)


def render_retention(kept: RetentionState, *, stream_exists: bool = True) -> list[str]:
    """The stream's memory, what is kept and why, and Redis's memory."""
    oldest = [k.oldest_age_s for k in kept.streams if k.oldest_age_s is not None]
    age = f"oldest entry from {_duration(max(oldest))} ago" if oldest else ""
    out = []
    if stream_exists:
        out = [_line("Memory", _bytes(kept.memory_bytes), age), _line("Kept", kept.reason())]
    m = kept.memory
    if m is not None:
        node = f" on {m.node}" if m.node else ""
        if m.max_bytes:
            limit = f"of {_bytes(m.max_bytes)} maxmemory ({m.share or 0:.0%}, {m.policy}){node}"
        else:
            limit = f"(no maxmemory){node}"
        out.append(_line("Redis memory", _bytes(m.used_bytes), limit))
    return out


def _trend(now: StreamState, before: StreamState, elapsed: float) -> str:
    parts = []
    if now.entries_added is not None and before.entries_added is not None:
        parts.append(f"+{now.entries_added - before.entries_added:,} arrived")
    if now.entries_read is not None and before.entries_read is not None:
        parts.append(f"+{now.entries_read - before.entries_read:,} delivered")
    if now.lag is not None and before.lag is not None:
        parts.append(f"lag {now.lag - before.lag:+,}")
    return _line(f"Last {elapsed:.0f} s", ", ".join(parts) or "-")


def collect_status(settings: Settings) -> Status:
    """One snapshot of the pipeline."""
    collector = Collector(settings)
    try:
        return collector.collect()
    finally:
        collector.close()


def watch(
    settings: Settings,
    interval: float,
    count: int | None = None,
    *,
    as_json: bool = False,
    write: Callable[[str], None] = print,
) -> Status:
    """Refreshes every `interval` seconds until Ctrl+C (or `count` refreshes) and returns
    the last snapshot: in place in a terminal (rich), or one JSON document per line."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    collector = Collector(settings)
    try:
        st = collector.collect()
        if as_json:
            write(json.dumps(st.to_json()))
        done, last_at = 1, time.monotonic()
        with contextlib.ExitStack() as stack:
            live = None
            if not as_json:
                live = stack.enter_context(
                    Live(Text(render(st)), console=Console(), auto_refresh=False, transient=False)
                )
            try:
                while count is None or done < count:
                    time.sleep(interval)
                    previous, st = st, collector.collect()
                    now = time.monotonic()
                    if live is not None:
                        live.update(Text(render(st, previous, now - last_at)), refresh=True)
                    else:
                        write(json.dumps(st.to_json()))
                    done, last_at = done + 1, now
            except KeyboardInterrupt:
                pass
        return st
    finally:
        collector.close()
