"""PostgreSQL: the connection pool, the schema, and the per-batch load.

A batch is loaded in one transaction: COPY into a per-connection temporary
staging table, `INSERT … SELECT … ON CONFLICT DO NOTHING` into the events table,
COMMIT. The primary key `(stream, stream_id, event_time)` makes a redelivered entry a
no-op, and keeps apart the rows of two streams loading one table.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg import sql
from psycopg_pool import ConnectionPool

from . import _native, timescale
from . import constants as c
from ._faults import crash_point
from .config import Settings, mask_url
from .errors import ConfigError, DatabaseError, SchemaError, TransientError
from .redaction import error_line

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = tuple(_native.COPY_COLUMNS)

_COLUMN_TYPES = {
    "event_time": "timestamptz NOT NULL",
    "stream": "text NOT NULL",
    "stream_id": "text NOT NULL",
    "file_id": "uuid NOT NULL",
    "filename": "text NOT NULL",
    "storage": "text NOT NULL",
    "storage_key": "text NOT NULL",
    "size_bytes": "bigint NOT NULL",
    "checksum_sha256": "text NOT NULL",
    "content_type": "text",
    "uploaded_at": "timestamptz NOT NULL",
    "consumer": "text NOT NULL",
    "attributes": "jsonb NOT NULL DEFAULT '{}'::jsonb",
}


def table_ident(table: str) -> sql.Identifier:
    """`schema.table` or `table` as a quoted identifier."""
    return sql.Identifier(*table.split("."))


def _index_name(table: str, suffix: str) -> sql.Identifier:
    return sql.Identifier(table.split(".")[-1] + suffix)


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """libpq parameters every filepipe connection gets: timeouts and keepalives, so a
    dead or stalled server is noticed instead of waited on forever, and UTF-8 as the
    client encoding whatever the URI, the role or the database say: the COPY buffers hold
    UTF-8 text, which another client encoding would store as something else."""
    kwargs: dict[str, Any] = {
        "client_encoding": "UTF8",
        "connect_timeout": max(1, round(settings.connect_timeout_s)),
        "application_name": "filepipe",
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": settings.statement_timeout_ms + 10_000,
    }
    if settings.pgbouncer:
        # Through PgBouncer in transaction pooling mode each transaction may run on another
        # server connection, so nothing may outlive one: no prepared statements (psycopg
        # prepares a query run 5 times), no startup `options` (PgBouncer refuses them: the
        # merge sets its statement timeout per transaction), no temporary table kept.
        kwargs["prepare_threshold"] = None
    else:
        kwargs["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
    return kwargs


def connect(settings: Settings, **extra: Any) -> psycopg.Connection[Any]:
    """One connection (for commands that need no pool)."""
    kwargs = {**connection_kwargs(settings), **extra}
    if settings.pgbouncer:
        kwargs.pop("options", None)
    check_conninfo(settings)
    return psycopg.connect(settings.pg_uri, **kwargs)


def check_conninfo(settings: Settings) -> None:
    """Raises ConfigError if PG_URI cannot be parsed (a broken percent-escape, an
    unknown option): no connection attempt could ever succeed."""
    try:
        psycopg.conninfo.conninfo_to_dict(settings.pg_uri)
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"PG_URI cannot be used: {first_line(e)}") from e


# SQLSTATEs with which a server refuses a write whatever the data: a read-only
# transaction (a read-only database or a hot standby) and a missing privilege.
READ_ONLY = "25006"
NO_PRIVILEGE = "42501"

# The pooled connections that have their staging table.
_staged: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


def _create_staging() -> sql.Composed:
    # The staging table lives as long as the connection; ON COMMIT DELETE ROWS
    # empties it at every commit, so no DDL runs per batch.
    return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
        sql.Identifier(c.STAGING_TABLE), _staging_columns()
    )


def copy_statement(*, binary: bool, table: str | None = None) -> sql.Composed:
    """`COPY <table> (<filepipe's columns>) FROM STDIN (FORMAT BINARY|TEXT)`: the statement
    an encoded buffer is loaded with, into `table` (a direct load) or, when `table` is
    None, into the connection's staging table (a merge)."""
    target = sql.Identifier(c.STAGING_TABLE) if table is None else table_ident(table)
    columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    fmt = sql.SQL("BINARY" if binary else "TEXT")
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(target, columns, fmt)


