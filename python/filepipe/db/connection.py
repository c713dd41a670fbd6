"""Connections: the libpq settings every filepipe connection gets, the pool and how it
configures (the staging table) and checks its connections, and the watchdog that cuts a
connection a silent network would leave waiting."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg_pool import ConnectionPool

from ..config import Settings, mask_url
from ..errors import ConfigError, DatabaseError
from ..redaction import error_line
from ..retry import pg_login_refusal
from .columns import create_staging

log = logging.getLogger(__name__)


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


class EarlyConnection:
    """A connection (`connect(settings, **extra)`) opened in a thread from the moment this is
    made, for the caller who needs it later: on a slow network its round trips (TLS, the
    login) overlap the caller's other work. `take()` hands it over, or raises what opening
    it raised, as `connect` would have; a second `take()` connects anew."""

    def __init__(self, settings: Settings, **extra: Any) -> None:
        self.settings = settings
        self.extra = extra
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._error: BaseException | None = None
        self._taken = False
        self._closed = False
        threading.Thread(target=self._open, name="filepipe-connect", daemon=True).start()

    def _open(self) -> None:
        try:
            conn = connect(self.settings, **self.extra)
        except BaseException as e:  # handed to take(), in the caller's thread
            self._error = e
        else:
            with self._lock:
                if self._closed:  # before it was taken
                    conn.close()
                else:
                    self._conn = conn
        finally:
            self._done.set()

    def take(self) -> psycopg.Connection[Any]:
        """The connection, once it is open (or the error opening it raised); afterwards, a
        new one."""
        with self._lock:
            first = not self._taken and not self._closed
            self._taken = True
        if not first:
            return connect(self.settings, **self.extra)
        self._done.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert self._conn is not None
        conn, self._conn = self._conn, None
        return conn

    def close(self) -> None:
        """Closes the connection if it was never taken (now, or once it opens)."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def check_conninfo(settings: Settings) -> None:
    """Raises ConfigError if PG_URI cannot be parsed (a broken percent-escape, an
    unknown option): no connection attempt could ever succeed."""
    try:
        psycopg.conninfo.conninfo_to_dict(settings.pg_uri)
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"PG_URI cannot be used: {error_line(e)}") from e


def connection_failure(settings: Settings, e: psycopg.OperationalError) -> DatabaseError | ConfigError:
    """What a command says when PostgreSQL cannot be used: a ConfigError (exit 2) with the
    server's own reason when it refuses these settings for good (`retry.pg_login_refusal`),
    else a DatabaseError saying it cannot be reached."""
    where = mask_url(settings.pg_uri)
    refusal = pg_login_refusal(e)
    if refusal is not None:
        return ConfigError(f"PostgreSQL at {where} refused the connection: {refusal} (check PG_URI)")
    return DatabaseError(f"cannot reach PostgreSQL at {where}: {error_line(e)}")


# SQLSTATEs with which a server refuses a write whatever the data: a read-only
# transaction (a read-only database or a hot standby) and a missing privilege.
READ_ONLY = "25006"
NO_PRIVILEGE = "42501"

# The pooled connections that have their staging table.
staged: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


def configure_connection(conn: psycopg.Connection[Any]) -> None:
    """Gives a new connection its staging table, as the pool does with each of its
    connections (not behind PgBouncer, where a merge creates its own)."""
    try:
        conn.execute(create_staging())
    except psycopg.Error as e:
        # A read-only server (a hot standby after a failover) or a role without the TEMP
        # privilege: the connection is still handed out, so that the load reports the
        # server's own refusal and the consumer waits it out, rather than the pool
        # failing to connect with no reason given. The merge creates the staging table
        # when it can.
        if e.sqlstate not in (READ_ONLY, NO_PRIVILEGE):
            raise
        return
    staged.add(conn)


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
