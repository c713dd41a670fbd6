"""Acknowledging a batch and writing its dead letters, in one atomic script."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from .. import constants as c
from ..constants import dead_letter_ids_key
from .client import reply_text
from .dead import DeadLetter, dead_letter_fields


@dataclass
class AckResult:
    """What one run of the acknowledgement script did (its reply)."""

    acked: int = 0  # entries acknowledged by this run (XACK's count)
    written: list[DeadLetter] = field(default_factory=list)
    # Not written: the entry was dead-lettered before (an earlier life of the group, a
    # retry of a run whose reply was lost) or is no longer pending (handled elsewhere).
    skipped: list[DeadLetter] = field(default_factory=list)
    # Not written because Redis is full; their entries are not acknowledged either.
    held: list[DeadLetter] = field(default_factory=list)
    refusal: str = ""  # Redis's reply when it held dead letters back

    def add(self, other: AckResult) -> None:
        self.acked += other.acked
        self.written += other.written
        self.skipped += other.skipped
        self.held, self.refusal = other.held, other.refusal


def ack(
    r: redis.Redis,
    stream: str,
    group: str,
    ids: Sequence[bytes],
    dead: Iterable[DeadLetter] = (),
    *,
    dead_stream: str,
    consumer: str,
    max_fields: int = c.DEAD_LETTER_MAX_FIELDS,
    max_bytes: int = c.DEAD_LETTER_MAX_BYTES,
) -> AckResult:
    """Writes the dead letters and acknowledges `ids` (which include theirs) in one
    atomic script: either all of it happens or none of it, so a crash cannot lose a
    dead letter. A dead letter is written once per entry, ever: only while its entry is
    still pending and not yet recorded in the stream's dead-letter ids, so running it
    again (a lost reply, a late retransmission of a cut connection, the same entries
    reclaimed by another consumer while this one was stalled, the group destroyed and
    created again) never writes one twice.

    A full Redis (`maxmemory`) refuses the dead letters but not the acknowledgements:
    the entries without a dead letter are acknowledged, those with one are held back
    (`AckResult.held`), unacknowledged, to be tried again. Any other refusal (a
    read-only replica, MISCONF) raises before anything is written.

    A dead letter keeps its entry whole when the entry is within `max_fields` and
    `max_bytes` (the consumer's caps: every entry it admitted), or within the default caps
    when those are larger; an excerpt otherwise. One with more fields than a Lua call takes
    is written before the script, in a transaction of its own (`_write_wide`)."""
    dead = list(dead)
    if not ids and not dead:
        return AckResult()
    if not dead:
        # Nothing to write: the script would only acknowledge, at more of Redis's time
        # than a plain XACK takes (about 0.4 µs per entry).
        return AckResult(acked=int(r.xack(stream, group, *ids)))
    max_fields, max_bytes = max(max_fields, c.DEAD_LETTER_MAX_FIELDS), max(max_bytes, c.DEAD_LETTER_MAX_BYTES)
    keys = (stream, dead_stream, dead_letter_ids_key(stream))
    letters = [
        (d, [x for kv in dead_letter_fields(d, consumer, max_fields, max_bytes) for x in kv]) for d in dead
    ]
    wide: dict[bytes, str] = {}
    full = ""  # Redis's refusal of a wide dead letter: the next ones are held back too
    for d, items in letters:
        if len(items) > _MAX_DEAD_ITEMS:
            wide[d.source_id], full = ("h", full) if full else _write_wide(r, keys, group, consumer, d, items)
    if wide:
        # Held back or handled by another consumer now: not acknowledged by this run.
        ids = [i for i in ids if wide.get(i) not in ("h", "o")]
    narrow = [(d, items) for d, items in letters if d.source_id not in wide]
    args: list[Any] = [group, len(narrow)]
    for d, items in narrow:
        args += [d.source_id, len(items), *items]
    args += list(ids)
    try:
        reply = r.evalsha(_ACK_SHA, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        reply = r.eval(_ACK_SCRIPT, len(keys), *keys, *args)
    acked, outcomes, refusal = reply
    result = AckResult(acked=int(acked), refusal=reply_text(refusal) or full)
    replies = iter(reply_text(outcomes))
    for d in dead:
        outcome = wide[d.source_id] if d.source_id in wide else next(replies)
        if outcome == "w":
            result.written.append(d)
        elif outcome == "h":
            result.held.append(d)
        else:
            result.skipped.append(d)
    return result


# Lua's unpack() returns at most about 8,000 values: a dead letter of more items is
# written by `_write_wide`.
_MAX_DEAD_ITEMS = 6000


def _write_wide(
    r: redis.Redis, keys: tuple[str, str, str], group: str, consumer: str, d: DeadLetter, items: list[bytes]
) -> tuple[str, str]:
    """Writes one dead letter too wide for the script: what the script would reply for it
    (w written, d dead-lettered before, p no longer pending, h held back: Redis is full),
    or o: another consumer has claimed its entry since, and will see to it; and Redis's
    refusal when it held it back.

    The dead letter and its id's mark go in one MULTI/EXEC, so a crash leaves both or
    neither; the entry, still pending, is then acknowledged by the script, which finds the
    mark. The checks run under WATCH of the marks: a dead letter another consumer writes
    meanwhile makes the transaction fail, and the checks run again."""
    stream, dead, marks = keys
    member = _mark(d.source_id)
    while True:
        with r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(marks)  # type: ignore[no-untyped-call]
                pending = pipe.xpending_range(stream, group, min=d.source_id, max=d.source_id, count=1)
                if not pending:
                    return "p", ""
                if pipe.zscore(marks, member) is not None:
                    return "d", ""
                owner = pending[0]["consumer"]
                if (owner.decode() if isinstance(owner, bytes) else owner) != consumer:
                    return "o", ""
                pipe.multi()
                pipe.execute_command("XADD", dead, "*", *items)  # type: ignore[no-untyped-call]
                pipe.zadd(marks, {member: 0})
                pipe.execute()
                return "w", ""
            except redis.WatchError:
                continue
            except redis.ResponseError as e:
                _unannotated(e)
                text = str(e)
                if isinstance(e, redis.exceptions.OutOfMemoryError) or text.startswith("OOM "):
                    # redis-py drops the code of the replies it has a class for.
                    return "h", text if text.startswith("OOM ") else f"OOM {text}"
                raise


def _mark(entry_id: bytes) -> bytes:
    """An entry id as a member of the marks: zero-padded, as the script's `mark`."""
    ms, _, seq = entry_id.partition(b"-")
    return ms.rjust(20, b"0") + b"-" + seq.rjust(20, b"0")


def _unannotated(e: redis.ResponseError) -> None:
    """Gives a refused command of a transaction the server's own reply back (redis-py
    puts the command before it), which is what names the refusal (`retry.redis_refusal`)."""
    text = str(e)
    _, sep, reply = text.partition(" of pipeline caused error: ")
    if sep:
        e.args = (reply, *e.args[1:])


# KEYS: stream, dead-letter stream, the stream's dead-letter ids (a sorted set).
# ARGV: group, number of dead letters, then for each one its source id, the number of
# field/value items and the items; then the ids to acknowledge.
# Replies {acked, one letter per dead letter (w written, d dead-lettered before, p no
# longer pending, h held back: Redis is full), Redis's refusal or ''}.
#
# No shebang, on purpose: a script without flags runs when Redis is full, and Redis
# refuses a command that may grow memory (XADD, ZADD) only while the script has written
# nothing yet. So the dead letters are tried first: on a full Redis the first XADD is
# refused, none is written, and the acknowledgements (XACK is allowed when full) still go
# through, which lets trimming free memory. A script flagged `allow-oom` would write the
# dead letters past `maxmemory`; one flagged without it would be refused altogether.
_ACK_SCRIPT = """
local stream, dead, marks = KEYS[1], KEYS[2], KEYS[3]
local group = ARGV[1]
-- An entry id as a member of the sorted set: zero-padded, so that members sort as ids do.
local function mark(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end
local i = 3
local outcomes = {}
local held = {}
local refusal = false
for k = 1, tonumber(ARGV[2]) do
  local source, n = ARGV[i], tonumber(ARGV[i + 1])
  local outcome
  if refusal then
    outcome = 'h'
  elseif #redis.call('XPENDING', stream, group, source, source, 1) == 0 then
    outcome = 'p'
  elseif redis.call('ZSCORE', marks, mark(source)) then
    outcome = 'd'
  else
    local added = redis.pcall('XADD', dead, '*', unpack(ARGV, i + 2, i + 1 + n))
    if type(added) == 'table' and added.err then
      if string.sub(added.err, 1, 4) ~= 'OOM ' then
        return redis.error_reply(added.err)
      end
      refusal = added.err
      outcome = 'h'
    else
      redis.call('ZADD', marks, 0, mark(source))
      outcome = 'w'
    end
  end
  if outcome == 'h' then
    held[source] = true
  end
  outcomes[k] = outcome
  i = i + 2 + n
end
-- Ids of entries older than the stream's first one can never be delivered again.
local oldest = redis.call('ZRANGE', marks, 0, 0)
if #oldest > 0 then
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #first == 0 then
    redis.call('DEL', marks)
  else
    local first_mark = mark(first[1][1])
    if oldest[1] < first_mark then
      redis.call('ZREMRANGEBYLEX', marks, '-', '(' .. first_mark)
    end
  end
end
local acked = 0
if refusal then
  local batch = {}
  for j = i, #ARGV do
    if not held[ARGV[j]] then
      batch[#batch + 1] = ARGV[j]
      if #batch == 1000 then
        acked = acked + redis.call('XACK', stream, group, unpack(batch))
        batch = {}
      end
    end
  end
  if #batch > 0 then
    acked = acked + redis.call('XACK', stream, group, unpack(batch))
  end
else
  while i <= #ARGV do
    local last = math.min(i + 999, #ARGV)
    acked = acked + redis.call('XACK', stream, group, unpack(ARGV, i, last))
    i = last + 1
  end
end
return {acked, table.concat(outcomes), refusal or ''}
"""
_ACK_SHA = hashlib.sha1(_ACK_SCRIPT.encode()).hexdigest()