def configure_connection(conn: psycopg.Connection[Any]) -> None:
    """Gives a new connection its staging table, as the pool does with each of its
    connections (not behind PgBouncer, where a merge creates its own)."""
    try:
        conn.execute(_create_staging())
    except psycopg.Error as e:
        # A read-only server (a hot standby after a failover) or a role without the TEMP
        # privilege: the connection is still handed out, so that the load reports the
        # server's own refusal and the consumer waits it out, rather than the pool
        # failing to connect with no reason given. The merge creates the staging table
        # when it can.
        if e.sqlstate not in (READ_ONLY, NO_PRIVILEGE):
            raise
        return
    _staged.add(conn)


def _staging_columns() -> sql.Composed:
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(_COLUMN_TYPES[name].split(" NOT NULL")[0]))
        for name in COLUMNS
    )


# When each pooled connection last completed a load; a connection busy within the
# last few seconds is known to be alive and skips the check (a round trip per batch).
_last_used: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()
CHECK_AFTER_IDLE_S = 5.0
CHECK_TIMEOUT_S = 5.0  # an empty query: a live server answers in milliseconds


def mark_used(conn: psycopg.Connection[Any]) -> None:
    """Records that `conn` just completed a round trip successfully."""
    _last_used[conn] = time.monotonic()


def check_if_idle(conn: psycopg.Connection[Any]) -> None:
    """The pool's check: a connection idle for more than a few seconds (say, across a
    database restart) is tested with an empty query before it is handed out, and
    replaced if it is broken. The test has its own watchdog: it runs before the
    load's, and on a silent network it would otherwise wait for good."""
    if time.monotonic() - _last_used.get(conn, 0.0) > CHECK_AFTER_IDLE_S:
        with Watchdog(conn, CHECK_TIMEOUT_S):
            ConnectionPool.check_connection(conn)


def create_pool(settings: Settings, *, open: bool = True, min_size: int = 1) -> ConnectionPool:
    """A psycopg pool whose connections are checked before use, so it recovers after
    a database restart, and which gives up waiting for a connection after the
    connect timeout rather than hanging."""
    check_conninfo(settings)
    pool_log = logging.getLogger("psycopg.pool")
    if pool_log.level == logging.NOTSET:
        # During an outage the pool warns at every failed connection attempt; the
        # consumer's backoff already says "PostgreSQL unreachable" once and "is back".
        pool_log.setLevel(logging.ERROR)
    pool = ConnectionPool(
        settings.pg_uri,
        min_size=min(min_size, settings.pool_size),
        max_size=settings.pool_size,
        # Autocommit: a direct COPY is its own transaction (no COMMIT round trip);
        # the merge path opens an explicit one.
        kwargs={**connection_kwargs(settings), "autocommit": True},
        configure=None if settings.pgbouncer else configure_connection,  # PgBouncer: no session state
        check=check_if_idle,
        timeout=max(settings.connect_timeout_s * 2, 5.0),
        # No background reconnection loop with its own growing delays: a load that finds
        # no connection fails with PoolTimeout, and the consumer's backoff (capped at a
        # few seconds) tries again, so the pool reconnects soon after the server is back.
        reconnect_timeout=0,
        name="filepipe",
        open=False,
    )
    if open:
        pool.open(wait=False)
    return pool


# A row's identity: the logical stream name, the entry id (behind `{i}/` for partition i)
# and the event time (from the entry id). It contains the time column, as a TimescaleDB
# hypertable requires of every unique key.
PRIMARY_KEY: tuple[str, ...] = ("stream", "stream_id", "event_time")
# The key before the stream name was part of it: two streams' equal entry ids collided.
OLD_PRIMARY_KEY: tuple[str, ...] = ("stream_id", "event_time")


@dataclass(frozen=True)
class Upgrade:
    """What `init-db` did to an old-layout table."""

    stream: str  # the name the existing rows were given
    rows: int  # the table's row count, as PostgreSQL estimates it
    seconds: float


@dataclass(frozen=True)
class SchemaInfo:
    table: str
    hypertable: bool
    timescaledb: bool  # the extension is in use in this database
    # Set when init-db upgraded an old-layout table: what it did, for the user.
    upgraded: Upgrade | None = None
    extension: timescale.Extension = field(default_factory=timescale.Extension)
    license: str = ""  # TimescaleDB's edition in this database (apache | timescale)
    chunk_interval: timedelta | None = None  # a hypertable's, for new chunks
    migrated_rows: int | None = None  # set when an existing plain table became a hypertable
    # What else init-db did or could not do, one line each ("!" first: the user must act).
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """The table's kind in words, for `init-db` and the demo."""
        if self.hypertable:
            every = ""
            if self.chunk_interval:
                every = f", chunks of {timescale.interval_words(self.chunk_interval)}"
            return f"TimescaleDB hypertable ({self.license} edition{every})"
        if self.extension.state == "absent":
            return "plain table (timescaledb not available)"
        return "plain table"


