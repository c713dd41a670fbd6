"""What a stream holds and why, read without writing (for status, the dashboard and
/metrics), and how many entries arrived lately even where trimming removed them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from .. import constants as c
from ..config import Settings
from ..partitions import Partition
from ..stream import reply_text
from .scripts import PLAN_SCRIPT, held_fields, window_args


@dataclass(frozen=True)
class StreamPlan:
    """What one stream holds and why (read-only: nothing is trimmed)."""

    stream: str
    exists: bool
    point: str  # entries below it can be trimmed now
    why: str  # see TrimResult
    holder: str
    holder_pending: int
    holder_lag: int | None
    length: int
    first_id: str  # the oldest entry kept
    dead_letters: int
    dead_first_id: str = ""  # the oldest dead letter

    @property
    def trimmable(self) -> bool:
        """Whether the next pass will trim something (the oldest entry is below the point)."""
        return bool(self.first_id) and id_less(self.first_id, self.point)


def id_less(a: str, b: str) -> bool:
    """Whether stream id `a` sorts before `b`."""
    am, _, aseq = a.partition("-")
    bm, _, bseq = b.partition("-")
    return (int(am), int(aseq or 0)) < (int(bm), int(bseq or 0))


def plan_command(part: Partition, settings: Settings) -> list[Any]:
    """The EVAL of the plan script for one stream (to send alone or in a pipeline)."""
    return [
        "EVAL",
        PLAN_SCRIPT,
        3,
        part.stream,
        c.retention_marks_key(part.stream),
        part.dead_stream,
        *window_args(settings.stream_window),
    ]


def parse_plan(stream: str, reply: Any) -> StreamPlan:
    return StreamPlan(
        stream=stream,
        exists=bool(int(reply[0])),
        **held_fields(reply),
        first_id=reply_text(reply[7]),
        dead_letters=int(reply[8]),
        dead_first_id=reply_text(reply[9]),
    )


def arrivals_since(r: redis.Redis, stream: str, since_ms: int, added_now: int, cap: int) -> int | None:
    """How many entries were added to `stream` since `since_ms` (server time), from the
    samples each trim writes (a trimmed stream no longer shows it). None when no trim
    wrote one lately: nothing was trimmed, count the entries instead."""
    key = c.arrivals_key(stream)
    slack = since_ms - c.ARRIVALS_SLACK_MS
    before = r.zrevrangebyscore(key, since_ms, slack, start=0, num=1)
    if before:
        return max(0, added_now - int(reply_text(before[0]).split(":")[1]))
    first = r.zrangebyscore(key, since_ms, "+inf", start=0, num=1, withscores=True)
    if not first:
        return None
    member, at = first[0][0], float(first[0][1])
    # Before the first sample in the window: what is still in the stream.
    older = r.xrange(stream, min=f"{since_ms}-0", max=f"({int(at) + 1}-0", count=cap) or []
    return max(0, added_now - int(reply_text(member).split(":")[1])) + len(older)


def plan(r: redis.Redis, part: Partition, settings: Settings) -> StreamPlan:
    """What `part` holds and why, in one round trip."""
    return parse_plan(part.stream, r.execute_command(*plan_command(part, settings)))  # type: ignore[no-untyped-call]
