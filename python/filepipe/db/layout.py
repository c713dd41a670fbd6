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


_PRIMARY_KEY_SQL = """
SELECT c.conname, a.attname
FROM pg_constraint c
JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) ON true
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
WHERE c.conrelid = %s::regclass AND c.contype = 'p'
ORDER BY k.n
"""


def read_layout(conn: psycopg.Connection[Any], table: str) -> Layout | None:
    """The table's columns and primary key, or None if there is no such table."""
    row = conn.execute("SELECT to_regclass(%s)::oid", (table,)).fetchone()
    if row is None or row[0] is None:
        return None
    oid = row[0]
    columns = frozenset(
        name
        for (name,) in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (oid,),
        )
    )
    key = conn.execute(_PRIMARY_KEY_SQL, (oid,)).fetchall()
    compression = False
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
        found = conn.execute(
            "SELECT compression_enabled FROM timescaledb_information.hypertables "
            "WHERE format('%%I.%%I', hypertable_schema, hypertable_name)::regclass = %s::regclass",
            (oid,),
        ).fetchone()
        compression = bool(found and found[0])
    return Layout(
        columns=columns,
        primary_key=tuple(name for _, name in key),
        primary_key_name=key[0][0] if key else None,
        compression=compression,
    )


def check_layout(conn: psycopg.Connection[Any], table: str) -> None:
    """Raises SchemaError (one line naming `filepipe init-db`) if the table exists with a
    layout this version cannot load; a missing table is reported at the first load."""
    layout = read_layout(conn, table)
    problem = layout.problem(table) if layout is not None else None
    if problem:
        raise SchemaError(problem)
