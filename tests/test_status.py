"""`filepipe status` against known states built in real Redis and PostgreSQL."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
import typer
from tests.conftest import Env, both_tables
from typer.testing import CliRunner

from filepipe import status
from filepipe.cli import app
from filepipe.constants import (
    GROUP_RECREATED_TTL_S,
    HEARTBEAT_TTL_S,
    group_recreated_key,
    heartbeat_key,
    partition_stream,
)
from filepipe.consumer import Consumer
from filepipe.embedded import free_port
from filepipe.observe import dead as observe_dead
from filepipe.status import Status, collect_status
from filepipe.stream import ensure_group, note_recreated
from filepipe.timescale import read_extension

runner = CliRunner()


def status_app() -> typer.Typer:
    """The `filepipe` command, where `status` is registered."""
    return app


def cli_args(env: Env, *extra: str, pg_uri: str | None = None, redis_url: str | None = None) -> list[str]:
    s = env.settings
    return [
        "status",
        "--redis-url",
        redis_url or s.redis_url,
        "--pg-uri",
        pg_uri or s.pg_uri,
        "--stream",
        s.stream,
        "--table",
        s.table,
        *extra,
    ]


def redis_now_ms(env: Env) -> int:
    sec, usec = env.redis.time()
    return int(sec) * 1000 + int(usec) // 1000


def event(env: Env, i: int, *, key: str | None = None) -> dict[str, str]:
    key = key or f"f{i}.txt"
    if not (env.storage / key).exists() and not key.startswith("missing"):
        env.write_file(key, f"file {i}".encode())
    return {"file_id": str(uuid.uuid4()), "filename": f"file {i}.txt", "key": key}


def add_at(env: Env, ms: int, seq: int, fields: dict[str, str]) -> bytes:
    return env.redis.xadd(env.settings.stream, fields, id=f"{ms}-{seq}")  # type: ignore[return-value]


def insert_rows(env: Env, n: int, processed_ago: str) -> None:
    env.sql(
        f"""INSERT INTO {env.settings.table} (event_time, stream, stream_id, file_id, filename, storage,
            storage_key, size_bytes, checksum_sha256, uploaded_at, consumer, processed_at)
        SELECT now() - %s::interval - g * interval '1 ms', %s, %s || '-' || g, gen_random_uuid(), 'f',
               'local', 'k', 1, 'x', now(), 'c', now() - %s::interval
        FROM generate_series(1, %s) g""",
        (processed_ago, env.settings.stream, f"{processed_ago}-{uuid.uuid4().hex[:6]}", processed_ago, n),
    )


def test_empty_pipeline_is_healthy(env: Env) -> None:
    st = collect_status(env.settings)
    assert st.health == "healthy" and st.exit_code == 0 and st.problems == []
    assert st.redis is not None and not st.redis.exists and st.redis.length == 0
    assert st.events is not None and st.events.exists and st.events.rows_total == 0
    assert "✓ HEALTHY" in status.render(st)


def test_stream_lag_and_pending_figures(env: Env) -> None:
    now = redis_now_ms(env)
    for seq in range(3):
        add_at(env, now - 120_000, seq, event(env, seq))
    for seq in range(2):
        add_at(env, now - 5_000, seq, event(env, 10 + seq))
    ensure_group(env.redis, env.settings.stream, env.settings.group)
    env.redis.xreadgroup(env.settings.group, "ghost", {env.settings.stream: ">"}, count=2)

    st = collect_status(env.settings)
    t = st.redis
    assert t is not None and t.exists and t.group_exists
    assert t.length == 5 and t.entries_added == 5 and t.entries_read == 2
    assert t.last_entry_age_s is not None and 4 <= t.last_entry_age_s < 15
    assert t.lag == 3  # the third old entry and the two new ones
    assert t.waiting_age_s is not None and 119 <= t.waiting_age_s < 130
    assert t.pending == 2
    op = t.oldest_pending
    assert op is not None and op.consumer == "ghost" and op.deliveries == 1
    assert op.id == f"{now - 120_000}-0" and 119 <= op.age_s < 130 and op.idle_s < 10
    assert t.arrivals_last_minute == 2
    [ghost] = t.consumers
    assert (ghost.name, ghost.pending, ghost.heartbeat_age_s, ghost.host) == ("ghost", 2, None, None)
    assert ghost.idle_s < 10 and not ghost.silent
    text = status.render(st)
    assert "Stream length:          5 entries" in text
    assert "3 not yet delivered" in text and "2 unacknowledged" in text
    assert "ghost" in text and "(no heartbeat)" in text


def test_lag_growing_is_degraded_until_consumed(env: Env) -> None:
    ensure_group(env.redis, env.settings.stream, env.settings.group)
    for i in range(20):
        env.xadd(event(env, i))
    st = collect_status(env.settings)
    assert st.redis is not None and st.redis.lag == 20 and st.redis.arrivals_last_minute == 20
    assert st.health == "degraded" and st.exit_code == 1
    assert any(p.startswith("lag growing: 20 entries not yet delivered") for p in st.problems), st.problems

    assert env.drain().inserted == 20
    st = collect_status(env.settings)
    assert st.redis is not None and st.redis.lag == 0 and st.redis.pending == 0
    assert st.events is not None and st.events.rows_last_minute == 20
    assert st.health == "healthy", st.problems


def test_silent_consumer_with_pending_entries(env: Env) -> None:
    settings = env.settings_with(claim_idle_ms=1000)
    ensure_group(env.redis, settings.stream, settings.group)
    for i in range(4):
        env.xadd(event(env, i))
    env.redis.xreadgroup(settings.group, "crashed-worker", {settings.stream: ">"}, count=3)
    assert collect_status(settings).health == "healthy"  # not silent yet
    time.sleep(1.2)
    st = collect_status(settings)
    assert st.redis is not None
    crashed = next(c for c in st.redis.consumers if c.name == "crashed-worker")
    assert crashed.pending == 3 and crashed.idle_s >= 1.0 and crashed.silent
    assert st.health == "degraded"
    assert any(
        p.startswith("consumer crashed-worker silent for") and "3 pending entries" in p for p in st.problems
    )
    assert "⚠ silent" in status.render(st)


def test_backlog_nobody_reads(env: Env) -> None:
    settings = env.settings_with(claim_idle_ms=1000)
    now = redis_now_ms(env)
    for seq in range(3):
        add_at(env, now - 90_000, seq, event(env, seq))  # arrived before the last minute
    ensure_group(env.redis, settings.stream, settings.group)
    st = collect_status(settings)
    assert st.redis is not None and st.redis.lag == 3 and st.redis.arrivals_last_minute == 0
    assert st.health == "degraded"
    assert any(p.startswith("no live consumer: 3 entries waiting for 1m 3") for p in st.problems), st.problems


def test_entries_without_a_group(env: Env) -> None:
    env.xadd(event(env, 0))
    st = collect_status(env.settings)
    assert st.redis is not None and st.redis.exists and not st.redis.group_exists
    assert st.health == "degraded"
    assert any("consumer group file_processors does not exist" in p for p in st.problems)


def test_consumer_heartbeat_host_rate_and_last_error(env: Env) -> None:
    for i in range(30):
        env.xadd(event(env, i))
    consumer = Consumer(env.settings, write=None)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the heartbeat is refreshed every 2 s: wait for one written after the last batch
            st = collect_status(env.settings)
            beats = [c.inserted for c in st.redis.consumers] if st.redis else []
            if beats == [30] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        consumer.stop()
        thread.join(30)
    assert st.redis is not None
    [live] = st.redis.consumers
    assert live.name == env.settings.consumer_name and live.pending == 0
    assert live.host == socket.gethostname() and live.inserted == 30
    assert live.rate is not None and live.rate > 0 and live.last_error == ""
    assert live.heartbeat_age_s is not None and live.heartbeat_age_s < 5
    assert st.health == "healthy", st.problems

    # What consumer.py's heartbeat holds while it waits out an outage.
    beat = {
        "name": "w2",
        "host": "worker-host-2",
        "pid": 4242,
        "rate": 12.5,
        "inserted": 99,
        "last_error": "PostgreSQL: connection refused",
        "updated": time.time(),
    }
    env.redis.set(heartbeat_key(env.settings.stream, "w2"), json.dumps(beat), ex=HEARTBEAT_TTL_S)
    env.redis.xgroup_createconsumer(env.settings.stream, env.settings.group, "w2")
    st = collect_status(env.settings)
    assert st.redis is not None
    w2 = next(c for c in st.redis.consumers if c.name == "w2")
    assert (w2.host, w2.pid, w2.rate, w2.inserted) == ("worker-host-2", 4242, 12.5, 99)
    assert w2.last_error == "PostgreSQL: connection refused"
    text = status.render(st)
    assert "worker-host-2" in text and "12.50 files/sec" in text and "PostgreSQL: connection refused" in text


def test_dead_letters_by_reason(env: Env) -> None:
    now = redis_now_ms(env)
    env.redis.xadd(
        env.settings.dead_stream, {"reason": "too_large", "error": "old"}, id=f"{now - 3_600_000}-0"
    )
    env.xadd({"file_id": "not-a-uuid", "filename": "a", "key": "a"})
    env.xadd({"file_id": "also-not", "filename": "b", "key": "b"})
    env.xadd(event(env, 0, key="missing.txt"))
    env.xadd(event(env, 1))
    stats = env.drain()
    assert stats.inserted == 1 and stats.dead_lettered == 3
    st = collect_status(env.settings)
    t = st.redis
    assert t is not None
    assert t.dead_total == 4 and t.dead_counted == 4
    assert t.dead_by_reason == {"bad_uuid": 2, "missing": 1, "too_large": 1}
    assert t.dead_last_minute == 3 and t.dead_last_minute_by_reason == {"bad_uuid": 2, "missing": 1}
    assert st.health == "degraded"
    assert "dead letters rising: 3 in the last minute (bad_uuid: 2, missing: 1)" in st.problems
    assert "bad_uuid: 2, missing: 1, too_large: 1" in status.render(st)


def test_old_dead_letters_are_not_rising(env: Env) -> None:
    now = redis_now_ms(env)
    env.redis.xadd(env.settings.dead_stream, {"reason": "missing"}, id=f"{now - 600_000}-0")
    st = collect_status(env.settings)
    assert st.redis is not None and st.redis.dead_total == 1 and st.redis.dead_last_minute == 0
    assert st.health == "healthy", st.problems


@both_tables
def test_table_rows_and_throughput(env: Env) -> None:
    insert_rows(env, 3, "5 seconds")
    insert_rows(env, 4, "10 minutes")
    insert_rows(env, 5, "2 hours")
    st = collect_status(env.settings)
    e = st.events
    assert e is not None and e.exists
    assert (e.rows_total, e.rows_last_minute, e.rows_last_hour) == (12, 3, 7)
    assert not e.rows_estimated
    assert abs(e.throughput - 3 / 60) < 1e-9
    # The rate history: the last hour's files per minute, read from the table itself here.
    history = e.table["history"]
    assert history["source"] == "table"
    assert sum(m["files"] for m in history["minutes"]) == 7
    assert {m["consumer"] for m in history["minutes"]} == {"c"}
    text = status.render(st)
    assert "Throughput: 0.05 files/sec" in text and "Rows:                   12" in text
    assert "History:                7 files, 0.0 MB in the last 60 minutes; busiest minute " in text
    with psycopg.connect(env.pg_uri) as conn:
        ext = read_extension(conn)
    if env.hypertable:
        assert e.table["hypertable"] and e.table["chunks"] >= 1 and e.table["license"] == "apache"
        assert e.table["chunk_interval_s"] == 86400
        assert f"Kind:                   hypertable (TimescaleDB {ext.installed}, apache edition)" in text
        assert "Chunks:                 " in text and " of 1 day" in text
        policies = "none in this edition (old chunks: `filepipe drop-chunks` from cron)"
        assert f"Policies:               {policies}" in text
    elif ext.state == "not preloaded":  # the shared server once TimescaleDB is built on it
        assert e.table["lines"] == [["Kind", "plain table", ""], ["TimescaleDB", ext.describe(), ""]]
        assert "installed but not preloaded: set shared_preload_libraries = 'timescaledb'" in text
    else:
        assert e.table["lines"][0][1].startswith("plain table (TimescaleDB ")


def test_missing_table_is_degraded(env: Env) -> None:
    env.sql(f"DROP TABLE {env.settings.table}")
    st = collect_status(env.settings)
    assert st.events is not None and not st.events.exists
    assert st.health == "degraded"
    assert f"table {env.settings.table} does not exist (run `filepipe init-db`)" in st.problems


def test_cli_json_exit_codes(env: Env) -> None:
    app = status_app()
    result = runner.invoke(app, cli_args(env, "--json"))
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    assert doc["health"] == "healthy" and doc["exit_code"] == 0 and doc["problems"] == []
    assert (
        doc["redis"]["length"] == 0 and doc["events"]["rows_total"] == 0 and doc["events"]["throughput"] == 0
    )

    ensure_group(env.redis, env.settings.stream, env.settings.group)
    for i in range(15):
        env.xadd(event(env, i))
    result = runner.invoke(app, cli_args(env, "--json"))
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["health"] == "degraded" and doc["redis"]["lag"] == 15
    assert doc["problems"][0].startswith("lag growing")

    result = runner.invoke(app, cli_args(env))
    assert result.exit_code == 1
    for words in ("STREAM", "CONSUMERS (0)", "DEAD LETTERS", "EVENTS TABLE", "⚠ DEGRADED", "- lag growing"):
        assert words in result.stdout


def test_passwords_never_shown_and_unreachable_exits_1(env: Env) -> None:
    app = status_app()
    secret = "pw-Never-Shown-42"
    host_port = env.settings.pg_uri.split("@", 1)[1]
    pg_with_password = f"postgresql://postgres:{secret}@{host_port}"
    result = runner.invoke(app, cli_args(env, "--json", pg_uri=pg_with_password))
    assert secret not in result.output
    assert json.loads(result.stdout)["pg_uri"].startswith("postgresql://postgres:***@")

    port = free_port()
    result = runner.invoke(
        app,
        cli_args(
            env,
            redis_url=f"redis://:{secret}@127.0.0.1:{port}/0",
            pg_uri=f"postgresql://postgres:{secret}@127.0.0.1:{port}/db",
        ),
    )
    assert result.exit_code == 1
    assert secret not in result.output
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in result.stdout
    assert f"cannot reach PostgreSQL at postgresql://postgres:***@127.0.0.1:{port}/db" in result.stdout
    assert "✗ UNREACHABLE" in result.stdout


def test_a_query_the_server_refuses_is_one_line(env: Env) -> None:
    """A table without the events' columns: PostgreSQL refuses the query (a psycopg
    ProgrammingError), and status says so in one line, with no traceback."""
    other = f"{env.settings.table}_other"
    env.sql(f"CREATE TABLE {other} (x int)")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "filepipe", "status", *cli_args(env, "--table", other)[1:]],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        env.sql(f"DROP TABLE {other}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    refused = [line for line in result.stdout.splitlines() if "PostgreSQL refused a status query" in line]
    assert refused, result.stdout
    assert all(line.endswith('column "event_time" does not exist') for line in refused), result.stdout

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "filepipe",
            "status",
            *cli_args(env, pg_uri="postgresql://app:pw%zz@127.0.0.1:5432/test")[1:],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    shown = 'error: PG_URI cannot be used: invalid percent-encoded token: "***"'
    assert result.stderr.strip().splitlines() == [shown], result.stderr


def test_watch_refreshes_then_stops(env: Env) -> None:
    ensure_group(env.redis, env.settings.stream, env.settings.group)
    result = runner.invoke(status_app(), cli_args(env, "--watch", "--interval", "0.2", "--count", "3"))
    assert result.exit_code == 0, result.output
    assert "STREAM" in result.stdout and "✓ HEALTHY" in result.stdout
    assert "Last 0 s:" in result.stdout  # the change since the previous refresh


def test_status_snapshot_is_json_serialisable(env: Env) -> None:
    st: Status = collect_status(env.settings)
    assert json.loads(json.dumps(st.to_json()))["stream_name"] == env.settings.stream


def test_dead_letter_reasons_follow_the_stream_between_refreshes(env: Env, monkeypatch: Any) -> None:
    dead = env.settings.dead_stream
    collector = status.Collector(env.settings)
    try:
        for reason in ("missing", "missing", "bad_uuid"):
            env.redis.xadd(dead, {"reason": reason})
        t = collector.collect().redis
        assert t is not None and t.dead_by_reason == {"missing": 2, "bad_uuid": 1}
        env.redis.xadd(dead, {"reason": "too_large"})
        t = collector.collect().redis  # reads only the new one
        assert t is not None and t.dead_by_reason == {"missing": 2, "bad_uuid": 1, "too_large": 1}
        assert t.dead_total == t.dead_counted == 4
        env.redis.delete(dead)  # e.g. after `filepipe dlq` purged it, then refilled
        for reason in ("unsafe_key",) * 5:
            env.redis.xadd(dead, {"reason": reason})
        t = collector.collect().redis
        assert t is not None and t.dead_by_reason == {"unsafe_key": 5} and t.dead_total == 5
    finally:
        collector.close()

    # A huge dead-letter stream: reasons come from the newest entries only, and say so.
    monkeypatch.setattr(observe_dead, "DEAD_SCAN_LIMIT", 3)
    env.redis.delete(dead)
    for reason in ("unsafe_key", "missing", "missing", "missing", "bad_uuid"):
        env.redis.xadd(dead, {"reason": reason})
    st = collect_status(env.settings)
    assert st.redis is not None and st.redis.dead_total == 5 and st.redis.dead_counted == 3
    assert st.redis.dead_by_reason == {"missing": 2, "bad_uuid": 1}
    assert "(reasons of the newest 3)" in status.render(st)


def test_watch_json_prints_one_document_per_refresh(env: Env) -> None:
    result = runner.invoke(
        status_app(), cli_args(env, "--watch", "--json", "--interval", "0.1", "--count", "2")
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert [json.loads(line)["health"] for line in lines] == ["healthy", "healthy"]


def test_registered_in_the_filepipe_command(env: Env) -> None:
    from filepipe.cli import app

    result = runner.invoke(app, cli_args(env, "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["health"] == "healthy"


def test_partitioned_stream_is_one_view(env: Env) -> None:
    settings = env.settings_with(partitions=3)
    names = [partition_stream(settings.stream, i) for i in range(3)]
    for i, name in enumerate(names):
        for j in range(i + 1):  # 1, 2 and 3 entries
            env.redis.xadd(name, event(env, 10 * i + j))
    env.redis.xadd(names[2], {"file_id": "not-a-uuid", "filename": "x", "key": "f0.txt"})
    stats = env.drain(partitions=3)
    assert (stats.inserted, stats.dead_lettered) == (6, 1)
    for k in range(2):
        env.redis.xadd(names[0], event(env, 100 + k))
    env.redis.xreadgroup(settings.group, "ghost", {names[0]: ">"}, count=10)
    env.redis.xadd(names[1], event(env, 200))

    st = collect_status(settings)
    t = st.redis
    assert t is not None and st.partitions == 3
    # What was consumed first was trimmed; the arrivals are counted from the trims' samples.
    assert [(p.stream, p.length, p.lag, p.pending, p.dead_total) for p in t.partitions] == [
        (names[0], 2, 0, 2, 0),
        (names[1], 1, 1, 0, 0),
        (names[2], 0, 0, 0, 1),
    ]
    assert (t.length, t.lag, t.pending, t.arrivals_last_minute) == (3, 1, 2, 10)
    assert t.oldest_pending is not None and t.oldest_pending.consumer == "ghost"
    by_name = {c.name: c.pending for c in t.consumers}
    # One line per consumer, all partitions; the drain's consumer departed (no heartbeat, nothing pending).
    assert by_name == {"ghost": 2} and t.departed == 1
    assert [c.state for c in t.consumers] == ["dead"]
    assert t.dead_by_reason == {"bad_uuid": 1} and t.dead_last_minute == 1
    assert st.events is not None and st.events.rows_last_minute == 6
    text = status.render(st)
    assert "3 partitions" in text and "Partitions:" in text and f"most lag 1 on {names[1]}" in text
    assert t.group_recreated is None and "Group recreated" not in text

    # Two partitions' groups were found missing and created again: the latest is shown.
    note_recreated(env.redis, names[0], settings.group, "c1", "NOGROUP No such key")
    env.redis.expire(group_recreated_key(names[0], settings.group), GROUP_RECREATED_TTL_S - 300)
    note_recreated(env.redis, names[1], settings.group, "c2", "UNBLOCKED the stream key no longer exists")
    st = collect_status(settings)
    assert st.redis is not None and st.redis.group_recreated is not None
    assert (st.redis.group_recreated.stream, st.redis.group_recreated.consumer) == (names[1], "c2")
    line = next(line for line in status.render(st).splitlines() if "Group recreated" in line)
    assert f"by c2 on {names[1]}: it was missing (UNBLOCKED the stream key no longer exists)" in line, line
    assert st.to_json()["redis"]["group_recreated"]["consumer"] == "c2"


def test_partitions_on_a_redis_cluster(env: Env) -> None:
    from tests.support.cluster import RedisClusterServers

    from filepipe.stream import connect

    with RedisClusterServers() as cluster:
        settings = env.settings_with(redis_url=cluster.url, redis_cluster=True, partitions=3)
        r = connect(settings)
        try:
            for i in range(3):
                name = partition_stream(settings.stream, i)
                for j in range(i + 1):
                    r.xadd(name, event(env, 10 * i + j))
                ensure_group(r, name, settings.group)
            r.xreadgroup(settings.group, "ghost", {partition_stream(settings.stream, 2): ">"}, count=2)
            r.xadd(partition_stream(settings.stream, 1) + ":dead", {"reason": "missing"})
            st = collect_status(settings)
        finally:
            r.close()
    t = st.redis
    assert t is not None, st.redis_error
    assert [(p.length, p.lag, p.pending, p.dead_total) for p in t.partitions] == [
        (1, 1, 0, 0),
        (2, 2, 0, 1),
        (3, 1, 2, 0),
    ]
    assert (t.length, t.lag, t.pending, t.dead_total) == (6, 4, 2, 1)
    assert [(c.name, c.pending) for c in t.consumers] == [("ghost", 2)]
    assert t.dead_by_reason == {"missing": 1}
