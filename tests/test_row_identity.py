"""A row's identity is (stream, stream_id, event_time): two streams loading one table
keep every row, a redelivery still duplicates nothing, and an old-layout table is
upgraded by `init-db` (and refused by `consume` until it is)."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from tests.conftest import Env, both_tables
from tests.test_cli import cli_env, run

from filepipe import _native, db
from filepipe.consumer import Consumer
from filepipe.db import init_db
from filepipe.errors import DatabaseError, SchemaError

N = 3000


def entry_ids(n: int) -> list[str]:
    """The same ids in every stream: busy streams share milliseconds and sequences."""
    return [f"{1_700_000_000_000 + i // 3}-{i % 3}" for i in range(n)]


def add_entries(r: redis.Redis, stream: str, ids: list[str]) -> None:
    pipe = r.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xadd(stream, {"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"}, id=entry_id)
    pipe.execute()


@both_tables
def test_two_streams_into_one_table_keep_every_row(env: Env) -> None:
    env.write_file("a.txt", b"hello")
    ids = entry_ids(N)
    streams = [f"{env.settings.stream}_eu", f"{env.settings.stream}_us"]
    for name in streams:
        add_entries(env.redis, name, ids)
    try:
        for name in streams:
            # Kept after loading (STREAM_RETENTION=all), to be replayed below.
            stats = env.drain(stream=name, consumer_name=f"{name}-1", batch_size=500, stream_retention="all")
            assert stats.inserted == N and stats.duplicates == 0 and stats.dead_lettered == 0
        assert env.rows() == 2 * N
        by_stream = dict(env.sql(f"SELECT stream, count(*) FROM {env.settings.table} GROUP BY stream"))
        assert by_stream == {streams[0]: N, streams[1]: N}
        # Replaying one stream from the start adds nothing: the key still holds.
        env.redis.xgroup_setid(streams[1], env.settings.group, "0")
        again = env.drain(
            stream=streams[1], consumer_name=f"{streams[1]}-2", batch_size=500, stream_retention="all"
        )
        assert again.inserted == 0 and again.duplicates == N
        assert env.rows() == 2 * N
    finally:
        env.redis.delete(*streams, *(f"{s}:dead" for s in streams))


PRIMARY_KEY_SQL = (
    "SELECT a.attname FROM pg_constraint c "
    "JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) ON true "
    "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
    "WHERE c.conrelid = %s::regclass AND c.contype = 'p' ORDER BY k.n"
)


def primary_key(env: Env) -> list[str]:
    return [name for (name,) in env.sql(PRIMARY_KEY_SQL, (env.settings.table,))]


def test_table_key_is_stream_stream_id_event_time(env: Env) -> None:
    assert primary_key(env) == ["stream", "stream_id", "event_time"]


# The table as versions before the stream name was part of the key created it.
OLD_LAYOUT = """
CREATE TABLE {table} (
  event_time timestamptz NOT NULL,
  stream_id text NOT NULL,
  file_id uuid NOT NULL,
  filename text NOT NULL,
  storage text NOT NULL,
  storage_key text NOT NULL,
  size_bytes bigint NOT NULL,
  checksum_sha256 text NOT NULL,
  content_type text,
  uploaded_at timestamptz NOT NULL,
  consumer text NOT NULL,
  attributes jsonb NOT NULL DEFAULT '{{}}'::jsonb,
  processed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (stream_id, event_time)
)
"""


def make_old_layout_table(env: Env, entries: list[tuple[str, str]]) -> None:
    """The events table of the previous layout, holding a row for each (entry id, file id)."""
    table = env.settings.table
    with psycopg.connect(env.pg_uri, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}")
        conn.execute(OLD_LAYOUT.format(table=table))
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} (event_time, stream_id, file_id, filename, storage, storage_key, "
                "size_bytes, checksum_sha256, uploaded_at, consumer) "
                "VALUES (to_timestamp(%s / 1000.0), %s, %s, 'a.txt', 'local', 'a.txt', 5, 'x', now(), 'old')",
                [(int(entry_id.split("-")[0]), entry_id, file_id) for entry_id, file_id in entries],
            )
        if env.hypertable:  # as a hypertable of the previous version, its rows in chunks
            conn.execute(
                "SELECT create_hypertable(%s::regclass, 'event_time', migrate_data => TRUE)", (table,)
            )


def add_events(env: Env, n: int) -> list[tuple[str, str]]:
    env.write_file("a.txt", b"hello")
    out = []
    pipe = env.redis.pipeline(transaction=False)
    for entry_id in entry_ids(n):
        file_id = str(uuid.uuid4())
        pipe.xadd(env.settings.stream, {"file_id": file_id, "filename": "a.txt", "key": "a.txt"}, id=entry_id)
        out.append((entry_id, file_id))
    pipe.execute()
    return out


@both_tables
def test_consume_refuses_an_old_layout_table_and_init_db_upgrades_it(env: Env, tmp_path: Path) -> None:
    events = add_events(env, 1000)
    make_old_layout_table(env, events[:600])  # the previous version loaded these, then stopped
    e = cli_env(env)
    table = env.settings.table

    refused = run(["consume", "--drain"], e, tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1:] == [
        f"error: table {table} has the old layout (rows keyed by (stream_id, event_time), without the "
        "stream name): run `filepipe init-db` to upgrade it"
    ]
    assert env.rows() == 600 and env.pending() == 0  # nothing was read

    upgraded = run(env.init_args(), e, tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    first, ready = upgraded.stdout.strip().splitlines()
    assert first.startswith(f"✓ Table {table} upgraded in ")
    assert first.endswith(
        f" s: rows keyed by (stream, stream_id, event_time); existing rows are stream '{env.settings.stream}'"
    ), first
    assert ready.startswith(f"✓ Table {table} ready: ")
    assert primary_key(env) == ["stream", "stream_id", "event_time"]
    assert env.sql(f"SELECT stream, count(*) FROM {table} GROUP BY stream") == [(env.settings.stream, 600)]

    # The stream redelivered from its start: the 600 rows already there are not loaded again.
    stats = env.drain(batch_size=250)
    assert stats.inserted == 400 and stats.duplicates == 600 and stats.dead_lettered == 0
    assert env.rows() == 1000 and env.pending() == 0
    assert env.sql(f"SELECT count(DISTINCT stream_id) FROM {table}")[0][0] == 1000

    again = run(env.init_args(), e, tmp_path)  # nothing left to upgrade
    assert again.returncode == 0 and again.stdout.strip().splitlines() == [ready]


def test_a_consumer_of_the_previous_version_keeps_loading_after_the_upgrade(env: Env) -> None:
    """The upgraded column keeps the stream name as its default: rows from a writer that
    does not send it (a consumer not yet restarted on this version) still load."""
    make_old_layout_table(env, [("5-0", str(uuid.uuid4()))])
    init_db(env.settings, plain=True)
    env.sql(
        f"INSERT INTO {env.settings.table} (event_time, stream_id, file_id, filename, storage, storage_key, "
        "size_bytes, checksum_sha256, uploaded_at, consumer) "
        f"VALUES (now(), '6-0', '{uuid.uuid4()}', 'a', 'local', 'a', 1, 'x', now(), 'old')"
    )
    assert env.sql(f"SELECT stream_id, stream FROM {env.settings.table} ORDER BY stream_id") == [
        ("5-0", env.settings.stream),
        ("6-0", env.settings.stream),
    ]


def test_the_consumer_refuses_an_old_layout_table_in_process(env: Env) -> None:
    make_old_layout_table(env, [])
    with pytest.raises(SchemaError, match="run `filepipe init-db` to upgrade it"):
        Consumer(env.settings, drain=True, write=None).run()


def test_the_loader_refuses_an_old_layout_table_met_after_the_start(env: Env) -> None:
    """The start's check is best effort (PostgreSQL may be down then): the first load
    checks again, and loads nothing into a table of the old layout."""
    make_old_layout_table(env, [])
    batch = _native.parse_entries(
        [(b"1-0", {b"file_id": str(uuid.uuid4()).encode(), b"filename": b"a", b"key": b"a"})]
    )
    buf = _native.encode_copy(batch, [(1, b"\x00" * 32, None)], "c", stream=env.settings.stream)
    pool = db.create_pool(env.settings)
    try:
        loader = db.Loader(pool, env.settings)
        with pytest.raises(SchemaError, match="has the old layout"):
            loader.load(buf, 1, direct=True)
    finally:
        pool.close()
    assert env.rows() == 0


def test_init_db_refuses_a_table_it_cannot_upgrade(env: Env) -> None:
    table = env.settings.table
    env.sql(f"DROP TABLE {table}")
    env.sql(f"CREATE TABLE {table} (stream_id text PRIMARY KEY, event_time timestamptz NOT NULL)")
    with pytest.raises(DatabaseError) as e:
        init_db(env.settings, plain=True)
    assert str(e.value).startswith(f"table {table} is not a filepipe events table: it has no column file_id")
    env.sql(f"DROP TABLE {table}")
    env.sql(
        OLD_LAYOUT.format(table=table).replace(
            "PRIMARY KEY (stream_id, event_time)", "PRIMARY KEY (event_time, stream_id)"
        )
    )
    with pytest.raises(
        DatabaseError,
        match=r"has primary key \(event_time, stream_id\), not filepipe's "
        r"\(stream_id, event_time\): change it to "
        r"\(stream, stream_id, event_time\) by hand",
    ):
        init_db(env.settings, plain=True)
    assert "stream" not in {
        name
        for (name,) in env.sql(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0", (table,)
        )
    }


def test_a_compressed_hypertable_is_refused_with_the_way_out() -> None:
    layout = db.Layout(
        columns=frozenset(db.COLUMNS) - {"stream"},
        primary_key=db.OLD_PRIMARY_KEY,
        primary_key_name="t_pkey",
        compression=True,
    )
    with pytest.raises(DatabaseError) as e:
        db.schema.upgrade_layout(None, "t", "file_uploads", layout)  # type: ignore[arg-type]  # refused before any SQL
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("table t is a hypertable with compression enabled")
    assert "decompress them, disable compression, run `filepipe init-db` again" in message


def test_an_upgrade_that_cannot_lock_the_table_gives_up_and_changes_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_old_layout_table(env, [("5-0", str(uuid.uuid4()))])
    monkeypatch.setattr(db.schema, "UPGRADE_LOCK_TIMEOUT_MS", 300)
    with psycopg.connect(env.pg_uri) as reader:
        reader.execute(f"SELECT count(*) FROM {env.settings.table}")  # holds ACCESS SHARE until rollback
        with pytest.raises(
            DatabaseError,
            match=rf"table {env.settings.table} is in use .*: stop the consumers "
            r"loading it and run `filepipe init-db` again",
        ):
            init_db(env.settings, plain=True)
        reader.rollback()
    assert primary_key(env) == ["stream_id", "event_time"]
    init_db(env.settings, plain=True)
    assert primary_key(env) == ["stream", "stream_id", "event_time"]
