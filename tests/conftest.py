"""Fixtures: real Redis and PostgreSQL, and a real TimescaleDB.

`FILEPIPE_TEST_REDIS_URL` / `FILEPIPE_TEST_PG_URI` point at running servers; when
unset, throwaway servers are started for the session. Every test gets its own
stream, group and table names, and cleans them up.

`env` is a plain table on that PostgreSQL. A test marked `@both_tables` runs twice:
on a plain table, and on a hypertable in a private cluster that preloads TimescaleDB
(`tests/support/timescale.py`; `FILEPIPE_TEST_TSDB_URI` names one instead)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from tests.support import timescale as tsdb

from filepipe import _native
from filepipe.config import Settings, load_settings
from filepipe.consumer import Consumer, Stats
from filepipe.embedded import PostgresServer, RedisServer


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("FILEPIPE_TEST_REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def pg_uri() -> Iterator[str]:
    uri = os.environ.get("FILEPIPE_TEST_PG_URI")
    if uri:
        yield uri
        return
    with PostgresServer() as server:
        yield server.uri


@pytest.fixture(scope="session")
def tsdb_uri() -> Iterator[str]:
    """A server whose databases can create the timescaledb extension (started once, at the
    first test that asks for it)."""
    with contextlib.ExitStack() as stack:
        try:
            uri = stack.enter_context(tsdb.timescaledb_uri())
        except RuntimeError as e:
            pytest.fail(str(e))
        yield uri


PLAIN, HYPERTABLE = "plain", "hypertable"
# Runs a test on a plain table and on a hypertable: `@both_tables` above a test using `env`.
both_tables = pytest.mark.parametrize("env", [PLAIN, HYPERTABLE], indirect=True)
# Runs a test on a hypertable only (what plain PostgreSQL does not have).
on_hypertable = pytest.mark.parametrize("env", [HYPERTABLE], indirect=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"filepipe extension {_native.__version__}"]
    url = os.environ.get("FILEPIPE_TEST_REDIS_URL")
    uri = os.environ.get("FILEPIPE_TEST_PG_URI")
    try:
        if url:
            info = redis.Redis.from_url(url, socket_timeout=2).info("server")
            lines.append(f"redis: {info['redis_version']} at {url}")
        else:
            lines.append("redis: throwaway server (FILEPIPE_TEST_REDIS_URL unset)")
        if uri:
            with psycopg.connect(uri, connect_timeout=3) as conn:
                lines.append(f"postgresql: {conn.info.server_version} at {uri}")
        else:
            lines.append("postgresql: throwaway server (FILEPIPE_TEST_PG_URI unset)")
        tsdb_uri = os.environ.get(tsdb.ENV_URI)
        lines.append(
            tsdb.describe(tsdb_uri)
            if tsdb_uri
            else "timescaledb: a private cluster preloading it (FILEPIPE_TEST_TSDB_URI unset)"
        )
    except Exception as e:  # the header must never break collection
        lines.append(f"services: {e}")
    return lines


@dataclass
class Env:
    """One test's isolated slice of the services."""

    settings: Settings
    redis: redis.Redis
    pg_uri: str
    storage: Path
    hypertable: bool = False  # the table is a TimescaleDB hypertable

    def settings_with(self, **overrides: Any) -> Settings:
        values = {k: v for k, v in self.settings.__dict__.items()}
        values.update(overrides)
        return Settings(**values)

    def init_args(self) -> list[str]:
        """`filepipe init-db` as this table was made: a hypertable, or `--plain`."""
        return ["init-db"] if self.hypertable else ["init-db", "--plain"]

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg_uri) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def rows(self) -> int:
        return int(self.sql(f"SELECT count(*) FROM {self.settings.table}")[0][0])

    def drain(self, **overrides: Any) -> Stats:
        s = self.settings_with(**overrides) if overrides else self.settings
        return Consumer(s, drain=True, write=None).run()

    def pending(self) -> int:
        return int(self.redis.xpending(self.settings.stream, self.settings.group)["pending"])

    def dead(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return self.redis.xrange(self.settings.dead_stream)  # type: ignore[return-value]

    def write_file(self, key: str, data: bytes) -> Path:
        p = self.storage / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def xadd(self, fields: dict[str, Any]) -> bytes:
        return self.redis.xadd(self.settings.stream, fields)  # type: ignore[return-value]


@pytest.fixture
def env(request: pytest.FixtureRequest, redis_url: str, pg_uri: str, tmp_path: Path) -> Iterator[Env]:
    """A plain table (or, parametrized by `both_tables`, a hypertable on TimescaleDB)."""
    from filepipe.db import init_db

    hypertable = getattr(request, "param", PLAIN) == HYPERTABLE
    if hypertable:
        pg_uri = request.getfixturevalue("tsdb_uri")
    tag = uuid.uuid4().hex[:10]
    storage = tmp_path / "storage"
    storage.mkdir()
    settings = load_settings(
        {
            "redis_url": redis_url,
            "pg_uri": pg_uri,
            "stream": f"fp_test_{tag}",
            "group": "file_processors",
            "table": f"fp_test_{tag}",
            "local_storage_dir": str(storage),
            "consumer_name": f"test-{tag}",
            "block_ms": 100,
            "connect_timeout_s": 5,
        },
        environ={},
        dotenv_path=None,
    )
    info = init_db(settings, plain=not hypertable)
    assert info.hypertable == hypertable
    r = redis.Redis.from_url(redis_url)
    try:
        yield Env(settings=settings, redis=r, pg_uri=pg_uri, storage=storage, hypertable=hypertable)
    finally:
        for key in r.scan_iter(match=f"*fp_test_{tag}*"):
            r.delete(key)
        r.delete(settings.stream, settings.dead_stream)
        r.close()
        with psycopg.connect(pg_uri, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {settings.table}")
