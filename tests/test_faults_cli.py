"""Every command against servers that are down, refuse the login, or are something else on
that port: one line on stderr, no traceback (without --debug), the documented exit code
(2 when the settings must change, 1 for an outage)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tests.conftest import Env

from filepipe.embedded import RedisServer, free_port

SECRET = "Wr0ng-Secret-77"

# command -> which service it needs
REDIS_COMMANDS = {
    "produce": ["produce", "{file}"],
    "dlq list": ["dlq", "list"],
    "dlq replay": ["dlq", "replay"],
    "dlq purge": ["dlq", "purge", "--yes"],
}
PG_COMMANDS = {
    "init-db": ["init-db", "--plain"],
    "drop-chunks": ["drop-chunks", "--older-than", "90d"],
}


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--requirepass", "the-right-one"]) as server:
        yield server


def redis_cases(env: Env, locked: RedisServer) -> dict[str, tuple[str, int]]:
    """REDIS_URL of each fault, and the exit code it must give."""
    pg_port = urlsplit(env.settings.pg_uri).port or 5432
    return {
        "down": (f"redis://:{SECRET}@127.0.0.1:{free_port()}/0", 1),
        "wrong password": (f"redis://:{SECRET}@127.0.0.1:{locked.port}/0", 2),
        "wrong port (PostgreSQL's)": (f"redis://:{SECRET}@127.0.0.1:{pg_port}/0", 1),
    }


def pg_cases(env: Env) -> dict[str, tuple[str, int]]:
    """PG_URI of each fault (the server answers with trust auth: a role it does not have is
    its refusal), and the exit code it must give."""
    redis_port = urlsplit(env.settings.redis_url).port or 6379
    pg = urlsplit(env.settings.pg_uri)
    host = f"{pg.hostname}:{pg.port or 5432}"
    return {
        "down": (f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/postgres", 1),
        "refused": (f"postgresql://fp_no_such_role:{SECRET}@{host}/postgres", 2),
        "wrong port (Redis's)": (f"postgresql://postgres:{SECRET}@127.0.0.1:{redis_port}/postgres", 1),
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
            **extra,
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "filepipe", *args],
        env=base,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check(result: subprocess.CompletedProcess[str], code: int, what: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output and SECRET not in output, (what, output)
    assert result.returncode == code, (what, result.returncode, output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (what, output)
    assert result.stdout == "", (what, output)


def test_redis_commands(env: Env, tmp_path: Path, locked_redis: RedisServer) -> None:
    (tmp_path / "one.txt").write_text("one")
    for fault, (url, code) in redis_cases(env, locked_redis).items():
        for name, args in REDIS_COMMANDS.items():
            result = run([a.format(file=tmp_path / "one.txt") for a in args], env, tmp_path, REDIS_URL=url)
            check(result, code, f"{name}, Redis {fault}")
            if code == 2:
                assert "refused the connection" in result.stderr and "check REDIS_URL" in result.stderr
            else:
                assert "cannot reach Redis at" in result.stderr
    assert not any(p.is_file() for p in env.storage.rglob("*"))  # produce stored nothing


def test_postgres_commands(env: Env, tmp_path: Path) -> None:
    for fault, (uri, code) in pg_cases(env).items():
        for name, args in PG_COMMANDS.items():
            result = run(args, env, tmp_path, PG_URI=uri)
            check(result, code, f"{name}, PostgreSQL {fault}")
            if code == 2:
                assert 'role "fp_no_such_role" does not exist (check PG_URI)' in result.stderr
            else:
                assert "cannot reach PostgreSQL at" in result.stderr


def test_status_reports_each_fault_and_exits_1(env: Env, tmp_path: Path, locked_redis: RedisServer) -> None:
    """status renders what it could read, names what it could not, and exits 1."""
    faults = [("REDIS_URL", url) for url, _ in redis_cases(env, locked_redis).values()]
    faults += [("PG_URI", uri) for uri, _ in pg_cases(env).values()]
    for name, value in faults:
        result = run(["status"], env, tmp_path, **{name: value})
        output = result.stdout + result.stderr
        assert "Traceback" not in output and SECRET not in output, (name, value, output)
        assert result.returncode == 1, (name, value, output)
        assert "✗ UNREACHABLE" in result.stdout or "✗ DEGRADED" in result.stdout, output


def test_debug_shows_the_traceback(env: Env, tmp_path: Path) -> None:
    result = run(["dlq", "list", "--debug"], env, tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1 and "Traceback" in result.stderr
