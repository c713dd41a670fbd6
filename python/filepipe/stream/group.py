"""The consumer group: creating it, and what it has delivered and not acknowledged."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from ..constants import GROUP_RECREATED_TTL_S, group_recreated_key
from ..retry import redis_refusal
from .client import reply_text


def ensure_group(r: redis.Redis, stream: str, group: str) -> bool:
    """Creates the consumer group (and the stream) if missing. True if it was created.

    A new group starts at the beginning of the stream, so events produced before any
    consumer existed are processed too."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
        return True
    except redis.ResponseError as e:
        if "BUSYGROUP" in str(e):
            return False
        # A Redis that refuses writes (full, a replica) refuses this one before it looks
        # for the group: if the group is there, that is all that is needed.
        if redis_refusal(e) is not None and _group_exists(r, stream, group):
            return False
        raise


def note_recreated(r: redis.Redis, stream: str, group: str, consumer: str, reason: str) -> None:
    """Records that `consumer` found the group missing (`reason`: Redis's reply) and
    created it again (`constants.group_recreated_key`), for `filepipe status`."""
    value = json.dumps({"consumer": consumer, "reason": reason})
    r.set(group_recreated_key(stream, group), value, ex=GROUP_RECREATED_TTL_S)


def _group_exists(r: redis.Redis, stream: str, group: str) -> bool:
    try:
        return group_info(r, stream, group) is not None
    except redis.ResponseError:
        return False  # no such stream


def still_pending(r: redis.Redis, stream: str, group: str, ids: Sequence[bytes]) -> set[bytes]:
    """Which of `ids` are pending in the group (delivered to anyone, not acknowledged)."""
    if not ids:
        return set()
    keyed = sorted(ids, key=id_key)
    rows = r.xpending_range(stream, group, min=keyed[0], max=keyed[-1], count=len(ids) + 10_000)
    wanted = set(ids)
    return {row["message_id"] for row in rows if row["message_id"] in wanted}


def id_key(entry_id: bytes) -> tuple[int, int]:
    """Sort key of a stream entry id."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def pending_count(r: redis.Redis, stream: str, group: str, consumer: str | None = None) -> int:
    """Entries delivered and not acknowledged: the group's, or one consumer's."""
    if consumer is None:
        info = r.xpending(stream, group)
        return int(info["pending"])
    rows = r.xpending_range(stream, group, min="-", max="+", count=1, consumername=consumer)
    if not rows:
        return 0
    summary = r.xpending(stream, group)
    for row in summary.get("consumers", []):
        if reply_text(row["name"]) == consumer:
            return int(row["pending"])
    return 0


def pending_counts(r: redis.Redis, stream: str, group: str, consumer: str) -> tuple[int, int]:
    """Entries delivered and not acknowledged: the group's and `consumer`'s, in one round trip."""
    summary = r.xpending(stream, group)
    mine = next((row for row in summary.get("consumers") or [] if reply_text(row["name"]) == consumer), None)
    return int(summary["pending"]), int(mine["pending"]) if mine else 0


def group_info(r: redis.Redis, stream: str, group: str) -> dict[str, Any] | None:
    """The group's row of XINFO GROUPS (name, consumers, pending, last-delivered-id, and on
    Redis 7 entries-read and lag), None when the stream has no such group."""
    return group_row(r.xinfo_groups(stream), group)


def group_row(groups: Iterable[dict[str, Any]], group: str) -> dict[str, Any] | None:
    """`group`'s row in an XINFO GROUPS reply (one read in a pipeline), None without it."""
    return next((g for g in groups if reply_text(g.get("name")) == group), None)
