"""What `filepipe consume` does before and after it reads: the round trips of its start
checks and of a drain that finds nothing, and the garbage collector it starts without."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from psycopg import pq
from tests.conftest import Env
from tests.test_cli import cli_env

from filepipe import stream
from filepipe.db.layout import read_layout
from filepipe.embedded import RedisServer


def commands_run(r: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (`INFO commandstats`), INFO aside."""
    stats: dict[str, Any] = r.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items() if name != "cmdstat_info"
    }


def test_an_empty_drain_makes_only_the_round_trips_it_needs(env: Env) -> None:
    """A new connection says HELLO with its name in it, nothing redis-py would add for
    itself (CLIENT SETINFO twice, CLIENT MAINT_NOTIFICATIONS, a CLIENT SETNAME of its own);
    a drain that finds nothing asks once what is pending (the group's and its own, one
    XPENDING), and with nothing pending in the group, claims nothing."""
    with RedisServer() as server:
        done = subprocess.run(
            [sys.executable, "-m", "filepipe", "consume", "--drain", "-q"],
            env=cli_env(env, REDIS_URL=server.url),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        # (Read on a connection of filepipe's own: its handshake is counted too.)
        r = stream.connect(env.settings_with(redis_url=server.url))
        calls = commands_run(r)
        # A server that does not know a command counts it as an error, not a call (a
        # script run by its digest before it was loaded is NOSCRIPT, and is loaded).
        refused = {k: v for k, v in r.info("errorstats").items() if k != "errorstat_NOSCRIPT"}
    assert "client|setinfo" not in calls, sorted(calls.items())
    assert "client|maint_notifications" not in calls, sorted(calls.items())
    assert refused == {}, refused
    assert calls["hello"] >= 1 and "client|setname" not in calls, calls
    assert calls["xpending"] == 1, calls
    assert "xautoclaim" not in calls, calls


def round_trips(conn: psycopg.Connection[Any], fn: Any) -> tuple[Any, int]:
    """`fn()`'s result, and how many times the server said it was ready for the next query
    meanwhile (libpq's trace of the messages): its round trips."""
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            result = fn()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        lines = trace.read().decode(errors="replace").splitlines()
    return result, sum(1 for line in lines if line.startswith("B") and "ReadyForQuery" in line)


def test_the_start_check_reads_the_table_layout_in_one_round_trip(env: Env) -> None:
    table = env.settings.table
    with psycopg.connect(env.pg_uri, autocommit=True) as conn:
        layout, trips = round_trips(conn, lambda: read_layout(conn, table, compression=False))
        missing, missing_trips = round_trips(
            conn, lambda: read_layout(conn, f"{table}_none", compression=False)
        )
    assert trips == 1 and missing_trips == 1
    assert layout is not None and layout.problem(table) is None
    assert layout.primary_key == ("stream", "stream_id", "event_time")
    assert layout.primary_key_name is not None
    assert missing is None


def test_consume_starts_without_the_collector_and_consumes_with_it(env: Env) -> None:
    """`python -m filepipe consume` starts with the cyclic garbage collector off (what
    start-up makes is kept for good) and turns it on to consume: a long run must not keep
    every cycle it makes."""
    code = (
        "import gc, sys\n"
        "from filepipe.__main__ import main\n"
        "from filepipe.consumer import pipeline\n"
        "init, run = pipeline.Consumer.__init__, pipeline.Consumer.run\n"
        "def observed_init(self, *args, **kwargs):\n"
        "    print('starting, collecting:', gc.isenabled())\n"
        "    init(self, *args, **kwargs)\n"
        "def observed_run(self):\n"
        "    print('consuming, collecting:', gc.isenabled())\n"
        "    return run(self)\n"
        "pipeline.Consumer.__init__, pipeline.Consumer.run = observed_init, observed_run\n"
        "sys.argv = ['filepipe', 'consume', '--drain', '-q']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["starting, collecting: False", "consuming, collecting: True"], (
        done.stdout
    )


def test_a_command_line_built_with_only_its_command_reads_as_the_whole_app() -> None:
    """`filepipe X …` builds the parser of X alone: its help, its errors and the root's
    options are those of the whole app."""
    from typer.testing import CliRunner

    from filepipe.cli import app
    from filepipe.cli.app import command_line

    runner = CliRunner()
    names = [c.name for c in app.registered_commands]
    assert "consume" in names and "init-db" in names
    for name in names:
        assert name is not None
        one = command_line([name])
        assert [c.name for c in one.registered_commands] == [name]
        for args in ([name, "--help"], [name, "--no-such-option"]):
            alone, whole = runner.invoke(one, args), runner.invoke(app, args)
            assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output), args
    assert command_line(["--version"]) is app and command_line(["dlq"]) is app and command_line([]) is app


def test_an_early_connection_is_open_before_it_is_taken(env: Env) -> None:
    """`EarlyConnection` opens in its own thread from the moment it is made: it is open on
    the server before anyone takes it; taking it hands over that connection (and a second
    take connects anew); what opening it raised is raised by `take`, as `connect` would;
    closed untaken, it is gone from the server."""
    import time

    from filepipe.db import EarlyConnection

    name = f"early-{uuid.uuid4().hex[:8]}"
    settings = env.settings
    ours = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'"

    def opened() -> int:
        return int(env.sql(ours)[0][0])

    def wait_for(count: int) -> None:
        for _ in range(500):
            if opened() == count:
                return
            time.sleep(0.01)
        raise AssertionError(f"{opened()} connections named {name}, not {count}")

    early = EarlyConnection(settings, autocommit=True, application_name=name)
    wait_for(1)  # open before anyone asked for it
    conn = early.take()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    again = early.take()
    wait_for(2)
    conn.close()
    again.close()
    early.close()

    untaken = EarlyConnection(settings, autocommit=True, application_name=name)
    wait_for(1)
    untaken.close()
    wait_for(0)

    nowhere = urlunsplit(urlsplit(env.pg_uri)._replace(path="/no_such_db_here"))
    refused = EarlyConnection(env.settings_with(pg_uri=nowhere))
    with pytest.raises(psycopg.OperationalError, match="no_such_db_here"):
        refused.take()
