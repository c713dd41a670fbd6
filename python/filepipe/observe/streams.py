"""The Redis side of the pipeline: streams, the group, its consumers and their
heartbeats, dead letters by reason, and what makes Redis refuse writes.

`StreamReader.read` is the thorough reading `filepipe status` makes (a few round trips
per partition); the dashboard samples every second with one pipeline of its own, and
shares with it the parts that decide what a figure means: `consumers_of` (XINFO
CONSUMERS), `read_heartbeats`, `merge_consumers`, the dead-letter tally (`dead`) and the
consumer's state (`health.consumer_state`). Every age is measured against the Redis
clock (TIME, PTTL), so clock skew between hosts does not distort it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from .. import retention, stream
from ..config import Settings
from ..constants import (
    GROUP_RECREATED_TTL_S,
    HEARTBEAT_TTL_S,
    STATUS_SCAN_BYTES,
    group_recreated_key,
    heartbeat_key,
    partition_dead_stream,
)
from ..heartbeat import Heartbeat
from ..partitions import Partition, partitions
from ..stream import reply_text
from . import dead, rates
from .model import ConsumerState, GroupRecreation, PartitionState, PendingEntry, StreamState
from .retained import id_ms, server_ms

WINDOW_S = 60  # "last minute": arrivals and dead letters
ARRIVALS_CAP = 10_000  # entries read to count the last minute's arrivals


class StreamReader:
    """Reads one stream (all its partitions) and its group on `r`; keeps what it has
    counted of the dead letters between readings (`--watch`)."""

    def __init__(self, r: Any, settings: Settings) -> None:
        self.redis = r
        self.settings = settings
        self.tallies: dict[str, dead.DeadTally] = {}

    def read(self) -> StreamState:
        now_ms = server_ms(self.redis)
        parts = [self._read_partition(part, now_ms) for part in partitions(self.settings)]
        out = parts[0] if len(parts) == 1 else _merge(parts)
        if self.settings.partitions:
            out.partitions = [
                PartitionState(p.stream, p.length, p.lag, p.pending, p.dead_total, p.group_exists)
                for p in parts
            ]
        read_heartbeats(self.redis, out.consumers, self.settings.stream)
        out.consumers, out.departed = listed(out.consumers)
        out.writes_refused = write_refusal(self.redis)
        return out

    def _read_partition(self, part: Partition, now_ms: int) -> StreamState:
        r = self.redis
        out = StreamState(stream=part.stream)
        try:
            info = r.xinfo_stream(part.stream)
        except redis.ResponseError as e:
            if "no such key" not in str(e).lower():
                raise
            info = None
        if info is not None:
            out.exists = True
            out.length = int(info["length"])
            last = info.get("last-generated-id")
            if last and reply_text(last) != "0-0":
                out.last_entry_id = reply_text(last)
                out.last_entry_age_s = max(0.0, (now_ms - id_ms(last)) / 1000)
            added = info.get("entries-added")
            out.entries_added = None if added is None else int(added)
            self._read_group(out, part, now_ms)
            since = now_ms - WINDOW_S * 1000
            sampled = (
                None
                if out.entries_added is None
                else retention.arrivals_since(r, part.stream, since, out.entries_added, ARRIVALS_CAP)
            )
            if sampled is not None:
                out.arrivals_last_minute = sampled
            else:
                out.arrivals_last_minute, out.arrivals_capped = count_range(
                    r, part.stream, f"{since}-0", ARRIVALS_CAP
                )
            if out.length and not out.group_exists:
                out.groups_missing = [part.stream]
        self._read_dead(out, part.dead_stream, now_ms)
        out.group_recreated = read_recreation(r, part.stream, self.settings.group)
        return out

    def _read_group(self, out: StreamState, part: Partition, now_ms: int) -> None:
        s, r = self.settings, self.redis
        group = stream.group_info(r, part.stream, s.group)
        if group is None:
            return
        out.group_exists = True
        out.pending = int(group["pending"])
        last_delivered = reply_text(group.get("last-delivered-id", "0-0"))
        read = group.get("entries-read")
        out.entries_read = None if read is None else int(read)
        lag = group.get("lag")
        if lag is not None:
            out.lag = int(lag)
        else:  # Redis cannot tell (entries deleted in between, or Redis < 7): count, up to a cap
            out.lag, out.lag_capped = count_range(r, part.stream, f"({last_delivered}", ARRIVALS_CAP)
        if out.lag:
            first = r.xrange(part.stream, min=f"({last_delivered}", max="+", count=1)
            if first:
                out.waiting_age_s = max(0.0, (now_ms - id_ms(first[0][0])) / 1000)
        if out.pending:
            rows = r.xpending_range(part.stream, s.group, min="-", max="+", count=1)
            if rows:
                row = rows[0]
                out.oldest_pending = PendingEntry(
                    id=reply_text(row["message_id"]),
                    consumer=reply_text(row["consumer"]),
                    age_s=max(0.0, (now_ms - id_ms(row["message_id"])) / 1000),
                    idle_s=int(row["time_since_delivered"]) / 1000,
                    deliveries=int(row["times_delivered"]),
                    stream=part.stream,
                )
        out.consumers = consumers_of(r.xinfo_consumers(part.stream, s.group), part.stream)

    def _read_dead(self, out: StreamState, dead_stream: str, now_ms: int) -> None:
        tally = self.tallies[dead_stream] = dead.count_newest(
            self.redis, dead_stream, self.tallies.get(dead_stream) or dead.DeadTally()
        )
        out.dead_total = tally.length_seen
        out.dead_counted = tally.counted
        out.dead_by_reason = dict(tally.reasons.most_common())
        if out.dead_total:
            recent = dead.recent_reasons(self.redis, dead_stream, now_ms - WINDOW_S * 1000)
            out.dead_last_minute = sum(recent.values())
            out.dead_last_minute_by_reason = dict(recent.most_common())


def read_recreation(r: Any, stream_name: str, group: str) -> GroupRecreation | None:
    """When a consumer last created the group of `stream_name` again, who and why (None
    when none did within GROUP_RECREATED_TTL_S, or the record is not one)."""
    key = group_recreated_key(stream_name, group)
    pipe = r.pipeline(transaction=False)
    pipe.get(key)
    pipe.pttl(key)
    raw, pttl = pipe.execute()
    try:
        doc = json.loads(raw) if raw is not None else None
    except (ValueError, TypeError):
        return None
    if not isinstance(doc, dict):
        return None
    left = pttl / 1000 if isinstance(pttl, int) and pttl >= 0 else GROUP_RECREATED_TTL_S
    return GroupRecreation(
        stream=stream_name,
        consumer=str(doc.get("consumer", "")),
        reason=str(doc.get("reason", "")),
        age_s=max(0.0, GROUP_RECREATED_TTL_S - left),
    )


def consumers_of(rows: Iterable[dict[Any, Any]], part_stream: str) -> list[ConsumerState]:
    """The group's members from an XINFO CONSUMERS reply."""
    return [
        ConsumerState(
            name=reply_text(row["name"]),
            pending=int(row.get("pending", 0)),
            idle_s=int(row.get("idle", 0)) / 1000,
            heartbeat_stream=part_stream,
        )
        for row in rows
    ]


