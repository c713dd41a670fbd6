"""Reading entries: the group's deliveries (XREADGROUP) and plain pages of a stream (XRANGE)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis

from .. import _native
from ..constants import SAMPLE_PAGE_BYTES
from .client import is_cluster
from .reply import entries_in_place

Fields = dict[bytes, bytes]
# An entry's id and fields: the flat [name, value, …] list the server sends (a dict where
# redis-py made one), or None when it was read without them (deleted while pending).
Entry = tuple[bytes, Any]
# The entries of one read: a `_native.Reply` (the reply's own bytes), or a list.
Entries = Sequence[Entry]


def fields_dict(fields: Any) -> Fields:
    """An entry's fields as a dict, whether the reply held a dict or a flat list."""
    if fields is None:
        return {}
    if isinstance(fields, dict):
        return fields
    it = iter(fields)
    # Name/value pairs; not strict, so an odd trailing item is dropped rather than raising
    # while a dead letter is being written.
    return dict(zip(it, it, strict=False))


def read_new(r: redis.Redis, stream: str, group: str, consumer: str, count: int, block_ms: int) -> Entries:
    """XREADGROUP `>`: up to `count` never-delivered entries, blocking up to `block_ms`
    (0: not at all)."""
    return _entries(_xreadgroup(r, stream, group, consumer, b">", count, block_ms or None))


def read_own_pending(
    r: redis.Redis, stream: str, group: str, consumer: str, count: int, after: bytes = b"0"
) -> Entries:
    """XREADGROUP from `after`: this consumer's own delivered-but-unacked entries."""
    return _entries(_xreadgroup(r, stream, group, consumer, after, count, None))


def read_own_pending_and_new(
    r: redis.Redis, stream: str, group: str, consumer: str, count: int
) -> tuple[Entries, Entries]:
    """A start's first two reads in one round trip: this consumer's own pending entries
    from the first (XREADGROUP 0), then never-delivered ones (XREADGROUP `>`, not
    blocking). The new ones are pending too once read: a caller that reads more of its
    own pending entries after this reads them again."""
    if is_cluster(r):
        own = read_own_pending(r, stream, group, consumer, count)
        return own, read_new(r, stream, group, consumer, count, 0)
    with entries_in_place():
        pipe = r.pipeline(transaction=False)
        pipe.xreadgroup(group, consumer, {stream: b"0"}, count=count)
        pipe.xreadgroup(group, consumer, {stream: b">"}, count=count)
        own, new = _execute(pipe)
    return _entries(own), _entries(new)


def claim_and_read_new(
    r: redis.Redis, stream: str, group: str, consumer: str, count: int, min_idle_ms: int, start: bytes
) -> tuple[Any, Entries]:
    """XAUTOCLAIM of entries idle `min_idle_ms` or more from `start`, and a read of
    never-delivered ones (XREADGROUP `>`, not blocking), in one round trip. Returns the
    claim's reply as redis-py gives it, and the new entries."""
    if is_cluster(r):
        claimed = r.xautoclaim(
            stream, group, consumer, min_idle_time=min_idle_ms, start_id=start, count=count
        )
        return claimed, read_new(r, stream, group, consumer, count, 0)
    with entries_in_place():
        pipe = r.pipeline(transaction=False)
        pipe.xautoclaim(stream, group, consumer, min_idle_time=min_idle_ms, start_id=start, count=count)
        pipe.xreadgroup(group, consumer, {stream: b">"}, count=count)
        claimed, new = _execute(pipe)
    return claimed, _entries(new)


def _execute(pipe: Any) -> list[Any]:
    """A pipeline's replies; an error is raised as the command alone would have raised it
    (redis-py's pipeline rewords the first one, which hides a refusal's kind: OOM, MISCONF)."""
    replies: list[Any] = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _xreadgroup(
    r: redis.Redis, stream: str, group: str, consumer: str, after: bytes, count: int, block_ms: int | None
) -> Any:
    if not is_cluster(r):
        with entries_in_place():
            return r.xreadgroup(group, consumer, {stream: after}, count=count, block=block_ms)
    # XREADGROUP's keys are "movable": left to itself, the cluster client would ask a
    # node (COMMAND GETKEYS) before every read. The stream's slot names the node; a
    # stale slot map is corrected by the MOVED reply, which the client follows.
    args: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    args += ["STREAMS", stream, after]
    return r.execute_command(*args, target_nodes=r.get_node_from_key(stream))  # type: ignore[attr-defined,no-untyped-call]


