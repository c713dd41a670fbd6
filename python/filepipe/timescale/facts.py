"""The events table as TimescaleDB describes it, from its catalog (no table scan): for status,
the dashboard and the benchmark."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from .extension import FULL_LICENSE, Extension, license_of, read_extension
from .intervals import interval_words
from .policies import rate_view_name

_HYPERTABLE_SQL = """
SELECT d.time_interval, h.num_chunks, h.compression_enabled
FROM timescaledb_information.hypertables h
JOIN timescaledb_information.dimensions d
  ON d.hypertable_schema = h.hypertable_schema AND d.hypertable_name = h.hypertable_name
 AND d.dimension_number = 1
WHERE format('%%I.%%I', h.hypertable_schema, h.hypertable_name)::regclass = %(t)s::regclass
"""
_CHUNKS_SQL = """
SELECT count(*), count(*) FILTER (WHERE is_compressed), min(range_start), max(range_end)
FROM timescaledb_information.chunks
WHERE format('%%I.%%I', hypertable_schema, hypertable_name)::regclass = %(t)s::regclass
"""
_JOBS_SQL = """
SELECT job_id, proc_name, config
FROM timescaledb_information.jobs
WHERE proc_name IN ('policy_retention', 'policy_compression', 'policy_refresh_continuous_aggregate')
  AND format('%%I.%%I', hypertable_schema, hypertable_name)::regclass IN (%(t)s::regclass, %(v)s::regclass)
"""
_RATE_VIEW_SQL = """
SELECT 1 FROM timescaledb_information.continuous_aggregates
WHERE format('%%I.%%I', view_schema, view_name)::regclass = %(v)s::regclass
"""


@dataclass
class TableFacts:
    """The events table's TimescaleDB figures, for status, the dashboard and the benchmark."""

    extension: Extension
    license: str = ""  # apache | timescale; "" where the extension is not in this database
    hypertable: bool = False
    chunk_interval_s: float | None = None
    chunks: int = 0
    compressed_chunks: int = 0
    oldest_chunk: datetime | None = None  # where the oldest chunk's range starts
    newest_chunk: datetime | None = None  # where the newest chunk's range ends
    compression: bool = False  # compression enabled on the hypertable
    retention: str = ""  # TimescaleDB's retention policy: drop_after ("90 days"), "" when none
    compress_after: str = ""  # TimescaleDB's compression policy: compress_after, "" when none
    rate_view: str = ""  # the continuous aggregate of the rate history, "" when none

    @property
    def full_edition(self) -> bool:
        return self.license == FULL_LICENSE

    @property
    def chunk_interval(self) -> timedelta | None:
        return None if self.chunk_interval_s is None else timedelta(seconds=self.chunk_interval_s)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["extension"]["state"] = self.extension.state
        for name in ("oldest_chunk", "newest_chunk"):
            value = getattr(self, name)
            d[name] = value.isoformat() if value is not None else None
        return d

    def lines(self) -> list[tuple[str, str, str]]:
        """(label, value, detail) for people: the kind of table, its chunks, its policies."""
        ext = self.extension
        if ext.state == "not preloaded":
            return [("Kind", "plain table", ""), ("TimescaleDB", ext.describe(), "")]
        if not self.license:
            what = "not installed" if ext.state == "absent" else f"{ext.available} available, not in use"
            return [("Kind", f"plain table (TimescaleDB {what})", "")]
        edition = f"TimescaleDB {ext.installed}, {self.license} edition"
        if not self.hypertable:
            return [("Kind", f"plain table ⚠ not a hypertable ({edition})", "")]
        interval = interval_words(self.chunk_interval) if self.chunk_interval else "unknown interval"
        chunks = f"{self.chunks:,}" + (
            f" ({self.compressed_chunks:,} compressed)" if self.compressed_chunks else ""
        )
        span = ""
        if self.oldest_chunk is not None and self.newest_chunk is not None:
            oldest, newest = (t.astimezone(timezone.utc) for t in (self.oldest_chunk, self.newest_chunk))
            span = f"from {oldest:%Y-%m-%d %H:%M} to {newest:%Y-%m-%d %H:%M} UTC"
        if self.full_edition:
            policies = [f"retention {self.retention}"] if self.retention else []
            if self.compress_after:
                policies.append(f"compression after {self.compress_after}")
            policy_text = ", ".join(policies) or "none"
        else:
            policy_text = "none in this edition (old chunks: `filepipe drop-chunks` from cron)"
        return [
            ("Kind", f"hypertable ({edition})", ""),
            ("Chunks", f"{chunks} of {interval}", span),
            ("Policies", policy_text, ""),
        ]


def is_hypertable(conn: psycopg.Connection[Any], table: str) -> bool:
    """Whether `table` is a hypertable (the extension must be in this database)."""
    return conn.execute(_HYPERTABLE_SQL, {"t": table}).fetchone() is not None


def read_table(conn: psycopg.Connection[Any], table: str, ext: Extension | None = None) -> TableFacts:
    """The table's TimescaleDB figures in a few catalog queries (no table scan). The table
    must exist."""
    ext = ext or read_extension(conn)
    facts = TableFacts(extension=ext)
    if not (ext.installed and ext.preloaded):
        return facts
    facts.license = license_of(conn)
    row = conn.execute(_HYPERTABLE_SQL, {"t": table}).fetchone()
    if row is None:
        return facts
    interval, _, compression = row
    facts.hypertable = True
    facts.chunk_interval_s = interval.total_seconds() if isinstance(interval, timedelta) else None
    facts.compression = bool(compression)
    count, compressed, oldest, newest = conn.execute(_CHUNKS_SQL, {"t": table}).fetchone() or (
        0,
        0,
        None,
        None,
    )
    facts.chunks, facts.compressed_chunks = int(count), int(compressed)
    facts.oldest_chunk, facts.newest_chunk = oldest, newest
    if facts.full_edition:
        view = rate_view_name(table)
        has_view = conn.execute("SELECT to_regclass(%s)", (view,)).fetchone()
        if has_view and has_view[0] is not None and conn.execute(_RATE_VIEW_SQL, {"v": view}).fetchone():
            facts.rate_view = view
        for _, proc, config in conn.execute(_JOBS_SQL, {"t": table, "v": facts.rate_view or table}):
            config = config or {}
            if proc == "policy_retention":
                facts.retention = str(config.get("drop_after", ""))
            elif proc == "policy_compression":
                facts.compress_after = str(config.get("compress_after", ""))
    return facts
