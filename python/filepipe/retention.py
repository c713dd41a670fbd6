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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from . import constants as c
from . import metrics
from .config import Settings, Window
from .partitions import Partition
from .redaction import error_line
from .retry import is_transient_redis

log = logging.getLogger("filepipe")

# How far apart (in entries added) the marks of a count retention are: the newest N are
# kept to within N / MARK_STEPS (plus what arrives between two passes).
MARK_STEPS = 64
DEPARTED_BATCH = 100  # consumers checked (and removed) per script call

# -- the scripts ---------------------------------------------------------------------------

# Shared by the trim script and the read-only plan script.
_LUA_LIB = """
local function split(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function less(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local function after(id)
  local ms, seq = split(id)
  if #seq < 15 then return ms .. '-' .. string.format('%d', tonumber(seq) + 1) end
  return id
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function map(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
-- The lowest id some group still needs: {point, why, group, its pending, its lag}.
local function hold(stream)
  local point, why, holder, pending, lag = '0-0', 'no_group', '', 0, -1
  local first = true
  for _, raw in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local g = map(raw)
    local p, w = after(g['last-delivered-id']), 'unread'
    if g['pending'] > 0 then
      local oldest = redis.call('XPENDING', stream, g['name'], '-', '+', 1)[1]
      if oldest and less(oldest[1], p) then p, w = oldest[1], 'pending' end
    end
    if first or less(p, point) then
      point, why, holder, pending, lag = p, w, g['name'], g['pending'], g['lag'] or -1
      first = false
    end
  end
  return point, why, holder, pending, lag
end
-- The lowest id STREAM_RETENTION keeps (nil: no limit). With a count, marks (score:
-- entries added so far, member: the last id then) say which ids are older than the
-- newest `count`; `write` adds a mark every `step` entries and drops those not needed.
local function window(stream, marks, count, age_ms, step, write, added, last_id)
  local point = nil
  if age_ms > 0 then
    point = string.format('%d-0', math.max(now_ms() - age_ms, 0))
  end
  if count > 0 then
    if write then
      local newest = redis.call('ZREVRANGE', marks, 0, 0, 'WITHSCORES')
      if #newest > 0 and tonumber(newest[2]) > added then
        redis.call('DEL', marks)  -- the stream was deleted and made again
        newest = {}
      end
      if #newest == 0 or added - tonumber(newest[2]) >= step then
        redis.call('ZADD', marks, added, last_id)
      end
    end
    local mark = redis.call('ZREVRANGEBYSCORE', marks, added - count, '-inf', 'LIMIT', 0, 1, 'WITHSCORES')
    local by_count = '0-0'
    if #mark > 0 then
      by_count = after(mark[1])
      if write then redis.call('ZREMRANGEBYSCORE', marks, '-inf', '(' .. mark[2]) end
    end
    if point == nil or less(point, by_count) then point = by_count end
  end
  return point
end
-- The point the stream is trimmed to, and why the entries from there on are kept.
local function plan(stream, info, marks, count, age_ms, step, write)
  local point, why, holder, pending, lag = hold(stream)
  if count > 0 or age_ms > 0 then
    local keep = window(stream, marks, count, age_ms, step, write, info['entries-added'],
                        info['last-generated-id'])
    if keep ~= nil and less(keep, point) then point, why = keep, 'retention' end
  end
  return point, why, holder, pending, lag
end

local function dead_count(dead)
  return redis.call('XLEN', dead)
end
"""

