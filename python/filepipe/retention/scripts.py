"""The Lua scripts that find a stream's trim point, and what their arguments and replies
mean: `TRIM_SCRIPT` trims to it (and caps the dead letters, and samples arrivals) in one
atomic step; `PLAN_SCRIPT` only reads it."""

from __future__ import annotations

from typing import Any

from ..config import Window
from ..stream import reply_text

# How far apart (in entries added) the marks of a count retention are: the newest N are
# kept to within N / MARK_STEPS (plus what arrives between two passes).
MARK_STEPS = 64

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

local function dead_first(dead)
  local first = redis.call('XRANGE', dead, '-', '+', 'COUNT', 1)
  return #first > 0 and first[1][1] or ''
end
"""

# KEYS: stream, lease, marks, dead-letter stream, arrival samples. ARGV: lease owner,
# lease ms (0: no lease), keep the stream (1: STREAM_RETENTION=all), count, age ms, mark
# step, dead-letter count, dead-letter age ms, how long arrival samples are kept (ms).
# Returns {-1} when another consumer holds the lease, else {trimmed, point, why, holder,
# its pending, its lag, length, dead letters, dropped, the oldest dead letter's id (with a
# dead-letter age, else ''), the server's time in ms}.
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
local oldest = ''
if tonumber(ARGV[8]) > 0 then
  local cutoff = string.format('%d-0', math.max(now - tonumber(ARGV[8]), 0))
  dropped = dropped + redis.call('XTRIM', KEYS[4], 'MINID', cutoff)
  oldest = dead_first(KEYS[4])
end
return {trimmed, point, why, holder, pending, lag, length, dead_count(KEYS[4]), dropped, oldest, now}
"""
)

# The same reading without writing anything (for status, the dashboard, metrics):
# KEYS: stream, marks, dead-letter stream; ARGV: keep (1: all), count, age ms. Returns
# {exists, point, why, holder, its pending, its lag, length, first entry id, dead letters,
# the oldest dead letter's id}.
PLAN_SCRIPT = (
    "#!lua flags=no-writes\n"
    + _LUA_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '', '', '', 0, -1, 0, '', dead_count(KEYS[3]), dead_first(KEYS[3])}
end
local info = map(redis.call('XINFO', 'STREAM', KEYS[1]))
local point, why, holder, pending, lag = '0-0', 'retention', '', 0, -1
if ARGV[1] ~= '1' then
  point, why, holder, pending, lag = plan(KEYS[1], info, KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]), 1,
                                          false)
end
local first = info['first-entry']
return {1, point, why, holder, pending, lag, info['length'], first and first[1] or '', dead_count(KEYS[3]),
        dead_first(KEYS[3])}
"""
)


def window_args(window: Window) -> list[Any]:
    """The script arguments of a retention window: keep-all flag, count, age in ms."""
    return [1 if window.keep_all else 0, window.count, window.age_s * 1000]


def mark_step(window: Window) -> int:
    """How many entries apart the marks of a count retention are."""
    return max(1, window.count // MARK_STEPS)


def held_fields(reply: Any) -> dict[str, Any]:
    """What both scripts return in places 2 to 7: the trim point, why the entries from
    there on are kept (and the group that keeps them), and the stream's length."""
    lag = int(reply[5])
    return {
        "point": reply_text(reply[1]),
        "why": reply_text(reply[2]),
        "holder": reply_text(reply[3]),
        "holder_pending": int(reply[4]),
        "holder_lag": None if lag < 0 else lag,
        "length": int(reply[6]),
    }
