"""Micro: loading the same 10,000 rows into PostgreSQL with COPY text vs COPY binary, and
the staging-table merge vs a direct COPY. `make bench` measures these; the normal test run
executes each once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from benches.test_bench_native import ENTRIES, MEASURED
from filepipe import _native
from filepipe.config import Settings, load_settings
from filepipe.db import Loader, create_pool, init_db

BATCH = 2000


@pytest.fixture
def target(pg_uri: str) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:8]
    s = load_settings({"pg_uri": pg_uri, "table": f"bench_copy_{tag}"}, environ={}, dotenv_path=None)
    init_db(s, plain=True)
    yield s
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {s.table}")


def buffers(binary: bool) -> list[tuple[bytes, int]]:
    out = []
    for i in range(0, len(ENTRIES), BATCH):
        batch = _native.parse_entries(ENTRIES[i : i + BATCH])
        out.append(
            (_native.encode_copy(batch, MEASURED[i : i + BATCH], "bench", binary, stream="bench"), len(batch))
        )
    return out


def load_all(s: Settings, bufs: list[tuple[bytes, int]], *, direct: bool) -> int:
    pool = create_pool(s, min_size=1)
    pool.wait()
    loader = Loader(pool, s)
    with psycopg.connect(s.pg_uri, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {s.table}")
    n = sum(loader.load(buf, rows, direct=direct) for buf, rows in bufs)
    pool.close()
    return n


@pytest.mark.parametrize("fmt", ["binary", "text"])
@pytest.mark.benchmark(group="COPY 10k rows into PostgreSQL: format")
def test_copy_format(benchmark: Any, target: Settings, fmt: str) -> None:
    s = Settings(**{**target.__dict__, "copy_format": fmt})
    bufs = buffers(fmt == "binary")
    benchmark.pedantic(load_all, args=(s, bufs), kwargs={"direct": True}, rounds=5, iterations=1)
    with psycopg.connect(s.pg_uri) as conn:
        assert conn.execute(f"SELECT count(*) FROM {s.table}").fetchone() == (len(ENTRIES),)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "staging+merge"])
@pytest.mark.benchmark(group="COPY 10k rows into PostgreSQL: path")
def test_copy_path(benchmark: Any, target: Settings, direct: bool) -> None:
    bufs = buffers(True)
    benchmark.pedantic(load_all, args=(target, bufs), kwargs={"direct": direct}, rounds=5, iterations=1)
    with psycopg.connect(target.pg_uri) as conn:
        assert conn.execute(f"SELECT count(*) FROM {target.table}").fetchone() == (len(ENTRIES),)
