"""A Redis that refuses writes: full (`OOM command not allowed`), a read-only replica after a
failover (`READONLY`), or unable to save its snapshot (`MISCONF`). The consumer waits each
one out like an outage, says so once, shows it in its heartbeat and in `filepipe status`,
and never dead-letters an entry because Redis refused a write. While Redis is full it keeps
acknowledging the entries it loaded (XACK is allowed then, and acknowledging is what lets
trimming free memory); only the dead letters wait.

Every test runs its own redis-server, so filling it or turning it into a replica touches
nothing else."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis
from tests.support.proxy import TcpProxy
from tests.support.workload import seed, wait_for
from tests.test_faults_services import Draining, assert_exact
from tests.test_faults_services import Site as ServiceSite

from filepipe import stream
from filepipe.config import Settings, load_settings
from filepipe.constants import heartbeat_key
from filepipe.db import init_db
from filepipe.embedded import RedisServer
from filepipe.status import collect_status


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    # Protected configs: the MISCONF test moves the snapshot directory.
    args = ["--maxmemory-policy", "noeviction", "--enable-protected-configs", "yes"]
    with RedisServer(extra_args=args) as server:
        yield server


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="filepipe")
    return caplog


class Site(ServiceSite):
    """A private Redis (through a proxy, maybe), the shared PostgreSQL (a table of its own)
    and a storage root; the service-fault tests' checks (rows, pending, assert_exact)."""

    def __init__(
        self, server: RedisServer, pg_uri: str, root: Path, *, redis_port: int | None = None, **overrides: Any
    ) -> None:
        # Not ServiceSite.__init__: that one sets up a private PostgreSQL as well.
        tag = uuid.uuid4().hex[:10]
        self.pg_uri = pg_uri
        self.redis = redis.Redis.from_url(server.url, socket_timeout=10)
        self.storage = root / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.settings: Settings = load_settings(
            {
                "redis_url": f"redis://127.0.0.1:{redis_port or server.port}/0",
                "pg_uri": pg_uri,
                "stream": f"fp_full_{tag}",
                "table": f"fp_full_{tag}",
                "local_storage_dir": str(self.storage),
                "consumer_name": f"full-{tag}",
                "batch_size": 100,
                "block_ms": 100,
                "claim_idle_ms": 1000,
                "max_file_bytes": 64 * 1024,
                "connect_timeout_s": 2,
                **overrides,
            },
            environ={},
            dotenv_path=None,
        )
        init_db(self.settings, plain=True)

    def dead(self) -> list[dict[bytes, bytes]]:
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], self.redis.xrange(self.settings.dead_stream))
        return [f for _, f in rows]

    def heartbeat(self) -> dict[str, Any] | None:
        raw = self.redis.get(heartbeat_key(self.settings.stream, self.settings.consumer_name))
        return None if raw is None else cast(dict[str, Any], json.loads(raw))

    def close(self) -> None:
        with psycopg.connect(self.pg_uri, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {self.settings.table}")
        self.redis.close()


def messages(logs: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in logs.records if text in r.getMessage()]


# -- the faults: each makes the private Redis refuse writes, and undoes it -----------------


def fill(r: redis.Redis) -> None:
    """Full: a 16 MiB filler key (appended in small pieces, so that no big request buffer
    is counted), then maxmemory 2 MiB below what is used, until the filler is deleted."""
    chunk = b"x" * 256 * 1024
    for _ in range(64):
        r.append("filler", chunk)
    used = int(cast(dict[str, Any], r.info("memory"))["used_memory"])
    r.config_set("maxmemory", used - 2 * 1024 * 1024)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        r.set("probe", b"1")


def unfill(r: redis.Redis) -> None:
    r.delete("filler")


def demote(r: redis.Redis) -> None:
    """Read-only: a replica of a master that cannot be reached (it keeps its data and
    serves reads, as a replica does during a failover)."""
    from filepipe.embedded import free_port

    r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # type: ignore[no-untyped-call]
    with pytest.raises(redis.exceptions.ReadOnlyError):
        r.set("probe", b"1")


def promote(r: redis.Redis) -> None:
    r.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]


_broken_dirs: list[str] = []


def break_saving(r: redis.Redis) -> None:
    """MISCONF: snapshots configured, and the last one failed (its directory is gone), so
    Redis refuses writes (stop-writes-on-bgsave-error)."""
    d = tempfile.mkdtemp(prefix="filepipe-rdb-")
    r.config_set("dir", d)
    r.config_set("save", "3600 1")
    shutil.rmtree(d)
    r.bgsave()
    wait_for(
        lambda: cast(dict[str, Any], r.info("persistence"))["rdb_last_bgsave_status"] == "err",
        10,
        "the snapshot to fail",
    )
    with pytest.raises(redis.ResponseError, match="MISCONF"):
        r.set("probe", b"1")


