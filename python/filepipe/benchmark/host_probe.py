"""This host, as the consumer uses it: the extension's parse + encode cost per event
(hashing is counted with the storage) and the CPU cores."""

import hashlib
import math
import os
import time

from .. import _native
from ..config import Settings
from .figures import DEFAULT_FILE_SIZE, HostFigures
from .scratch import event_fields

CPU_ROWS = 2_000


def measure_host(settings: Settings) -> HostFigures:
    """Parse + encode cost per event in the extension (the consumer's own CPU work,
    besides hashing, which is counted with the storage)."""
    binary = settings.copy_format == "binary"
    entries = [
        (
            f"{1_700_000_000_000 + i}-0".encode(),
            event_fields(i, f"benchmark/{i}.bin", DEFAULT_FILE_SIZE, "local"),
        )
        for i in range(CPU_ROWS)
    ]
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        batch = _native.parse_entries(entries, "local")
        t1 = time.perf_counter()
        m = _native.Measurements(len(batch))
        digest = hashlib.sha256(b"x").digest()
        for i in range(len(batch)):
            m.set(i, DEFAULT_FILE_SIZE, digest, "application/octet-stream")
        t2 = time.perf_counter()
        _native.encode_copy(batch, m, "benchmark", binary, stream=settings.stream)
        t3 = time.perf_counter()
        best = min(best, (t1 - t0) + (t3 - t2))
    return HostFigures(cpus=os.cpu_count() or 1, parse_encode_us=best / CPU_ROWS * 1e6)
