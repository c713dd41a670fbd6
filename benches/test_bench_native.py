"""Micro: the extension's parse + encode against the pure-Python reference, 10,000 entries.

`make bench` measures these; the normal test run executes each once."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from tests import reference

from filepipe import _native

N = 10_000


def make_entries(n: int = N) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries shaped like the producer's: five fields plus one attribute."""
    out = []
    for i in range(n):
        out.append(
            (
                f"{1_700_000_000_000 + i // 7}-{i % 7}".encode(),
                {
                    b"file_id": str(uuid.UUID(int=i * 7919 + 1)).encode(),
                    b"filename": f"photo {i} from the trip.jpg".encode(),
                    b"key": f"2024/05/01/{uuid.UUID(int=i)}/photo_{i}.jpg".encode(),
                    b"size": str(1024 + i % 3072).encode(),
                    b"storage": b"local",
                    b"uploaded_at": b"2024-05-01T12:00:00.123456Z",
                    b"user_id": str(i % 100).encode(),
                },
            )
        )
    return out


ENTRIES = make_entries()
MEASURED = [(1024 + i % 3072, hashlib.sha256(str(i).encode()).digest(), "image/jpeg") for i in range(N)]


def measurements_object() -> _native.Measurements:
    """The measurements as the consumer holds them: filled on the Rust side (by
    measure_local), never crossing into Python per record."""
    m = _native.Measurements(N)
    for i, (size, digest, ctype) in enumerate(MEASURED):
        m.set(i, size, digest, ctype)
    return m


NATIVE_MEASURED = measurements_object()


def native_parse_encode(binary: bool) -> bytes:
    """What the consumer does per batch on the CPU, besides measuring the files."""
    batch = _native.parse_entries(ENTRIES)
    return _native.encode_copy(batch, NATIVE_MEASURED, "consumer-1", binary, stream="file_uploads")


def native_parse_encode_list(binary: bool) -> bytes:
    """The same, with the measurements handed over as a Python list of tuples."""
    batch = _native.parse_entries(ENTRIES)
    return _native.encode_copy(batch, MEASURED, "consumer-1", binary, stream="file_uploads")


def reference_parse_encode(binary: bool) -> bytes:
    batch = reference.parse_entries(ENTRIES)
    return reference.encode_copy(batch, MEASURED, "consumer-1", binary, stream="file_uploads")


@pytest.mark.benchmark(group="parse+encode 10k (binary)")
def test_native_binary(benchmark: Any) -> None:
    assert benchmark(native_parse_encode, True) == reference_parse_encode(True)


@pytest.mark.benchmark(group="parse+encode 10k (binary)")
def test_reference_binary(benchmark: Any) -> None:
    benchmark(reference_parse_encode, True)


@pytest.mark.benchmark(group="parse+encode 10k (text)")
def test_native_text(benchmark: Any) -> None:
    assert benchmark(native_parse_encode, False) == reference_parse_encode(False)


@pytest.mark.benchmark(group="parse+encode 10k (text)")
def test_reference_text(benchmark: Any) -> None:
    benchmark(reference_parse_encode, False)


@pytest.mark.benchmark(group="parse+encode 10k (binary)")
def test_native_binary_list_measurements(benchmark: Any) -> None:
    assert benchmark(native_parse_encode_list, True) == reference_parse_encode(True)


@pytest.mark.benchmark(group="parse only 10k")
def test_native_parse(benchmark: Any) -> None:
    benchmark(_native.parse_entries, ENTRIES)


@pytest.mark.benchmark(group="parse only 10k")
def test_reference_parse(benchmark: Any) -> None:
    benchmark(reference.parse_entries, ENTRIES)


# One hostile entry: 100,000 fields, as a flat list (names repeating), parsed with no cap.
WIDE = [
    (
        b"1700000000000-0",
        [
            b"file_id",
            str(uuid.UUID(int=1)).encode(),
            b"filename",
            b"a",
            b"key",
            b"a",
            *(x for i in range(100_000) for x in (b"attr_%d" % (i % 90_000), b"v%d" % i)),
        ],
    )
]


@pytest.mark.benchmark(group="parse one 100k-field entry")
def test_native_parse_wide(benchmark: Any) -> None:
    batch = benchmark(_native.parse_entries, WIDE)
    assert batch.records() == reference.parse_entries(WIDE).records


@pytest.mark.benchmark(group="parse one 100k-field entry")
def test_reference_parse_wide(benchmark: Any) -> None:
    benchmark(reference.parse_entries, WIDE)


def best_of(fn: Callable[[], Any], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.benchmark(group="ratio")
def test_ratio_native_vs_reference(benchmark: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Rust parse+encode ÷ pure-Python reference, measured back to back in this run."""
    rounds = 15 if os.environ.get("FILEPIPE_BENCH_FULL") or benchmark.enabled else 1
    for binary in (True, False):
        # Interleaved, best of several: a busy machine slows both alike.
        native, ref = float("inf"), float("inf")
        for _ in range(max(1, rounds // 3)):
            native = min(native, best_of(lambda binary=binary: native_parse_encode(binary), 3))
            ref = min(ref, best_of(lambda binary=binary: reference_parse_encode(binary), 1))
        fmt = "binary" if binary else "text"
        benchmark.extra_info[f"ratio_{fmt}"] = round(ref / native, 1)
        with capsys.disabled():
            print(
                f"\n  parse+encode {N} entries ({fmt}): native {native * 1e3:.2f} ms, "
                f"reference {ref * 1e3:.1f} ms, ratio {ref / native:.1f}x"
            )
    benchmark.pedantic(lambda: None, rounds=1)