def read_heartbeats(r: Any, consumers: list[ConsumerState], default_stream: str) -> None:
    """Each consumer's heartbeat and its age (one pipeline: GET and PTTL of each key;
    a consumer writes the same heartbeat for every partition it reads: one is enough)."""
    if not consumers:
        return
    pipe = r.pipeline(transaction=False)
    for state in consumers:
        key = heartbeat_key(state.heartbeat_stream or default_stream, state.name)
        pipe.get(key)
        pipe.pttl(key)
    replies = pipe.execute()
    for i, state in enumerate(consumers):
        apply_heartbeat(state, Heartbeat.from_json(replies[2 * i]), replies[2 * i + 1])


def apply_heartbeat(state: ConsumerState, beat: Heartbeat | None, pttl: Any) -> None:
    """Fills `state` from its heartbeat (None: it has none) and sets its state."""
    from .health import consumer_state

    if beat is not None:
        state.host = beat.host or None
        state.pid = beat.pid
        state.rate = rates.since_start(beat)
        state.inserted = beat.inserted
        state.loaded = beat.loaded
        state.dead_lettered = beat.dead_lettered
        state.batches = beat.batches
        state.updated = beat.updated
        state.last_error = beat.last_error
        # Written with a TTL of HEARTBEAT_TTL_S: what is left of it says how old it is,
        # by the Redis clock alone (a key without a TTL is taken as just written).
        left = pttl / 1000 if isinstance(pttl, int) and pttl >= 0 else HEARTBEAT_TTL_S
        state.heartbeat_age_s = max(0.0, HEARTBEAT_TTL_S - left)
    state.state = consumer_state(state)


def listed(consumers: list[ConsumerState]) -> tuple[list[ConsumerState], int]:
    """The consumers worth listing (live first, then dead ones holding entries, by name),
    and how many departed (no heartbeat, nothing pending: its group entry lingers until the
    housekeeper removes it)."""
    order = {"live": 0, "waiting": 1, "stale": 2, "dead": 3}
    shown = [c for c in consumers if c.state != "departed"]
    shown.sort(key=lambda c: (order.get(c.state, 9), c.name))
    return shown, len(consumers) - len(shown)


def count_range(r: Any, key: str, start: str, cap: int) -> tuple[int, bool]:
    """How many entries `key` holds from `start` on, counted up to `cap` and reading at
    most STATUS_SCAN_BYTES; and whether the count stopped short (a lower bound)."""
    n = nbytes = 0
    for page in stream.read_pages(r, key, start, "+", limit=cap, total_budget=STATUS_SCAN_BYTES):
        n += len(page)
        nbytes += stream.entries_bytes(page)
    return n, n >= cap or nbytes >= STATUS_SCAN_BYTES


def sum_or_none(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v or 0 for v in values)


