"""The dead-letter stream: list what is there, replay it after a fix, purge it."""

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from .config import Settings
from .constants import SAMPLE_PAGE_BYTES
from .observe.text import entries
from .partitions import Partition
from .stream import (
    FIELDS_DROPPED,
    INCOMPLETE_MARKERS,
    ORIGINAL_FIELDS,
    TRUNCATED_FIELD,
    ReadSize,
    entries_bytes,
    id_key,
    read_pages,
)

CHUNK = 500
# What consumers before `original_fields` added, renaming an entry field of the same name
# to `orig_<name>`; `fields_dropped` was then the very last field when there was one.
_OLD_ADDED = (b"error", b"reason", b"consumer", b"deliveries", b"source_id")
# XRANGE as the server sends it: redis-py's own reply is a dict, which keeps one value per
# name, and an entry may have a field named like one the consumer adds.
_RANGE_SCRIPT = "return redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])"

Pairs = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class DeadLetterEntry:
    id: bytes
    pairs: Pairs

    @property
    def fields(self) -> dict[bytes, bytes]:
        """The fields by name: where the entry had a field named like one the consumer
        adds, the consumer's (it comes last)."""
        return dict(self.pairs)

    @property
    def reason(self) -> str:
        return self.fields.get(b"reason", b"unknown").decode(errors="replace")

    def _split(self) -> tuple[Pairs, Pairs] | None:
        """(the entry's fields, the added ones) of a dead letter that says where they
        part (`original_fields` at the position it names), None for an older one."""
        for i in range(len(self.pairs) - 1, -1, -1):
            name, value = self.pairs[i]
            if name == ORIGINAL_FIELDS and value == str(i).encode():
                return self.pairs[:i], self.pairs[i + 1 :]
        return None

    def original(self) -> Pairs:
        """The entry's own fields, as they were when it was rejected: byte for byte, in
        their order. From a dead letter written before `original_fields` existed, as well
        as can be told: the consumer's fields are left out and `orig_<name>` (for error,
        reason, consumer, deliveries, source_id) is taken back to `<name>`, so an entry
        field that was itself named `orig_error` comes back as `error`."""
        split = self._split()
        if split is not None:
            return split[0]
        pairs = self.pairs[:-1] if self.pairs and self.pairs[-1][0] == FIELDS_DROPPED else self.pairs
        out: Pairs = []
        for name, value in pairs:
            if name in _OLD_ADDED:
                continue
            if name.startswith(b"orig_") and name[5:] in _OLD_ADDED:
                name = name[5:]
            out.append((name, value))
        return out

    def unreplayable(self) -> str | None:
        """Why putting this dead letter back would not recreate its entry, or None."""
        split = self._split()
        added = dict(split[1]) if split is not None else dict(self.pairs[-1:])
        if TRUNCATED_FIELD in added:
            return f"incomplete: it holds an excerpt of the entry ({_excerpt(added[TRUNCATED_FIELD])})"
        if FIELDS_DROPPED in added:
            dropped = added[FIELDS_DROPPED].decode(errors="replace")
            return f"incomplete: {dropped} of the entry's fields were left out of it (fields_dropped)"
        for marker in INCOMPLETE_MARKERS:
            if marker in added:
                value = added[marker].decode(errors="replace")[:200]
                return f"incomplete: it does not hold every field of the entry ({marker.decode()}: {value})"
        if not self.original():
            return "no fields to replay: the entry was deleted from the stream before it was read"
        return None

    def summary(self) -> dict[str, Any]:
        f = self.fields
        return {
            "id": self.id.decode(),
            "source_id": f.get(b"source_id", b"").decode(errors="replace"),
            "reason": self.reason,
            "error": f.get(b"error", b"").decode(errors="replace"),
            "consumer": f.get(b"consumer", b"").decode(errors="replace"),
            "deliveries": int(f.get(b"deliveries", b"0") or 0),
            "filename": dict(self.original()).get(b"filename", b"").decode(errors="replace"),
        }


def _excerpt(marker: bytes) -> str:
    """`kept 1,000 of its 4,000 fields (22,890 bytes), 3 cut`, from a `truncated` field."""
    try:
        what = json.loads(marker)
        kept, count, size = int(what["kept"]), int(what["fields"]), int(what["bytes"])
        cut = int(what.get("cut_count", 0))
    except (ValueError, TypeError, KeyError):
        return "truncated: " + marker.decode(errors="replace")[:200]
    text = f"kept {kept:,} of its {count:,} fields ({size:,} bytes)"
    return text + (f", {cut:,} names or values cut short" if cut else "")


def _entry(entry_id: bytes, fields: Any) -> DeadLetterEntry:
    """A dead letter from a reply row: flat `[name, value, …]` (the script's) or a dict."""
    if isinstance(fields, dict):
        return DeadLetterEntry(entry_id, list(fields.items()))
    it = iter(fields or [])
    return DeadLetterEntry(entry_id, list(zip(it, it, strict=False)))


