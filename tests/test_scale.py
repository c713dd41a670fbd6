"""Scaling out: many consumer processes under one supervisor, partitioned streams (on one
Redis and on a real three-master Redis Cluster, one master restarted mid-run), and
PostgreSQL through a real PgBouncer in transaction pooling mode. Every run ends with
exact counts: each good event loaded once, each poison event dead-lettered once,
nothing pending."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from tests.conftest import Env
from tests.support.cluster import RedisClusterServers
from tests.support.pgbouncer import PgBouncer, find_pgbouncer
from tests.support.tls import tls_files, tls_only_args
from tests.support.workload import Workload, consumer_env, seed, start_consumer

from filepipe import dlq, stream
from filepipe.config import Settings, load_settings
from filepipe.constants import heartbeat_key
from filepipe.errors import ConfigError
from filepipe.partitions import partition_index, partitions, stream_for

FAST = {"batch_size": 500, "claim_idle_ms": 1000, "max_file_bytes": 64 * 1024, "block_ms": 100}


@pytest.fixture
def senv(env: Env) -> Env:
    env.settings = env.settings_with(**FAST)
    return env


def supervise(
    settings: Settings, processes: int, *args: str, log: Path, name: str = "scale", **extra: str
) -> subprocess.Popen[bytes]:
    """`filepipe consume --processes N` as a real subprocess."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "filepipe",
                "consume",
                "--processes",
                str(processes),
                "--consumer-name",
                name,
                "-q",
                *args,
            ],
            env=consumer_env(settings, **extra),
            stdout=out,
            stderr=out,
            cwd=settings.local_storage_dir,
        )


def beat(r: redis.Redis, settings: Settings, name: str) -> dict[str, Any] | None:
    raw = r.get(heartbeat_key(partitions(settings)[0].stream, name))
    return None if raw is None else json.loads(raw)  # type: ignore[no-any-return]


