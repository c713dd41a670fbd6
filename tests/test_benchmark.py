"""`filepipe benchmark` against real services, with real latency injected by a loopback
TCP proxy in front of one of them.

No figure is asserted against a timed threshold; only the verdict and the round trips'
grades are, and the injected delay (40 ms each way, so 80 ms per round trip) dwarfs anything
a busy 2-core machine adds. Figures a busy machine can make slow on its own (a new
connection's 100 ms, a COPY's 20,000 rows/s) are not asserted on.
Small batches (100) make the verdict depend on latency, not on how fast this machine's
disk happens to be."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from tests.conftest import Env, both_tables
from tests.support.proxy import TcpProxy
from typer.testing import CliRunner

from filepipe import benchmark
from filepipe.cli import app
from filepipe.config import Settings
from filepipe.db import init_db
from filepipe.embedded import free_port

runner = CliRunner()
DELAY_MS = 40
SECRET = "pw-Never-Shown-42"


def with_port(url: str, port: int, password: str | None = None) -> str:
    """`url` pointing at 127.0.0.1:`port`, optionally with a password."""
    parts = urlsplit(url)
    user = parts.username or ("default" if parts.scheme.startswith("redis") else "postgres")
    auth = f"{user}:{password}@" if password else (f"{parts.username}@" if parts.username else "")
    return urlunsplit((parts.scheme, f"{auth}127.0.0.1:{port}", parts.path, parts.query, parts.fragment))


def loopback_port(url: str) -> int:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        pytest.skip("the latency proxy only forwards to 127.0.0.1")
    return parts.port


@pytest.fixture
def slow_pg(env: Env) -> Iterator[Settings]:
    with TcpProxy(loopback_port(env.settings.pg_uri), delay_ms=DELAY_MS) as proxy:
        yield env.settings_with(pg_uri=with_port(env.settings.pg_uri, proxy.port), batch_size=100)


@pytest.fixture
def slow_redis(env: Env) -> Iterator[Settings]:
    with TcpProxy(loopback_port(env.settings.redis_url), delay_ms=DELAY_MS) as proxy:
        yield env.settings_with(redis_url=with_port(env.settings.redis_url, proxy.port), batch_size=100)


@pytest.fixture
def own_schema(env: Env) -> Iterator[Settings]:
    """`env`'s settings with the events table in a schema of its own, where the benchmark
    puts its scratch tables too: what is left in it is this test's, whatever other runs
    on the same server do meanwhile."""
    schema = f"fp_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(env.pg_uri, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    settings = env.settings_with(table=f"{schema}.events")
    try:
        init_db(settings, plain=not env.hypertable)
        yield settings
    finally:
        with psycopg.connect(env.pg_uri, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def cli_args(redis_url: str, pg_uri: str, storage: Path | str, *more: str) -> list[str]:
    """`filepipe benchmark` on these servers and files, with few samples, and `more`."""
    return [
        "benchmark",
        "--redis-url",
        redis_url,
        "--pg-uri",
        pg_uri,
        "--local-storage-dir",
        str(storage),
        "--samples",
        "3",
        "--connections",
        "1",
        *more,
    ]


def tables_in(env: Env, schema: str) -> list[str]:
    return [row[0] for row in env.sql("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))]


def run(settings: Settings, **kw: Any) -> benchmark.Report:
    kw.setdefault("samples", 5)
    kw.setdefault("connections", 2)
    kw.setdefault("file_size", 4096)
    return benchmark.run(settings, **kw)


def section(text: str, title: str) -> str:
    """The lines of one section of the human report."""
    return text.split(title, 1)[1].split("\n\n", 1)[0]


def line(text: str, label: str) -> str:
    """The line of the human report for figure `label`."""
    return next(line for line in text.splitlines() if line.startswith(f"  {label}:"))


def database_title(timescaledb: bool) -> str:
    """The database section's title: the guide's where TimescaleDB is in the database."""
    return "TIMESCALEDB PERFORMANCE" if timescaledb else "POSTGRESQL PERFORMANCE"


def test_slow_database_is_the_bottleneck(slow_pg: Settings) -> None:
    report = run(slow_pg)
    text = benchmark.render(report)
    assert report.verdict is not None and report.verdict.bottleneck == "postgres" and report.verdict.alarm
    assert report.to_json()["bottleneck"] == "postgres"
    assert "⚠️  DATABASE IS THE BOTTLENECK!" in text
    assert "SOLUTION: CONSUMER_BATCH_SIZE=" in text and "Expected improvement: " in text
    pg = section(text, database_title(bool(report.postgres.timescaledb)))
    assert "⚠ SLOW!" in pg and "⚠ Creating connections is expensive!" in pg
    assert "⚠" not in line(text, "PING (avg)")
    # The guide's per-file-connection consumer pays that latency per file; filepipe does not.
    assert report.model is not None
    assert report.model.old_rate() < report.model.fast_rate() < report.model.rate()
    assert report.exit_code == 0


def test_slow_redis_is_the_bottleneck(slow_redis: Settings) -> None:
    report = run(slow_redis)
    text = benchmark.render(report)
    assert report.verdict is not None and report.verdict.bottleneck == "redis" and report.verdict.alarm
    assert report.to_json()["bottleneck"] == "redis"
    assert "⚠️  REDIS IS THE BOTTLENECK!" in text
    assert "⚠ SLOW!" in section(text, "REDIS PERFORMANCE")
    assert "⚠" not in line(text, "Pooled round trip")
    assert report.exit_code == 0


def test_no_injected_latency_does_not_cry_wolf(env: Env) -> None:
    report = run(env.settings, file_size=64 * 1024)
    text = benchmark.render(report)
    assert report.verdict is not None
    assert report.verdict.bottleneck in ("storage", "consumer"), text
    for slow in ("REDIS IS THE BOTTLENECK", "DATABASE IS THE BOTTLENECK", "UNREACHABLE"):
        assert slow not in text
    assert "⚠" not in line(text, "PING (avg)") and "⚠" not in line(text, "Pooled round trip")
    assert report.exit_code == 0


@both_tables
def test_json_for_machines_and_words_for_people(env: Env, own_schema: Settings) -> None:
    table = own_schema.table
    args = cli_args(
        env.settings.redis_url, env.settings.pg_uri, env.storage, "--table", table, "--file-size", "4096"
    )
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bottleneck"] in benchmark.COMPONENTS and doc["unreachable"] == []
    assert doc["redis"]["ping"]["p50"] > 0 and doc["redis"]["xadd"]["n"] == 3 and doc["redis"]["batch"] > 0
    pg = doc["postgres"]
    assert (
        pg["table_exists"]
        and pg["new_connection"]["n"] == 1
        and pg["round_trip"]["p99"] >= pg["round_trip"]["p50"]
    )
    assert pg["copy_rows"] == benchmark.COPY_ROWS and pg["copy_rows_per_s"] > 0 and pg["copy_mb_per_s"] > 0
    assert pg["load_rows"] > 1 and not pg["load_estimated"]
    assert pg["hypertable"] == env.hypertable
    ext = pg["timescale"]["extension"]
    if env.hypertable:  # TimescaleDB's figures, and the same batch loaded into a plain table
        assert pg["timescale"]["license"] == "apache" and pg["timescale"]["chunk_interval_s"] == 86400
        assert ext["state"] == "installed" and ext["preloaded"] and pg["timescaledb"] == ext["installed"]
        assert pg["other_kind"] == "plain" and pg["other_load_batch_ms"] > 0
    else:
        assert ext["state"] in ("absent", "not preloaded") and pg["other_kind"] == ""
    assert tables_in(env, table.split(".")[0]) == ["events"]  # no scratch table left next to it
    assert doc["storage"]["kind"] == "local" and doc["storage"]["mb_per_s"] > 0 and doc["s3"] is None
    model = doc["model"]
    assert model["batch_size"] == env.settings.batch_size and model["file_size"] == 4096
    assert 0 < model["old_consumer_files_per_s"] < model["filepipe_files_per_s"]
    assert model["hiding_batch_size"] >= 1 and model["hiding_consumers"] >= 1
    assert doc["pipeline"] is None

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for words in (
        "REDIS PERFORMANCE",
        "PING (avg):",
        database_title(env.hypertable),
        "Connection time:",
        "New connection (avg):",
        "COPY throughput:",
        "STORAGE PERFORMANCE",
        "Local read+hash:",
        "S3:                     not configured (skipped)",
        "ESTIMATED THROUGHPUT",
        "Old consumer (new connection per file):",
        "Fast consumer (pooled, batch of 50):",
        "To hide the latency: CONSUMER_BATCH_SIZE ≥",
        "SOLUTION:",
    ):
        assert words in result.stdout, words
    assert database_title(not env.hypertable) not in result.stdout
    # The table's kind, a space after its name however long (longer than the labels' column).
    kind = f"hypertable (TimescaleDB {ext['installed']}, apache edition)" if env.hypertable else "plain table"
    assert len(f"Table {table}:") > 24
    assert re.search(rf"^  Table {re.escape(table)}: +{re.escape(kind)}$", result.stdout, re.M), result.stdout
    if env.hypertable:
        assert "Chunks:                 " in result.stdout and " of 1 day" in result.stdout
        assert "Same batch, plain:" in result.stdout and "x the hypertable's (scratch tables" in result.stdout
    elif ext["state"] == "not preloaded":
        assert "installed but not preloaded: set shared_preload_libraries = 'timescaledb'" in result.stdout
    leftovers = [p for p in os.listdir(env.storage) if p.startswith(benchmark.SCRATCH_DIR_PREFIX)]
    assert leftovers == []


def test_passwords_never_appear(env: Env) -> None:
    redis_port = loopback_port(env.settings.redis_url)
    pg_port = loopback_port(env.settings.pg_uri)
    args = cli_args(
        with_port(env.settings.redis_url, redis_port, SECRET),
        with_port(env.settings.pg_uri, pg_port, SECRET),
        env.storage,
        *("--table", env.settings.table, "--file-size", "4096"),
    )
    for extra in ([], ["--json"]):
        result = runner.invoke(app, [*args, *extra])
        assert SECRET not in result.output
        assert ":***@" in result.output


def test_unreachable_services_are_named_and_exit_1(env: Env, tmp_path: Path) -> None:
    port = free_port()
    args = cli_args(
        f"redis://default:{SECRET}@127.0.0.1:{port}/0",
        f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/db",
        tmp_path / "missing",
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert SECRET not in result.output
    assert f"cannot reach Redis at redis://default:***@127.0.0.1:{port}/0" in result.stdout
    assert f"cannot reach PostgreSQL at postgresql://postgres:***@127.0.0.1:{port}/db" in result.stdout
    assert "LOCAL_STORAGE_DIR" in result.stdout and "does not exist" in result.stdout
    assert "✗ REDIS IS UNREACHABLE" in result.stdout

    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 1 and SECRET not in result.output
    doc = json.loads(result.stdout)
    assert doc["unreachable"] == ["redis", "postgres", "storage"] and doc["bottleneck"] == "redis"

    # Only PostgreSQL down: the rest is measured, the report says which one, exit 1.
    pg_down = f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/db"
    result = runner.invoke(
        app, cli_args(env.settings.redis_url, pg_down, env.storage, "--json", "--file-size", "4096")
    )
    assert result.exit_code == 1 and SECRET not in result.output
    doc = json.loads(result.stdout)
    assert doc["unreachable"] == ["postgres"] and doc["bottleneck"] == "postgres"
    assert doc["redis"]["status"] == "ok" and doc["storage"]["status"] == "ok"


def test_a_refused_connection_is_not_an_outage(env: Env) -> None:
    """A wrong Redis password and an unknown database: both servers answer, and say no
    until the settings change. Each is named with the server's own reason, the verdict says
    which setting to fix, and the exit code is 2 (a configuration error), not 1."""
    from filepipe.embedded import RedisServer

    parts = urlsplit(env.settings.pg_uri)
    missing = f"fp_no_such_db_{uuid.uuid4().hex[:8]}"
    with RedisServer(extra_args=["--requirepass", "the-right-one"]) as server:
        args = cli_args(
            with_port(server.url, server.port, SECRET),
            urlunsplit((parts.scheme, parts.netloc, f"/{missing}", parts.query, "")),
            env.storage,
            *("--file-size", "4096"),
        )
        result = runner.invoke(app, args)
        as_json = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 2, result.output
    assert SECRET not in result.output
    assert (
        f"✗ Redis at redis://default:***@127.0.0.1:{server.port}/0 refuses the connection: "
        "invalid username-password pair or user is disabled." in result.stdout
    )
    assert f'refuses the connection: database "{missing}" does not exist' in result.stdout
    assert "✗ REDIS REFUSES THE CONNECTION" in result.stdout and "UNREACHABLE" not in result.stdout
    assert "SOLUTION: fix REDIS_URL (redis://default:***@" in result.stdout
    assert "waiting will not change the server's answer" in result.stdout
    assert as_json.exit_code == 2 and SECRET not in as_json.output
    doc = json.loads(as_json.stdout)
    assert (doc["refused"], doc["unreachable"], doc["bottleneck"]) == (["redis", "postgres"], [], "redis")
    assert doc["redis"]["status"] == doc["postgres"]["status"] == "refused"
    assert doc["storage"]["status"] == "ok" and doc["model"] is None


def test_what_postgresql_refuses_for_good(env: Env) -> None:
    """Told apart by the server's (or libpq's) own words: an unknown database or role, a
    port libpq cannot use; a closed port is an outage, not a refusal."""
    from filepipe.retry import pg_login_refusal

    parts = urlsplit(env.settings.pg_uri)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    cases = {
        f"postgresql://postgres@{host}/fp_no_such_db": 'database "fp_no_such_db" does not exist',
        f"postgresql://fp_no_such_role@{host}/postgres": 'role "fp_no_such_role" does not exist',
        "postgresql://postgres@127.0.0.1:99999/postgres": 'invalid port number: "99999"',
        f"postgresql://postgres@127.0.0.1:{free_port()}/postgres": None,
    }
    for uri, expected in cases.items():
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(uri, connect_timeout=5).close()
        refusal = pg_login_refusal(caught.value)
        if expected is None:
            assert refusal is None, (uri, refusal)
        else:
            assert refusal is not None and expected in refusal, (uri, refusal)


def test_a_pg_uri_that_cannot_be_parsed_is_one_line() -> None:
    result = runner.invoke(
        app, cli_args("redis://127.0.0.1:1/0", f"postgresql://postgres:{SECRET}%zz@127.0.0.1/db", ".")
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: PG_URI cannot be used: invalid percent-encoded token")
    assert result.output.count("\n") == 1 and SECRET not in result.output


def test_pipeline_runs_end_to_end_and_cleans_up(env: Env) -> None:
    settings = env.settings_with(batch_size=100)
    report = run(settings, pipeline=300)
    p = report.pipeline
    assert p is not None and p.error == "", p
    assert (p.events, p.inserted, p.dead_lettered) == (300, 300, 0)
    assert p.files_per_s > 0 and p.model_files_per_s > 0
    text = benchmark.render(report)
    assert "END-TO-END RUN (--pipeline 300)" in text and "Consumed:               300 rows" in text
    assert report.to_json()["pipeline"]["inserted"] == 300
    # Nothing is left behind: scratch streams, tables, files. Each name holds the run's
    # tag, so that other runs on the same servers meanwhile do not count.
    assert len(report.tag) == 10
    assert list(env.redis.scan_iter(match=f"{benchmark.SCRATCH_KEY_PREFIX}*{report.tag}*")) == []
    tables = env.sql(
        "SELECT tablename FROM pg_tables WHERE tablename LIKE %s",
        (f"{benchmark.SCRATCH_TABLE_PREFIX}{report.tag}%",),
    )
    assert tables == []
    assert [p for p in os.listdir(env.storage) if p.startswith(benchmark.SCRATCH_DIR_PREFIX)] == []
    assert env.rows() == 0  # the events table is never touched


def test_sigterm_mid_run_removes_the_scratch_state(env: Env) -> None:
    """SIGTERM while the end-to-end run writes its files: the command stops like on Ctrl-C,
    with one line, having removed its scratch stream, table and files (named by its tag)."""
    args = cli_args(
        env.settings.redis_url, env.settings.pg_uri, env.storage, "--pipeline", "50000", "--file-size", "1024"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "filepipe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        folders: list[str] = []
        while not folders and proc.poll() is None and time.monotonic() < deadline:
            folders = [p for p in os.listdir(env.storage) if p.endswith("-pipeline")]
            time.sleep(0.05)
        assert folders, "the run never started writing its files"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tag = folders[0].removeprefix(benchmark.SCRATCH_DIR_PREFIX).removesuffix("-pipeline")
    assert (proc.returncode, out, err) == (130, "", "Interrupted.\n")
    assert os.listdir(env.storage) == []
    assert list(env.redis.scan_iter(match=f"{benchmark.SCRATCH_KEY_PREFIX}*{tag}*")) == []
    tables = env.sql(
        "SELECT tablename FROM pg_tables WHERE tablename LIKE %s",
        (f"{benchmark.SCRATCH_TABLE_PREFIX}{tag}%",),
    )
    assert tables == []


def test_s3_is_measured_when_configured(env: Env, tmp_path: Path) -> None:
    from tests.support.s3_server import MotoS3, aws_test_env

    with pytest.MonkeyPatch.context() as mp:
        for name, value in aws_test_env().items():
            mp.setenv(name, value)
        with MotoS3() as s3:
            bucket = s3.create_bucket()
            settings = env.settings_with(
                storage_mode="s3",
                s3_bucket=bucket,
                s3_prefix="uploads",
                s3_endpoint_url=s3.endpoint_url,
                batch_size=100,
            )
            report = run(settings, pipeline=40)
            left = s3.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0)
            s3.delete_bucket(bucket)
    assert report.s3 is not None and report.s3.status == "ok", report.s3
    assert report.storage is report.s3 and report.s3.one_file is not None and report.s3.files_per_s > 0
    assert report.model is not None and report.verdict is not None
    assert report.pipeline is not None and report.pipeline.inserted == 40, report.pipeline
    assert left == 0  # scratch objects deleted
    text = benchmark.render(report)
    assert "S3 GET+hash:" in text and "GET latency (p50):" in text
    assert "not used (STORAGE_MODE=s3)" in text


def test_registered_in_the_filepipe_command() -> None:
    result = runner.invoke(app, ["benchmark", "--help"])
    assert result.exit_code == 0 and "--pipeline" in result.stdout and "--json" in result.stdout


def test_redis_cluster_with_partitions(env: Env) -> None:
    from tests.support.cluster import RedisClusterServers

    with RedisClusterServers() as cluster:
        settings = env.settings_with(redis_url=cluster.url, redis_cluster=True, partitions=3, batch_size=100)
        report = run(settings, pipeline=150)
        leftovers = []
        for port in cluster.ports:
            with redis.Redis(host="127.0.0.1", port=port) as r:
                leftovers += list(r.scan_iter(match="*benchmark*"))
    assert report.redis.status == "ok", report.redis.error
    assert report.pipeline is not None and report.pipeline.inserted == 150, report.pipeline
    assert report.verdict is not None and report.exit_code == 0
    assert leftovers == []


def test_memory_and_what_the_stream_keeps(env: Env) -> None:
    s = env.settings
    for i in range(30):
        fid = f"00000000-0000-4000-8000-{i:012d}"
        env.xadd({"file_id": fid, "filename": "f", "key": "k", "size": "4096"})
    env.redis.xgroup_create(s.stream, "other_app", id="0")
    report = run(s)
    r = report.redis
    assert (r.stream_entries, r.kept) == (30, "group other_app has not read 30 entries")
    assert r.stream_memory_bytes and r.memory_used_bytes and r.memory_max_bytes is not None
    text = benchmark.render(report)
    assert f"Stream {s.stream}:" in text and "30 entries" in text and "kept: group other_app" in text
    assert "  Memory:" in text
    doc = report.to_json()["redis"]
    assert doc["stream_entries"] == 30 and doc["memory_used_bytes"] > 0
