"""PostgreSQL, as the consumer uses it: connecting, round trips, COPY throughput into
the consumer's staging table, and loading a batch into a scratch copy of the events table
(and, where TimescaleDB can be used, into one of the other kind, for the cost of one
against the other). What TimescaleDB the server has, and the recent events' file sizes."""

import time
from dataclasses import asdict, replace
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from .. import _native, db, timescale
from ..config import Settings
from ..errors import FilepipeError
from ..redaction import error_line, mask_url, scrub
from ..retry import pg_login_refusal
from .figures import DEFAULT_FILE_SIZE, PostgresFigures, Timing, repeat
from .scratch import drop_table, scratch_table, synthetic_batch

COPY_ROWS = 20_000


def measure_postgres(
    settings: Settings,
    samples: int,
    connections: int,
    load_rows: int,
    tag: str,
    *,
    want_s3_keys: bool = False,
) -> PostgresFigures:
    """Connection costs, round trips, COPY throughput and the cost of loading a batch."""
    f = PostgresFigures(uri=mask_url(settings.pg_uri), table=settings.table)
    kwargs = db.connection_kwargs(settings)
    try:
        t0 = time.perf_counter()
        conn = psycopg.connect(settings.pg_uri, autocommit=True, **kwargs)
        f.connect_ms = (time.perf_counter() - t0) * 1000
    except psycopg.OperationalError as e:
        refusal = pg_login_refusal(e)
        if refusal is not None:
            f.status, f.error = "refused", f"PostgreSQL at {f.uri} refuses the connection: {refusal}"
        else:
            f.status, f.error = "unreachable", f"cannot reach PostgreSQL at {f.uri}: {error_line(e)}"
        return f
    try:
        with conn:
            _describe_server(conn, settings, f, want_s3_keys)
            f.round_trip = Timing.of(repeat(lambda: conn.execute("SELECT 1").fetchone(), samples))

            def new_connection() -> None:
                psycopg.connect(settings.pg_uri, **kwargs).close()

            f.new_connection = Timing.of(repeat(new_connection, connections))
            _measure_copy(conn, settings, f)
        _measure_load(settings, f, load_rows, tag)
    except psycopg.OperationalError as e:
        f.status, f.error = "unreachable", f"lost PostgreSQL at {f.uri}: {error_line(e)}"
    except psycopg.Error as e:
        f.status, f.error = "error", f"PostgreSQL refused the benchmark: {error_line(e)}"
    return f


def _describe_server(
    conn: psycopg.Connection[Any], settings: Settings, f: PostgresFigures, want_s3_keys: bool
) -> None:
    row = conn.execute("SHOW server_version").fetchone()
    f.server_version = str(row[0]).split()[0] if row else ""
    ext = timescale.read_extension(conn)
    f.timescaledb = ext.installed
    f.timescaledb_available = bool(ext.available or ext.installed)
    f.timescale = {"extension": {**asdict(ext), "state": ext.state}, "usable": ext.usable}
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (settings.table,)).fetchone()
    f.table_exists = bool(row and row[0])
    if not f.table_exists:
        if ext.state == "not preloaded":
            f.timescale_lines = [["TimescaleDB", ext.describe(), ""]]
        return
    facts = timescale.read_table(conn, settings.table, ext)
    f.timescale.update(facts.to_json())
    f.timescale_lines = [list(line) for line in facts.lines()]
    f.hypertable = facts.hypertable
    ident = db.table_ident(settings.table)
    try:
        row = conn.execute(
            sql.SQL(
                "SELECT avg(size_bytes)::float8 FROM (SELECT size_bytes FROM {} "
                "ORDER BY event_time DESC LIMIT 1000) recent"
            ).format(ident)
        ).fetchone()
        if row and row[0] is not None:
            f.recent_file_size = round(row[0])
        if want_s3_keys:
            rows = conn.execute(
                sql.SQL(
                    "SELECT storage_key, size_bytes FROM {} WHERE storage = 's3' "
                    "ORDER BY event_time DESC LIMIT 50"
                ).format(ident)
            ).fetchall()
            f.recent_s3_keys = [(str(k), int(n)) for k, n in rows]
    except psycopg.errors.UndefinedColumn:
        f.notes.append(f"{settings.table} does not have filepipe's columns")


def _measure_copy(conn: psycopg.Connection[Any], settings: Settings, f: PostgresFigures) -> None:
    """COPY into the consumer's own temporary staging table, then roll back."""
    binary = settings.copy_format == "binary"
    batch, m = synthetic_batch(COPY_ROWS, first_id_ms=1, size=DEFAULT_FILE_SIZE)
    buf = _native.encode_copy(batch, m, "benchmark", binary, stream=settings.stream)
    conn.autocommit = False
    try:
        db.configure_connection(conn)  # the staging table the consumer loads into
        with conn.cursor() as cur:
            t0 = time.perf_counter()
            with cur.copy(db.copy_statement(binary=binary)) as copy:
                copy.write(buf)
            f.copy_s = time.perf_counter() - t0
        f.copy_rows, f.copy_bytes = len(batch), len(buf)
        conn.rollback()
    finally:
        conn.autocommit = True


