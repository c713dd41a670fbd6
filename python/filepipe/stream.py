"""Redis stream and consumer-group operations, one function per round trip."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .config import Settings

Fields = dict[bytes, bytes]
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
        raise


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


@dataclass(frozen=True)
class DeadLetter:
    """A rejected entry on its way to the dead-letter stream."""

    source_id: bytes
    fields: Fields
    reason: str
    error: str
    deliveries: int = 1


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
INCOMPLETE_MARKERS = (FIELDS_DROPPED,)


def dead_letter_fields(
    d: DeadLetter, consumer: str, max_items: int | None = None
) -> list[tuple[bytes, bytes]]:
    """The dead letter's fields: the entry's own, then `original_fields`, error, reason,
    consumer, deliveries and source_id. With `max_items` (names and values counted
    apart), only as many of the entry's fields as fit are kept, and `fields_dropped`
    says how many were not."""
    original = list(d.fields.items())
    added = [
        (b"error", d.error.encode()),
        (b"reason", d.reason.encode()),
        (b"consumer", consumer.encode()),
        (b"deliveries", str(d.deliveries).encode()),
        (b"source_id", d.source_id),
    ]
    dropped = 0
    if max_items is not None and 2 * (len(original) + len(added) + 1) > max_items:
        keep = max(0, max_items // 2 - len(added) - 2)
        dropped = len(original) - keep
        original = original[:keep]
    out = [*original, (ORIGINAL_FIELDS, str(len(original)).encode()), *added]
    if dropped:
        out.append((FIELDS_DROPPED, str(dropped).encode()))
    return out


def ack(
    r: redis.Redis,
    stream: str,
    group: str,
    ids: Sequence[bytes],
    dead: Iterable[DeadLetter] = (),
    *,
    dead_stream: str,
    consumer: str,
) -> int:
    """Writes the dead letters and acknowledges `ids` (which include theirs) in one
    atomic script: either all of it happens or none of it, so a crash cannot lose a
    dead letter. It is idempotent too: a dead letter is written only while its entry
    is still pending, so running it again (a lost reply, a late retransmission of a
    cut connection, the same entries reclaimed by another consumer while this one was
    stalled) never writes one twice. Returns how many were acked."""
    dead = list(dead)
    if not ids and not dead:
        return 0
    args: list[Any] = [group, len(dead)]
    for d in dead:
        # Lua's unpack() has a limit: as many of the entry's fields as fit under it.
        items = [x for kv in dead_letter_fields(d, consumer, _MAX_DEAD_ITEMS) for x in kv]
        args += [d.source_id, len(items), *items]
    args += list(ids)
    try:
        return int(r.evalsha(_ACK_SHA, 2, stream, dead_stream, *args))
    except redis.exceptions.NoScriptError:
        return int(r.eval(_ACK_SCRIPT, 2, stream, dead_stream, *args))


_MAX_DEAD_ITEMS = 6000

# KEYS: stream, dead-letter stream. ARGV: group, number of dead letters, then for each
# one its source id, the number of field/value items and the items; then the ids to ack.
_ACK_SCRIPT = """
local group = ARGV[1]
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local source, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  if #redis.call('XPENDING', KEYS[1], group, source, source, 1) > 0 then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, i, i + n - 1))
  end
  i = i + n
end
local acked = 0
while i <= #ARGV do
  local last = math.min(i + 999, #ARGV)
  acked = acked + redis.call('XACK', KEYS[1], group, unpack(ARGV, i, last))
  i = last + 1
end
return acked
"""
_ACK_SHA = hashlib.sha1(_ACK_SCRIPT.encode()).hexdigest()


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