@dataclass(frozen=True)
class Layout:
    """The events table as PostgreSQL describes it."""

    columns: frozenset[str]
    primary_key: tuple[str, ...]
    primary_key_name: str | None
    compression: bool  # a TimescaleDB hypertable with compression enabled

    def problem(self, table: str) -> str | None:
        """Why filepipe cannot load this table as it is (None: it can)."""
        missing = [name for name in COLUMNS if name != "stream" and name not in self.columns]
        if missing:
            return f"table {table} is not a filepipe events table: it has no column {', '.join(missing)}"
        if "stream" not in self.columns or self.primary_key != PRIMARY_KEY:
            return (
                f"table {table} has the old layout (rows keyed by ({', '.join(self.primary_key)}), "
                "without the stream name): run `filepipe init-db` to upgrade it"
            )
        return None


_PRIMARY_KEY_SQL = """
SELECT c.conname, a.attname
FROM pg_constraint c
JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) ON true
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
WHERE c.conrelid = %s::regclass AND c.contype = 'p'
ORDER BY k.n
"""


def read_layout(conn: psycopg.Connection[Any], table: str) -> Layout | None:
    """The table's columns and primary key, or None if there is no such table."""
    row = conn.execute("SELECT to_regclass(%s)::oid", (table,)).fetchone()
    if row is None or row[0] is None:
        return None
    oid = row[0]
    columns = frozenset(
        name
        for (name,) in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (oid,),
        )
    )
    key = conn.execute(_PRIMARY_KEY_SQL, (oid,)).fetchall()
    compression = False
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
        found = conn.execute(
            "SELECT compression_enabled FROM timescaledb_information.hypertables "
            "WHERE format('%%I.%%I', hypertable_schema, hypertable_name)::regclass = %s::regclass",
            (oid,),
        ).fetchone()
        compression = bool(found and found[0])
    return Layout(
        columns=columns,
        primary_key=tuple(name for _, name in key),
        primary_key_name=key[0][0] if key else None,
        compression=compression,
    )


def check_layout(conn: psycopg.Connection[Any], table: str) -> None:
    """Raises SchemaError (one line naming `filepipe init-db`) if the table exists with a
    layout this version cannot load; a missing table is reported at the first load."""
    layout = read_layout(conn, table)
    problem = layout.problem(table) if layout is not None else None
    if problem:
        raise SchemaError(problem)


# How long init-db waits for the table's lock before giving up (a long query or a
# loading consumer holds it): waiting longer would stall every reader queued behind it.
UPGRADE_LOCK_TIMEOUT_MS = 10_000


def _upgrade(conn: psycopg.Connection[Any], table: str, stream: str, layout: Layout) -> Upgrade:
    """Brings an old-layout table to the current one in one transaction: adds `stream`
    (the existing rows get `stream`, the configured STREAM_NAME) and rebuilds the
    primary key as (stream, stream_id, event_time). Adding the column with a constant
    default rewrites nothing; building the new key's index reads the whole table. The
    table is locked (ACCESS EXCLUSIVE: no reads, no writes) until the commit."""
    missing = [name for name in COLUMNS if name != "stream" and name not in layout.columns]
    if missing:
        raise DatabaseError(layout.problem(table) or f"table {table} cannot be upgraded")
    if layout.primary_key not in (OLD_PRIMARY_KEY, PRIMARY_KEY):
        raise DatabaseError(
            f"table {table} has primary key ({', '.join(layout.primary_key) or 'none'}), not filepipe's "
            f"({', '.join(OLD_PRIMARY_KEY)}): change it to ({', '.join(PRIMARY_KEY)}) by hand"
        )
    if layout.compression:
        raise DatabaseError(
            f"table {table} is a hypertable with compression enabled, and TimescaleDB cannot build its "
            "new primary key (stream, stream_id, event_time) on compressed chunks: decompress them, "
            "disable compression, run `filepipe init-db` again, then enable compression again"
        )
    ident = table_ident(table)
    started = time.monotonic()
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(UPGRADE_LOCK_TIMEOUT_MS)))
        conn.execute("SET LOCAL statement_timeout = 0")  # the index build takes as long as it takes
        row = conn.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", (table,)
        ).fetchone()
        if "stream" not in layout.columns:
            # The default stays: a consumer of the previous version still running (it does
            # not send the column) keeps loading, its rows named after this stream.
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN stream text NOT NULL DEFAULT {}").format(
                    ident, sql.Literal(stream)
                )
            )
        if layout.primary_key != PRIMARY_KEY:
            name = layout.primary_key_name or table.split(".")[-1] + "_pkey"
            if layout.primary_key_name:
                conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(ident, sql.Identifier(name)))
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY ({})").format(
                    ident, sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, PRIMARY_KEY))
                )
            )
    rows = max(0, int(row[0])) if row and row[0] is not None else 0
    return Upgrade(stream=stream, rows=rows, seconds=time.monotonic() - started)