def _measure_load(settings: Settings, f: PostgresFigures, rows: int, tag: str) -> None:
    """The consumer's own load of a first delivery (pooled connection, COPY straight into
    the table) of one row and of `rows` rows, into a scratch copy of the events table
    (a hypertable with its chunk interval if it is one, else a plain table) that is dropped
    afterwards. Where TimescaleDB can be used, a batch is loaded into a scratch table of the
    other kind too, in turn with the first, for the cost of one kind against the other."""
    hyper = f.hypertable
    interval = f.timescale.get("chunk_interval_s")
    chunk = timedelta(seconds=interval) if hyper and interval else None
    # The other kind only where the extension is in this database already: a benchmark
    # creates no extension.
    ext = f.timescale.get("extension") or {}
    both = bool(ext.get("installed")) and bool(ext.get("preloaded"))
    try:
        f.load_one_ms, f.load_batch_ms, other = _time_loads(
            settings, rows, tag, hypertable=hyper, chunk=chunk, other=both, notes=f.notes
        )
        f.load_rows = rows
        if other is not None:
            f.other_kind, f.other_load_batch_ms = ("plain" if hyper else "hypertable"), other
    except FilepipeError as e:
        f.load_estimated = True
        f.load_rows = rows
        f.load_one_ms = 2 * f.rtt_ms  # COPY: the statement, then the data
        per_row = 1000.0 / f.copy_rows_per_s if f.copy_rows_per_s else 0.0
        f.load_batch_ms = f.load_one_ms + (rows - 1) * per_row
        f.notes.append(f"batch load estimated from COPY: {scrub(str(e))}")


def _time_loads(
    settings: Settings,
    rows: int,
    tag: str,
    *,
    hypertable: bool,
    chunk: timedelta | None,
    other: bool,
    notes: list[str],
) -> tuple[float, float, float | None]:
    """Median ms of loading one row and `rows` rows into a scratch table of the events
    table's kind, and (with `other`) of loading `rows` rows into one of the other kind, the
    two taking turns. Raises FilepipeError when the first scratch table cannot be created;
    the other kind is left out (with a note) when its table cannot be."""
    kinds = [hypertable, not hypertable] if other else [hypertable]
    scratches = [
        replace(settings, table=scratch_table(settings, tag + ("_h" if hyper else "_p")), pool_size=1)
        for hyper in kinds
    ]
    binary = settings.copy_format == "binary"
    pools: list[Any] = []
    next_id = [int(time.time() * 1000) - 10_000_000]

    def buffer(n: int) -> tuple[bytes, int]:
        batch, m = synthetic_batch(n, first_id_ms=next_id[0], size=DEFAULT_FILE_SIZE)
        next_id[0] += n
        return _native.encode_copy(batch, m, "benchmark", binary, stream=settings.stream), n

    def timed_ms(loader: db.Loader, buf: tuple[bytes, int]) -> float:
        t0 = time.perf_counter()
        loader.load(buf[0], buf[1], direct=True)
        return (time.perf_counter() - t0) * 1000

    try:
        loaders: list[db.Loader] = []
        for hyper, scratch in zip(kinds, scratches, strict=True):
            try:
                db.init_db(scratch, plain=not hyper, chunk_interval=chunk if hyper else None)
            except FilepipeError as e:
                if not loaders:
                    raise
                kind = "hypertable" if hyper else "plain table"
                notes.append(f"no {kind} to compare with: {scrub(str(e))}")
                break
            pool = db.create_pool(scratch, open=False)
            pools.append(pool)
            pool.open(wait=True, timeout=max(10.0, settings.connect_timeout_s * 2))
            loaders.append(db.Loader(pool, scratch))
        for loader in loaders:
            timed_ms(loader, buffer(1))  # warm up: the pool's first connection and its staging table
        ones = sorted(timed_ms(loaders[0], buffer(1)) for _ in range(3))
        many: list[list[float]] = [[] for _ in loaders]
        for _ in range(3):
            for i, loader in enumerate(loaders):
                many[i].append(timed_ms(loader, buffer(rows)))
        medians = [sorted(times)[1] for times in many]
        return ones[1], medians[0], medians[1] if len(medians) > 1 else None
    finally:
        for pool in pools:
            pool.close()
        for scratch in scratches:
            drop_table(scratch)
