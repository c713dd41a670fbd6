"""Trimming on real Redis: a running consumer trims what every consumer group of the
stream has acknowledged, and nothing that any group still needs (another application's
group, a group that has not read yet, an entry pending anywhere). STREAM_RETENTION
keeps a window for replay; DEAD_LETTER_RETENTION caps the dead letters, with a warning
first; departed consumers are removed from the group. Exact counts throughout."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from tests.conftest import Env
from tests.support.workload import consumer_env, seed, wait_for

from filepipe import retention
from filepipe.config import ConfigError, Window, load_settings, parse_window
from filepipe.constants import (
    ARRIVALS_KEEP_MS,
    arrivals_key,
    heartbeat_key,
    retention_marks_key,
    trim_lease_key,
)
from filepipe.consumer import Consumer
from filepipe.partitions import partitions
from filepipe.stream import ensure_group


def ids_of(env: Env, stream: str | None = None) -> list[bytes]:
    return [e[0] for e in env.redis.xrange(stream or env.settings.stream)]


@pytest.fixture
def running(env: Env) -> Iterator[list[Consumer]]:
    """Consumers started in a thread with `start(settings)`; stopped at the end."""
    started: list[tuple[Consumer, threading.Thread]] = []
    consumers: list[Consumer] = []

    def start(**overrides: object) -> Consumer:
        consumer = Consumer(env.settings_with(**overrides), write=None)
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        started.append((consumer, thread))
        return consumer

    env.start = start  # type: ignore[attr-defined]
    try:
        yield consumers
    finally:
        for consumer, thread in started:
            consumer.stop()
            thread.join(30)


# -- settings ---------------------------------------------------------------------------------


def test_retention_settings() -> None:
    assert parse_window("stream_retention", "") == Window()
    assert parse_window("stream_retention", "none") == Window()
    assert parse_window("stream_retention", "100000") == Window(count=100_000)
    assert parse_window("stream_retention", "24h") == Window(age_s=86_400)
    assert parse_window("stream_retention", "100000, 90m") == Window(count=100_000, age_s=5400)
    assert parse_window("stream_retention", "7d,500") == Window(count=500, age_s=7 * 86_400)
    assert parse_window("stream_retention", "all") == Window(keep_all=True)
    assert Window(count=100_000, age_s=86_400).describe() == "100,000 entries or 1d, whichever is less"
    for bad in ("-1", "24x", "1h,2h", "10,20", "0h", "lots"):
        with pytest.raises(ConfigError, match="STREAM_RETENTION"):
            load_settings(environ={"STREAM_RETENTION": bad}, dotenv_path=None)
    s = load_settings(environ={}, dotenv_path=None)
    assert s.stream_window == Window() and s.dead_window == Window(count=10_000)
    with pytest.raises(ConfigError, match="DEAD_LETTER_RETENTION must keep something"):
        load_settings(environ={"DEAD_LETTER_RETENTION": "none"}, dotenv_path=None)
    d = load_settings(environ={"DEAD_LETTER_RETENTION": "500,7d"}, dotenv_path=None)
    assert d.dead_window == Window(count=500, age_s=7 * 86_400)


# -- what is trimmed, and what is not ---------------------------------------------------------


def test_a_drained_stream_is_trimmed_to_nothing(env: Env) -> None:
    w = seed(env.redis, env.settings, env.storage, 3000, poison_every=100)
    stats = env.drain(max_file_bytes=64 * 1024)
    assert stats.inserted == w.good == env.rows()
    assert env.redis.xlen(env.settings.stream) == 0
    assert env.pending() == 0
    assert len(env.dead()) == 30  # dead letters are not the stream's to trim


def test_another_groups_unacknowledged_entries_are_kept_until_it_acknowledges(
    env: Env, running: list[Consumer]
) -> None:
    s = env.settings
    seed(env.redis, s, env.storage, 3000)
    ids = ids_of(env)
    env.redis.xgroup_create(s.stream, "other_app", id="0")
    got = env.redis.xreadgroup("other_app", "o1", {s.stream: ">"}, count=1000)
    delivered = [e[0] for e in got[0][1]]
    env.redis.xack(s.stream, "other_app", *delivered[:600])

    env.drain()
    assert env.rows() == 3000
    # Kept: from the other group's oldest pending entry on; none of its pending ones gone.
    assert ids_of(env) == ids[600:]

    # The other application catches up while a consumer runs: the stream shrinks by itself.
    env.start()  # type: ignore[attr-defined]
    env.redis.xack(s.stream, "other_app", *delivered[600:])
    assert ids_of(env)[0] == ids[600]  # not before the next pass
    rest = env.redis.xreadgroup("other_app", "o1", {s.stream: ">"}, count=5000)
    env.redis.xack(s.stream, "other_app", *[e[0] for e in rest[0][1]])
    wait_for(lambda: env.redis.xlen(s.stream) == 0, 10, "the stream to be trimmed")


def test_a_group_keeps_what_it_has_not_read(env: Env) -> None:
    s = env.settings
    seed(env.redis, s, env.storage, 3000)
    ids = ids_of(env)
    env.redis.xgroup_create(s.stream, "late_app", id=ids[999])  # delivered up to entry 999
    env.drain()
    assert ids_of(env) == ids[1000:]
    env.redis.xgroup_create(s.stream, "fresh_app", id="0")  # has read nothing
    seed(env.redis, s, env.storage, 500)
    env.drain()
    assert len(ids_of(env)) == 2500 and ids_of(env)[0] == ids[1000]
    st = retention.plan(env.redis, partitions(s)[0], s)
    assert (st.why, st.holder, st.length, st.first_id) == ("unread", "fresh_app", 2500, ids[1000].decode())


def test_pending_entries_are_never_trimmed_until_reclaimed(env: Env, running: list[Consumer]) -> None:
    s = env.settings
    seed(env.redis, s, env.storage, 1000)
    env.drain()
    assert env.redis.xlen(s.stream) == 0
    seed(env.redis, s, env.storage, 2000)
    ids = ids_of(env)
    ensure_group(env.redis, s.stream, s.group)
    env.redis.xreadgroup(s.group, "ghost", {s.stream: ">"}, count=500)  # then it dies
    env.start(claim_idle_ms=4000)  # type: ignore[attr-defined]
    wait_for(lambda: env.rows() == 2500, 20, "the other entries to load")
    time.sleep(2.5)  # passes run every 2 s
    assert ids_of(env) == ids, "a pending entry (or one after it) was trimmed"
    # Once reclaimed and loaded, they go too.
    wait_for(lambda: env.rows() == 3000, 20, "the ghost's entries to be reclaimed")
    wait_for(lambda: env.redis.xlen(s.stream) == 0, 10, "the stream to be trimmed")
    assert env.pending() == 0


def test_a_stream_without_groups_is_not_trimmed(env: Env) -> None:
    s = env.settings
    seed(env.redis, s, env.storage, 100)
    [result] = retention.trim(env.redis, partitions(s), s, "t", lease_ms=0)
    assert (result.trimmed, result.why, result.length) == (0, "no_group", 100)


# -- retention for replay ---------------------------------------------------------------------


def test_retention_by_count_keeps_the_newest_entries(env: Env) -> None:
    s = env.settings_with(stream_retention="1000")
    seed(env.redis, s, env.storage, 5000)
    env.drain(stream_retention="1000")
    # Counting starts with the first pass: nothing older is known to be outside the window.
    assert env.redis.xlen(s.stream) == 5000
    seed(env.redis, s, env.storage, 1500)
    ids = ids_of(env)
    env.drain(stream_retention="1000")
    assert ids_of(env) == ids[5000:]  # the newest 1500: at least 1000, and the first pass's mark
    # A running consumer marks every pass: the window stays close to 1000.
    for _ in range(6):
        seed(env.redis, s, env.storage, 300)
        env.drain(stream_retention="1000")
    assert 1000 <= env.redis.xlen(s.stream) <= 1300
    assert env.redis.exists(retention_marks_key(s.stream))
    # Replay: rewinding the group to the start of the window redelivers every kept entry.
    kept = ids_of(env)
    env.redis.xgroup_setid(s.stream, s.group, id="0")
    replayed = env.drain(stream_retention="1000")
    assert replayed.duplicates == len(kept) and replayed.inserted == 0


def test_retention_by_age_keeps_recent_entries(env: Env) -> None:
    s = env.settings
    now_ms = int(time.time() * 1000)
    old = [env.redis.xadd(s.stream, {"file_id": "x"}, id=f"{now_ms - 7_200_000 + i}-0") for i in range(50)]
    # A minute and a half old: older than "1m" however fast the first drain is.
    recent = [env.redis.xadd(s.stream, {"file_id": "x"}, id=f"{now_ms - 90_000 + i}-0") for i in range(70)]
    env.drain(stream_retention="1h")  # (the entries are dead-lettered: no file_id UUID)
    assert ids_of(env) == recent
    assert old[0] not in ids_of(env)
    env.drain(stream_retention="1m")
    assert ids_of(env) == []


def test_retention_all_never_trims_the_stream(env: Env) -> None:
    s = env.settings
    seed(env.redis, s, env.storage, 300)
    env.drain(stream_retention="all")
    assert env.redis.xlen(s.stream) == 300
    st = retention.plan(env.redis, partitions(s)[0], env.settings_with(stream_retention="all"))
    assert st.why == "retention"


# -- coordination -----------------------------------------------------------------------------


def test_one_consumer_trims_a_stream_at_a_time(env: Env) -> None:
    s = env.settings
    seed(env.redis, s, env.storage, 100)
    ensure_group(env.redis, s.stream, s.group)
    parts = partitions(s)
    [first] = retention.trim(env.redis, parts, s, "a")
    [second] = retention.trim(env.redis, parts, s, "b")
    assert first.leased and not second.leased
    assert env.redis.get(trim_lease_key(s.stream)) == b"a"
    assert 0 < env.redis.pttl(trim_lease_key(s.stream)) <= 500
    time.sleep(0.55)
    [third] = retention.trim(env.redis, parts, s, "b")
    assert third.leased


def test_many_consumers_trim_without_racing(env: Env, tmp_path: Path) -> None:
    """Four processes drain a partitioned stream: it ends empty, every event loaded once."""
    s = env.settings_with(partitions=4, batch_size=500)
    w = seed(env.redis, s, env.storage, 20_000)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "filepipe",
            "consume",
            "--drain",
            "-q",
            "--processes",
            "4",
            "--consumer-name",
            "race",
        ],
        env=consumer_env(s),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=s.local_storage_dir,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert env.rows() == w.good
    assert [env.redis.xlen(p.stream) for p in partitions(s)] == [0, 0, 0, 0]


# -- dead letters -----------------------------------------------------------------------------


def test_dead_letters_are_capped_with_a_warning_first(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    s = env.settings_with(dead_letter_retention="100")
    caplog.set_level(logging.INFO, logger="filepipe")
    seed(env.redis, s, env.storage, 900, poison_every=10)
    env.drain(dead_letter_retention="100", max_file_bytes=64 * 1024)
    assert len(env.dead()) == 90
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"dead-letter stream {s.dead_stream} holds 90 dead letters, 90% of DEAD_LETTER_RETENTION=100" in m
        for m in warnings
    ), warnings
    assert not any("is full: dropped" in m for m in warnings)
    caplog.clear()
    w = seed(env.redis, s, env.storage, 600, poison_every=10)
    env.drain(dead_letter_retention="100", max_file_bytes=64 * 1024)
    dead = env.dead()
    assert len(dead) == 100
    # The newest are kept: the 60 just written and the last 40 of the first run.
    assert set(w.poison) <= {f[b"source_id"] for _, f in dead}
    dropped = f"dead-letter stream {s.dead_stream} is full: dropped its 50 oldest dead letters"
    assert any(dropped in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_dlq_list_shows_what_is_kept_and_the_cap(env: Env) -> None:
    s = env.settings_with(dead_letter_retention="100")
    seed(env.redis, s, env.storage, 200, poison_every=10)
    env.drain(dead_letter_retention="100", max_file_bytes=64 * 1024)
    listed = subprocess.run(
        [sys.executable, "-m", "filepipe", "dlq", "list"],
        env=consumer_env(s, DEAD_LETTER_RETENTION="100"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert f"DEAD LETTERS in {s.dead_stream}: 20" in listed.stdout
    assert "Kept: 20 of 100 (DEAD_LETTER_RETENTION=100: the newest 100 entries)" in listed.stdout


# -- departed consumers -----------------------------------------------------------------------


def test_departed_consumers_are_removed_but_never_with_pending_entries(env: Env) -> None:
    s = env.settings
    seed(env.redis, s, env.storage, 20)
    ensure_group(env.redis, s.stream, s.group)
    part = partitions(s)[0]
    env.redis.xgroup_createconsumer(s.stream, s.group, "left-cleanly")
    env.redis.xgroup_createconsumer(s.stream, s.group, "alive")
    env.redis.set(heartbeat_key(s.stream, "alive"), "{}", ex=30)
    env.redis.xreadgroup(s.group, "holding", {s.stream: ">"}, count=5)
    env.redis.xgroup_create(s.stream, "other_app", id="0")
    env.redis.xgroup_createconsumer(s.stream, "other_app", "theirs")
    removed = retention.remove_departed(env.redis, part, s.group, 0)
    assert removed == ["left-cleanly"]
    names = {r["name"] for r in env.redis.xinfo_consumers(s.stream, s.group)}
    assert names == {b"alive", b"holding"}
    assert env.pending() == 5
    assert [r["name"] for r in env.redis.xinfo_consumers(s.stream, "other_app")] == [b"theirs"]
    # Idle for less than asked: kept.
    env.redis.xgroup_createconsumer(s.stream, s.group, "just-left")
    assert retention.remove_departed(env.redis, part, s.group, 60_000) == []


def test_restarts_do_not_grow_the_consumer_list(env: Env) -> None:
    s = env.settings_with(claim_idle_ms=1000)
    for i in range(5):
        seed(env.redis, s, env.storage, 50)
        env.drain(claim_idle_ms=1000, consumer_name=f"restart-{i}")
        time.sleep(1.1)
    names = {r["name"] for r in env.redis.xinfo_consumers(s.stream, s.group)}
    assert names == {b"restart-4"}, names
    assert env.rows() == 250


# -- the producer -----------------------------------------------------------------------------


def test_the_producer_never_trims(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.txt").write_bytes(b"x")
    s = env.settings
    done = subprocess.run(
        [sys.executable, "-m", "filepipe", "produce", str(src)],
        env=consumer_env(s, STREAM_RETENTION="5"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert env.redis.xlen(s.stream) == 20


def test_trimming_errors_are_logged_once_and_waited_out(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    s = env.settings
    caplog.set_level(logging.INFO, logger="filepipe")
    env.redis.set(s.stream, "not a stream")
    r = redis.Redis.from_url(s.redis_url)
    keeper = retention.Housekeeper(s, r, partitions(s), "t")
    try:
        assert keeper.run_once(lease_ms=0) == [] and keeper.run_once(lease_ms=0) == []
        lines = [m for m in (rec.getMessage() for rec in caplog.records) if m.startswith("trimming failed")]
        assert len(lines) == 1 and "WRONGTYPE" in lines[0], lines
        env.redis.delete(s.stream)
        assert keeper.run_once(lease_ms=0)
        assert any(rec.getMessage() == "trimming works again" for rec in caplog.records)
    finally:
        r.close()


def test_status_counts_the_last_minutes_arrivals_after_trimming(env: Env) -> None:
    from filepipe.status import collect_status

    s = env.settings
    seed(env.redis, s, env.storage, 500)
    env.drain()
    assert env.redis.xlen(s.stream) == 0
    seed(env.redis, s, env.storage, 200)
    st = collect_status(s)
    assert st.redis is not None and st.redis.length == 200
    assert (st.redis.arrivals_last_minute, st.redis.arrivals_capped) == (700, False)
    # The samples go by themselves once no consumer trims the stream.
    assert 0 < env.redis.pttl(arrivals_key(s.stream)) <= ARRIVALS_KEEP_MS