def init_db(
    settings: Settings,
    *,
    plain: bool = False,
    migrate: bool = False,
    chunk_interval: timedelta | None = None,
    retention: timedelta | None = None,
    compress_after: timedelta | None = None,
) -> SchemaInfo:
    """Creates the events table: a TimescaleDB hypertable on `event_time` where the server
    can use the extension, a plain table with a time index where it has none, or with
    `plain`. Idempotent, and all in one transaction: what it refuses changes nothing.
    Raises NotPreloadedError (a ConfigError) where the extension is installed but not
    preloaded and `plain` is not given: `timescale.table_kind` decides.

    On a hypertable: new chunks span `chunk_interval` (default `DEFAULT_CHUNK_INTERVAL` for a
    new one; an existing one keeps its own unless given); `retention` and `compress_after`
    become TimescaleDB's policies where the edition has them (retention elsewhere: a note
    on running `filepipe drop-chunks`; compression elsewhere: ConfigError); where the edition
    has continuous aggregates, the rate history's is created. An existing plain table with
    rows becomes a hypertable only with `migrate` (its rows are copied into chunks).

    An existing table of the old layout (no `stream` column, keyed by (stream_id,
    event_time)) is upgraded in the same transaction: its rows get `settings.stream`."""
    table = settings.table
    ident = table_ident(table)
    cols = sql.SQL(",\n  ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(_COLUMN_TYPES[name])) for name in COLUMNS
    )
    create = sql.SQL(
        "CREATE TABLE IF NOT EXISTS {table} (\n  {cols},\n"
        "  processed_at timestamptz NOT NULL DEFAULT now(),\n"
        "  PRIMARY KEY ({key})\n)"
    ).format(table=ident, cols=cols, key=sql.SQL(", ").join(map(sql.Identifier, PRIMARY_KEY)))
    try:
        with connect(settings) as conn, conn.transaction():
            ext = timescale.read_extension(conn)
            wanted = timescale.table_kind(ext, plain=plain)
            _check_table_options(wanted, plain, migrate, chunk_interval, retention, compress_after)
            if "." in table:
                schema = sql.Identifier(table.split(".")[0])
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            if wanted == timescale.HYPERTABLE and not ext.installed:
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                ext = timescale.read_extension(conn)
            in_use = wanted == timescale.HYPERTABLE or bool(ext.installed)
            license = timescale.license_of(conn) if in_use else ""
            if compress_after is not None:
                _check_compression(ext, license)
            existed = read_layout(conn, table) is not None
            conn.execute(create)
            upgraded = None
            layout = read_layout(conn, table)
            if layout is not None and layout.problem(table):
                upgraded = _upgrade(conn, table, settings.stream, layout)
            hypertable = in_use and timescale.is_hypertable(conn, table)
            notes: list[str] = []
            migrated = None
            if wanted == timescale.HYPERTABLE and not hypertable:
                rows = _has_rows(conn, ident) if existed else False
                if rows and not migrate:
                    notes.append(
                        f"! table {table} is a plain table with rows, left as it is: "
                        "`filepipe init-db --migrate-to-hypertable` turns it into a hypertable "
                        "(it copies every row into chunks, with the table locked meanwhile)"
                    )
                else:
                    migrated = _create_hypertable(conn, table, chunk_interval, migrate=rows)
                    hypertable = True
            elif hypertable and chunk_interval is not None:
                notes += _set_chunk_interval(conn, table, chunk_interval)
            if not hypertable:
                conn.execute(
                    sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (event_time DESC)").format(
                        _index_name(table, "_event_time_idx"), ident
                    )
                )
            interval = None
            if hypertable:
                facts = timescale.read_table(conn, table, ext)
                interval = facts.chunk_interval
                notes += _apply_policies(conn, table, facts, retention, compress_after)
            return SchemaInfo(
                table=table, hypertable=hypertable, timescaledb=in_use, upgraded=upgraded, extension=ext,
                license=license, chunk_interval=interval, migrated_rows=migrated, notes=tuple(notes),
            )
    except psycopg.errors.LockNotAvailable as e:
        raise DatabaseError(
            f"table {table} is in use (its lock was not granted within {UPGRADE_LOCK_TIMEOUT_MS // 1000} s): "
            "stop the consumers loading it and run `filepipe init-db` again"
        ) from e
    except psycopg.OperationalError as e:
        raise connection_failure(settings, e) from e
    except psycopg.Error as e:
        raise DatabaseError(f"cannot create table {table}: {first_line(e)}") from e


