"""Storage: files measured per second (size, SHA-256, content type).

Local: the extension (`_native.measure_local`: Rust, GIL released, `hash_threads`
threads, every open confined beneath the root) against a straightforward Python loop
(open, hashlib.sha256 in 256 KiB chunks, sniff the first bytes), and against the same
loop on a thread pool (hashlib releases the GIL on large updates). S3: `S3Storage.measure`
against a moto server on 127.0.0.1 (in this process, so it competes for the GIL:
a lower bound), with the thread pool and without.

The normal test run executes each once on small sizes. `make bench` sets
FILEPIPE_BENCH_FULL=1: 10,000 small (1-4 KiB) files, 100 large (10 MiB) files and
500 S3 objects; the last test prints files/s and the ratios.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tests.support.s3_server import MotoS3, aws_test_env

from filepipe import _native
from filepipe.config import Settings
from filepipe.storage.s3 import S3Storage

FULL = os.environ.get("FILEPIPE_BENCH_FULL", "") not in ("", "0")
KIB, MIB = 1024, 1024 * 1024
SMALL_N = 10_000 if FULL else 300
LARGE_N = 100 if FULL else 3
LARGE_SIZE = 10 * MIB
S3_N = 500 if FULL else 40
THREADS = Settings().hash_threads  # the consumer's default: the host's cores, 2 to 8
CHUNK = 256 * KIB
MAX_BYTES = 1 << 40

SMALL = f"storage local: {SMALL_N} small files (1-4 KiB)"
LARGE = f"storage local: {LARGE_N} large files (10 MiB)"
S3 = f"storage S3 (moto on 127.0.0.1): {S3_N} small files (1-4 KiB)"

# files/s of each (group, implementation) measured in this run
RESULTS: dict[tuple[str, str], float] = {}


def small_content(rng: random.Random, i: int) -> bytes:
    size = rng.randint(1 * KIB, 4 * KIB)
    kind = i % 3
    if kind == 0:
        words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"file", b"pipe"]
        text = b" ".join(rng.choice(words) for _ in range(size // 5))
        return (text + b"\n" * size)[:size]
    if kind == 1:
        return (b"\x89PNG\r\n\x1a\n" + rng.randbytes(size))[:size]
    return rng.randbytes(size)


def make_tree(root: Path, n: int, content: Callable[[random.Random, int], bytes]) -> list[str]:
    rng = random.Random(n)
    keys = []
    for i in range(n):
        key = f"d{i % 100:02}/file-{i:05}.bin"
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(rng, i))
        keys.append(key)
    return keys


def batch_for(keys: list[str], storage: str) -> _native.EntryBatch:
    entries = [
        (
            f"1700000000000-{i}",
            {"file_id": f"00000000-0000-4000-8000-{i:012}", "filename": "f", "key": key, "storage": storage},
        )
        for i, key in enumerate(keys)
    ]
    batch = _native.parse_entries(entries)
    assert batch.rejects == []
    return batch


# -- the implementations --------------------------------------------------------------------


def rust_measure(root: Path, batch: _native.EntryBatch) -> list[Any]:
    m = _native.measure_local(batch, str(root), MAX_BYTES, THREADS)
    return [m.get(i) for i in range(len(batch))]


def hashlib_one(path: Path) -> tuple[int, bytes, str]:
    """The straightforward Python way."""
    h = hashlib.sha256()
    size = 0
    head = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if not head:
                head = chunk[: _native.SNIFF_BYTES]
            size += len(chunk)
            h.update(chunk)
    return size, h.digest(), _native.sniff_content_type(head)


def hashlib_measure(root: Path, keys: list[str]) -> list[Any]:
    return [hashlib_one(root / key) for key in keys]


def hashlib_threads_measure(pool: ThreadPoolExecutor, root: Path, keys: list[str]) -> list[Any]:
    return list(pool.map(lambda key: hashlib_one(root / key), keys))


def s3_measure(storage: S3Storage, batch: _native.EntryBatch) -> list[Any]:
    m = _native.Measurements(len(batch))
    storage.measure(batch, list(range(len(batch))), m, MAX_BYTES)
    assert m.failures() == []
    return [m.get(i) for i in range(len(batch))]


def run(
    benchmark: Any, group: str, name: str, files: int, fn: Callable[[], Any], rounds: int | None = None
) -> Any:
    """Runs `fn` under the benchmark and records its files/s (a single timed call when
    the benchmark is disabled, pytest-benchmark's median when it measures)."""
    started = time.perf_counter()
    result = benchmark(fn) if rounds is None else benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    seconds = time.perf_counter() - started
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
    RESULTS[(group, name)] = files / seconds
    benchmark.extra_info["files"] = files
    benchmark.extra_info["files_per_s"] = round(files / seconds, 1)
    return result


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[Any]]:
    root = tmp_path_factory.mktemp("small")
    keys = make_tree(root, SMALL_N, small_content)
    return root, keys, hashlib_measure(root, keys)


@pytest.fixture(scope="module")
def large_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[Any]]:
    root = tmp_path_factory.mktemp("large")
    keys = make_tree(root, LARGE_N, lambda rng, i: rng.randbytes(LARGE_SIZE))
    return root, keys, hashlib_measure(root, keys)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(THREADS) as p:
        yield p


