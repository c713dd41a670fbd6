"""The storage, as the consumer reads it: read + hash throughput of scratch files under
LOCAL_STORAGE_DIR (cold, then cached), and GET + hash latency and throughput from S3."""

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import _native
from ..config import Settings
from ..errors import FilepipeError
from ..redaction import scrub
from .figures import MIB, StorageFigures, Timing
from .scratch import SCRATCH_DIR_PREFIX, delete_objects, event_fields, write_files


def _measure_files(
    storage: Any, mode: str, keys: Sequence[str], size: int, max_bytes: int
) -> tuple[float, str]:
    """Measures the files `keys` as one batch, as the consumer would; returns the time it
    took and the first failure's message ('' if none). The batch holds exactly these
    files: a backend may measure every record of the batch it is given."""
    entries = [(f"{i + 1}-0".encode(), event_fields(i, k, size, mode)) for i, k in enumerate(keys)]
    batch = _native.parse_entries(entries, mode)
    m = _native.Measurements(len(batch))
    t0 = time.perf_counter()
    storage.measure(batch, list(range(len(batch))), m, max_bytes)
    elapsed = time.perf_counter() - t0
    failures = m.failures()
    return elapsed, (failures[0][2] if failures else "")


def _time_storage(
    f: StorageFigures, storage: Any, keys: list[str], max_bytes: int, *, warm_again: bool
) -> None:
    """One file at a time (a few), then the rest as one batch (and again, cached)."""
    single = keys[: min(5, max(1, len(keys) // 4))]
    rest = keys[len(single) :] or single
    times = []
    for key in single:
        elapsed, problem = _measure_files(storage, f.kind, [key], f.file_size, max_bytes)
        if problem:
            f.status, f.error = "error", problem
            return
        times.append(elapsed)
    f.one_file = Timing.of(times)
    f.batch_s, problem = _measure_files(storage, f.kind, rest, f.file_size, max_bytes)
    f.batch_files = len(rest)
    if problem:
        f.status, f.error = "error", problem
        return
    if warm_again:
        f.warm_batch_s, _ = _measure_files(storage, f.kind, rest, f.file_size, max_bytes)


def measure_local(settings: Settings, file_size: int, tag: str) -> StorageFigures:
    """Read + hash throughput of scratch files under LOCAL_STORAGE_DIR, cold when the
    kernel lets us drop them from the page cache, then warm."""
    from ..storage import open_storage

    root = Path(settings.local_storage_dir)
    storage = open_storage(settings, "local")
    f = StorageFigures(
        kind="local", where=storage.describe(), file_size=file_size, threads=settings.hash_threads
    )
    if not root.is_dir():
        f.status = "unreachable"
        f.error = f"LOCAL_STORAGE_DIR {settings.local_storage_dir} does not exist or is not a directory"
        return f
    count = max(20, min(200, (256 * MIB) // max(file_size, 1)))
    scratch = root / f"{SCRATCH_DIR_PREFIX}{tag}"
    try:
        f.cold = write_files(scratch, count, file_size, evict=True)
        f.files = count
        keys = [f"{scratch.name}/{i}.bin" for i in range(count)]
        _time_storage(f, storage, keys, settings.max_file_bytes, warm_again=True)
        f.reads = _native.file_reads()
    except OSError as e:
        f.status, f.error = "error", f"cannot write scratch files in {root}: {e.strerror or e}"
    except FilepipeError as e:
        f.status, f.error = "unreachable", scrub(str(e))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        storage.close()
    return f


def measure_s3(
    settings: Settings, file_size: int, tag: str, existing: list[tuple[str, int]]
) -> StorageFigures:
    """GET latency (one object) and throughput (a batch, concurrently) from S3: recent
    objects of the events table when there are some, else scratch objects (deleted after)."""
    from ..storage import open_storage

    try:
        storage: Any = open_storage(settings, "s3")
    except FilepipeError as e:
        return StorageFigures(
            kind="s3", where=f"s3://{settings.s3_bucket}", status="error", error=scrub(str(e))
        )
    f = StorageFigures(
        kind="s3",
        where=storage.describe(),
        file_size=file_size,
        threads=int(getattr(storage, "max_concurrency", 1)),
    )
    written: list[str] = []
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"{SCRATCH_DIR_PREFIX}{tag}"
    try:
        if len(existing) >= 5:
            keys = [k for k, _ in existing]
            f.file_size = round(sum(n for _, n in existing) / len(existing))
            f.source = "recent objects of the events table"
        else:
            count = max(10, min(50, (64 * MIB) // max(file_size, 1)))
            write_files(workdir, count, file_size, evict=False)
            keys = []
            for i in range(count):
                key = f"{SCRATCH_DIR_PREFIX}{tag}/{i}.bin"
                storage.put_file(workdir / f"{i}.bin", key)
                written.append(key)
                keys.append(key)
        f.files = len(keys)
        _time_storage(f, storage, keys, settings.max_file_bytes, warm_again=False)
        if f.status == "error" and "could not be fetched" in f.error:
            f.status = "unreachable"
    except FilepipeError as e:
        f.status, f.error = "unreachable", scrub(str(e))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        delete_objects(storage, written)
        storage.close()
    return f
