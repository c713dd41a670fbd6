"""`filepipe demo`: the whole pipeline once, on sample files, end to end."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .config import load_settings, mask_url
from .constants import dead_letter_ids_key

SAMPLE_NAMES = [
    "report {i}.pdf", "photo_{i}.jpg", "notes-{i}.txt", "data {i}.json", "über straße {i}.txt",
    "tab\there {i}.txt", "emoji 🚀 {i}.txt", "quote's \"{i}\".txt", "back\\slash {i}.txt",
]
HEADERS = {".pdf": b"%PDF-1.7\n", ".jpg": b"\xff\xd8\xff\xe0", ".json": b'{"n": ', ".txt": b""}


def make_samples(directory: Path, count: int, seed: int = 7) -> int:
    """Writes `count` small files (1-4 KiB) with varied names; returns total bytes."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        name = SAMPLE_NAMES[i % len(SAMPLE_NAMES)].format(i=i).replace("/", "_")
        ext = Path(name).suffix
        body = HEADERS.get(ext, b"") + bytes(rng.getrandbits(8) if ext == ".jpg" else rng.randrange(32, 127)
                                             for _ in range(rng.randrange(1024, 4096)))
        (directory / name).write_bytes(body)
        total += len(body)
    return total


def run_demo(files: int, echo: Callable[[str], None] = print) -> None:
    """Produces `files` sample files and consumes them into PostgreSQL, printing each step."""
    from . import db, timescale
    from .consumer import Consumer
    from .embedded import PostgresServer, RedisServer, timescaledb_installed
    from .errors import NotPreloadedError
    from .producer import Producer

    base = load_settings()
    work = Path(tempfile.mkdtemp(prefix="filepipe-demo-"))
    stack = contextlib.ExitStack()
    try:
        redis_url, pg_uri = base.redis_url, base.pg_uri
        env_redis = os.environ.get("REDIS_URL") or _dotenv("REDIS_URL")
        env_pg = os.environ.get("PG_URI") or os.environ.get("DATABASE_URL") or _dotenv("PG_URI")
        if not env_redis:
            echo("Starting a throwaway Redis ...")
            redis_url = stack.enter_context(RedisServer()).url
        if not env_pg:
            # With TimescaleDB installed, the throwaway server preloads it: a hypertable.
            preload = ("timescaledb",) if timescaledb_installed() else ()
            echo(f"Starting a throwaway PostgreSQL{' with TimescaleDB' if preload else ''} ...")
            pg_uri = stack.enter_context(PostgresServer(preload=preload)).uri
        stream = f"filepipe_demo_{os.getpid()}" if env_redis else base.stream
        table = f"filepipe_demo_{os.getpid()}" if env_pg else base.table
        settings = load_settings(
            {
                "redis_url": redis_url, "pg_uri": pg_uri, "stream": stream, "table": table,
                "storage_mode": "local", "local_storage_dir": str(work / "storage"),
                "consumer_name": f"demo-{os.getpid()}",
            }
        )
        echo(f"  Redis:      {mask_url(settings.redis_url)} (stream {settings.stream})")
        echo(f"  PostgreSQL: {mask_url(settings.pg_uri)} (table {settings.table})")
        echo(f"  Storage:    {settings.local_storage_dir}")

        try:
            info = db.init_db(settings)
        except NotPreloadedError:
            with db.connect(settings) as conn:
                ext = timescale.read_extension(conn)
            echo("! TimescaleDB is installed there but not preloaded, so the demo uses a plain table; "
                 f"for a hypertable, {ext.preload_advice()}")
            info = db.init_db(settings, plain=True)
        echo(f"✓ Table {info.table} ready ({'hypertable' if info.hypertable else 'plain table'})")

        size = make_samples(work / "samples", files)
        producer = Producer(settings)
        t0 = time.perf_counter()
        n = producer.produce([work / "samples"])
        producer.close()
        echo(f"✓ Enqueued {n} events ({size / 1e6:.1f} MB of files) in {time.perf_counter() - t0:.2f} s")

        t0 = time.perf_counter()
        stats = Consumer(settings, drain=True, write=echo).run()
        elapsed = time.perf_counter() - t0
        echo(
            f"✓ Consumed {stats.inserted} events in {elapsed:.2f} s: {stats.inserted / elapsed:.0f} files/sec"
        )

        with db.connect(settings) as conn:
            count = conn.execute(f"SELECT count(*) FROM {settings.table}").fetchone()
            rows = conn.execute(
                f"SELECT filename, size_bytes, content_type, left(checksum_sha256, 12) FROM {settings.table} "
                "ORDER BY event_time, stream_id LIMIT 5"
            ).fetchall()
            echo(f"✓ {count[0] if count else 0} rows in {settings.table}; the first five:")
            for filename, size_bytes, ctype, digest in rows:
                echo(f"    {filename!r:40} {size_bytes:>6} B  {ctype:<18} sha256 {digest}…")
            if env_pg:
                conn.execute(f"DROP TABLE {settings.table}")
                conn.commit()
        if env_redis:
            import redis as _redis

            r = _redis.Redis.from_url(settings.redis_url)
            from .constants import trim_keys

            r.delete(settings.stream, settings.dead_stream, dead_letter_ids_key(settings.stream),
                     *trim_keys(settings.stream))
            r.close()
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
        echo("✓ Cleaned up")


def _dotenv(name: str) -> str | None:
    if not Path(".env").is_file():
        return None
    from dotenv import dotenv_values

    return dotenv_values(".env").get(name)
