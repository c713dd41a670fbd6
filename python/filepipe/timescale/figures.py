"""What the observers show of the events table: its rows as the catalog knows them and the
rate history (`table_figures` gathers them with the TimescaleDB facts; `FiguresCache` reads
them again less often the more they cost). Where the continuous aggregate exists, the history
comes from it, and `rate_history_hours` adds the last day hour by hour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg import sql

from ..observe.text import plural
from .facts import TableFacts, read_table
from .policies import DAY_HISTORY_HOURS, ident

# Above this many chunks, observers estimate the rows rather than count them.
MAX_COUNTED_CHUNKS = 100
# The heap bytes of a row, for estimating chunks PostgreSQL has not analyzed yet when no
# analyzed chunk tells (273 measured for the benchmark's synthetic events; 373 with indexes).
ROW_HEAP_BYTES = 280


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
    query = sql.SQL(_RATE_HOURS_QUERY).format(view=ident(facts.rate_view), window=window)
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
        query = sql.SQL(_RATE_VIEW_QUERY).format(view=ident(facts.rate_view), window=window)
        source = "continuous aggregate"
    else:
        query = sql.SQL(_RATE_SQL).format(table=ident(table), window=window)
        source = "table"
    rows = conn.execute(query).fetchall()
    return source, [RateMinute(r[0], str(r[1]), int(r[2]), int(r[3])) for r in rows]


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
            f"{files:,} {plural(files, 'file')}, {size / 1e6:,.1f} MB in the last {self.history_minutes} "
            f"minutes; busiest minute {peak[0].astimezone(timezone.utc):%H:%M} UTC with {peak[1]:,} "
            f"({source})"
        )

    def day_summary(self) -> str | None:
        """The last day in words (totals, the busiest hour); None without the aggregate."""
        if self.history_source != "continuous aggregate":
            return None
        files, size, peak = _totals(self.day_history)
        if peak is None:
            return "no files (from the continuous aggregate)"
        return (
            f"{files:,} {plural(files, 'file')}, {size / 1e6:,.1f} MB; busiest hour "
            f"{peak[0].astimezone(timezone.utc):%H}:00 UTC with {peak[1]:,} (from the continuous aggregate)"
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
