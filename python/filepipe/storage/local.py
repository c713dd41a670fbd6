"""Files under a root directory on this host."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .. import _native
from ..config import Settings
from ..errors import StorageError
from .base import Storage, key_problem


class LocalStorage(Storage):
    """A root directory. Nothing outside it is ever read: the extension opens every
    file with the kernel confining resolution beneath the root (symlinks included),
    and refuses FIFOs, sockets and devices."""

    name = "local"

    def __init__(self, root: str | Path, hash_threads: int = 4) -> None:
        self.root = Path(root)
        self.hash_threads = hash_threads

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStorage:
        return cls(settings.local_storage_dir, settings.hash_threads)

    def describe(self) -> str:
        return f"local directory {self.root}"

    def ensure_root(self) -> None:
        """Creates the root directory if missing."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create LOCAL_STORAGE_DIR {self.root}: {e.strerror}") from e

    def put_file(self, src: Path, key: str, *, link: bool = False) -> None:
        """Copies `src` to `<root>/<key>` atomically (temp file + rename), or
        hard-links it when `link` is set and both are on one file system."""
        problem = key_problem(key)
        if problem is not None:
            raise StorageError(f"cannot store {src} as '{key}' in {self.root}: the key {problem[1]}")
        dest = self.root / key
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if link:
                try:
                    os.link(src, dest)
                    return
                except FileExistsError:
                    dest.unlink()
                    os.link(src, dest)
                    return
                except OSError:
                    pass
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".filepipe-")
            try:
                with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out, 1 << 20)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise StorageError(f"cannot store {src} as '{key}' in {self.root}: {e.strerror or e}") from e

    def remove(self, key: str) -> None:
        """Deletes `<root>/<key>` and the directories above it it leaves empty (not the root)."""
        dest = self.root / key
        try:
            dest.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete '{key}' from {self.root}: {e.strerror or e}") from e
        parent = dest.parent
        with contextlib.suppress(OSError):  # a directory that is not empty stays
            while parent != self.root and self.root in parent.parents:
                parent.rmdir()
                parent = parent.parent

    def measure(
        self, batch: _native.EntryBatch, indices: list[int], into: _native.Measurements, max_bytes: int
    ) -> None:
        if not self.root.is_dir():
            raise StorageError(f"LOCAL_STORAGE_DIR {self.root} does not exist or is not a directory")
        _native.measure_local(batch, str(self.root), max_bytes, self.hash_threads, into=into)
