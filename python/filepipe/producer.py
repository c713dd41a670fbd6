"""The producer: stores files and XADDs one "file uploaded" event per file."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import redis

from . import stream
from .config import Settings
from .errors import FilepipeError, StorageError
from .observe.text import plural
from .partitions import stream_for
from .storage import Storage, open_storage, safe_key_name
from .storage.local import LocalStorage

PIPELINE_CHUNK = 1000


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Every regular file named or found below a named directory, in a stable order.
    Symlinks to files are followed; symlinked directories are not descended into."""
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    if f.is_file():
                        yield f
        elif p.is_file():
            yield p
        else:
            raise StorageError(f"{p} is not a file or directory")


def make_key(file_id: str, filename: str, now: datetime) -> str:
    """`YYYY/MM/DD/<file_id>/<safe name>`: unique, sortable by day, safe anywhere."""
    return f"{now:%Y/%m/%d}/{file_id}/{safe_key_name(filename)}"


@dataclass
class Event:
    """One "file uploaded" event, as XADDed."""

    fields: dict[str, str]


def event_for(
    file_id: str,
    filename: str,
    key: str,
    size: int,
    storage: str,
    now: datetime,
    content_type: str | None = None,
    extra: dict[str, str] | None = None,
) -> Event:
    """The stream fields of the event contract (DESIGN.md)."""
    fields = {
        "file_id": file_id,
        "filename": filename,
        "key": key,
        "size": str(size),
        "storage": storage,
        "uploaded_at": now.isoformat(timespec="microseconds").replace("+00:00", "Z"),
    }
    if content_type:
        fields["content_type"] = content_type
    if extra:
        for k, v in extra.items():
            fields.setdefault(k, v)
    return Event(fields)


class Producer:
    """Stores files in the configured storage and enqueues their events, pipelined."""

    def __init__(
        self, settings: Settings, storage: Storage | None = None, r: redis.Redis | None = None
    ) -> None:
        self.settings = settings
        self._owns_storage = storage is None
        self.storage = storage or open_storage(settings)
        self.redis = r or stream.connect(settings)
        self._pipe = self.redis.pipeline(transaction=False)
        self._queued = 0
        self._unsent: list[str] = []  # keys this producer stored for events not sent yet
        self._failed = False
        self.enqueued = 0

    def add(
        self,
        src: Path,
        *,
        filename: str | None = None,
        key: str | None = None,
        link: bool = False,
        extra: dict[str, str] | None = None,
    ) -> str:
        """Stores `src` (unless `key` names where it already is) and queues its event.
        Returns the file id."""
        file_id = str(uuid.uuid4())
        now = datetime.now(timezone.utc)
        name = filename or src.name
        if key is None:
            key = make_key(file_id, name, now)
            if isinstance(self.storage, LocalStorage):
                self.storage.put_file(src, key, link=link)
            else:
                self.storage.put_file(src, key)
            self._unsent.append(key)
        size = src.stat().st_size
        self.enqueue(event_for(file_id, name, key, size, self.storage.name, now, extra=extra))
        return file_id

    def enqueue(self, event: Event) -> None:
        """Queues one event; sent with the next chunk. With partitions, to the partition
        of its file id (a stable hash: see partitions.py)."""
        target = stream_for(self.settings, event.fields.get("file_id"))
        self._pipe.xadd(target, event.fields)  # type: ignore[arg-type]
        self._queued += 1
        if self._queued >= PIPELINE_CHUNK:
            self.flush()

    def flush(self) -> int:
        """Sends the queued events in one round trip. When Redis fails it, the files stored
        for them are removed again where Redis cannot have added any of the events (it could
        not be connected to), and the error says which files are left otherwise."""
        if self._queued:
            try:
                self._pipe.execute()
            except redis.RedisError as e:
                self._failed = True
                raise self._not_sent(e) from e
            self.enqueued += self._queued
            self._queued = 0
            self._unsent.clear()
        return self.enqueued

    def _not_sent(self, e: redis.RedisError) -> FilepipeError:
        error = stream.failure(self.settings, e)
        n = self.enqueued
        before = (
            f"{n} {plural(n, 'event was', 'events were')} enqueued before" if n else "no event was enqueued"
        )
        stored, self._unsent = self._unsent, []
        if not stored:
            return type(error)(f"{error}; {before}")
        # redis-py says "Error 111 connecting to …" when no command could be sent.
        if isinstance(e, redis.AuthenticationError) or "connecting to" in str(e):
            left = []
            for key in stored:
                try:
                    self.storage.remove(key)
                except StorageError:
                    left.append(key)
            if not left:
                removed = f"the {_files(len(stored))} stored for events not sent were removed again"
                return type(error)(f"{error}; {removed}, {before}")
            stored = left
        return type(error)(
            f"{error}; {_files(len(stored))} stored for events that may not have been added are left in "
            f"{self.storage.describe()} (first: {stored[0]}), {before}"
        )

    def produce(
        self,
        paths: Iterable[str | Path],
        *,
        link: bool = False,
        on_file: Callable[[Path], None] | None = None,
    ) -> int:
        """Stores and enqueues every file under `paths`. Returns how many were enqueued."""
        try:
            self.redis.ping()  # before anything is stored
        except redis.RedisError as e:
            self._failed = True
            error = stream.failure(self.settings, e)
            raise type(error)(f"{error}; nothing was stored") from e
        if isinstance(self.storage, LocalStorage):
            self.storage.ensure_root()
        for f in iter_files(paths):
            self.add(f, link=link)
            if on_file is not None:
                on_file(f)
        return self.flush()

    def close(self) -> None:
        """Sends what is queued (unless Redis failed already) and closes the connections."""
        try:
            if not self._failed:
                self.flush()
        finally:
            self.redis.close()
            if self._owns_storage:
                self.storage.close()


def _files(n: int) -> str:
    return f"{n} {plural(n, 'file')}"
