"""One definition of health: when a consumer is live, dead or departed, when the
pipeline is degraded, and when a service is ready (`/readyz`, of the consumer's
metrics server and of the dashboard alike).

A consumer's state follows from two facts Redis keeps, nothing else:

* its heartbeat key exists (the consumer rewrites it every HEARTBEAT_INTERVAL_S with a
  TTL of HEARTBEAT_TTL_S, and deletes it when it stops): **live**, or **waiting** when it
  reports an outage it waits out (`last_error`);
* no heartbeat: **dead** while the group still holds entries delivered to it (they
  go to another consumer once idle for CLAIM_IDLE_MS: from then on it is *silent*, a
  problem), **departed** when it holds none (it is not listed; the housekeeper removes
  it from the group).

An observer that cannot reach Redis shows the consumers it saw last as **stale**.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .. import constants as c
from ..config import Settings, Window
from ..redaction import error_line
from .model import ConsumerState, Status
from .retained import RetentionState, read_memory
from .text import duration, entries, size

CONSUMER_STATES = ("live", "waiting", "stale", "dead", "departed")
LIVE = ("live", "waiting")


def consumer_state(state: ConsumerState) -> str:
    """live | waiting | dead | departed, from its heartbeat and pending entries."""
    if state.heartbeat_age_s is not None:
        return "waiting" if state.last_error else "live"
    return "dead" if state.pending else "departed"


def silent(state: ConsumerState, claim_idle_s: float) -> bool:
    """A dead consumer whose entries have waited CLAIM_IDLE_MS: another may take them,
    and until one does, they wait."""
    return state.state == "dead" and state.idle_s >= claim_idle_s


# -- the pipeline -------------------------------------------------------------------------


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
            c.silent = silent(c, silent_after)
            if c.silent:
                problems.append(
                    f"consumer {c.name} silent for {duration(c.idle_s)} with {c.pending} pending "
                    f"entr{'y' if c.pending == 1 else 'ies'}"
                )
        if t.groups_missing:
            where = ", ".join(t.groups_missing[:3]) + (" …" if len(t.groups_missing) > 3 else "")
            problems.append(
                f"consumer group {st.group} does not exist on {where}: no consumer has read it "
                f"({entries(t.length)})"
            )
        lag = t.lag or 0
        if lag > 0:
            live = [c for c in t.consumers if c.state in LIVE or c.idle_s < silent_after]
            processed = None if e is None or not e.exists else e.rows_last_minute + t.dead_last_minute
            growth = None if processed is None else t.arrivals_last_minute - processed
            if (
                growth is not None
                and growth > max(10, 0.1 * t.arrivals_last_minute)
                and not t.arrivals_capped
            ):
                problems.append(
                    f"lag growing: {entries(lag)} not yet delivered; {t.arrivals_last_minute:,} arrived and "
                    f"{processed:,} were processed in the last minute"
                )
            elif not live and (t.waiting_age_s or 0) >= silent_after:
                problems.append(
                    f"no live consumer: {entries(lag)} waiting for {duration(t.waiting_age_s or 0)}"
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
    and dead-letter streams above DEAD_LETTER_WARN_SHARE of their cap: of its count, or
    of its age by the oldest dead letter."""
    if kept is None:
        return []
    problems = []
    m = kept.memory
    if m is not None and m.share is not None and m.share >= c.MEMORY_WARN_SHARE:
        node = f" on {m.node}" if m.node else ""
        if kept.held is not None:
            why = f"the stream keeps {entries(kept.length)} ({size(kept.memory_bytes)}): {kept.reason()}"
        else:
            why = "the stream keeps nothing: other keys use the memory"
        problems.append(
            f"Redis memory at {m.share:.0%} of maxmemory ({size(m.used_bytes)} of {size(m.max_bytes)}"
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
    if kept.dead_age_s:
        limit = Window(age_s=kept.dead_age_s).age_text
        for k in kept.streams:
            age = k.dead_oldest_age_s
            if age is not None and age >= c.DEAD_LETTER_WARN_SHARE * kept.dead_age_s:
                problems.append(
                    f"dead letters near their age: the oldest in {k.stream}{c.DEAD_LETTER_SUFFIX} is "
                    f"{duration(age)} old, {int(100 * age / kept.dead_age_s)}% of DEAD_LETTER_RETENTION="
                    f"{kept.dead_letter_retention} (those older than {limit} are dropped; "
                    "replay or purge them with `filepipe dlq`)"
                )
    return problems


# -- readiness ----------------------------------------------------------------------------


def readiness(checks: dict[str, str | None]) -> tuple[bool, dict[str, Any]]:
    """Ready when every check passed (None); the body `/readyz` answers with."""
    ready = all(v is None for v in checks.values())
    return ready, {"ready": ready, "checks": {k: v or "ok" for k, v in checks.items()}}


class ServiceProbe:
    """Checks that Redis answers and takes writes (not full: maxmemory reached under
    `noeviction`; not a read-only replica; no failed snapshot stopping writes), and that
    PostgreSQL answers and has the events table; each on its own
    long-lived connection (never the consumer's), with short timeouts. Results are cached
    for `ttl` seconds so frequent probes cost nothing."""

    def __init__(self, settings: Settings, *, timeout: float = 2.0, ttl: float = 1.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.ttl = ttl
        self._lock = threading.Lock()
        self._redis: Any = None
        self._pg: Any = None
        self._checked = 0.0
        self._result: dict[str, str | None] = {}

    def redis(self) -> Any:
        """The probe's Redis client (created on first use)."""
        if self._redis is None:
            from .. import stream

            self._redis = stream.connect(self.settings, socket_timeout=self.timeout)
        return self._redis

    def _check_redis(self) -> str | None:
        from ..retry import redis_refusal
        from .streams import write_refusal

        try:
            r = self.redis()
            try:
                r.ping()
            except Exception as e:
                # A failed snapshot refuses even PING (MISCONF): said as status says it.
                if redis_refusal(e) is None:
                    raise
                return write_refusal(r) or error_line(e)
            m = read_memory(r)
            refusal = write_refusal(r)
        except Exception as e:
            return error_line(e)
        if m.refuses_writes:
            node = f" on {m.node}" if m.node else ""
            return (
                f"Redis is full ({size(m.used_bytes)} of {size(m.max_bytes)} maxmemory, {m.policy}{node}): "
                "it refuses new entries and dead letters"
            )
        return refusal or None

    def _check_pg(self) -> tuple[str | None, str | None]:
        import psycopg

        from ..db import connection_kwargs

        try:
            if self._pg is None or self._pg.closed:
                kwargs = connection_kwargs(self.settings)
                kwargs["connect_timeout"] = max(1, round(self.timeout))
                kwargs["autocommit"] = True
                self._pg = psycopg.connect(self.settings.pg_uri, **kwargs)
            row = self._pg.execute("SELECT to_regclass(%s) IS NOT NULL", (self.settings.table,)).fetchone()
        except Exception as e:
            if self._pg is not None:
                self._pg.close()
                self._pg = None
            return error_line(e), "unknown: PostgreSQL did not answer"
        if not (row and row[0]):
            return None, f"table {self.settings.table} does not exist (run `filepipe init-db`)"
        return None, None

    def check(self) -> dict[str, str | None]:
        """`{"redis": …, "postgresql": …, "table": …}`: None when it passed, else why not."""
        with self._lock:
            now = time.monotonic()
            if not self._result or now - self._checked >= self.ttl:
                pg, table = self._check_pg()
                self._result = {"redis": self._check_redis(), "postgresql": pg, "table": table}
                self._checked = time.monotonic()
            return dict(self._result)

    def close(self) -> None:
        with self._lock:
            if self._redis is not None:
                self._redis.close()
                self._redis = None
            if self._pg is not None:
                self._pg.close()
                self._pg = None
