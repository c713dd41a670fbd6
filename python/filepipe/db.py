"""PostgreSQL: the connection pool, the schema, and the per-batch load.

A batch is loaded in one transaction: COPY into a per-connection temporary
staging table, `INSERT … SELECT … ON CONFLICT DO NOTHING` into the events table,
COMMIT. The primary key `(stream_id, event_time)` makes a redelivered entry a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg import sql
from psycopg_pool import ConnectionPool

from . import _native
from . import constants as c
from ._faults import crash_point
from .config import Settings, mask_url
from .errors import ConfigError, DatabaseError, TransientError
from .redaction import error_line

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = tuple(_native.COPY_COLUMNS)

_COLUMN_TYPES = {
    "event_time": "timestamptz NOT NULL",
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


def _configure(conn: psycopg.Connection[Any]) -> None:
    # The staging table lives as long as the connection; ON COMMIT DELETE ROWS
    # empties it at every commit, so no DDL runs per batch.
    conn.execute(
        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
            sql.Identifier(c.STAGING_TABLE), _staging_columns()
        )
    )


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
        configure=None if settings.pgbouncer else _configure,  # PgBouncer: no session state
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


@dataclass(frozen=True)
class SchemaInfo:
    table: str
    hypertable: bool
    timescaledb: bool


def init_db(settings: Settings) -> SchemaInfo:
    """Creates the events table (a TimescaleDB hypertable on `event_time` when the
    extension is available, a plain table with a time index otherwise). Idempotent."""
    table = settings.table
    ident = table_ident(table)
    cols = sql.SQL(",\n  ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(_COLUMN_TYPES[name])) for name in COLUMNS
    )
    create = sql.SQL(
        "CREATE TABLE IF NOT EXISTS {table} (\n  {cols},\n"
        "  processed_at timestamptz NOT NULL DEFAULT now(),\n"
        "  PRIMARY KEY (stream_id, event_time)\n)"
    ).format(table=ident, cols=cols)
    try:
        with connect(settings, autocommit=True) as conn:
            if "." in table:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.split(".")[0]))
                )
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
            ).fetchone() is not None
            if available:
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            conn.execute(create)
            hypertable = False
            if available:
                conn.execute(
                    "SELECT create_hypertable(%s::regclass, 'event_time', "
                    "if_not_exists => TRUE, migrate_data => TRUE)",
                    (table,),
                )
                hypertable = True
            else:
                conn.execute(
                    sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (event_time DESC)").format(
                        _index_name(table, "_event_time_idx"), ident
                    )
                )
            return SchemaInfo(table=table, hypertable=hypertable, timescaledb=available)
    except psycopg.OperationalError as e:
        raise DatabaseError(f"cannot reach PostgreSQL at {mask_url(settings.pg_uri)}: {first_line(e)}") from e
    except psycopg.Error as e:
        raise DatabaseError(f"cannot create table {table}: {first_line(e)}") from e


def is_hypertable(conn: psycopg.Connection[Any], table: str) -> bool:
    """Whether `table` is a TimescaleDB hypertable."""
    try:
        row = conn.execute(
            "SELECT 1 FROM timescaledb_information.hypertables "
            "WHERE format('%%I.%%I', hypertable_schema, hypertable_name)::regclass = %s::regclass",
            (table,),
        ).fetchone()
    except psycopg.Error:
        conn.rollback()
        return False
    return row is not None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, passwords scrubbed (`redaction.error_line`)."""
    return error_line(e)


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
        fmt = sql.SQL("BINARY") if self.binary else sql.SQL("TEXT")
        self.copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(staging, col_list, fmt)
        self.direct_copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(ident, col_list, fmt)
        self.insert_sql = sql.SQL(
            "INSERT INTO {} ({cols}) SELECT {cols} FROM {} ON CONFLICT DO NOTHING"
        ).format(ident, staging, cols=col_list)
        # PgBouncer: the staging table lives and dies inside each merge transaction.
        self.staging_sql: sql.Composed | None = None
        if settings.pgbouncer:
            self.staging_sql = sql.SQL(
                "SET LOCAL statement_timeout = {}; CREATE TEMP TABLE {} ({}) ON COMMIT DROP"
            ).format(sql.Literal(settings.statement_timeout_ms), staging, _staging_columns())
        self._merge_only = 0
        self.conflicts = 0

    def load(self, buf: bytes, rows: int, *, direct: bool = False) -> int:
        """COPY one buffer of `rows` rows and COMMIT; returns the rows newly inserted
        (a redelivered entry's row already exists and counts 0).

        A connection that answers nothing for `stall_timeout` seconds (a silent
        network: the server's statement timeout cannot help when its answer never
        arrives) is cut, and the load fails with a TransientError."""
        if direct and self._merge_only <= 0:
            try:
                self._run(buf, direct=True)
                return rows
            except psycopg.errors.UniqueViolation:
                self.conflicts += 1
                self._merge_only = self.CONFLICT_COOLDOWN
                log.debug("batch already partly loaded: merging instead")
        elif direct:
            self._merge_only -= 1
        return self._run(buf, direct=False)

    def _run(self, buf: bytes, *, direct: bool) -> int:
        with self.pool.connection() as conn, Watchdog(conn, self.stall_timeout) as dog:
            try:
                inserted = -1
                if direct:
                    with conn.cursor() as cur, cur.copy(self.direct_copy_sql) as copy:
                        copy.write(buf)
                    crash_point("after_copy")
                else:
                    with conn.transaction(), conn.cursor() as cur:
                        if self.staging_sql is not None:
                            cur.execute(self.staging_sql)
                        with cur.copy(self.copy_sql) as copy:
                            copy.write(buf)
                        crash_point("after_copy")
                        cur.execute(self.insert_sql)
                        inserted = cur.rowcount
                mark_used(conn)
            except psycopg.Error as e:
                if dog.fired:
                    raise TransientError(
                        f"PostgreSQL did not answer within {self.stall_timeout:.0f} s: connection cut"
                    ) from e
                raise
        return max(inserted, 0)


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
