"""Drain throughput into a hypertable against a plain table on the same cluster (one
private PostgreSQL that preloads TimescaleDB), in the same run, and into a hypertable
whose batches each touch about 1, 10 or 100 chunks: the events' times (their entry ids)
spread over that many days, with chunks of a day.

Each case drains the same number of events with an in-process consumer (default batch
size) from its own stream into its own table; the cases take turns. `make bench`
(FILEPIPE_BENCH_FULL=1) drains 200,000 events a case, three times (the best rate of each);
the normal test run 10,000 once. The rate is files/s over the drain's wall time.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from tests.support.workload import write_data_files

from filepipe.config import Settings, load_settings
from filepipe.consumer import Consumer
from filepipe.db import init_db

FULL = os.environ.get("FILEPIPE_BENCH_FULL", "") not in ("", "0")
EVENTS = 200_000 if FULL else 10_000
BATCH = 5000 if FULL else 1000
ROUNDS = 3 if FULL else 1
DAY_MS = 86_400_000
GROUP = f"timescaledb: {EVENTS:,} events drained, hypertable vs plain table, chunks per batch"


@dataclass(frozen=True)
class Case:
    name: str
    hypertable: bool
    chunks_per_batch: int  # days one batch's events span (chunks of one day); 0: all in one millisecond run

    def ids(self, now_ms: int) -> list[str]:
        """Increasing entry ids whose times put `chunks_per_batch` days into each batch."""
        if not self.chunks_per_batch:
            return [f"{now_ms - EVENTS + i}-0" for i in range(EVENTS)]
        step = self.chunks_per_batch * DAY_MS / BATCH
        first = now_ms - int(step * EVENTS) - DAY_MS
        return [f"{first + int(i * step)}-{i}" for i in range(EVENTS)]


PLAIN = Case("plain table", False, 0)
HYPER = Case("hypertable", True, 0)
SPREAD = [Case(f"hypertable, {k} chunk{'s' if k > 1 else ''} per batch", True, k) for k in (1, 10, 100)]
CASES = [PLAIN, HYPER, *SPREAD]
RATES: dict[str, float] = {}
CHUNKS: dict[str, int] = {}


def count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def drain(case: Case, redis_url: str, uri: str, root: Path) -> tuple[float, int]:
    """(files/s, chunks the table ended with)."""
    tag = uuid.uuid4().hex[:8]
    s: Settings = load_settings(
        {
            "redis_url": redis_url,
            "pg_uri": uri,
            "stream": f"fp_tsb_{tag}",
            "table": f"fp_tsb_{tag}",
            "local_storage_dir": str(root),
            "batch_size": BATCH,
            "consumer_name": f"bench-{tag}",
        },
        environ={},
        dotenv_path=None,
    )
    init_db(s, plain=not case.hypertable)
    r = redis.Redis.from_url(redis_url)
    try:
        pipe = r.pipeline(transaction=False)
        for n, entry_id in enumerate(case.ids(int(time.time() * 1000))):
            key = f"data/{n % 200:04d}.txt"
            fields: dict[Any, Any] = {"file_id": str(uuid.UUID(int=n + 1)), "filename": key, "key": key}
            pipe.xadd(s.stream, fields, id=entry_id)
            if n % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        t0 = time.perf_counter()
        stats = Consumer(s, drain=True, write=None).run()
        elapsed = time.perf_counter() - t0
        assert stats.inserted == EVENTS and stats.dead_lettered == 0
        with psycopg.connect(uri, autocommit=True) as conn:
            # Chunk by chunk: one statement over thousands of chunks would lock them all at once
            # (more than max_locks_per_transaction allows).
            chunks = [
                r[0]
                for r in conn.execute(
                    "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = %s::regclass",
                    (s.table,),
                )
            ]
            assert sum(count(conn, t) for t in chunks or [s.table]) == EVENTS
            for t in chunks:
                conn.execute(f"DROP TABLE {t}")
            conn.execute(f"DROP TABLE {s.table}")
        return EVENTS / elapsed, len(chunks)
    finally:
        for key in r.scan_iter(match=f"*{s.stream}*"):
            r.delete(key)
        r.close()


@pytest.mark.benchmark(group=GROUP)
def test_drain_into_a_hypertable_and_across_chunks(
    benchmark: pytest.FixtureRequest, redis_url: str, tsdb_uri: str, tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    write_data_files(root)

    def all_cases() -> None:
        for _ in range(ROUNDS):
            for case in CASES:
                rate, chunks = drain(case, redis_url, tsdb_uri, root)
                RATES[case.name] = max(RATES.get(case.name, 0.0), rate)
                CHUNKS[case.name] = chunks

    benchmark.pedantic(all_cases, rounds=1, iterations=1)  # type: ignore[attr-defined]
    assert CHUNKS[PLAIN.name] == 0 and CHUNKS[HYPER.name] == 1
    for case in SPREAD:  # the events span that many days, so about that many chunks per batch
        assert CHUNKS[case.name] >= case.chunks_per_batch * EVENTS // BATCH, CHUNKS
    benchmark.extra_info.update(  # type: ignore[attr-defined]
        {name: round(rate) for name, rate in RATES.items()}
        | {"hypertable_vs_plain": round(RATES[HYPER.name] / RATES[PLAIN.name], 3)}
    )
    print(report())


def report() -> str:
    """The table of the closing measurements."""
    lines = [
        f"\n{GROUP} (batches of {BATCH:,})",
        "| table | files/s | vs plain table | vs hypertable, 1 chunk | chunks at the end |",
        "|---|---:|---:|---:|---:|",
    ]
    one = RATES["hypertable, 1 chunk per batch"]
    for case in CASES:
        rate = RATES[case.name]
        lines.append(
            f"| {case.name} | {rate:,.0f} | {rate / RATES[PLAIN.name]:.3f} | {rate / one:.3f} "
            f"| {CHUNKS[case.name]:,} |"
        )
    return "\n".join(lines)