def scan(r: redis.Redis, dead_stream: str) -> Iterator[DeadLetterEntry]:
    """Every dead letter, oldest first, with every field as stored, read in chunks of
    about SAMPLE_PAGE_BYTES (a few at a time when they are big), at most CHUNK."""
    start = b"-"
    size = ReadSize(CHUNK, SAMPLE_PAGE_BYTES, SAMPLE_PAGE_BYTES // 16)
    while True:
        count = size.count
        rows = cast("list[list[Any]]", r.eval(_RANGE_SCRIPT, 1, dead_stream, start, count))
        if not rows:
            return
        for entry_id, fields in rows:
            yield _entry(entry_id, fields)
        if len(rows) < count:
            return
        size.observe(len(rows), entries_bytes(rows))
        start = b"(" + rows[-1][0]


def matching(
    r: redis.Redis, dead_stream: str, reason: str | None, ids: list[str] | None
) -> Iterator[DeadLetterEntry]:
    """Dead letters with the given reason and/or dead-letter (or source) ids."""
    wanted = {i.encode() for i in ids or []}
    for d in scan(r, dead_stream):
        if reason is not None and d.reason != reason:
            continue
        if wanted and d.id not in wanted and d.fields.get(b"source_id") not in wanted:
            continue
        yield d


def summarize(r: redis.Redis, dead_stream: str | list[str], recent: int = 10) -> dict[str, Any]:
    """Counts by reason and the most recent dead letters, of one dead-letter stream or
    of several (every partition's)."""
    streams = [dead_stream] if isinstance(dead_stream, str) else dead_stream
    counts: Counter[str] = Counter(d.reason for s in streams for d in scan(r, s))
    rows: list[tuple[bytes, dict[bytes, bytes]]] = []
    for s in streams if recent else []:
        for page in read_pages(r, s, "+", "-", reverse=True, limit=recent):
            rows += cast("list[tuple[bytes, dict[bytes, bytes]]]", page)
    latest = sorted(rows, key=lambda row: id_key(row[0]), reverse=True)[:recent]
    name = dead_stream if isinstance(dead_stream, str) else shown_streams(streams)
    return {
        "stream": name,
        "total": sum(counts.values()),
        "by_reason": dict(counts.most_common()),
        "recent": [_entry(i, f).summary() for i, f in latest],
    }


def retention_summary(r: redis.Redis, settings: Settings, streams: list[str], total: int) -> dict[str, Any]:
    """What DEAD_LETTER_RETENTION keeps, against what is there: `kept` of `cap` (per
    dead-letter stream), no older than `age_s`, and the memory they take in Redis."""
    w = settings.dead_window
    memory = 0
    for s in streams:
        memory += int(r.memory_usage(s) or 0)
    if w.keep_all:
        rule = "never trimmed"
    else:
        parts = [f"the newest {entries(w.count)}"] if w.count else []
        if w.age_s:
            parts.append(f"none older than {w.age_text}")
        rule = ", ".join(parts)
    return {
        "setting": settings.dead_letter_retention,
        "cap": w.count or None,
        "age_s": w.age_s or None,
        "kept": total,
        "memory_bytes": memory,
        "rule": rule,
    }


def shown_streams(streams: list[str]) -> str:
    """`file_uploads:{0}:dead … file_uploads:{7}:dead`, or the one name."""
    return streams[0] if len(streams) == 1 else f"{streams[0]} … {streams[-1]}"


@dataclass
class Replayed:
    """What a replay did: how many dead letters went back on the stream, and those left
    in the dead-letter stream with the reason they cannot be replayed."""

    count: int = 0
    refused: list[tuple[DeadLetterEntry, str]] = field(default_factory=list)


def replay(
    r: redis.Redis,
    settings: Settings,
    entries: Iterator[DeadLetterEntry],
    part: Partition | None = None,
    result: Replayed | None = None,
) -> Replayed:
    """Puts dead letters back on the stream with their original fields and removes them
    from the dead-letter stream, each chunk in one MULTI/EXEC: a crash replays a chunk
    entirely or not at all. With partitions, `part` says which: its dead letters go back
    to it (the same hash slot, so the transaction stays on one node).

    A dead letter that would not recreate its entry (one that holds only part of the
    entry's fields, or none: the entry was deleted before it was read) is left where it
    is, with the reason, in `refused`; the others are replayed all the same."""
    target, dead_stream = (part.stream, part.dead_stream) if part else (settings.stream, settings.dead_stream)
    result = result if result is not None else Replayed()
    chunk: list[DeadLetterEntry] = []

    def flush() -> None:
        if not chunk:
            return
        pipe = r.pipeline(transaction=True)
        for d in chunk:
            # XADD itself: the entry's fields may repeat a name, which a dict cannot hold.
            flat = [x for pair in d.original() for x in pair]
            pipe.execute_command("XADD", target, "*", *flat)  # type: ignore[no-untyped-call]
        pipe.xdel(dead_stream, *[d.id for d in chunk])
        pipe.execute()
        result.count += len(chunk)
        chunk.clear()

    for d in entries:
        why = d.unreplayable()
        if why is not None:
            result.refused.append((d, why))
            continue
        chunk.append(d)
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return result


def purge(r: redis.Redis, dead_stream: str, entries: Iterator[DeadLetterEntry] | None) -> int:
    """Deletes the given dead letters, or the whole dead-letter stream."""
    if entries is None:
        n = int(r.xlen(dead_stream))
        r.delete(dead_stream)
        return n
    total = 0
    ids = [d.id for d in entries]
    for i in range(0, len(ids), CHUNK):
        total += int(r.xdel(dead_stream, *ids[i : i + CHUNK]))
    return total


def connect(s: Settings) -> redis.Redis:
    """A client of the dead letters' Redis, checked: a one-line error naming it when it is
    unreachable or refuses the login (`stream.failure`)."""
    from .stream import connect as connect_redis
    from .stream import failure

    r = connect_redis(s, socket_timeout=10)
    try:
        r.ping()
    except redis.RedisError as e:
        raise failure(s, e) from e
    return r


def size_text(n: int) -> str:
    """`512 B`, `3.4 KiB`, `2.0 MiB`."""
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"
