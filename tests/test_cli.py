"""The `filepipe` command as a user runs it: real subprocesses, real services."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from tests.conftest import Env
from typer.testing import CliRunner

from filepipe.cli import app

runner = CliRunner()


def cli_env(env: Env, **extra: str) -> dict[str, str]:
    s = env.settings
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("FILEPIPE_", "REDIS", "PG_", "CONSUMER"))
    }
    base.update(
        {
            "REDIS_URL": s.redis_url,
            "PG_URI": s.pg_uri,
            "STREAM_NAME": s.stream,
            "FILEPIPE_TABLE": s.table,
            "LOCAL_STORAGE_DIR": str(env.storage),
            "CONSUMER_BLOCK_MS": "100",
        }
    )
    base.update(extra)
    return base


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "filepipe", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,  # not a terminal: the demo does not wait for Enter
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("filepipe ")
    for cmd in ([], ["init-db"], ["produce"], ["consume"], ["demo"]):
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0, result.stdout
        assert "Usage" in result.stdout


def test_init_produce_consume_as_a_user(env: Env, tmp_path: Path) -> None:
    e = cli_env(env, CONSUMER_NAME="cli-consumer")
    init = run(["init-db", "--plain"], e, tmp_path)
    assert init.returncode == 0 and "ready" in init.stdout
    assert run(["init-db", "--plain"], e, tmp_path).returncode == 0  # idempotent
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(25):
        (src / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(f"file {i}")
    produced = run(["produce", str(src)], e, tmp_path)
    assert produced.returncode == 0, produced.stderr
    assert "Enqueued 25 events" in produced.stdout
    consumed = run(["consume", "--drain"], e, tmp_path)
    assert consumed.returncode == 0, consumed.stderr
    # Batches start small after a start (FILEPIPE_BATCH_BYTES) and grow: 16, then 9.
    batches = re.findall(r"^✓ Batch complete: (\d+) records inserted$", consumed.stdout, re.M)
    assert sum(map(int, batches)) == 25 and len(batches) >= 1, consumed.stdout
    assert "📊 Total: 25 | Rate: " in consumed.stdout and "files/sec" in consumed.stdout
    assert env.rows() == 25
    assert env.sql(f"SELECT DISTINCT consumer FROM {env.settings.table}") == [("cli-consumer",)]


def test_one_of_each_is_counted_in_the_singular(env: Env, tmp_path: Path) -> None:
    """One event, one dead letter, one partition: "1 event", not "1 events". The guide's
    progress line stays as users grep it: "✓ Batch complete: 1 records inserted"."""
    e = cli_env(env, STREAM_PARTITIONS="1")
    (tmp_path / "one.txt").write_text("one")
    produced = run(["produce", str(tmp_path / "one.txt")], e, tmp_path)
    assert produced.returncode == 0, produced.stderr
    assert produced.stdout.startswith(f"✓ Enqueued 1 event to {env.settings.stream} (1 partition) ("), (
        produced
    )
    consumed = run(["consume", "--drain"], e, tmp_path)
    assert consumed.returncode == 0, consumed.stderr
    assert "✓ Batch complete: 1 records inserted\n" in consumed.stdout, consumed.stdout
    assert f"consuming {env.settings.stream} (1 partition)," in consumed.stderr, consumed.stderr
    # An entry without its file: one dead letter.
    stream = f"{env.settings.stream}:{{0}}"
    env.redis.xadd(stream, {"file_id": str(uuid.uuid4()), "filename": "gone.txt", "key": "gone.txt"})
    consumed = run(["consume", "--drain"], e, tmp_path)
    assert consumed.returncode == 0, consumed.stderr
    assert "⚠ Dead-lettered 1 entry (missing: 1)\n" in consumed.stdout, consumed.stdout
    replayed = run(["dlq", "replay"], e, tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == f"✓ Replayed 1 dead letter onto {env.settings.stream} (1 partition)\n"
    run(["consume", "--drain", "-q"], e, tmp_path)
    purged = run(["dlq", "purge", "--yes"], e, tmp_path)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("✓ Purged 1 dead letter from "), purged.stdout
    env.redis.delete(stream, f"{stream}:dead")
    demo = run(["demo", "--files", "1"], cli_env(env), tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "✓ Stored 1 sample file (" in demo.stdout, demo.stdout
    assert "  … filepipe consume --drain: 1 event\n" in demo.stdout, demo.stdout


def test_bad_configuration_is_one_line_and_exit_2(env: Env, tmp_path: Path) -> None:
    result = run(["consume", "--drain"], cli_env(env, CONSUMER_BATCH_SIZE="fifty"), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: CONSUMER_BATCH_SIZE (--batch-size) must be a whole number, not 'fifty'"
    ]
    result = run(["consume", "--batch-size", "0", "--drain"], cli_env(env), tmp_path)
    assert result.returncode == 2 and "CONSUMER_BATCH_SIZE" in result.stderr


def test_dotenv_is_read(env: Env, tmp_path: Path) -> None:
    e = cli_env(env)
    (tmp_path / ".env").write_text(f"CONSUMER_NAME=from-dotenv\nFILEPIPE_TABLE={env.settings.table}\n")
    env.write_file("a.txt", b"a")
    env.xadd({"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"})
    del e["FILEPIPE_TABLE"]
    assert run(["consume", "--drain", "-q"], e, tmp_path).returncode == 0
    assert env.sql(f"SELECT consumer FROM {env.settings.table}") == [("from-dotenv",)]


def test_missing_table_is_a_clear_error(env: Env, tmp_path: Path) -> None:
    """Checked at the start: with an empty stream too, not "Stopped: 0 inserted"."""
    e = cli_env(env, FILEPIPE_TABLE="no_such_table_here")
    for events in (0, 1):
        if events:
            env.write_file("a.txt", b"a")
            env.xadd({"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"})
        result = run(["consume", "--drain"], e, tmp_path)
        assert result.returncode == 2
        assert "no_such_table_here does not exist: run `filepipe init-db` first" in result.stderr
        assert "Traceback" not in result.stderr and "Stopped" not in result.stdout
    assert env.pending() == 0  # nothing read


def test_unreachable_redis_is_reported_without_password(env: Env, tmp_path: Path) -> None:
    from filepipe.embedded import free_port

    src = tmp_path / "a.txt"
    src.write_text("a")
    port = free_port()
    e = cli_env(env, REDIS_URL=f"redis://:hunter2@127.0.0.1:{port}/0")
    result = run(["produce", str(src)], e, tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: Error 111 connecting to "
        f"127.0.0.1:{port}. Connection refused.; nothing was stored"
    ]
    assert result.stdout == "" and not any(p.is_file() for p in env.storage.rglob("*"))


def test_produce_removes_the_files_of_events_redis_never_got(env: Env, tmp_path: Path) -> None:
    """Redis goes away after the files are stored and before their events are sent."""
    from tests.support.processes import kill

    from filepipe.embedded import RedisServer
    from filepipe.errors import TransientError
    from filepipe.producer import Producer

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.txt").write_text(str(i))
    with RedisServer() as server:
        producer = Producer(env.settings_with(redis_url=server.url))
        stored: list[Path] = []

        def after_each(_: Path) -> None:
            stored.extend(p for p in env.storage.rglob("*") if p.is_file() and p not in stored)
            kill(server)

        try:
            with pytest.raises(TransientError) as e:
                producer.produce([src], on_file=after_each)
        finally:
            producer.close()
    assert len(stored) == 3  # they were stored
    assert not any(p.is_file() for p in env.storage.rglob("*"))  # and are gone
    message = str(e.value)
    assert message.startswith(f"cannot reach Redis at {server.url}: Error 111 connecting to"), message
    removed = "the 3 files stored for events not sent were removed again, no event was enqueued"
    assert message.endswith(f"; {removed}"), message


def test_a_broken_percent_escape_never_shows_the_password(env: Env, tmp_path: Path) -> None:
    """psycopg's message for a connection string it cannot parse quotes the password."""
    broken = "postgresql://app:Tr0ub4dor%zz3@127.0.0.1:5432/test"
    e = cli_env(env, PG_URI=broken)
    for args in (["init-db"], ["status"], ["consume", "--drain"]):
        result = run(args, e, tmp_path)
        output = result.stdout + result.stderr
        assert "Tr0ub4dor" not in output, (args, output)
        assert "Traceback" not in output
        assert result.returncode == 2, (args, output)
        assert 'PG_URI cannot be used: invalid percent-encoded token: "***"' in result.stderr, args


