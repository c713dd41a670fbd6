"""A dead letter holds its entry whole up to the default caps on entries; a larger entry's
dead letter holds a bounded excerpt, marked by one `truncated` field that says what was cut."""

from __future__ import annotations

import json

from filepipe import constants as c
from filepipe.stream import ORIGINAL_FIELDS, TRUNCATED_FIELD, DeadLetter, dead_letter_fields, excerpt

CONTRACT = {b"file_id": b"0b7e2a4c-3c1d-4e4f-9a55-2d0c6a1b9e01", b"filename": b"a.txt", b"key": b"a.txt"}


def size(fields: dict[bytes, bytes]) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


def split(d: DeadLetter) -> tuple[list[tuple[bytes, bytes]], dict[bytes, bytes]]:
    """(the entry's fields as the dead letter holds them, the fields the consumer added)."""
    pairs = dead_letter_fields(d, "c")
    at = max(i for i, (k, v) in enumerate(pairs) if k == ORIGINAL_FIELDS and v == str(i).encode())
    return pairs[:at], dict(pairs[at + 1 :])


def test_an_entry_within_the_bounds_is_kept_whole() -> None:
    fields = {**CONTRACT, **{b"a%d" % i: b"v" for i in range(c.DEAD_LETTER_MAX_FIELDS - 4)}}
    fields[b"big"] = b"x" * (c.DEAD_LETTER_MAX_BYTES - size(fields) - 3)
    assert len(fields) == c.DEAD_LETTER_MAX_FIELDS and size(fields) == c.DEAD_LETTER_MAX_BYTES
    kept, truncated = excerpt(fields)
    assert kept is fields and truncated is None
    own, added = split(DeadLetter(b"1-0", fields, "missing", "gone"))
    assert TRUNCATED_FIELD not in added and own == list(fields.items())


def test_a_million_fields_make_a_bounded_dead_letter_naming_what_was_cut() -> None:
    fields = {b"attr_%d" % i: b"v" for i in range(1_000_000)}
    fields.update(CONTRACT)  # last in the entry: still kept, and first
    own, added = split(DeadLetter(b"1-0", fields, "too_many_fields", "too many"))
    assert len(own) == c.DEAD_LETTER_MAX_FIELDS
    assert own[:3] == list(CONTRACT.items())
    assert own[3] == (b"attr_0", b"v") and (b"attr_999999", b"v") not in own
    marker = json.loads(added[TRUNCATED_FIELD])
    assert marker == {
        "fields": 1_000_003,
        "bytes": size(fields),
        "kept": c.DEAD_LETTER_MAX_FIELDS,
        "cut": [],
        "cut_count": 0,
    }


def test_an_oversized_value_is_cut_to_a_marked_excerpt() -> None:
    huge = "é".encode() * (c.DEAD_LETTER_MAX_BYTES // 2 + 7)  # 2-byte characters, over the bound
    fields = {**CONTRACT, b"photo": huge, b"note": b"small", b"n" * 5000: b"named"}
    own, added = split(DeadLetter(b"1-0", fields, "entry_too_large", "too big"))
    letter = dict(own)
    photo = letter[b"photo"]
    head, _, tail = photo.partition("…".encode())
    assert (
        head == huge[: len(head)]
        and c.DEAD_LETTER_EXCERPT_BYTES - 3 <= len(head) <= c.DEAD_LETTER_EXCERPT_BYTES
    )
    head.decode()  # cut between characters
    assert tail == f"(cut: {len(huge)} bytes)".encode()
    assert letter[b"note"] == b"small"
    long_name = [k for k in letter if k.startswith(b"nnn")]
    assert len(long_name) == 1 and len(long_name[0]) < 1100 and letter[long_name[0]] == b"named"
    marker = json.loads(added[TRUNCATED_FIELD])
    assert marker["fields"] == 6 and marker["kept"] == 6 and marker["bytes"] == size(fields)
    assert marker["cut"] == [["photo", len(huge)], ["n" * 64, 5000]] and marker["cut_count"] == 2
    assert size(letter) < 4 * c.DEAD_LETTER_EXCERPT_BYTES


def test_many_large_values_stop_at_the_byte_bound() -> None:
    fields = {**CONTRACT, **{b"f%d" % i: b"y" * 3000 for i in range(900)}}
    kept, truncated = excerpt(fields)
    assert truncated is not None
    assert size(kept) <= c.DEAD_LETTER_MAX_BYTES < size(fields)
    marker = json.loads(truncated)
    assert marker["kept"] == len(kept) < 904 and marker["cut_count"] == len(kept) - 3
    assert len(marker["cut"]) == 100  # the first hundred are named


def test_an_entry_field_named_like_the_marker_is_the_entrys() -> None:
    own, added = split(DeadLetter(b"1-0", {**CONTRACT, b"truncated": b"mine"}, "missing", "gone"))
    assert TRUNCATED_FIELD not in added and own[-1] == (b"truncated", b"mine")


def test_the_bounds_follow_the_consumers_caps() -> None:
    """With the caps raised, what they admit is kept whole; what is over them, an excerpt
    within them."""
    fields = {**CONTRACT, **{b"a%d" % i: b"v" * 600 for i in range(4_997)}}
    assert excerpt(fields) != (fields, None)
    kept, truncated = excerpt(fields, 5_000, 4 << 20)
    assert kept is fields and truncated is None
    kept, truncated = excerpt(fields, 3_000, 4 << 20)
    assert truncated is not None and len(kept) == 3_000 and list(kept)[:3] == list(CONTRACT)
    kept, truncated = excerpt(fields, 5_000, 1 << 20)
    assert truncated is not None and size(kept) <= 1 << 20 < size(fields)
