"""What one entry with very many fields costs the parser: the batch `[(id, [name, value, …])]`
as the consumer reads it (a flat list of bytes), parsed with no cap (the parse proper) and
with the default caps (the entry is rejected as `too_many_fields` after being counted);
best of three runs each.

    python -m benches.wide_entry --fields 1000000
    python -m benches.wide_entry --fields 100000 200000 300000
    python -m benches.wide_entry --fields 1000000 --consumer

With --consumer, also how long a draining consumer (default settings) takes to dead-letter
such an entry, and how much Redis memory the entry and its dead letter take, on the
servers of FILEPIPE_BENCH_REDIS_URL / _PG_URI (or the FILEPIPE_TEST_* ones; without them,
throwaway servers).

Also prints how far another Python thread got meanwhile, as a share of the parse time:
about 0 when the parse holds the GIL throughout, most of it when the GIL is released."""

from __future__ import annotations

import argparse
import functools
import uuid

from tests.support.gil import timed_with_free_share

from filepipe import _native
from filepipe.constants import DEFAULT_MAX_ENTRY_BYTES, DEFAULT_MAX_ENTRY_FIELDS


def wide_entry(fields: int) -> list[tuple[bytes, list[bytes]]]:
    flat = [b"file_id", str(uuid.uuid4()).encode(), b"filename", b"a.txt", b"key", b"a.txt"]
    for i in range(fields - 3):
        flat += [b"attr_%d" % i, b"value %d" % i]
    return [(b"1700000000000-0", flat)]


def consumer_run(fields: int) -> str:
    """XADDs one entry of `fields` fields and drains the stream with a consumer."""
    import os
    import tempfile
    import time
    from contextlib import ExitStack
    from pathlib import Path

    import psycopg
    import redis

    from filepipe.config import load_settings
    from filepipe.constants import dead_letter_ids_key
    from filepipe.consumer import Consumer
    from filepipe.db import init_db
    from filepipe.embedded import PostgresServer, RedisServer

    with ExitStack() as stack:
        url = os.environ.get("FILEPIPE_BENCH_REDIS_URL") or os.environ.get("FILEPIPE_TEST_REDIS_URL")
        uri = os.environ.get("FILEPIPE_BENCH_PG_URI") or os.environ.get("FILEPIPE_TEST_PG_URI")
        url = url or stack.enter_context(RedisServer()).url
        uri = uri or stack.enter_context(PostgresServer()).uri
        storage = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (storage / "a.txt").write_bytes(b"a")  # what an accepted entry names
        tag = uuid.uuid4().hex[:8]
        s = load_settings(
            {
                "redis_url": url,
                "pg_uri": uri,
                "stream": f"bench_wide_{tag}",
                "table": f"bench_wide_{tag}",
                "consumer_name": f"bench-wide-{tag}",
                "block_ms": 100,
                "local_storage_dir": str(storage),
            },
            environ={},
            dotenv_path=None,
        )
        init_db(s, plain=True)
        r = redis.Redis.from_url(url)
        try:
            ((_, flat),) = wide_entry(fields)
            r.execute_command("XADD", s.stream, "*", *flat)
            entry_memory = r.memory_usage(s.stream)
            t0 = time.perf_counter()
            stats = Consumer(s, drain=True, write=None).run()
            took = time.perf_counter() - t0
            letters = r.xrange(s.dead_stream)
            if not letters:
                return f"consumer: loaded it in {took:.2f} s"
            ((_, letter),) = letters
            letter_memory = r.memory_usage(s.dead_stream)
            reason = letter[b"reason"].decode()
            return (
                f"consumer: {stats.dead_lettered} dead-lettered ({reason}) in {took:.2f} s;"
                f" the entry takes {entry_memory:,} bytes of Redis, its dead letter {letter_memory:,}"
            )
        finally:
            r.delete(s.stream, s.dead_stream, dead_letter_ids_key(s.stream))
            r.close()
            with psycopg.connect(uri, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {s.table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--consumer", action="store_true", help="also dead-letter it with a consumer")
    args = parser.parse_args()
    capped = "max_fields" in (_native.parse_entries.__text_signature__ or "")
    for n in args.fields:
        batch = wide_entry(n)
        seconds, free = min(
            timed_with_free_share(functools.partial(_native.parse_entries, batch)) for _ in range(3)
        )
        line = f"{n:>9,} fields: parse {seconds * 1000:9.1f} ms (other thread free {free:4.0%} of it)"
        if capped:
            capped_s, _ = min(
                timed_with_free_share(
                    functools.partial(
                        _native.parse_entries,
                        batch,
                        max_fields=DEFAULT_MAX_ENTRY_FIELDS,
                        max_bytes=DEFAULT_MAX_ENTRY_BYTES,
                    )
                )
                for _ in range(3)
            )
            rejects = _native.parse_entries(batch, max_fields=DEFAULT_MAX_ENTRY_FIELDS).rejects
            outcome = rejects[0][2] if rejects else "accepted"
            line += f"; with the default caps {capped_s * 1000:.1f} ms ({outcome})"
        print(line, flush=True)
        if args.consumer:
            print("  " + consumer_run(n), flush=True)


if __name__ == "__main__":
    main()