def fix_saving(r: redis.Redis) -> None:
    d = tempfile.mkdtemp(prefix="filepipe-rdb-")
    _broken_dirs.append(d)
    r.config_set("dir", d)
    r.bgsave()
    wait_for(
        lambda: cast(dict[str, Any], r.info("persistence"))["rdb_last_bgsave_status"] == "ok",
        10,
        "the snapshot to succeed",
    )


FAULTS = {
    "full": (fill, unfill, "OOM"),
    "read-only": (demote, promote, "read only replica"),
    "misconf": (break_saving, fix_saving, "MISCONF"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_redis_refusing_writes_is_waited_out(
    fault: str, redis_server: RedisServer, pg_uri: str, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """A full Redis meets a consumer (re)starting with entries to read; a replica and a
    failed snapshot meet one in the middle of a drain, batches in hand. (Through a proxy
    that adds 5 ms each way, so that the drain lasts long enough to be interrupted.)"""
    start, end, error_text = FAULTS[fault]
    with TcpProxy(redis_server.port, delay_ms=5 if fault != "full" else 0) as proxy:
        site = Site(redis_server, pg_uri, tmp_path, redis_port=proxy.port, batch_size=20)
        try:
            w = seed(
                site.redis, site.settings, site.storage, 2000 if fault == "full" else 4000, poison_every=10
            )
            if fault == "full":
                stream.ensure_group(site.redis, site.settings.stream, site.settings.group)
                start(site.redis)
            c = Draining(site.settings)
            if fault == "full":
                # XACK is allowed on a full Redis: everything that can be loaded is loaded and
                # acknowledged; only the poison entries stay pending, their dead letters waiting.
                wait_for(
                    lambda: site.rows() == w.good and site.pending() == len(w.poison),
                    60,
                    "every good entry acknowledged while Redis is full",
                )
                # The consumer keeps publishing its heartbeat (it overwrites a key of the same
                # size), naming the refusal and what waits.
                wait_for(
                    lambda: error_text in str((site.heartbeat() or {}).get("last_error", "")),
                    15,
                    "the refusal in the heartbeat",
                )
                assert (site.heartbeat() or {}).get("dead_letters_waiting") == len(w.poison)
            else:
                wait_for(lambda: site.rows() > 0, 30, "first rows")
                start(site.redis)
                assert site.rows() < w.good, "drained before the fault: the backlog is too small"
                # A replica or a Redis that cannot save takes no write at all (no heartbeat
                # either): `status` sees the refusal in the server's own state.
            dead = len(site.dead())
            wait_for(lambda: messages(logs, error_text), 15, "the refusal logged")
            status = collect_status(site.settings)
            assert status.health == "degraded", status.problems
            assert any(error_text in p for p in status.problems), status.problems
            # It waits: alive, nothing dead-lettered (and, when no write is allowed, nothing
            # acknowledged) while Redis refuses. The batches in hand are loaded, then it waits.
            time.sleep(1.0)
            rows, pending = site.rows(), site.pending()
            for _ in range(10):
                assert c.alive()
                assert len(site.dead()) == dead
                assert site.rows() == rows and site.pending() == pending
                time.sleep(0.3)
            end(site.redis)
            stats = c.finish(120)
            assert_exact(site, w)
            assert stats.dead_lettered == len(w.poison)
            assert stats.acked == len(w.ids) and stats.deleted == 0
            warnings = [
                r.getMessage()
                for r in logs.records
                if r.levelno >= logging.WARNING and error_text in r.getMessage()
            ]
            assert len(warnings) == 1, warnings
            assert len(messages(logs, "Redis is back")) == 1
        finally:
            site.close()


def test_held_dead_letters_of_deleted_entries_are_gone(
    redis_server: RedisServer, pg_uri: str, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """While a full Redis holds dead letters back, the consumer claims their entries again
    now and then (so that no other consumer takes them over); an entry deleted meanwhile
    drops out of that claim, and is counted as deleted, not dead-lettered."""
    site = Site(redis_server, pg_uri, tmp_path, batch_size=50)
    try:
        w = seed(site.redis, site.settings, site.storage, 500, poison_every=5)
        stream.ensure_group(site.redis, site.settings.stream, site.settings.group)
        fill(site.redis)
        c = Draining(site.settings)
        wait_for(
            lambda: site.rows() == w.good and site.pending() == len(w.poison),
            60,
            "every good entry acknowledged while Redis is full",
        )
        deleted = sorted(w.poison, key=stream.id_key)[::4]
        assert site.redis.xdel(site.settings.stream, *deleted) == len(deleted) == 25
        wait_for(lambda: site.pending() == len(w.poison) - len(deleted), 15, "the deleted entries dropped")
        assert c.alive() and site.dead() == []
        unfill(site.redis)
        stats = c.finish(60)
        assert {f[b"source_id"]: f[b"reason"].decode() for f in site.dead()} == {
            i: r for i, r in w.poison.items() if i not in deleted
        }
        assert site.pending() == 0
        assert stats.deleted == len(deleted) and stats.dead_lettered == len(w.poison) - len(deleted)
        assert stats.acked == len(w.ids)
        assert messages(logs, "deleted from the stream while pending")
    finally:
        site.close()
