"""One cheap reading of the group, for the observers that sample often (the dashboard
every second, the consumer's `/metrics` at scrape time): one pipeline for every
partition (on a Redis Cluster, redis-py splits it by node) of XINFO GROUPS (pending,
lag, entries read), XLEN of the stream, the dead-letter stream's length (with
partitions, with its next page of dead letters: `dead.DEAD_PAGE_SCRIPT`, atomic per
partition, since a MULTI/EXEC cannot span the hash slots of different partitions) and
XINFO CONSUMERS; then the consumers' heartbeats (`streams.read_heartbeats`). The
figures are summed over the partitions, each consumer counted once.

`filepipe status` reads more, less often (`streams.StreamReader`); both fill the same
`model.ConsumerState` and judge it by `health.consumer_state`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from ..config import Settings
from ..partitions import Partition, partitions
from ..stream import group_row, reply_text
from . import dead
from .model import ConsumerState, PartitionState
from .streams import consumers_of, listed, merge_consumers, read_heartbeats, sum_or_none


@dataclass
class GroupSample:
    """The group at one instant, summed over the partitions."""

    length: int = 0
    dead_letters: int = 0
    pending: int = 0
    lag: int | None = None
    group_exists: bool = False
    acked: int | None = None  # entries acknowledged so far: read by the group minus pending
    consumers: list[ConsumerState] = field(default_factory=list)  # listed: departed ones left out
    departed: int = 0
    dead_reasons: Counter[str] = field(default_factory=Counter)
    dead_counted: int = 0
    partitions: list[PartitionState] = field(default_factory=list)


def sample_group(r: Any, settings: Settings, pages: dead.DeadPages | None = None) -> GroupSample:
    """The group's figures in one pipeline (and one more for the heartbeats); with `pages`,
    the dead letters' reasons are counted on, a page per call."""
    parts = partitions(settings)
    pipe = r.pipeline(transaction=False)
    for part in parts:
        pipe.xinfo_groups(part.stream)
        pipe.xlen(part.stream)
        if settings.partitions and pages is not None:
            # (a cluster pipeline has no eval(): the command itself, routed by its key)
            start, count = pages.next_read(part.dead_stream)
            pipe.execute_command("EVAL", dead.DEAD_PAGE_SCRIPT, 1, part.dead_stream, start, count)
        else:
            pipe.xlen(part.dead_stream)
        pipe.xinfo_consumers(part.stream, settings.group)
    replies = pipe.execute(raise_on_error=False)
    streams = [_stream_sample(settings, part, replies[4 * i : 4 * i + 4]) for i, part in enumerate(parts)]

    out = GroupSample(
        length=sum(st.length for st in streams),
        dead_letters=sum(st.dead for st in streams),
        pending=sum(st.pending for st in streams),
        lag=sum_or_none([st.lag for st in streams]),
        group_exists=any(st.group for st in streams),
    )
    # Each consumer once; its heartbeat is the same on every partition it reads.
    members = merge_consumers(st.consumers for st in streams) if settings.partitions else streams[0].consumers
    read_heartbeats(r, members, settings.stream)
    out.consumers, out.departed = listed(members)
    entries_read = sum_or_none([st.entries_read for st in streams])
    if entries_read is not None:
        out.acked = max(entries_read - out.pending, 0)
    elif any(c.heartbeat_age_s is not None for c in out.consumers):
        # Without the group's read counter (Redis < 7), the live consumers' own totals.
        out.acked = sum(
            (c.inserted or 0) + (c.dead_lettered or 0) for c in out.consumers if c.heartbeat_age_s is not None
        )
    if pages is not None:
        if settings.partitions:
            for st in streams:
                pages.count(st.part.dead_stream, st.dead_page, st.dead)
        else:
            pages.scan(r, settings.dead_stream, out.dead_letters)
        for part in parts:
            tally = pages.tally(part.dead_stream)
            out.dead_reasons.update(tally.reasons)
            out.dead_counted += tally.counted
    if settings.partitions:
        out.partitions = [
            PartitionState(st.part.stream, st.length, st.lag, st.pending, st.dead, bool(st.group))
            for st in streams
        ]
    return out


@dataclass
class _StreamSample:
    """What one pipeline said of one (partition) stream."""

    part: Partition
    length: int
    dead: int
    group: dict[str, Any]
    consumers: list[ConsumerState]
    dead_page: list[Any]

    @property
    def pending(self) -> int:
        return int(self.group["pending"]) if self.group else 0

    @property
    def lag(self) -> int | None:
        # Before the first consumer creates the group, every entry is waiting for it.
        lag = self.group.get("lag") if self.group else self.length
        return None if lag is None else int(lag)

    @property
    def entries_read(self) -> int | None:
        read = self.group.get("entries-read") if self.group else 0
        delivered = reply_text(self.group.get("last-delivered-id")) if self.group else ""
        if read is None and self.part.index is not None and delivered == "0-0":
            # A partition nobody has read from yet: Redis says "unknown", but it is none,
            # and one idle partition must not hide the counters of the others.
            read = 0
        return None if read is None else int(read)


def _stream_sample(settings: Settings, part: Partition, replies: list[Any]) -> _StreamSample:
    """One stream's figures from its four pipeline replies."""
    groups, length, dead_len, consumers = replies
    for reply in (length, dead_len):
        if isinstance(reply, Exception):
            raise reply
    # A stream or group that does not exist yet is not an error: nothing was produced.
    group: dict[str, Any] = {}
    if not isinstance(groups, redis.ResponseError):
        if isinstance(groups, Exception):
            raise groups
        group = group_row(groups, settings.group) or {}
    if isinstance(consumers, redis.ResponseError):
        consumers = []
    elif isinstance(consumers, Exception):
        raise consumers
    page: list[Any] = []
    if isinstance(dead_len, list):  # the script's reply: [length, entries]
        dead_len, raw = dead_len
        page = [(entry_id, _pairs(flat)) for entry_id, flat in raw]
    return _StreamSample(part, int(length), int(dead_len), group, consumers_of(consumers, part.stream), page)


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    """`[k1, v1, k2, v2]` (an entry's fields as a script returns them) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
