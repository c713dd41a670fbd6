"""Memory follows bytes, not entry counts: a batch holds about FILEPIPE_BATCH_BYTES of
entries whatever their size, the first read after a start included. (The peak RSS of a
consumer draining 400 entries of 1 MiB is measured by `python -m benches.big_entries`.)

The big entries go to a private redis-server."""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from prometheus_client import REGISTRY
from prometheus_client.utils import floatToGoString

from filepipe.config import Settings, load_settings
from filepipe.consumer import Consumer
from filepipe.db import init_db
from filepipe.embedded import RedisServer
from filepipe.stream import ReadSize

MIB = 1024 * 1024


def test_read_size_starts_small_grows_and_shrinks() -> None:
    size = ReadSize(batch_size=5000, batch_bytes=16 * MIB, max_entry_bytes=MIB)
    assert size.count == 16  # every entry as big as allowed still fits the budget
    counts = []
    for _ in range(12):  # small entries: doubling up to the batch size
        size.observe(size.count, size.count * 300)
        counts.append(size.count)
    assert counts == [32, 64, 128, 256, 512, 1024, 2048, 4096, 5000, 5000, 5000, 5000]
    size.observe(5000, 5000 * 256 * 1024)  # then big ones: down at once to what fits
    assert size.count == 64
    size.observe(64, 64 * 4 * MIB)
    assert size.count == 4
    size.observe(1, 100 * MIB)  # one entry over the budget: still one at a time
    assert size.count == 1
    assert ReadSize(batch_size=100, batch_bytes=16 * MIB, max_entry_bytes=1024).count == 100


def test_a_batch_that_turns_big_sizes_the_next_read_by_its_last_entry() -> None:
    size = ReadSize(batch_size=500, batch_bytes=MIB, max_entry_bytes=MIB)
    for _ in range(10):
        size.observe(size.count, size.count * 300, 300)
    assert size.count == 500
    # 480 small entries, then the first 20 of 16 KiB: the mean (about 950 bytes) would
    # allow all 500, 8 MiB of what follows.
    size.observe(500, 480 * 300 + 20 * 16 * 1024, 16 * 1024)
    assert size.count == 64
    # One big entry among small ones, not last: the mean sizes the read, which keeps its count.
    size.observe(500, 499 * 300 + 16 * 1024, 300)
    assert size.count == 128


@pytest.fixture
def big(pg_uri: str, tmp_path: Path) -> Iterator[tuple[Settings, redis.Redis]]:
    with RedisServer() as server:
        tag = uuid.uuid4().hex[:10]
        (tmp_path / "a.txt").write_bytes(b"a\n")
        settings = load_settings(
            {
                "redis_url": server.url,
                "pg_uri": pg_uri,
                "stream": f"fp_mem_{tag}",
                "table": f"fp_mem_{tag}",
                "local_storage_dir": str(tmp_path),
                "consumer_name": f"mem-{tag}",
                "block_ms": 100,
            },
            environ={},
            dotenv_path=None,
        )
        init_db(settings, plain=True)
        r = redis.Redis.from_url(server.url)
        try:
            yield settings, r
        finally:
            r.close()
            with psycopg.connect(pg_uri, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {settings.table}")


def add(r: redis.Redis, settings: Settings, n: int, attribute_bytes: int) -> None:
    rng = random.Random(n)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        blob = "".join(rng.choices(string.ascii_letters, k=64)) * (attribute_bytes // 64)
        fields: dict[str, Any] = {"file_id": str(uuid.uuid4()), "filename": f"f{i}", "key": "a.txt"}
        if attribute_bytes:
            fields["notes"] = blob
        pipe.xadd(settings.stream, fields)
        if i % 100 == 99:
            pipe.execute()
    pipe.execute()


def batches(budget: int) -> tuple[float, float]:
    """(batches so far, those over `budget` bytes): `budget` is a bucket bound."""
    total = REGISTRY.get_sample_value("filepipe_batch_bytes_count") or 0.0
    within = REGISTRY.get_sample_value("filepipe_batch_bytes_bucket", {"le": floatToGoString(budget)}) or 0.0
    return total, total - within


def rows(settings: Settings) -> int:
    with psycopg.connect(settings.pg_uri) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {settings.table}").fetchone()[0])  # type: ignore[index]


def test_the_first_read_after_a_start_is_within_the_byte_budget(big: tuple[Settings, redis.Redis]) -> None:
    settings, r = big
    s = Settings(**{**settings.__dict__, "batch_bytes": MIB, "max_entry_bytes": 300 * 1024})
    add(r, s, 100, 256 * 1024)
    total0, over0 = batches(MIB)
    stats = Consumer(s, drain=True, write=None).run()
    total, over = batches(MIB)
    assert stats.inserted == rows(s) == 100
    assert over == over0, f"{over - over0} batches over the budget"
    assert total - total0 >= 100 * 256 * 1024 // MIB  # about 3 entries a batch, never 100


def test_batches_shrink_when_entries_turn_big(big: tuple[Settings, redis.Redis]) -> None:
    settings, r = big
    s = Settings(**{**settings.__dict__, "batch_size": 500, "batch_bytes": MIB})
    add(r, s, 2000, 0)  # small entries first: the reads grow to the batch size
    add(r, s, 2400, 16 * 1024)  # then 16 KiB ones: 63 fit the budget
    total0, over0 = batches(MIB)
    stats = Consumer(s, drain=True, write=None).run()
    total, over = batches(MIB)
    assert stats.inserted == rows(s) == 4400
    # The reads made before the first big batch was parsed (the reader works up to two
    # batches ahead of the parser: one waiting for it, one in hand) can hold a full count
    # of big entries; none after.
    assert over - over0 <= 3, f"{over - over0} batches over the budget"
    assert total - total0 >= 2000 // 500 + (2400 - 3 * 500) // 64
