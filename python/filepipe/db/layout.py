"""The events table as PostgreSQL describes it: its columns and primary key, and whether
this version can load it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from ..errors import SchemaError
from .columns import COLUMNS, PRIMARY_KEY


@dataclass(frozen=True)
class Layout:
    """The events table as PostgreSQL describes it."""

    columns: frozenset[str]
    primary_key: tuple[str, ...]
    primary_key_name: str | None
    compression: bool  # a TimescaleDB hypertable with compression enabled

    def missing_columns(self) -> list[str]:
        """filepipe's columns the table lacks (`stream` aside: an upgrade adds it)."""
        return [name for name in COLUMNS if name != "stream" and name not in self.columns]

    def problem(self, table: str) -> str | None:
        """Why filepipe cannot load this table as it is (None: it can)."""
        missing = self.missing_columns()
        if missing:
            return f"table {table} is not a filepipe events table: it has no column {', '.join(missing)}"
        if "stream" not in self.columns or self.primary_key != PRIMARY_KEY:
            return (
                f"table {table} has the old layout (rows keyed by ({', '.join(self.primary_key)}), "
                "without the stream name): run `filepipe init-db` to upgrade it"
            )
        return None


# The table, its columns and its primary key (in key order), and whether TimescaleDB is
# installed: one round trip. (TimescaleDB's own views exist only where it is installed, so
# whether compression is enabled is a second query, there only.)
_LAYOUT_SQL = """
SELECT t.oid,
  ARRAY(SELECT attname::text FROM pg_attribute
        WHERE attrelid = t.oid AND attnum > 0 AND NOT attisdropped),
  (SELECT conname::text FROM pg_constraint WHERE conrelid = t.oid AND contype = 'p'),
  ARRAY(SELECT a.attname::text
        FROM pg_constraint c
        JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) ON true
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
        WHERE c.conrelid = t.oid AND c.contype = 'p'
        ORDER BY k.n),
  EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
FROM (SELECT to_regclass(%s)::oid AS oid) t
"""


def read_layout(conn: psycopg.Connection[Any], table: str, *, compression: bool = True) -> Layout | None:
    """The table's columns and primary key, or None if there is no such table. One round
    trip; with `compression` (whether a hypertable compresses its chunks), a second one
    where TimescaleDB is installed (`compression` False: reported as False)."""
    row = conn.execute(_LAYOUT_SQL, (table,)).fetchone()
    if row is None or row[0] is None:
        return None
    oid, columns, key_name, key, timescaledb = row
    compressed = False
    if compression and timescaledb:
        found = conn.execute(
            "SELECT compression_enabled FROM timescaledb_information.hypertables "
            "WHERE format('%%I.%%I', hypertable_schema, hypertable_name)::regclass = %s::regclass",
            (oid,),
        ).fetchone()
        compressed = bool(found and found[0])
    return Layout(
        columns=frozenset(columns),
        primary_key=tuple(key),
        primary_key_name=key_name,
        compression=compressed,
    )


def check_layout(conn: psycopg.Connection[Any], table: str) -> None:
    """Raises SchemaError (one line naming `filepipe init-db`) if the table exists with a
    layout this version cannot load; a missing table is reported at the first load."""
    layout = read_layout(conn, table, compression=False)
    problem = layout.problem(table) if layout is not None else None
    if problem:
        raise SchemaError(problem)
