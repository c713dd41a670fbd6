"""What the benchmark measures with, and removes afterwards: synthetic events, scratch
streams, tables, files and objects. Every scratch name holds the run's tag."""

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .. import _native, db
from ..config import Settings
from .figures import MIB

SCRATCH_KEY_PREFIX = "filepipe:benchmark:"  # Redis keys of scratch streams
SCRATCH_TABLE_PREFIX = "filepipe_benchmark_"
SCRATCH_DIR_PREFIX = ".filepipe-benchmark-"  # under LOCAL_STORAGE_DIR; S3 keys too


def event_fields(i: int, key: str, size: int, storage: str) -> dict[bytes, bytes]:
    """The fields of a valid "file uploaded" entry for the file `key`."""
    return {
        b"file_id": str(uuid.uuid4()).encode(),
        b"filename": f"benchmark file {i}.bin".encode(),
        b"key": key.encode(),
        b"size": str(size).encode(),
        b"storage": storage.encode(),
    }


def synthetic_batch(
    n: int, *, first_id_ms: int, size: int, storage: str = "local", key_prefix: str = "benchmark/"
) -> tuple[_native.EntryBatch, _native.Measurements]:
    """`n` valid entries (ids `<first_id_ms + i>-0`) and their measurements, as the
    consumer would have them before encoding."""
    entries = [
        (f"{first_id_ms + i}-0".encode(), event_fields(i, f"{key_prefix}{i}.bin", size, storage))
        for i in range(n)
    ]
    batch = _native.parse_entries(entries, storage)
    m = _native.Measurements(len(batch))
    digest = hashlib.sha256(b"filepipe benchmark").digest()
    for i in range(len(batch)):
        m.set(i, size, digest, "application/octet-stream")
    return batch, m


def scratch_table(settings: Settings, tag: str) -> str:
    """A scratch table next to the events table (same schema)."""
    schema = settings.table.rsplit(".", 1)[0] + "." if "." in settings.table else ""
    return f"{schema}{SCRATCH_TABLE_PREFIX}{tag}"


def drop_table(settings: Settings) -> None:
    """Drops the scratch table `settings.table`, if it is there and the server answers."""
    with contextlib.suppress(psycopg.Error), db.connect(settings, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(db.table_ident(settings.table)))


def write_files(directory: Path, count: int, size: int, *, evict: bool) -> bool:
    """Writes `count` distinct files of `size` bytes. With `evict`, flushes them to disk
    and drops them from the page cache so they are read cold; returns whether it could."""
    directory.mkdir(parents=True, exist_ok=False)
    block = os.urandom(min(size, MIB))
    paths = []
    for i in range(count):
        p = directory / f"{i}.bin"
        with open(p, "wb") as out:
            prefix = f"{i}:".encode()
            written = 0
            while written < size:
                chunk = (prefix + block)[: size - written]
                out.write(chunk)
                written += len(chunk)
        paths.append(p)
    if not evict or not hasattr(os, "posix_fadvise"):
        return False
    os.sync()  # the pages must be clean to be dropped
    cold = True
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            cold = False
        finally:
            os.close(fd)
    return cold


def delete_objects(storage: Any, keys: list[str]) -> None:
    """Deletes the scratch objects `keys` from S3 (nothing for other storage)."""
    client = getattr(storage, "client", None)
    if not keys or client is None:
        return
    with contextlib.suppress(Exception):
        for i in range(0, len(keys), 1000):
            objects = [{"Key": storage.object_key(k)} for k in keys[i : i + 1000]]
            client.delete_objects(Bucket=storage.bucket, Delete={"Objects": objects, "Quiet": True})
