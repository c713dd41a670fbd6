"""TimescaleDB as this server has it: detected from the catalog, never assumed.

A server can offer the extension (its files are installed) without being able to use it:
TimescaleDB's loader must be in `shared_preload_libraries`, which takes a restart, and
until then `CREATE EXTENSION timescaledb` ends the session with `extension "timescaledb"
must be preloaded`. That is the state after a plain package install. `read_extension`
gathers the facts in one round trip; `table_kind` decides from them what `init-db` makes.

Two editions exist: the Apache-2 one (hypertables, chunks, `drop_chunks`, `time_bucket`)
and the Timescale-License one, which adds compression, continuous aggregates and
policies (jobs). `current_setting('timescaledb.license')` says which one a database
runs (`apache` or `timescale`); everything here that needs the second asks first.

The observers (status, the dashboard, the benchmark) call `read_table` once for the
table's figures and `estimated_rows` / `rate_history` for the cheap counts (`table_figures`
gathers them all); where the continuous aggregate exists, `rate_history_hours` adds the last
day hour by hour.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg import sql

from .errors import ConfigError, NotPreloadedError

EXTENSION = "timescaledb"
FULL_LICENSE = "timescale"  # the edition with compression, continuous aggregates and policies

# One chunk per day. TimescaleDB's advice is that the chunks being written (with their
# indexes) fit in about a quarter of the server's memory; a file event row takes about
# 430 bytes with its indexes, so a day at 100 files/s (8.6 M rows) is about 3.7 GB, right
# for a server with 16 GB. Queries of the last minutes and hours (status, the dashboard)
# touch one or two chunks; retention drops whole days. Much busier tables want hours
# (`--chunk-interval 6h`), much quieter ones a week.
DEFAULT_CHUNK_INTERVAL = timedelta(days=1)
# Compressed chunks keep each stream's rows together, in time order: a redelivered or
# backfilled row then decompresses only the batches whose time range holds it.
COMPRESS_SEGMENT_BY = "stream"
COMPRESS_ORDER_BY = "event_time DESC, stream_id"
# INSERT … ON CONFLICT DO NOTHING into compressed chunks (redeliveries, backfills).
MIN_COMPRESSED_LOAD_VERSION = (2, 11)
# Beyond the last minutes, the history the aggregate gives: the last day, hour by hour (a day
# of the table's own rows would cost what the aggregate saves, so without one there is none).
DAY_HISTORY_HOURS = 24
# The rate history's continuous aggregate (`<table>_per_minute`), refreshed every minute over
# the whole day it shows and an hour more: a late event (a redelivery, a backfill) within it is
# counted at the next refresh. After the first, a refresh recomputes only the buckets that
# changed, so the wide window costs little.
RATE_VIEW_SUFFIX = "_per_minute"
RATE_REFRESH_START = timedelta(hours=DAY_HISTORY_HOURS + 1)
RATE_REFRESH_END = timedelta(minutes=1)
RATE_REFRESH_EVERY = timedelta(minutes=1)
# Above this many chunks, observers estimate the rows rather than count them.
MAX_COUNTED_CHUNKS = 100
# The heap bytes of a row, for estimating chunks PostgreSQL has not analyzed yet when no
# analyzed chunk tells (273 measured for the benchmark's synthetic events; 373 with indexes).
ROW_HEAP_BYTES = 280

# The loader defines `timescaledb.disable_load` in every backend when it is preloaded:
# readable by any role, unlike shared_preload_libraries (superuser-only on most servers).
_EXTENSION_SQL = """
SELECT
  (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'),
  (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'),
  current_setting('timescaledb.disable_load', true) IS NOT NULL,
  (SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries')
"""


@dataclass(frozen=True)
class Extension:
    """What the server and the current database say about TimescaleDB."""

    available: str = ""  # the version the server can install ("" when it has no such extension)
    installed: str = ""  # the version created in this database ("" when not created)
    preloaded: bool = False  # its loader is in shared_preload_libraries (loaded at server start)
    preload_libraries: str | None = None  # shared_preload_libraries; None when this role may not read it

    @property
    def usable(self) -> bool:
        """Whether this database can have (or has) hypertables."""
        return bool(self.available or self.installed) and self.preloaded

    @property
    def state(self) -> str:
        """`absent`, `not preloaded`, `available` (can be created) or `installed`."""
        if not (self.available or self.installed):
            return "absent"
        if not self.preloaded:
            return "not preloaded"
        return "installed" if self.installed else "available"

    def preload_advice(self) -> str:
        """What to change on the server, in words (one clause)."""
        current = self.preload_libraries
        if current is None:
            now = ""
        elif current.strip():
            now = f" (it is now '{current}': keep those libraries and add timescaledb)"
        else:
            now = " (it is empty now)"
        return (
            f"set shared_preload_libraries = '{EXTENSION}' in postgresql.conf{now} "
            "and restart PostgreSQL (a reload is not enough)"
        )

    def describe(self) -> str:
        """The extension's state in words, for status and the benchmark."""
        if self.state == "absent":
            return "not installed on this server"
        if self.state == "not preloaded":
            return f"{self.available or self.installed} installed but not preloaded: {self.preload_advice()}"
        if self.state == "available":
            return f"{self.available} available (not created in this database)"
        return self.installed


def read_extension(conn: psycopg.Connection[Any]) -> Extension:
    """The extension's facts for the database `conn` is connected to (one query)."""
    row = conn.execute(_EXTENSION_SQL).fetchone()
    if row is None:
        return Extension()
    return Extension(
        available=str(row[0] or ""),
        installed=str(row[1] or ""),
        preloaded=bool(row[2]),
        preload_libraries=None if row[3] is None else str(row[3]),
    )


PLAIN = "plain"
HYPERTABLE = "hypertable"


def table_kind(ext: Extension, *, plain: bool) -> str:
    """What `init-db` creates: `hypertable` where TimescaleDB can be used, `plain` where the
    server has no TimescaleDB or `plain` is asked for. Raises NotPreloadedError when the
    extension is installed but not preloaded and no plain table was asked for (a plain table
    made there by default would have to be migrated once the server is fixed), and always
    when the database already has the extension but the server does not load it (nothing
    touching TimescaleDB's objects can run there)."""
    if ext.installed and not ext.preloaded:
        raise NotPreloadedError(
            f"TimescaleDB {ext.installed} is created in this database but the server does not preload "
            f"it, so its tables cannot be used: {ext.preload_advice()}"
        )
    if plain or ext.state == "absent":
        return PLAIN
    if not ext.preloaded:
        raise NotPreloadedError(
            f"TimescaleDB {ext.available} is installed on this server but not preloaded: "
            f"{ext.preload_advice()}; or run `filepipe init-db --plain` to create a plain table instead"
        )
    return HYPERTABLE


# -- intervals --------------------------------------------------------------------------------

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_INTERVAL = re.compile(r"^(\d+)\s*([mhdw])$")


def parse_interval(option: str, text: str) -> timedelta:
    """`30m`, `6h`, `90d`, `2w` as a timedelta; raises ConfigError naming `option`."""
    m = _INTERVAL.match(text.strip().lower())
    if m is None or int(m.group(1)) == 0:
        raise ConfigError(f"{option} must be a duration such as 6h, 1d, 90d or 2w (m, h, d, w), not {text!r}")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def interval_text(value: timedelta) -> str:
    """A duration as `--chunk-interval` takes it: `1d`, `6h`, `90d`, `30m`."""
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def interval_words(value: timedelta) -> str:
    """`1 day`, `6 hours`, `90 days`."""
    text = interval_text(value)
    number, unit = int(text[:-1]), {"m": "minute", "h": "hour", "d": "day", "s": "second"}[text[-1]]
    return f"{number} {unit}{'' if number == 1 else 's'}"


def version_tuple(version: str) -> tuple[int, ...]:
    """`2.28.3` → (2, 28, 3); what does not parse counts 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.\-]", version)[:3])


# -- the table as TimescaleDB describes it ----------------------------------------------------

_HYPERTABLE_SQL = """
SELECT d.time_interval, h.num_chunks, h.compression_enabled
FROM timescaledb_information.hypertables h
JOIN timescaledb_information.dimensions d
  ON d.hypertable_schema = h.hypertable_schema AND d.hypertable_name = h.hypertable_name
 AND d.dimension_number = 1
WHERE format('%%I.%%I', h.hypertable_schema, h.hypertable_name)::regclass = %(t)s::regclass
"""
_CHUNKS_SQL = """
SELECT count(*), count(*) FILTER (WHERE is_compressed), min(range_start), max(range_end)
FROM timescaledb_information.chunks
WHERE format('%%I.%%I', hypertable_schema, hypertable_name)::regclass = %(t)s::regclass
"""
_JOBS_SQL = """
SELECT job_id, proc_name, config
FROM timescaledb_information.jobs
WHERE proc_name IN ('policy_retention', 'policy_compression', 'policy_refresh_continuous_aggregate')
  AND format('%%I.%%I', hypertable_schema, hypertable_name)::regclass IN (%(t)s::regclass, %(v)s::regclass)
"""
_RATE_VIEW_SQL = """
SELECT 1 FROM timescaledb_information.continuous_aggregates
WHERE format('%%I.%%I', view_schema, view_name)::regclass = %(v)s::regclass
"""


@dataclass
class TableFacts:
    """The events table's TimescaleDB figures, for status, the dashboard and the benchmark."""

    extension: Extension
    license: str = ""  # apache | timescale; "" where the extension is not in this database
    hypertable: bool = False
    chunk_interval_s: float | None = None
    chunks: int = 0
    compressed_chunks: int = 0
    oldest_chunk: datetime | None = None  # where the oldest chunk's range starts
    newest_chunk: datetime | None = None  # where the newest chunk's range ends
    compression: bool = False  # compression enabled on the hypertable
    retention: str = ""  # TimescaleDB's retention policy: drop_after ("90 days"), "" when none
    compress_after: str = ""  # TimescaleDB's compression policy: compress_after, "" when none
    rate_view: str = ""  # the continuous aggregate of the rate history, "" when none

    @property
    def full_edition(self) -> bool:
        return self.license == FULL_LICENSE

    @property
    def chunk_interval(self) -> timedelta | None:
        return None if self.chunk_interval_s is None else timedelta(seconds=self.chunk_interval_s)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["extension"]["state"] = self.extension.state
        for name in ("oldest_chunk", "newest_chunk"):
            value = getattr(self, name)
            d[name] = value.isoformat() if value is not None else None
        return d

    def lines(self) -> list[tuple[str, str, str]]:
        """(label, value, detail) for people: the kind of table, its chunks, its policies."""
        ext = self.extension
        if ext.state == "not preloaded":
            return [("Kind", "plain table", ""), ("TimescaleDB", ext.describe(), "")]
        if not self.license:
            what = "not installed" if ext.state == "absent" else f"{ext.available} available, not in use"
            return [("Kind", f"plain table (TimescaleDB {what})", "")]
        edition = f"TimescaleDB {ext.installed}, {self.license} edition"
        if not self.hypertable:
            return [("Kind", f"plain table ⚠ not a hypertable ({edition})", "")]
        interval = interval_words(self.chunk_interval) if self.chunk_interval else "unknown interval"
        chunks = f"{self.chunks:,}" + (
            f" ({self.compressed_chunks:,} compressed)" if self.compressed_chunks else ""
        )
        span = ""
        if self.oldest_chunk is not None and self.newest_chunk is not None:
            oldest, newest = (t.astimezone(timezone.utc) for t in (self.oldest_chunk, self.newest_chunk))
            span = f"from {oldest:%Y-%m-%d %H:%M} to {newest:%Y-%m-%d %H:%M} UTC"
        if self.full_edition:
            policies = [f"retention {self.retention}"] if self.retention else []
            if self.compress_after:
                policies.append(f"compression after {self.compress_after}")
            policy_text = ", ".join(policies) or "none"
        else:
            policy_text = "none in this edition (old chunks: `filepipe drop-chunks` from cron)"
        return [
            ("Kind", f"hypertable ({edition})", ""),
            ("Chunks", f"{chunks} of {interval}", span),
            ("Policies", policy_text, ""),
        ]


def rate_view_name(table: str) -> str:
    """The rate history's continuous aggregate beside `table` (same schema)."""
    return table + RATE_VIEW_SUFFIX


def license_of(conn: psycopg.Connection[Any]) -> str:
    """`apache` or `timescale` (the edition in use in this database), "" without the extension."""
    row = conn.execute("SELECT current_setting('timescaledb.license', true)").fetchone()
    return str(row[0]) if row and row[0] else ""


def is_hypertable(conn: psycopg.Connection[Any], table: str) -> bool:
    """Whether `table` is a hypertable (the extension must be in this database)."""
    return conn.execute(_HYPERTABLE_SQL, {"t": table}).fetchone() is not None


def read_table(conn: psycopg.Connection[Any], table: str, ext: Extension | None = None) -> TableFacts:
    """The table's TimescaleDB figures in a few catalog queries (no table scan). The table
    must exist."""
    ext = ext or read_extension(conn)
    facts = TableFacts(extension=ext)
    if not (ext.installed and ext.preloaded):
        return facts
    facts.license = license_of(conn)
    row = conn.execute(_HYPERTABLE_SQL, {"t": table}).fetchone()
    if row is None:
        return facts
    interval, _, compression = row
    facts.hypertable = True
    facts.chunk_interval_s = interval.total_seconds() if isinstance(interval, timedelta) else None
    facts.compression = bool(compression)
    count, compressed, oldest, newest = conn.execute(_CHUNKS_SQL, {"t": table}).fetchone() or (
        0,
        0,
        None,
        None,
    )
    facts.chunks, facts.compressed_chunks = int(count), int(compressed)
    facts.oldest_chunk, facts.newest_chunk = oldest, newest
    if facts.full_edition:
        view = rate_view_name(table)
        has_view = conn.execute("SELECT to_regclass(%s)", (view,)).fetchone()
        if has_view and has_view[0] is not None and conn.execute(_RATE_VIEW_SQL, {"v": view}).fetchone():
            facts.rate_view = view
        for _, proc, config in conn.execute(_JOBS_SQL, {"t": table, "v": facts.rate_view or table}):
            config = config or {}
            if proc == "policy_retention":
                facts.retention = str(config.get("drop_after", ""))
            elif proc == "policy_compression":
                facts.compress_after = str(config.get("compress_after", ""))
    return facts


# -- cheap counts -----------------------------------------------------------------------------

# The table and its chunks (inheritance children): the rows PostgreSQL counted at the last
# ANALYZE, and the size of those never analyzed (a new chunk, a fresh table).
_SIZES_SQL = """
SELECT coalesce(sum(c.reltuples) FILTER (WHERE c.reltuples >= 0), 0)::float8,
       coalesce(sum(c.relpages::float8) FILTER (WHERE c.reltuples > 0), 0)
         * current_setting('block_size')::float8,
       coalesce(sum(pg_relation_size(c.oid)) FILTER (WHERE c.reltuples < 0), 0)::float8
FROM pg_class c
WHERE c.oid = %(t)s::regclass
   OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = %(t)s::regclass)
"""


def estimated_rows(conn: psycopg.Connection[Any], table: str, *, hypertable: bool) -> int:
    """The table's rows as the catalog knows them, chunk by chunk: each analyzed chunk's
    count, and for a chunk never analyzed (the one being written, on a busy day) its size
    over the bytes per row of the others. A hypertable's analyzed part is TimescaleDB's own
    `approximate_row_count` (compressed chunks counted too). No table is scanned."""
    row = conn.execute(_SIZES_SQL, {"t": table}).fetchone()
    analyzed_rows, analyzed_bytes, unanalyzed_bytes = row if row else (0.0, 0.0, 0.0)
    per_row = analyzed_bytes / analyzed_rows if analyzed_rows >= 1000 else ROW_HEAP_BYTES
    guess = unanalyzed_bytes / max(per_row, 1.0)
    if hypertable:
        found = conn.execute("SELECT approximate_row_count(%s::regclass)", (table,)).fetchone()
        analyzed_rows = float(found[0]) if found and found[0] is not None else analyzed_rows
    return int(analyzed_rows + guess)


@dataclass(frozen=True)
class RateMinute:
    """Files and bytes loaded per minute (of the events' time) by one consumer (per hour in
    `TableFigures.day_history`: `minute` is then the hour's start)."""

    minute: datetime
    consumer: str
    files: int
    bytes: int


# `time >= now() - <interval literal>`: TimescaleDB leaves out the older chunks when it plans
# the query (it neither opens nor locks them); a bound parameter would not be constant then.
_RATE_SQL = """
SELECT date_trunc('minute', event_time) AS minute, consumer, count(*), coalesce(sum(size_bytes), 0)
FROM {table}
WHERE event_time >= now() - {window}
GROUP BY 1, 2 ORDER BY 1, 2
"""
_RATE_VIEW_QUERY = """
SELECT minute, consumer, files, bytes FROM {view}
WHERE minute >= now() - {window}
ORDER BY 1, 2
"""


_RATE_HOURS_QUERY = """
SELECT time_bucket(INTERVAL '1 hour', minute) AS hour, consumer, sum(files)::bigint, sum(bytes)::bigint
FROM {view}
WHERE minute >= time_bucket(INTERVAL '1 hour', now() - {window})
GROUP BY 1, 2 ORDER BY 1, 2
"""


def rate_history_hours(conn: psycopg.Connection[Any], facts: TableFacts) -> list[RateMinute]:
    """Files and bytes per hour and consumer over the last `DAY_HISTORY_HOURS` hours (the
    current hour included), from the continuous aggregate; [] where there is none."""
    if not facts.rate_view:
        return []
    window = sql.Literal(timedelta(hours=DAY_HISTORY_HOURS - 1))
    query = sql.SQL(_RATE_HOURS_QUERY).format(view=_ident(facts.rate_view), window=window)
    return [RateMinute(r[0], str(r[1]), int(r[2] or 0), int(r[3] or 0)) for r in conn.execute(query)]


def rate_history(
    conn: psycopg.Connection[Any], table: str, facts: TableFacts, minutes: int
) -> tuple[str, list[RateMinute]]:
    """Files and bytes per minute and consumer over the last `minutes` minutes, by the
    events' time, and where they came from: the continuous aggregate where there is one
    (`continuous aggregate`), else the table itself (`table`; it reads those minutes' rows,
    by the time index and, on a hypertable, only the chunks that hold them)."""
    window = sql.Literal(timedelta(minutes=minutes))
    if facts.rate_view:
        query = sql.SQL(_RATE_VIEW_QUERY).format(view=_ident(facts.rate_view), window=window)
        source = "continuous aggregate"
    else:
        query = sql.SQL(_RATE_SQL).format(table=_ident(table), window=window)
        source = "table"
    rows = conn.execute(query).fetchall()
    return source, [RateMinute(r[0], str(r[1]), int(r[2]), int(r[3])) for r in rows]


# -- what init-db sets up on a hypertable -----------------------------------------------------


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split("."))


def create_hypertable_sql(*, migrate: bool) -> sql.SQL:
    """The call that turns the events table into a hypertable (the long form, known to
    every TimescaleDB 2.x)."""
    return sql.SQL(
        "SELECT create_hypertable(%(t)s::regclass, 'event_time', chunk_time_interval => %(i)s::interval, "
        "if_not_exists => TRUE, migrate_data => " + ("TRUE" if migrate else "FALSE") + ")"
    )


def retention_sql() -> list[sql.SQL]:
    """TimescaleDB's retention policy, replacing one already there (Timescale License)."""
    return [
        sql.SQL("SELECT remove_retention_policy(%(t)s::regclass, if_exists => TRUE)"),
        sql.SQL("SELECT add_retention_policy(%(t)s::regclass, drop_after => %(after)s::interval)"),
    ]


def compression_sql(table: str, *, enabled: bool) -> list[sql.SQL | sql.Composed]:
    """Compression (segmented by stream, ordered by time) and its policy, replacing a policy
    already there; the settings of a hypertable that compresses already are left as they
    are (TimescaleDB refuses to change them while chunks are compressed). Timescale License."""
    out: list[sql.SQL | sql.Composed] = []
    if not enabled:
        out.append(
            sql.SQL(
                "ALTER TABLE {t} SET (timescaledb.compress, timescaledb.compress_segmentby = {seg}, "
                "timescaledb.compress_orderby = {order})"
            ).format(
                t=_ident(table), seg=sql.Literal(COMPRESS_SEGMENT_BY), order=sql.Literal(COMPRESS_ORDER_BY)
            )
        )
    out += [
        sql.SQL("SELECT remove_compression_policy(%(t)s::regclass, if_exists => TRUE)"),
        sql.SQL("SELECT add_compression_policy(%(t)s::regclass, compress_after => %(after)s::interval)"),
    ]
    return out


def rate_view_sql(table: str) -> list[sql.Composed]:
    """The continuous aggregate of files and bytes per minute and consumer (by event time: a
    continuous aggregate buckets on the hypertable's time column), answering with the rows
    not yet materialized too, and its refresh policy. Timescale License."""
    view = _ident(rate_view_name(table))
    return [
        sql.SQL(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {view} "
            "WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS "
            "SELECT time_bucket(INTERVAL '1 minute', event_time) AS minute, consumer, "
            "count(*) AS files, sum(size_bytes) AS bytes FROM {table} GROUP BY 1, 2 WITH NO DATA"
        ).format(view=view, table=_ident(table)),
        sql.SQL(
            "SELECT add_continuous_aggregate_policy({view_name}::regclass, "
            "start_offset => {start}::interval, end_offset => {end}::interval, "
            "schedule_interval => {every}::interval, if_not_exists => TRUE)"
        ).format(
            view_name=sql.Literal(rate_view_name(table)),
            start=sql.Literal(RATE_REFRESH_START),
            end=sql.Literal(RATE_REFRESH_END),
            every=sql.Literal(RATE_REFRESH_EVERY),
        ),
    ]


def drop_chunks(conn: psycopg.Connection[Any], table: str, older_than: timedelta) -> list[str]:
    """Drops the chunks whose whole range is older than `older_than` (TimescaleDB's
    `drop_chunks`, in every edition); returns the chunks dropped."""
    rows = conn.execute(
        "SELECT drop_chunks(%s::regclass, older_than => %s::interval)", (table, older_than)
    ).fetchall()
    return [str(r[0]) for r in rows]


@dataclass
class TableFigures:
    """What status and the dashboard show of the events table beyond its rows: its kind and
    TimescaleDB figures, its size as the catalog knows it, and the rate history."""

    facts: TableFacts
    estimated_rows: int
    history_source: str  # continuous aggregate | table
    history: list[RateMinute]
    history_minutes: int
    # The last day by the hour (each RateMinute's `minute` the hour's start), from the
    # continuous aggregate only: [] elsewhere.
    day_history: list[RateMinute] = field(default_factory=list)

    def worth_counting(self, large_rows: int) -> bool:
        """Whether `count(*)` is cheap enough: few rows, in few chunks (a count opens and locks
        every chunk and its indexes; thousands of them exhaust max_locks_per_transaction)."""
        return self.estimated_rows < large_rows and self.facts.chunks <= MAX_COUNTED_CHUNKS

    def summary(self) -> str:
        """The rate history in words: totals, the busiest minute, where it was read."""
        files, size, peak = _totals(self.history)
        source = f"from the {self.history_source}"
        if peak is None:
            return f"no files in the last {self.history_minutes} minutes ({source})"
        return (
            f"{files:,} files, {size / 1e6:,.1f} MB in the last {self.history_minutes} minutes; busiest "
            f"minute {peak[0].astimezone(timezone.utc):%H:%M} UTC with {peak[1]:,} ({source})"
        )

    def day_summary(self) -> str | None:
        """The last day in words (totals, the busiest hour); None without the aggregate."""
        if self.history_source != "continuous aggregate":
            return None
        files, size, peak = _totals(self.day_history)
        if peak is None:
            return "no files (from the continuous aggregate)"
        return (
            f"{files:,} files, {size / 1e6:,.1f} MB; busiest hour {peak[0].astimezone(timezone.utc):%H}:00 "
            f"UTC with {peak[1]:,} (from the continuous aggregate)"
        )

    def lines(self) -> list[tuple[str, str, str]]:
        """The table's figures for people (`TableFacts.lines`), and the last day where the
        aggregate gives it."""
        day = self.day_summary()
        return self.facts.lines() + ([(f"Last {DAY_HISTORY_HOURS} hours", day, "")] if day else [])

    def to_json(self) -> dict[str, Any]:
        return {
            **self.facts.to_json(),
            "lines": [list(line) for line in self.lines()],
            "estimated_rows": self.estimated_rows,
            "history": {
                "source": self.history_source,
                "summary": self.summary(),
                "minutes": [_rate_json(m, "minute") for m in self.history],
                # the last day by the hour, from the continuous aggregate ([] without one)
                "hours": [_rate_json(m, "hour") for m in self.day_history],
            },
        }


def _totals(history: list[RateMinute]) -> tuple[int, int, tuple[datetime, int] | None]:
    """Files, bytes, and the busiest bucket with its files (None when there were none)."""
    per_bucket: dict[datetime, int] = {}
    for m in history:
        per_bucket[m.minute] = per_bucket.get(m.minute, 0) + m.files
    files, size = sum(m.files for m in history), sum(m.bytes for m in history)
    return files, size, (max(per_bucket.items(), key=lambda kv: kv[1]) if files else None)


def _rate_json(m: RateMinute, key: str) -> dict[str, Any]:
    return {
        key: m.minute.astimezone(timezone.utc).isoformat(),
        "consumer": m.consumer,
        "files": m.files,
        "bytes": m.bytes,
    }


def table_figures(conn: psycopg.Connection[Any], table: str, *, history_minutes: int) -> TableFigures:
    """The table's figures in a few catalog queries and one read of the rate history (the
    continuous aggregate where there is one, else the last `history_minutes` of the table)."""
    facts = read_table(conn, table)
    estimate = estimated_rows(conn, table, hypertable=facts.hypertable)
    source, history = rate_history(conn, table, facts, history_minutes)
    day = rate_history_hours(conn, facts)
    return TableFigures(facts, estimate, source, history, history_minutes, day)


class FiguresCache:
    """`table_figures` for the observers that refresh (status --watch, the dashboard), read
    again less often the more a read costs (at most ~2% of the time, and never more often
    than every `min_every` seconds): without a continuous aggregate, the rate history reads
    the window's rows."""

    def __init__(self, min_every: float = 0.0) -> None:
        self.min_every = min_every
        self._figures: TableFigures | None = None
        self._next = 0.0

    def get(self, conn: psycopg.Connection[Any], table: str, *, history_minutes: int) -> TableFigures:
        started = time.monotonic()
        if self._figures is None or started >= self._next:
            self._figures = table_figures(conn, table, history_minutes=history_minutes)
            self._next = started + max(self.min_every, 50 * (time.monotonic() - started))
        return self._figures