# KEYS: stream, lease, marks, dead-letter stream, arrival samples. ARGV: lease owner,
# lease ms (0: no lease), keep the stream (1: STREAM_RETENTION=all), count, age ms, mark
# step, dead-letter count, dead-letter age ms, how long arrival samples are kept (ms).
# Returns {-1} when another consumer holds the lease, else {trimmed, point, why, holder,
# its pending, its lag, length, dead letters, dropped}.
TRIM_SCRIPT = (
    "#!lua flags=allow-oom\n"
    + _LUA_LIB
    + """
if tonumber(ARGV[2]) > 0 and not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {-1}
end
local now = now_ms()
local trimmed, point, why, holder, pending, lag, length = 0, '', '', '', 0, -1, 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = map(redis.call('XINFO', 'STREAM', KEYS[1]))
  -- What has arrived by now; the first sample also says what had arrived before the
  -- oldest entry still there.
  if redis.call('EXISTS', KEYS[5]) == 0 and info['first-entry'] then
    local ms = split(info['first-entry'][1])
    local before = math.max(tonumber(ms) - 1, 0)
    redis.call('ZADD', KEYS[5], before, before .. ':' .. (info['entries-added'] - info['length']))
  end
  redis.call('ZADD', KEYS[5], now, now .. ':' .. info['entries-added'])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. (now - tonumber(ARGV[9])))
  redis.call('PEXPIRE', KEYS[5], ARGV[9])  -- gone once no consumer trims the stream
  if ARGV[3] == '1' then
    why = 'retention'
  else
    point, why, holder, pending, lag = plan(KEYS[1], info, KEYS[3], tonumber(ARGV[4]), tonumber(ARGV[5]),
                                            tonumber(ARGV[6]), true)
    trimmed = redis.call('XTRIM', KEYS[1], 'MINID', point)
  end
  length = redis.call('XLEN', KEYS[1])
end
local dropped = 0
if tonumber(ARGV[7]) > 0 then
  dropped = dropped + redis.call('XTRIM', KEYS[4], 'MAXLEN', ARGV[7])
end
if tonumber(ARGV[8]) > 0 then
  local cutoff = string.format('%d-0', math.max(now - tonumber(ARGV[8]), 0))
  dropped = dropped + redis.call('XTRIM', KEYS[4], 'MINID', cutoff)
end
return {trimmed, point, why, holder, pending, lag, length, dead_count(KEYS[4]), dropped}
"""
)

# The same reading without writing anything (for status, the dashboard, metrics):
# KEYS: stream, marks, dead-letter stream; ARGV: keep (1: all), count, age ms. Returns
# {exists, point, why, holder, its pending, its lag, length, first entry id, dead letters}.
PLAN_SCRIPT = (
    "#!lua flags=no-writes\n"
    + _LUA_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '', '', '', 0, -1, 0, '', dead_count(KEYS[3])}
end
local info = map(redis.call('XINFO', 'STREAM', KEYS[1]))
local point, why, holder, pending, lag = '0-0', 'retention', '', 0, -1
if ARGV[1] ~= '1' then
  point, why, holder, pending, lag = plan(KEYS[1], info, KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]), 1,
                                          false)
end
local first = info['first-entry']
return {1, point, why, holder, pending, lag, info['length'], first and first[1] or '', dead_count(KEYS[3])}
"""
)

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


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def window_args(window: Window) -> list[Any]:
    """The script arguments of a retention window: keep-all flag, count, age in ms."""
    return [1 if window.keep_all else 0, window.count, window.age_s * 1000]


def mark_step(window: Window) -> int:
    return max(1, window.count // MARK_STEPS)


# -- one trim ------------------------------------------------------------------------------


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
        **_held(reply),
        dead_letters=int(reply[7]),
        dead_dropped=int(reply[8]),
    )


def _held(reply: Any) -> dict[str, Any]:
    """What both scripts return in places 2 to 7: the trim point, why the entries from
    there on are kept (and the group that keeps them), and the stream's length."""
    lag = int(reply[5])
    return {
        "point": _text(reply[1]),
        "why": _text(reply[2]),
        "holder": _text(reply[3]),
        "holder_pending": int(reply[4]),
        "holder_lag": None if lag < 0 else lag,
        "length": int(reply[6]),
    }


