"""The pipeline end to end against real Redis and PostgreSQL: produce, consume
--drain, and check every row against the files and events."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo
from tests.conftest import Env, both_tables

from filepipe import _native
from filepipe.db import init_db
from filepipe.producer import Producer
from filepipe.stream import ensure_group

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


def make_files(root: Path, n: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(n):
        body = (PNG if i % 2 else b"text: ") + bytes(
            rng.randrange(32, 127) for _ in range(rng.randrange(1024, 4096))
        )
        name = f"file-{i:05d}.{'png' if i % 2 else 'txt'}"
        (root / name).write_bytes(body)
        files[name] = body
    return files


@both_tables
def test_ten_thousand_events_every_column_matches(env: Env, tmp_path: Path) -> None:
    files = make_files(tmp_path / "src", 10_000)
    producer = Producer(env.settings)
    assert producer.produce([tmp_path / "src"]) == 10_000
    producer.close()

    events = {
        fields[b"file_id"].decode(): (entry_id.decode(), fields)
        for entry_id, fields in env.redis.xrange(env.settings.stream)
    }
    # Kept in the stream after loading (STREAM_RETENTION=all), to be replayed below.
    stats = env.drain(stream_retention="all")
    assert stats.inserted == 10_000 and stats.dead_lettered == 0
    assert env.pending() == 0
    rows = env.sql(
        f"SELECT stream_id, (extract(epoch from event_time) * 1000)::bigint, file_id::text, "
        f"filename, storage, storage_key, size_bytes, checksum_sha256, content_type, uploaded_at, consumer, "
        f"attributes FROM {env.settings.table}"
    )
    assert len(rows) == 10_000
    for (
        stream_id,
        event_ms,
        file_id,
        filename,
        storage,
        key,
        size,
        digest,
        ctype,
        uploaded,
        consumer,
        attrs,
    ) in rows:
        entry_id, fields = events[file_id]
        body = files[filename]
        assert stream_id == entry_id
        assert event_ms == int(entry_id.split("-")[0])
        assert fields[b"filename"].decode() == filename
        assert (storage, key) == ("local", fields[b"key"].decode())
        assert (env.storage / key).read_bytes() == body
        assert size == len(body) and digest == hashlib.sha256(body).hexdigest()
        assert ctype == ("image/png" if filename.endswith(".png") else "text/plain")
        assert uploaded == datetime.fromisoformat(fields[b"uploaded_at"].decode().replace("Z", "+00:00"))
        assert consumer == env.settings.consumer_name and attrs == {}

    # Running again adds nothing; replaying the whole stream duplicates nothing.
    assert env.drain(stream_retention="all").inserted == 0
    env.redis.xgroup_setid(env.settings.stream, env.settings.group, "0")
    again = env.drain(consumer_name="second", stream_retention="all")
    assert again.inserted == 0 and again.duplicates == 10_000
    assert env.rows() == 10_000 and env.pending() == 0
    assert env.sql(f"SELECT count(DISTINCT file_id) FROM {env.settings.table}")[0][0] == 10_000


NASTY_NAMES = [
    "tab\there.txt",
    "new\nline.txt",
    "carriage\rreturn.txt",
    "back\\slash\\.txt",
    "quotes \"double\" and 'single'.txt",
    "emoji 🚀🔥 and ñ ü 中文.txt",
    "x" * 500 + ".txt",
    "control \x01\x02\x1f\x7f chars.txt",
    "\\N",
    'comma, semi; {json: "like"}',
]


@pytest.mark.parametrize("copy_format", ["binary", "text"])
def test_nasty_filenames_survive_byte_exact(env: Env, tmp_path: Path, copy_format: str) -> None:
    producer = Producer(env.settings)
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    ids = {producer.add(src, filename=name, extra={"note\t\\": name}): name for name in NASTY_NAMES}
    producer.close()
    env.drain(copy_format=copy_format)
    rows = env.sql(f"SELECT file_id::text, filename, attributes FROM {env.settings.table}")
    assert {fid: (name, attrs) for fid, name, attrs in rows} == {
        fid: (name, {"note\t\\": name}) for fid, name in ids.items()
    }


def test_each_reject_reason_is_dead_lettered_and_the_rest_loads(env: Env) -> None:
    env.write_file("ok.txt", b"fine")
    env.write_file("big.bin", b"x" * 2048)
    outside = env.storage.parent / "canary.txt"
    outside.write_bytes(b"canary")
    (env.storage / "escape").symlink_to(outside)
    good = {"file_id": str(uuid.uuid4()), "filename": "ok.txt", "key": "ok.txt"}
    bad = {
        "missing_field": {"filename": "a", "key": "ok.txt"},
        "bad_uuid": {**good, "file_id": "123"},
        "bad_timestamp": {**good, "uploaded_at": "2024-13-01T00:00:00Z"},
        "bad_size": {**good, "size": "many"},
        "bad_storage": {**good, "storage": "ftp"},
        "bad_content_type": {**good, "content_type": "nonsense"},
        "not_utf8": {**good, "filename": b"\xff\xfe"},
        "nul_byte": {**good, "filename": "a\x00b"},
        "unsafe_key": {**good, "key": "../canary.txt"},
        "missing": {**good, "key": "nope.txt"},
        "too_large": {**good, "key": "big.bin"},
        "not_a_file": {**good, "key": "."},
    }
    expected: dict[bytes, str] = {}
    good_ids = []
    for reason, fields in bad.items():
        good_ids.append(env.xadd({**good, "file_id": str(uuid.uuid4())}))
        expected[env.xadd(fields)] = reason
    symlink_id = env.xadd({**good, "key": "escape"})
    expected[symlink_id] = "unsafe_key"

    stats = env.drain(max_file_bytes=1024)
    assert stats.inserted == len(good_ids)
    assert env.rows() == len(good_ids) and env.pending() == 0
    dead = {fields[b"source_id"]: fields for _, fields in env.dead()}
    assert {k: v[b"reason"].decode() for k, v in dead.items()} == expected
    for source_id, fields in dead.items():
        assert source_id.decode() in fields[b"error"].decode()
        assert fields[b"consumer"].decode() == env.settings.consumer_name
        assert fields[b"deliveries"] == b"1"
    assert dead[symlink_id][b"key"] == b"escape"
    assert (
        env.sql(
            f"SELECT count(*) FROM {env.settings.table} WHERE checksum_sha256 = %s",
            (hashlib.sha256(b"canary").hexdigest(),),
        )[0][0]
        == 0
    )


def test_group_is_created_from_the_start_of_the_stream(env: Env) -> None:
    env.write_file("a", b"a")
    env.xadd({"file_id": str(uuid.uuid4()), "filename": "a", "key": "a"})
    assert env.drain().inserted == 1
    assert ensure_group(env.redis, env.settings.stream, env.settings.group) is False


def test_declared_content_type_wins_and_attributes_are_kept(env: Env) -> None:
    env.write_file("a.bin", PNG)
    fid = str(uuid.uuid4())
    env.xadd(
        {
            "file_id": fid,
            "filename": "a.bin",
            "path": "a.bin",
            "content_type": "application/x-custom",
            "user_id": "42",
            "tags": "x,y",
        }
    )
    env.drain()
    ((ctype, attrs),) = env.sql(f"SELECT content_type, attributes FROM {env.settings.table}")
    assert ctype == "application/x-custom" and attrs == {"user_id": "42", "tags": "x,y"}


def test_uploaded_at_defaults_to_entry_time(env: Env) -> None:
    env.write_file("a", b"a")
    entry_id = env.xadd({"file_id": str(uuid.uuid4()), "filename": "a", "key": "a"})
    env.drain()
    ((same,),) = env.sql(f"SELECT uploaded_at = event_time FROM {env.settings.table}")
    ms = int(entry_id.split(b"-")[0])
    assert same
    assert (
        env.sql(f"SELECT (extract(epoch from event_time)*1000)::bigint FROM {env.settings.table}")[0][0] == ms
    )


def test_sniffing_matches_extension(env: Env) -> None:
    assert _native.sniff_content_type(PNG) == "image/png"
    assert _native.sniff_content_type(b"%PDF-1.4") == "application/pdf"
    assert _native.sniff_content_type(b"just text") == "text/plain"
    assert "missing" in _native.reason_codes()


@pytest.fixture
def latin1_uri(env: Env) -> Iterator[str]:
    """A database whose encoding is LATIN1: its clients default to LATIN1 too."""
    name = f"fp_latin1_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(env.pg_uri, autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
    try:
        yield conninfo.make_conninfo(env.pg_uri, dbname=name)
    finally:
        with psycopg.connect(env.pg_uri, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("where", ["database", "uri"])
@pytest.mark.parametrize("copy_format", ["binary", "text"])
def test_text_round_trips_whatever_the_client_encoding_would_be(
    env: Env, latin1_uri: str, where: str, copy_format: str
) -> None:
    """A LATIN1 database (its clients' default encoding), or a URI asking for LATIN1 on a
    UTF-8 one: the COPY buffers hold UTF-8, so filepipe's connections say UTF8 whatever
    the default. Text LATIN1 can hold arrives as it was sent; text it cannot hold is
    refused by the server, row by row, and dead-lettered with its reason."""
    uri = latin1_uri if where == "database" else conninfo.make_conninfo(env.pg_uri, client_encoding="LATIN1")
    s = env.settings_with(pg_uri=uri, copy_format=copy_format)
    init_db(s, plain=True)
    env.write_file("a.txt", b"a")
    latin = ["café.txt", "Ærøskøbing ½.txt", "plain.txt"]
    other = ["日本語.txt", "emoji 🚀.txt"] if where == "database" else []
    names = {
        env.xadd({"file_id": str(uuid.uuid4()), "filename": n, "key": "a.txt", "note": n}): n
        for n in [*latin, *other]
    }
    stats = env.drain(pg_uri=uri, copy_format=copy_format)
    assert stats.inserted == len(latin) and stats.dead_lettered == len(other) and env.pending() == 0
    with psycopg.connect(uri, client_encoding="UTF8") as conn:
        rows = conn.execute(f"SELECT stream_id, filename, attributes->>'note' FROM {s.table}").fetchall()
    assert sorted(rows) == sorted((i.decode(), names[i], names[i]) for i in names if names[i] in latin)
    dead = env.dead()
    assert sorted(f[b"filename"].decode() for _, f in dead) == sorted(other)
    for _, f in dead:
        assert f[b"reason"] == b"db_rejected" and b'has no equivalent in encoding "LATIN1"' in f[b"error"]
