"""What `filepipe consume` does with services it can never use, and with services that do
not answer yet. A refusal that waiting will not fix (a password, a user, a database or a
role that does not exist, a command the ACL denies, TLS refused, a missing table) exits 2
at once with the server's own reason in one line. A service that does not answer is
waited for, its reason logged; a stop then says what it was waiting for, and `--drain`
gives up after FILEPIPE_DRAIN_TIMEOUT (exit 1).

The servers here are private: a PostgreSQL with password authentication for one role,
and a Redis with ACL users."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from filepipe.config import load_settings
from filepipe.db import init_db
from filepipe.embedded import PostgresServer, RedisServer, free_port


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """Role `app` (password `right`) needs its password; every other role is trusted."""
    with PostgresServer() as server:
        with psycopg.connect(server.uri, autocommit=True) as conn:
            conn.execute("CREATE ROLE app LOGIN PASSWORD 'right'")
            conn.execute("CREATE DATABASE appdb OWNER app")
            hba = Path(conn.execute("SHOW hba_file").fetchone()[0])  # type: ignore[index]
            hba.write_text(
                "local all all trust\n"
                "host all app 127.0.0.1/32 scram-sha-256\n"
                "host all all 127.0.0.1/32 trust\n"
            )
            conn.execute("SELECT pg_reload_conf()")
        yield server


@pytest.fixture(scope="module")
def rs() -> Iterator[RedisServer]:
    """User `app` (password `right`) may do anything; `limited` only PING."""
    with RedisServer() as server:
        r = redis.Redis.from_url(server.url)
        r.acl_setuser("app", enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])
        r.acl_setuser("limited", enabled=True, passwords=["+right"], keys=["*"], commands=["-@all", "+ping"])
        r.close()
        yield server


@pytest.fixture(scope="module")
def good(pg: PostgresServer, rs: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a consumer that works: every case below spoils one thing."""
    root = tmp_path_factory.mktemp("startup")
    table = f"fp_start_{uuid.uuid4().hex[:8]}"
    env = {
        "REDIS_URL": f"redis://app:right@127.0.0.1:{rs.port}/0",
        "PG_URI": f"postgresql://app:right@127.0.0.1:{pg.port}/appdb",
        "STREAM_NAME": f"fp_start_{uuid.uuid4().hex[:8]}",
        "FILEPIPE_TABLE": table,
        "LOCAL_STORAGE_DIR": str(root),
        "CONSUMER_BLOCK_MS": "100",
        "FILEPIPE_CONNECT_TIMEOUT": "1",
    }
    init_db(
        load_settings({"pg_uri": env["PG_URI"], "table": table}, environ={}, dotenv_path=None), plain=True
    )
    return env