def _check_table_options(
    wanted: str,
    plain: bool,
    migrate: bool,
    chunk_interval: timedelta | None,
    retention: timedelta | None,
    compress_after: timedelta | None,
) -> None:
    """Raises ConfigError for hypertable options where the table will be a plain one."""
    asked = [
        name
        for name, value in (
            ("--migrate-to-hypertable", migrate),
            ("--chunk-interval", chunk_interval),
            ("--retention", retention),
            ("--compress-after", compress_after),
        )
        if value
    ]
    if asked and wanted == timescale.PLAIN:
        why = "--plain asks for a plain table" if plain else "this server has no TimescaleDB"
        need = "needs" if len(asked) == 1 else "need"
        raise ConfigError(
            f"{', '.join(asked)} {need} a TimescaleDB hypertable, and {why}: nothing was changed"
        )


def _check_compression(ext: timescale.Extension, license: str) -> None:
    if license != timescale.FULL_LICENSE:
        raise ConfigError(
            f"--compress-after needs TimescaleDB's compression, which the {license or 'installed'} edition "
            "of TimescaleDB on this server does not have (it is in the Timescale-License edition): "
            "nothing was changed"
        )
    version = ext.installed or ext.available
    if timescale.version_tuple(version) < timescale.MIN_COMPRESSED_LOAD_VERSION:
        least = ".".join(map(str, timescale.MIN_COMPRESSED_LOAD_VERSION))
        raise ConfigError(
            f"--compress-after needs TimescaleDB {least} or newer (this server has {version}): older "
            "versions cannot load a redelivered or late event into a compressed chunk: nothing was changed"
        )


def _has_rows(conn: psycopg.Connection[Any], ident: sql.Composable) -> bool:
    row = conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(ident)).fetchone()
    return bool(row and row[0])


def _create_hypertable(
    conn: psycopg.Connection[Any], table: str, interval: timedelta | None, *, migrate: bool
) -> int | None:
    """Makes `table` a hypertable; with `migrate`, copies its rows into chunks (taking as
    long as it takes, the table locked) and returns how many there were."""
    rows = None
    if migrate:
        conn.execute("SET LOCAL statement_timeout = 0")
        found = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_ident(table))).fetchone()
        rows = int(found[0]) if found else 0
    conn.execute(
        timescale.create_hypertable_sql(migrate=migrate),
        {"t": table, "i": interval or timescale.DEFAULT_CHUNK_INTERVAL},
    )
    return rows


def _set_chunk_interval(conn: psycopg.Connection[Any], table: str, interval: timedelta) -> list[str]:
    facts = timescale.read_table(conn, table)
    if facts.chunk_interval == interval:
        return []
    conn.execute("SELECT set_chunk_time_interval(%s::regclass, %s::interval)", (table, interval))
    words = timescale.interval_words(interval)
    return [f"  chunk interval: new chunks span {words} (existing chunks keep theirs)"]


def _apply_policies(
    conn: psycopg.Connection[Any],
    table: str,
    facts: timescale.TableFacts,
    retention: timedelta | None,
    compress_after: timedelta | None,
) -> list[str]:
    """Retention, compression and the rate history's continuous aggregate, each where the
    edition has it; returns what was done or is left to the user, one line each."""
    notes = []
    params: dict[str, Any] = {"t": table}
    if retention is not None:
        words = timescale.interval_words(retention)
        if facts.full_edition:
            for policy in timescale.retention_sql():
                conn.execute(policy, {**params, "after": retention})
            notes.append(f"  retention: TimescaleDB's policy drops chunks older than {words}")
        else:
            notes.append(
                f"! retention: the {facts.license} edition of TimescaleDB has no retention policies; drop "
                f"chunks older than {words} from cron instead, e.g. "
                f"`17 * * * * filepipe drop-chunks --older-than {timescale.interval_text(retention)} "
                f"--table {table}`"
            )
    if compress_after is not None:
        for step in timescale.compression_sql(table, enabled=facts.compression):
            conn.execute(step, {**params, "after": compress_after})
        notes.append(
            f"  compression: TimescaleDB's policy compresses chunks older than "
            f"{timescale.interval_words(compress_after)} (segmented by {timescale.COMPRESS_SEGMENT_BY}, "
            f"ordered by {timescale.COMPRESS_ORDER_BY})"
        )
    if facts.full_edition and not facts.rate_view:
        for view in timescale.rate_view_sql(table):
            conn.execute(view)
        notes.append(
            f"  rate history: continuous aggregate {timescale.rate_view_name(table)} "
            "(files and bytes per minute and consumer), refreshed every minute"
        )
    return notes


