"""A pure-Python reference of the extension's parse and encode functions.

Written from the event contract, independently of the Rust code, it is what the
extension is tested against (differentially, on generated input) and the baseline
the benches measure it against. Same inputs, same outputs: the accepted records,
the rejects' positions and reason codes, and the COPY buffer byte for byte."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

MAX_NAME_BYTES = 4096
MAX_CONTENT_TYPE_BYTES = 255
MAX_US = 253_402_300_799_999_999
MIN_US = -62_135_596_800_000_000
PG_EPOCH_OFFSET_US = 946_684_800_000_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

_ID = re.compile(rb"([0-9]{1,20})-([0-9]{1,20})")
_UUID_HYPHENATED = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_UUID_PLAIN = re.compile(r"[0-9a-fA-F]{32}")
_TS = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_TOKEN = re.compile(r"[A-Za-z0-9!#$&^_.+\-]+")
_KNOWN = ("file_id", "filename", "key", "path", "size", "content_type", "uploaded_at", "storage")


@dataclass
class RefBatch:
    records: list[dict[str, Any]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rejects: list[tuple[int, str, str, str]] = field(default_factory=list)
    input_bytes: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def locations(self) -> list[tuple[str, str]]:
        return [(r["storage"], r["key"]) for r in self.records]


class _Reject(Exception):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message


def _days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
    return 30 if m in (4, 6, 9, 11) else 31


def parse_rfc3339(s: str) -> int | None:
    m = _TS.fullmatch(s)
    if not m:
        return None
    y, mo, d, h, mi, sec = (int(m.group(i)) for i in range(1, 7))
    if y < 1 or not 1 <= mo <= 12 or not 1 <= d <= _days_in_month(y, mo) or h > 23 or mi > 59 or sec > 59:
        return None
    frac = (m.group(7) or "")[:6].ljust(6, "0")
    off = m.group(8)
    offset_s = 0
    if off not in ("Z", "z"):
        oh, om = int(off[1:3]), int(off[4:6])
        if oh > 23 or om > 59:
            return None
        offset_s = (oh * 3600 + om * 60) * (-1 if off[0] == "-" else 1)
    days = date(y, mo, d).toordinal() - _EPOCH_ORDINAL
    us = (days * 86400 + h * 3600 + mi * 60 + sec - offset_s) * 1_000_000 + int(frac)
    return us if MIN_US <= us <= MAX_US else None


def _uuid(s: str) -> str | None:
    if len(s) == 38 and s[0] == "{" and s[-1] == "}":
        s = s[1:-1]
    if _UUID_HYPHENATED.fullmatch(s) or _UUID_PLAIN.fullmatch(s):
        h = s.replace("-", "").lower()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return None


def _content_type_ok(s: str) -> bool:
    if "/" not in s or not all(0x20 <= ord(ch) < 0x7F for ch in s):
        return False
    kind, rest = s.split("/", 1)
    subtype = rest.split(";", 1)[0].rstrip(" ")
    return bool(_TOKEN.fullmatch(kind)) and bool(_TOKEN.fullmatch(subtype))


def _key_problem(key: str) -> str | None:
    if not key:
        return "is empty"
    if key[0] in "/\\":
        return "is absolute"
    if ".." in re.split(r"[/\\]", key):
        return "climbs out of the storage root with '..'"
    return None


def _b(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def parse_entry(
    entry_id: bytes, fields: Sequence[tuple[bytes, bytes]], default_storage: str, prefix: str
) -> dict[str, Any]:
    eid = entry_id.decode("utf-8", "replace")
    m = _ID.fullmatch(entry_id)
    if not m or int(m.group(1)) >= 2**64 or int(m.group(2)) >= 2**64 or int(m.group(1)) * 1000 > MAX_US:
        raise _Reject("bad_entry_id", "id is not a stream entry id")
    values: dict[str, str] = {}
    attributes: dict[str, str] = {}
    for name_b, value_b in fields:
        try:
            name = name_b.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject("not_utf8", "field name is not UTF-8") from None
        if "\0" in name:
            raise _Reject("nul_byte", "field name contains a NUL byte")
        try:
            text = value_b.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject("not_utf8", f"field '{name}' is not UTF-8") from None
        if "\0" in text:
            raise _Reject("nul_byte", f"field '{name}' contains a NUL byte")
        if name in _KNOWN:
            values[name] = text
        else:
            attributes[name] = text
    if "key" in values and "path" in values:
        attributes["path"] = values["path"]
        key = values["key"]
    elif "key" in values or "path" in values:
        key = values.get("key", values.get("path", ""))
    else:
        raise _Reject("missing_field", "required field 'key' (or 'path') is missing")
    if "file_id" not in values:
        raise _Reject("missing_field", "required field 'file_id' is missing")
    if "filename" not in values:
        raise _Reject("missing_field", "required field 'filename' is missing")
    file_id = _uuid(values["file_id"])
    if file_id is None:
        raise _Reject("bad_uuid", "field 'file_id' is not a UUID")
    filename = values["filename"]
    if not filename:
        raise _Reject("missing_field", "field 'filename' is empty")
    if len(filename.encode()) > MAX_NAME_BYTES:
        raise _Reject("too_long", "field 'filename' is too long")
    if len(key.encode()) > MAX_NAME_BYTES:
        raise _Reject("too_long", "field 'key' is too long")
    if _key_problem(key):
        raise _Reject("unsafe_key", f"field 'key' {_key_problem(key)}")
    size = values.get("size")
    declared_size = None
    if size is not None:
        if not re.fullmatch(r"[0-9]+", size) or int(size) > 2**63 - 1:
            raise _Reject("bad_size", "field 'size' is not a non-negative integer")
        declared_size = int(size)
    ct = values.get("content_type") or None
    if ct is not None and not (len(ct) <= MAX_CONTENT_TYPE_BYTES and _content_type_ok(ct)):
        raise _Reject("bad_content_type", "field 'content_type' is not a media type")
    event_us = int(m.group(1)) * 1000
    uploaded = values.get("uploaded_at") or ""
    if uploaded:
        uploaded_us = parse_rfc3339(uploaded)
        if uploaded_us is None:
            raise _Reject("bad_timestamp", "field 'uploaded_at' is not an RFC 3339 timestamp")
    else:
        uploaded_us = event_us
    storage = values.get("storage") or default_storage
    if storage not in ("local", "s3"):
        raise _Reject("bad_storage", "field 'storage' must be 'local' or 's3'")
    return {
        "stream_id": prefix + eid,
        "event_time_us": event_us,
        "file_id": file_id,
        "filename": filename,
        "storage": storage,
        "key": key,
        "declared_size": declared_size,
        "content_type": ct,
        "uploaded_at_us": uploaded_us,
        "attributes": list(attributes.items()),
    }


def parse_entries(
    entries: Iterable[tuple[bytes | str, Mapping[bytes, bytes] | Sequence[bytes] | None]],
    default_storage: str = "local",
    id_prefix: str = "",
    max_fields: int | None = None,
    max_bytes: int | None = None,
) -> RefBatch:
    batch = RefBatch()
    for pos, (entry_id, fields) in enumerate(entries):
        eid = _b(entry_id)
        batch.input_bytes += len(eid)
        if fields is None:
            batch.rejects.append((pos, eid.decode("utf-8", "replace"), "missing_field", "was deleted"))
            continue
        if isinstance(fields, Mapping):
            pairs = [(_b(k), _b(v)) for k, v in fields.items()]
        else:  # a flat [name, value, …] list, as RESP sends it: names may repeat
            it = iter(fields)
            pairs = [(_b(k), _b(v)) for k, v in zip(it, it, strict=True)]
        size = sum(len(k) + len(v) for k, v in pairs)
        batch.input_bytes += size
        if max_fields is not None and len(pairs) > max_fields:
            batch.rejects.append((pos, eid.decode("utf-8", "replace"), "too_many_fields", "too many fields"))
            continue
        if max_bytes is not None and len(eid) + size > max_bytes:
            batch.rejects.append((pos, eid.decode("utf-8", "replace"), "entry_too_large", "too many bytes"))
            continue
        try:
            record = parse_entry(eid, pairs, default_storage, id_prefix)
        except _Reject as r:
            batch.rejects.append((pos, eid.decode("utf-8", "replace"), r.reason, r.message))
            continue
        batch.records.append(record)
        batch.positions.append(pos)
    return batch


# -- encoding ---------------------------------------------------------------------------------

_TEXT_ESCAPES = {
    ord("\\"): "\\\\",
    8: "\\b",
    12: "\\f",
    10: "\\n",
    13: "\\r",
    9: "\\t",
    11: "\\v",
}


def escape_text(s: str) -> str:
    return s.translate(_TEXT_ESCAPES)


def format_timestamp(us: int) -> str:
    secs, frac = divmod(us, 1_000_000)
    days, sod = divmod(secs, 86400)
    d = date.fromordinal(days + _EPOCH_ORDINAL)
    out = f"{d.year:04d}-{d.month:02d}-{d.day:02d} {sod // 3600:02d}:{sod // 60 % 60:02d}:{sod % 60:02d}"
    if frac:
        out += "." + f"{frac:06d}".rstrip("0")
    return out + "+00"


def attributes_json(attributes: list[tuple[str, str]]) -> str:
    return json.dumps(dict(attributes), ensure_ascii=False)


def _row_values(r: dict[str, Any], m: tuple[int, bytes, str | None], consumer: str, stream: str) -> list[Any]:
    size, digest, sniffed = m
    return [
        r["event_time_us"],
        stream,
        r["stream_id"],
        r["file_id"],
        r["filename"],
        r["storage"],
        r["key"],
        size,
        digest.hex(),
        r["content_type"] or sniffed,
        r["uploaded_at_us"],
        consumer,
        attributes_json(r["attributes"]),
    ]


def encode_text_row(values: list[Any]) -> bytes:
    (event, stream, sid, fid, fname, storage, key, size, digest, ct, uploaded, consumer, attrs) = values
    cols = [
        format_timestamp(event),
        escape_text(stream),
        escape_text(sid),
        fid,
        escape_text(fname),
        storage,
        escape_text(key),
        str(size),
        digest,
        "\\N" if ct is None else escape_text(ct),
        format_timestamp(uploaded),
        escape_text(consumer),
        escape_text(attrs),
    ]
    return ("\t".join(cols) + "\n").encode()


def encode_binary_row(values: list[Any]) -> bytes:
    (event, stream, sid, fid, fname, storage, key, size, digest, ct, uploaded, consumer, attrs) = values

    def f(b: bytes) -> bytes:
        return struct.pack(">i", len(b)) + b

    parts = [
        struct.pack(">h", 13),
        f(struct.pack(">q", event - PG_EPOCH_OFFSET_US)),
        f(stream.encode()),
        f(sid.encode()),
        f(bytes.fromhex(fid.replace("-", ""))),
        f(fname.encode()),
        f(storage.encode()),
        f(key.encode()),
        f(struct.pack(">q", size)),
        f(digest.encode()),
        struct.pack(">i", -1) if ct is None else f(ct.encode()),
        f(struct.pack(">q", uploaded - PG_EPOCH_OFFSET_US)),
        f(consumer.encode()),
        f(b"\x01" + attrs.encode()),
    ]
    return b"".join(parts)


def encode_copy(
    batch: RefBatch,
    measurements: Sequence[tuple[int, bytes, str | None] | None],
    consumer: str,
    binary: bool = True,
    only: Sequence[int] | None = None,
    *,
    stream: str,
) -> bytes:
    out = [b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)] if binary else []
    for i in range(len(batch.records)) if only is None else only:
        m = measurements[i]
        if m is None:
            continue
        values = _row_values(batch.records[i], m, consumer, stream)
        out.append(encode_binary_row(values) if binary else encode_text_row(values))
    if binary:
        out.append(struct.pack(">h", -1))
    return b"".join(out)
