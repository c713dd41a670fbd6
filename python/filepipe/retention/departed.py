"""Removing the consumers that have left the group: nothing pending, no heartbeat, idle for
CLAIM_IDLE_MS (checked and done atomically; a consumer with pending entries is never
removed: its entries are reclaimed first)."""

from __future__ import annotations

import redis

from .. import constants as c
from ..partitions import Partition
from ..stream import reply_text

DEPARTED_BATCH = 100  # consumers checked (and removed) per script call

# KEYS: stream, then the heartbeat key of each consumer named in ARGV[3..]. ARGV: group,
# minimum idle ms. Removes each named consumer that has nothing pending, has been idle
# that long and has no heartbeat; returns the names removed.
DEPART_SCRIPT = """
local wanted = {}
for i = 3, #ARGV do
  if redis.call('EXISTS', KEYS[i - 1]) == 0 then wanted[ARGV[i]] = true end
end
local removed = {}
for _, raw in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #raw, 2 do c[raw[i]] = raw[i + 1] end
  if wanted[c['name']] and c['pending'] == 0 and c['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    removed[#removed + 1] = c['name']
  end
end
return removed
"""


def remove_departed(
    r: redis.Redis, part: Partition, group: str, min_idle_ms: int, *, keep: str = ""
) -> list[str]:
    """Removes the consumers of `group` on `part` that have nothing pending, no heartbeat,
    and have been idle `min_idle_ms`; never `keep` (this consumer). Returns their names."""
    try:
        rows = r.xinfo_consumers(part.stream, group)
    except redis.ResponseError as e:
        if "no such key" in str(e).lower() or "nogroup" in str(e).lower():
            return []
        raise
    candidates = [
        reply_text(row["name"])
        for row in rows
        if int(row["pending"]) == 0 and int(row["idle"]) >= min_idle_ms and reply_text(row["name"]) != keep
    ]
    removed: list[str] = []
    for i in range(0, len(candidates), DEPARTED_BATCH):
        names = candidates[i : i + DEPARTED_BATCH]
        keys = [part.stream, *(c.heartbeat_key(part.stream, name) for name in names)]
        reply = r.execute_command(  # type: ignore[no-untyped-call]
            "EVAL", DEPART_SCRIPT, len(keys), *keys, group, min_idle_ms, *names
        )
        removed += [reply_text(name) for name in reply or []]
    return removed
