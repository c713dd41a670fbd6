"""Whether `processed_at` deserves an index: what one costs the load (the consumer's
direct COPY) and what it saves the "last minute / last hour" query of status, on a plain
table and on a hypertable of the same cluster, each holding --rows rows of history.

    python -m benches.processed_at --rows 2000000

Uses FILEPIPE_BENCH_TSDB_URI (or FILEPIPE_TEST_TSDB_URI), else a private cluster that
preloads TimescaleDB (`make timescaledb` installs it). Scratch tables are dropped."""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import psycopg

from filepipe import _native
from filepipe.benchmark.scratch import synthetic_batch
from filepipe.config import Settings, load_settings
from filepipe.db import Loader, create_pool, init_db
from filepipe.embedded import PostgresServer

# History: `rows` events over the last 7 days, each processed two seconds after its event.
FILL = """
INSERT INTO {table} (event_time, stream, stream_id, file_id, filename, storage, storage_key, size_bytes,
                     checksum_sha256, content_type, uploaded_at, consumer, attributes, processed_at)
SELECT t, 'file_uploads', (extract(epoch FROM t) * 1000)::bigint || '-' || (i %% 8),
       md5(i::text)::uuid, 'photo ' || i || '.jpg', 'local', '2024/05/01/' || md5(i::text) || '.jpg',
       1024 + i %% 3072, encode(sha256(i::text::bytea), 'hex'), 'image/jpeg', t, 'consumer-' || (i %% 4),
       jsonb_build_object('user_id', (i %% 100)::text), t + interval '2 seconds'
FROM (SELECT i, now() - interval '7 days' * (i::float8 / %(rows)s) - interval '1 minute' AS t
      FROM generate_series(1, %(rows)s) AS i) AS s
"""
# What status asks: the last minute and the last hour by processing time, among the last
# day's events (a large table), and the same without the event-time bound.
BOUNDED = """
SELECT count(*) FILTER (WHERE processed_at >= now() - interval '60 seconds'), count(*)
FROM {table} WHERE processed_at >= now() - interval '1 hour' AND event_time >= now() - interval '1 day'
"""
UNBOUNDED = """
SELECT count(*) FILTER (WHERE processed_at >= now() - interval '60 seconds'), count(*)
FROM {table} WHERE processed_at >= now() - interval '1 hour'
"""
LOAD_BATCH = 5000


@dataclass
class Result:
    kind: str
    indexed: bool
    load_rows_per_s: float
    bounded_ms: float
    unbounded_ms: float
    bytes_per_row: float
    index_mb: float


@dataclass
class Table:
    kind: str
    indexed: bool
    settings: Settings
    loader: Loader | None = None
    loads: list[float] = field(default_factory=list)
    bounded: list[float] = field(default_factory=list)
    unbounded: list[float] = field(default_factory=list)


def _timed_ms(conn: psycopg.Connection[Any], query: str) -> float:
    t0 = time.perf_counter()
    conn.execute(query).fetchall()
    return (time.perf_counter() - t0) * 1000


def _make(uri: str, kind: str, indexed: bool, rows: int) -> Table:
    table = f"bench_processed_at_{uuid.uuid4().hex[:8]}"
    settings = load_settings({"pg_uri": uri, "table": table, "pool_size": 1}, environ={}, dotenv_path=None)
    init_db(settings, plain=kind == "plain")
    with psycopg.connect(uri, autocommit=True) as conn:
        if indexed:
            conn.execute(f"CREATE INDEX ON {table} (processed_at)")
        conn.execute(FILL.format(table=table), {"rows": rows})
        conn.execute(f"VACUUM ANALYZE {table}")
    return Table(kind, indexed, settings)


def _size(conn: psycopg.Connection[Any], t: Table) -> tuple[float, float]:
    """(bytes of the table with its indexes, bytes of its processed_at index)."""
    name = t.settings.table
    size_sql = (
        "SELECT hypertable_size(%s::regclass)"
        if t.kind == "hypertable"
        else ("SELECT pg_total_relation_size(%s::regclass)")
    )
    row = conn.execute(size_sql, (name,)).fetchone()
    total = float(row[0]) if row and row[0] is not None else 0.0
    found = conn.execute(
        "SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0) FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE a.attname = 'processed_at' AND (i.indrelid = %(t)s::regclass OR i.indrelid IN "
        "(SELECT inhrelid FROM pg_inherits WHERE inhparent = %(t)s::regclass))",
        {"t": name},
    ).fetchone()
    return total, float(found[0]) if found else 0.0


