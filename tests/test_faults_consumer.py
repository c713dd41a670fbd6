"""Consumers that die, are stopped, or meet poison: nothing is lost, nothing is
duplicated, every poison entry is dead-lettered exactly once."""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from tests.conftest import Env, both_tables
from tests.support.workload import Workload, seed, start_consumer, wait_ready

from filepipe import dlq, stream

FAULT_SETTINGS = {"batch_size": 100, "claim_idle_ms": 1000, "max_file_bytes": 64 * 1024, "block_ms": 100}


@pytest.fixture
def fenv(env: Env) -> Env:
    env.settings = env.settings_with(**FAULT_SETTINGS)
    return env


def assert_exact(env: Env, w: Workload) -> None:
    """rows == accepted events, no duplicates, nothing pending, the dead-letter stream
    holds exactly the poison entries (once each, with their reasons), no canary."""
    table = env.settings.table
    rows = env.sql(f"SELECT stream_id FROM {table}")
    loaded = [r[0].encode() for r in rows]
    good_ids = set(w.ids) - set(w.poison)
    assert len(loaded) == w.good, f"{len(loaded)} rows for {w.good} good events"
    assert len(set(loaded)) == len(loaded)
    assert set(loaded) == good_ids
    assert env.pending() == 0
    dead = env.dead()
    sources = [f[b"source_id"] for _, f in dead]
    assert len(sources) == len(set(sources)), "a dead letter was written twice"
    assert {f[b"source_id"]: f[b"reason"].decode() for _, f in dead} == w.poison
    canary = hashlib.sha256(b"CANARY: must never be read").hexdigest()
    assert env.sql(f"SELECT count(*) FROM {table} WHERE checksum_sha256 = %s", (canary,))[0][0] == 0


def finish(env: Env) -> str:
    """A last consumer drains what the killed ones left (reclaiming their entries); returns
    its name."""
    name = f"finisher-{uuid.uuid4().hex[:6]}"
    env.drain(consumer_name=name)
    return name


def test_poison_one_in_ten_dead_lettered_on_first_delivery(fenv: Env) -> None:
    w = seed(fenv.redis, fenv.settings, fenv.storage, 1400, poison_every=10)
    stats = fenv.drain()
    assert stats.inserted == w.good and stats.dead_lettered == len(w.poison) == 140
    assert_exact(fenv, w)
    assert {f[b"deliveries"] for _, f in fenv.dead()} == {b"1"}
    reasons = {f[b"reason"].decode() for _, f in fenv.dead()}
    assert {
        "missing_field",
        "bad_uuid",
        "bad_timestamp",
        "bad_size",
        "bad_storage",
        "bad_content_type",
        "not_utf8",
        "nul_byte",
        "unsafe_key",
        "missing",
        "too_large",
        "not_a_file",
    } <= reasons


def test_kill_9_at_random_moments_with_two_consumers(fenv: Env, tmp_path: Path) -> None:
    w = seed(fenv.redis, fenv.settings, fenv.storage, 10_000, poison_every=50)
    rng = random.Random(1234)
    procs = {name: start_consumer(fenv.settings, name, log=tmp_path / f"{name}.log") for name in ("c0", "c1")}
    kills = 0
    deadline = time.monotonic() + 90
    generation = 0
    try:
        while kills < 6 and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 1.2))
            name = rng.choice(sorted(procs))
            procs[name].kill()
            procs[name].wait()
            kills += 1
            generation += 1
            # Half the time the same name comes back (it re-reads its own pending entries),
            # half the time a new one (the dead one's entries must be reclaimed).
            new_name = name if rng.random() < 0.5 else f"{name}-{generation}"
            procs.pop(name)
            procs[new_name] = start_consumer(fenv.settings, new_name, log=tmp_path / f"{new_name}.log")
    finally:
        for name, p in procs.items():
            wait_ready(fenv.redis, fenv.settings, name, p)
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            assert p.wait(60) == 0
    assert kills >= 3
    finish(fenv)
    assert_exact(fenv, w)


