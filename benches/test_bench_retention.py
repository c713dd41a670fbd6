"""Redis memory over a long drain, with trimming (the default) and without it
(`STREAM_RETENTION=all`), in the same run: a producer keeps 50,000 entries waiting (as
fast as the consumer goes, so the consumer never waits for work) while one `filepipe
consume` with default settings loads them, and Redis's `used_memory` is sampled every
half second. With trimming it stays flat; without, it grows with every event. The cost
of trimming is the ratio of the two rates (files/s over the span of `processed_at`).

The normal test run does 20,000 events once in each mode; `make bench`
(FILEPIPE_BENCH_FULL=1) does 2,000,000, twice in each mode (in the order with, without,
without, with: the best rate of each), and reports what Redis held after the first
1,000,000 events in each mode. The table is printed and written to
artifacts/bench-retention.md.
Runs on its own Redis (a throwaway server: the baseline fills it) and the suite's
PostgreSQL.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis
from tests.support.workload import MemoryWatch, produce_paced, start_consumer, wait_for, write_data_files

from filepipe.config import Settings, load_settings
from filepipe.db import init_db
from filepipe.embedded import RedisServer

FULL = os.environ.get("FILEPIPE_BENCH_FULL", "") not in ("", "0")
EVENTS = 2_000_000 if FULL else 20_000
MILESTONE = 1_000_000 if FULL else EVENTS // 2  # "the memory a million events took"
BACKLOG = 50_000 if FULL else 5_000
GROUP = f"retention: {EVENTS:,} events through one consumer, with and without trimming"
TRIM, KEEP = "trimming (default)", "no trimming (STREAM_RETENTION=all)"
MODES = {TRIM: "", KEEP: "all"}
ORDER = [TRIM, KEEP, KEEP, TRIM] if FULL else [TRIM, KEEP]
MB = 1024 * 1024
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@dataclass
class Drain:
    rate: float = 0.0  # files/s over the span of processed_at
    baseline: int = 0  # used_memory before the first event
    at_milestone: int = 0  # used_memory once MILESTONE events were acknowledged
    peak: int = 0
    final_length: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def peak_between(self, low: float, high: float) -> int:
        """The highest used_memory while between `low` and `high` of the events were done,
        counting the first reading at or past `high` (a fast drain can pass a whole span
        between two readings: that reading is what memory was at the span's end)."""
        inside = [used for _, done, used in self.samples if low * EVENTS <= done <= high * EVENTS]
        past = [used for _, done, used in self.samples if done >= high * EVENTS]
        return max([*inside, *past[:1]], default=0)


RESULTS: dict[str, Drain] = {}


@pytest.fixture(scope="module")
def bench_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def acknowledged(r: redis.Redis, s: Settings) -> int:
    try:
        for g in r.xinfo_groups(s.stream):
            return int(g["entries-read"] or 0) - int(g["pending"])
    except redis.ResponseError:
        pass
    return 0


def drain(redis_url: str, pg_uri: str, root: Path, retention: str) -> Drain:
    tag = uuid.uuid4().hex[:8]
    s = load_settings(
        {
            "redis_url": redis_url,
            "pg_uri": pg_uri,
            "stream": f"fp_ret_{tag}",
            "table": f"fp_ret_{tag}",
            "local_storage_dir": str(root),
        },
        environ={},
        dotenv_path=None,
    )
    init_db(s, plain=True)
    r = redis.Redis.from_url(redis_url, socket_timeout=30)
    out = Drain(baseline=int(r.info("memory")["used_memory"]))
    log = root.parent / f"consumer-{tag}.log"
    proc = start_consumer(s, f"bench-{tag}", log=log, STREAM_RETENTION=retention)
    try:
        with MemoryWatch(r, interval=0.5 if FULL else 0.1, progress=lambda: acknowledged(r, s)) as watch:
            produced = produce_paced(r, s, EVENTS, max_backlog=BACKLOG, chunk=1000)
            assert produced.refusals == 0 and len(produced.ids) == EVENTS
            wait_for(lambda: acknowledged(r, s) == EVENTS, 600, "every event to be acknowledged")
            time.sleep(2.5)  # one more pass of the housekeeper
        out.samples, out.peak = watch.samples, watch.peak
        out.at_milestone = next((used for _, done, used in watch.samples if done >= MILESTONE), 0)
        out.final_length = int(r.xlen(s.stream))
    finally:
        proc.terminate()
        proc.wait(60)
        with psycopg.connect(pg_uri, autocommit=True) as conn:
            rows, span = conn.execute(
                f"SELECT count(*), extract(epoch FROM max(processed_at) - min(processed_at)) FROM {s.table}"
            ).fetchone()  # type: ignore[misc]
            conn.execute(f"DROP TABLE {s.table}")
        for key in r.scan_iter(match=f"*{s.stream}*"):
            r.delete(key)
        r.close()
    assert rows == EVENTS
    out.rate = EVENTS / float(span)
    return out


@pytest.mark.timeout(3600 if FULL else 300)
@pytest.mark.benchmark(group=GROUP)
def test_memory_stays_flat_and_trimming_costs_little(
    benchmark: pytest.FixtureRequest, bench_redis: RedisServer, pg_uri: str, tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    write_data_files(root)

    def both() -> None:
        for name in ORDER:
            d = drain(bench_redis.url, pg_uri, root, MODES[name])
            if name not in RESULTS:
                RESULTS[name] = d
            else:
                RESULTS[name].rate = max(RESULTS[name].rate, d.rate)

    benchmark.pedantic(both, rounds=1, iterations=1)  # type: ignore[attr-defined]
    trim, keep = RESULTS[TRIM], RESULTS[KEEP]
    assert trim.final_length == 0 and keep.final_length == EVENTS
    # Flat: the second half of the drain needs no more memory than the first (plus 2 MiB).
    assert trim.peak_between(0.0, 0.5) > 0, trim.samples
    assert trim.peak_between(0.5, 1.0) <= trim.peak_between(0.0, 0.5) + 2 * MB, trim.samples
    # Without trimming, every event stays (about 100 bytes each).
    assert keep.peak - keep.baseline > EVENTS * 50
    if FULL:
        assert keep.peak - keep.baseline > 10 * (trim.peak - trim.baseline)
    table = report()
    print("\n" + table)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bench-retention.md").write_text(table + "\n")
    benchmark.extra_info.update(  # type: ignore[attr-defined]
        {
            "files_per_s_trimming": round(trim.rate),
            "files_per_s_no_trimming": round(keep.rate),
            "ratio": round(trim.rate / keep.rate, 3),
            "peak_mb_trimming": round((trim.peak - trim.baseline) / MB, 1),
            "peak_mb_no_trimming": round((keep.peak - keep.baseline) / MB, 1),
        }
    )


def report() -> str:
    """The table of the measurements (also written to artifacts/bench-retention.md)."""
    keep = RESULTS[KEEP]
    lines = [
        f"{GROUP}",
        "",
        f"| mode | files/s | vs no trimming | Redis memory after {MILESTONE:,} events | peak | at the end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, d in RESULTS.items():
        end = d.samples[-1][2] if d.samples else 0
        mib = [(x - d.baseline) / MB for x in (d.at_milestone, d.peak, end)]
        lines.append(
            f"| {name} | {d.rate:,.0f} | {d.rate / keep.rate:.3f} | {mib[0]:,.1f} MiB | {mib[1]:,.1f} MiB "
            f"| {mib[2]:,.1f} MiB |"
        )
    lines.append("")
    lines.append("(memory: Redis used_memory above what it used before the run)")
    return "\n".join(lines)


# -- XTRIM MINID: exact or `~` -------------------------------------------------------------

TRIM_STEP = 10_000
TRIM_ROUNDS = 19 if FULL else 3


@pytest.mark.benchmark(group=f"retention: XTRIM MINID of {TRIM_STEP:,} entries, exact vs ~")
@pytest.mark.parametrize("approximate", [False, True], ids=["exact", "approximate"])
def test_xtrim_exact_or_approximate(
    benchmark: pytest.FixtureRequest, bench_redis: RedisServer, approximate: bool
) -> None:
    """Trimming the oldest TRIM_STEP entries of a stream of events, again and again (as a
    consumer does when it keeps up): `~` only frees whole nodes (`LIMIT 0`: no cap)."""
    r = redis.Redis.from_url(bench_redis.url, socket_timeout=30)
    key = f"fp_xtrim_{uuid.uuid4().hex[:8]}"
    ids: list[bytes] = []
    pipe = r.pipeline(transaction=False)
    for i in range(TRIM_STEP * (TRIM_ROUNDS + 1)):
        fields = {"file_id": str(uuid.uuid4()), "filename": f"file {i}.txt", "key": f"data/{i % 200:04d}.txt"}
        pipe.xadd(key, fields)  # type: ignore[arg-type]
        if len(pipe) == 2000:
            ids += pipe.execute()
    ids += pipe.execute()
    points = iter(ids[TRIM_STEP::TRIM_STEP])
    tail = ["~", "LIMIT", 0] if approximate else []

    def setup() -> tuple[tuple[bytes], dict[str, object]]:
        return (next(points),), {}

    def trim(point: bytes) -> None:
        r.execute_command("XTRIM", key, "MINID", *tail[:1], point, *tail[1:])

    try:
        benchmark.pedantic(trim, setup=setup, rounds=TRIM_ROUNDS, iterations=1)  # type: ignore[attr-defined]
        benchmark.extra_info["left"] = int(r.xlen(key))  # type: ignore[attr-defined]
    finally:
        r.delete(key)
        r.close()
