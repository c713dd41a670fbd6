"""Reads paced to the round trip: behind a proxy adding 10 ms each way, the reads grow to
cover the measured round trip after the first batches instead of doubling from the
first read's size (the second read waits for the first batch to be prepared), the loaders and their
connections double, and every event is loaded once."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis
from tests.conftest import Env
from tests.support.proxy import TcpProxy
from tests.support.workload import seed

from filepipe.config import load_settings
from filepipe.consumer import Consumer
from filepipe.consumer.pace import SLOW_ROUND_TRIP_S
from filepipe.db import init_db

EVENTS = 4000


def test_reads_grow_to_cover_the_round_trip(tmp_path: Path) -> None:
    redis_url = os.environ.get("FILEPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    pg_uri = os.environ.get("FILEPIPE_TEST_PG_URI", "postgresql://postgres@127.0.0.1:5432/test")
    rport = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("port", 6379)
    pport = int(psycopg.conninfo.conninfo_to_dict(pg_uri).get("port") or 5432)
    tag = uuid.uuid4().hex[:8]
    with TcpProxy(rport, delay_ms=10) as rp, TcpProxy(pport, delay_ms=10) as pp:
        user = psycopg.conninfo.conninfo_to_dict(pg_uri).get("user", "postgres")
        dbname = psycopg.conninfo.conninfo_to_dict(pg_uri).get("dbname", "postgres")
        s = load_settings(
            {
                "redis_url": f"redis://127.0.0.1:{rp.port}/0",
                "pg_uri": f"postgresql://{user}@127.0.0.1:{pp.port}/{dbname}",
                "stream": f"fp_pace_{tag}",
                "table": f"fp_pace_{tag}",
                "local_storage_dir": str(tmp_path),
                "consumer_name": f"pace-{tag}",
                "block_ms": 100,
                # Set on purpose, and smaller than the reads the round trips call for: a cap.
                "batch_size": 1000,
            },
            environ={},
            dotenv_path=None,
        )
        init_db(s, plain=True)
        r = redis.Redis.from_url(redis_url)
        try:
            seed(r, s, tmp_path, EVENTS)
            c = Consumer(s, drain=True, write=None)
            sizes: list[int] = []
            submit = c.reader.submit

            def observed(part: Any, entries: list[Any], *, redelivered: bool) -> None:
                sizes.append(len(entries))
                submit(part, entries, redelivered=redelivered)

            c.reader.submit = observed  # type: ignore[method-assign]
            stats = c.run()
            with psycopg.connect(pg_uri) as conn:
                rows = conn.execute(f"SELECT count(*) FROM {s.table}").fetchone()
        finally:
            r.delete(s.stream, s.dead_stream)
            r.close()
            with psycopg.connect(pg_uri, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {s.table}")
    assert stats.inserted == EVENTS == (rows[0] if rows else -1)
    assert stats.acked == EVENTS and stats.dead_lettered == 0
    assert c.pace.round_trip("Redis") >= 0.018  # the proxy's 20 ms, measured
    assert c.pace.cover >= 0.018 * c.pace.rate * 4 > 0
    # Doubling from 16 entries would take 8 reads (16 + 32 + … + 1000 + 1000 …) to read 4000.
    assert stats.batches <= 6, stats.batches
    # CONSUMER_BATCH_SIZE set on purpose holds, however much the round trips call for.
    assert c.pace.cover > s.batch_size >= max(sizes), (c.pace.cover, sizes)
    # The first read stays within the byte budget whatever the entries' sizes; the second
    # waits for it to be prepared, and is sized by the round trips at the preparer's rate
    # (read before, it would be as small, or twice as big).
    first = s.batch_bytes // s.max_entry_bytes
    assert sizes[0] == first and sizes[1] > 2 * first, sizes
    # A COPY waits two round trips: twice the loaders and connections hide them.
    assert len(c.loading.threads) == 2 * s.pool_size
    assert c.pool.max_size == 2 * s.pool_size


def test_on_a_local_network_the_loaders_stay_as_many_as_the_pool(env: Env) -> None:
    s = env.settings
    seed(env.redis, s, env.storage, 500)
    c = Consumer(s, drain=True, write=None)
    assert c.run().inserted == 500
    # (A loaded machine can take a few ms to answer: the loaders follow what was measured.)
    doubled = c.pace.round_trip("PostgreSQL") >= SLOW_ROUND_TRIP_S
    loaders = 2 * s.pool_size if doubled else s.pool_size
    assert len(c.loading.threads) == loaders and c.pool.max_size == loaders


def test_reads_go_beyond_the_default_batch_size_only() -> None:
    """Left at its default, CONSUMER_BATCH_SIZE gives way to what the round trips call for
    (within FILEPIPE_BATCH_BYTES); set on purpose, it is a cap."""
    from filepipe.constants import DEFAULT_BATCH_SIZE
    from filepipe.stream import ReadSize

    default = ReadSize(DEFAULT_BATCH_SIZE, 16 << 20, 1 << 20, beyond=True)
    default.observe(100, 100 * 200)  # entries of 200 bytes: 16 MiB holds about 84,000
    default.raise_to(20_000)
    assert default.count == 20_000
    default.raise_to(10**6)
    assert default.count == default.fits < 10**6
    chosen = ReadSize(1000, 16 << 20, 1 << 20)
    chosen.observe(100, 100 * 200)
    chosen.raise_to(20_000)
    assert chosen.count == 1000
