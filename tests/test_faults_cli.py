"""Every command against servers that are down, refuse the login, or are something else on
that port: one line on stderr, no traceback (without --debug), the documented exit code
(2 when the settings must change, 1 for an outage). `consume --drain` waits an outage out,
saying so in its log, and gives up after FILEPIPE_DRAIN_TIMEOUT: its log lines come before
the one error line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tests.conftest import Env
from tests.support.tls import tls_files, tls_only_args

from filepipe.config import mask_url
from filepipe.embedded import PostgresServer, RedisServer, free_port

SECRET = "Wr0ng-Secret-77"

# command -> which service it needs
REDIS_COMMANDS = {
    "produce": ["produce", "{file}"],
    "dlq list": ["dlq", "list"],
    "dlq replay": ["dlq", "replay"],
    "dlq purge": ["dlq", "purge", "--yes"],
    "consume": ["consume", "--drain"],
    "demo": ["demo", "--files", "10"],
}
PG_COMMANDS = {
    "init-db": ["init-db", "--plain"],
    "drop-chunks": ["drop-chunks", "--older-than", "90d"],
    "consume": ["consume", "--drain"],
    "demo": ["demo", "--files", "10"],
}
# How long `consume --drain` waits for a service that does not answer.
DRAIN_TIMEOUT = "2"
# A log line of `consume` (what it does, what it waits for) before its error line.
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--requirepass", "the-right-one"]) as server:
        yield server


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis that speaks only TLS (it resets a plain connection without a word)."""
    ca, cert, key, _ = tls_files(tmp_path_factory.mktemp("tls"))
    port = free_port()
    with RedisServer(port=port, extra_args=tls_only_args(port, cert, key, ca)) as server:
        yield server


@pytest.fixture
def servers(locked_redis: RedisServer, tls_redis: RedisServer) -> dict[str, RedisServer]:
    return {"locked": locked_redis, "tls": tls_redis}


@pytest.fixture(scope="module")
def plain_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL without SSL."""
    with PostgresServer() as server:
        yield server


def redis_cases(env: Env, servers: dict[str, RedisServer]) -> dict[str, tuple[str, int]]:
    """REDIS_URL of each fault, and the exit code it must give."""
    pg_port = urlsplit(env.settings.pg_uri).port or 5432
    return {
        "down": (f"redis://:{SECRET}@127.0.0.1:{free_port()}/0", 1),
        "wrong password": (f"redis://:{SECRET}@127.0.0.1:{servers['locked'].port}/0", 2),
        "wrong port (PostgreSQL's)": (f"redis://:{SECRET}@127.0.0.1:{pg_port}/0", 1),
        "TLS only, redis:// given": (f"redis://:{SECRET}@127.0.0.1:{servers['tls'].port}/0", 2),
        "no TLS, rediss:// given": (f"rediss://:{SECRET}@127.0.0.1:{servers['locked'].port}/0", 2),
        "TLS, its certificate not trusted": (f"rediss://:{SECRET}@127.0.0.1:{servers['tls'].port}/0", 2),
    }


def pg_cases(env: Env, plain: PostgresServer) -> dict[str, tuple[str, int]]:
    """PG_URI of each fault (the server answers with trust auth: a role it does not have is
    its refusal), and the exit code it must give."""
    redis_port = urlsplit(env.settings.redis_url).port or 6379
    pg = urlsplit(env.settings.pg_uri)
    host = f"{pg.hostname}:{pg.port or 5432}"
    return {
        "down": (f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/postgres", 1),
        "refused": (f"postgresql://fp_no_such_role:{SECRET}@{host}/postgres", 2),
        "wrong port (Redis's)": (f"postgresql://postgres:{SECRET}@127.0.0.1:{redis_port}/postgres", 1),
        "SSL required, none there": (
            f"postgresql://postgres:{SECRET}@127.0.0.1:{plain.port}/postgres?sslmode=require",
            2,
        ),
    }


def run(args: list[str], env: Env, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("FILEPIPE_", "REDIS", "PG_", "CONSUMER"))
    }
    base.update(
        {
            "REDIS_URL": env.settings.redis_url,
            "PG_URI": env.settings.pg_uri,
            "STREAM_NAME": env.settings.stream,
            "FILEPIPE_TABLE": env.settings.table,
            "LOCAL_STORAGE_DIR": str(env.storage),
            "FILEPIPE_CONNECT_TIMEOUT": "3",
            "FILEPIPE_DRAIN_TIMEOUT": DRAIN_TIMEOUT,
            **extra,
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "filepipe", *args],
        env=base,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,  # not a terminal: the demo does not wait for Enter
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check(result: subprocess.CompletedProcess[str], code: int, what: str) -> str:
    """Asserts the outcome; returns the error line."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output and SECRET not in output, (what, output)
    assert result.returncode == code, (what, result.returncode, output)
    *logged, last = result.stderr.strip().splitlines() or [""]
    assert last.startswith("error: "), (what, output)
    if what.startswith("consume"):
        assert all(LOG_LINE.match(line) for line in logged), (what, output)
        if code == 1:  # waited for, with the reason shown, then given up
            assert any(" unreachable (" in line and "retrying in" in line for line in logged), (what, output)
            assert last.endswith(f"the longest --drain waits (FILEPIPE_DRAIN_TIMEOUT={DRAIN_TIMEOUT})"), (
                what,
                output,
            )
    else:
        assert not logged, (what, output)
    if what.startswith("demo"):  # what it set out to use, then what it cleaned up
        assert result.stdout.startswith("  Redis: ") and result.stdout.endswith("✓ Cleaned up\n"), output
    else:
        assert result.stdout == "", (what, output)
    return last


