"""Loading a prepared batch: COPY (or merge, for a redelivery), waiting out outages and a
table that refuses every row, and bisecting a batch the table refuses to find the rows
it refuses on their own."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from .. import _native, db, metrics
from ..config import Settings, mask_url
from ..constants import SAME_REFUSALS_FOR_THE_TABLE
from ..errors import ConfigError, DatabaseError, FilepipeError, TransientError
from ..redaction import error_line
from ..retry import QUERY_CANCELED, Abandoned, Backoff, is_transient_pg, permanent_pg
from ..stream import DeadLetter
from .prepare import Prepared, dead_letter

log = logging.getLogger("filepipe")

T = TypeVar("T")

# What a table refuses a write with, because of a row's values or because of the table
# itself (a probe tells which, see Load.load): 22 data exception, 23 integrity
# constraint (a CHECK, a NOT NULL column), 54 program limit, P0 raised by a PL/pgSQL
# trigger, 38/39 by another routine, 44 a view's check option; a read-only transaction, a
# missing privilege (or a row security policy), a statement timeout.
_REFUSAL_CLASSES = ("22", "23", "54", "P0", "38", "39", "44")
_REFUSAL_STATES = (db.READ_ONLY, db.NO_PRIVILEGE, QUERY_CANCELED)


class Load:
    """Loads batches into the table (one instance shared by the loader threads)."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        loader: db.Loader,
        pg_backoff: Backoff,
        table_backoff: Backoff,
        abandon: threading.Event,
    ) -> None:
        self.settings = settings
        self.name = name
        self.loader = loader
        self.pg_backoff = pg_backoff
        self.table_backoff = table_backoff
        self.abandon = abandon
        self.binary = settings.copy_format == "binary"
        # Rows refused alone the same way since a row last loaded (any batch, any loader).
        self._same: tuple[str, str] | None = None
        self._same_count = 0
        self._same_lock = threading.Lock()

    def table_refusal(self) -> str:
        """Why the events table refuses every row right now ("" when it does not)."""
        b = self.table_backoff
        return b.last_message if b.down_since is not None else ""

    def load(self, p: Prepared) -> tuple[int, list[DeadLetter]]:
        """Loads the batch, waiting out outages and a table that refuses every row.

        When the table refuses the batch, the consumer asks whether it still takes a row
        it took before (`Loader.probe`: the table's newest row again, rolled back). If it
        does not, the table has changed, not the entries: the whole batch stays pending and
        is tried again after a backoff, with one log line when this starts and one when it
        ends; nothing is dead-lettered. If it does, the batch is bisected: the rows that
        load are committed, and a row refused alone is dead-lettered (`db_rejected`), but
        only once the table has been seen taking rows after it was refused (a neighbour
        loading, or the probe again), so that a table changing halfway through does not
        dead-letter the rest. A row that runs out of statement time alone, twice, is
        dead-lettered too; a table that runs every probe out of time waits.

        A rule that the newest row passes but every new one breaks (a constraint on what
        new entries carry): SAME_REFUSALS_FOR_THE_TABLE rows refused alone the same way
        (SQLSTATE and constraint, or message), none loading between them, in this batch or
        across batches, make it the table's problem too: the batch waits like above. A
        batch that big never dead-letters a row for it; a trickle of one-entry batches
        dead-letters fewer than that many (replayable once the rule is changed)."""
        if p.rows == 0:
            return 0, []
        inserted = 0
        direct = not p.redelivered
        waiting = False
        while True:
            started = time.monotonic()
            try:
                if waiting:
                    self._probe_table()  # one row, rolled back: cheaper than the batch
                loaded, dead = self._load_isolating(p, direct=direct)
            except _TableRefuses as e:
                inserted += e.inserted
                direct = False  # part of the batch may be in already
                waiting = True
                self.table_backoff.failed(e)
                if self.abandon.is_set():
                    raise Abandoned("PostgreSQL table: gave up waiting at stop") from e
                continue
            self.table_backoff.succeeded(started)
            return inserted + loaded, dead

    def _load_buffer(self, buf: bytes, rows: int, *, direct: bool = False) -> int:
        def load() -> int:
            return metrics.timed(metrics.COPY_SECONDS, self.loader.load, buf, rows, direct=direct)

        return self.pg_backoff.call(lambda: self._pooled(load), is_transient_pg)

    def _pooled(self, fn: Callable[[], T]) -> T:
        """`fn` on a pooled connection. When the pool has none to give, a connection of its
        own says why: what waiting cannot fix (a password changed, the database dropped) is
        a ConfigError; otherwise the server's reason, not the pool's "couldn't get a
        connection after 10.00 sec", is what the log and the heartbeat show."""
        try:
            return fn()
        except PoolTimeout as e:
            try:
                db.connect(self.settings).close()
            except psycopg.Error as why:
                if permanent_pg(why):
                    raise pg_refused(self.settings, why) from e
                raise TransientError(error_line(why)) from e
            raise

    def _refusal(self, e: psycopg.Error) -> psycopg.Error:
        """`e` if the table refused the write; raises the fatal error it is otherwise."""
        if not _is_refusal(e):
            raise _fatal_db_error(e, self.settings) from e
        return e

    def _probe_table(self) -> None:
        """Raises _TableRefuses unless the table takes a row like the ones it holds."""
        try:
            self.pg_backoff.call(lambda: self._pooled(lambda: self.loader.probe(self.name)), is_transient_pg)
        except psycopg.Error as e:
            raise _TableRefuses(self._refusal(e)) from e

    def _load_isolating(self, p: Prepared, *, direct: bool) -> tuple[int, list[DeadLetter]]:
        try:
            inserted = self._load_buffer(p.buf, p.rows, direct=direct)
            self._loaded()
            return inserted, []
        except psycopg.Error as e:
            first = self._refusal(e)
        found = _Isolation()
        try:
            self._probe_table()
            indices = p.measurements.measured()
            if len(indices) == 1:
                self._refused_alone(indices, p.buf, first, found)
            else:
                self._split(p, indices, found)
            if found.unconfirmed:
                self._probe_table()
        except _TableRefuses as e:
            e.inserted = found.inserted
            raise
        return found.inserted, [self._rejected(p, index, message) for index, message in found.refused]

    def _split(self, p: Prepared, indices: list[int], found: _Isolation) -> None:
        mid = len(indices) // 2
        self._bisect(p, indices[:mid], found)
        self._bisect(p, indices[mid:], found)

    def _bisect(self, p: Prepared, indices: list[int], found: _Isolation) -> None:
        buf = _native.encode_copy(
            p.batch, p.measurements, self.name, self.binary, only=indices, stream=self.settings.stream
        )
        try:
            found.loaded(self._load_buffer(buf, len(indices)))
            self._loaded()
            return
        except psycopg.Error as e:
            refused = self._refusal(e)
        if len(indices) == 1:
            self._refused_alone(indices, buf, refused, found)
        else:
            self._split(p, indices, found)

    def _refused_alone(self, indices: list[int], buf: bytes, e: psycopg.Error, found: _Isolation) -> None:
        """One row the table refused on its own. Out of time, it is tried once more (a lock
        or a burst of load may have been the cause)."""
        message = error_line(e)
        if e.sqlstate == QUERY_CANCELED:
            try:
                found.loaded(self._load_buffer(buf, 1))
                self._loaded()
                return
            except psycopg.Error as again:
                e = self._refusal(again)
                message = error_line(e)
                if again.sqlstate == QUERY_CANCELED:
                    message = (
                        f"it took longer than the statement timeout (FILEPIPE_STATEMENT_TIMEOUT_MS="
                        f"{self.settings.statement_timeout_ms}) twice on its own: {message}"
                    )
        self._refused_the_same(e)
        found.refused.append((indices[0], message))
        found.unconfirmed = True

    def _loaded(self) -> None:
        with self._same_lock:
            self._same, self._same_count = None, 0

    def _refused_the_same(self, e: psycopg.Error) -> None:
        """Counts a row refused alone; raises _TableRefuses once SAME_REFUSALS_FOR_THE_TABLE
        rows in a row were refused the same way with none loading between them."""
        diag = e.diag
        way = (e.sqlstate or "", diag.constraint_name or diag.message_primary or error_line(e))
        with self._same_lock:
            if way == self._same:
                self._same_count += 1
            else:
                self._same, self._same_count = way, 1
            count = self._same_count
        if count >= SAME_REFUSALS_FOR_THE_TABLE:
            raise _TableRefuses(
                e,
                f"the last {count} rows were all refused so and none loaded, while "
                "the table takes its newest row again: a rule new rows break",
            )

    def _rejected(self, p: Prepared, index: int, message: str) -> DeadLetter:
        letter = dead_letter(p.entry(index), "db_rejected", f"PostgreSQL refused the row: {message}")
        log.warning("%s", letter.error)
        return letter