def measure(uri: str, rows: int, rounds: int) -> list[Result]:
    """The four tables side by side; loads and queries take turns round by round, so a
    busy machine slows all four alike."""
    kinds = [(kind, indexed) for kind in ("plain", "hypertable") for indexed in (False, True)]
    tables = [_make(uri, kind, indexed, rows) for kind, indexed in kinds]
    pools = []
    try:
        for t in tables:
            pool = create_pool(t.settings, open=False)
            pool.open(wait=True)
            pools.append(pool)
            t.loader = Loader(pool, t.settings)
        first = int(time.time() * 1000)
        for r in range(rounds + 1):
            batch, m = synthetic_batch(LOAD_BATCH, first_id_ms=first + r * LOAD_BATCH, size=4096)
            buf = _native.encode_copy(batch, m, "bench", True, stream="file_uploads")
            for t in tables[r % 4 :] + tables[: r % 4]:
                assert t.loader is not None
                t0 = time.perf_counter()
                t.loader.load(buf, LOAD_BATCH, direct=True)
                if r:  # the first round warms up connections and the current chunk
                    t.loads.append(time.perf_counter() - t0)
        with psycopg.connect(uri, autocommit=True) as conn:
            for t in tables:
                conn.execute(f"ANALYZE {t.settings.table}")
            for _ in range(7):
                for t in tables:
                    t.bounded.append(_timed_ms(conn, BOUNDED.format(table=t.settings.table)))
                    t.unbounded.append(_timed_ms(conn, UNBOUNDED.format(table=t.settings.table)))
            out = []
            for t in tables:
                total, index = _size(conn, t)
                loaded = rows + rounds * LOAD_BATCH + LOAD_BATCH
                out.append(
                    Result(
                        t.kind,
                        t.indexed,
                        LOAD_BATCH / statistics.median(t.loads),
                        statistics.median(t.bounded),
                        statistics.median(t.unbounded),
                        total / loaded,
                        index / 2**20,
                    )
                )
        return out
    finally:
        for pool in pools:
            pool.close()
        with psycopg.connect(uri, autocommit=True) as conn:
            for t in tables:
                conn.execute(f"DROP TABLE IF EXISTS {t.settings.table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of history in each table")
    parser.add_argument("--rounds", type=int, default=30, help=f"batches of {LOAD_BATCH} rows loaded in each")
    args = parser.parse_args()
    with ExitStack() as stack:
        uri = os.environ.get("FILEPIPE_BENCH_TSDB_URI") or os.environ.get("FILEPIPE_TEST_TSDB_URI")
        if not uri:
            uri = stack.enter_context(PostgresServer(preload=("timescaledb",))).uri
        results = measure(uri, args.rows, args.rounds)
    print(
        f"{args.rows:,} rows of history over 7 days; load: the median direct COPY of a {LOAD_BATCH}-row "
        f"batch, {args.rounds} in each table, taking turns"
    )
    print(
        f"{'table':<11} {'processed_at':<13} {'load rows/s':>12} {'last min+hour':>14} "
        f"{'  without day':>14} {'bytes/row':>10} {'index MB':>9}"
    )
    for r in results:
        print(
            f"{r.kind:<11} {'indexed' if r.indexed else 'no index':<13} {r.load_rows_per_s:>12,.0f} "
            f"{r.bounded_ms:>11.1f} ms {r.unbounded_ms:>11.1f} ms {r.bytes_per_row:>10.0f} "
            f"{r.index_mb:>9.1f}"
        )
    for kind in ("plain", "hypertable"):
        base, idx = (next(r for r in results if r.kind == kind and r.indexed == i) for i in (False, True))
        print(
            f"{kind}: the index costs the load {1 - idx.load_rows_per_s / base.load_rows_per_s:.0%}; "
            f"the query takes {idx.bounded_ms / base.bounded_ms:.2f}x as long with it "
            f"({idx.unbounded_ms / base.unbounded_ms:.2f}x without the day bound)"
        )


if __name__ == "__main__":
    main()