def consume(good: dict[str, str], cwd: Path, *args: str, **spoilt: str) -> subprocess.Popen[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("FILEPIPE_", "REDIS", "PG_", "CONSUMER"))
    }
    return subprocess.Popen(
        [sys.executable, "-m", "filepipe", "consume", *args],
        env={**base, **good, **spoilt},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def run_drain(good: dict[str, str], cwd: Path, **spoilt: str) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    proc = consume(good, cwd, "--drain", **spoilt)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, time.monotonic() - t0


def test_a_working_setup_drains(good: dict[str, str], tmp_path: Path) -> None:
    code, out, err, _ = run_drain(good, tmp_path)
    assert code == 0, err
    assert "Stopped: 0 inserted" in out


def _refusals(pg: PostgresServer, rs: RedisServer) -> dict[str, tuple[dict[str, str], str]]:
    r, p = rs.port, pg.port
    return {
        "redis wrong password": (
            {"REDIS_URL": f"redis://app:wrong@127.0.0.1:{r}/0"},
            f"error: Redis at redis://app:***@127.0.0.1:{r}/0 refused: "
            "invalid username-password pair or user is disabled.",
        ),
        "redis unknown user": (
            {"REDIS_URL": f"redis://ghost:right@127.0.0.1:{r}/0"},
            "refused: invalid username-password pair or user is disabled.",
        ),
        "redis command denied": (
            {"REDIS_URL": f"redis://limited:right@127.0.0.1:{r}/0"},
            # (The name is given in the handshake's HELLO, which any user may send: the
            # first command refused is the consumer's first, creating its group.)
            "refused: this user has no permissions to run the 'xgroup|create' command",
        ),
        "postgres wrong password": (
            {"PG_URI": f"postgresql://app:wrong@127.0.0.1:{p}/appdb"},
            f"error: PostgreSQL at postgresql://app:***@127.0.0.1:{p}/appdb refused: "
            'connection to server at "127.0.0.1", port '
            f'{p} failed: FATAL:  password authentication failed for user "app"',
        ),
        "postgres unknown database": (
            {"PG_URI": f"postgresql://postgres@127.0.0.1:{p}/nosuchdb"},
            'FATAL:  database "nosuchdb" does not exist',
        ),
        "postgres unknown role": (
            {"PG_URI": f"postgresql://ghost@127.0.0.1:{p}/appdb"},
            'FATAL:  role "ghost" does not exist',
        ),
        "postgres TLS refused": (
            {"PG_URI": f"postgresql://app:right@127.0.0.1:{p}/appdb?sslmode=require"},
            "server does not support SSL, but SSL was required",
        ),
        "missing table": (
            {"FILEPIPE_TABLE": "no_such_table_here"},
            "error: table no_such_table_here does not exist: run `filepipe init-db` first",
        ),
    }


CASES = [
    "redis wrong password",
    "redis unknown user",
    "redis command denied",
    "postgres wrong password",
    "postgres unknown database",
    "postgres unknown role",
    "postgres TLS refused",
    "missing table",
]


@pytest.mark.parametrize("case", CASES)
def test_a_refusal_waiting_cannot_fix_exits_2_with_the_reason(
    case: str, pg: PostgresServer, rs: RedisServer, good: dict[str, str], tmp_path: Path
) -> None:
    spoilt, expected = _refusals(pg, rs)[case]
    code, out, err, took = run_drain(good, tmp_path, **spoilt)
    assert code == 2, err
    assert "Traceback" not in err + out
    lines = errors(err)
    assert len(lines) == 1 and expected in lines[0], err
    assert "wrong" not in err and "retrying" not in err, "a permanent refusal is not retried"
    assert "Stopped:" not in out
    assert took < 30, f"{took:.1f} s: not failed fast"


def unreachable(service: str) -> dict[str, str]:
    """Settings naming a port nothing listens on, for Redis (or a Redis Cluster) or PostgreSQL."""
    port = free_port()
    if service == "PostgreSQL":
        return {"PG_URI": f"postgresql://app:right@127.0.0.1:{port}/appdb"}
    spoilt = {"REDIS_URL": f"redis://app:right@127.0.0.1:{port}/0"}
    if service == "Redis Cluster":
        spoilt |= {"REDIS_CLUSTER": "1", "STREAM_PARTITIONS": "2"}
    return spoilt


@pytest.mark.parametrize("service", ["Redis", "Redis Cluster", "PostgreSQL"])
def test_an_unreachable_service_is_waited_for_and_a_drain_gives_up(
    service: str, good: dict[str, str], tmp_path: Path
) -> None:
    spoilt = unreachable(service)
    service = service.removesuffix(" Cluster")
    code, out, err, _ = run_drain(good, tmp_path, FILEPIPE_DRAIN_TIMEOUT="2", **spoilt)
    assert code == 1, err
    assert "Traceback" not in err + out
    # The reason, while waiting:
    assert re.search(rf"WARNING .*{service} unreachable \(.*\), retrying in", err), err
    lines = errors(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {service} unreachable (") and "Connection refused" in lines[0]
    assert re.search(
        r"\): gave up after \d s, the longest --drain waits \(FILEPIPE_DRAIN_TIMEOUT=2\)$", lines[0]
    )


@pytest.mark.parametrize("service", ["Redis", "Redis Cluster", "PostgreSQL"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_waiting_at_start_says_what_it_waited_for(
    signum: int, service: str, good: dict[str, str], tmp_path: Path
) -> None:
    spoilt = unreachable(service)
    service = service.removesuffix(" Cluster")
    proc = consume(good, tmp_path, **spoilt)
    assert proc.stderr is not None
    seen = ""
    while "retrying in" not in seen:
        line = proc.stderr.readline()
        assert line, "the consumer exited before waiting"
        seen += line
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in seen + err + out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"Abandoned: stopped while waiting for {service} at the start ("), out
    assert re.search(r"Connection refused\.?\); nothing was read$", last), out


def test_a_password_changed_while_consuming_fails_fast_with_the_reason(
    pg: PostgresServer, good: dict[str, str], tmp_path: Path
) -> None:
    """The pool finds no connection; a connection of the consumer's own tells why, and a
    refusal waiting cannot fix ends the consumer (exit 2), not "couldn't get a connection"."""
    appdb = f"postgresql://postgres@127.0.0.1:{pg.port}/appdb"
    with psycopg.connect(appdb, autocommit=True) as conn:
        conn.execute("CREATE ROLE rotating LOGIN PASSWORD 'before'")
        conn.execute(f"GRANT ALL ON {good['FILEPIPE_TABLE']} TO rotating")
    hba = pg.data / "pg_hba.conf"
    hba.write_text(hba.read_text().replace("host all app ", "host all app,rotating "))
    with psycopg.connect(pg.uri, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    rotating = {**good, "PG_URI": f"postgresql://rotating:before@127.0.0.1:{pg.port}/appdb"}
    proc = consume(rotating, tmp_path)
    assert proc.stderr is not None
    r = redis.Redis.from_url(good["REDIS_URL"])
    (Path(good["LOCAL_STORAGE_DIR"]) / "a.txt").write_text("a")
    for _ in range(3):
        r.xadd(good["STREAM_NAME"], {"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"})
    deadline = time.monotonic() + 30
    with psycopg.connect(appdb, autocommit=True) as conn:
        while conn.execute(f"SELECT count(*) FROM {good['FILEPIPE_TABLE']}").fetchone() != (3,):
            assert time.monotonic() < deadline, "the first events did not load"
            time.sleep(0.1)
    with psycopg.connect(pg.uri, autocommit=True) as conn:
        conn.execute("ALTER ROLE rotating PASSWORD 'after'")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rotating'")
    r.xadd(good["STREAM_NAME"], {"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"})
    out, err = proc.communicate(timeout=90)
    r.close()
    assert proc.returncode == 2, err
    assert "Traceback" not in err + out
    lines = errors(err)
    assert len(lines) == 1, err
    where = f"postgresql://rotating:***@127.0.0.1:{pg.port}/appdb"
    assert lines[0].startswith(f"error: PostgreSQL at {where} refused: "), lines[0]
    assert lines[0].endswith('FATAL:  password authentication failed for user "rotating"'), lines[0]


def test_a_redis_password_changed_while_consuming_fails_fast_with_the_reason(
    rs: RedisServer, good: dict[str, str], tmp_path: Path
) -> None:
    """Redis refuses the consumer's new connections for good (its user's password was
    changed): one line with Redis's reason, exit 2, no traceback, not a retry forever."""
    admin = redis.Redis.from_url(rs.url)
    admin.acl_setuser("rotating", enabled=True, passwords=["+before"], keys=["*"], commands=["+@all"])
    own_stream = f"fp_start_{uuid.uuid4().hex[:8]}"
    rotating = {
        **good,
        "REDIS_URL": f"redis://rotating:before@127.0.0.1:{rs.port}/0",
        "STREAM_NAME": own_stream,
    }
    proc = consume(rotating, tmp_path)
    assert proc.stderr is not None
    (Path(good["LOCAL_STORAGE_DIR"]) / "b.txt").write_text("b")
    admin.xadd(own_stream, {"file_id": str(uuid.uuid4()), "filename": "b.txt", "key": "b.txt"})
    deadline = time.monotonic() + 30
    while not consumed(admin, own_stream):
        assert time.monotonic() < deadline, "the first event was not consumed"
        time.sleep(0.1)
    admin.acl_setuser("rotating", reset_passwords=True, passwords=["+after"])
    admin.client_kill_filter(user="rotating")
    out, err = proc.communicate(timeout=90)
    admin.close()
    assert "Traceback" not in err + out, err
    assert proc.returncode == 2, err
    lines = errors(err)
    assert len(lines) == 1, err
    where = f"redis://rotating:***@127.0.0.1:{rs.port}/0"
    assert lines[0].startswith(f"error: Redis at {where} refused: "), lines[0]
    assert "invalid username-password pair" in lines[0], lines[0]


def consumed(r: redis.Redis, stream: str) -> bool:
    """Whether the group has read the stream's entries and acknowledged them all."""
    groups = r.xinfo_groups(stream) if r.exists(stream) else []
    return bool(groups) and groups[0]["lag"] == 0 and groups[0]["pending"] == 0
