"""XREADGROUP replies read in place (filepipe.stream.reply) on a real Redis: the consumer's
client hands them to the extension as one Reply, the same entries redis-py would have
made; every other reply, error and command on that client is redis-py's as before."""

from __future__ import annotations

import time

import pytest
import redis
from tests.conftest import Env

from filepipe import _native, stream
from filepipe.stream import reply


def seed(env: Env, n: int, **extra: bytes) -> list[bytes]:
    ids = []
    for i in range(n):
        fields = {b"file_id": b"%d" % i, b"key": b"k\r\n%d" % i, **extra}
        ids.append(env.redis.xadd(env.settings.stream, fields))  # type: ignore[arg-type]
    return ids  # type: ignore[return-value]


def test_the_consumers_reads_come_back_as_the_reply_in_place(env: Env) -> None:
    s = env.settings
    big = b"x" * 200_000  # the reply spans many reads of the socket
    ids = seed(env, 30, blob=big)
    stream.ensure_group(env.redis, s.stream, s.group)
    r = stream.connect(s)
    try:
        entries = stream.read_new(r, s.stream, s.group, "c1", 25, 0)
        assert isinstance(entries, _native.Reply)
        assert entries.stream == s.stream.encode()
        plain = env.redis.xrange(s.stream, count=25)
        assert [(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in entries] == [  # type: ignore[index]
            (i, f) for i, f in plain
        ]
        assert _native.entry_ids(entries)[0] == ids[:25]
        # The rest, then nothing: an empty read is redis-py's None, no entries.
        assert len(stream.read_new(r, s.stream, s.group, "c1", 25, 0)) == 5
        assert stream.read_new(r, s.stream, s.group, "c1", 25, 0) == []
        # This consumer's own pending entries, one of them deleted meanwhile: read
        # without fields.
        env.redis.xdel(s.stream, ids[3])
        own = stream.read_own_pending(r, s.stream, s.group, "c1", 100)
        assert isinstance(own, _native.Reply) and len(own) == 30
        assert own[3] == (ids[3], None)
        assert _native.entry_ids(own)[1] == [ids[3]]
        # Other commands on the same connection are redis-py's as before.
        assert r.xlen(s.stream) == 29
        assert r.xpending(s.stream, s.group)["pending"] == 30
        claimed = r.xautoclaim(s.stream, s.group, "c2", 0, count=2)
        assert isinstance(claimed, list) and claimed[1][0][0] == ids[0]
    finally:
        r.close()


def test_errors_and_replies_read_before_it_stay_redis_pys(env: Env) -> None:
    s = env.settings
    seed(env, 3)
    r = stream.connect(s)
    try:
        with pytest.raises(redis.ResponseError, match="NOGROUP"):
            stream.read_new(r, s.stream, "no-such-group", "c1", 10, 0)
        stream.ensure_group(env.redis, s.stream, s.group)
        # A health check's PING is read first, on the same connection, just before the
        # read's own reply.
        conn = r.connection_pool.get_connection()
        conn.health_check_interval = 1
        conn.next_health_check = time.monotonic() - 1
        r.connection_pool.release(conn)
        assert len(stream.read_new(r, s.stream, s.group, "c1", 10, 0)) == 3
        # Outside a read, the parser is hiredis's: replies are objects.
        with reply.entries_in_place():
            pass
        plain = r.xreadgroup(s.group, "c1", {s.stream: b"0"}, count=10)
        assert not isinstance(plain, _native.Reply) and len(stream.read._entries(plain)) == 3
    finally:
        r.close()


def test_a_read_cut_short_by_its_timeout_leaves_the_client_working(env: Env) -> None:
    s = env.settings
    stream.ensure_group(env.redis, s.stream, s.group)
    r = stream.connect(s, socket_timeout=0.2)
    try:
        with pytest.raises(redis.TimeoutError):
            stream.read_new(r, s.stream, s.group, "c1", 10, 1000)  # blocks past the timeout
        seed(env, 2)
        assert len(stream.read_new(r, s.stream, s.group, "c1", 10, 0)) == 2
    finally:
        r.close()


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    packer = reply.command_packer()
    assert packer is not None
    default = redis.connection.HiredisRespSerializer()
    for args in [
        ("XACK", "s", "g", b"1-0", b"1-1"),
        ("CLIENT SETNAME", "x"),
        (b"CONFIG GET", b"maxmemory"),
        ("SET", "k", bytearray(b"v"), 3, 1.5, memoryview(b"w")),
    ]:
        assert b"".join(packer.pack(*args)) == b"".join(default.pack(*args))
    with pytest.raises(redis.DataError):
        packer.pack("SET", "k", None)
