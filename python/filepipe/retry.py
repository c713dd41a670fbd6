"""Telling passing faults from permanent ones, and waiting them out with backoff."""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import redis
from psycopg_pool import PoolTimeout
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ClusterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from .errors import GaveUp, TransientError
from .redaction import error_line

log = logging.getLogger("filepipe")

T = TypeVar("T")

# SQLSTATE classes that mean "the server or the link is in trouble", not "this data is bad":
# 08 connection exception, 53 insufficient resources, 57 operator intervention
# (shutdown, crash, cannot connect now), 58 system error; plus serialization failures and
# deadlocks, which succeed when retried.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_SQLSTATES = ("40001", "40P01", "55P03")
# A statement cancelled by the statement timeout (or by an operator) is not passing: the
# same statement runs out of time again. The loader splits the batch instead.
QUERY_CANCELED = "57014"
_REDIS_TRANSIENT_REPLIES = ("LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "BUSY ")
# Replies of a Redis that answers but takes no write for now, and how the log says it.
_REDIS_REFUSALS = {"OOM": "is full", "READONLY": "is read-only", "MISCONF": "refuses writes"}


class Abandoned(Exception):
    """Retrying was given up because the consumer is stopping; the work stays unacknowledged."""


class TlsMismatch(redis.ConnectionError):
    """The server at a `redis://` address speaks only TLS (it cuts every plain connection
    off), or the one at a `rediss://` address does not speak TLS (it never answers the
    handshake): no retry changes that, the URL's scheme must."""


# What PostgreSQL says, refusing a connection, when it will take it a little later.
_PG_PASSING_REFUSALS = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "sorry, too many clients already",
    "remaining connection slots are reserved",
)
# What libpq says when the client's own settings can never connect (TLS, a password).
_PG_CLIENT_REFUSALS = ("does not support SSL", "certificate", "no password supplied", "sslmode")


def permanent_pg(e: BaseException) -> bool:
    """Whether PostgreSQL refused a connection for a reason that waiting will not fix: a
    password, a role or database that does not exist, pg_hba.conf, TLS required or refused
    (libpq gives such errors no SQLSTATE: the server's FATAL message tells)."""
    if not isinstance(e, psycopg.OperationalError):
        return False
    text = str(e)
    if "FATAL:" in text:
        return not any(p in text for p in _PG_PASSING_REFUSALS)
    return any(p in text for p in _PG_CLIENT_REFUSALS)


def permanent_redis(e: BaseException) -> bool:
    """Whether Redis refused for a reason that waiting will not fix: a password or user it
    does not know, a command its ACL denies, a TLS handshake that fails, a plain connection
    to a server that speaks only TLS."""
    if isinstance(
        e, (AuthenticationError, AuthenticationWrongNumberOfArgsError, NoPermissionError, TlsMismatch)
    ):
        return True
    if isinstance(e, redis.ResponseError) and str(e).startswith(("WRONGPASS", "NOAUTH", "NOPERM")):
        return True
    return tls_failed(e)


def tls_failed(e: BaseException) -> bool:
    """Whether a Redis connection failed in its TLS handshake for a reason a retry does not
    change (a certificate not trusted, a protocol version refused), not a connection cut
    off in the middle of it."""
    cause = e.__cause__ or e.__context__
    return (
        isinstance(e, redis.ConnectionError)
        and isinstance(cause, ssl.SSLError)
        and not isinstance(
            cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
        )
    )


def is_transient_pg(e: BaseException) -> bool:
    """Whether a PostgreSQL error is worth retrying the same batch for."""
    if isinstance(e, TransientError):
        return True
    if permanent_pg(e):
        return False
    if isinstance(e, (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError)):
        state = getattr(getattr(e, "diag", None), "sqlstate", None) or getattr(e, "sqlstate", None)
        if state is None:
            return True
    elif isinstance(e, psycopg.Error):
        state = e.sqlstate or ""
    else:
        return isinstance(e, (ConnectionError, TimeoutError))
    if state == QUERY_CANCELED:
        return False
    return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES


def redis_refusal(e: BaseException) -> str | None:
    """The reply code when Redis answered but refused a write for now: `OOM` (full, at
    `maxmemory`), `READONLY` (a replica, as after a failover), `MISCONF` (its last snapshot
    failed and it stops writes until one succeeds). None for any other error."""
    if isinstance(e, OutOfMemoryError):
        return "OOM"
    if isinstance(e, ReadOnlyError):
        return "READONLY"
    if isinstance(e, redis.ResponseError):
        code = str(e).split(" ", 1)[0]
        if code in _REDIS_REFUSALS:  # redis-py leaves the code in when it has no class for it
            return code
    return None


def redis_reply(e: BaseException) -> str:
    """The first line of a Redis error as the server sent it: redis-py drops the code of
    the replies it has a class for (`OOM`, `READONLY`), which is what names them."""
    text = error_line(e)
    code = redis_refusal(e)
    return text if code is None or text.startswith(code) else f"{code} {text}"


