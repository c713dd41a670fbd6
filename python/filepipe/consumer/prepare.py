"""Preparing a batch: read entries -> validated records -> measured files -> COPY buffer.

`prepare` is pure but for measuring the files, which it is handed (`Files.measure`:
the storage I/O, retried while a fault passes). Every dead letter is built here, by
`dead_letter`, with one message convention: `entry <id>: <what is wrong>`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import _native, stream
from ..config import Settings
from ..errors import ConfigError, StorageError, TransientError
from ..partitions import Partition
from ..retry import Abandoned, Backoff
from ..storage import Storage, open_storage
from ..stream import DeadLetter, Entries, Entry

_EMPTY_BATCH = _native.parse_entries([])


def dead_letter(entry: Entry, reason: str, detail: str, deliveries: int = 1) -> DeadLetter:
    """The dead letter of `entry`; its message is `entry <id>: <detail>` (a detail that
    already names the entry, as the extension's do, is kept as it is)."""
    entry_id, fields = entry
    prefix = f"entry {entry_id.decode(errors='replace')}: "
    message = detail if detail.startswith(prefix) else prefix + detail
    return DeadLetter(entry_id, stream.fields_dict(fields), reason, message, deliveries)


@dataclass
class Prepared:
    """A batch ready to load: its COPY buffer and everything needed to ack it."""

    ids: list[bytes]
    batch: _native.EntryBatch
    measurements: _native.Measurements
    entries: Entries
    buf: bytes
    rows: int
    dead: list[DeadLetter]
    read_at: float
    part: Partition
    redelivered: bool = False
    input_bytes: int = 0  # of the entries read (ids, names and values)

    def release(self) -> None:
        """Drops what only loading needed (the raw entries, the parsed batch, the buffer)."""
        self.entries = []
        self.buf = b""
        self.batch = _EMPTY_BATCH
        self.measurements = _native.Measurements(0)

    def entry(self, index: int) -> Entry:
        """The entry of record `index`."""
        return self.entries[self.batch.positions[index]]


def prepare(
    settings: Settings,
    name: str,
    part: Partition,
    entries: Entries,
    *,
    deliveries: dict[bytes, int],
    measure: Callable[[_native.EntryBatch], _native.Measurements],
    redelivered: bool,
    observe: Callable[[int, int, int], None] | None = None,
) -> Prepared:
    """Turns the entries read into a COPY buffer and the dead letters of those it
    refuses: delivered more than MAX_DELIVERIES times, invalid, or naming a file that
    cannot be loaded. `deliveries` are the times each entry was delivered (redeliveries
    only)."""
    s = settings
    read_at = time.monotonic()
    dead: list[DeadLetter] = []
    ok = entries
    if deliveries:
        over = {e[0] for e in entries if deliveries.get(e[0], 0) > s.max_deliveries}
        if over:
            dead += [
                dead_letter(
                    e,
                    "max_deliveries",
                    f"delivered {deliveries[e[0]]} times (MAX_DELIVERIES={s.max_deliveries})",
                    deliveries[e[0]],
                )
                for e in entries
                if e[0] in over
            ]
            ok = [e for e in entries if e[0] not in over]
    batch = _native.parse_entries(
        ok,
        s.storage_mode,
        id_prefix=part.id_prefix,
        max_fields=s.max_entry_fields,
        max_bytes=s.max_entry_bytes,
    )
    if observe is not None:
        observe(len(ok), batch.input_bytes, batch.last_input_bytes)
    for pos, _entry_id, reason, message in batch.rejects:
        dead.append(dead_letter(ok[pos], reason, message, deliveries.get(ok[pos][0], 1)))
    measurements = measure(batch)
    positions = batch.positions
    for index, reason, message, _transient in measurements.failures():
        entry = ok[positions[index]]
        dead.append(dead_letter(entry, reason, message, deliveries.get(entry[0], 1)))
    buf = _native.encode_copy(batch, measurements, name, s.copy_format == "binary", stream=s.stream)
    return Prepared(
        ids=_native.entry_ids(entries)[0],
        batch=batch,
        measurements=measurements,
        entries=ok,
        buf=buf,
        rows=len(measurements.measured()),
        dead=dead,
        read_at=read_at,
        part=part,
        redelivered=redelivered,
        input_bytes=batch.input_bytes,
    )


class Files:
    """The storages entries name, and measuring a batch's files in them."""

    def __init__(
        self,
        settings: Settings,
        backoff: Backoff,
        stopping: Callable[[], bool],
        storage: Storage | None = None,
    ) -> None:
        self.settings = settings
        self.backoff = backoff
        self.stopping = stopping
        self._storages: dict[str, Storage] = {}
        if storage is not None:
            self._storages[storage.name] = storage

    def storage(self, mode: str) -> Storage:
        if mode not in self._storages:
            self._storages[mode] = open_storage(self.settings, mode)
        return self._storages[mode]

    def close(self) -> None:
        for st in self._storages.values():
            st.close()

    def unservable(self, mode: str) -> str | None:
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

    def measure(self, batch: _native.EntryBatch) -> _native.Measurements:
        """Measures every record's file; retries the whole measurement while a
        failure is transient (out of file descriptors, S3 throttling)."""
        by_storage = batch.by_storage()
        while True:
            m = _native.Measurements(len(batch))
            try:
                for mode, indices in by_storage:
                    problem = self.unservable(mode)
                    if problem is not None:
                        for i in indices:
                            m.fail(i, "bad_storage", problem)
                        continue
                    self.storage(mode).measure(batch, indices, m, self.settings.max_file_bytes)
            except StorageError as e:
                self.backoff.failed(e)
                if self.stopping():
                    raise Abandoned("storage: gave up at stop") from e
                continue
            transient = [f for f in m.failures() if f[3]]
            if not transient:
                self.backoff.succeeded()
                return m
            self.backoff.failed(TransientError(transient[0][2]))
            if self.stopping():
                raise Abandoned("storage: gave up at stop")
