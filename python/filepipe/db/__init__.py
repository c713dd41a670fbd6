"""PostgreSQL, in the order a batch meets it: the events table's columns and key
(`columns`), connections and the pool (`connection`), the table's layout as the server
has it (`layout`), `init-db` and `drop-chunks` (`schema`), and the per-batch load
(`loader`).

A batch is loaded in one transaction: COPY into a per-connection temporary staging table,
`INSERT … SELECT … ON CONFLICT DO NOTHING` into the events table, COMMIT (or, on a first
delivery, a direct COPY into the table). The primary key `(stream, stream_id, event_time)`
makes a redelivered entry a no-op, and keeps apart the rows of two streams loading one
table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .columns import COLUMNS, OLD_PRIMARY_KEY, copy_statement, table_ident
from .connection import (
    NO_PRIVILEGE,
    READ_ONLY,
    EarlyConnection,
    check_conninfo,
    configure_connection,
    connect,
    connection_kwargs,
    create_pool,
)
from .layout import Layout, check_layout, read_layout
from .loader import Loader

if TYPE_CHECKING:
    from .schema import SchemaInfo, drop_old_chunks, init_db

__all__ = [
    "COLUMNS",
    "NO_PRIVILEGE",
    "OLD_PRIMARY_KEY",
    "READ_ONLY",
    "EarlyConnection",
    "Layout",
    "Loader",
    "SchemaInfo",
    "check_conninfo",
    "check_layout",
    "configure_connection",
    "connect",
    "connection_kwargs",
    "copy_statement",
    "create_pool",
    "drop_old_chunks",
    "init_db",
    "read_layout",
    "table_ident",
]


def __getattr__(name: str) -> Any:
    """`init_db`, `drop_old_chunks` and `SchemaInfo`, imported when first asked for: the
    consumer does not make tables (nor import TimescaleDB's part) to start."""
    if name in ("SchemaInfo", "drop_old_chunks", "init_db"):
        from . import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'filepipe.db' has no attribute {name!r}")