def trim(
    r: redis.Redis,
    parts: Sequence[Partition],
    settings: Settings,
    owner: str,
    *,
    lease_ms: int = c.TRIM_LEASE_MS,
) -> list[TrimResult]:
    """Trims every stream of `parts` (and caps its dead letters) in one pipeline, each
    in one atomic script; `lease_ms=0` trims without taking the lease."""
    pipe = r.pipeline(transaction=False)
    for part in parts:
        # (a cluster pipeline has no eval(): the command itself, routed by its keys)
        pipe.execute_command("EVAL", TRIM_SCRIPT, *trim_args(part, settings, owner, lease_ms))  # type: ignore[no-untyped-call]
    replies = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return [_trim_result(part.stream, reply) for part, reply in zip(parts, replies, strict=True)]


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
        **_held(reply),
        first_id=_text(reply[7]),
        dead_letters=int(reply[8]),
    )


def arrivals_since(r: redis.Redis, stream: str, since_ms: int, added_now: int, cap: int) -> int | None:
    """How many entries were added to `stream` since `since_ms` (server time), from the
    samples each trim writes (a trimmed stream no longer shows it). None when no trim
    wrote one lately: nothing was trimmed, count the entries instead."""
    key = c.arrivals_key(stream)
    slack = since_ms - c.ARRIVALS_SLACK_MS
    before = r.zrevrangebyscore(key, since_ms, slack, start=0, num=1)
    if before:
        return max(0, added_now - int(_text(before[0]).split(":")[1]))
    first = r.zrangebyscore(key, since_ms, "+inf", start=0, num=1, withscores=True)
    if not first:
        return None
    member, at = first[0][0], float(first[0][1])
    # Before the first sample in the window: what is still in the stream.
    older = r.xrange(stream, min=f"{since_ms}-0", max=f"({int(at) + 1}-0", count=cap) or []
    return max(0, added_now - int(_text(member).split(":")[1])) + len(older)


def plan(r: redis.Redis, part: Partition, settings: Settings) -> StreamPlan:
    """What `part` holds and why, in one round trip."""
    return parse_plan(part.stream, r.execute_command(*plan_command(part, settings)))  # type: ignore[no-untyped-call]


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
        _text(row["name"])
        for row in rows
        if int(row["pending"]) == 0 and int(row["idle"]) >= min_idle_ms and _text(row["name"]) != keep
    ]
    removed: list[str] = []
    for i in range(0, len(candidates), DEPARTED_BATCH):
        names = candidates[i : i + DEPARTED_BATCH]
        keys = [part.stream, *(c.heartbeat_key(part.stream, name) for name in names)]
        reply = r.execute_command(  # type: ignore[no-untyped-call]
            "EVAL", DEPART_SCRIPT, len(keys), *keys, group, min_idle_ms, *names
        )
        removed += [_text(name) for name in reply or []]
    return removed


# -- the consumer's housekeeper --------------------------------------------------------------


