"""The events table's columns and key, and the SQL that names them: the table, the
per-connection staging table a merge loads into, and the COPY statement."""

from __future__ import annotations

from psycopg import sql

from .. import _native
from .. import constants as c

COLUMNS: tuple[str, ...] = tuple(_native.COPY_COLUMNS)

COLUMN_TYPES = {
    "event_time": "timestamptz NOT NULL",
    "stream": "text NOT NULL",
    "stream_id": "text NOT NULL",
    "file_id": "uuid NOT NULL",
    "filename": "text NOT NULL",
    "storage": "text NOT NULL",
    "storage_key": "text NOT NULL",
    "size_bytes": "bigint NOT NULL",
    "checksum_sha256": "text NOT NULL",
    "content_type": "text",
    "uploaded_at": "timestamptz NOT NULL",
    "consumer": "text NOT NULL",
    "attributes": "jsonb NOT NULL DEFAULT '{}'::jsonb",
}

# A row's identity: the logical stream name, the entry id (behind `{i}/` for partition i)
# and the event time (from the entry id). It contains the time column, as a TimescaleDB
# hypertable requires of every unique key.
PRIMARY_KEY: tuple[str, ...] = ("stream", "stream_id", "event_time")
# The key before the stream name was part of it: two streams' equal entry ids collided.
OLD_PRIMARY_KEY: tuple[str, ...] = ("stream_id", "event_time")


def table_ident(table: str) -> sql.Identifier:
    """`schema.table` or `table` as a quoted identifier."""
    return sql.Identifier(*table.split("."))


def index_name(table: str, suffix: str) -> sql.Identifier:
    """The name of one of `table`'s indexes: the table's own name (without its schema) and
    `suffix`."""
    return sql.Identifier(table.split(".")[-1] + suffix)


def column_list(names: tuple[str, ...] = COLUMNS) -> sql.Composed:
    """`"a", "b", …`: columns as a list of quoted identifiers."""
    return sql.SQL(", ").join(map(sql.Identifier, names))


def staging_columns() -> sql.Composed:
    """The staging table's column definitions: the events table's types without their
    constraints."""
    return sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(COLUMN_TYPES[name].split(" NOT NULL")[0]))
        for name in COLUMNS
    )


def create_staging() -> sql.Composed:
    """The per-connection staging table a merge copies into."""
    # The staging table lives as long as the connection; ON COMMIT DELETE ROWS
    # empties it at every commit, so no DDL runs per batch.
    return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
        sql.Identifier(c.STAGING_TABLE), staging_columns()
    )


def copy_statement(*, binary: bool, table: str | None = None) -> sql.Composed:
    """`COPY <table> (<filepipe's columns>) FROM STDIN (FORMAT BINARY|TEXT)`: the statement
    an encoded buffer is loaded with, into `table` (a direct load) or, when `table` is
    None, into the connection's staging table (a merge)."""
    target = sql.Identifier(c.STAGING_TABLE) if table is None else table_ident(table)
    fmt = sql.SQL("BINARY" if binary else "TEXT")
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(target, column_list(), fmt)