def _merge(parts: list[StreamState]) -> StreamState:
    """One view of a partitioned stream: sums, the oldest of the ages, each consumer once."""
    ages = [p.last_entry_age_s for p in parts if p.last_entry_age_s is not None]
    waiting = [p.waiting_age_s for p in parts if p.waiting_age_s is not None]
    pendings = [p.oldest_pending for p in parts if p.oldest_pending is not None]
    out = StreamState(
        stream="",
        exists=any(p.exists for p in parts),
        length=sum(p.length for p in parts),
        last_entry_age_s=min(ages) if ages else None,
        entries_added=sum_or_none([p.entries_added for p in parts if p.exists]),
        group_exists=any(p.group_exists for p in parts),
        lag=sum_or_none([p.lag for p in parts if p.group_exists])
        if any(p.group_exists for p in parts)
        else None,
        lag_capped=any(p.lag_capped for p in parts),
        entries_read=sum_or_none([p.entries_read for p in parts if p.group_exists]),
        waiting_age_s=max(waiting) if waiting else None,
        pending=sum(p.pending for p in parts),
        oldest_pending=max(pendings, key=lambda e: e.age_s) if pendings else None,
        arrivals_last_minute=sum(p.arrivals_last_minute for p in parts),
        arrivals_capped=any(p.arrivals_capped for p in parts),
        dead_total=sum(p.dead_total for p in parts),
        dead_counted=sum(p.dead_counted for p in parts),
        dead_last_minute=sum(p.dead_last_minute for p in parts),
        groups_missing=[name for p in parts for name in p.groups_missing],
    )
    with_entries = [p for p in parts if p.last_entry_age_s is not None]
    if with_entries:
        out.last_entry_id = min(with_entries, key=lambda p: p.last_entry_age_s or 0.0).last_entry_id
    reasons: Counter[str] = Counter()
    recreated = [p.group_recreated for p in parts if p.group_recreated is not None]
    out.group_recreated = min(recreated, key=lambda g: g.age_s) if recreated else None
    recent: Counter[str] = Counter()
    for p in parts:
        reasons.update(p.dead_by_reason)
        recent.update(p.dead_last_minute_by_reason)
    out.dead_by_reason = dict(reasons.most_common())
    out.dead_last_minute_by_reason = dict(recent.most_common())
    out.consumers = merge_consumers(p.consumers for p in parts)
    return out


def merge_consumers(per_stream: Iterable[Iterable[ConsumerState]]) -> list[ConsumerState]:
    """Each consumer once, by name, whatever the number of partitions it reads: its
    pending entries summed, its shortest idle time, and the stream it was first seen
    on (whose heartbeat key it writes, like every other stream it reads)."""
    consumers: dict[str, ConsumerState] = {}
    for states in per_stream:
        for cs in states:
            seen = consumers.get(cs.name)
            if seen is None:
                consumers[cs.name] = cs
            else:
                seen.pending += cs.pending
                seen.idle_s = min(seen.idle_s, cs.idle_s)
    return sorted(consumers.values(), key=lambda cs: cs.name)


def dead_stream_name(settings: Settings) -> str:
    """The dead-letter stream as shown: `<stream>:dead`, or `<stream>:{i}:dead` for the
    dead-letter streams of every partition."""
    if not settings.partitions:
        return settings.dead_stream
    return partition_dead_stream(settings.stream, 0).replace("{0}", "{i}")


def write_refusal(r: Any) -> str:
    """Why Redis takes no write now, from its own state: a replica (as during a
    failover), or a failed snapshot with `stop-writes-on-bgsave-error` (MISCONF).
    A full Redis is seen in the consumers' heartbeats, which still get through (and by
    `/readyz` from its memory). Empty when it takes writes."""
    replies = r.info("replication"), r.info("persistence")
    nodes: list[list[dict[str, Any]]] = []
    for reply in replies:
        # A cluster client asks every node: one dict per node.
        values = list(reply.values()) if "role" not in reply and "loading" not in reply else [reply]
        nodes.append([v for v in values if isinstance(v, dict)])
    for info in nodes[0]:
        if info.get("role") == "slave":
            master = f"{info.get('master_host')}:{info.get('master_port')}"
            link = info.get("master_link_status", "down")
            return (
                f"Redis is a read only replica (of {master}, link {link}): it refuses writes "
                "(READONLY), and consumers wait for a writable master"
            )
    if any(info.get("rdb_last_bgsave_status") == "err" for info in nodes[1]):
        try:
            config = r.config_get("stop-writes-on-bgsave-error")
            config.update(r.config_get("save"))
        except (redis.RedisError, RedisClusterException):
            config = {}  # CONFIG is often disabled on managed servers
        first = next(iter(config.values()), None)
        if isinstance(first, dict):  # a cluster client: one node's
            config = first
        refusing = reply_text(config.get("stop-writes-on-bgsave-error", "")) == "yes" and bool(
            reply_text(config.get("save", "")).strip()
        )
        if refusing or not config:
            return (
                "Redis refuses writes (MISCONF)"
                + ("" if refusing else ", if snapshots are on")
                + ": its last RDB snapshot failed; consumers wait until one succeeds"
            )
    return ""
