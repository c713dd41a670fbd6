"""Redis, as the consumer uses it: round trips (PING, XADD, XREADGROUP), a batch read
and acknowledged on a scratch stream, what the configured stream keeps and Redis's memory."""

import contextlib

import redis

from .. import stream
from ..config import Settings
from ..partitions import partitions
from ..redaction import error_line, mask_url
from ..retry import redis_login_refusal
from .figures import DEFAULT_FILE_SIZE, RedisFigures, Timing, repeat, timed
from .scratch import SCRATCH_KEY_PREFIX, event_fields


def measure_redis(settings: Settings, samples: int, batch: int, tag: str) -> RedisFigures:
    """PING, XADD and XREADGROUP round trips, and a batch read and ack, on a scratch stream."""
    f = RedisFigures(url=mask_url(settings.redis_url))
    key = f"{SCRATCH_KEY_PREFIX}{{{tag}}}"  # a hash tag: the stream and its dead letters share a cluster slot
    group = "benchmark"
    r = stream.connect(settings, socket_timeout=max(10.0, settings.connect_timeout_s * 2))
    try:
        f.connect_ms = timed(r.ping) * 1000
        f.version = str(r.info("server").get("redis_version", ""))
        f.ping = Timing.of(repeat(r.ping, samples))
        fields = event_fields(0, "benchmark/0.bin", DEFAULT_FILE_SIZE, "local")
        f.xadd = Timing.of(repeat(lambda: r.xadd(key, fields), samples))  # type: ignore[arg-type]
        r.xgroup_create(key, group, id="0")
        f.xreadgroup = Timing.of(
            repeat(lambda: r.xreadgroup(group, "benchmark", {key: ">"}, count=1), samples)
        )
        pipe = r.pipeline(transaction=False)
        for i in range(batch):
            pipe.xadd(key, event_fields(i, f"benchmark/{i}.bin", DEFAULT_FILE_SIZE, "local"))  # type: ignore[arg-type]
        pipe.execute()
        entries: list[stream.Entry] = []

        def read() -> None:
            entries.extend(stream.read_new(r, key, group, "benchmark", batch, 0))

        f.batch_read_ms = timed(read) * 1000
        ids = [e[0] for e in entries]
        f.batch = len(ids)
        f.batch_ack_ms = (
            timed(lambda: stream.ack(r, key, group, ids, dead_stream=key + ":dead", consumer="benchmark"))
            * 1000
        )
        f.recent_file_size = _recent_declared_size(r, partitions(settings)[0].stream)
        _measure_memory(r, settings, f)
    except redis.RedisError as e:
        refusal = redis_login_refusal(e)
        if refusal is not None:
            f.status, f.error = "refused", f"Redis at {f.url} refuses the connection: {refusal}"
        elif isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
            f.status, f.error = "unreachable", f"cannot reach Redis at {f.url}: {error_line(e)}"
        else:
            f.status, f.error = "error", f"Redis refused the benchmark: {error_line(e)}"
    finally:
        with contextlib.suppress(redis.RedisError):
            for name in (key, key + ":dead"):
                r.delete(name)
        r.close()
    return f


def _measure_memory(r: redis.Redis, settings: Settings, f: RedisFigures) -> None:
    """The stream's length, memory and what keeps its entries, and Redis's memory."""
    from ..observe.retained import read_retention

    kept = read_retention(r, settings)
    if kept is None:
        return
    f.stream_entries, f.stream_memory_bytes, f.kept = kept.length, kept.memory_bytes, kept.reason()
    if kept.memory is not None:
        f.memory_used_bytes, f.memory_max_bytes = kept.memory.used_bytes, kept.memory.max_bytes
        f.memory_policy = kept.memory.policy


def _recent_declared_size(r: redis.Redis, stream_name: str, count: int = 200) -> int | None:
    """The average declared `size` of the stream's latest entries, if any."""
    try:
        latest = r.xrevrange(stream_name, count=count) or []
    except redis.ResponseError:  # not a stream
        return None
    sizes = []
    for _id, fields in latest:
        raw = (fields or {}).get(b"size")
        if raw is not None and raw.isdigit():
            sizes.append(int(raw))
    return round(sum(sizes) / len(sizes)) if sizes else None
