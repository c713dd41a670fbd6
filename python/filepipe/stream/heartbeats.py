"""Writing the consumers' heartbeats, even while Redis is full."""

from __future__ import annotations

import hashlib

import redis


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
