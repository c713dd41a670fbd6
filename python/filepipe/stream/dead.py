"""Dead letters: what the dead-letter stream holds of a rejected entry."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from .. import _native
from .. import constants as c
from .read import Fields

# Every reason a dead letter can give: the extension's one registry of them.
REASON_CODES: frozenset[str] = frozenset(_native.reason_codes())


@dataclass(frozen=True)
class DeadLetter:
    """A rejected entry on its way to the dead-letter stream."""

    source_id: bytes
    fields: Fields
    reason: str
    error: str
    deliveries: int = 1

    def __post_init__(self) -> None:
        if self.reason not in REASON_CODES:
            raise ValueError(f"unknown reason code {self.reason!r}: add it to rust/error.rs")

    def size(self) -> int:
        """About how many bytes it holds."""
        return 64 + len(self.error) + sum(len(k) + len(v) for k, v in self.fields.items())


# A dead letter is the entry's own fields, exactly as they were (names, values, order),
# followed by the fields the consumer adds. The first added one, `original_fields`, says
# how many fields came before it: it sits at that very position, which is how a reader
# tells it from an entry field of the same name. Whatever names the entry used (`error`,
# `reason`, `orig_x`, `original_fields`), its fields come back byte for byte; a reader by
# name (a dict of the fields) sees the added values, which come last.
ORIGINAL_FIELDS = b"original_fields"
# Added by consumers before this version when a dead letter could not keep every field
# of its entry: such a dead letter cannot be replayed faithfully.
FIELDS_DROPPED = b"fields_dropped"
# Added after `source_id` when a dead letter holds an excerpt of its entry, not the entry
# itself: a JSON object saying what was cut (see `excerpt`). Such a dead letter cannot be
# replayed faithfully.
TRUNCATED_FIELD = b"truncated"
INCOMPLETE_MARKERS = (FIELDS_DROPPED, TRUNCATED_FIELD)
# The event contract's fields, kept first in an excerpt: they say which upload it was.
_CONTRACT_FIELDS = (
    b"file_id",
    b"filename",
    b"key",
    b"path",
    b"size",
    b"content_type",
    b"uploaded_at",
    b"storage",
)
# How many cut fields the `truncated` field names, and how much of each name it shows.
_CUT_LISTED = 100
_CUT_NAME_CHARS = 64


def dead_letter_fields(
    d: DeadLetter,
    consumer: str,
    max_fields: int = c.DEAD_LETTER_MAX_FIELDS,
    max_bytes: int = c.DEAD_LETTER_MAX_BYTES,
) -> list[tuple[bytes, bytes]]:
    """The dead letter's fields: the entry's own, then `original_fields`, error, reason,
    consumer, deliveries and source_id. Of an entry over `max_fields` fields or
    `max_bytes` bytes (the consumer's caps on entries), an excerpt of its fields, and
    `truncated` (see `excerpt`)."""
    kept, truncated = excerpt(d.fields, max_fields, max_bytes)
    original = list(kept.items())
    added = [
        (b"error", d.error.encode()),
        (b"reason", d.reason.encode()),
        (b"consumer", consumer.encode()),
        (b"deliveries", str(d.deliveries).encode()),
        (b"source_id", d.source_id),
    ]
    if truncated is not None:
        added.append((TRUNCATED_FIELD, truncated))
    return [*original, (ORIGINAL_FIELDS, str(len(original)).encode()), *added]


def excerpt(
    fields: Fields,
    max_fields: int = c.DEAD_LETTER_MAX_FIELDS,
    max_bytes: int = c.DEAD_LETTER_MAX_BYTES,
) -> tuple[Fields, bytes | None]:
    """The fields a dead letter keeps of an entry, and the value of its `truncated` field
    (None: the entry is kept whole).

    An entry of at most `max_fields` fields and `max_bytes` bytes of names and values is
    kept whole: given the consumer's caps on entries (FILEPIPE_MAX_ENTRY_FIELDS and
    FILEPIPE_MAX_ENTRY_BYTES, which also count the id), every entry the consumer admitted.
    A larger one is excerpted, so that one hostile entry cannot double its memory in the
    dead-letter stream: the contract's fields first, then the others in entry order, each
    name or value longer than DEAD_LETTER_EXCERPT_BYTES cut to its first bytes and marked
    `…(cut: <size> bytes)`, until either bound is reached.
    `truncated` is a JSON object: the entry's `fields` and `bytes`, how many fields were
    `kept`, and `cut`: [name, original size] of the first values (or names) cut."""
    count = len(fields)
    size = sum(len(k) + len(v) for k, v in fields.items())
    if count <= max_fields and size <= max_bytes:
        return fields, None
    first = [k for k in _CONTRACT_FIELDS if k in fields]
    # Only as many of the other fields are looked at as can be kept.
    others = (k for k in fields if k not in _CONTRACT_FIELDS)
    names = [*first, *itertools.islice(others, max(0, max_fields - len(first)))]
    kept: Fields = {}
    cut: list[tuple[str, int]] = []
    used = cut_count = 0
    for name in names:
        value = fields[name]
        short_name, short_value = _cut(name), _cut(value)
        if used + len(short_name) + len(short_value) > max_bytes:
            break
        kept[short_name] = short_value
        used += len(short_name) + len(short_value)
        for original, short in ((name, short_name), (value, short_value)):
            if short is not original:
                cut_count += 1
                if len(cut) < _CUT_LISTED:
                    label = name.decode("utf-8", "backslashreplace")[:_CUT_NAME_CHARS]
                    cut.append((label, len(original)))
    marker = {"fields": count, "bytes": size, "kept": len(kept), "cut": cut, "cut_count": cut_count}
    return kept, json.dumps(marker, ensure_ascii=False).encode()


def _cut(value: bytes) -> bytes:
    """`value`, or its first DEAD_LETTER_EXCERPT_BYTES bytes (at a UTF-8 character boundary
    when it is text) marked as cut."""
    if len(value) <= c.DEAD_LETTER_EXCERPT_BYTES:
        return value
    end = c.DEAD_LETTER_EXCERPT_BYTES
    # Not inside a UTF-8 character (at most 3 continuation bytes follow its first).
    while end > c.DEAD_LETTER_EXCERPT_BYTES - 3 and value[end] & 0xC0 == 0x80:
        end -= 1
    return value[:end] + f"…(cut: {len(value)} bytes)".encode()