def is_transient_redis(e: BaseException) -> bool:
    """Whether a Redis error is a connection problem, a server that is not ready yet (on
    a cluster too: a master down, a slot not served or migrating), or a server that
    refuses writes for now (full, a read-only replica, a failed snapshot): each passes
    without anything the consumer could do but wait. Not a refused password or user, nor
    a failed TLS handshake (`permanent_redis`)."""
    if permanent_redis(e):
        return False
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        return True
    if redis_refusal(e) is not None:
        return True
    if isinstance(e, (ClusterDownError, TryAgainError, SlotNotCoveredError)):
        return True
    if isinstance(e, RedisClusterException) and "cannot be connected" in str(e):
        return True  # no node answered the request for the cluster's layout
    if isinstance(e, redis.ResponseError):
        return str(e).startswith(_REDIS_TRANSIENT_REPLIES)
    return isinstance(e, (ConnectionError, TimeoutError))


class Outage:
    """One service's outage as the log and the heartbeat tell it, shared by the backoffs of
    the threads that use the service (the reader's, the acknowledger's): the first to fail
    logs the warning, the last to recover logs the recovery, so one outage is one pair of
    lines however many threads wait it out."""

    def __init__(
        self,
        service: str,
        on_error: Callable[[str], None] | None = None,
        *,
        state: str = "unreachable",
        recovery: str = "is back",
    ) -> None:
        """`on_error` hears the error when the outage starts (or its message changes) and ""
        when it ends. `state` and `recovery` word the lines for a wait that is not an outage
        ("PostgreSQL table t refuses rows (…)" … "PostgreSQL table t accepts rows again after
        8.1 s")."""
        self.service = service
        self.on_error = on_error
        self.state = state
        self.recovery = recovery
        self.since: float | None = None
        self.last_message = ""
        self.refusing_writes = False  # the outage is Redis refusing writes (OOM, READONLY, MISCONF)
        self._failing: set[int] = set()
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def failed(self, who: int, e: BaseException, delay: float) -> None:
        """Backoff `who` failed with `e` and waits `delay` seconds."""
        code = redis_refusal(e)
        message = redis_reply(e) if code else error_line(e)
        state = _REDIS_REFUSALS[code] if code else self.state
        with self._lock:
            self._failing.add(who)
            self.refusing_writes = code is not None
            if self.since is None:
                # One warning per outage; a new error during it (the server going from
                # "shutting down" to "refused", a pool timing out) is logged once, at INFO, and
                # only the first few, so errors that alternate or vary cannot flood the log.
                self.since = time.monotonic()
                self._seen = {message}
                log.warning("%s %s (%s), retrying in %.1f s", self.service, state, message, delay)
            elif message not in self._seen and len(self._seen) < 4:
                self._seen.add(message)
                log.info(
                    "%s still %s (%s), retrying in %.1f s",
                    self.service,
                    state.removeprefix("is "),
                    message,
                    delay,
                )
            else:
                log.debug("%s still %s, retrying in %.1f s", self.service, state.removeprefix("is "), delay)
            changed = message != self.last_message
            self.last_message = message
        if changed and self.on_error is not None:
            self.on_error(f"{self.service} {state}: {message}")

    def recovered(self, who: int, *, wrote: bool = True) -> None:
        """Backoff `who` succeeded; the outage ends when no backoff is failing any more. A
        read that got through (`wrote` False) says nothing of a Redis refusing writes: it
        still answers reads."""
        with self._lock:
            if who not in self._failing or (self.refusing_writes and not wrote):
                return
            self._failing.discard(who)
            if self._failing or self.since is None:
                return
            log.warning("%s %s after %.1f s", self.service, self.recovery, time.monotonic() - self.since)
            self.since = None
            self.last_message = ""
            self.refusing_writes = False
        if self.on_error is not None:
            self.on_error("")  # the outage is over: no current error


