"""The per-batch load: a direct COPY into the events table, or a merge through the
connection's staging table (`INSERT … ON CONFLICT DO NOTHING`) for rows that may be there
already, the fallbacks when TimescaleDB refuses rows for compressed chunks, and the probe
that tells a table refusing every row from rows it refuses on their own."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from .. import _native
from .. import constants as c
from .._faults import crash_point
from ..config import Settings
from ..errors import TransientError
from ..redaction import error_line
from .columns import COLUMNS, column_list, copy_statement, create_staging, staging_columns, table_ident
from .connection import READ_ONLY, Watchdog, mark_used, staged
from .layout import check_layout

log = logging.getLogger(__name__)


# TimescaleDB (Timescale License, 2.11+) loads a row into a compressed chunk of a table with a
# unique key by first decompressing the batches that could hold its key (a COPY as well as an
# INSERT). It refuses a statement that would decompress more than
# `timescaledb.max_tuples_decompressed_per_dml_transaction` tuples (53400, "tuple decompression
# limit exceeded by operation"; 100,000 by default), and with
# `timescaledb.enable_dml_decompression = off` it refuses every such row (0A000, "inserting into
# compressed chunk with unique constraints disabled"); before 2.11 it refused them all (0A000,
# "... compressed chunk ..."). The merge lifts the cap and turns DML decompression on for its own
# transaction only: what it decompresses is bounded by the compressed batches its rows fall in.
# Servers without the settings (no TimescaleDB, or not preloaded) skip the statement.
LIFT_DECOMPRESSION_CAP = (
    "SELECT set_config(name, CASE name WHEN 'timescaledb.enable_dml_decompression' THEN 'on' ELSE '0' END, "
    "true) FROM pg_settings WHERE name IN ('timescaledb.max_tuples_decompressed_per_dml_transaction', "
    "'timescaledb.enable_dml_decompression')"
)


def decompression_cap(e: psycopg.Error) -> bool:
    """Whether `e` is TimescaleDB's cap on the tuples one statement may decompress."""
    return e.sqlstate == "53400" and "decompress" in (e.diag.message_primary or "").lower()


def compressed_chunk_refusal(e: psycopg.Error) -> bool:
    """Whether `e` is TimescaleDB refusing rows because their chunk is compressed: the cap, or
    DML decompression turned off (or not supported by that version)."""
    message = (e.diag.message_primary or "").lower()
    return decompression_cap(e) or (e.sqlstate == "0A000" and "compressed chunk" in message)


