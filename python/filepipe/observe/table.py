"""The events table as the observers show it: whether it exists, its rows (one rule for
when they are counted and when estimated), what arrived in the last minute and hour,
its kind and TimescaleDB figures (`timescale.FiguresCache`), and the latest events."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from .. import db, timescale
from ..config import Settings
from .model import TableState
from .rates import LAST_MINUTE

LARGE_TABLE_ROWS = 1_000_000  # above this, the row total is PostgreSQL's estimate
HISTORY_MINUTES = 60  # the rate history: files and bytes per minute and consumer
COUNT_SHARE = 50  # a count is repeated no sooner than 50 times what it cost (~2% of the time)
CANCELED_RETRY_S = 300.0  # after a count the statement timeout cut, estimates for this long


class TableReader:
    """Reads the table of `settings` on the connection it is given; keeps its figures
    and its last row count between readings (`min_every`: at most one count and one
    reading of the figures per that many seconds)."""

    def __init__(self, settings: Settings, *, min_every: float = 0.0) -> None:
        self.settings = settings
        self.ident = db.table_ident(settings.table)
        self.figures = timescale.FiguresCache(min_every=min_every)
        self.min_every = min_every
        self._rows: tuple[int, bool] | None = None
        self._next_count = 0.0

    def read(self, conn: psycopg.Connection[Any], *, recent: bool = True) -> TableState:
        """Its state; with `recent`, the rows of the last minute and hour too."""
        out = TableState()
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self.settings.table,)).fetchone()
        out.exists = bool(row and row[0])
        if not out.exists:
            self._rows = None
            return out
        figures = self.figures.get(conn, self.settings.table, history_minutes=HISTORY_MINUTES)
        out.table = figures.to_json()
        out.rows_total, exact = self.count_rows(conn, figures)
        out.rows_estimated = not exact
        out.recent_limited_to_day = not figures.worth_counting(LARGE_TABLE_ROWS)
        if recent:
            out.rows_last_minute, out.rows_last_hour = self._recent(conn, out.recent_limited_to_day)
        return out

    def count_rows(self, conn: psycopg.Connection[Any], figures: timescale.TableFigures) -> tuple[int, bool]:
        """The rows, and whether they were counted: `count(*)` while it is cheap (a small
        table in few chunks, repeated no sooner than COUNT_SHARE times what it cost), the
        catalog's chunk-by-chunk estimate for a large table, one of many chunks, or when
        counting outlasts the statement timeout."""
        estimate = figures.estimated_rows
        if not figures.worth_counting(LARGE_TABLE_ROWS):
            self._rows = (estimate, False)
            return self._rows
        if self._rows is not None and time.monotonic() < self._next_count:
            return self._rows
        started = time.monotonic()
        try:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self.ident)).fetchone()
            self._rows = (int(row[0]) if row else 0, True)
            self._next_count = time.monotonic() + max(
                self.min_every, COUNT_SHARE * (time.monotonic() - started)
            )
        except psycopg.errors.QueryCanceled:
            self._rows = (estimate, False)
            self._next_count = time.monotonic() + CANCELED_RETRY_S
        return self._rows

    def _recent(self, conn: psycopg.Connection[Any], limited_to_day: bool) -> tuple[int, int]:
        # processed_at has no index: on a large table, look only at the last day's events
        # (event_time is indexed, and a hypertable skips older chunks).
        day = sql.SQL(" AND event_time >= now() - interval '1 day'") if limited_to_day else sql.SQL("")
        row = conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE processed_at >= now() - make_interval(secs => %s)), count(*) "
                "FROM {} WHERE processed_at >= now() - interval '1 hour'{}"
            ).format(self.ident, day),
            (LAST_MINUTE.seconds,),
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def latest(self, conn: psycopg.Connection[Any], n: int) -> list[dict[str, Any]]:
        """The latest `n` events by `event_time`: among the last day's first (a hypertable's
        older chunks are not even opened), then the whole table (of a hypertable with many
        chunks, the newest chunks only)."""
        query = sql.SQL(
            "SELECT stream_id, filename, size_bytes, content_type, consumer, storage, event_time, "
            "processed_at FROM {} {} ORDER BY event_time DESC, stream_id DESC LIMIT %s"
        )
        day = sql.SQL("WHERE event_time >= now() - interval '24 hours'")
        rows = conn.execute(query.format(self.ident, day), (n,)).fetchall()
        if len(rows) < n:
            facts = self.figures.get(conn, self.settings.table, history_minutes=HISTORY_MINUTES).facts
            since: sql.Composable = sql.SQL("")
            interval = facts.chunk_interval
            if facts.chunks > timescale.MAX_COUNTED_CHUNKS and facts.newest_chunk and interval:
                start = facts.newest_chunk - 2 * interval
                since = sql.SQL("WHERE event_time >= {}").format(sql.Literal(start))
            rows = conn.execute(query.format(self.ident, since), (n,)).fetchall()
        return [
            {
                "stream_id": row[0],
                "filename": row[1],
                "size_bytes": row[2],
                "content_type": row[3],
                "consumer": row[4],
                "storage": row[5],
                "event_time": _iso(row[6]),
                "processed_at": _iso(row[7]),
            }
            for row in rows
        ]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
