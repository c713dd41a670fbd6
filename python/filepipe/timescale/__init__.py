"""TimescaleDB as this server has it: detected from the catalog, never assumed.

`extension` (is it there, preloaded, which edition; what `init-db` makes of it), `intervals`
(the durations the options take), `policies` (what `init-db` sets up on a hypertable, and
`drop-chunks`), `facts` (the table as TimescaleDB's catalog describes it) and `figures` (what
status, the dashboard and the benchmark show: the rows the catalog knows, the rate history).
Every name is importable from `filepipe.timescale` itself.
"""

from __future__ import annotations

from .extension import (
    EXTENSION,
    FULL_LICENSE,
    HYPERTABLE,
    PLAIN,
    Extension,
    license_of,
    read_extension,
    table_kind,
    version_tuple,
)
from .facts import TableFacts, is_hypertable, read_table
from .figures import (
    MAX_COUNTED_CHUNKS,
    ROW_HEAP_BYTES,
    FiguresCache,
    RateMinute,
    TableFigures,
    estimated_rows,
    rate_history,
    rate_history_hours,
    table_figures,
)
from .intervals import interval_text, interval_words, parse_interval
from .policies import (
    COMPRESS_ORDER_BY,
    COMPRESS_SEGMENT_BY,
    DAY_HISTORY_HOURS,
    DEFAULT_CHUNK_INTERVAL,
    MIN_COMPRESSED_LOAD_VERSION,
    RATE_REFRESH_END,
    RATE_REFRESH_EVERY,
    RATE_REFRESH_START,
    RATE_VIEW_SUFFIX,
    compression_sql,
    create_hypertable_sql,
    drop_chunks,
    rate_view_name,
    rate_view_sql,
    retention_sql,
)

__all__ = [
    "COMPRESS_ORDER_BY",
    "COMPRESS_SEGMENT_BY",
    "DAY_HISTORY_HOURS",
    "DEFAULT_CHUNK_INTERVAL",
    "EXTENSION",
    "FULL_LICENSE",
    "HYPERTABLE",
    "MAX_COUNTED_CHUNKS",
    "MIN_COMPRESSED_LOAD_VERSION",
    "PLAIN",
    "RATE_REFRESH_END",
    "RATE_REFRESH_EVERY",
    "RATE_REFRESH_START",
    "RATE_VIEW_SUFFIX",
    "ROW_HEAP_BYTES",
    "Extension",
    "FiguresCache",
    "RateMinute",
    "TableFacts",
    "TableFigures",
    "compression_sql",
    "create_hypertable_sql",
    "drop_chunks",
    "estimated_rows",
    "interval_text",
    "interval_words",
    "is_hypertable",
    "license_of",
    "parse_interval",
    "rate_history",
    "rate_history_hours",
    "rate_view_name",
    "rate_view_sql",
    "read_extension",
    "read_table",
    "retention_sql",
    "table_figures",
    "table_kind",
    "version_tuple",
]
