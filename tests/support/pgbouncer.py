"""A real PgBouncer (Debian's package) on a free loopback port, in transaction pooling
mode, in front of a given PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from tests.support.processes import free_port, stop, wait_port


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )


class PgBouncer:
    """`pool_size` server connections per database and user, shared by any number of
    clients, one transaction at a time. `uri(pg_uri)` is `pg_uri` with PgBouncer's port."""

    def __init__(self, pg_uri: str, *, pool_size: int = 2, mode: str = "transaction") -> None:
        self.target = urlsplit(pg_uri)
        self.port = free_port()
        self.pool_size = pool_size
        self.mode = mode
        self.dir = Path(tempfile.mkdtemp(prefix="filepipe-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = find_pgbouncer()

    @property
    def uri(self) -> str:
        t = self.target
        userinfo = t.netloc.rsplit("@", 1)[0] + "@" if "@" in t.netloc else ""
        return urlunsplit((t.scheme, f"{userinfo}127.0.0.1:{self.port}", t.path, t.query, ""))

    def start(self) -> PgBouncer:
        if self.binary is None:
            raise RuntimeError("pgbouncer is not installed (make pgbouncer: apt-get install -y pgbouncer)")
        t = self.target
        user = unquote(t.username or "postgres")
        password = unquote(t.password or "")
        (self.dir / "users.txt").write_text(f'"{user}" "{password}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={t.hostname or '127.0.0.1'} port={t.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = {'plain' if password else 'trust'}\nauth_file = {self.dir / 'users.txt'}\n"
            f"pool_mode = {self.mode}\ndefault_pool_size = {self.pool_size}\nmin_pool_size = 0\n"
            "max_client_conn = 200\nignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\npidfile = {self.dir / 'pgbouncer.pid'}\n"
            "server_check_delay = 1\nserver_login_retry = 1\n"
        )
        args = [self.binary, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root.
            account = next(n for n in ("postgres", "nobody") if _exists(n))
            entry = pwd.getpwnam(account)
            for p in (self.dir, *self.dir.iterdir()):
                os.chown(p, entry.pw_uid, entry.pw_gid)
            args[1:1] = ["-u", account]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_port(self.port, proc=self.proc)
        except Exception as e:
            log = (
                (self.dir / "pgbouncer.log").read_text(errors="replace")
                if (self.dir / "pgbouncer.log").exists()
                else ""
            )
            raise RuntimeError(f"pgbouncer did not start: {e}\n{log[-2000:]}") from e
        return self

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGINT, timeout=10)  # PgBouncer's immediate shutdown
        self.proc = None
        time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exists(account: str) -> bool:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(account)
        return True
    return False
