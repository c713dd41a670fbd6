"""One trimming pass: each stream trimmed to the point no group needs below (or what
STREAM_RETENTION keeps), its dead letters capped, in one pipeline of atomic scripts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .. import constants as c
from ..config import Settings
from ..partitions import Partition
from ..stream import reply_text
from .scripts import TRIM_SCRIPT, held_fields, mark_step, window_args


@dataclass(frozen=True)
class TrimResult:
    """What one pass did to one stream."""

    stream: str
    leased: bool  # False: another consumer held the lease, nothing was done
    trimmed: int = 0
    point: str = ""
    why: str = ""  # pending | unread | retention | no_group: what keeps the entries from `point` on
    holder: str = ""  # the group that holds the point back (why pending or unread)
    holder_pending: int = 0
    holder_lag: int | None = None
    length: int = 0
    dead_letters: int = 0
    dead_dropped: int = 0
    dead_oldest_age_ms: int | None = None  # with a dead-letter age: how old the oldest is


def trim_args(part: Partition, settings: Settings, owner: str, lease_ms: int) -> list[Any]:
    """KEYS and ARGV of the trim script for one stream."""
    w, d = settings.stream_window, settings.dead_window
    return [
        5,
        part.stream,
        c.trim_lease_key(part.stream),
        c.retention_marks_key(part.stream),
        part.dead_stream,
        c.arrivals_key(part.stream),
        owner,
        lease_ms,
        *window_args(w),
        mark_step(w),
        0 if d.keep_all else d.count,
        0 if d.keep_all else d.age_s * 1000,
        c.ARRIVALS_KEEP_MS,
    ]


def _trim_result(stream: str, reply: Any) -> TrimResult:
    if int(reply[0]) < 0:
        return TrimResult(stream, leased=False)
    return TrimResult(
        stream,
        leased=True,
        trimmed=int(reply[0]),
        **held_fields(reply),
        dead_letters=int(reply[7]),
        dead_dropped=int(reply[8]),
        dead_oldest_age_ms=int(reply[10]) - int(reply_text(reply[9]).partition("-")[0]) if reply[9] else None,
    )


def trim(
    r: redis.Redis,
    parts: Sequence[Partition],
    settings: Settings,
    owner: str,
    *,
    lease_ms: int = c.TRIM_LEASE_MS,
    also: Callable[[Any], None] | None = None,
) -> list[TrimResult]:
    """Trims every stream of `parts` (and caps its dead letters) in one pipeline, each
    in one atomic script; `lease_ms=0` trims without taking the lease. `also` adds
    commands of the caller's to the pipeline, sent with the trims (their replies and
    errors are not looked at)."""
    pipe = r.pipeline(transaction=False)
    for part in parts:
        # (a cluster pipeline has no eval(): the command itself, routed by its keys)
        pipe.execute_command("EVAL", TRIM_SCRIPT, *trim_args(part, settings, owner, lease_ms))  # type: ignore[no-untyped-call]
    if also is not None:
        also(pipe)
    replies = pipe.execute(raise_on_error=False)[: len(parts)]
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return [_trim_result(part.stream, reply) for part, reply in zip(parts, replies, strict=True)]
