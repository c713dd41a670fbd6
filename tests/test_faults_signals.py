"""A stop at any moment is clean: SIGTERM from the first millisecond of `filepipe consume`
on (while Python imports, while it connects, while it waits for a service that does not
answer, while it loads), alone and under the supervisor. Each run exits 0 and leaves
nothing of its own pending; at the end every event is a row once.

The one moment no program can cover is the interpreter's own start, before the first
line of filepipe runs: a signal then ends the process as the default action does (the
test reads the process's caught-signal mask to know which case it is in, holding the
process stopped from that read until the signal is sent, and checks that such a process
had read nothing). The supervisor starts its workers with the signals blocked, so none
of them is ever in that case."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tests.conftest import Env
from tests.support.workload import consumer_env, seed

from filepipe import stream

SETTINGS = {"batch_size": 200, "claim_idle_ms": 1000, "max_file_bytes": 64 * 1024, "block_ms": 100}
# From the moment Popen returns (the program is exec'd), in milliseconds.
MOMENTS_MS = [0, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 450, 700, 1000, 1500]


@pytest.fixture
def senv(env: Env) -> Env:
    env.settings = env.settings_with(**SETTINGS)
    return env


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM now (its caught-signal mask)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def hold(pid: int) -> None:
    """Stops the process (SIGSTOP) and returns once every thread of it is stopped: until
    SIGCONT, it cannot change what it does with a signal."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            # (A thread that has just ended has no stat left to read.)
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rpartition(")")[2].split()[0])
        if all(state in "tTZX" for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within 10 s of SIGSTOP")


def consume(env: Env, name: str, log: Path, *args: str, **extra: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "filepipe", "consume", "--consumer-name", name, *args],
            env=consumer_env(env.settings, **extra),
            stdout=out,
            stderr=out,
            cwd=env.settings.local_storage_dir,
        )


def stop_at(proc: subprocess.Popen[bytes], moment_ms: float) -> tuple[bool, int, float]:
    """Sends SIGTERM `moment_ms` after the start; returns (whether it had its handler
    when the signal came, the exit code, the seconds the stop took). The process is held
    stopped from the read of its mask until the signal is pending: a process that installs
    its handler between the two would otherwise exit 0 where the mask said it would die."""
    time.sleep(moment_ms / 1000)
    hold(proc.pid)
    caught = catches_sigterm(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)  # the pending SIGTERM is what it meets first
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no exit 30 s after SIGTERM at {moment_ms} ms") from None
    return caught, code, time.monotonic() - t0


def interpreter_start_ms() -> float:
    """How long this Python takes to start and exit doing nothing (best of three)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        best = min(best, time.monotonic() - t0)
    return best * 1000


def assert_window(uncaught: list[float], what: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The moments a signal came before the handler: the interpreter's start alone (not
    filepipe's imports, not connecting), measured against a bare interpreter here."""
    bound = max(100.0, 5 * interpreter_start_ms())
    with capsys.disabled():
        print(
            f"\n  {what}: SIGTERM before its handler existed at {uncaught} ms (bound {bound:.0f} ms), "
            "clean from then on",
            end="",
        )
    assert all(m <= bound for m in uncaught), (uncaught, bound)


def finish_and_check(env: Env, w_ids: list[bytes], good: int, poison: dict[bytes, str]) -> None:
    env.drain(consumer_name=f"finisher-{uuid.uuid4().hex[:6]}")
    rows = [r[0].encode() for r in env.sql(f"SELECT stream_id FROM {env.settings.table}")]
    assert len(rows) == len(set(rows)) == good
    assert set(rows) == set(w_ids) - set(poison)
    assert env.pending() == 0
    sources = [f[b"source_id"] for _, f in env.dead()]
    assert sorted(sources) == sorted(poison)


def test_sigterm_at_any_moment_of_consume(
    senv: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = seed(senv.redis, senv.settings, senv.storage, 6000, poison_every=20)
    stream.ensure_group(senv.redis, senv.settings.stream, senv.settings.group)
    uncaught: list[float] = []
    for i, moment in enumerate(MOMENTS_MS):
        name = f"early-{i}"
        log = tmp_path / f"{name}.log"
        caught, code, took = stop_at(consume(senv, name, log), moment)
        mine = stream.pending_count(senv.redis, senv.settings.stream, senv.settings.group, name)
        if caught:
            assert code == 0, f"SIGTERM at {moment} ms: exit {code}\n{log.read_text()}"
            assert "Traceback" not in log.read_text()
        else:
            # Before filepipe's first line: the default action, and nothing read yet.
            assert code == -signal.SIGTERM, f"SIGTERM at {moment} ms: exit {code}\n{log.read_text()}"
            uncaught.append(moment)
        assert mine == 0, f"SIGTERM at {moment} ms left {mine} entries pending"
        assert took < 10
    assert_window(uncaught, "consume", capsys)
    finish_and_check(senv, w.ids, w.good, w.poison)


def test_sigterm_while_services_do_not_answer_at_start(senv: Env, tmp_path: Path) -> None:
    """Redis, then PostgreSQL, unreachable when the consumer starts: a stop while it
    waits for them is clean and quick."""
    down = {"REDIS_URL": "redis://127.0.0.1:1/0"}, {"PG_URI": "postgresql://postgres@127.0.0.1:1/none"}
    for extra in down:
        for moment in (300, 1500, 4000):
            log = tmp_path / f"waiting-{moment}.log"
            proc = consume(senv, "waiting", log, FILEPIPE_CONNECT_TIMEOUT="1", **extra)
            caught, code, took = stop_at(proc, moment)
            assert caught and code == 0, f"SIGTERM at {moment} ms, {extra}: exit {code}\n{log.read_text()}"
            assert took < 10, f"stopping took {took:.1f} s"
            assert "Traceback" not in log.read_text()


def test_sigterm_at_any_moment_of_the_supervisor(
    senv: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = seed(senv.redis, senv.settings, senv.storage, 4000, poison_every=20)
    stream.ensure_group(senv.redis, senv.settings.stream, senv.settings.group)
    tag = uuid.uuid4().hex[:6]
    uncaught: list[float] = []
    for i, moment in enumerate([*MOMENTS_MS[::2], 2500]):
        log = tmp_path / f"sup-{i}.log"
        proc = consume(senv, f"sup{tag}{i}", log, "--processes", "2")
        caught, code, _took = stop_at(proc, moment)
        text = log.read_text()
        if caught:
            assert code == 0, f"SIGTERM at {moment} ms: supervisor exit {code}\n{text}"
        else:
            assert code == -signal.SIGTERM, f"SIGTERM at {moment} ms: exit {code}\n{text}"
            uncaught.append(moment)
        assert "killed by" not in text and "Traceback" not in text, text
        for k in range(2):
            name = f"sup{tag}{i}-{k}"
            assert stream.pending_count(senv.redis, senv.settings.stream, senv.settings.group, name) == 0
    # No worker outlived its supervisor.
    out = subprocess.run(
        ["pgrep", "-f", f"consumer-name sup{tag}"], capture_output=True, text=True, check=False
    )
    assert out.stdout.split() == []
    assert_window(uncaught, "supervisor", capsys)
    finish_and_check(senv, w.ids, w.good, w.poison)