def drop_old_chunks(settings: Settings, older_than: timedelta) -> list[str]:
    """Drops the chunks of the events table wholly older than `older_than`; returns their
    names. Raises DatabaseError for a table that is not a hypertable."""
    table = settings.table
    try:
        with connect(settings, autocommit=True) as conn:
            ext = timescale.read_extension(conn)
            if ext.installed and not ext.preloaded:
                timescale.table_kind(ext, plain=True)  # raises: nothing of TimescaleDB's can run
            if read_layout(conn, table) is None:
                raise DatabaseError(f"table {table} does not exist: run `filepipe init-db` first")
            if not ext.installed or not timescale.is_hypertable(conn, table):
                raise DatabaseError(
                    f"table {table} is a plain table: it has no chunks to drop (a hypertable has; "
                    "see `filepipe init-db --migrate-to-hypertable`)"
                )
            return timescale.drop_chunks(conn, table, older_than)
    except psycopg.OperationalError as e:
        raise connection_failure(settings, e) from e
    except psycopg.Error as e:
        raise DatabaseError(f"cannot drop chunks of {table}: {first_line(e)}") from e


def connection_failure(settings: Settings, e: psycopg.OperationalError) -> DatabaseError | ConfigError:
    """What a command says when PostgreSQL cannot be used: a ConfigError (exit 2) with the
    server's own reason when it refuses these settings for good (`retry.pg_login_refusal`),
    else a DatabaseError saying it cannot be reached."""
    from .retry import pg_login_refusal

    where = mask_url(settings.pg_uri)
    refusal = pg_login_refusal(e)
    if refusal is not None:
        return ConfigError(f"PostgreSQL at {where} refused the connection: {refusal} (check PG_URI)")
    return DatabaseError(f"cannot reach PostgreSQL at {where}: {first_line(e)}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, passwords scrubbed (`redaction.error_line`)."""
    return error_line(e)


# TimescaleDB (Timescale License, 2.11+) loads a row into a compressed chunk of a table with a
# unique key by first decompressing the batches that could hold its key (a COPY as well as an
# INSERT). It refuses a statement that would decompress more than
# `timescaledb.max_tuples_decompressed_per_dml_transaction` tuples (53400, "tuple decompression
# limit exceeded by operation"; 100,000 by default), and with
# `timescaledb.enable_dml_decompression = off` it refuses every such row (0A000, "inserting into
# compressed chunk with unique constraints disabled"); before 2.11 it refused them all (0A000,
# "... compressed chunk ..."). The merge lifts the cap and turns DML decompression on for its own
# transaction only: what it decompresses is bounded by the compressed batches its rows fall in.
# Servers without the settings (no TimescaleDB, or not preloaded) skip the statement.
LIFT_DECOMPRESSION_CAP = (
    "SELECT set_config(name, CASE name WHEN 'timescaledb.enable_dml_decompression' THEN 'on' ELSE '0' END, "
    "true) FROM pg_settings WHERE name IN ('timescaledb.max_tuples_decompressed_per_dml_transaction', "
    "'timescaledb.enable_dml_decompression')"
)


def decompression_cap(e: psycopg.Error) -> bool:
    """Whether `e` is TimescaleDB's cap on the tuples one statement may decompress."""
    return e.sqlstate == "53400" and "decompress" in (e.diag.message_primary or "").lower()


def compressed_chunk_refusal(e: psycopg.Error) -> bool:
    """Whether `e` is TimescaleDB refusing rows because their chunk is compressed: the cap, or
    DML decompression turned off (or not supported by that version)."""
    message = (e.diag.message_primary or "").lower()
    return decompression_cap(e) or (e.sqlstate == "0A000" and "compressed chunk" in message)


class Loader:
    """Loads encoded COPY buffers into the events table through a pool.

    Two ways to load a batch, both idempotent because of the primary key:

    * merge: COPY into the per-connection staging table, then
      `INSERT … SELECT … ON CONFLICT DO NOTHING` — a redelivered row is skipped;
    * direct: COPY straight into the events table. It does about half the
      server's work per row, but fails as a whole (unique_violation) if any row is
      already there; the batch is then loaded again with merge.

    `load(direct=True)` tries direct first. The consumer uses it for entries on their
    first delivery, which are almost never present already; after a conflict it merges
    for a while, since conflicts come in runs (a replayed stream)."""

    CONFLICT_COOLDOWN = 20

    def __init__(self, pool: ConnectionPool, settings: Settings) -> None:
        self.pool = pool
        self.binary = settings.copy_format == "binary"
        self.stall_timeout = settings.statement_timeout_ms / 1000 + max(2.0, settings.connect_timeout_s)
        ident = table_ident(settings.table)
        staging = sql.Identifier(c.STAGING_TABLE)
        col_list = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        self.copy_sql = copy_statement(binary=self.binary)
        self.direct_copy_sql = copy_statement(binary=self.binary, table=settings.table)
        self.insert_sql = sql.SQL(
            "INSERT INTO {} ({cols}) SELECT {cols} FROM {} ON CONFLICT DO NOTHING"
        ).format(ident, staging, cols=col_list)
        self.ident = ident
        self.col_list = col_list
        self.stream = settings.stream
        self.statement_timeout_ms = settings.statement_timeout_ms
        # PgBouncer: the staging table lives and dies inside each merge transaction.
        self.staging_sql: sql.Composed | None = None
        if settings.pgbouncer:
            self.staging_sql = sql.SQL(
                "SET LOCAL statement_timeout = {}; CREATE TEMP TABLE {} ({}) ON COMMIT DROP"
            ).format(sql.Literal(settings.statement_timeout_ms), staging, _staging_columns())
        self._merge_only = 0
        # Merges left to run with TimescaleDB's decompression limits lifted, after one was
        # refused for compressed chunks (see LIFT_DECOMPRESSION_CAP).
        self._lift_limits = 0
        self.table = settings.table
        self._layout_checked = False

    def load(self, buf: bytes, rows: int, *, direct: bool = False) -> int:
        """COPY one buffer of `rows` rows and COMMIT; returns the rows newly inserted
        (a redelivered entry's row already exists and counts 0).

        A connection that answers nothing for `stall_timeout` seconds (a silent
        network: the server's statement timeout cannot help when its answer never
        arrives) is cut, and the load fails with a TransientError.

        The first load checks the table's layout: one this version cannot load (the old
        key, without the stream name) raises SchemaError, and nothing is loaded."""
        if not self._layout_checked:
            with self.pool.connection() as conn, Watchdog(conn, self.stall_timeout):
                check_layout(conn, self.table)
            self._layout_checked = True
        if direct and self._merge_only <= 0:
            try:
                self._run(buf, direct=True)
                return rows
            except psycopg.errors.UniqueViolation:
                self._merge_only = self.CONFLICT_COOLDOWN
                log.debug("batch already partly loaded: merging instead")
            except psycopg.Error as e:
                if not compressed_chunk_refusal(e):
                    raise
                # A redelivery or a late event into a compressed chunk: the merge loads what the
                # direct COPY could not, lifting the decompression cap for its own transaction,
                # and so do the batches after it (they come in runs: a backfill, a replay).
                self._merge_only = self._lift_limits = self.CONFLICT_COOLDOWN
                log.info("direct COPY into compressed chunks refused, merging instead: %s", first_line(e))
                return self._run(buf, direct=False, lift_decompression_cap=True)
        elif direct:
            self._merge_only -= 1
        if self._lift_limits > 0:
            self._lift_limits -= 1
            return self._run(buf, direct=False, lift_decompression_cap=True)
        try:
            return self._run(buf, direct=False)
        except psycopg.Error as e:
            if decompression_cap(e):
                log.info("the merge met TimescaleDB's decompression cap, merging without it: %s",
                         first_line(e))
            elif compressed_chunk_refusal(e):
                log.info(
                    "the merge was refused for compressed chunks, merging with DML decompression on: %s",
                    first_line(e),
                )
            else:
                raise
            self._lift_limits = self.CONFLICT_COOLDOWN
            return self._run(buf, direct=False, lift_decompression_cap=True)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection guarded by a watchdog. A connection found read-only is
        closed (the pool replaces it): a database's default is fixed for the life of a
        session, and after a failover a new connection may reach the new primary."""
        with self.pool.connection() as conn, Watchdog(conn, self.stall_timeout) as dog:
            try:
                yield conn
                mark_used(conn)
            except psycopg.Error as e:
                if dog.fired:
                    raise TransientError(
                        f"PostgreSQL did not answer within {self.stall_timeout:.0f} s: connection cut"
                    ) from e
                if e.sqlstate == READ_ONLY:
                    conn.close()
                raise

    def _stage(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> None:
        """Makes sure the merge's staging table exists, inside the open transaction."""
        if self.staging_sql is not None:
            cur.execute(self.staging_sql)
        elif conn not in _staged:
            cur.execute(_create_staging())

    def _run(self, buf: bytes, *, direct: bool, lift_decompression_cap: bool = False) -> int:
        with self._connection() as conn:
            inserted = -1
            if direct:
                with conn.cursor() as cur, cur.copy(self.direct_copy_sql) as copy:
                    copy.write(buf)
                    crash_point("during_copy")  # the COPY not yet ended, so not committed
                crash_point("after_copy")
            else:
                with conn.transaction(), conn.cursor() as cur:
                    if lift_decompression_cap:
                        cur.execute(LIFT_DECOMPRESSION_CAP)
                    self._stage(conn, cur)
                    with cur.copy(self.copy_sql) as copy:
                        copy.write(buf)
                        crash_point("during_copy")
                    crash_point("after_copy")
                    cur.execute(self.insert_sql)
                    inserted = cur.rowcount
                    crash_point("before_commit")  # the rows inserted, the transaction still open
                if self.staging_sql is None:
                    _staged.add(conn)
        return max(inserted, 0)

    def probe(self, consumer: str) -> None:
        """Checks that the table still takes a row it took before; raises the server's
        refusal (a psycopg error) if it does not.

        The row tried is the table's newest, under a key of its own and written by
        `consumer` from this stream, inserted in a transaction that is rolled back: nothing is left
        behind. A table that takes it accepts rows like the ones it holds, so what it
        refuses of a batch is the entries' own values. A table that refuses it has
        changed (a constraint, trigger or NOT NULL column no row satisfies, a privilege
        revoked, a read-only database, a lock held past the statement timeout). An empty
        table is tried with a row made up here (a plain file record)."""
        key = f"filepipe-probe/{uuid.uuid4().hex}"
        values = sql.SQL(", ").join(
            sql.Literal({"stream_id": key, "consumer": consumer, "stream": self.stream}[name])
            if name in ("stream_id", "consumer", "stream")
            else sql.Identifier(name)
            for name in COLUMNS
        )
        again = sql.SQL(
            "INSERT INTO {t} ({cols}) SELECT {values} FROM {t} ORDER BY event_time DESC LIMIT 1 "
            "ON CONFLICT DO NOTHING"
        ).format(t=self.ident, cols=self.col_list, values=values)
        with self._connection() as conn, conn.transaction(force_rollback=True), conn.cursor() as cur:
            if self.staging_sql is not None:
                cur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(self.statement_timeout_ms))
            cur.execute(again)
            if cur.rowcount == 1:
                return
            # Nothing inserted: the table is empty, or the row met a unique key (after
            # its checks and triggers had passed).
            cur.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(self.ident))
            row = cur.fetchone()
            if row is not None and row[0]:
                return
            self._stage(conn, cur)
            with cur.copy(self.copy_sql) as copy:
                copy.write(self._made_up_row(consumer))
            cur.execute(self.insert_sql)

    def _made_up_row(self, consumer: str) -> bytes:
        """A COPY buffer of one plausible row: an empty file stored locally, now."""
        entry_id = f"{time.time_ns() // 1_000_000}-0".encode()
        fields = {b"file_id": str(uuid.uuid4()).encode(), b"filename": b"filepipe probe", b"key": b"probe"}
        batch = _native.parse_entries([(entry_id, fields)], "local", id_prefix="filepipe-probe/")
        measured = _native.Measurements(1)
        measured.set(0, 0, hashlib.sha256(b"").digest(), "application/octet-stream")
        return _native.encode_copy(batch, measured, consumer, self.binary, stream=self.stream)


class Watchdog:
    """Cuts a connection's socket if the block it guards runs longer than `timeout`:
    the blocked call then fails at once instead of waiting for a TCP timeout."""

    def __init__(self, conn: psycopg.Connection[Any], timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.fired = False
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.fired = True
        try:
            fd = self.conn.pgconn.socket
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg.Error):
            pass
        log.warning("PostgreSQL connection silent for %.0f s: cutting it", self.timeout)

    def __enter__(self) -> Watchdog:
        self._timer = threading.Timer(self.timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
