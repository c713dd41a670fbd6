"""The extension's entry parser: the contract's cases, and agreement with the
pure-Python reference on generated entries."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests import reference
from tests.support.gil import timed_with_free_share

from filepipe import _native
from filepipe.errors import EntryError

UUID = "0b7e2a4c-3c1d-4e4f-9a55-2d0c6a1b9e01"


def good(**extra: bytes) -> dict[bytes, bytes]:
    fields = {b"file_id": UUID.encode(), b"filename": b"report.pdf", b"key": b"2024/report.pdf"}
    fields.update({k.encode(): v for k, v in extra.items()})
    return fields


def parse(fields: dict[bytes, bytes] | None, entry_id: bytes = b"1700000000123-4") -> _native.EntryBatch:
    return _native.parse_entries([(entry_id, fields)])


def test_accepts_the_contract() -> None:
    b = parse(
        good(
            size=b"10",
            content_type=b"application/pdf",
            uploaded_at=b"2024-05-01T12:00:00.5+02:00",
            storage=b"s3",
            user=b"ann",
            path=b"other",
        )
    )
    assert len(b) == 1 and b.rejects == []
    (r,) = b.records()
    assert r == {
        "stream_id": "1700000000123-4",
        "event_time_us": 1_700_000_000_123_000,
        "file_id": UUID,
        "filename": "report.pdf",
        "storage": "s3",
        "key": "2024/report.pdf",
        "declared_size": 10,
        "content_type": "application/pdf",
        "uploaded_at_us": 1_714_557_600_500_000,
        "attributes": [("user", "ann"), ("path", "other")],
    }


def test_records_by_storage_in_record_order() -> None:
    b = _native.parse_entries(
        [
            (b"1-0", good()),
            (b"1-1", good(storage=b"s3")),
            (b"1-2", None),
            (b"1-3", good()),
            (b"1-4", good(storage=b"s3")),
        ]
    )
    assert b.by_storage() == [("local", [0, 2]), ("s3", [1, 3])]
    assert [m for m, _ in b.locations()] == ["local", "s3", "local", "s3"]
    assert _native.parse_entries([(b"1-0", good())], default_storage="s3").by_storage() == [("s3", [0])]
    assert _native.parse_entries([]).by_storage() == []


def test_entry_ids_names_every_entry_and_those_read_without_fields() -> None:
    entries: list[tuple[bytes, object]] = [
        (b"1-0", good()),
        (b"1-1", None),
        (b"1-2", {}),
        (b"1-3", [b"k", b"v"]),
    ]
    ids, gone = _native.entry_ids(entries)
    assert ids == [b"1-0", b"1-1", b"1-2", b"1-3"] and gone == [b"1-1", b"1-2"]
    assert ids[0] is entries[0][0]
    assert _native.entry_ids([[b"2-0", [b"k", b"v"]]]) == ([b"2-0"], [])
    with pytest.raises(EntryError, match="entry 1 must be an"):
        _native.entry_ids([(b"1-0", None), (b"1-1",)])  # type: ignore[list-item]


def test_path_is_the_seeds_name_for_key() -> None:
    fields = good()
    del fields[b"key"]
    fields[b"path"] = b"a/b.txt"
    (r,) = parse(fields).records()
    assert r["key"] == "a/b.txt" and r["attributes"] == []


def test_defaults() -> None:
    (r,) = _native.parse_entries([(b"5-0", good())], default_storage="s3").records()
    assert r["storage"] == "s3"
    assert r["uploaded_at_us"] == r["event_time_us"] == 5000
    assert r["content_type"] is None and r["declared_size"] is None


@pytest.mark.parametrize(
    ("fields", "reason", "mentions"),
    [
        ({b"filename": b"a", b"key": b"a"}, "missing_field", "file_id"),
        ({b"file_id": UUID.encode(), b"key": b"a"}, "missing_field", "filename"),
        ({b"file_id": UUID.encode(), b"filename": b"a"}, "missing_field", "key"),
        (good(file_id=b"not-a-uuid"), "bad_uuid", "file_id"),
        (good(uploaded_at=b"2024-02-30T00:00:00Z"), "bad_timestamp", "uploaded_at"),
        (good(uploaded_at=b"yesterday"), "bad_timestamp", "uploaded_at"),
        (good(filename=b"caf\xe9"), "not_utf8", "filename"),
        (good(filename=b"a\x00b"), "nul_byte", "filename"),
        (good(user=b"x\x00"), "nul_byte", "user"),
        (good(key=b"/etc/passwd"), "unsafe_key", "key"),
        (good(key=b"a/../../etc/passwd"), "unsafe_key", "key"),
        (good(key=b".."), "unsafe_key", "key"),
        (good(key=b"a\\..\\b"), "unsafe_key", "key"),
        (good(key=b""), "unsafe_key", "key"),
        (good(size=b"-1"), "bad_size", "size"),
        (good(size=b"12kb"), "bad_size", "size"),
        (good(storage=b"ftp"), "bad_storage", "storage"),
        (good(content_type=b"pdf"), "bad_content_type", "content_type"),
        (good(filename=b"x" * 4097), "too_long", "filename"),
    ],
)
def test_rejects_with_a_stable_reason_naming_entry_and_field(
    fields: dict[bytes, bytes], reason: str, mentions: str
) -> None:
    b = parse(fields)
    assert len(b) == 0
    ((pos, entry_id, got, message),) = b.rejects
    assert (pos, entry_id, got) == (0, "1700000000123-4", reason)
    assert message.startswith("entry 1700000000123-4: ") and mentions in message


def test_a_bad_entry_id_and_a_deleted_entry_are_rejects() -> None:
    b = _native.parse_entries([(b"nope", good()), (b"1-1", None), (b"2-0", good())])
    assert [(p, r) for p, _, r, _ in b.rejects] == [(0, "bad_entry_id"), (1, "missing_field")]
    assert b.positions == [2]


def test_rejects_do_not_disturb_the_rest_of_the_batch() -> None:
    entries = [(f"{i}-0".encode(), good() if i % 3 else good(file_id=b"x")) for i in range(1, 31)]
    b = _native.parse_entries(entries)
    assert len(b) == 20 and len(b.rejects) == 10
    assert [r["stream_id"] for r in b.records()] == [f"{i}-0" for i in range(1, 31) if i % 3]


def test_accepts_str_and_flat_lists() -> None:
    b = _native.parse_entries(
        [
            ("9-0", {"file_id": UUID, "filename": "n", "key": "k"}),
            (b"9-1", [b"file_id", UUID.encode(), b"filename", b"n", b"key", b"k"]),
        ]
    )
    assert len(b) == 2


def test_malformed_batches_raise_entry_error() -> None:
    with pytest.raises(EntryError):
        _native.parse_entries([b"just-an-id"])
    with pytest.raises(EntryError):
        _native.parse_entries([(b"1-0", 42)])
    with pytest.raises(EntryError):
        _native.parse_entries([(b"1-0", [b"odd"])])
    with pytest.raises(ValueError):
        _native.parse_entries([], default_storage="ftp")


def test_id_prefix_names_partitioned_streams() -> None:
    (r,) = _native.parse_entries([(b"7-1", good())], id_prefix="{3}/").records()
    assert r["stream_id"] == "{3}/7-1"


def test_uuid_forms_are_normalised() -> None:
    for form in (UUID.upper(), UUID.replace("-", ""), "{" + UUID + "}"):
        (r,) = parse(good(file_id=form.encode())).records()
        assert r["file_id"] == UUID


# -- differential: the extension agrees with the reference on generated entries --------------

_field_names = st.sampled_from(
    [
        b"file_id",
        b"filename",
        b"key",
        b"path",
        b"size",
        b"content_type",
        b"uploaded_at",
        b"storage",
        b"user",
        b"note",
    ]
)
_texts = st.text(max_size=40).map(str.encode)
_values = st.one_of(
    _texts,
    st.binary(max_size=12),
    st.uuids().map(lambda u: str(u).encode()),
    st.sampled_from(
        [
            b"local",
            b"s3",
            b"..",
            b"a/../b",
            b"/abs",
            b"0",
            b"-1",
            b"123",
            b"text/plain",
            b"2024-05-01T12:00:00Z",
            b"2024-05-01 12:00:00.123456789+05:30",
            b"1970-01-01T00:00:00z",
        ]
    ),
    st.datetimes().map(lambda d: d.isoformat().encode() + b"Z"),
)


@st.composite
def entries(draw: st.DrawFn) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    out: list[tuple[bytes, dict[bytes, bytes] | None]] = []
    for _ in range(draw(st.integers(0, 8))):
        ms = draw(st.integers(0, 2**45))
        entry_id = draw(st.one_of(st.just(f"{ms}-{draw(st.integers(0, 9))}".encode()), st.binary(max_size=6)))
        base = {
            b"file_id": str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))).encode(),
            b"filename": draw(_texts),
            b"key": draw(_texts),
        }
        extra = draw(st.dictionaries(_field_names, _values, max_size=5))
        drop = draw(st.sets(st.sampled_from([b"file_id", b"filename", b"key"]), max_size=1))
        fields = {k: v for k, v in {**base, **extra}.items() if k not in drop}
        out.append((entry_id, draw(st.one_of(st.just(fields), st.just(fields), st.none()))))
    return out


@settings(max_examples=400, deadline=None)
@given(entries(), st.sampled_from(["local", "s3"]))
def test_parser_agrees_with_reference(
    batch: list[tuple[bytes, dict[bytes, bytes] | None]], storage: str
) -> None:
    native = _native.parse_entries(batch, default_storage=storage)
    ref = reference.parse_entries(batch, default_storage=storage)
    assert native.records() == ref.records
    assert native.positions == ref.positions
    assert [(p, i, r) for p, i, r, _ in native.rejects] == [(p, i, r) for p, i, r, _ in ref.rejects]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=40))
def test_timestamp_parser_agrees_with_reference(text: str) -> None:
    entry = (b"1-0", good(uploaded_at=text.encode()))
    native = _native.parse_entries([entry]).records()
    ref = reference.parse_entries([entry]).records
    assert native == ref


# -- caps on fields and bytes, the batch's input size, wide entries -----------------------------


def size_of(entry_id: bytes, fields: dict[bytes, bytes]) -> int:
    return len(entry_id) + sum(len(k) + len(v) for k, v in fields.items())


def test_an_entry_over_the_field_cap_is_rejected_naming_its_count_and_the_setting() -> None:
    wide = good(**{f"a{i}": b"v" for i in range(10)})  # 13 fields
    b = _native.parse_entries([(b"1-0", wide), (b"2-0", good())], max_fields=12)
    ((pos, entry_id, reason, message),) = b.rejects
    assert (pos, entry_id, reason) == (0, "1-0", "too_many_fields")
    assert message == "entry 1-0: has 13 fields, more than FILEPIPE_MAX_ENTRY_FIELDS=12"
    assert b.positions == [1]
    assert len(_native.parse_entries([(b"1-0", wide)], max_fields=13)) == 1  # at the cap: accepted


def test_an_entry_over_the_byte_cap_is_rejected_naming_its_size_and_the_setting() -> None:
    fields = good(note=b"x" * 1000)
    size = size_of(b"1-0", fields)
    assert len(_native.parse_entries([(b"1-0", fields)], max_bytes=size)) == 1
    ((_, _, reason, message),) = _native.parse_entries([(b"1-0", fields)], max_bytes=size - 1).rejects
    assert reason == "entry_too_large"
    assert message == (
        f"entry 1-0: is {size} bytes (id, field names and values), "
        f"more than FILEPIPE_MAX_ENTRY_BYTES={size - 1}"
    )
    # The cap is on the entry's bytes as Redis holds them, whatever their kind: a flat list too.
    flat = [x for kv in fields.items() for x in kv]
    assert _native.parse_entries([(b"1-0", flat)], max_bytes=size - 1).rejects[0][2] == "entry_too_large"


def test_input_bytes_counts_every_input_entry() -> None:
    wide = good(**{f"a{i}": b"v" * i for i in range(20)})
    entries: list[tuple[bytes, dict[bytes, bytes] | None]] = [
        (b"1-0", good()),
        (b"2-0", None),
        (b"nope", good()),
        (b"3-0", wide),
        (b"4-0", good(note=b"y" * 500)),
    ]
    expected = sum(size_of(i, f) if f is not None else len(i) for i, f in entries)
    for caps in ({}, {"max_fields": 10}, {"max_bytes": 300}):
        native = _native.parse_entries(entries, **caps)
        assert native.input_bytes == expected == reference.parse_entries(entries, **caps).input_bytes
    assert _native.parse_entries([]).input_bytes == 0


def test_a_wide_entry_is_parsed_with_the_gil_released() -> None:
    """200,000 fields (names repeating, as a flat RESP list can): the parse is linear and
    runs without the GIL, so the consumer's other threads (heartbeat, loaders,
    acknowledger, /healthz) keep running meanwhile. Only copying the entry out of its
    Python objects holds the GIL."""
    flat = [b"file_id", UUID.encode(), b"filename", b"a", b"key", b"a"]
    for i in range(200_000):
        flat += [b"attr_%d" % (i % 150_000), b"v%d" % i]
    result: list[_native.EntryBatch] = []
    share = max(
        timed_with_free_share(lambda: result.append(_native.parse_entries([(b"1-0", flat)])))[1]
        for _ in range(3)
    )
    assert share > 0.5, f"another thread ran during only {share:.0%} of the parse"
    (record,) = result[0].records()
    attributes = record["attributes"]
    assert len(attributes) == 150_000
    assert attributes[0] == ("attr_0", "v150000") and attributes[-1] == ("attr_149999", "v149999")


# -- property: arbitrary field sets agree with the reference ----------------------------------

_any_name = st.one_of(
    _field_names,
    st.binary(max_size=8),  # non-UTF-8, NUL, empty
    st.text(max_size=8).map(str.encode),
    st.sampled_from([b"a\x00", b"\xff", b"\xc3(", b"", b"attr"]),
)
_any_value = st.one_of(
    _values, st.binary(max_size=20), st.sampled_from([b"\x00", b"x\x00y", b"\xed\xa0\x80"])
)


@st.composite
def field_sets(draw: st.DrawFn) -> list[bytes]:
    """A flat [name, value, …] list: any names and values, names repeating, sometimes a
    required field missing, sometimes a few fields repeated many times over."""
    flat: list[bytes] = []
    if draw(st.booleans()):
        flat += [b"file_id", draw(st.uuids()).hex.encode(), b"filename", b"f", b"key", b"k"]
    pairs = draw(st.lists(st.tuples(_any_name, _any_value), max_size=12))
    repeat = draw(st.sampled_from([1, 1, 1, 50, 400]))
    for name, value in pairs * repeat:
        flat += [name, value]
    if draw(st.booleans()):
        flat += [b"file_id", draw(st.uuids()).hex.encode(), b"filename", b"g", b"key", b"j"]
    return flat


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([b"1-0", b"2-5", b"7-x", b"17000000-1"]), field_sets()), max_size=5),
    st.one_of(st.none(), st.integers(3, 500)),
    st.one_of(st.none(), st.integers(40, 20_000)),
)
def test_arbitrary_field_sets_agree_with_reference(
    batch: list[tuple[bytes, list[bytes]]], max_fields: int | None, max_bytes: int | None
) -> None:
    native = _native.parse_entries(batch, max_fields=max_fields, max_bytes=max_bytes)
    ref = reference.parse_entries(batch, max_fields=max_fields, max_bytes=max_bytes)
    assert native.records() == ref.records
    assert native.positions == ref.positions
    assert [(p, i, r) for p, i, r, _ in native.rejects] == [(p, i, r) for p, i, r, _ in ref.rejects]
    assert native.input_bytes == ref.input_bytes
