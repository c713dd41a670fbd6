"""What retention (trimming), byte-bounded batches and the per-entry caps cost: one
consumer draining the same backlog with the defaults, with all three off
(STREAM_RETENTION=all, FILEPIPE_BATCH_BYTES and FILEPIPE_MAX_ENTRY_BYTES as high as
allowed, FILEPIPE_MAX_ENTRY_FIELDS too), and with each one alone off, alternated in the
same run: the best rate of each, and the least CPU per file of the consumer (steadier
than the rate on a busy machine). The normal test run drains 5,000 events once each;
`make bench` (FILEPIPE_BENCH_FULL=1) 200,000, three times each."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from tests.support.workload import seed

from filepipe.config import load_settings
from filepipe.consumer import Consumer
from filepipe.db import init_db

FULL = os.environ.get("FILEPIPE_BENCH_FULL", "") not in ("", "0")
EVENTS = 200_000 if FULL else 5_000
ROUNDS = 3 if FULL else 1
BIG = 1 << 40
WITH, WITHOUT = "defaults", "no trimming, no byte bound, no entry caps"
# Each limit alone off, to tell which one costs what: trimming; the byte bound (reads of
# CONSUMER_BATCH_SIZE entries from the first, whatever their size); the per-entry caps.
ALONE: dict[str, dict[str, Any]] = {
    "no trimming": {"stream_retention": "all"},
    "no byte bound": {"batch_bytes": BIG, "max_entry_bytes": BIG // 5000},
    "no entry caps": {"max_entry_bytes": BIG // 5000, "max_entry_fields": 100_000_000},
}
MODES: dict[str, dict[str, Any]] = {
    WITH: {},
    WITHOUT: {
        "stream_retention": "all",
        "batch_bytes": BIG,
        "max_entry_bytes": BIG // 5000,
        "max_entry_fields": 100_000_000,
    },
    **ALONE,
}


def drain(root: Path, overrides: dict[str, Any]) -> tuple[float, float]:
    """Files per second of one drain, and the consumer's CPU per file (µs, its threads'
    user and system time: this process runs nothing else meanwhile)."""
    tag = uuid.uuid4().hex[:8]
    s = load_settings(
        {
            "redis_url": os.environ.get("FILEPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
            "pg_uri": os.environ.get("FILEPIPE_TEST_PG_URI", "postgresql://postgres@127.0.0.1:5432/test"),
            "stream": f"fp_lim_{tag}",
            "table": f"fp_lim_{tag}",
            "local_storage_dir": str(root),
            "consumer_name": f"lim-{tag}",
            **overrides,
        },
        environ={},
        dotenv_path=None,
    )
    init_db(s, plain=True)
    r = redis.Redis.from_url(s.redis_url)
    try:
        seed(r, s, root, EVENTS)
        t0, c0 = time.perf_counter(), time.process_time()
        stats = Consumer(s, drain=True, write=None).run()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert stats.inserted == EVENTS
    finally:
        r.delete(s.stream, s.dead_stream)
        r.close()
        with psycopg.connect(s.pg_uri, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {s.table}")
    return EVENTS / dt, cpu / EVENTS * 1e6


@pytest.mark.timeout(3600 if FULL else 300)
@pytest.mark.benchmark(group=f"limits: {EVENTS:,} events, with and without retention, byte bound and caps")
def test_retention_byte_bound_and_caps_cost(benchmark: pytest.FixtureRequest, tmp_path: Path) -> None:
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}  # the least CPU per file of each mode, µs

    def alternate() -> None:
        names = list(MODES)
        for i in range(ROUNDS):
            for name in names if i % 2 == 0 else names[::-1]:
                rate, us = drain(tmp_path, MODES[name])
                best[name] = max(best.get(name, 0.0), rate)
                cpu[name] = min(cpu.get(name, us), us)

    benchmark.pedantic(alternate, rounds=1, iterations=1)  # type: ignore[attr-defined]
    ratio = best[WITH] / best[WITHOUT]
    print(f"\n{WITH}: {best[WITH]:,.0f} files/s; {WITHOUT}: {best[WITHOUT]:,.0f} files/s; ratio {ratio:.3f}")
    print(f"  consumer CPU per file: {WITH} {cpu[WITH]:.2f} µs, {WITHOUT} {cpu[WITHOUT]:.2f} µs")
    for name in ALONE:
        # Rate below 1, CPU above 1: that limit costs (the defaults against them with it off).
        print(
            f"  defaults / {name}: rate {best[WITH] / best[name]:.3f} ({best[name]:,.0f} files/s), "
            f"CPU per file {cpu[WITH] / cpu[name]:.3f}"
        )
    benchmark.extra_info.update(
        {
            "files_per_s_with": round(best[WITH]),
            "files_per_s_without": round(best[WITHOUT]),
            "ratio": round(ratio, 3),
            "cpu_us_per_file_with": round(cpu[WITH], 2),
            "cpu_us_per_file_without": round(cpu[WITHOUT], 2),
            **{f"ratio_to_{name.replace(' ', '_')}": round(best[WITH] / best[name], 3) for name in ALONE},
        }
    )  # type: ignore[attr-defined]
    assert all(rate > 0 for rate in best.values())
