"""Ports and processes for tests: a free port, waiting for one to listen, stopping a
process (signal, wait, kill), and what tests do to the private servers (kill, crash,
restart) that a throwaway server of `filepipe demo` never needs."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

from filepipe.embedded import PostgresServer, RedisServer, free_port, stop_process, wait_port

__all__ = ["free_port", "kill", "reap", "restart_postgres", "stop", "stop_postgres", "wait_port"]

# PostgreSQL's shutdown modes, by the signal its postmaster takes for each.
PG_MODES = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
    "kill": signal.SIGKILL,
}


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Sends `sig` if it still runs, waits `timeout` s, kills it after that; its exit code."""
    code = stop_process(proc, sig, timeout)
    assert code is not None
    return code


def reap(proc: subprocess.Popen[Any] | None) -> None:
    """Kills `proc` if it still runs and waits for it: the `finally` of a test."""
    if proc is not None:
        stop_process(proc, signal.SIGKILL)


def kill(server: RedisServer) -> None:
    """SIGKILL: the Redis server dies as in a crash (no persistence: it comes back empty)."""
    stop_process(server.proc, signal.SIGKILL)
    server.proc = None


def stop_postgres(server: PostgresServer, mode: str = "fast") -> None:
    """Stops a private PostgreSQL: `fast`, `smart`, `immediate` (no shutdown checkpoint,
    like a crash) or `kill` (SIGKILL of the postmaster, and of the backends it leaves)."""
    server.stop(PG_MODES[mode])
    if mode == "kill":
        # Orphaned backends would keep the shared memory and the port busy.
        subprocess.run(["pkill", "-KILL", "-f", f"postgres.*{server.data}"], check=False)
        time.sleep(0.2)


def restart_postgres(server: PostgresServer, mode: str = "fast") -> None:
    """`stop_postgres(mode)`, then the server again on the same data and port."""
    stop_postgres(server, mode)
    server.start()
