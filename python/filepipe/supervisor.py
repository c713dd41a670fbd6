"""`filepipe consume --processes N`: N consumer processes on one host, one supervisor.

One consumer process keeps about one core busy; more throughput on a host means more
processes. Each worker is a plain `filepipe consume` subprocess with its own consumer
name, `<name>-<i>`, so a restarted worker re-reads its own pending entries first. The
supervisor

* restarts a worker that dies abnormally (a crash, a kill, an unexpected exit code),
  with backoff, under the same name;
* forwards SIGTERM and SIGINT to every worker, which finish the batch in hand and
  exit; a second signal is forwarded too (the workers then leave at once); a worker
  starts with both signals blocked until its handlers are installed, so one told to
  stop while it starts stops cleanly;
* exits 0 when every worker stopped cleanly (exit code 0), 1 otherwise; with
  `--drain` each worker exits 0 once the whole group is drained, and so does the
  supervisor.

The workers get the supervisor's resolved settings through their environment, so every
one of them runs with exactly the configuration the supervisor validated. Coordination
between the workers, and with the consumers of other hosts, is the consumer group's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from . import shutdown
from .config import Settings, settings_environment
from .constants import WORKER_ENV
from .shutdown import SIGNALS

log = logging.getLogger("filepipe")

RESTART_BASE_S = 0.5
RESTART_CAP_S = 30.0
HEALTHY_AFTER_S = 60.0  # a worker that ran this long starts its backoff over
CONFIG_ERROR = 2  # `filepipe consume` exits 2 on a configuration error: restarting cannot help


def worker_name(base: str, index: int) -> str:
    """The consumer name of worker `index`: `<base>-<index>`."""
    return f"{base}-{index}"


@dataclass
class Worker:
    index: int
    name: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float = 0.0
    last_code: int = 0
    exit_code: int | None = None  # set once the worker is finished for good


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, even by SIGKILL (Linux), so
    no worker is left behind; own process group, so a terminal's Ctrl+C reaches the
    supervisor alone, which forwards it once. SIGTERM and SIGINT start blocked: one that
    arrives before the worker has its handlers waits for them (shutdown.install unblocks
    both) instead of killing it half-started."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    os.setpgrp()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor is already gone
        os._exit(1)


class Supervisor:
    """Runs and watches `processes` workers until they have all stopped."""

    def __init__(
        self,
        settings: Settings,
        processes: int,
        *,
        drain: bool = False,
        worker_args: list[str] | None = None,
        metrics_port: int | None = None,
        stop_grace_s: float = 60.0,
        spawn: Callable[[Worker, list[str], dict[str, str]], subprocess.Popen[bytes]] | None = None,
    ) -> None:
        self.settings = settings
        self.drain = drain
        self.worker_args = list(worker_args or [])
        self.metrics_port = metrics_port
        self.stop_grace_s = stop_grace_s
        self.workers = [Worker(i, worker_name(settings.consumer_name, i)) for i in range(processes)]
        self.stopping = False
        self.stop_signal: int = signal.SIGTERM
        self.stop_deadline: float | None = None
        self.signals = 0
        self.fatal = False
        self._spawn = spawn or self._popen
        self._env = {**os.environ, **settings_environment(settings), "PYTHONUNBUFFERED": "1"}

    # -- workers ------------------------------------------------------------------------

    def command(self, w: Worker) -> list[str]:
        args = [sys.executable, "-m", "filepipe", "consume", "--consumer-name", w.name, *self.worker_args]
        if self.drain:
            args.append("--drain")
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port + w.index)]
        return args

    @staticmethod
    def _popen(w: Worker, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, env=env, preexec_fn=_die_with_parent)

    def _start(self, w: Worker) -> None:
        env = {**self._env, "CONSUMER_NAME": w.name, WORKER_ENV: str(w.index)}
        w.proc = self._spawn(w, self.command(w), env)
        w.started_at = time.monotonic()
        log.info("worker %s started (pid %d)", w.name, w.proc.pid)
        if self.stopping:
            # The stop came while it was being started: it is told too, and waited for.
            w.exit_code = None
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(self.stop_signal)

    def _reap(self, w: Worker, code: int) -> None:
        assert w.proc is not None
        pid, w.proc = w.proc.pid, None
        w.last_code = code
        if code == 0:
            w.exit_code = 0
            return
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        if self.stopping:
            log.warning("worker %s (pid %d) %s while stopping", w.name, pid, how)
            w.exit_code = code
            return
        if code == CONFIG_ERROR:
            log.error("worker %s (pid %d) %s (configuration): stopping all workers", w.name, pid, how)
            w.exit_code = code
            self.fatal = True
            self.stop(signal.SIGTERM)
            return
        if time.monotonic() - w.started_at >= HEALTHY_AFTER_S:
            w.crashes = 0
        w.crashes += 1
        delay = min(RESTART_CAP_S, RESTART_BASE_S * 2 ** (w.crashes - 1))
        w.restart_at = time.monotonic() + delay
        log.warning("worker %s (pid %d) %s: restarting it in %.1f s", w.name, pid, how, delay)

    # -- signals ------------------------------------------------------------------------

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Asks every worker to finish its batch in hand and exit; no more restarts."""
        self.stopping = True
        self.stop_signal = signum
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.stop_grace_s
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)
            elif w.exit_code is None and w.proc is None:
                w.exit_code = w.last_code  # it crashed and was waiting to be restarted

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.warning("%s received: stopping %d workers", signal.Signals(signum).name, len(self.workers))
        self.stop(signum)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Runs until every worker has stopped. Returns the exit code: 0 if every
        worker exited 0, 2 after a configuration error, 1 otherwise."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        early = shutdown.installed()
        if early is not None and early.signum is not None:
            # A signal before the supervisor was ready (`filepipe consume` took it): stop now.
            self.signals = early.count
            self.stop(early.signum)
        try:
            log.info("supervising %d workers: %s", len(self.workers), ", ".join(w.name for w in self.workers))
            for w in self.workers:
                if self.stopping:
                    break
                self._start(w)
            while any(w.exit_code is None for w in self.workers):
                now = time.monotonic()
                for w in self.workers:
                    if w.proc is not None:
                        code = w.proc.poll()
                        if code is not None:
                            self._reap(w, code)
                    elif w.exit_code is None and not self.stopping and now >= w.restart_at:
                        self._start(w)
                if self.stop_deadline is not None and now > self.stop_deadline:
                    self._kill_stragglers()
                time.sleep(0.05)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_stragglers()
        codes = [w.exit_code for w in self.workers]
        if self.fatal:
            return CONFIG_ERROR
        return 0 if all(c == 0 for c in codes) else 1

    def _kill_stragglers(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                log.warning("worker %s (pid %d) did not stop in time: killing it", w.name, w.proc.pid)
                w.proc.kill()
                w.exit_code = w.proc.wait()
                w.proc = None
