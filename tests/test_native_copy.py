"""The COPY encoder: byte-exact against the reference, and a real COPY into
PostgreSQL gives back exactly what went in (text and binary formats)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests import reference

from filepipe import _native

UUID = "0b7e2a4c-3c1d-4e4f-9a55-2d0c6a1b9e01"
COLS = ", ".join(_native.COPY_COLUMNS)
STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS rt (event_time timestamptz, stream text, stream_id text, file_id uuid, "
    "filename text, storage text, storage_key text, size_bytes bigint, checksum_sha256 text, "
    "content_type text, uploaded_at timestamptz, consumer text, attributes jsonb)"
)

no_nul_text = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=60
)


@st.composite
def batches(
    draw: st.DrawFn,
) -> tuple[list[tuple[bytes, dict[bytes, bytes]]], list[tuple[int, bytes, str | None] | None]]:
    entries = []
    measurements: list[tuple[int, bytes, str | None] | None] = []
    for i in range(draw(st.integers(1, 6))):
        fields = {
            b"file_id": UUID.encode(),
            b"filename": (draw(no_nul_text) or "f").encode(),
            b"key": ("k/" + draw(no_nul_text).replace("..", "__")).encode(),
        }
        for name in draw(
            st.lists(st.text(alphabet='abcxyz_\t\\"é🚀', min_size=1, max_size=6), max_size=3, unique=True)
        ):
            if name not in (
                "file_id",
                "filename",
                "key",
                "path",
                "size",
                "content_type",
                "uploaded_at",
                "storage",
            ):
                fields[name.encode()] = draw(no_nul_text).encode()
        if draw(st.booleans()):
            fields[b"content_type"] = b"text/plain; charset=utf-8"
        if draw(st.booleans()):
            fields[b"uploaded_at"] = b"2024-02-29T23:59:59.999999-01:30"
        entries.append((f"{draw(st.integers(0, 2**43))}-{i}".encode(), fields))
        if draw(st.integers(0, 5)) == 0:
            measurements.append(None)
        else:
            measurements.append(
                (
                    draw(st.integers(0, 2**62)),
                    draw(st.binary(min_size=32, max_size=32)),
                    draw(st.sampled_from([None, "image/png", "text/plain"])),
                )
            )
    return entries, measurements


@settings(max_examples=300, deadline=None)
@given(batches(), no_nul_text.filter(bool), no_nul_text.filter(bool), st.booleans())
def test_encoder_is_byte_exact_with_reference(data: Any, consumer: str, stream: str, binary: bool) -> None:
    entries, measurements = data
    native = _native.parse_entries(entries)
    ref = reference.parse_entries(entries)
    assert native.records() == ref.records
    assert _native.encode_copy(
        native, measurements, consumer, binary, stream=stream
    ) == reference.encode_copy(ref, measurements, consumer, binary, stream=stream)


def test_only_restricts_and_measurements_object_matches_list() -> None:
    entries = [
        (f"1-{i}".encode(), {b"file_id": UUID.encode(), b"filename": b"f", b"key": b"k"}) for i in range(4)
    ]
    batch = _native.parse_entries(entries)
    m = _native.Measurements(4)
    listed: list[tuple[int, bytes, str | None] | None] = []
    for i in range(4):
        digest = hashlib.sha256(bytes([i])).digest()
        m.set(i, i, digest, "text/plain")
        listed.append((i, digest, "text/plain"))
    m.fail(2, "missing", "gone")
    listed[2] = None
    assert _native.encode_copy(batch, m, "c", stream="s") == _native.encode_copy(
        batch, listed, "c", stream="s"
    )
    assert m.failures() == [(2, "missing", "gone", False)] and m.measured() == [0, 1, 3]
    only = _native.encode_copy(batch, m, "c", only=[3], stream="s")
    assert only == reference.encode_copy(reference.parse_entries(entries), listed, "c", only=[3], stream="s")
    with pytest.raises(IndexError):
        _native.encode_copy(batch, m, "c", only=[9], stream="s")
    with pytest.raises(TypeError, match="stream"):
        _native.encode_copy(batch, m, "c")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        m.fail(0, "no_such_reason", "x")
    with pytest.raises(ValueError):
        m.set(0, 1, b"short")


@pytest.fixture
def conn(pg_uri: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_uri) as c:
        c.execute("SET TIME ZONE 'UTC'")
        c.execute(STAGING)
        yield c


def copy_in(conn: psycopg.Connection[Any], buf: bytes, binary: bool) -> list[tuple[Any, ...]]:
    conn.execute("TRUNCATE rt")
    with conn.cursor() as cur:
        with cur.copy(f"COPY rt ({COLS}) FROM STDIN (FORMAT {'BINARY' if binary else 'TEXT'})") as copy:
            copy.write(buf)
        return cur.execute(
            "SELECT (extract(epoch from event_time) * 1000000)::bigint, stream, stream_id, file_id::text, "
            "filename, storage, storage_key, size_bytes, checksum_sha256, content_type, "
            "(extract(epoch from uploaded_at) * 1000000)::numeric::bigint, consumer, attributes FROM rt "
            "ORDER BY stream_id"
        ).fetchall()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches(), no_nul_text.filter(bool), no_nul_text.filter(bool), st.booleans())
def test_round_trip_through_postgres(
    conn: psycopg.Connection[Any], data: Any, consumer: str, stream: str, binary: bool
) -> None:
    entries, measurements = data
    batch = _native.parse_entries(entries)
    rows = copy_in(conn, _native.encode_copy(batch, measurements, consumer, binary, stream=stream), binary)
    expected = []
    for r, m in zip(batch.records(), measurements, strict=True):
        if m is None:
            continue
        expected.append(
            (
                r["event_time_us"],
                stream,
                r["stream_id"],
                r["file_id"],
                r["filename"],
                r["storage"],
                r["key"],
                m[0],
                m[1].hex(),
                r["content_type"] or m[2],
                r["uploaded_at_us"],
                consumer,
                dict(r["attributes"]),
            )
        )
    assert rows == sorted(expected, key=lambda t: t[2])


def test_text_escaping_matches_postgres_copy_out(conn: psycopg.Connection[Any]) -> None:
    """PostgreSQL's own COPY TO output is the definition of the text format's escaping."""
    nasty = "tab\there nl\nhere cr\rhere bs\\here \x08\x0b\x0c\x01\x1f\x7f é 🚀 \"quotes' \\N"
    entries = [
        (
            b"1700000000000-0",
            {b"file_id": UUID.encode(), b"filename": nasty.encode(), b"key": b"k", b"note": nasty.encode()},
        )
    ]
    batch = _native.parse_entries(entries)
    buf = _native.encode_copy(batch, [(5, b"\x00" * 32, "x/y")], "c", binary=False, stream=nasty)
    copy_in(conn, buf, binary=False)
    out = bytearray()
    with conn.cursor().copy(f"COPY rt ({COLS}) TO STDOUT") as copy:
        for chunk in copy:
            out += chunk
    # Every column but jsonb (which PostgreSQL re-serialises in its own key order) is byte-identical.
    ours, theirs = buf.rstrip(b"\n").split(b"\t"), bytes(out).rstrip(b"\n").split(b"\t")
    assert ours[:-1] == theirs[:-1]
    assert json.loads(unescape(ours[-1])) == json.loads(unescape(theirs[-1]))


def unescape(field: bytes) -> str:
    """Decodes one COPY text field."""
    table = {b"\\": b"\\", b"t": b"\t", b"n": b"\n", b"r": b"\r", b"b": b"\b", b"f": b"\f", b"v": b"\v"}
    out, i = bytearray(), 0
    while i < len(field):
        if field[i : i + 1] == b"\\":
            out += table[field[i + 1 : i + 2]]
            i += 2
        else:
            out += field[i : i + 1]
            i += 1
    return out.decode()


def test_binary_and_text_load_the_same_rows(conn: psycopg.Connection[Any]) -> None:
    entries = [
        (
            f"17000000000{i:02d}-0".encode(),
            {b"file_id": UUID.encode(), b"filename": f"f\t{i}".encode(), b"key": b"k", b"x": b"\\y\n"},
        )
        for i in range(50)
    ]
    batch = _native.parse_entries(entries)
    ms = [(i, bytes([i]) * 32, None) for i in range(50)]
    assert copy_in(conn, _native.encode_copy(batch, ms, "c", True, stream="s\t1"), True) == copy_in(
        conn, _native.encode_copy(batch, ms, "c", False, stream="s\t1"), False
    )


def test_null_content_type_is_sql_null(conn: psycopg.Connection[Any]) -> None:
    batch = _native.parse_entries([(b"1-0", {b"file_id": UUID.encode(), b"filename": b"f", b"key": b"k"})])
    for binary in (True, False):
        rows = copy_in(
            conn, _native.encode_copy(batch, [(1, b"\x01" * 32, None)], "c", binary, stream="s"), binary
        )
        assert rows[0][9] is None


def test_timestamps_format_like_postgres(conn: psycopg.Connection[Any]) -> None:
    for us in (
        0,
        1,
        -1,
        1_700_000_000_123_000,
        253_402_300_799_999_999,
        -62_135_596_800_000_000,
        951_782_400_000_001,
    ):
        text = conn.execute("SELECT to_timestamp(%s::numeric / 1000000)::text", (us,)).fetchone()
        assert text is not None
        assert _native.format_timestamp(us) == reference.format_timestamp(us)
        if abs(us) < 2**52:  # to_timestamp goes through float8: exact only for these
            assert _native.format_timestamp(us) == text[0]
