"""Redis stream and consumer-group operations, one function per round trip."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from . import _native
from . import constants as c
from .config import Settings
from .constants import SAMPLE_PAGE_BYTES, dead_letter_ids_key
from .errors import ConfigError, FilepipeError, TransientError
from .redaction import error_line, mask_url
from .retry import redis_login_refusal, redis_refusal

Fields = dict[bytes, bytes]
# Every reason a dead letter can give: the extension's one registry of them.
REASON_CODES: frozenset[str] = frozenset(_native.reason_codes())
Entry = tuple[bytes, Fields]


def connect(settings: Settings, *, socket_timeout: float | None = None) -> redis.Redis:
    """A client for `settings.redis_url` whose socket timeout outlasts a blocking read:
    a `RedisCluster` (which follows MOVED and ASK redirections) with REDIS_CLUSTER=1.
    `rediss://` URLs use TLS; their `ssl_*` query parameters are passed to redis-py.

    Replies stay bytes: the extension parses them without decoding twice."""
    timeout = (
        socket_timeout
        if socket_timeout is not None
        else settings.block_ms / 1000 + max(2.0, settings.connect_timeout_s)
    )
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": timeout,
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 30,
        # No silent retries inside redis-py: a command whose reply was lost may have run
        # (an XADD twice, a read delivered), so the caller decides what is safe to repeat.
        "retry": Retry(NoBackoff(), retries=0),
        "retry_on_timeout": False,
        "client_name": "filepipe",
    }
    client = _connect_cluster(settings, options) if settings.redis_cluster else redis.Redis.from_url(
        settings.redis_url, **options
    )
    # The extension reads entries' fields straight from the flat [name, value, …]
    # lists the server sends: turning each entry into a dict first would be wasted work.
    client.set_response_callback("XREADGROUP", _raw_reply)
    return client


def _raw_reply(response: Any, **_options: Any) -> Any:
    return response


def fields_dict(fields: Any) -> Fields:
    """An entry's fields as a dict, whether the reply held a dict or a flat list."""
    if fields is None:
        return {}
    if isinstance(fields, dict):
        return fields
    it = iter(fields)
    # Name/value pairs; not strict, so an odd trailing item is dropped rather than raising
    # while a dead letter is being written.
    return dict(zip(it, it, strict=False))


def _connect_cluster(settings: Settings, options: dict[str, Any]) -> redis.Redis:
    from redis.cluster import RedisCluster

    from .config import mask_url
    from .errors import TransientError
    from .redaction import error_line

    try:
        # Asks the node for the cluster's layout: it must answer now.
        cluster = RedisCluster.from_url(settings.redis_url, **options)
    except (redis.RedisError, RedisClusterException) as e:
        where = mask_url(settings.redis_url)
        raise TransientError(f"cannot reach Redis Cluster at {where}: {error_line(e)}") from e
    return cluster  # type: ignore[return-value]


def is_cluster(r: redis.Redis) -> bool:
    """Whether `r` is a Redis Cluster client."""
    from redis.cluster import RedisCluster

    return isinstance(r, RedisCluster)


def group_missing(e: BaseException) -> bool:
    """Whether Redis refused a command because the consumer group (or its stream) is
    not there: Redis was flushed or restarted without persistence, or the stream or the
    group was deleted (a blocked read is woken with UNBLOCKED then)."""
    if not isinstance(e, redis.ResponseError):
        return False
    text = str(e)
    return "NOGROUP" in text or text.startswith("UNBLOCKED")


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


def _group_exists(r: redis.Redis, stream: str, group: str) -> bool:
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:
        return False  # no such stream
    return any(g["name"] in (group, group.encode()) for g in groups)


def read_new(
    r: redis.Redis, stream: str, group: str, consumer: str, count: int, block_ms: int
) -> list[Entry]:
    """XREADGROUP `>`: up to `count` never-delivered entries, blocking up to `block_ms`
    (0: not at all)."""
    return _entries(_xreadgroup(r, stream, group, consumer, b">", count, block_ms or None))


def read_own_pending(
    r: redis.Redis, stream: str, group: str, consumer: str, count: int, after: bytes = b"0"
) -> list[Entry]:
    """XREADGROUP from `after`: this consumer's own delivered-but-unacked entries."""
    return _entries(_xreadgroup(r, stream, group, consumer, after, count, None))