@pytest.fixture(scope="module")
def s3_objects() -> Iterator[tuple[MotoS3, str, list[str], list[Any]]]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in aws_test_env().items():
            mp.setenv(name, value)
        with MotoS3() as server:
            bucket = server.create_bucket("fp-bench")
            rng = random.Random(7)
            keys, expected = [], []
            client = server.client()
            for i in range(S3_N):
                data = small_content(rng, i)
                key = f"d{i % 100:02}/obj-{i:05}"
                client.put_object(Bucket=bucket, Key=f"bench/{key}", Body=data)
                keys.append(key)
                expected.append(
                    (len(data), hashlib.sha256(data).digest(), _native.sniff_content_type(data[:512]))
                )
            yield server, bucket, keys, expected


# -- local --------------------------------------------------------------------------------------


@pytest.mark.benchmark(group=SMALL)
def test_local_small_rust(benchmark: Any, small_tree: tuple[Path, list[str], list[Any]]) -> None:
    root, keys, expected = small_tree
    batch = batch_for(keys, "local")
    assert run(benchmark, SMALL, "rust", len(keys), lambda: rust_measure(root, batch)) == expected


@pytest.mark.benchmark(group=SMALL)
def test_local_small_hashlib(benchmark: Any, small_tree: tuple[Path, list[str], list[Any]]) -> None:
    root, keys, expected = small_tree
    assert run(benchmark, SMALL, "hashlib", len(keys), lambda: hashlib_measure(root, keys)) == expected


@pytest.mark.benchmark(group=SMALL)
def test_local_small_hashlib_threads(
    benchmark: Any, small_tree: tuple[Path, list[str], list[Any]], pool: ThreadPoolExecutor
) -> None:
    root, keys, expected = small_tree
    result = run(
        benchmark, SMALL, "hashlib-threads", len(keys), lambda: hashlib_threads_measure(pool, root, keys)
    )
    assert result == expected


@pytest.mark.benchmark(group=LARGE)
def test_local_large_rust(benchmark: Any, large_tree: tuple[Path, list[str], list[Any]]) -> None:
    root, keys, expected = large_tree
    batch = batch_for(keys, "local")
    assert run(benchmark, LARGE, "rust", len(keys), lambda: rust_measure(root, batch), rounds=5) == expected


@pytest.mark.benchmark(group=LARGE)
def test_local_large_hashlib(benchmark: Any, large_tree: tuple[Path, list[str], list[Any]]) -> None:
    root, keys, expected = large_tree
    assert (
        run(benchmark, LARGE, "hashlib", len(keys), lambda: hashlib_measure(root, keys), rounds=5) == expected
    )


@pytest.mark.benchmark(group=LARGE)
def test_local_large_hashlib_threads(
    benchmark: Any, large_tree: tuple[Path, list[str], list[Any]], pool: ThreadPoolExecutor
) -> None:
    root, keys, expected = large_tree
    fn = lambda: hashlib_threads_measure(pool, root, keys)  # noqa: E731
    assert run(benchmark, LARGE, "hashlib-threads", len(keys), fn, rounds=5) == expected


# -- S3 -----------------------------------------------------------------------------------------


@pytest.mark.benchmark(group=S3)
@pytest.mark.parametrize("concurrency", [16, 1])
def test_s3_small(
    benchmark: Any, s3_objects: tuple[MotoS3, str, list[str], list[Any]], concurrency: int
) -> None:
    server, bucket, keys, expected = s3_objects
    storage = S3Storage(bucket, "bench", endpoint_url=server.endpoint_url, max_concurrency=concurrency)
    batch = batch_for(keys, "s3")
    assert s3_measure(storage, batch) == expected  # also warms the client and its connections
    name = f"boto3, {concurrency} thread{'s' if concurrency > 1 else ''}"
    assert run(benchmark, S3, name, len(keys), lambda: s3_measure(storage, batch), rounds=3) == expected
    storage.close()


# -- summary ------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="storage summary")
def test_storage_files_per_second(benchmark: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Prints files/s of everything measured above, and Rust ÷ hashlib."""
    lines = [
        f"\n  storage, files/s ({'measured' if benchmark.enabled else 'one unmeasured run'}; "
        f"{THREADS} hash threads; {os.cpu_count()} CPUs)"
    ]
    for group in (SMALL, LARGE, S3):
        got = {name: fps for (g, name), fps in RESULTS.items() if g == group}
        if not got:
            continue
        lines.append(f"  {group}")
        for name, fps in got.items():
            lines.append(f"    {name:<22} {fps:>12,.0f} files/s")
        if "rust" in got and "hashlib" in got:
            ratio = got["rust"] / got["hashlib"]
            benchmark.extra_info[f"ratio {group}"] = round(ratio, 2)
            lines.append(
                f"    rust ÷ hashlib: {ratio:.2f}x"
                + (
                    f", rust ÷ hashlib-threads: {got['rust'] / got['hashlib-threads']:.2f}x"
                    if "hashlib-threads" in got
                    else ""
                )
            )
    with capsys.disabled():
        print("\n".join(lines))
    benchmark.pedantic(lambda: None, rounds=1)