class Loader:
    """Loads encoded COPY buffers into the events table through a pool.

    Two ways to load a batch, both idempotent because of the primary key:

    * merge: COPY into the per-connection staging table, then
      `INSERT … SELECT … ON CONFLICT DO NOTHING` — a redelivered row is skipped;
    * direct: COPY straight into the events table. It does about half the
      server's work per row, but fails as a whole (unique_violation) if any row is
      already there; the batch is then loaded again with merge.

    `load(direct=True)` tries direct first. The consumer uses it for entries on their
    first delivery, which are almost never present already; after a conflict it merges
    for a while, since conflicts come in runs (a replayed stream)."""

    CONFLICT_COOLDOWN = 20

    def __init__(self, pool: ConnectionPool, settings: Settings) -> None:
        self.pool = pool
        self.binary = settings.copy_format == "binary"
        self.stall_timeout = settings.statement_timeout_ms / 1000 + max(2.0, settings.connect_timeout_s)
        ident = table_ident(settings.table)
        staging = sql.Identifier(c.STAGING_TABLE)
        col_list = column_list()
        self.copy_sql = copy_statement(binary=self.binary)
        self.direct_copy_sql = copy_statement(binary=self.binary, table=settings.table)
        self.insert_sql = sql.SQL(
            "INSERT INTO {} ({cols}) SELECT {cols} FROM {} ON CONFLICT DO NOTHING"
        ).format(ident, staging, cols=col_list)
        self.ident = ident
        self.col_list = col_list
        self.stream = settings.stream
        self.statement_timeout_ms = settings.statement_timeout_ms
        # PgBouncer: the staging table lives and dies inside each merge transaction.
        self.staging_sql: sql.Composed | None = None
        if settings.pgbouncer:
            self.staging_sql = sql.SQL(
                "SET LOCAL statement_timeout = {}; CREATE TEMP TABLE {} ({}) ON COMMIT DROP"
            ).format(sql.Literal(settings.statement_timeout_ms), staging, staging_columns())
        self._merge_only = 0
        # Merges left to run with TimescaleDB's decompression limits lifted, after one was
        # refused for compressed chunks (see LIFT_DECOMPRESSION_CAP).
        self._lift_limits = 0
        self.table = settings.table
        self._layout_checked = False

    def layout_checked(self) -> None:
        """The table's layout was just checked (`check_layout`): the first load skips it."""
        self._layout_checked = True

    def load(self, buf: bytes, rows: int, *, direct: bool = False) -> int:
        """COPY one buffer of `rows` rows and COMMIT; returns the rows newly inserted
        (a redelivered entry's row already exists and counts 0).

        A connection that answers nothing for `stall_timeout` seconds (a silent
        network: the server's statement timeout cannot help when its answer never
        arrives) is cut, and the load fails with a TransientError.

        The first load checks the table's layout: one this version cannot load (the old
        key, without the stream name) raises SchemaError, and nothing is loaded."""
        if not self._layout_checked:
            with self.pool.connection() as conn, Watchdog(conn, self.stall_timeout):
                check_layout(conn, self.table)
            self._layout_checked = True
        if direct and self._merge_only <= 0:
            try:
                self._run(buf, direct=True)
                return rows
            except psycopg.errors.UniqueViolation:
                self._merge_only = self.CONFLICT_COOLDOWN
                log.debug("batch already partly loaded: merging instead")
            except psycopg.Error as e:
                if not compressed_chunk_refusal(e):
                    raise
                # A redelivery or a late event into a compressed chunk: the merge loads what the
                # direct COPY could not, lifting the decompression cap for its own transaction,
                # and so do the batches after it (they come in runs: a backfill, a replay).
                self._merge_only = self._lift_limits = self.CONFLICT_COOLDOWN
                log.info("direct COPY into compressed chunks refused, merging instead: %s", error_line(e))
                return self._run(buf, direct=False, lift_decompression_cap=True)
        elif direct:
            self._merge_only -= 1
        if self._lift_limits > 0:
            self._lift_limits -= 1
            return self._run(buf, direct=False, lift_decompression_cap=True)
        try:
            return self._run(buf, direct=False)
        except psycopg.Error as e:
            if decompression_cap(e):
                log.info(
                    "the merge met TimescaleDB's decompression cap, merging without it: %s", error_line(e)
                )
            elif compressed_chunk_refusal(e):
                log.info(
                    "the merge was refused for compressed chunks, merging with DML decompression on: %s",
                    error_line(e),
                )
            else:
                raise
            self._lift_limits = self.CONFLICT_COOLDOWN
            return self._run(buf, direct=False, lift_decompression_cap=True)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection guarded by a watchdog. A connection found read-only is
        closed (the pool replaces it): a database's default is fixed for the life of a
        session, and after a failover a new connection may reach the new primary."""
        with self.pool.connection() as conn, Watchdog(conn, self.stall_timeout) as dog:
            try:
                yield conn
                mark_used(conn)
            except psycopg.Error as e:
                if dog.fired:
                    raise TransientError(
                        f"PostgreSQL did not answer within {self.stall_timeout:.0f} s: connection cut"
                    ) from e
                if e.sqlstate == READ_ONLY:
                    conn.close()
                raise

    def _stage(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> None:
        """Makes sure the merge's staging table exists, inside the open transaction."""
        if self.staging_sql is not None:
            cur.execute(self.staging_sql)
        elif conn not in staged:
            cur.execute(create_staging())

    def _run(self, buf: bytes, *, direct: bool, lift_decompression_cap: bool = False) -> int:
        with self._connection() as conn:
            inserted = -1
            if direct:
                with conn.cursor() as cur, cur.copy(self.direct_copy_sql) as copy:
                    copy.write(buf)
                    crash_point("during_copy")  # the COPY not yet ended, so not committed
                crash_point("after_copy")
            else:
                with conn.transaction(), conn.cursor() as cur:
                    if lift_decompression_cap:
                        cur.execute(LIFT_DECOMPRESSION_CAP)
                    self._stage(conn, cur)
                    with cur.copy(self.copy_sql) as copy:
                        copy.write(buf)
                        crash_point("during_copy")
                    crash_point("after_copy")
                    cur.execute(self.insert_sql)
                    inserted = cur.rowcount
                    crash_point("before_commit")  # the rows inserted, the transaction still open
                if self.staging_sql is None:
                    staged.add(conn)
        return max(inserted, 0)

    def probe(self, consumer: str) -> None:
        """Checks that the table still takes a row it took before; raises the server's
        refusal (a psycopg error) if it does not.

        The row tried is the table's newest, under a key of its own and written by
        `consumer` from this stream, inserted in a transaction that is rolled back: nothing is left
        behind. A table that takes it accepts rows like the ones it holds, so what it
        refuses of a batch is the entries' own values. A table that refuses it has
        changed (a constraint, trigger or NOT NULL column no row satisfies, a privilege
        revoked, a read-only database, a lock held past the statement timeout). An empty
        table is tried with a row made up here (a plain file record)."""
        key = f"filepipe-probe/{uuid.uuid4().hex}"
        values = sql.SQL(", ").join(
            sql.Literal({"stream_id": key, "consumer": consumer, "stream": self.stream}[name])
            if name in ("stream_id", "consumer", "stream")
            else sql.Identifier(name)
            for name in COLUMNS
        )
        again = sql.SQL(
            "INSERT INTO {t} ({cols}) SELECT {values} FROM {t} ORDER BY event_time DESC LIMIT 1 "
            "ON CONFLICT DO NOTHING"
        ).format(t=self.ident, cols=self.col_list, values=values)
        with self._connection() as conn, conn.transaction(force_rollback=True), conn.cursor() as cur:
            if self.staging_sql is not None:
                cur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(self.statement_timeout_ms))
            cur.execute(again)
            if cur.rowcount == 1:
                return
            # Nothing inserted: the table is empty, or the row met a unique key (after
            # its checks and triggers had passed).
            cur.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(self.ident))
            row = cur.fetchone()
            if row is not None and row[0]:
                return
            self._stage(conn, cur)
            with cur.copy(self.copy_sql) as copy:
                copy.write(self._made_up_row(consumer))
            cur.execute(self.insert_sql)

    def _made_up_row(self, consumer: str) -> bytes:
        """A COPY buffer of one plausible row: an empty file stored locally, now."""
        entry_id = f"{time.time_ns() // 1_000_000}-0".encode()
        fields = {b"file_id": str(uuid.uuid4()).encode(), b"filename": b"filepipe probe", b"key": b"probe"}
        batch = _native.parse_entries([(entry_id, fields)], "local", id_prefix="filepipe-probe/")
        measured = _native.Measurements(1)
        measured.set(0, 0, hashlib.sha256(b"").digest(), "application/octet-stream")
        return _native.encode_copy(batch, measured, consumer, self.binary, stream=self.stream)
