"""Dead letters by reason, counted incrementally between readings.

A `DeadTally` remembers, for one dead-letter stream, the reasons counted so far and
the last entry counted; the next reading counts only what was added after it. One
rule (`DeadTally.stale`) says when the counts can no longer be trusted, because
dead letters were removed (trimmed by DEAD_LETTER_RETENTION, purged, replayed, the
stream deleted or replaced): the tally then starts over. Two ways of reading use it:

* `count_newest` (`filepipe status`): the newest DEAD_SCAN_LIMIT first, then, on each
  refresh, what was added since;
* `DeadPages` (the dashboard): a page after the cursor per sample, read at the same
  instant as the stream's length, from the first dead letter on (`count_page`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import stream
from ..constants import SAMPLE_PAGE_BYTES, STATUS_SCAN_BYTES
from ..stream import ReadSize, entries_bytes, reply_text

DEAD_SCAN_LIMIT = 50_000  # dead letters `count_newest` reads the first time (the newest)
RECENT_CAP = 10_000  # dead letters read to count the last minute's
PAGE_COUNT = 2000  # dead letters `DeadPages` reads per sample, at most

# One partition's dead letters after a cursor (ARGV[1]), at most ARGV[2] of them, and
# its length, read in one atomic step: when the two disagree at the end of the
# stream, entries were deleted or trimmed.
DEAD_PAGE_SCRIPT = """
local n = redis.call('XLEN', KEYS[1])
if n == 0 then return {0, {}} end
return {n, redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
"""


@dataclass
class DeadTally:
    """What is known of one dead-letter stream between readings."""

    reasons: Counter[str] = field(default_factory=Counter)
    counted: int = 0
    last_id: str = ""
    length_seen: int = 0  # the stream's length at the last reading
    complete: bool = False  # counting began at the stream's first entry

    def stale(self, length: int, *, at_end: bool = False, last_gone: bool = False) -> bool:
        """Whether the counts are wrong for a stream now `length` long: more were counted
        than it holds, it shrank, the last entry counted is gone (`last_gone`), or — read
        to its end (`at_end`) from its first entry — it holds another number than counted."""
        if not self.counted and not self.last_id:
            return False
        return (
            self.counted > length
            or length < self.length_seen
            or last_gone
            or (at_end and self.complete and self.counted != length)
        )

    def add(self, page: list[Any]) -> None:
        """Counts the reasons of `page` ((id, fields) pairs)."""
        for _entry_id, fields in page:
            self.reasons[reason_of(fields)] += 1
        self.counted += len(page)


def reason_of(fields: dict[bytes, bytes] | None) -> str:
    return reply_text((fields or {}).get(b"reason", b"unknown"))


def count_newest(r: Any, dead_stream: str, tally: DeadTally) -> DeadTally:
    """Brings `tally` up to date with `dead_stream` and returns it (a new one when the old
    was stale): the first time, the reasons of the newest DEAD_SCAN_LIMIT; then those of
    what was added since. Reads at most STATUS_SCAN_BYTES, in pages of about
    SAMPLE_PAGE_BYTES: big dead letters are read a few at a time, and only so many."""
    length = int(r.xlen(dead_stream))
    gone = bool(tally.last_id) and not r.xrange(dead_stream, min=tally.last_id, max=tally.last_id, count=1)
    if not length or tally.stale(length, last_gone=gone):
        tally = DeadTally()
    tally.length_seen = length
    if not length:
        return tally
    if not tally.last_id:
        for page in stream.read_pages(
            r, dead_stream, "+", "-", reverse=True, limit=DEAD_SCAN_LIMIT, total_budget=STATUS_SCAN_BYTES
        ):
            if not tally.last_id:
                tally.last_id = reply_text(page[0][0])
            tally.add(page)
        tally.complete = tally.counted >= length
    else:
        for page in stream.read_pages(
            r, dead_stream, f"({tally.last_id}", "+", total_budget=STATUS_SCAN_BYTES
        ):
            tally.last_id = reply_text(page[-1][0])
            tally.add(page)
    return tally


def count_page(tally: DeadTally, entries: list[Any], length: int, asked: int) -> DeadTally:
    """Adds `entries` (at most `asked`, read after `tally.last_id` at the same instant as
    the stream's `length`) and returns the tally: a new one, to be read again from the
    first dead letter, when it is stale."""
    if not tally.counted and not tally.last_id:
        tally.complete = True
    tally.add(entries)
    if entries:
        tally.last_id = reply_text(entries[-1][0])
    if tally.stale(length, at_end=len(entries) < asked):
        return DeadTally(length_seen=0)
    tally.length_seen = length
    return tally


class DeadPages:
    """The dashboard's way: the tallies of several dead-letter streams, each read a page
    per sample after its cursor, together with the stream's length (`count_page`)."""

    def __init__(self) -> None:
        self._tallies: dict[str, DeadTally] = {}
        self._sizes: dict[str, ReadSize] = {}

    def tally(self, dead_stream: str) -> DeadTally:
        return self._tallies.get(dead_stream) or DeadTally()

    def next_read(self, dead_stream: str) -> tuple[str, int]:
        """Where the next read of `dead_stream` starts (after the last entry counted) and how
        many it reads: at most PAGE_COUNT, about SAMPLE_PAGE_BYTES at the sizes seen so far
        (big ones a few at a time)."""
        tally = self._tallies.get(dead_stream)
        start = "(" + tally.last_id if tally is not None and tally.last_id else "-"
        size = self._sizes.setdefault(
            dead_stream, ReadSize(PAGE_COUNT, SAMPLE_PAGE_BYTES, SAMPLE_PAGE_BYTES // 16)
        )
        return start, size.count

    def scan(self, r: Any, dead_stream: str, length: int) -> None:
        """Reads and counts the next page of `dead_stream` (now `length` long), the page and
        the length in one MULTI/EXEC."""
        tally = self._tallies.get(dead_stream)
        if length == 0 and (tally is None or tally.counted == 0):
            return
        start, count = self.next_read(dead_stream)
        pipe = r.pipeline(transaction=True)
        pipe.xrange(dead_stream, start, "+", count=count)
        pipe.xlen(dead_stream)
        entries, now = pipe.execute()
        self.count(dead_stream, entries, int(now))

    def count(self, dead_stream: str, entries: list[Any], length: int) -> None:
        """Counts `entries`, read after the cursor at the same instant as the stream's `length`."""
        size = self._sizes.get(dead_stream)
        asked = size.count if size is not None else PAGE_COUNT
        if size is not None and entries:
            size.observe(len(entries), entries_bytes(entries))
        self._tallies[dead_stream] = count_page(self.tally(dead_stream), entries, length, asked)


def recent_reasons(r: Any, dead_stream: str, since_ms: int) -> Counter[str]:
    """The reasons of the dead letters written since `since_ms` (at most RECENT_CAP)."""
    recent: Counter[str] = Counter()
    for page in stream.read_pages(
        r, dead_stream, f"{since_ms}-0", "+", limit=RECENT_CAP, total_budget=STATUS_SCAN_BYTES
    ):
        recent.update(reason_of(fields) for _, fields in page)
    return recent