def test_redis_commands(env: Env, tmp_path: Path, servers: dict[str, RedisServer]) -> None:
    (tmp_path / "one.txt").write_text("one")
    for fault, (url, code) in redis_cases(env, servers).items():
        for name, args in REDIS_COMMANDS.items():
            result = run([a.format(file=tmp_path / "one.txt") for a in args], env, tmp_path, REDIS_URL=url)
            line = check(result, code, f"{name}, Redis {fault}")
            if fault.startswith("TLS only"):
                assert "speaks only TLS: use a rediss:// URL" in line, line
            elif fault.startswith("no TLS"):
                assert "does not speak TLS: use a redis:// URL" in line, line
            elif fault.startswith("TLS"):
                assert "certificate verify failed" in line, line
            elif code == 2:
                # The server's own reason, and where it came from.
                assert "invalid username-password pair" in line, line
                if name == "consume":
                    assert line.startswith(f"error: Redis at {mask_url(url)} refused: "), line
                else:
                    assert "refused the connection" in line and "check REDIS_URL" in line, line
            elif name != "consume":
                assert "cannot reach Redis at" in line, line
    assert not any(p.is_file() for p in env.storage.rglob("*"))  # produce stored nothing


def test_postgres_commands(env: Env, tmp_path: Path, plain_pg: PostgresServer) -> None:
    for fault, (uri, code) in pg_cases(env, plain_pg).items():
        for name, args in PG_COMMANDS.items():
            result = run(args, env, tmp_path, PG_URI=uri)
            line = check(result, code, f"{name}, PostgreSQL {fault}")
            check_uri = "" if name == "consume" else " (check PG_URI)"
            if fault.startswith("SSL"):
                assert line.startswith(f"error: PostgreSQL at {mask_url(uri)} refused"), line
                assert line.endswith("server does not support SSL, but SSL was required" + check_uri), line
            elif code == 2:
                if name == "consume":
                    assert line.startswith(f"error: PostgreSQL at {mask_url(uri)} refused: "), line
                    assert line.endswith('FATAL:  role "fp_no_such_role" does not exist'), line
                else:
                    assert line.endswith('role "fp_no_such_role" does not exist (check PG_URI)'), line
            elif name != "consume":
                assert "cannot reach PostgreSQL at" in line, line


def test_status_reports_each_fault_and_exits_1(
    env: Env, tmp_path: Path, servers: dict[str, RedisServer], plain_pg: PostgresServer
) -> None:
    """status renders what it could read, names what it could not (a refusal as one, with
    the setting to check), and exits 1."""
    faults = [("REDIS_URL", url, code) for url, code in redis_cases(env, servers).values()]
    faults += [("PG_URI", uri, code) for uri, code in pg_cases(env, plain_pg).values()]
    for name, value, code in faults:
        result = run(["status"], env, tmp_path, **{name: value})
        output = result.stdout + result.stderr
        assert "Traceback" not in output and SECRET not in output, (name, value, output)
        assert result.returncode == 1, (name, value, output)
        assert "✗ UNREACHABLE" in result.stdout or "✗ DEGRADED" in result.stdout, output
        service = "Redis" if name == "REDIS_URL" else "PostgreSQL"
        said = next(line for line in result.stdout.splitlines() if line.startswith("  ✗ "))
        if code == 2:
            assert said.startswith(f"  ✗ {service} at {mask_url(value)} refused the connection: "), said
            assert said.endswith(f"(check {name})"), said
        else:
            assert said.startswith(f"  ✗ cannot reach {service} at {mask_url(value)}: "), said


def test_debug_shows_the_traceback(env: Env, tmp_path: Path) -> None:
    result = run(["dlq", "list", "--debug"], env, tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1 and "Traceback" in result.stderr
