"""A hot standby of a private PostgreSQL cluster (pg_basebackup with streaming
replication), for failover tests: it answers read-only until it is promoted."""

from __future__ import annotations

import os
import time

import psycopg

from filepipe.embedded import PostgresServer


def start_standby(primary: PostgresServer) -> PostgresServer:
    """A new private server on its own port, streaming from `primary` (read-only)."""
    standby = PostgresServer()
    assert standby.bindir is not None, "pg_basebackup needs PostgreSQL's binaries"
    if standby._user is not None:
        os.chown(standby.dir, standby._user.pw_uid, standby._user.pw_gid)
    standby._run(
        [
            str(standby.bindir / "pg_basebackup"),
            "-D",
            str(standby.data),
            "-R",
            "-X",
            "stream",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "--no-sync",
        ]
    )
    return standby.start()


def wait_replayed(primary: PostgresServer, standby: PostgresServer, timeout: float = 30.0) -> None:
    """Until the standby has replayed everything the primary has written so far."""
    with psycopg.connect(primary.uri, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
    assert row is not None
    target = row[0]
    deadline = time.monotonic() + timeout
    with psycopg.connect(standby.uri, autocommit=True) as conn:
        while True:
            done = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()
            if done and done[0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the standby did not catch up with the primary")
            time.sleep(0.05)
