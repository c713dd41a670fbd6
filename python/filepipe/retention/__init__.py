"""Keeping Redis small: trimming what every consumer group has acknowledged, capping the
dead-letter streams, and removing consumers that have left the group.

A stream entry can go once no consumer group of the stream needs it any more: every
group has had it delivered (it is at or below the group's last-delivered id) and none
holds it pending. The trim point of a stream is therefore the lowest of, over every
group on it (another application's too), its oldest pending entry and the entry after
its last-delivered id; a group that has not read an entry yet still needs it, and a
stream without any group is not trimmed at all. One Lua script finds that point and
trims with `XTRIM MINID` in the same atomic step, so no group can be created, rewound
(`XGROUP SETID`) or delivered to in between. STREAM_RETENTION can keep more, for
replay (a count and/or an age); never less.

Each consumer runs a `Housekeeper` in its own thread. It trims every stream it reads
(each partition on its own, in the partition's hash slot) every TRIM_INTERVAL_S, and
sooner when it has acknowledged TRIM_AFTER_ENTRIES entries since its last pass: a fast
producer into a small Redis is trimmed as often as it needs to be. A lease per stream
(`SET NX PX` inside the script) lets one consumer trim a stream at a time; the others'
attempts cost one `SET`. The script runs under `maxmemory` too (`allow-oom`): when Redis
is full, trimming is how memory comes back.

In the same pass, the dead-letter stream is capped by DEAD_LETTER_RETENTION (a warning
at DEAD_LETTER_WARN_SHARE of the cap, and a line for every drop), and, every
DEPARTED_CHECK_S, consumers of the group with nothing pending, no heartbeat and idle
for CLAIM_IDLE_MS are removed (`XGROUP DELCONSUMER`, checked and done atomically; a
consumer with pending entries is never removed: its entries are reclaimed first).

Beside each stream, in its hash slot: the lease (`filepipe:trim:<stream>`), the marks of
a count retention (`filepipe:retention:<stream>`), and samples of how many entries had
been added when (`filepipe:arrivals:<stream>`), which `filepipe status` reads to count
the last minute's arrivals of a stream that no longer holds them.

The package, by concern: `scripts` (the Lua that finds the trim point, shared by trimming
and the read-only plan), `trim` (one trimming pass over streams), `plan` (what a stream
holds and why, and its recent arrivals, for status, the dashboard and /metrics), `departed`
(removing consumers that have left) and `housekeeper` (the consumer's thread that runs them).
Every name is importable from `filepipe.retention` itself.
"""

from __future__ import annotations

from .departed import DEPART_SCRIPT, DEPARTED_BATCH, remove_departed
from .housekeeper import Housekeeper
from .plan import StreamPlan, arrivals_since, id_less, parse_plan, plan, plan_command
from .scripts import MARK_STEPS, PLAN_SCRIPT, TRIM_SCRIPT, mark_step, window_args
from .trim import TrimResult, trim, trim_args

__all__ = [
    "DEPARTED_BATCH",
    "DEPART_SCRIPT",
    "MARK_STEPS",
    "PLAN_SCRIPT",
    "TRIM_SCRIPT",
    "Housekeeper",
    "StreamPlan",
    "TrimResult",
    "arrivals_since",
    "id_less",
    "mark_step",
    "parse_plan",
    "plan",
    "plan_command",
    "remove_departed",
    "trim",
    "trim_args",
    "window_args",
]