def _entries(reply: Any) -> Entries:
    """The entries of a one-stream XREADGROUP reply: the reply itself when the extension
    read it in place; else a map under RESP3, a list under RESP2."""
    if isinstance(reply, _native.Reply):
        return reply
    if not reply:
        return []
    value = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    # redis-py's own RESP3 parsing wraps the entries in one more list.
    if value and isinstance(value[0], list) and value[0] and isinstance(value[0][0], list):
        value = value[0]
    return list(value)


class ReadSize:
    """How many entries to ask Redis for at once: at most CONSUMER_BATCH_SIZE (more when the
    round trips call for more, `raise_to`, if `beyond`: CONSUMER_BATCH_SIZE left at its
    default; one set on purpose is a cap), and about FILEPIPE_BATCH_BYTES worth at the
    sizes of the entries seen last, so that memory follows the bytes in flight, not the
    count. It starts at FILEPIPE_BATCH_BYTES / FILEPIPE_MAX_ENTRY_BYTES entries (the first
    read after a start stays within the byte budget even if every entry is as big as
    allowed), doubles after each batch while the entries are small, and drops at once to
    what the budget allows when they are big.
    (A read cannot be cut by bytes: the reads made right after entries turn from small to
    big, before the first big batch is parsed, can exceed the budget; at most three, as
    the reader works up to two batches ahead of the parser, and the read after the batch
    that holds the turn is sized by that batch's last entry.)"""

    def __init__(
        self, batch_size: int, batch_bytes: int, max_entry_bytes: int, *, beyond: bool = False
    ) -> None:
        self.limit = batch_size
        self.beyond = beyond
        self.budget = batch_bytes
        self.count = max(1, min(batch_size, batch_bytes // max(1, max_entry_bytes)))
        self.fits = self.count  # entries the budget allows at the sizes seen last

    def observe(self, entries: int, nbytes: int, last: int = 0) -> None:
        """A batch of `entries` entries held `nbytes` bytes (ids, names and values), its
        last one `last` bytes. The entries to come are taken to be as big as the batch's
        mean, or as its last entry where that is bigger: the mean of a batch that
        straddles a turn from small entries to big ones would allow a full read of big
        ones."""
        if entries <= 0:
            return
        each = max(nbytes / entries, last, 1)
        self.fits = fits = max(1, int(self.budget / each))
        self.count = max(1, min(self.limit, fits, self.count * 2))

    def raise_to(self, entries: int) -> None:
        """At least `entries` per read (the round trips to cover, consumer.pace): beyond
        CONSUMER_BATCH_SIZE if need be and `beyond`, never beyond what the budget allows at
        the sizes seen last (before any entry was seen, the first reads' size)."""
        cap = self.fits if self.beyond else min(self.limit, self.fits)
        self.count = max(self.count, min(cap, entries))


def entries_bytes(entries: Iterable[Any]) -> int:
    """About how many bytes entries read by redis-py hold (ids, names and values). For the
    readers that sample a stream (status, dashboard, dlq); the consumer counts in the
    extension."""
    total = 0
    for entry_id, fields in entries:
        total += len(entry_id)
        if isinstance(fields, dict):
            total += sum(len(k) + len(v) for k, v in fields.items())
        elif fields:
            total += sum(len(x) for x in fields)
    return total


def read_pages(
    r: redis.Redis,
    key: str,
    start: str | bytes = "-",
    end: str | bytes = "+",
    *,
    reverse: bool = False,
    limit: int | None = None,
    budget: int = SAMPLE_PAGE_BYTES,
    total_budget: int | None = None,
) -> Iterator[list[Any]]:
    """The entries of `key` from `start` to `end` (XREVRANGE from `start` down to `end`
    with `reverse`), page by page: each page asks for about `budget` bytes worth at the
    sizes seen so far (16 entries at first), so that big entries are read a few at a
    time. Stops after `limit` entries, or once `total_budget` bytes have been read."""
    size = ReadSize(1 << 30, budget, budget // 16)
    read = nbytes = 0
    while limit is None or read < limit:
        count = size.count if limit is None else min(size.count, limit - read)
        if reverse:
            page = r.xrevrange(key, max=start, min=end, count=count) or []
        else:
            page = r.xrange(key, min=start, max=end, count=count) or []
        if not page:
            return
        yield page
        n = entries_bytes(page)
        read, nbytes = read + len(page), nbytes + n
        size.observe(len(page), n)
        if len(page) < count or (total_budget is not None and nbytes >= total_budget):
            return
        last = page[-1][0]
        start = b"(" + (last if isinstance(last, bytes) else str(last).encode())
