"""`init-db` and `drop-chunks`: the events table created (a hypertable where TimescaleDB
can be used, a plain table otherwise) or brought to the current layout, its TimescaleDB
chunk interval and policies, and its old chunks dropped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from .. import timescale
from ..config import Settings
from ..errors import ConfigError, DatabaseError
from ..redaction import error_line
from .columns import (
    COLUMN_TYPES,
    COLUMNS,
    OLD_PRIMARY_KEY,
    PRIMARY_KEY,
    column_list,
    index_name,
    table_ident,
)
from .connection import connect, connection_failure
from .layout import Layout, read_layout


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


# How long init-db waits for the table's lock before giving up (a long query or a
# loading consumer holds it): waiting longer would stall every reader queued behind it.
UPGRADE_LOCK_TIMEOUT_MS = 10_000


def upgrade_layout(conn: psycopg.Connection[Any], table: str, stream: str, layout: Layout) -> Upgrade:
    """Brings an old-layout table to the current one in one transaction: adds `stream`
    (the existing rows get `stream`, the configured STREAM_NAME) and rebuilds the
    primary key as (stream, stream_id, event_time). Adding the column with a constant
    default rewrites nothing; building the new key's index reads the whole table. The
    table is locked (ACCESS EXCLUSIVE: no reads, no writes) until the commit."""
    if layout.missing_columns():
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
                    ident, sql.Identifier(name), column_list(PRIMARY_KEY)
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
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(COLUMN_TYPES[name])) for name in COLUMNS
    )
    create = sql.SQL(
        "CREATE TABLE IF NOT EXISTS {table} (\n  {cols},\n"
        "  processed_at timestamptz NOT NULL DEFAULT now(),\n"
        "  PRIMARY KEY ({key})\n)"
    ).format(table=ident, cols=cols, key=column_list(PRIMARY_KEY))
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
                upgraded = upgrade_layout(conn, table, settings.stream, layout)
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
                        index_name(table, "_event_time_idx"), ident
                    )
                )
            interval = None
            if hypertable:
                facts = timescale.read_table(conn, table, ext)
                interval = facts.chunk_interval
                notes += _apply_policies(conn, table, facts, retention, compress_after)
            return SchemaInfo(
                table=table,
                hypertable=hypertable,
                timescaledb=in_use,
                upgraded=upgraded,
                extension=ext,
                license=license,
                chunk_interval=interval,
                migrated_rows=migrated,
                notes=tuple(notes),
            )
    except psycopg.errors.LockNotAvailable as e:
        raise DatabaseError(
            f"table {table} is in use (its lock was not granted within {UPGRADE_LOCK_TIMEOUT_MS // 1000} s): "
            "stop the consumers loading it and run `filepipe init-db` again"
        ) from e
    except psycopg.OperationalError as e:
        raise connection_failure(settings, e) from e
    except psycopg.Error as e:
        raise DatabaseError(f"cannot create table {table}: {error_line(e)}") from e


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
        raise DatabaseError(f"cannot drop chunks of {table}: {error_line(e)}") from e