@both_tables
@pytest.mark.parametrize("point", ["after_copy", "after_commit", "after_ack"])
def test_crash_at_each_gap_of_the_batch_cycle(fenv: Env, point: str, tmp_path: Path) -> None:
    w = seed(fenv.redis, fenv.settings, fenv.storage, 1000, poison_every=7)
    proc = start_consumer(
        fenv.settings, "crasher", "--drain", log=tmp_path / "crasher.log", FILEPIPE_CRASH_AT=f"{point}:3"
    )
    assert proc.wait(60) == -signal.SIGKILL
    if point != "after_ack":
        assert stream.pending_count(fenv.redis, fenv.settings.stream, fenv.settings.group, "crasher") > 0
    # The same consumer, restarted, re-reads its own pending entries first.
    restarted = start_consumer(fenv.settings, "crasher", "--drain", log=tmp_path / "crasher.log")
    assert restarted.wait(60) == 0
    assert_exact(fenv, w)


def test_a_restart_with_more_pending_than_a_read_loads_each_once(env: Env) -> None:
    """Restarted with more of its own pending entries than its first read takes, and new
    ones behind them: that read takes both at once; the new ones it took are read again
    among the pending ones, and every entry loads once."""
    s = env.settings
    env.write_file("a.txt", b"a\n")
    event = lambda: env.xadd({"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"})  # noqa: E731
    for _ in range(40):
        event()
    stream.ensure_group(env.redis, s.stream, s.group)
    env.redis.xreadgroup(s.group, "again", {s.stream: ">"}, count=40)
    assert env.pending() == 40
    for _ in range(30):
        event()
    stats = env.drain(consumer_name="again")
    assert (stats.inserted, stats.duplicates, env.rows(), env.pending(), env.dead()) == (70, 0, 70, 0, [])


@both_tables
def test_kill_9_between_copy_and_commit(fenv: Env, tmp_path: Path) -> None:
    """Killed while a first delivery's COPY is still open, then while a redelivery's merge
    has inserted its rows but not committed them: neither leaves a row, all load once."""
    w = seed(fenv.redis, fenv.settings, fenv.storage, 1000, poison_every=7)
    log = tmp_path / "crasher.log"
    first = start_consumer(fenv.settings, "crasher", "--drain", log=log, FILEPIPE_CRASH_AT="during_copy:3")
    assert first.wait(60) == -signal.SIGKILL
    committed = fenv.rows()
    assert 0 < committed < w.good
    # Restarted, it re-reads its own pending entries first: a redelivery, loaded by the merge.
    second = start_consumer(fenv.settings, "crasher", "--drain", log=log, FILEPIPE_CRASH_AT="before_commit:1")
    assert second.wait(60) == -signal.SIGKILL, log.read_text()
    assert fenv.rows() == committed  # the killed transaction left nothing behind
    last = start_consumer(fenv.settings, "crasher", "--drain", log=log)
    assert last.wait(60) == 0
    assert_exact(fenv, w)


def test_crash_then_another_consumer_reclaims(fenv: Env, tmp_path: Path) -> None:
    w = seed(fenv.redis, fenv.settings, fenv.storage, 600, poison_every=9)
    proc = start_consumer(fenv.settings, "dies", "--drain", FILEPIPE_CRASH_AT="after_commit:2")
    assert proc.wait(60) == -signal.SIGKILL
    # What "dies" held when it died: its second batch at least, committed, not acknowledged.
    held = {
        r["message_id"]
        for r in fenv.redis.xpending_range(
            fenv.settings.stream, fenv.settings.group, "-", "+", 10_000, consumername="dies"
        )
    }
    held_poison = held & set(w.poison)
    assert held_poison, "the batches in hand hold poison entries (one in nine)"
    finisher = finish(fenv)
    assert_exact(fenv, w)
    # The dead letters of what "dies" held were written once, by the consumer that reclaimed
    # them; "dies" wrote only those of the batches it had acknowledged.
    writer = {f[b"source_id"]: f[b"consumer"].decode() for _, f in fenv.dead()}
    assert {writer[i] for i in held_poison} == {finisher}
    assert not {i for i, c in writer.items() if c == "dies"} & held