class Housekeeper:
    """Trims a consumer's streams from its own thread: every `interval` seconds, and as
    soon as `after_entries` entries were acknowledged since the last pass. `acked()` is
    all the consumer calls; `stop()` does a last pass (without waiting for the lease), so
    a drained stream is left trimmed."""

    def __init__(
        self,
        settings: Settings,
        r: redis.Redis,
        parts: Sequence[Partition],
        owner: str,
        *,
        interval: float = c.TRIM_INTERVAL_S,
        after_entries: int = c.TRIM_AFTER_ENTRIES,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = r
        self.parts = list(parts)
        self.owner = owner
        self.interval = interval
        self.after_entries = after_entries
        self.on_error = on_error
        self.last: dict[str, TrimResult] = {}
        self._acked = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error = ""
        self._reported = False  # the error is in the heartbeat's last_error
        self._next_departed = time.monotonic() + min(c.DEPARTED_CHECK_S, settings.claim_idle_ms / 1000)
        self._dead_warned: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="filepipe-housekeeper", daemon=True)
        self._thread.start()

    def acked(self, n: int) -> None:
        """The consumer acknowledged `n` entries (called from its acknowledger)."""
        self._acked += n
        if self._acked >= self.after_entries:
            self._wake.set()

    def stop(self) -> None:
        """Ends the thread, then makes a last pass (departed consumers included)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(30)
        self._thread = None
        self.run_once(lease_ms=0, departed=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            if self._stop.is_set():
                return
            self._wake.clear()
            self.run_once()
            # However fast entries are acknowledged, a pass at most every 100 ms.
            self._stop.wait(0.1)

    def run_once(self, *, lease_ms: int = c.TRIM_LEASE_MS, departed: bool = False) -> list[TrimResult]:
        """One pass over every stream (with `departed`, or when it is time, departed
        consumers are looked for too); never raises: a failure is logged once."""
        self._acked = 0
        try:
            results = trim(self.redis, self.parts, self.settings, self.owner, lease_ms=lease_ms)
            for result in results:
                self._report(result)
            if departed or time.monotonic() >= self._next_departed:
                self._next_departed = time.monotonic() + c.DEPARTED_CHECK_S
                for part, result in zip(self.parts, results, strict=True):
                    if result.leased:
                        self._remove_departed(part)
        except Exception as e:
            self._failed(e)
            return []
        if any(result.leased for result in results):
            self._recovered()
        return results

    def _report(self, result: TrimResult) -> None:
        self.last[result.stream] = result
        if not result.leased:
            return
        if result.trimmed:
            metrics.TRIMMED.inc(result.trimmed)
            log.debug("trimmed %d entries of %s (kept %d: %s)", result.trimmed, result.stream, result.length,
                      result.why)
        dead = next(p.dead_stream for p in self.parts if p.stream == result.stream)
        window = self.settings.dead_window
        if result.dead_dropped:
            metrics.DEAD_DROPPED.inc(result.dead_dropped)
            log.warning("dead-letter stream %s is full: dropped its %d oldest dead letters "
                        "(DEAD_LETTER_RETENTION=%s keeps %s)", dead, result.dead_dropped,
                        self.settings.dead_letter_retention, window.describe())
        if window.count and not window.keep_all:
            if result.dead_letters >= c.DEAD_LETTER_WARN_SHARE * window.count:
                if dead not in self._dead_warned:
                    self._dead_warned.add(dead)
                    log.warning("dead-letter stream %s holds %d dead letters, %d%% of "
                                "DEAD_LETTER_RETENTION=%s: the oldest are dropped beyond %d "
                                "(replay or purge them with `filepipe dlq`)", dead, result.dead_letters,
                                100 * result.dead_letters // window.count,
                                self.settings.dead_letter_retention, window.count)
            elif result.dead_letters < c.DEAD_LETTER_WARN_SHARE * window.count / 2:
                self._dead_warned.discard(dead)

    def _remove_departed(self, part: Partition) -> None:
        s = self.settings
        removed = remove_departed(self.redis, part, s.group, s.claim_idle_ms, keep=self.owner)
        if removed:
            metrics.CONSUMERS_REMOVED.inc(len(removed))
            shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
            log.info("removed %d departed consumer%s from group %s on %s (nothing pending, no heartbeat): %s",
                     len(removed), "" if len(removed) == 1 else "s", s.group, part.stream, shown)

    def _failed(self, e: BaseException) -> None:
        message = error_line(e).split(" script: ")[0]  # not the script's sha and line
        if message == self._error:
            return
        self._error = message
        if is_transient_redis(e) or isinstance(e, RedisClusterException):
            # The reader and the acknowledger already say that Redis is down or refusing.
            log.info("trimming paused while Redis is unreachable or refuses writes (%s)", message)
            return
        log.warning("trimming failed (%s): acknowledged entries stay in Redis until it works", message)
        self._reported = True
        if self.on_error is not None:
            self.on_error(f"trimming: {message}")

    def _recovered(self) -> None:
        if self._error:
            log.info("trimming works again")
            self._error = ""
            if self._reported and self.on_error is not None:
                self.on_error("")
            self._reported = False
