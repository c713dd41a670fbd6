"""The two consumers of the performance guide filepipe grew out of, reconstructed
faithfully: the demo runs them beside filepipe, and the benches use them as baselines
measured in the same run.

* `old_consumer`: the original `consumer.py` — XREADGROUP COUNT 10 BLOCK 5000, and for
  every message a new database connection, one INSERT, COMMIT, close, then XACK.
* `fast_consumer`: `consumer_fast.py` — XREADGROUP COUNT 50 BLOCK 1000, a pool of up to
  5 connections, one `executemany` of the batch's rows (psycopg2's executemany sends one
  INSERT per row, so this does too), COMMIT, then XACK of the batch.

Both process each file the same way: stat, SHA-256 with hashlib, content type guessed
from the name; they insert into the same table as filepipe (plain INSERT: the guide's
consumers had no idempotency)."""

from __future__ import annotations

import hashlib
import mimetypes
import time
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg_pool import ConnectionPool

from filepipe.config import Settings

INSERT = (
    "INSERT INTO {table} (event_time, stream, stream_id, file_id, filename, storage, storage_key, "
    "size_bytes, "
    "checksum_sha256, content_type, uploaded_at, consumer, attributes) "
    "VALUES (to_timestamp(%s / 1000.0), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '{{}}')"
)


def process_file(root: Path, fields: dict[bytes, bytes]) -> tuple[int, str, str]:
    """What the seed did per file: size, hash, content type."""
    key = fields[b"key"].decode()
    path = root / key
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return path.stat().st_size, h.hexdigest(), ctype


def _row(
    s: Settings, entry_id: bytes, fields: dict[bytes, bytes], measured: tuple[int, str, str], consumer: str
) -> tuple[Any, ...]:
    size, digest, ctype = measured
    return (
        int(entry_id.split(b"-")[0]),
        s.stream,
        entry_id.decode(),
        fields[b"file_id"].decode(),
        fields[b"filename"].decode(),
        "local",
        fields[b"key"].decode(),
        size,
        digest,
        ctype,
        fields[b"uploaded_at"].decode(),
        consumer,
    )


def _read(
    r: redis.Redis, s: Settings, consumer: str, count: int, block: int
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    reply: Any = r.xreadgroup(s.group, consumer, {s.stream: ">"}, count=count, block=block)
    return list(reply[0][1]) if reply else []  # RESP2: [[stream, [(id, fields), ...]]]


def old_consumer(s: Settings, limit: int, *, idle_exit_s: float = 6.0) -> tuple[int, float]:
    """The guide's slow consumer. Returns (files processed, seconds)."""
    r = redis.Redis.from_url(s.redis_url)
    root = Path(s.local_storage_dir)
    sql = INSERT.format(table=s.table)
    done, t0 = 0, time.perf_counter()
    last = t0
    while done < limit:
        entries = _read(r, s, "old_consumer", 10, 5000)
        if not entries:
            if time.perf_counter() - last > idle_exit_s:
                break
            continue
        for entry_id, fields in entries:
            measured = process_file(root, fields)
            conn = psycopg.connect(s.pg_uri)  # NEW CONNECTION for every file
            cur = conn.cursor()
            cur.execute(sql, _row(s, entry_id, fields, measured, "old_consumer"))
            conn.commit()
            conn.close()
            r.xack(s.stream, s.group, entry_id)
            done += 1
        last = time.perf_counter()
    elapsed = last - t0
    r.close()
    return done, elapsed


def fast_consumer(s: Settings, limit: int, *, idle_exit_s: float = 3.0) -> tuple[int, float]:
    """The guide's pooled, batch-of-50 consumer. Returns (files processed, seconds)."""
    r = redis.Redis.from_url(s.redis_url)
    root = Path(s.local_storage_dir)
    sql = INSERT.format(table=s.table)
    pool = ConnectionPool(s.pg_uri, min_size=1, max_size=5, open=True)
    pool.wait()
    done, t0 = 0, time.perf_counter()
    last = t0
    while done < limit:
        entries = _read(r, s, "fast_consumer", 50, 1000)
        if not entries:
            if time.perf_counter() - last > idle_exit_s:
                break
            continue
        rows = [_row(s, i, f, process_file(root, f), "fast_consumer") for i, f in entries]
        with pool.connection() as conn, conn.cursor() as cur:
            for row in rows:  # psycopg2's executemany: one statement per row
                cur.execute(sql, row)
            conn.commit()
        r.xack(s.stream, s.group, *[i for i, _ in entries])
        done += len(entries)
        last = time.perf_counter()
    elapsed = last - t0
    pool.close()
    r.close()
    return done, elapsed
