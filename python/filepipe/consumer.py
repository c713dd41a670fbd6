"""The consumer: Redis stream -> validated records -> measured files -> COPY -> ack.

Threads share the work so that Redis, the files and PostgreSQL overlap:

* the reader (the caller's thread) reads batches: first its own pending entries,
  then new ones, and entries of dead consumers reclaimed with XAUTOCLAIM;
* the preparer parses and validates a batch in the extension, measures its files
  and encodes the COPY buffer, while the reader reads the next one;
* one loader per pooled connection commits prepared batches;
* the acknowledger writes each committed batch's dead letters and acknowledges it
  in one atomic script.

At most `in_flight` batches wait between stages, so memory is bounded by batch size
x batches in flight, never by the backlog. An entry is acknowledged only after the
row that records it is committed, or after its dead letter is written: a crash
anywhere loses nothing, and redelivery duplicates nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from redis.exceptions import RedisClusterException

from . import _native, db, metrics, shutdown, stream
from ._faults import crash_point
from .config import Settings
from .constants import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, heartbeat_key
from .errors import ConfigError, DatabaseError, FilepipeError, StorageError, TransientError
from .heartbeat import Heartbeat
from .partitions import Partition, partitions
from .retention import Housekeeper
from .retry import QUERY_CANCELED, Abandoned, Backoff, Outage, is_transient_pg, is_transient_redis
from .storage import Storage, open_storage
from .stream import AckResult, DeadLetter, Entry, ReadSize

log = logging.getLogger("filepipe")

# Dead letters a full Redis refused are kept (their entries pending) up to this many bytes
# while later batches are acknowledged; past it, acknowledging waits for Redis to have room.
HELD_MAX_BYTES = 32 * 1024 * 1024

# What a table refuses a write with, because of a row's values or because of the table
# itself (a probe tells which, see Consumer._load): 22 data exception, 23 integrity
# constraint (a CHECK, a NOT NULL column), 54 program limit, P0 raised by a PL/pgSQL
# trigger, 38/39 by another routine, 44 a view's check option; a read-only transaction, a
# missing privilege (or a row security policy), a statement timeout.
_REFUSAL_CLASSES = ("22", "23", "54", "P0", "38", "39", "44")
_REFUSAL_STATES = (db.READ_ONLY, db.NO_PRIVILEGE, QUERY_CANCELED)


_EMPTY_BATCH = _native.parse_entries([])


# A batch just read: its stream, its entries, whether they were delivered before, and the
# ids of those read again without fields (deleted from the stream while pending).
RawBatch = tuple[Partition, list[Entry], bool, list[bytes]]


@dataclass
class Prepared:
    """A batch ready to load: its COPY buffer and everything needed to ack it."""

    ids: list[bytes]
    batch: _native.EntryBatch
    measurements: _native.Measurements
    entries: list[Entry]
    buf: bytes
    rows: int
    dead: list[DeadLetter]
    read_at: float
    redelivered: bool = False
    deleted: int = 0  # entries among `ids` deleted from the stream while pending (nothing to load)
    input_bytes: int = 0  # of the entries read (ids, names and values)

    def release(self) -> None:
        """Drops what only loading needed (the raw entries, the parsed batch, the buffer)."""
        self.entries = []
        self.buf = b""
        self.batch = _EMPTY_BATCH
        self.measurements = _native.Measurements(0)
    part: Partition | None = None  # the stream it was read from (None: the only one)


@dataclass
class Stats:
    """What a consumer has done since it started."""

    started: float = field(default_factory=time.time)
    batches: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0  # dead letters written (not those skipped as written before)
    acked: int = 0  # entries acknowledged, as the acknowledgement script counted them
    deleted: int = 0  # entries deleted from the stream while pending: acknowledged, nothing to load
    reasons: Counter[str] = field(default_factory=Counter)
    last_error: str = ""

    def rate(self) -> float:
        elapsed = time.time() - self.started
        return self.inserted / elapsed if elapsed > 0 else 0.0


class Progress:
    """The seed's progress lines, at most one pair per `interval` seconds, the first one
    `interval` after the start (the first batches after a start are small: see ReadSize):

        ✓ Batch complete: 50 records inserted
        📊 Total: 150 | Rate: 35.23 files/sec
    """

    def __init__(self, write: Callable[[str], None] | None, interval: float = 1.0) -> None:
        self.write = write
        self.interval = interval
        self.pending = 0
        self.pending_dead: Counter[str] = Counter()
        self.last = time.monotonic()
        self.first_at: float | None = None

    def batch(self, inserted: int, dead: list[DeadLetter], stats: Stats, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.pending += inserted
        self.pending_dead.update(d.reason for d in dead)
        if self.write is None or (not force and now - self.last < self.interval):
            return
        self.flush(stats)

    def flush(self, stats: Stats) -> None:
        if self.write is None or (self.pending == 0 and not self.pending_dead):
            return
        self.write(f"✓ Batch complete: {self.pending} records inserted")
        if self.pending_dead:
            detail = ", ".join(f"{r}: {n}" for r, n in sorted(self.pending_dead.items()))
            self.write(f"⚠ Dead-lettered {sum(self.pending_dead.values())} entries ({detail})")
        self.write(f"📊 Total: {stats.inserted} | Rate: {stats.rate():.2f} files/sec")
        self.pending = 0
        self.pending_dead.clear()
        self.last = time.monotonic()


class Consumer:
    """One member of the consumer group. `run()` until `stop()` (or, with
    `drain=True`, until nothing new or pending is left)."""

    def __init__(
        self,
        settings: Settings,
        *,
        drain: bool = False,
        write: Callable[[str], None] | None = print,
        progress_interval: float = 1.0,
        storage: Storage | None = None,
        install_signals: bool = False,
        stop_timeout: float = 30.0,
    ) -> None:
        self.settings = settings
        self.drain = drain
        self.name = settings.consumer_name
        self.stats = Stats()
        self.progress = Progress(write, progress_interval)
        self.stopping = threading.Event()
        self.failed: BaseException | None = None
        self.stop_timeout = stop_timeout
        self._stopped_at: float | None = None
        # SIGTERM/SIGINT: a stop request (`filepipe consume` installs it before anything
        # else; a signal that came already stops this consumer before it reads).
        self._own_signals = install_signals and shutdown.installed() is None
        self._stop_request = shutdown.install() if install_signals else None
        if self._stop_request is not None:
            self._stop_request.listen(self._on_signal)
        self._storages: dict[str, Storage] = {}
        if storage is not None:
            self._storages[storage.name] = storage
        self.redis = stream.connect(settings)
        self.pool = db.create_pool(settings)
        self.loader = db.Loader(self.pool, settings)
        # Read batches waiting to be prepared: the reader reads the next batch while the
        # preparer parses, measures and encodes this one (measuring runs without the GIL).
        self.raw: queue.Queue[RawBatch | None] = queue.Queue(maxsize=1)
        self.queue: queue.Queue[Prepared | None] = queue.Queue(maxsize=settings.in_flight)
        self.acks: queue.Queue[tuple[Prepared, int, list[DeadLetter]] | None] = queue.Queue(
            maxsize=settings.in_flight
        )
        self.binary = settings.copy_format == "binary"
        self._errors: dict[str, str] = {}
        # (stream, entry id) of every entry read and not yet acknowledged by this process.
        self._in_flight: set[tuple[str, bytes]] = set()
        self._in_flight_lock = threading.Lock()
        # One Redis outage is one warning, whichever threads wait it out.
        self.redis_outage = Outage("Redis", self._error_sink("Redis"))
        self.redis_backoff = Backoff("Redis", stop=self.stopping, outage=self.redis_outage)
        # The loader keeps retrying through a stop, until the stop deadline abandons it.
        self.abandon = threading.Event()
        self.ack_backoff = Backoff("Redis", stop=self.abandon, outage=self.redis_outage)
        # Dead letters a full Redis refused, by stream, waiting (their entries pending) to be
        # written again while later batches are acknowledged; retried on this backoff.
        self._held: dict[str, list[DeadLetter]] = {}
        self._held_bytes = 0
        self._held_retry_at = 0.0
        self._held_touched = 0.0
        self.held_backoff = Backoff("Redis", stop=self.abandon, outage=self.redis_outage)
        self.pg_backoff = Backoff("PostgreSQL", stop=self.abandon, on_error=self._error_sink("PostgreSQL"),
                                  on_wait=self._heartbeat)
        # A table that refuses every row (a constraint, trigger or NOT NULL column no row
        # satisfies, a revoked privilege, a read-only database) is waited out like an outage.
        table = f"PostgreSQL table {settings.table}"
        refusal = Outage(table, self._error_sink("table"), state="refuses rows",
                         recovery="accepts rows again")
        self.table_backoff = Backoff(table, stop=self.abandon, outage=refusal, on_wait=self._heartbeat)
        self.storage_backoff = Backoff("Storage", stop=self.stopping, on_error=self._error_sink("Storage"))
        # Every stream this consumer reads: the stream, or each of its partitions.
        self.parts = partitions(settings)
        self.read_size = ReadSize(settings.batch_size, settings.batch_bytes, settings.max_entry_bytes)
        self._turn = 0  # the partition whose turn it is to be read first
        self._last_claim = 0.0
        self._claim_cursor: dict[int, bytes] = {}
        self._last_heartbeat = 0.0
        self.host = socket.gethostname()
        # Trims what every group has acknowledged, caps dead letters, removes departed consumers.
        self.housekeeper = Housekeeper(settings, self.redis, self.parts, self.name,
                                       on_error=self._error_sink("Trimming"))

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Asks the consumer to finish the batches in hand and return."""
        self._stop_deadline()
        self.stopping.set()

    def _stop_deadline(self) -> float:
        """When a stop gives up on the batches in hand (they stay pending and are delivered
        again): `stop_timeout` after it began, one deadline for every stage."""
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return self._stopped_at + self.stop_timeout

    def _on_signal(self, signum: int) -> None:
        # A second signal leaves at once (shutdown.StopRequest): unacknowledged entries
        # stay pending and are redelivered, so nothing is lost.
        log.warning("%s received: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        self.stop()

    def _finish_loader(self, loader: threading.Thread) -> None:
        """Lets the loader commit and acknowledge what is in hand, within the stop
        timeout; past it, abandons the rest (it stays pending and is redelivered)."""
        if not loader.is_alive():
            return
        deadline = self._stop_deadline()
        while True:
            try:
                self.queue.put(None, timeout=0.2)
                break
            except queue.Full:
                if time.monotonic() > deadline or not loader.is_alive():
                    break
        loader.join(max(0.0, deadline - time.monotonic()))
        if loader.is_alive():
            log.warning("stop timeout (%.0f s) reached: leaving the batches in hand unacknowledged; "
                        "they will be delivered again", self.stop_timeout)
            self.abandon.set()
            # The loader now drops what is queued; make sure it sees the end marker.
            end = time.monotonic() + 10
            while loader.is_alive() and time.monotonic() < end:
                with contextlib.suppress(queue.Full):
                    self.queue.put(None, timeout=0.2)
                loader.join(0.2)

    def _error_sink(self, service: str) -> Callable[[str], None]:
        return functools.partial(self._note_error, service)

    def _note_error(self, service: str, message: str) -> None:
        """The heartbeat's `last_error`: the outages going on now ("" when none is)."""
        if message:
            self._errors[service] = message
        else:
            self._errors.pop(service, None)
        self.stats.last_error = "; ".join(self._errors.values())
        if service != "Redis":  # (a heartbeat cannot tell of Redis's own outage)
            self._heartbeat(force=True)  # `status` hears of it now, not a few backoffs later

    def table_refusal(self) -> str:
        """Why the events table refuses every row right now ("" when it does not)."""
        b = self.table_backoff
        return b.last_message if b.down_since is not None else ""

    def storage(self, mode: str) -> Storage:
        if mode not in self._storages:
            self._storages[mode] = open_storage(self.settings, mode)
        return self._storages[mode]

    def _unservable(self, mode: str) -> str | None:
        """Why this consumer cannot serve entries that name storage `mode`, or None. Its
        own STORAGE_MODE it always serves (a fault there is waited out); another one only
        if it is set up for it: S3 with S3_BUCKET, local files with an existing
        LOCAL_STORAGE_DIR. An entry it cannot serve is dead-lettered, not waited for."""
        s = self.settings
        if mode == s.storage_mode:
            return None
        why = f"storage '{mode}' is not available on this consumer (its STORAGE_MODE is {s.storage_mode})"
        if mode == "s3":
            if not s.s3_bucket:
                return f"{why}: S3_BUCKET is not set"
            try:
                self.storage(mode)
            except ConfigError as e:
                return f"{why}: {e}"
        elif mode == "local" and not Path(s.local_storage_dir).is_dir():
            return f"{why}: LOCAL_STORAGE_DIR {s.local_storage_dir} does not exist"
        return None

    def run(self) -> Stats:
        """Consumes until stopped (or drained). Returns the totals."""
        loader = threading.Thread(target=self._load_loop, name="filepipe-loader", daemon=True)
        preparer = threading.Thread(target=self._prepare_loop, name="filepipe-preparer", daemon=True)
        try:
            # The configured storage: a setting it refuses is a configuration error, told
            # before anything is read.
            self.storage(self.settings.storage_mode)
            for part in self.parts:
                if self.stopping.is_set():
                    break
                self.redis_backoff.call(
                    lambda p=part: stream.ensure_group(self.redis, p.stream, self.settings.group),  # type: ignore[misc]
                    is_transient_redis,
                )
            if not self.stopping.is_set():
                self._check_table()
            if not self.stopping.is_set():
                loader.start()
                preparer.start()
                self.housekeeper.start()
                self._read_loop()
        except Abandoned:
            pass  # stopped while waiting for Redis at the start: nothing was read
        finally:
            self._finish_preparer(preparer)
            self._finish_loader(loader)
            self.housekeeper.stop()
            self.progress.flush(self.stats)
            self._remove_heartbeat()
            self.pool.close()
            self.redis.close()
            for st in self._storages.values():
                st.close()
            if self._stop_request is not None:
                self._stop_request.unlisten(self._on_signal)
                if self._own_signals:
                    shutdown.uninstall()
        if self.failed is not None:
            raise self.failed
        return self.stats

    def _check_table(self) -> None:
        """Refuses at once a table this version cannot load (SchemaError: one line naming
        `filepipe init-db`, exit 2). With PostgreSQL unreachable now, the first load checks
        instead (db.Loader), so an outage at start is waited out as ever."""
        try:
            with db.connect(self.settings) as conn:
                db.check_layout(conn, self.settings.table)
        except psycopg.Error:
            pass

    # -- reading ---------------------------------------------------------------------

    def _read_loop(self) -> None:
        s = self.settings
        parts = self.parts
        # First, this consumer's own pending entries, partition by partition.
        history: dict[int, bytes] = dict.fromkeys(range(len(parts)), b"0")
        while not self.stopping.is_set() and self.failed is None:
            self._heartbeat()
            if history:
                i, after = next(iter(history.items()))
                entries = self._redis(
                    lambda p=parts[i], h=after: stream.read_own_pending(  # type: ignore[misc]
                        self.redis, p.stream, s.group, self.name, self.read_size.count, h
                    )
                )
                if entries is None:
                    continue
                if not entries:
                    del history[i]
                    continue
                history[i] = entries[-1][0]
                self._submit(parts[i], entries, redelivered=True)
                continue
            if self._claim_due() and self._reclaim_all():
                continue
            got = self._read_new()
            if got is None:
                continue
            part, entries = got
            if entries:
                self._submit(part, entries, redelivered=False)
                continue
            if self.drain:
                # Nothing new: wait for the loader, then leave if nothing of ours is pending
                # and no dead consumer's entries are waiting to be reclaimed.
                self._wait_idle()
                if self.failed is not None or self.stopping.is_set():
                    return
                mine = self._redis(
                    lambda: [stream.pending_count(self.redis, p.stream, s.group, self.name) for p in parts]
                )
                if mine is None:
                    continue
                if any(mine):
                    history = {i: b"0" for i, n in enumerate(mine) if n}
                    continue
                if self._reclaim_all():
                    continue
                # Entries still pending elsewhere belong to a live consumer (wait for it) or
                # to a dead one (reclaimed once idle long enough).
                group_pending = self._redis(
                    lambda: sum(stream.pending_count(self.redis, p.stream, s.group) for p in parts)
                )
                if group_pending == 0:
                    return
                self.stopping.wait(0.2)

    def _read_new(self) -> tuple[Partition, list[Entry]] | None:
        """Never-delivered entries, from one stream. With partitions, each in turn: a
        read that does not block on every partition, starting after the one read last,
        then, if all are empty, a short blocking read on one (a cluster cannot block on
        streams in different hash slots at once). Returns None after a Redis fault, and
        no entries when there is nothing new."""
        s = self.settings
        parts = self.parts
        if len(parts) == 1:
            block = min(s.block_ms, 200) if self.drain else s.block_ms
            entries = self._redis(
                lambda: stream.read_new(self.redis, parts[0].stream, s.group, self.name, self.read_size.count,
                                        block)
            )
            return None if entries is None else (parts[0], entries)
        for k in range(len(parts)):
            part = parts[(self._turn + k) % len(parts)]
            entries = self._redis(
                lambda p=part: stream.read_new(  # type: ignore[misc]
                    self.redis, p.stream, s.group, self.name, self.read_size.count, 0
                )
            )
            if entries is None or entries:
                # After a fault too, the next read starts at the next partition: one whose
                # node is down does not keep the others from being read.
                self._turn = (self._turn + k + 1) % len(parts)
                return None if entries is None else (part, entries)
        part = parts[self._turn]
        self._turn = (self._turn + 1) % len(parts)
        if self.drain:
            return part, []
        block = min(s.block_ms, 100)
        entries = self._redis(
            lambda: stream.read_new(self.redis, part.stream, s.group, self.name, self.read_size.count, block)
        )
        return None if entries is None else (part, entries)

    def _redis(self, fn: Callable[[], Any]) -> Any:
        """Runs one Redis read; on a passing fault backs off and returns None."""
        try:
            result = fn()
        except Exception as e:
            if not is_transient_redis(e):
                raise
            self.redis_backoff.failed(e)
            return None
        self.redis_backoff.succeeded()
        return result

    def _claim_due(self) -> bool:
        return time.monotonic() - self._last_claim >= self.settings.claim_idle_ms / 2000

    def _reclaim_all(self) -> bool:
        """Reclaims idle entries on every stream and submits them. True if any were."""
        found = False
        for part in self.parts:
            claimed = self._reclaim(part)
            if claimed:
                found = True
                self._submit(part, claimed, redelivered=True)
        return found

    def _reclaim(self, part: Partition) -> list[Entry]:
        """XAUTOCLAIM: takes over entries idle longer than `claim_idle_ms` (their
        consumer died or stalled). Returns them; the next call continues the scan."""
        s = self.settings
        key = part.index or 0
        self._last_claim = time.monotonic()
        reply = self._redis(
            lambda: self.redis.xautoclaim(
                part.stream, s.group, self.name, min_idle_time=s.claim_idle_ms,
                start_id=self._claim_cursor.get(key, b"0-0"), count=self.read_size.count,
            )
        )
        if reply is None:
            return []
        cursor, claimed = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        self._claim_cursor[key] = cursor if cursor not in (b"0-0", "0-0") else b"0-0"
        # XAUTOCLAIM cannot tell our own entries still in flight (a long outage makes them
        # idle in Redis's eyes) from a dead consumer's: they are already being processed.
        with self._in_flight_lock:
            entries: list[Entry] = [e for e in claimed if (part.stream, e[0]) not in self._in_flight]
            # Ours in flight are counted with their batch.
            gone = [i for i in deleted if (part.stream, i) not in self._in_flight]
        if deleted:
            # Entries deleted from the stream while pending: XAUTOCLAIM (Redis 7) has removed
            # them from the group's pending list, which acknowledges them. (Before 7.0 it
            # returned them among the claimed entries, without fields, like a history read.)
            self.stats.acked += len(deleted)
            metrics.record_acked(len(deleted), [])
        if gone:
            self._log_deleted(part, gone)
            self.stats.deleted += len(gone)
            metrics.record_deleted(len(gone))
        if entries:
            log.info("reclaimed %d entries idle for more than %d ms", len(entries), s.claim_idle_ms)
        return entries

    def _submit(self, part: Partition, entries: list[Entry], *, redelivered: bool) -> None:
        """Hands a batch just read to the preparer. An entry read again without its fields
        (this consumer's history, a claim) was deleted from the stream while pending: there
        is nothing to load or to dead-letter, it is only acknowledged, and counted."""
        keys = [(part.stream, e[0]) for e in entries]
        gone = [e[0] for e in entries if not e[1]]  # nil (or, parsed by redis-py, empty)
        if gone:
            entries = [e for e in entries if e[1]]
            self._log_deleted(part, gone)
        with self._in_flight_lock:
            self._in_flight.update(keys)
        while True:
            try:
                self.raw.put((part, entries, redelivered, gone), timeout=0.5)
                return
            except queue.Full:
                if (self.failed is not None or self.abandon.is_set()
                        or (self.stopping.is_set() and time.monotonic() > self._stop_deadline())):
                    self._landed(part.stream, [k[1] for k in keys])
                    return  # not handed over: these entries stay pending and are delivered again

    def _log_deleted(self, part: Partition, ids: list[bytes]) -> None:
        shown = ", ".join(i.decode(errors="replace") for i in ids[:3]) + (" …" if len(ids) > 3 else "")
        log.warning("%d entr%s of %s deleted from the stream while pending (%s): acknowledged, "
                    "with nothing to load or dead-letter", len(ids), "y" if len(ids) == 1 else "ies",
                    part.stream, shown)

    def _prepare_loop(self) -> None:
        """Prepares the batches the reader hands over, in order, for the loaders. At a stop
        it still prepares and hands over what it was given: the batch in hand finishes."""
        while True:
            item = self.raw.get()
            try:
                if item is None:
                    return
                part, entries, redelivered, gone = item
                ids = [e[0] for e in entries] + gone
                if self.failed is not None or self.abandon.is_set():
                    self._landed(part.stream, ids)
                    continue
                try:
                    prepared = self._prepare(part, entries, redelivered=redelivered, gone=gone)
                except Abandoned:
                    self._landed(part.stream, ids)
                    continue  # these entries stay pending and are delivered again
                while not self._put(prepared):
                    if self.failed is not None or self.abandon.is_set():
                        self._landed(part.stream, ids)
                        break
            except BaseException as e:  # surfaced by run() in the reader's thread
                self.failed = e
                self.stopping.set()
            finally:
                self.raw.task_done()

    def _finish_preparer(self, preparer: threading.Thread) -> None:
        """Lets the preparer hand over what it holds, then ends it."""
        if not preparer.is_alive():
            return
        deadline = self._stop_deadline()
        while preparer.is_alive():
            try:
                self.raw.put(None, timeout=0.2)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    self.abandon.set()
        while preparer.is_alive():
            preparer.join(0.2)
            if time.monotonic() > deadline:
                self.abandon.set()

    def _landed(self, stream_name: str, ids: list[bytes]) -> None:
        """These entries are no longer in this consumer's hands (acknowledged, or let go)."""
        with self._in_flight_lock:
            self._in_flight.difference_update((stream_name, i) for i in ids)

    def _put(self, prepared: Prepared) -> bool:
        try:
            self.queue.put(prepared, timeout=0.5)
            return True
        except queue.Full:
            return False

    def _wait_idle(self) -> None:
        while (self.raw.unfinished_tasks or self.queue.unfinished_tasks or self.acks.unfinished_tasks
               or self._held) and self.failed is None and not self.stopping.is_set():
            time.sleep(0.005)
            if self._held:
                self._heartbeat()

    # -- preparing a batch -------------------------------------------------------------

    def _deliveries(self, part: Partition, entries: list[Entry]) -> dict[bytes, int]:
        s = self.settings
        ids = [e[0] for e in entries]
        rows = self._redis(
            lambda: self.redis.xpending_range(
                part.stream,
                s.group,
                min=min(ids, key=stream.id_key),
                max=max(ids, key=stream.id_key),
                count=len(ids) * 2,
                consumername=self.name,
            )
        )
        return {r["message_id"]: int(r["times_delivered"]) for r in rows or []}

    def _prepare(self, part: Partition, entries: list[Entry], *, redelivered: bool,
                 gone: list[bytes] | None = None) -> Prepared:
        s = self.settings
        gone = gone or []
        read_at = time.monotonic()
        dead: list[DeadLetter] = []
        deliveries: dict[bytes, int] = self._deliveries(part, entries) if redelivered and entries else {}
        if deliveries:
            over = [e for e in entries if deliveries.get(e[0], 0) > s.max_deliveries]
            if over:
                over_ids = {e[0] for e in over}
                for entry_id, fields in over:
                    n = deliveries[entry_id]
                    dead.append(
                        DeadLetter(
                            entry_id,
                            stream.fields_dict(fields),
                            "max_deliveries",
                            f"entry {entry_id.decode()}: delivered {n} times "
                            f"(MAX_DELIVERIES={s.max_deliveries})",
                            n,
                        )
                    )
                entries_ok = [e for e in entries if e[0] not in over_ids]
            else:
                entries_ok = entries
        else:
            entries_ok = entries
        batch = _native.parse_entries(entries_ok, s.storage_mode, id_prefix=part.id_prefix,
                                      max_fields=s.max_entry_fields, max_bytes=s.max_entry_bytes)
        self.read_size.observe(len(entries_ok), batch.input_bytes)
        for pos, _entry_id, reason, message in batch.rejects:
            fields = stream.fields_dict(entries_ok[pos][1])
            dead.append(
                DeadLetter(entries_ok[pos][0], fields, reason, message, deliveries.get(entries_ok[pos][0], 1))
            )
        measurements = self._measure(batch)
        positions = batch.positions
        for index, reason, message, _transient in measurements.failures():
            entry_id, fields = entries_ok[positions[index]]
            dead.append(
                DeadLetter(
                    entry_id,
                    stream.fields_dict(fields),
                    reason,
                    f"entry {entry_id.decode()}: {message}",
                    deliveries.get(entry_id, 1),
                )
            )
        buf = _native.encode_copy(batch, measurements, self.name, self.binary, stream=s.stream)
        rows = len(measurements.measured())
        return Prepared(
            ids=[e[0] for e in entries] + gone,
            batch=batch,
            measurements=measurements,
            entries=entries_ok,
            buf=buf,
            rows=rows,
            dead=dead,
            read_at=read_at,
            redelivered=redelivered,
            deleted=len(gone),
            input_bytes=batch.input_bytes,
            part=part,
        )

    def _measure(self, batch: _native.EntryBatch) -> _native.Measurements:
        """Measures every record's file; retries the whole measurement while a
        failure is transient (out of file descriptors, S3 throttling)."""
        by_storage: dict[str, list[int]] = {}
        for i, (mode, _key) in enumerate(batch.locations()):
            by_storage.setdefault(mode, []).append(i)
        while True:
            m = _native.Measurements(len(batch))
            try:
                for mode, indices in by_storage.items():
                    problem = self._unservable(mode)
                    if problem is not None:
                        for i in indices:
                            m.fail(i, "bad_storage", problem)
                        continue
                    self.storage(mode).measure(batch, indices, m, self.settings.max_file_bytes)
            except StorageError as e:
                self.storage_backoff.failed(e)
                if self.stopping.is_set():
                    raise Abandoned("storage: gave up at stop") from e
                continue
            transient = [f for f in m.failures() if f[3]]
            if not transient:
                self.storage_backoff.succeeded()
                return m
            self.storage_backoff.failed(TransientError(transient[0][2]))
            if self.stopping.is_set():
                raise Abandoned("storage: gave up at stop")

    # -- loading and acknowledging ------------------------------------------------------

    def _load_loop(self) -> None:
        """Runs one loader per pooled connection and the acknowledger: several COPYs can
        be in flight (PostgreSQL works on one while the next is sent), and the next COPY
        starts while the previous batch is being acknowledged."""
        acker = threading.Thread(target=self._ack_loop, name="filepipe-acker", daemon=True)
        workers = [
            threading.Thread(target=self._load_worker, name=f"filepipe-loader-{i}", daemon=True)
            for i in range(self.settings.pool_size)
        ]
        acker.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.acks.put(None)
        acker.join()

    def _load_worker(self) -> None:
        while True:
            prepared = self.queue.get()
            try:
                if prepared is None:
                    self.queue.put(None)  # for the sibling loaders
                    return
                if self.failed is None and not self.abandon.is_set():
                    inserted, row_dead = self._load(prepared)
                    crash_point("after_commit")
                    # Committed: only the ids and dead letters are needed from here on.
                    prepared.release()
                    self.acks.put((prepared, inserted, row_dead))
            except Abandoned:
                pass
            except BaseException as e:  # surfaced by run() in the reader's thread
                self.failed = e
                self.stopping.set()
            finally:
                self.queue.task_done()

    def _ack_loop(self) -> None:
        while True:
            try:
                item = self.acks.get(timeout=self._held_wait())
            except queue.Empty:
                self._retry_held()
                continue
            try:
                if item is None:
                    # The last batch is in: dead letters still held back get the stop
                    # timeout to be written, then their entries stay pending.
                    while self._held and self.failed is None and not self.abandon.is_set():
                        self._retry_held(wait=True)
                    return
                if self.failed is None and not self.abandon.is_set():
                    self._finish_batch(*item)
                    # Many held back: wait for Redis to take them before acknowledging more.
                    while self._held_bytes > HELD_MAX_BYTES and not self.abandon.is_set():
                        self._retry_held(wait=True)
            except Abandoned:
                pass
            except BaseException as e:
                self.failed = e
                self.stopping.set()
            finally:
                self.acks.task_done()

    def _finish_batch(self, p: Prepared, inserted: int, row_dead: list[DeadLetter]) -> None:
        dead = p.dead + row_dead
        part = p.part or self.parts[0]
        result = self._ack(part, p.ids, dead)
        held = {d.source_id for d in result.held}
        self._landed(part.stream, [i for i in p.ids if i not in held])
        self.housekeeper.acked(result.acked)
        crash_point("after_ack")
        st = self.stats
        st.batches += 1
        st.inserted += inserted
        st.duplicates += p.rows - len(row_dead) - inserted
        st.deleted += p.deleted
        self._count(result)
        self._hold(part, result)
        metrics.record_batch(len(p.ids), result.acked, inserted, p.rows - len(row_dead) - inserted,
                             result.written, time.monotonic() - p.read_at, p.input_bytes)
        metrics.record_deleted(p.deleted)
        self.progress.batch(inserted, result.written, st)
        self._heartbeat()

    def _count(self, result: AckResult) -> None:
        """Adds what the acknowledgement script did to the totals."""
        st = self.stats
        st.dead_lettered += len(result.written)
        st.acked += result.acked
        st.reasons.update(d.reason for d in result.written)

    def _hold(self, part: Partition, result: AckResult) -> None:
        """Keeps the dead letters a full Redis refused, to write them once it has room;
        their entries stay pending (and in this consumer's hands) until then."""
        if not result.held:
            return
        self._put_held(part.stream, result.held)
        error = redis.exceptions.OutOfMemoryError(result.refusal.removeprefix("OOM "))
        self._held_retry_at = time.monotonic() + self.held_backoff.record(error)

    def _put_held(self, stream_name: str, dead: list[DeadLetter]) -> None:
        if dead:
            self._held.setdefault(stream_name, []).extend(dead)
            self._held_bytes += sum(d.size() for d in dead)

    def _take_held(self, stream_name: str, n: int | None = None) -> list[DeadLetter]:
        """Removes and returns (up to `n` of) the dead letters held for `stream_name`."""
        held = self._held.pop(stream_name, [])
        if n is not None and len(held) > n:
            self._held[stream_name] = held[n:]
            held = held[:n]
        self._held_bytes -= sum(d.size() for d in held)
        return held

    def _held_count(self) -> int:
        return sum(len(v) for v in self._held.values())

    def _held_wait(self) -> float | None:
        """How long the acknowledger may wait for a batch before retrying held dead letters."""
        if not self._held:
            return None
        return max(0.0, self._held_retry_at - time.monotonic())

    def _retry_held(self, *, wait: bool = False) -> None:
        """Tries again to write the dead letters a full Redis refused (and to acknowledge
        their entries). With `wait`, first waits for the backoff's delay."""
        if wait:
            self.abandon.wait(self._held_wait() or 0.0)
        if time.monotonic() < self._held_retry_at or self.abandon.is_set():
            return
        self._keep_held()
        for part in self.parts:
            held = self._take_held(part.stream, self.settings.batch_size)  # the rest: next retry
            if not held:
                continue
            ids = [d.source_id for d in held]
            result = self._ack(part, ids, held)
            still = {d.source_id for d in result.held}
            self._landed(part.stream, [i for i in ids if i not in still])
            self._count(result)
            metrics.record_acked(result.acked, result.written)
            self.progress.batch(0, result.written, self.stats)
            self._hold(part, result)
        if not self._held:
            self.held_backoff.succeeded()
        self._heartbeat()

    def _keep_held(self) -> None:
        """Claims the held entries again (XCLAIM JUSTID: their delivery count stays, and a
        full Redis allows it), so that no other consumer takes over entries that are only
        waiting for Redis to have room."""
        now = time.monotonic()
        if now - self._held_touched < self.settings.claim_idle_ms / 2000:
            return
        self._held_touched = now
        s = self.settings
        for part in self.parts:
            held = self._held.get(part.stream)
            if not held:
                continue
            try:
                kept = set(self.redis.xclaim(part.stream, s.group, self.name, 0,
                                             [d.source_id for d in held], justid=True))
            except (redis.RedisError, RedisClusterException) as e:
                if not is_transient_redis(e):
                    raise
                continue  # tried again at the next retry
            gone = [d.source_id for d in held if d.source_id not in kept]
            if gone:
                # XCLAIM drops entries deleted from the stream from the pending list; the others
                # were acknowledged elsewhere. Neither needs its dead letter any more.
                held = self._take_held(part.stream)
                self._put_held(part.stream, [d for d in held if d.source_id in kept])
                self._landed(part.stream, gone)
                deleted = [i for i in gone if not self.redis.xrange(part.stream, i, i, count=1)]
                if deleted:
                    # XCLAIM removes them from the pending list: acknowledged.
                    self._log_deleted(part, deleted)
                    self.stats.deleted += len(deleted)
                    self.stats.acked += len(deleted)
                    metrics.record_deleted(len(deleted))
                    metrics.record_acked(len(deleted), [])

    def _ack(self, part: Partition, ids: list[bytes], dead: list[DeadLetter]) -> AckResult:
        """Writes the dead letters and acknowledges, in one atomic script. If the reply is
        lost, the script may or may not have run: before running it again, ask Redis which
        entries are still pending, and run it for those (it would write no dead letter
        twice anyway). Entries no longer pending then are counted as the lost run's."""
        s = self.settings
        done = AckResult()
        while True:
            try:
                result = metrics.timed(metrics.ACK_SECONDS, stream.ack, self.redis, part.stream, s.group, ids,
                                       dead, dead_stream=part.dead_stream, consumer=self.name)
                self.ack_backoff.succeeded()
                done.add(result)
                return done
            except Exception as e:
                if not is_transient_redis(e):
                    raise
                self.ack_backoff.failed(e)
                if self.abandon.is_set():
                    raise Abandoned("Redis: gave up acknowledging") from e
            while True:
                try:
                    pending = stream.still_pending(self.redis, part.stream, s.group, ids)
                    break
                except Exception as e:
                    if not is_transient_redis(e):
                        raise
                    self.ack_backoff.failed(e)
                    if self.abandon.is_set():
                        raise Abandoned("Redis: gave up acknowledging") from e
            # What is no longer pending, the lost run (or another consumer) has done.
            done.acked += sum(1 for i in ids if i not in pending)
            done.written += [d for d in dead if d.source_id not in pending]
            ids = [i for i in ids if i in pending]
            dead = [d for d in dead if d.source_id in pending]
            if not ids:
                self.ack_backoff.succeeded()
                return done

    def _load(self, p: Prepared) -> tuple[int, list[DeadLetter]]:
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
        dead-lettered too; a table that runs every probe out of time waits."""
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
        return self.pg_backoff.call(
            lambda: metrics.timed(metrics.COPY_SECONDS, self.loader.load, buf, rows, direct=direct),
            is_transient_pg,
        )

    def _probe_table(self) -> None:
        """Raises _TableRefuses unless the table takes a row like the ones it holds."""
        try:
            self.pg_backoff.call(lambda: self.loader.probe(self.name), is_transient_pg)
        except psycopg.Error as e:
            if not _is_refusal(e):
                raise _fatal_db_error(e, self.settings) from e
            raise _TableRefuses(e) from e

    def _load_isolating(self, p: Prepared, *, direct: bool) -> tuple[int, list[DeadLetter]]:
        try:
            return self._load_buffer(p.buf, p.rows, direct=direct), []
        except psycopg.Error as e:
            if not _is_refusal(e):
                raise _fatal_db_error(e, self.settings) from e
            first = e
        found = _Isolation()
        try:
            self._probe_table()
            indices = p.measurements.measured()
            if len(indices) == 1:
                self._refused_alone(p, indices, p.buf, first, found)
            else:
                mid = len(indices) // 2
                self._bisect(p, indices[:mid], found)
                self._bisect(p, indices[mid:], found)
            if found.unconfirmed:
                self._probe_table()
        except _TableRefuses as e:
            e.inserted = found.inserted
            raise
        return found.inserted, [self._rejected(p, index, message) for index, message in found.refused]

    def _bisect(self, p: Prepared, indices: list[int], found: _Isolation) -> None:
        buf = _native.encode_copy(
            p.batch, p.measurements, self.name, self.binary, only=indices, stream=self.settings.stream
        )
        try:
            found.loaded(self._load_buffer(buf, len(indices)))
            return
        except psycopg.Error as e:
            if not _is_refusal(e):
                raise _fatal_db_error(e, self.settings) from e
            if len(indices) == 1:
                self._refused_alone(p, indices, buf, e, found)
                return
        mid = len(indices) // 2
        self._bisect(p, indices[:mid], found)
        self._bisect(p, indices[mid:], found)

    def _refused_alone(self, p: Prepared, indices: list[int], buf: bytes, e: psycopg.Error,
                       found: _Isolation) -> None:
        """One row the table refused on its own. Out of time, it is tried once more (a lock
        or a burst of load may have been the cause)."""
        message = db.first_line(e)
        if e.sqlstate == QUERY_CANCELED:
            try:
                found.loaded(self._load_buffer(buf, 1))
                return
            except psycopg.Error as again:
                if not _is_refusal(again):
                    raise _fatal_db_error(again, self.settings) from again
                message = db.first_line(again)
                if again.sqlstate == QUERY_CANCELED:
                    message = (f"it took longer than the statement timeout (FILEPIPE_STATEMENT_TIMEOUT_MS="
                               f"{self.settings.statement_timeout_ms}) twice on its own: {message}")
        found.refused.append((indices[0], message))
        found.unconfirmed = True

    def _rejected(self, p: Prepared, index: int, message: str) -> DeadLetter:
        entry_id, raw_fields = p.entries[p.batch.positions[index]]
        text = f"entry {entry_id.decode()}: PostgreSQL refused the row: {message}"
        log.warning("%s", text)
        return DeadLetter(entry_id, stream.fields_dict(raw_fields), "db_rejected", text)

    # -- liveness ---------------------------------------------------------------------

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < HEARTBEAT_INTERVAL_S:
            return
        self._last_heartbeat = now
        st = self.stats
        beat = Heartbeat(
            name=self.name,
            host=self.host,
            pid=os.getpid(),
            stream=self.settings.stream,
            partitions=self.settings.partitions,
            group=self.settings.group,
            started=st.started,
            updated=time.time(),
            inserted=st.inserted,
            duplicates=st.duplicates,
            dead_lettered=st.dead_lettered,
            dead_letters_waiting=self._held_count(),
            deleted=st.deleted,
            batches=st.batches,
            rate=round(st.rate(), 2),
            last_error=st.last_error,
        )
        # One heartbeat per stream read, beside it (on a cluster, in its hash slot).
        value = beat.to_json()
        # Liveness is best effort; the read loop reports Redis outages.
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            stream.set_heartbeats(self.redis, {heartbeat_key(p.stream, self.name): value for p in self.parts},
                                  HEARTBEAT_TTL_S)

    def _remove_heartbeat(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for part in self.parts:
                pipe.delete(heartbeat_key(part.stream, self.name))
            pipe.execute()
        except (redis.RedisError, RedisClusterException):
            pass


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

    def __init__(self, error: psycopg.Error) -> None:
        super().__init__(f"SQLSTATE {error.sqlstate or '?'}: {db.first_line(error)}")
        self.inserted = 0  # rows of the batch committed before the refusal was found


def _is_refusal(e: psycopg.Error) -> bool:
    state = e.sqlstate or ""
    return state[:2] in _REFUSAL_CLASSES or state in _REFUSAL_STATES


def _fatal_db_error(e: psycopg.Error, settings: Settings) -> FilepipeError:
    state = e.sqlstate or ""
    if state == "42P01":
        return DatabaseError(f"table {settings.table} does not exist: run `filepipe init-db` first")
    return DatabaseError(f"PostgreSQL refused the batch ({state}): {db.first_line(e)}")
