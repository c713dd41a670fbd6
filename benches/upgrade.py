"""What `filepipe init-db` costs on an old-layout table (no `stream` column, keyed by
(stream_id, event_time)): builds one of --rows rows, upgrades it, and prints how long
the upgrade held the table locked, with the table's and its key's sizes.

    python -m benches.upgrade --rows 1000000

Uses FILEPIPE_BENCH_PG_URI (or FILEPIPE_TEST_PG_URI); without either it starts a
throwaway server. The scratch table is dropped afterwards."""

from __future__ import annotations

import argparse
import os
import time
import uuid
from contextlib import ExitStack

import psycopg

from filepipe.config import load_settings
from filepipe.db import init_db
from filepipe.embedded import PostgresServer

OLD_LAYOUT = """
CREATE TABLE {table} (
  event_time timestamptz NOT NULL, stream_id text NOT NULL, file_id uuid NOT NULL,
  filename text NOT NULL, storage text NOT NULL, storage_key text NOT NULL,
  size_bytes bigint NOT NULL, checksum_sha256 text NOT NULL, content_type text,
  uploaded_at timestamptz NOT NULL, consumer text NOT NULL,
  attributes jsonb NOT NULL DEFAULT '{{}}'::jsonb,
  processed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (stream_id, event_time)
)
"""

FILL = """
INSERT INTO {table} (event_time, stream_id, file_id, filename, storage, storage_key, size_bytes,
                     checksum_sha256, content_type, uploaded_at, consumer, attributes)
SELECT to_timestamp((1700000000000 + i / 3) / 1000.0), (1700000000000 + i / 3) || '-' || (i %% 3),
       md5(i::text)::uuid, 'photo ' || i || '.jpg', 'local', '2024/05/01/' || md5(i::text) || '.jpg',
       1024 + i %% 3072, encode(sha256(i::text::bytea), 'hex'), 'image/jpeg', now(), 'consumer-1',
       jsonb_build_object('user_id', (i %% 100)::text)
FROM generate_series(0, %s - 1) AS i
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with ExitStack() as stack:
        uri = os.environ.get("FILEPIPE_BENCH_PG_URI") or os.environ.get("FILEPIPE_TEST_PG_URI")
        if not uri:
            uri = stack.enter_context(PostgresServer()).uri
        table = f"bench_upgrade_{uuid.uuid4().hex[:8]}"
        settings = load_settings({"pg_uri": uri, "table": table}, environ={}, dotenv_path=None)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute(OLD_LAYOUT.format(table=table))
            try:
                t0 = time.perf_counter()
                conn.execute(FILL.format(table=table), (args.rows,))  # type: ignore[arg-type]
                conn.execute(f"VACUUM ANALYZE {table}")
                old_key = conn.execute(
                    "SELECT pg_size_pretty(pg_relation_size(%s::regclass))", (f"{table}_pkey",)
                ).fetchone()
                assert old_key is not None
                print(
                    f"built {args.rows:,} old-layout rows in {time.perf_counter() - t0:.1f} s "
                    f"(primary key {old_key[0]})"
                )
                info = init_db(settings, plain=True)
                assert info.upgraded is not None
                size = conn.execute(
                    "SELECT pg_size_pretty(pg_table_size(%s::regclass)), "
                    "pg_size_pretty(pg_relation_size(%s::regclass))",
                    (table, f"{table}_pkey"),
                ).fetchone()
                assert size is not None
                print(
                    f"upgrade: {info.upgraded.seconds:.2f} s with the table locked "
                    f"(table {size[0]}, new primary key {size[1]})"
                )
            finally:
                conn.execute(f"DROP TABLE IF EXISTS {table}")


if __name__ == "__main__":
    main()
