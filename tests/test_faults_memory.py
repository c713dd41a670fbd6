"""A small Redis (its own redis-server, `maxmemory 8mb`, `noeviction`) takes several times
its capacity through a running consumer with default settings: the consumer trims what
it has acknowledged, so the producer is never refused (every refusal is counted) and
every event becomes a row. A second group that reads slowly keeps what it has not
acknowledged, and the stream shrinks once it has. A Redis that is full for a while (a
big key, deleted later) is waited out with nothing lost."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from tests.support.workload import (
    MemoryWatch,
    Produced,
    prepare_storage,
    start_consumer,
    wait_for,
    write_data_files,
)
from tests.support.workload import produce_paced as produce

from filepipe.config import Settings, load_settings
from filepipe.db import init_db
from filepipe.embedded import RedisServer

MAXMEMORY = 8 * 1024 * 1024


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    args = ["--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"]
    with RedisServer(extra_args=args) as server:
        yield server


@pytest.fixture
def site(small_redis: RedisServer, pg_uri: str, tmp_path: Path) -> Iterator[tuple[Settings, redis.Redis]]:
    """Default settings (only where to find things), on the small Redis."""
    tag = uuid.uuid4().hex[:10]
    storage = tmp_path / "storage"
    prepare_storage(storage)
    write_data_files(storage)
    s = load_settings(
        {
            "redis_url": small_redis.url,
            "pg_uri": pg_uri,
            "stream": f"fp_mem_{tag}",
            "table": f"fp_mem_{tag}",
            "local_storage_dir": str(storage),
            "max_file_bytes": 64 * 1024,
        },
        environ={},
        dotenv_path=None,
    )
    init_db(s, plain=True)
    r = redis.Redis.from_url(small_redis.url, socket_timeout=10)
    try:
        yield s, r
    finally:
        r.close()
        with psycopg.connect(pg_uri, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {s.table}")


def fill(r: redis.Redis) -> None:
    """Appends to a key until Redis refuses for memory."""
    chunk = b"x" * (128 * 1024)
    while True:
        try:
            r.append("filler", chunk)
        except redis.OutOfMemoryError:
            return


def rows(s: Settings) -> int:
    with psycopg.connect(s.pg_uri) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {s.table}").fetchone()[0])  # type: ignore[index]


def loaded_ids(s: Settings) -> list[str]:
    with psycopg.connect(s.pg_uri) as conn:
        return [row[0] for row in conn.execute(f"SELECT stream_id FROM {s.table}")]


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.terminate()
    assert proc.wait(60) == 0, log.read_text()[-3000:]


def test_several_times_its_capacity_through_a_small_redis(
    site: tuple[Settings, redis.Redis], tmp_path: Path
) -> None:
    s, r = site
    log = tmp_path / "consumer.log"
    proc = start_consumer(s, "mem-1", log=log)
    try:
        with MemoryWatch(r) as watch:
            produced = produce(r, s, 300_000, max_backlog=10_000)
            refused = f"{produced.refusals} XADDs refused after {len(produced.ids)} events"
            assert produced.refusals == 0, refused
            wait_for(lambda: rows(s) == 300_000, 120, "every event to be loaded")
    finally:
        if proc.poll() is None:
            stop(proc, log)
    ids = loaded_ids(s)
    assert len(ids) == len(set(ids)) == 300_000
    assert set(ids) == {i.decode() for i in produced.ids}
    assert r.xlen(s.stream) == 0  # trimmed at the last pass
    assert int(r.xpending(s.stream, s.group)["pending"]) == 0
    assert watch.peak < MAXMEMORY, watch.peak
    print(f"\npeak used_memory {watch.peak / 1e6:.1f} MB of {MAXMEMORY / 1e6:.1f} MB for 300,000 events")


def test_a_slow_second_group_keeps_what_it_has_not_acknowledged(
    site: tuple[Settings, redis.Redis], tmp_path: Path
) -> None:
    s, r = site
    n = 60_000
    r.xgroup_create(s.stream, "audit", id="0", mkstream=True)
    seen: list[bytes] = []
    missing: list[bytes] = []
    audit_done = threading.Event()
    hold = threading.Event()  # the audit group stops acknowledging while set

    def audit() -> None:
        """Reads 500 entries every 50 ms (about 10,000/s) and acknowledges them."""
        ar = redis.Redis.from_url(s.redis_url, socket_timeout=10)
        try:
            while len(seen) < n:
                got = ar.xreadgroup("audit", "a1", {s.stream: ">"}, count=500, block=100)
                entries = got[0][1] if got else []
                for entry_id, fields in entries:
                    if not fields:
                        missing.append(entry_id)
                    seen.append(entry_id)
                while hold.is_set():
                    time.sleep(0.01)
                if entries:
                    ar.xack(s.stream, "audit", *[e[0] for e in entries])
                time.sleep(0.05)
        finally:
            ar.close()
            audit_done.set()

    log = tmp_path / "consumer.log"
    proc = start_consumer(s, "mem-2", log=log)
    reader = threading.Thread(target=audit, daemon=True)
    reader.start()
    try:
        produced = produce(r, s, n, max_backlog=10_000)
        assert produced.refusals == 0
        wait_for(lambda: rows(s) == n, 60, "every event to be loaded")
        # Whatever the audit group has pending is still there, from its oldest pending on.
        hold.set()
        time.sleep(2.5)
        pending = r.xpending(s.stream, "audit")
        if pending["pending"]:
            oldest = pending["min"]
            assert r.xrange(s.stream, min=oldest, max=oldest), "an entry pending in the audit group is gone"
            assert r.xlen(s.stream) >= pending["pending"]
        hold.clear()
        assert audit_done.wait(60)
        # Once the audit group has acknowledged everything, the stream shrinks by itself.
        wait_for(lambda: r.xlen(s.stream) == 0, 10, "the stream to shrink")
    finally:
        if proc.poll() is None:
            stop(proc, log)
    assert not missing, f"the audit group was delivered {len(missing)} trimmed entries"
    assert sorted(seen) == sorted(produced.ids) and len(set(seen)) == n
    assert rows(s) == n


def test_status_names_the_group_that_holds_redis_memory(site: tuple[Settings, redis.Redis]) -> None:
    from tests.support.workload import seed

    from filepipe.consumer import Consumer
    from filepipe.status import collect_status, render

    s, r = site
    r.config_set("maxmemory", "0")
    seed(r, s, Path(s.local_storage_dir), 40_000)
    r.xgroup_create(s.stream, "slow_app", id="0")
    r.xreadgroup("slow_app", "s1", {s.stream: ">"}, count=100)
    assert Consumer(s, drain=True, write=None).run().inserted == 40_000
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", str(int(used / 0.85)))  # Redis is 85 % full

    st = collect_status(s)
    kept = st.retention
    assert kept is not None and kept.length == 40_000 and kept.memory_bytes > 3_000_000
    [k] = kept.streams
    assert (k.why, k.holder, k.holder_pending) == ("pending", "slow_app", 100)
    assert kept.memory is not None and 0.8 < (kept.memory.share or 0) < 0.9
    assert st.health == "degraded"
    [problem] = [p for p in st.problems if p.startswith("Redis memory at")]
    assert "of maxmemory" in problem and "the stream keeps 40,000 entries" in problem
    assert "group slow_app has 100 entries pending" in problem, problem
    text = render(st)
    assert "Kept:                   group slow_app has 100 entries pending" in text
    assert "Redis memory:" in text and "maxmemory (8" in text
    doc = st.to_json()["retention"]
    assert doc["length"] == 40_000
    assert doc["held"] == {"stream": s.stream, "why": "pending", "group": "slow_app"}

    # The other application acknowledges everything: a running consumer trims, status is healthy.
    r.xack(s.stream, "slow_app", *[e[0] for e in r.xrange(s.stream, count=100)])
    while got := r.xreadgroup("slow_app", "s1", {s.stream: ">"}, count=5000):
        r.xack(s.stream, "slow_app", *[e[0] for e in got[0][1]])
    assert Consumer(s, drain=True, write=None).run().inserted == 0
    st = collect_status(s)
    assert st.retention is not None and st.retention.length == 0
    assert not [p for p in st.problems if p.startswith("Redis memory at")], st.problems
    assert "Kept:                   nothing: every acknowledged entry is trimmed" in render(st)


def test_a_full_redis_is_waited_out_with_nothing_lost(
    site: tuple[Settings, redis.Redis], tmp_path: Path
) -> None:
    s, r = site
    log = tmp_path / "consumer.log"
    proc = start_consumer(s, "mem-3", log=log)
    result: list[Produced] = []
    pr = redis.Redis.from_url(s.redis_url, socket_timeout=10)
    # The producer holds its second half until Redis is full, so that its XADDs meet the
    # refusal whatever the consumer's speed.
    filled = threading.Event()
    producer = threading.Thread(
        target=lambda: result.append(
            produce(pr, s, 40_000, max_backlog=10_000, poison_every=50, give_up_s=60, hold=(20_000, filled))
        ),
        daemon=True,
    )
    try:
        producer.start()
        wait_for(lambda: rows(s) >= 5000, 60, "the first rows")
        # A big key takes Redis over maxmemory: XADDs are refused until it is deleted.
        fill(r)
        filled.set()
        time.sleep(5)
        assert proc.poll() is None, log.read_text()[-3000:]
        r.delete("filler")
        producer.join(120)
        [produced] = result
        assert produced.refusals > 0  # Redis was full for a while
        wait_for(lambda: rows(s) == produced.good, 60, "every good event to be loaded")
        wait_for(lambda: int(r.xpending(s.stream, s.group)["pending"]) == 0, 30, "nothing pending")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        filled.set()
        producer.join(120)
        pr.close()
        if proc.poll() is None:
            stop(proc, log)
    ids = loaded_ids(s)
    assert len(ids) == len(set(ids)) == produced.good
    assert set(ids) == {i.decode() for i in produced.ids} - {i.decode() for i in produced.poison}
    dead = {f[b"source_id"]: f[b"reason"].decode() for _, f in r.xrange(f"{s.stream}:dead")}
    assert dead == produced.poison
    assert r.xlen(s.stream) == 0