def test_config_says_where_each_setting_came_from(env: Env, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CONSUMER_BATCH_SIZE=77\nCONSUMER_GROUP=from-dotenv\n")
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    e = cli_env(env, REDIS_URL="redis://:hunter2@127.0.0.1:6399/0", CONSUMER_GROUP="from-env")
    result = run(["config", "--block-ms", "5"], e, below)
    assert result.returncode == 0, result.stderr
    assert f".env: {tmp_path / '.env'}" in result.stdout.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["CONSUMER_BATCH_SIZE"][1:] == ["77", ".env", "CONSUMER_BATCH_SIZE", f"({tmp_path / '.env'})"]
    assert rows["CONSUMER_GROUP"][1:] == ["from-env", "env", "CONSUMER_GROUP"]  # env over .env
    assert rows["CONSUMER_BLOCK_MS"][1:] == ["5", "--block-ms"]
    assert rows["MAX_DELIVERIES"][1:] == ["5", "default"]
    assert rows["REDIS_URL"][1] == "redis://:***@127.0.0.1:6399/0"
    assert "hunter2" not in result.stdout + result.stderr
    as_json = json.loads(run(["config", "--json"], e, below).stdout)
    source = f".env CONSUMER_BATCH_SIZE ({tmp_path / '.env'})"
    assert as_json["settings"]["CONSUMER_BATCH_SIZE"] == {"value": 77, "from": source}


def test_json_log_lines_name_the_consumer(env: Env, tmp_path: Path) -> None:
    env.write_file("a.txt", b"a")
    env.xadd({"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"})
    e = cli_env(env, CONSUMER_NAME="json-consumer")
    result = run(["consume", "--drain", "--log-format", "json"], e, tmp_path)
    assert result.returncode == 0, result.stderr
    docs = [json.loads(line) for line in (result.stdout + result.stderr).splitlines()]
    keys = {"time", "level", "consumer", "worker", "message"}
    assert docs and all(keys <= doc.keys() and doc["consumer"] == "json-consumer" for doc in docs), docs
    assert any(doc["message"].startswith("Stopped: 1 inserted") for doc in docs), docs
    bad = run(["consume", "--drain"], cli_env(env, FILEPIPE_LOG_FORMAT="yaml"), tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: FILEPIPE_LOG_FORMAT (--log-format) must be 'text' or 'json', not 'yaml'"
    )


def test_processes_name_the_worker_on_each_line(env: Env, tmp_path: Path) -> None:
    for i in range(40):
        env.write_file(f"f{i}.txt", b"x")
        env.xadd({"file_id": str(uuid.uuid4()), "filename": f"f{i}.txt", "key": f"f{i}.txt"})
    e = cli_env(env, CONSUMER_NAME="named")
    result = run(["consume", "--drain", "--processes", "2"], e, tmp_path)
    assert result.returncode == 0, result.stderr
    assert env.rows() == 40
    who = re.compile(r"^(\d\d:\d\d:\d\d \w+ )?(named \[supervisor\]|named-(\d) \[worker (\d)\]): ")
    for line in (result.stdout + result.stderr).splitlines():
        m = who.match(line)
        assert m is not None and m.group(3) == m.group(4), line
    assert re.search(r"^named-\d \[worker \d\]: Stopped: ", result.stdout, re.M), result.stdout