def _xreadgroup(r: redis.Redis, stream: str, group: str, consumer: str, after: bytes, count: int,
                block_ms: int | None) -> Any:
    if not is_cluster(r):
        return r.xreadgroup(group, consumer, {stream: after}, count=count, block=block_ms)
    # XREADGROUP's keys are "movable": left to itself, the cluster client would ask a
    # node (COMMAND GETKEYS) before every read. The stream's slot names the node; a
    # stale slot map is corrected by the MOVED reply, which the client follows.
    args: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    args += ["STREAMS", stream, after]
    return r.execute_command(*args, target_nodes=r.get_node_from_key(stream))  # type: ignore[attr-defined,no-untyped-call]


def _entries(reply: Any) -> list[Entry]:
    """The entries of a one-stream XREADGROUP reply: a map under RESP3, a list under RESP2."""
    if not reply:
        return []
    value = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    # redis-py's own RESP3 parsing wraps the entries in one more list.
    if value and isinstance(value[0], list) and value[0] and isinstance(value[0][0], list):
        value = value[0]
    return list(value)


class ReadSize:
    """How many entries to ask Redis for at once: at most CONSUMER_BATCH_SIZE, and about
    FILEPIPE_BATCH_BYTES worth at the sizes of the entries seen last, so that memory
    follows the bytes in flight, not the count. It starts at FILEPIPE_BATCH_BYTES /
    FILEPIPE_MAX_ENTRY_BYTES entries (the first read after a start stays within the byte
    budget even if every entry is as big as allowed), doubles after each batch while the
    entries are small, and drops at once to what the budget allows when they are big.
    (A read cannot be cut by bytes: the reads made right after entries turn from small to
    big, before the first big batch is parsed, can exceed the budget; at most three, as
    the reader works up to two batches ahead of the parser.)"""

    def __init__(self, batch_size: int, batch_bytes: int, max_entry_bytes: int) -> None:
        self.limit = batch_size
        self.budget = batch_bytes
        self.count = max(1, min(batch_size, batch_bytes // max(1, max_entry_bytes)))
        self.fits = self.count  # entries the budget allows at the sizes seen last

    def observe(self, entries: int, nbytes: int) -> None:
        """A batch of `entries` entries held `nbytes` bytes (ids, names and values)."""
        if entries <= 0:
            return
        self.fits = fits = max(1, int(self.budget * entries / max(1, nbytes)))
        self.count = max(1, min(self.limit, fits, self.count * 2))

    def raise_to(self, entries: int) -> None:
        """At least `entries` per read (the round trips to cover, consumer.pace), within
        the cap and what the budget allows at the sizes seen last (before any entry was
        seen, the first reads' size)."""
        self.count = max(self.count, min(self.limit, self.fits, entries))


def entries_bytes(entries: Iterable[Any]) -> int:
    """About how many bytes entries read by redis-py hold (ids, names and values). For the
    readers that sample a stream (status, dashboard, dlq); the consumer counts in the
    extension."""
    total = 0
    for entry_id, fields in entries:
        total += len(entry_id)
        if isinstance(fields, dict):
            total += sum(len(k) + len(v) for k, v in fields.items())
        elif fields:
            total += sum(len(x) for x in fields)
    return total


def read_pages(
    r: redis.Redis,
    key: str,
    start: str | bytes = "-",
    end: str | bytes = "+",
    *,
    reverse: bool = False,
    limit: int | None = None,
    budget: int = SAMPLE_PAGE_BYTES,
    total_budget: int | None = None,
) -> Iterator[list[Any]]:
    """The entries of `key` from `start` to `end` (XREVRANGE from `start` down to `end`
    with `reverse`), page by page: each page asks for about `budget` bytes worth at the
    sizes seen so far (16 entries at first), so that big entries are read a few at a
    time. Stops after `limit` entries, or once `total_budget` bytes have been read."""
    size = ReadSize(1 << 30, budget, budget // 16)
    read = nbytes = 0
    while limit is None or read < limit:
        count = size.count if limit is None else min(size.count, limit - read)
        if reverse:
            page = r.xrevrange(key, max=start, min=end, count=count) or []
        else:
            page = r.xrange(key, min=start, max=end, count=count) or []
        if not page:
            return
        yield page
        n = entries_bytes(page)
        read, nbytes = read + len(page), nbytes + n
        size.observe(len(page), n)
        if len(page) < count or (total_budget is not None and nbytes >= total_budget):
            return
        last = page[-1][0]
        start = b"(" + (last if isinstance(last, bytes) else str(last).encode())


@dataclass(frozen=True)
class DeadLetter:
    """A rejected entry on its way to the dead-letter stream."""

    source_id: bytes
    fields: Fields
    reason: str
    error: str
    deliveries: int = 1

    def __post_init__(self) -> None:
        if self.reason not in REASON_CODES:
            raise ValueError(f"unknown reason code {self.reason!r}: add it to rust/error.rs")

    def size(self) -> int:
        """About how many bytes it holds."""
        return 64 + len(self.error) + sum(len(k) + len(v) for k, v in self.fields.items())


# A dead letter is the entry's own fields, exactly as they were (names, values, order),
# followed by the fields the consumer adds. The first added one, `original_fields`, says
# how many fields came before it: it sits at that very position, which is how a reader
# tells it from an entry field of the same name. Whatever names the entry used (`error`,
# `reason`, `orig_x`, `original_fields`), its fields come back byte for byte; a reader by
# name (a dict of the fields) sees the added values, which come last.
ORIGINAL_FIELDS = b"original_fields"
# Added when a dead letter could not keep every field of its entry: such a dead letter
# cannot be replayed faithfully.
FIELDS_DROPPED = b"fields_dropped"
# Added after `source_id` when a dead letter holds an excerpt of its entry, not the entry
# itself: a JSON object saying what was cut (see `excerpt`). Such a dead letter cannot be
# replayed faithfully.
TRUNCATED_FIELD = b"truncated"
INCOMPLETE_MARKERS = (FIELDS_DROPPED, TRUNCATED_FIELD)
# The event contract's fields, kept first in an excerpt: they say which upload it was.
_CONTRACT_FIELDS = (b"file_id", b"filename", b"key", b"path", b"size", b"content_type", b"uploaded_at",
                    b"storage")
# How many cut fields the `truncated` field names, and how much of each name it shows.
_CUT_LISTED = 100
_CUT_NAME_CHARS = 64


def dead_letter_fields(
    d: DeadLetter, consumer: str, max_items: int | None = None
) -> list[tuple[bytes, bytes]]:
    """The dead letter's fields: the entry's own, then `original_fields`, error, reason,
    consumer, deliveries and source_id. Of an entry larger than a dead letter holds whole,
    an excerpt of its fields, and `truncated` (see `excerpt`). With `max_items`
    (names and values counted apart), only as many of the entry's fields as fit are kept,
    and `fields_dropped` says how many were not."""
    kept, truncated = excerpt(d.fields)
    original = list(kept.items())
    added = [
        (b"error", d.error.encode()),
        (b"reason", d.reason.encode()),
        (b"consumer", consumer.encode()),
        (b"deliveries", str(d.deliveries).encode()),
        (b"source_id", d.source_id),
    ]
    if truncated is not None:
        added.append((TRUNCATED_FIELD, truncated))
    dropped = 0
    if max_items is not None and 2 * (len(original) + len(added) + 1) > max_items:
        keep = max(0, max_items // 2 - len(added) - 2)
        dropped = len(original) - keep
        original = original[:keep]
    out = [*original, (ORIGINAL_FIELDS, str(len(original)).encode()), *added]
    if dropped:
        out.append((FIELDS_DROPPED, str(dropped).encode()))
    return out


def excerpt(fields: Fields) -> tuple[Fields, bytes | None]:
    """The fields a dead letter keeps of an entry, and the value of its `truncated` field
    (None: the entry is kept whole).

    An entry of at most DEAD_LETTER_MAX_FIELDS fields and DEAD_LETTER_MAX_BYTES bytes (the
    default caps on entries) is kept whole. A larger one is excerpted, so that one hostile
    entry cannot double its memory in the dead-letter stream: the contract's fields first,
    then the others in entry order, each name or value longer than DEAD_LETTER_EXCERPT_BYTES
    cut to its first bytes and marked `…(cut: <size> bytes)`, until either bound is reached.
    `truncated` is a JSON object: the entry's `fields` and `bytes`, how many fields were
    `kept`, and `cut`: [name, original size] of the first values (or names) cut."""
    count = len(fields)
    size = sum(len(k) + len(v) for k, v in fields.items())
    if count <= c.DEAD_LETTER_MAX_FIELDS and size <= c.DEAD_LETTER_MAX_BYTES:
        return fields, None
    first = [k for k in _CONTRACT_FIELDS if k in fields]
    # Only as many of the other fields are looked at as can be kept.
    others = (k for k in fields if k not in _CONTRACT_FIELDS)
    names = [*first, *itertools.islice(others, c.DEAD_LETTER_MAX_FIELDS - len(first))]
    kept: Fields = {}
    cut: list[tuple[str, int]] = []
    used = cut_count = 0
    for name in names:
        value = fields[name]
        short_name, short_value = _cut(name), _cut(value)
        if used + len(short_name) + len(short_value) > c.DEAD_LETTER_MAX_BYTES:
            break
        kept[short_name] = short_value
        used += len(short_name) + len(short_value)
        for original, short in ((name, short_name), (value, short_value)):
            if short is not original:
                cut_count += 1
                if len(cut) < _CUT_LISTED:
                    label = name.decode("utf-8", "backslashreplace")[:_CUT_NAME_CHARS]
                    cut.append((label, len(original)))
    marker = {"fields": count, "bytes": size, "kept": len(kept), "cut": cut, "cut_count": cut_count}
    return kept, json.dumps(marker, ensure_ascii=False).encode()


def _cut(value: bytes) -> bytes:
    """`value`, or its first DEAD_LETTER_EXCERPT_BYTES bytes (at a UTF-8 character boundary
    when it is text) marked as cut."""
    if len(value) <= c.DEAD_LETTER_EXCERPT_BYTES:
        return value
    end = c.DEAD_LETTER_EXCERPT_BYTES
    # Not inside a UTF-8 character (at most 3 continuation bytes follow its first).
    while end > c.DEAD_LETTER_EXCERPT_BYTES - 3 and value[end] & 0xC0 == 0x80:
        end -= 1
    return value[:end] + f"…(cut: {len(value)} bytes)".encode()


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
    read-only replica, MISCONF) raises before anything is written."""
    dead = list(dead)
    if not ids and not dead:
        return AckResult()
    args: list[Any] = [group, len(dead)]
    for d in dead:
        # Lua's unpack() has a limit: as many of the entry's fields as fit under it.
        items = [x for kv in dead_letter_fields(d, consumer, _MAX_DEAD_ITEMS) for x in kv]
        args += [d.source_id, len(items), *items]
    args += list(ids)
    keys = (stream, dead_stream, dead_letter_ids_key(stream))
    try:
        reply = r.evalsha(_ACK_SHA, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        reply = r.eval(_ACK_SCRIPT, len(keys), *keys, *args)
    acked, outcomes, refusal = reply
    result = AckResult(acked=int(acked), refusal=refusal.decode() if isinstance(refusal, bytes) else refusal)
    for d, outcome in zip(dead, outcomes.decode() if isinstance(outcomes, bytes) else outcomes, strict=True):
        if outcome == "w":
            result.written.append(d)
        elif outcome == "h":
            result.held.append(d)
        else:
            result.skipped.append(d)
    return result


_MAX_DEAD_ITEMS = 6000

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


def set_heartbeats(r: redis.Redis, values: dict[str, str], ttl_s: int) -> None:
    """SET each heartbeat key to its value with a TTL, in one round trip. Written by a
    script flagged `allow-oom`, so that a consumer waiting out a full Redis still shows
    that it is alive (and why it waits): each heartbeat overwrites a key of about the same
    size, so it does not grow memory."""
    for attempt in range(2):
        pipe = r.pipeline(transaction=False)
        for key, value in values.items():
            pipe.evalsha(_HEARTBEAT_SHA, 1, key, value, ttl_s)
        try:
            pipe.execute()
            return
        except redis.exceptions.NoScriptError:
            if attempt:
                raise
            r.script_load(_HEARTBEAT_SCRIPT)


_HEARTBEAT_SCRIPT = "#!lua flags=allow-oom\nreturn redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])\n"
_HEARTBEAT_SHA = hashlib.sha1(_HEARTBEAT_SCRIPT.encode()).hexdigest()


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
        name = row["name"].decode() if isinstance(row["name"], bytes) else row["name"]
        if name == consumer:
            return int(row["pending"])
    return 0


def group_lag(r: redis.Redis, stream: str, group: str) -> int | None:
    """Entries in the stream not yet delivered to the group (Redis 7 `lag`)."""
    for g in r.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            lag = g.get("lag")
            return None if lag is None else int(lag)
    return None


def failure(settings: Settings, e: redis.RedisError) -> FilepipeError:
    """What a command says when Redis failed it: a ConfigError (exit 2) with Redis's own
    reason when it refused the login or the database for good, else a TransientError."""
    where = mask_url(settings.redis_url)
    refusal = redis_login_refusal(e)
    if refusal is not None:
        return ConfigError(f"Redis at {where} refused the connection: {refusal} (check REDIS_URL)")
    return TransientError(f"cannot reach Redis at {where}: {error_line(e)}")
