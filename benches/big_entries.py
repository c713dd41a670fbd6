"""Peak RSS of a consumer draining entries that are big in bytes (a large attribute each):
memory must follow the bytes of a batch, not the number of entries in it.

    python -m benches.big_entries                          # 400 entries of 1 MiB
    python -m benches.big_entries --entries 400 --kib 1024 --batch-bytes 33554432

Runs `filepipe consume --drain -q` as a subprocess against a private Redis and a private
PostgreSQL (or FILEPIPE_BENCH_REDIS_URL / _PG_URI), sampling its RSS every 20 ms; every
entry must become a row. The attribute is random text (PostgreSQL cannot compress it
away), sized so that each entry stays under FILEPIPE_MAX_ENTRY_BYTES."""

from __future__ import annotations

import argparse
import os
import random
import string
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

import psutil
import psycopg
import redis

from filepipe.config import load_settings
from filepipe.db import init_db
from filepipe.embedded import PostgresServer, RedisServer


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=400)
    ap.add_argument("--kib", type=int, default=1024, help="size of each entry, about (KiB)")
    ap.add_argument("--batch-bytes", type=int, default=None, help="FILEPIPE_BATCH_BYTES for the consumer")
    args = ap.parse_args(argv)
    with ExitStack() as stack, TemporaryDirectory(prefix="filepipe-big-") as tmp:
        redis_url = os.environ.get("FILEPIPE_BENCH_REDIS_URL") or stack.enter_context(RedisServer()).url
        pg_uri = os.environ.get("FILEPIPE_BENCH_PG_URI") or stack.enter_context(PostgresServer()).uri
        tag = uuid.uuid4().hex[:8]
        root = Path(tmp) / "storage"
        root.mkdir()
        (root / "a.txt").write_bytes(b"a small file\n")
        s = load_settings(
            {
                "redis_url": redis_url,
                "pg_uri": pg_uri,
                "stream": f"fp_big_{tag}",
                "table": f"fp_big_{tag}",
                "local_storage_dir": str(root),
                "block_ms": 100,
            },
            environ={},
            dotenv_path=None,
        )
        init_db(s, plain=True)
        r = redis.Redis.from_url(redis_url)
        rng = random.Random(1)
        # Under the per-entry cap once the id, the names and the other fields are counted.
        size = args.kib * 1024 - 512
        alphabet = string.ascii_letters.encode()
        pipe = r.pipeline(transaction=False)
        for i in range(args.entries):
            blob = bytes(rng.choice(alphabet) for _ in range(256)) * (size // 256)
            pipe.xadd(
                s.stream,
                {"file_id": str(uuid.uuid4()), "filename": f"big {i}", "key": "a.txt", "notes": blob},
            )
            if i % 20 == 19:
                pipe.execute()
        pipe.execute()
        from tests.support.workload import consumer_env

        extra = {"FILEPIPE_BATCH_BYTES": str(args.batch_bytes)} if args.batch_bytes else {}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "filepipe", "consume", "--drain", "-q"],
            env=consumer_env(s, **extra),
            cwd=root,
        )
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        assert proc.returncode == 0, proc.returncode
        with psycopg.connect(pg_uri, autocommit=True) as conn:
            rows = conn.execute(f"SELECT count(*) FROM {s.table}").fetchone()
            conn.execute(f"DROP TABLE {s.table}")
        r.delete(s.stream, s.dead_stream)
        r.close()
        assert rows == (args.entries,), rows
        result = {
            "entries": args.entries,
            "entry_kib": args.kib,
            "peak_rss_mb": peak / 2**20,
            "seconds": seconds,
        }
        print(
            f"{args.entries} entries of {args.kib} KiB: drained in {seconds:.1f} s, "
            f"peak RSS {peak / 2**20:.0f} MB"
        )
        return result


if __name__ == "__main__":
    main()