def test_sigterm_at_random_moments_exits_0_with_nothing_pending(fenv: Env, tmp_path: Path) -> None:
    w = seed(fenv.redis, fenv.settings, fenv.storage, 6000, poison_every=25)
    rng = random.Random(99)
    for i in range(5):
        name = f"term-{i}"
        proc = start_consumer(fenv.settings, name, log=tmp_path / f"{name}.log")
        wait_ready(fenv.redis, fenv.settings, name, proc)
        time.sleep(rng.uniform(0.0, 0.8))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / f"{name}.log").read_text()
        assert time.monotonic() - t0 < 10
        assert stream.pending_count(fenv.redis, fenv.settings.stream, fenv.settings.group, name) == 0
    finish(fenv)
    assert_exact(fenv, w)


def test_second_signal_exits_at_once_and_loses_nothing(fenv: Env, tmp_path: Path) -> None:
    w = seed(fenv.redis, fenv.settings, fenv.storage, 3000)
    # A table that refuses every row: the consumer is stuck loading its first batch.
    refuse_every_row(fenv)
    proc = start_consumer(fenv.settings, "impatient", log=tmp_path / "impatient.log")
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # still trying to finish the batch in hand
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 128 + signal.SIGTERM
    assert fenv.pending() > 0  # left for redelivery
    fenv.sql(f"ALTER TABLE {fenv.settings.table} DROP CONSTRAINT refuses_every_row")
    finish(fenv)
    assert_exact(fenv, w)


def refuse_every_row(env: Env) -> None:
    """The table (as reachable as ever) refuses every row: batches in hand cannot load."""
    env.sql(f"ALTER TABLE {env.settings.table} ADD CONSTRAINT refuses_every_row CHECK (false) NOT VALID")


def test_stop_timeout_abandons_unloadable_batches(fenv: Env) -> None:
    from filepipe.consumer import Consumer

    w = seed(fenv.redis, fenv.settings, fenv.storage, 500)
    refuse_every_row(fenv)
    c = Consumer(fenv.settings, drain=True, write=None, stop_timeout=2.0)
    import threading

    threading.Timer(1.0, c.stop).start()
    t0 = time.monotonic()
    c.run()
    assert time.monotonic() - t0 < 20
    assert fenv.pending() > 0 and fenv.rows() == 0
    fenv.sql(f"ALTER TABLE {fenv.settings.table} DROP CONSTRAINT refuses_every_row")
    finish(fenv)
    assert_exact(fenv, w)


def test_max_deliveries_dead_letters_a_looping_entry(fenv: Env) -> None:
    fenv.write_file("ok.txt", b"ok")
    good_id = fenv.xadd({"file_id": str(uuid.uuid4()), "filename": "ok", "key": "ok.txt"})
    loop_id = fenv.xadd({"file_id": str(uuid.uuid4()), "filename": "loop", "key": "ok.txt"})
    s = fenv.settings
    stream.ensure_group(fenv.redis, s.stream, s.group)
    fenv.redis.xreadgroup(s.group, "ghost", {s.stream: ">"}, count=10)
    fenv.redis.xack(s.stream, s.group, good_id)
    fenv.redis.xclaim(s.stream, s.group, "ghost", 0, [loop_id], retrycount=s.max_deliveries)
    fenv.redis.xadd(s.stream, {"file_id": str(uuid.uuid4()), "filename": "ok2", "key": "ok.txt"})
    time.sleep(1.1)
    fenv.drain()
    dead = fenv.dead()
    assert [(f[b"source_id"], f[b"reason"]) for _, f in dead] == [(loop_id, b"max_deliveries")]
    assert int(dead[0][1][b"deliveries"]) > s.max_deliveries
    assert fenv.rows() == 1 and fenv.pending() == 0


@both_tables
def test_a_row_postgres_refuses_is_isolated(fenv: Env) -> None:
    fenv.sql(f"ALTER TABLE {fenv.settings.table} ADD CONSTRAINT no_refuse CHECK (filename <> 'refuse me')")
    fenv.write_file("ok.txt", b"ok")
    ids = [
        fenv.xadd(
            {"file_id": str(uuid.uuid4()), "filename": "refuse me" if i == 37 else f"f{i}", "key": "ok.txt"}
        )
        for i in range(80)
    ]
    stats = fenv.drain()
    assert stats.inserted == 79 and fenv.rows() == 79 and fenv.pending() == 0
    ((_, fields),) = fenv.dead()
    assert fields[b"source_id"] == ids[37] and fields[b"reason"] == b"db_rejected"
    assert b"no_refuse" in fields[b"error"]