def wait_for(condition: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_exact(r: redis.Redis, settings: Settings, pg_uri: str, w: Workload) -> None:
    """rows == good events (by stream_id, so across partitions), none twice, nothing
    pending on any partition, every poison entry dead-lettered once with its reason."""
    with psycopg.connect(pg_uri) as conn:
        loaded = [row[0].encode() for row in conn.execute(f"SELECT stream_id FROM {settings.table}")]
        canary = hashlib.sha256(b"CANARY: must never be read").hexdigest()
        read_canary = conn.execute(
            f"SELECT count(*) FROM {settings.table} WHERE checksum_sha256 = %s", (canary,)
        ).fetchone()
    assert len(loaded) == w.good, f"{len(loaded)} rows for {w.good} good events"
    assert len(set(loaded)) == len(loaded), "a row was loaded twice"
    assert set(loaded) == set(w.ids) - set(w.poison)
    assert read_canary == (0,)
    dead: dict[bytes, str] = {}
    for part in partitions(settings):
        assert int(r.xpending(part.stream, settings.group)["pending"]) == 0, part.stream
        for _, fields in r.xrange(part.dead_stream):
            key = part.id_prefix.encode() + fields[b"source_id"]
            assert key not in dead, f"dead letter {key!r} written twice"
            dead[key] = fields[b"reason"].decode()
    assert dead == w.poison


# -- settings ---------------------------------------------------------------------------------


def test_partition_settings_and_names() -> None:
    s = load_settings({"partitions": 3, "stream": "up"}, environ={}, dotenv_path=None)
    assert [(p.stream, p.dead_stream, p.id_prefix) for p in partitions(s)] == [
        ("up:{0}", "up:{0}:dead", "{0}/"),
        ("up:{1}", "up:{1}:dead", "{1}/"),
        ("up:{2}", "up:{2}:dead", "{2}/"),
    ]
    one = load_settings({"stream": "up"}, environ={}, dotenv_path=None)
    assert [(p.stream, p.dead_stream, p.id_prefix) for p in partitions(one)] == [("up", "up:dead", "")]
    # A stable hash of the file id: crc32 of its bytes, the same on every host.
    fid = "0b8c3f1e-4a57-4c8e-9d55-5b5e2f7d1a90"
    assert partition_index(fid, 3) == zlib.crc32(fid.encode()) % 3
    assert stream_for(s, fid) == f"up:{{{zlib.crc32(fid.encode()) % 3}}}"
    assert stream_for(s, None) == "up:{0}" and stream_for(one, fid) == "up"
    env = load_settings(
        environ={"STREAM_PARTITIONS": "8", "REDIS_CLUSTER": "yes", "FILEPIPE_PGBOUNCER": "1"},
        dotenv_path=None,
    )
    assert (env.partitions, env.redis_cluster, env.pgbouncer) == (8, True, True)
    with pytest.raises(ConfigError, match="REDIS_CLUSTER=1 needs STREAM_PARTITIONS"):
        load_settings(environ={"REDIS_CLUSTER": "1"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="DEAD_LETTER_STREAM cannot be set"):
        load_settings(environ={"STREAM_PARTITIONS": "2", "DEAD_LETTER_STREAM": "x"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="FILEPIPE_PGBOUNCER"):
        load_settings(environ={"FILEPIPE_PGBOUNCER": "maybe"}, dotenv_path=None)


# -- many processes ---------------------------------------------------------------------------


def test_four_processes_drain_200k_events_exactly_once_with_a_worker_killed(
    senv: Env, tmp_path: Path
) -> None:
    # Batches of 200: the run lasts long enough for the kill to land in the middle of it.
    s = senv.settings_with(batch_size=200)
    w = seed(senv.redis, s, senv.storage, 200_000, poison_every=1000, chunk=5000)
    log = tmp_path / "supervisor.log"
    t0 = time.monotonic()
    proc = supervise(s, 4, "--drain", log=log)

    # Kill one worker with SIGKILL once the run is well under way: the supervisor restarts it
    # under the same name, and its entries are read again (or reclaimed by the others).
    def scale_1_holds_entries() -> bool:
        return any(stream.pending_count(senv.redis, p.stream, s.group, "scale-1") for p in partitions(s))

    wait_for(lambda: senv.rows() > 20_000 and scale_1_holds_entries(), 120, "a tenth of the rows", proc)
    victim = beat(senv.redis, s, "scale-1")
    assert victim is not None
    subprocess.run(["kill", "-9", str(victim["pid"])], check=True)
    assert proc.wait(240) == 0, log.read_text()[-3000:]
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert "worker scale-1" in text and "was killed by SIGKILL: restarting it" in text
    assert text.count("started (pid") == 5  # four, and the one restarted
    assert_exact(senv.redis, s, senv.pg_uri, w)
    consumers = {r[0] for r in senv.sql(f"SELECT DISTINCT consumer FROM {s.table}")}
    assert consumers == {f"scale-{i}" for i in range(4)}
    print(
        f"\n4 processes: {w.good + len(w.poison):,} events in {elapsed:.1f} s "
        f"({(w.good + len(w.poison)) / elapsed:,.0f} files/s, one worker killed and restarted)"
    )


def test_supervisor_forwards_sigterm_and_restarts_a_crashed_worker(senv: Env, tmp_path: Path) -> None:
    w = seed(senv.redis, senv.settings, senv.storage, 3000, poison_every=30)
    log = tmp_path / "supervisor.log"
    proc = supervise(senv.settings, 2, log=log, name="sup")
    wait_for(
        lambda: all(beat(senv.redis, senv.settings, f"sup-{i}") for i in range(2)), 60, "two workers", proc
    )
    first = beat(senv.redis, senv.settings, "sup-0")
    assert first is not None
    subprocess.run(["kill", "-9", str(first["pid"])], check=True)
    wait_for(
        lambda: (beat(senv.redis, senv.settings, "sup-0") or {}).get("pid") not in (None, first["pid"]),
        60,
        "sup-0 restarted",
        proc,
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "SIGTERM received: stopping 2 workers" in text and "restarting it in" in text
    # Both workers stopped cleanly: nothing of theirs is left pending, no heartbeat remains.
    from filepipe import stream

    for name in ("sup-0", "sup-1"):
        assert stream.pending_count(senv.redis, senv.settings.stream, senv.settings.group, name) == 0
        assert beat(senv.redis, senv.settings, name) is None
    senv.drain(consumer_name="finisher")
    assert_exact(senv.redis, senv.settings, senv.pg_uri, w)


# -- partitions on one Redis ------------------------------------------------------------------


def test_partitioned_stream_on_one_redis(senv: Env, tmp_path: Path) -> None:
    s = senv.settings_with(partitions=4)
    w = seed(senv.redis, s, senv.storage, 4000, poison_every=40)
    # Two consumers read all four partitions, each batch from one of them.
    from threading import Thread

    from filepipe.consumer import Consumer

    consumers = [
        Consumer(s, drain=True, write=None),
        Consumer(senv.settings_with(partitions=4, consumer_name="p2"), drain=True, write=None),
    ]
    threads = [Thread(target=c.run) for c in consumers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(c.stats.inserted for c in consumers) == w.good
    assert_exact(senv.redis, s, senv.pg_uri, w)
    # Every row's stream_id names the partition its file id hashes to.
    rows = senv.sql(f"SELECT stream_id, file_id::text FROM {s.table}")
    assert {sid.split("/")[0] for sid, _ in rows} == {"{0}", "{1}", "{2}", "{3}"}
    assert all(sid.startswith(f"{{{partition_index(fid, 4)}}}/") for sid, fid in rows)
    # The dead-letter commands see every partition's dead letters; replay puts them back
    # on their own partition.
    summary = dlq.summarize(senv.redis, [p.dead_stream for p in partitions(s)])
    assert summary["total"] == len(w.poison) == 100
    (senv.storage / "no/such").mkdir(parents=True)
    (senv.storage / "no/such/file.txt").write_bytes(b"here now")
    missing = sum(1 for reason in w.poison.values() if reason == "missing")
    replayed = subprocess.run(
        [sys.executable, "-m", "filepipe", "dlq", "replay", "--reason", "missing"],
        env=consumer_env(s),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (
        replayed.returncode == 0
        and f"Replayed {missing} dead letters onto {s.stream} (4 partitions)" in replayed.stdout
    )
    listed = subprocess.run(
        [sys.executable, "-m", "filepipe", "dlq", "list"],
        env=consumer_env(s),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert f"DEAD LETTERS in {s.stream}:{{0}}:dead … {s.stream}:{{3}}:dead: {100 - missing}" in listed.stdout
    senv.drain(partitions=4, consumer_name="after-replay")
    assert senv.rows() == w.good + missing


# -- Redis Cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture
def cenv(senv: Env, cluster: RedisClusterServers) -> Iterator[tuple[Env, redis.Redis]]:
    from filepipe import stream

    s = senv.settings_with(redis_url=cluster.url, redis_cluster=True, partitions=6)
    r = stream.connect(s, socket_timeout=10)
    try:
        yield Env(settings=s, redis=r, pg_uri=senv.pg_uri, storage=senv.storage), r
    finally:
        r.close()
        cluster.delete_matching(f"*{s.stream}*")


@pytest.mark.slow
def test_redis_cluster_with_a_master_restarted_mid_run(
    cenv: tuple[Env, redis.Redis], cluster: RedisClusterServers, tmp_path: Path
) -> None:
    env, r = cenv
    s = env.settings
    # The partitions live on all three masters.
    assert len({cluster.port_of(p.stream) for p in partitions(s)}) == 3
    w = seed(r, s, env.storage, 30_000, poison_every=100)
    procs = [start_consumer(s, name, "--drain", log=tmp_path / f"{name}.log") for name in ("c0", "c1")]
    try:
        wait_for(lambda: env.rows() > 3000, 120, "the first rows", procs[0])
        # Kill the master of partition 0 and bring it back after the cluster has noticed
        # (node timeout 2 s): the consumers see refused connections, then CLUSTERDOWN.
        cluster.restart(cluster.port_of(partitions(s)[0].stream), down_s=3.0)
        for p in procs:
            assert p.wait(180) == 0, (tmp_path / "c0.log").read_text()[-2000:] + (
                tmp_path / "c1.log"
            ).read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = (tmp_path / "c0.log").read_text() + (tmp_path / "c1.log").read_text()
    assert "Redis unreachable" in logs and "Redis is back" in logs
    assert_exact(r, s, env.pg_uri, w)


def test_partitions_on_the_cluster_are_trimmed_each_on_its_own(
    cenv: tuple[Env, redis.Redis], cluster: RedisClusterServers
) -> None:
    from filepipe.constants import trim_lease_key
    from filepipe.status import collect_status

    env, r = cenv
    s = env.settings
    w = seed(r, s, env.storage, 6000)
    parts = partitions(s)
    held = parts[2]
    r.xgroup_create(held.stream, "other_app", id="0")  # another application, on one partition
    kept = int(r.xlen(held.stream))
    assert env.drain().inserted == w.good
    assert [int(r.xlen(p.stream)) for p in parts] == [0, 0, kept, 0, 0, 0]
    # Each partition's lease lives in the partition's slot, on its master.
    assert all(cluster.port_of(trim_lease_key(p.stream)) == cluster.port_of(p.stream) for p in parts)
    st = collect_status(s)
    assert st.retention is not None and st.retention.length == kept
    held_state = st.retention.held
    assert held_state is not None and (held_state.stream, held_state.why, held_state.holder) == (
        held.stream,
        "unread",
        "other_app",
    )
    assert st.retention.memory is not None and st.retention.memory.node  # the fullest master, named
    # The other application reads and acknowledges its partition: the next pass trims it.
    got = r.xreadgroup("other_app", "o1", {held.stream: ">"}, count=10_000)
    r.xack(held.stream, "other_app", *[e[0] for e in got[0][1]])
    assert env.drain(consumer_name="second").inserted == 0
    assert [int(r.xlen(p.stream)) for p in parts] == [0] * 6


def test_a_dead_letter_too_wide_for_a_lua_call_is_written_whole_on_the_cluster(
    cenv: tuple[Env, redis.Redis],
) -> None:
    """With the caps raised, a 10,000-field entry naming a file that is not there: its
    dead letter goes in a transaction of its own on the partition's master, whole."""
    env, r = cenv
    s = env.settings
    part = partitions(s)[3]
    flat = [b"file_id", b"0b7e2a4c-3c1d-4e4f-9a55-2d0c6a1b9e01", b"filename", b"gone", b"key", b"gone"]
    for i in range(9_997):
        flat += [b"a%d" % i, b"v%d" % i]
    r.execute_command("XADD", part.stream, "*", *flat)
    stats = env.drain(max_entry_fields=20_000)
    assert stats.dead_lettered == 1
    (letter,) = dlq.scan(r, part.dead_stream)
    assert letter.reason == "missing" and letter.unreplayable() is None
    assert [x for kv in letter.original() for x in kv] == flat


def test_producer_and_status_on_the_cluster(cenv: tuple[Env, redis.Redis], tmp_path: Path) -> None:
    env, r = cenv
    s = env.settings
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i:03d}.txt").write_bytes(b"x" * (i + 1))
    produced = subprocess.run(
        [sys.executable, "-m", "filepipe", "produce", str(src)],
        env=consumer_env(s),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert produced.returncode == 0, produced.stderr
    assert f"Enqueued 300 events to {s.stream} (6 partitions)" in produced.stdout
    lengths = [int(r.xlen(p.stream)) for p in partitions(s)]
    assert sum(lengths) == 300 and all(lengths)
    consumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "filepipe",
            "consume",
            "--drain",
            "-q",
            "--processes",
            "2",
            "--consumer-name",
            "cl",
        ],
        env=consumer_env(s),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=s.local_storage_dir,
    )
    assert consumed.returncode == 0, consumed.stderr[-2000:]
    assert env.rows() == 300
    status = subprocess.run(
        [sys.executable, "-m", "filepipe", "status", "--json"],
        env=consumer_env(s),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    doc = json.loads(status.stdout)
    assert doc["redis"]["length"] == 0 and doc["redis"]["pending"] == 0  # loaded, then trimmed
    # Both workers exited cleanly with nothing pending: departed, counted but no longer listed.
    assert doc["redis"]["consumers"] == [] and doc["redis"]["departed"] == 2, doc["redis"]

    # A dead letter on partition 3 goes back to partition 3, its fields as they were.
    part = partitions(s)[3]
    own = {b"file_id": b"x", b"reason": b"the entry's own", b"key": b"k"}
    added = [
        b"original_fields",
        b"3",
        b"error",
        b"e",
        b"reason",
        b"missing",
        b"consumer",
        b"cl-0",
        b"deliveries",
        b"1",
        b"source_id",
        b"1-1",
    ]
    r.execute_command("XADD", part.dead_stream, "*", *[x for kv in own.items() for x in kv], *added)
    replayed = subprocess.run(
        [sys.executable, "-m", "filepipe", "dlq", "replay"],
        env=consumer_env(s),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replayed.returncode == 0 and "Replayed 1 dead letter onto" in replayed.stdout, replayed.stderr
    ((_, fields),) = r.xrevrange(part.stream, count=1)
    assert fields == own and r.xlen(part.dead_stream) == 0


# -- PgBouncer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bouncer(pg_uri: str) -> Iterator[PgBouncer]:
    if find_pgbouncer() is None:
        pytest.fail("pgbouncer is not installed: `make pgbouncer` (apt-get install -y pgbouncer)")
    # One server connection for all clients: whatever a client left in its session would
    # be seen by the next one, and by the checks below.
    with PgBouncer(pg_uri, pool_size=1) as b:
        yield b


def test_through_pgbouncer_in_transaction_pooling_mode(senv: Env, bouncer: PgBouncer) -> None:
    s = senv.settings_with(pg_uri=bouncer.uri, pgbouncer=True, pool_size=3, in_flight=3, batch_size=200)
    w = seed(senv.redis, s, senv.storage, 4000, poison_every=50)
    options: dict[str, Any] = {
        "pg_uri": bouncer.uri,
        "pgbouncer": True,
        "pool_size": 3,
        "in_flight": 3,
        "batch_size": 200,
        "stream_retention": "all",
    }  # kept, to be replayed
    first = senv.drain(**options)
    assert first.inserted == w.good
    # Replay the whole stream: every batch is merged through a staging table, dozens of
    # times per connection (psycopg would prepare the INSERT after 5).
    senv.redis.xgroup_setid(s.stream, s.group, "0")
    again = senv.drain(**options, consumer_name="replayer")
    # The poison entries were dead-lettered the first time: not again.
    assert again.inserted == 0 and again.duplicates == w.good and again.dead_lettered == 0
    assert_exact(senv.redis, s, senv.pg_uri, w)
    # Nothing outlived its transaction on the server connection all clients shared.
    with psycopg.connect(bouncer.uri, prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('pg_temp.filepipe_staging')").fetchone() == (None,)


# -- TLS --------------------------------------------------------------------------------------


def test_rediss_url_with_a_verified_certificate(senv: Env, tmp_path: Path) -> None:
    from filepipe import stream
    from filepipe.embedded import RedisServer, free_port

    ca, server_cert, server_key, other_ca = tls_files(tmp_path)
    port = free_port()
    with RedisServer(port=port, extra_args=tls_only_args(port, server_cert, server_key, ca)):
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
        s = senv.settings_with(redis_url=url)
        r = stream.connect(s, socket_timeout=10)
        try:
            w = seed(r, s, senv.storage, 500, poison_every=50)
            stats = senv.drain(redis_url=url)
            assert stats.inserted == w.good and stats.dead_lettered == len(w.poison)
            assert_exact(r, s, senv.pg_uri, w)
        finally:
            r.close()
        # A server whose certificate the given CA did not sign is refused.
        wrong = stream.connect(
            senv.settings_with(redis_url=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other_ca}"),
            socket_timeout=5,
        )
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            wrong.ping()
        wrong.close()