class Backoff:
    """Exponential backoff with full jitter, capped; logs one line per change of state
    ("PostgreSQL unreachable, retrying in 2.0 s" ... "PostgreSQL is back after 12.3 s")."""

    def __init__(
        self,
        service: str,
        *,
        base: float = 0.25,
        cap: float = 5.0,
        stop: threading.Event | None = None,
        on_error: Callable[[str], None] | None = None,
        outage: Outage | None = None,
        on_wait: Callable[[], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
        give_up_after: float | None = None,
    ) -> None:
        """`stop`, once set, cuts the current wait short and makes `call` give up
        (raising Abandoned) instead of retrying again. `on_error` hears the error when an
        outage starts (or its message changes) and "" when it ends. Backoffs given one
        `outage` (and then its `on_error`) log and report it together. `on_wait` is called
        after every wait (to keep a heartbeat fresh through a long one); `on_retry` with the
        service's name at every failure (a metric). With `give_up_after`, a failure that
        many seconds into an outage raises GaveUp instead of waiting again."""
        self.service = service
        self.give_up_after = give_up_after
        self.on_retry = on_retry
        self.on_wait = on_wait
        self.base = base
        self.cap = cap
        self.stop = stop
        self.outage = outage or Outage(service, on_error)
        self.attempt = 0
        self.down_since: float | None = None
        # Several threads may share one backoff (one loader per pooled connection).
        self._lock = threading.Lock()

    @property
    def last_message(self) -> str:
        return self.outage.last_message

    def record(self, e: BaseException) -> float:
        """Records a failure and logs it if it is news; returns how long to wait before
        the next attempt (without waiting)."""
        if self.on_retry is not None:
            self.on_retry(self.service)
        with self._lock:
            self.attempt += 1
            delay = random.uniform(0, min(self.cap, self.base * 2 ** min(self.attempt, 20)))
            delay = max(delay, min(self.base, self.cap))
            if self.down_since is None:
                self.down_since = time.monotonic()
        self.outage.failed(id(self), e, delay)
        return delay

    def failed(self, e: BaseException) -> float:
        """Records a failure, logs it if it is news, sleeps, and returns the delay slept."""
        delay = self.record(e)
        down = time.monotonic() - (self.down_since or time.monotonic())
        if self.give_up_after is not None and down >= self.give_up_after:
            raise GaveUp(
                f"{self.service} {self.outage.state} ({self.last_message}): gave up after "
                f"{down:.0f} s, the longest --drain waits (FILEPIPE_DRAIN_TIMEOUT="
                f"{self.give_up_after:g})"
            ) from e
        if self.give_up_after is not None:
            delay = min(delay, self.give_up_after - down)  # the last try comes at the deadline
        if self.stop is not None:
            self.stop.wait(delay)
        else:
            time.sleep(delay)
        if self.on_wait is not None:
            self.on_wait()
        return delay

    def succeeded(self, started: float | None = None, *, wrote: bool = True) -> None:
        """Records a success; logs the recovery if there was an outage. A success of an
        attempt `started` (monotonic) before the outage was noticed says nothing about
        now (another thread's load that got through just before the server went away):
        it does not end the outage; nor does a read (`wrote` False) while Redis refuses
        writes."""
        with self._lock:
            if self.down_since is not None and started is not None and started < self.down_since:
                return
            if not wrote and self.outage.refusing_writes:
                return
            self.attempt = 0
            self.down_since = None
        self.outage.recovered(id(self), wrote=wrote)

    def call(
        self, fn: Callable[[], T], transient: Callable[[BaseException], bool], *, writes: bool = True
    ) -> T:
        """Calls `fn` until it succeeds or raises a non-transient error (or `stop` is set:
        Abandoned). `writes` False: `fn` only reads, so its success does not end a refusal
        of writes."""
        while True:
            started = time.monotonic()
            try:
                result = fn()
            except Exception as e:
                if not transient(e):
                    self.succeeded(started, wrote=writes)  # the service answered, if only to refuse
                    raise
                self.failed(e)
                if self.stop is not None and self.stop.is_set():
                    raise Abandoned(f"{self.service}: gave up retrying ({error_line(e)})") from e
                continue
            self.succeeded(started, wrote=writes)
            return result


# How PostgreSQL (or libpq) says that it will never take a connection with these settings:
# a wrong password or none, an unknown database or role, a client its pg_hba.conf does not
# let in, a role without LOGIN, TLS it requires or cannot do, a certificate it rejects, a
# port or sslmode libpq cannot use. Anything else at connect (refused, timed out, a name
# that does not resolve, starting up, too many clients) passes.
_PG_LOGIN_REFUSALS = (
    "password authentication failed",
    "authentication failed for user",
    "no password supplied",
    "does not exist",  # database "…" / role "…"
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "permission denied for database",
    "server does not support ssl",
    "ssl off",  # pg_hba.conf: hostssl only
    "certificate verify failed",
    "invalid port number",
    "invalid sslmode value",
)
# Redis's answers to AUTH and SELECT that no retry changes.
_REDIS_LOGIN_REFUSALS = ("WRONGPASS", "NOAUTH", "invalid password", "invalid username-password", "DB index")


def pg_login_refusal(e: BaseException) -> str | None:
    """The server's reason, in its own words, when PostgreSQL refused a connection for good
    (the settings must change: see `_PG_LOGIN_REFUSALS`); None for any other error."""
    if not isinstance(e, psycopg.OperationalError):
        return None
    text = error_line(e)
    if not any(phrase in text.lower() for phrase in _PG_LOGIN_REFUSALS):
        return None
    return text.split("FATAL:", 1)[1].strip() if "FATAL:" in text else text


def redis_login_refusal(e: BaseException) -> str | None:
    """Redis's reason when it refused a connection for good (a wrong user or password,
    none given where one is needed, a database number it does not have, TLS where the
    server has none or the other way round, a TLS handshake that fails); None for any
    other error."""
    if not isinstance(e, (redis.AuthenticationError, redis.ResponseError, redis.ConnectionError)):
        return None
    text = error_line(e)
    if isinstance(e, (redis.AuthenticationError, TlsMismatch)) or tls_failed(e):
        return text
    refused = isinstance(e, redis.ResponseError) and text.startswith(_REDIS_LOGIN_REFUSALS)
    return text if refused else None
