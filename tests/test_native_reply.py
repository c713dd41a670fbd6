"""The extension's reply reader: XREADGROUP replies collected from a socket's chunks and
read in place agree with the same entries as redis-py's objects, whatever the entries
and however the bytes arrive."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filepipe import _native

UUID = b"0b7e2a4c-3c1d-4e4f-9a55-2d0c6a1b9e01"

Entry = tuple[bytes, list[bytes] | None]


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def resp2(stream: bytes, entries: list[Entry]) -> bytes:
    out = [b"*1\r\n*2\r\n", bulk(stream), b"*%d\r\n" % len(entries)]
    for entry_id, fields in entries:
        out += [b"*2\r\n", bulk(entry_id)]
        if fields is None:
            out.append(b"*-1\r\n")
        else:
            out += [b"*%d\r\n" % len(fields), *map(bulk, fields)]
    return b"".join(out)


def resp3(stream: bytes, entries: list[Entry]) -> bytes:
    return b"%1\r\n" + resp2(stream, entries)[len(b"*1\r\n*2\r\n") :].replace(b"*-1\r\n", b"_\r\n")


def read(data: bytes, chunk: int = 7) -> tuple[_native.Reply | None, bytes]:
    """`data` fed to a ReplyReader `chunk` bytes at a time, through one reused bytearray
    as a socket is read."""
    reader = _native.ReplyReader()
    buf = bytearray(chunk)
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        buf[: len(piece)] = piece
        if reader.feed(buf, len(piece)):
            break
    else:
        raise AssertionError("the reply never completed")
    return reader.take()


def entries_fixture() -> list[Entry]:
    return [
        (b"1700000000000-0", [b"file_id", UUID, b"filename", b"a.txt", b"key", b"a/b.txt", b"x", b"\r\n"]),
        (b"1700000000000-1", None),
        (b"1700000000000-2", [b"file_id", b"nope", b"filename", b"b", b"key", b"k"]),
        (b"1700000000000-3", []),
    ]


@pytest.mark.parametrize("encode", [resp2, resp3])
def test_a_reply_reads_as_its_entries(encode: object) -> None:
    entries = entries_fixture()
    data = encode(b"uploads", entries)  # type: ignore[operator]
    reply, rest = read(data + b"+OK\r\n", chunk=5)
    assert reply is not None and b"+OK\r\n".startswith(rest)  # what came with its last chunk
    assert (len(reply), reply.stream, reply.nbytes) == (4, b"uploads", len(data))
    assert [reply[i] for i in range(len(reply))] == entries
    assert reply[-1] == entries[-1]
    with pytest.raises(IndexError):
        reply[4]
    assert _native.entry_ids(reply) == _native.entry_ids(entries)
    assert _native.entry_ids(reply)[1] == [b"1700000000000-1", b"1700000000000-3"]
    # Made once, handed out as copies: changing one does not change the next.
    ids, _ = _native.entry_ids(reply)
    ids.clear()
    assert _native.entry_ids(reply)[0] == [e[0] for e in entries]


@pytest.mark.parametrize(
    "other",
    [
        b"-NOGROUP No such key or consumer group\r\n",
        b"*-1\r\n",
        b"+PONG\r\n",
        b"*3\r\n$3\r\n0-0\r\n*0\r\n*0\r\n",  # XAUTOCLAIM's
        b"*2\r\n*2\r\n$1\r\na\r\n*0\r\n*2\r\n$1\r\nb\r\n*0\r\n",  # two streams
    ],
)
def test_any_other_reply_is_given_back_whole(other: bytes) -> None:
    reply, rest = read(other + b":1\r\n", chunk=3)
    assert reply is None
    assert rest.startswith(other)


def test_bytes_that_are_not_resp_are_given_back_at_once() -> None:
    reader = _native.ReplyReader()
    assert reader.feed(b"?what\r\n", 7)
    assert reader.take() == (None, b"?what\r\n")
    # The reader starts afresh.
    assert not reader.feed(b"*1\r\n", 4)
    assert reader.feed(b":1\r\n", 4)
    with pytest.raises(ValueError):
        reader.feed(b"ab", 3)


def parsed(batch: _native.EntryBatch) -> tuple[object, ...]:
    return batch.records(), batch.rejects, batch.positions, batch.input_bytes


def test_parse_entries_reads_a_reply_as_its_entries_with_the_caps() -> None:
    entries = entries_fixture()
    reply, _ = read(resp2(b"s", entries))
    assert reply is not None
    for caps in ({}, {"max_fields": 3}, {"max_bytes": 60}):
        assert parsed(_native.parse_entries(reply, id_prefix="p:", **caps)) == parsed(
            _native.parse_entries(entries, id_prefix="p:", **caps)
        )


names = st.sampled_from([b"file_id", b"filename", b"key", b"path", b"size", b"storage", b"uploaded_at", b"x"])
values = st.one_of(
    st.sampled_from([UUID, b"a.txt", b"2024-05-01T12:00:00Z", b"12", b"s3"]), st.binary(max_size=12)
)
entry_strategy = st.tuples(
    st.integers(0, 2**44).map(lambda ms: b"%d-0" % ms),
    st.one_of(st.none(), st.lists(st.tuples(names, values), max_size=6)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(entry_strategy, max_size=12), st.integers(1, 64), st.booleans())
def test_arbitrary_replies_agree_with_their_entries(
    generated: list[tuple[bytes, list[tuple[bytes, bytes]] | None]], chunk: int, three: bool
) -> None:
    entries: list[Entry] = [(i, None if f is None else [x for pair in f for x in pair]) for i, f in generated]
    reply, rest = read((resp3 if three else resp2)(b"s", entries), chunk)
    assert reply is not None and rest == b""
    assert [reply[i] for i in range(len(reply))] == entries
    assert _native.entry_ids(reply) == _native.entry_ids(entries)
    assert parsed(_native.parse_entries(reply, max_bytes=80)) == parsed(
        _native.parse_entries(entries, max_bytes=80)
    )