def test_a_rust_panic_dead_letters_only_its_entry(fenv: Env, tmp_path: Path) -> None:
    fenv.write_file("ok.txt", b"ok")
    fenv.write_file("boom.txt", b"boom")
    for i in range(30):
        fenv.xadd(
            {"file_id": str(uuid.uuid4()), "filename": f"f{i}", "key": "boom.txt" if i == 4 else "ok.txt"}
        )
    proc = start_consumer(
        fenv.settings, "panicky", "--drain", log=tmp_path / "p.log", FILEPIPE_TEST_PANIC_KEY="boom.txt"
    )
    assert proc.wait(60) == 0
    assert fenv.rows() == 29 and fenv.pending() == 0
    ((_, fields),) = fenv.dead()
    assert fields[b"reason"] == b"internal_error" and fields[b"key"] == b"boom.txt"
    assert "panic" in (tmp_path / "p.log").read_text()


def test_dlq_list_replay_purge(fenv: Env, tmp_path: Path) -> None:
    w = seed(fenv.redis, fenv.settings, fenv.storage, 100, poison_every=10)
    fenv.drain()
    s = fenv.settings
    summary = dlq.summarize(fenv.redis, s.dead_stream)
    assert summary["total"] == 10 and sum(summary["by_reason"].values()) == 10

    env_vars = {"REDIS_URL": s.redis_url, "STREAM_NAME": s.stream}
    from tests.support.workload import consumer_env

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        import sys

        return subprocess.run(
            [sys.executable, "-m", "filepipe", "dlq", *args],
            capture_output=True,
            text=True,
            env=consumer_env(s, **env_vars),
            timeout=60,
            check=False,
        )

    listed = cli("list")
    assert listed.returncode == 0 and "DEAD LETTERS" in listed.stdout and "missing" in listed.stdout
    # Fix what made the `missing` entries fail, then replay only those.
    missing_ids = [i for i, reason in w.poison.items() if reason == "missing"]
    (fenv.storage / "no/such").mkdir(parents=True)
    (fenv.storage / "no/such/file.txt").write_bytes(b"here now")
    replayed = cli("replay", "--reason", "missing")
    assert replayed.returncode == 0 and f"Replayed {len(missing_ids)}" in replayed.stdout
    fenv.drain()
    assert fenv.rows() == w.good + len(missing_ids)
    assert dlq.summarize(fenv.redis, s.dead_stream)["total"] == 10 - len(missing_ids)
    purged = cli("purge", "--reason", "bad_uuid", "--yes")
    assert purged.returncode == 0
    assert "bad_uuid" not in dlq.summarize(fenv.redis, s.dead_stream)["by_reason"]
    assert cli("purge", "--yes").returncode == 0
    assert fenv.redis.xlen(s.dead_stream) == 0


def test_progress_lines_come_when_the_batch_is_done(fenv: Env) -> None:
    """The lines of the last batch (its dead letters too) appear once they are due, with no
    further events to push them out; the rate names its window."""
    import threading

    from filepipe.consumer import Consumer

    seed(fenv.redis, fenv.settings, fenv.storage, 50, poison_every=10)
    lines: list[str] = []
    consumer = Consumer(fenv.settings, write=lines.append, progress_interval=0.5)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not any(line.startswith("📊") for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fenv.pending() == 0  # everything read is acknowledged; no event comes after
        before_stop = list(lines)
    finally:
        consumer.stop()
        thread.join(30)
    lines = before_stop  # (a stop writes what is left anyway)
    assert "✓ Batch complete: 45 records inserted" in lines, lines
    assert any(line.startswith("⚠ Dead-lettered 5 entries (") for line in lines), lines
    total = next(line for line in lines if line.startswith("📊"))
    assert re.fullmatch(r"📊 Total: 45 \| Rate: \d+\.\d\d files/sec \(last \d+(\.\d)? s\)", total), total
