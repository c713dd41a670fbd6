"""Telling passing faults from permanent ones, and waiting them out with backoff."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import redis
from psycopg_pool import PoolTimeout
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError, TryAgainError

from .errors import TransientError
from .redaction import error_line

log = logging.getLogger("filepipe")

T = TypeVar("T")

# SQLSTATE classes that mean "the server or the link is in trouble", not "this data is bad":
# 08 connection exception, 53 insufficient resources, 57 operator intervention
# (shutdown, statement timeout as query_canceled 57014), 58 system error; plus
# serialization failures and deadlocks, which succeed when retried.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_SQLSTATES = ("40001", "40P01", "55P03")
_REDIS_TRANSIENT_REPLIES = ("LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "BUSY ")


class Abandoned(Exception):
    """Retrying was given up because the consumer is stopping; the work stays unacknowledged."""


def is_transient_pg(e: BaseException) -> bool:
    """Whether a PostgreSQL error is worth retrying the same batch for."""
    if isinstance(e, TransientError):
        return True
    if isinstance(e, (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError)):
        state = getattr(getattr(e, "diag", None), "sqlstate", None) or getattr(e, "sqlstate", None)
        return state is None or state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
    if isinstance(e, psycopg.Error):
        state = e.sqlstate or ""
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
    return isinstance(e, (ConnectionError, TimeoutError))


def is_transient_redis(e: BaseException) -> bool:
    """Whether a Redis error is a connection problem or a server that is not ready yet
    (on a cluster too: a master down, a slot not served or migrating)."""
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        return True
    if isinstance(e, (ClusterDownError, TryAgainError, SlotNotCoveredError)):
        return True
    if isinstance(e, RedisClusterException) and "cannot be connected" in str(e):
        return True  # no node answered the request for the cluster's layout
    if isinstance(e, redis.ResponseError):
        return str(e).startswith(_REDIS_TRANSIENT_REPLIES)
    return isinstance(e, (ConnectionError, TimeoutError))


def is_transient(e: BaseException) -> bool:
    """Whether any service error is passing."""
    return isinstance(e, TransientError) or is_transient_pg(e) or is_transient_redis(e)


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
    ) -> None:
        """`stop`, once set, cuts the current wait short and makes `call` give up
        (raising Abandoned) instead of retrying again. `on_error` hears the error when an
        outage starts (or its message changes) and "" when it ends."""
        self.service = service
        self.base = base
        self.cap = cap
        self.stop = stop
        self.on_error = on_error
        self.attempt = 0
        self.down_since: float | None = None
        self.last_message = ""
        self._seen: set[str] = set()
        # Several threads may share one backoff (one loader per pooled connection).
        self._lock = threading.Lock()

    def failed(self, e: BaseException) -> float:
        """Records a failure, logs it if it is news, sleeps, and returns the delay slept."""
        from .metrics import record_retry

        record_retry(self.service)
        self.attempt += 1
        delay = random.uniform(0, min(self.cap, self.base * 2 ** min(self.attempt, 20)))
        delay = max(delay, min(self.base, self.cap))
        message = error_line(e)
        with self._lock:
            if self.down_since is None:
                # One warning per outage; a new error during it (the server going from
                # "shutting down" to "refused", a pool timing out) is logged once, at INFO, and
                # only the first few, so errors that alternate or vary cannot flood the log.
                self.down_since = time.monotonic()
                self._seen = {message}
                log.warning("%s unreachable (%s), retrying in %.1f s", self.service, message, delay)
            elif message not in self._seen and len(self._seen) < 4:
                self._seen.add(message)
                log.info("%s still unreachable (%s), retrying in %.1f s", self.service, message, delay)
            changed = message != self.last_message
            self.last_message = message
        if changed:
            if self.on_error is not None:
                self.on_error(f"{self.service}: {message}")
        else:
            log.debug("%s still unreachable, retrying in %.1f s", self.service, delay)
        if self.stop is not None:
            self.stop.wait(delay)
        else:
            time.sleep(delay)
        return delay

    def succeeded(self, started: float | None = None) -> None:
        """Records a success; logs the recovery if there was an outage. A success of an
        attempt `started` (monotonic) before the outage was noticed says nothing about
        now (another thread's load that got through just before the server went away):
        it does not end the outage."""
        with self._lock:
            if self.down_since is not None and started is not None and started < self.down_since:
                return
            if self.down_since is not None:
                log.warning("%s is back after %.1f s", self.service, time.monotonic() - self.down_since)
                if self.on_error is not None:
                    self.on_error("")  # the outage is over: no current error
            self.attempt = 0
            self.down_since = None
            self.last_message = ""

    def call(self, fn: Callable[[], T], transient: Callable[[BaseException], bool]) -> T:
        """Calls `fn` until it succeeds or raises a non-transient error (or `stop` is set:
        Abandoned)."""
        while True:
            started = time.monotonic()
            try:
                result = fn()
            except Exception as e:
                if not transient(e):
                    raise
                self.failed(e)
                if self.stop is not None and self.stop.is_set():
                    raise Abandoned(f"{self.service}: gave up retrying ({error_line(e)})") from e
                continue
            self.succeeded(started)
            return result
