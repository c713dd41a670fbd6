"""`filepipe status`: the whole pipeline at a glance (the guide's `python status.py`).

Redis says what is waiting (stream length, group lag, pending entries, each
consumer's pending and idle time, dead letters by reason); the consumers' heartbeats
say who is alive, where, how fast and what went wrong last; the events table says
what arrived (rows in the last minute and hour, throughput). From those, one health
line and an exit code: 0 healthy, 1 degraded or unreachable.

The reading, the model and the judgement are `filepipe.observe`'s (the dashboard and
`/metrics` show the same); this module collects one snapshot (or one per refresh with
`--watch`) and writes it for a terminal or as JSON.
"""

import contextlib
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import psycopg
import redis
from redis.exceptions import RedisClusterException

from . import db, stream
from .config import Settings, mask_url
from .db.connection import connection_failure
from .errors import TransientError
from .observe.health import assess
from .observe.model import Status, StreamState
from .observe.rates import LAST_MINUTE, SINCE_START
from .observe.retained import RetentionState, read_retention
from .observe.streams import StreamReader, dead_stream_name
from .observe.table import TableReader
from .observe.text import clock, duration, entries, plural, size
from .redaction import error_line, printable

__all__ = ["Collector", "Status", "collect_status", "read_retention", "render", "watch"]

STATEMENT_TIMEOUT_MS = 15_000


class Collector:
    """Reads the state of one stream (all its partitions), group and table; keeps its
    connections, and what it has counted of the dead letters, between refreshes
    (`--watch`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = stream.connect(settings, socket_timeout=max(10.0, settings.connect_timeout_s * 2))
        self.streams = StreamReader(self.redis, settings)
        self.table = TableReader(settings)
        self.pg: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        self.redis.close()
        self._drop_pg()

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
            st.redis = self.streams.read()
            st.retention = read_retention(self.redis, s)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # What every command says: refused for good (the setting to check), or unreachable.
            st.redis_error = str(stream.failure(s, e))
            st.unreachable.append("redis")
        except (TransientError, RedisClusterException) as e:
            st.redis_error = f"cannot reach Redis at {st.redis_url}: {error_line(e)}"
            st.unreachable.append("redis")
        except redis.RedisError as e:
            st.redis_error = f"Redis refused a status query: {error_line(e)}"
        try:
            st.events = self.table.read(self._connection())
        except psycopg.OperationalError as e:
            st.pg_error = str(connection_failure(s, e))
            st.unreachable.append("postgres")
            self._drop_pg()
        except TransientError as e:
            st.pg_error = f"cannot reach PostgreSQL at {st.pg_uri}: {error_line(e)}"
            st.unreachable.append("postgres")
            self._drop_pg()
        except psycopg.Error as e:
            st.pg_error = f"PostgreSQL refused a status query: {error_line(e)}"
            self._drop_pg()
        assess(st, s)
        return st

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


# -- output -----------------------------------------------------------------------------------


def _line(label: str, value: str, detail: str = "") -> str:
    text = f"  {label + ':':<24}{value:<18}"
    return (text + "  " + detail).rstrip() if detail else text.rstrip()


def render(st: Status, previous: Status | None = None, elapsed: float | None = None) -> str:
    """The human report; with `previous` (`--watch`), what changed since then."""
    out = [
        f"filepipe status · Redis {st.redis_url} · PostgreSQL {st.pg_uri} · "
        f"{clock(datetime.fromisoformat(st.taken_at).timestamp())}",
        "",
    ]
    t = st.redis
    parts = f", {st.partitions} {plural(st.partitions, 'partition')}" if st.partitions else ""
    out.append(f"STREAM {st.stream_name} (group {st.group}{parts})")
    if t is None:
        out.append(f"  ✗ {st.redis_error}")
    elif not t.exists:
        out.append("  (no stream yet: nothing has been produced)")
    else:
        age = f"last entry {duration(t.last_entry_age_s)} ago" if t.last_entry_age_s is not None else ""
        out.append(_line("Stream length", entries(t.length), age))
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
            waiting = f"oldest waiting {duration(t.waiting_age_s)}" if t.waiting_age_s is not None else ""
            out.append(_line("Group lag", lag, waiting))
            op = t.oldest_pending
            detail = ""
            if op is not None:
                detail = (
                    f"oldest from {duration(op.age_s)} ago, idle {duration(op.idle_s)}, "
                    f"delivered {op.deliveries}x, consumer {op.consumer}"
                )
            out.append(_line("Pending", f"{t.pending:,} unacknowledged", detail))
        g = t.group_recreated
        if g is not None:
            on = f" on {g.stream}" if t.partitions else ""
            out.append(
                _line(
                    "Group recreated",
                    f"{duration(g.age_s)} ago",
                    f"by {g.consumer}{on}: it was missing ({g.reason}); read again from the start",
                )
            )
        cap = "≥" if t.arrivals_capped else ""
        out.append(_line("Arrived (last minute)", f"{cap}{t.arrivals_last_minute:,}"))
        if previous is not None and previous.redis is not None and elapsed:
            out.append(_trend(t, previous.redis, elapsed))
    if t is not None and st.retention is not None:
        out += render_retention(st.retention, stream_exists=t.exists)
    out.append("")

    if t is not None and t.group_exists:
        departed = f"; {t.departed} departed: nothing pending, no heartbeat" if t.departed else ""
        out.append(f"CONSUMERS ({len(t.consumers)}{departed})")
        if not t.consumers:
            out.append("  (none running)" if t.departed else "  (none has read yet)")
        else:
            name_w = max(8, *(len(c.name) for c in t.consumers))
            host_w = max(4, *(len(c.host or "-") for c in t.consumers))
            rate_head = f"RATE ({SINCE_START.name})"
            head = (
                f"  {'NAME':<{name_w}}  {'HOST':<{host_w}}  {'STATE':<8}  {'PENDING':>7}  {'IDLE':>8}  "
                f"{rate_head:>19}"
            )
            out.append(head + "  LAST ERROR")
            for c in t.consumers:
                rate = f"{c.rate:,.2f} files/sec" if c.rate is not None else "-"
                note = "(no heartbeat)" if c.heartbeat_age_s is None else c.last_error or "-"
                flag = "  ⚠ silent" if c.silent else ""
                out.append(
                    f"  {c.name:<{name_w}}  {c.host or '-':<{host_w}}  {c.state:<8}  {c.pending:>7,}  "
                    f"{duration(c.idle_s):>8}  {rate:>19}  {note}{flag}"
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
            out.append(
                _line(
                    "Kept",
                    cap,
                    f"DEAD_LETTER_RETENTION={kept.dead_letter_retention}, "
                    f"{size(kept.dead_memory_bytes)} in Redis",
                )
            )
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
            _line(
                "Last minute",
                f"{e.rows_last_minute:,}",
                f"Throughput: {e.throughput:,.2f} files/sec ({LAST_MINUTE.name})",
            )
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
    age = f"oldest entry from {duration(max(oldest))} ago" if oldest else ""
    out = []
    if stream_exists:
        out = [_line("Memory", size(kept.memory_bytes), age), _line("Kept", kept.reason())]
    m = kept.memory
    if m is not None:
        node = f" on {m.node}" if m.node else ""
        if m.max_bytes:
            limit = f"of {size(m.max_bytes)} maxmemory ({m.share or 0:.0%}, {m.policy}){node}"
        else:
            limit = f"(no maxmemory){node}"
        out.append(_line("Redis memory", size(m.used_bytes), limit))
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
