"""The storage interface both backends implement."""

from __future__ import annotations

import re
import unicodedata
from abc import ABC, abstractmethod
from pathlib import Path

from .. import _native

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key_name(filename: str, limit: int = 120) -> str:
    """A file-system- and URL-safe version of a user's file name for use in a key:
    the original name is kept in the event, this is only where the bytes live."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = _UNSAFE.sub("_", base).strip("._") or "file"
    if len(base) > limit:
        stem, dot, ext = base.rpartition(".")
        ext = ext[:16] if dot else ""
        base = (stem if dot else base)[: limit - len(ext) - 1] + ("." + ext if ext else "")
    return base


def key_problem(key: str) -> tuple[str, str] | None:
    """(reason code, what is wrong) if `key` may not be stored or read, else None.

    Stricter than the entry parser (which refuses absolute and `..` keys): a `.`
    segment is refused too, because HTTP clients, proxies and S3-compatible servers
    may resolve dot segments in a request path, and a path-style S3 request names
    the bucket in that path. A key ending in `/` names a folder, not a file."""
    if not key:
        return "unsafe_key", "is empty"
    if key.startswith(("/", "\\")):
        return "unsafe_key", "is absolute"
    if "\x00" in key:
        return "nul_byte", "contains a NUL byte"
    if any(part in (".", "..") for part in key.replace("\\", "/").split("/")):
        return "unsafe_key", "has a '.' or '..' segment, which could resolve outside the storage root"
    if key.endswith(("/", "\\")):
        return "not_a_file", "names a folder, not a file"
    return None


class Storage(ABC):
    """A place files are put by the producer and measured by the consumer."""

    name: str

    @abstractmethod
    def put_file(self, src: Path, key: str) -> None:
        """Stores the file at `src` under `key`."""

    @abstractmethod
    def measure(
        self, batch: _native.EntryBatch, indices: list[int], into: _native.Measurements, max_bytes: int
    ) -> None:
        """Measures (size, sha256, content type) the records `indices` of `batch` whose
        storage is this backend, writing results or failures into `into`."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Deletes what `put_file` stored under `key` (nothing if it is not there)."""

    def describe(self) -> str:
        """Where this storage is, for messages (no secrets)."""
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections or threads."""