@dataclass
class _Isolation:
    """What bisecting one refused batch has found so far."""

    inserted: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)  # (record index, the server's reason)
    # A row was refused and the table has not been seen taking a row since.
    unconfirmed: bool = False

    def loaded(self, inserted: int) -> None:
        self.inserted += inserted
        self.unconfirmed = False


class _TableRefuses(Exception):
    """The table refuses rows like the ones it holds: the batch waits."""

    def __init__(self, error: psycopg.Error, why: str = "") -> None:
        text = f"SQLSTATE {error.sqlstate or '?'}: {error_line(error)}"
        super().__init__(f"{text} ({why})" if why else text)
        self.inserted = 0  # rows of the batch committed before the refusal was found


def pg_refused(settings: Settings, e: psycopg.Error) -> ConfigError:
    """The error of a connection PostgreSQL refuses for good (`retry.permanent_pg`)."""
    reason = error_line(e).removeprefix("connection failed: ")
    return ConfigError(f"PostgreSQL at {mask_url(settings.pg_uri)} refused: {reason}")


def _is_refusal(e: psycopg.Error) -> bool:
    state = e.sqlstate or ""
    return state[:2] in _REFUSAL_CLASSES or state in _REFUSAL_STATES


def _fatal_db_error(e: psycopg.Error, settings: Settings) -> FilepipeError:
    state = e.sqlstate or ""
    if state == "42P01":
        return DatabaseError(f"table {settings.table} does not exist: run `filepipe init-db` first")
    return DatabaseError(f"PostgreSQL refused the batch ({state}): {error_line(e)}")
