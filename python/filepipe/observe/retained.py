"""What the stream keeps in Redis and why, and Redis's memory: one reading
(`read_retention`) that status, the dashboard, both `/metrics` and the benchmark show."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from .. import retention, stream
from ..config import Settings
from ..partitions import partitions
from ..stream import reply_text
from .text import duration, entries


def id_ms(entry_id: Any) -> int:
    """The milliseconds part of a stream entry id."""
    return int(reply_text(entry_id).partition("-")[0] or 0)


def server_ms(r: Any) -> int:
    """The Redis server's clock (TIME), in milliseconds: every age is measured against it."""
    reply = r.time()
    if isinstance(reply, dict):  # a cluster client asks one node and names it
        reply = next(iter(reply.values()))
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


@dataclass
class KeptState:
    """What one (partition) stream keeps in Redis, and why."""

    stream: str
    length: int = 0
    memory_bytes: int = 0
    oldest_id: str = ""
    oldest_age_s: float | None = None
    point: str = ""  # what is below it goes at the next trim
    why: str = ""  # pending | unread | retention | no_group (see retention.TrimResult)
    holder: str = ""  # the group that holds the entries (why pending or unread)
    holder_pending: int = 0
    holder_lag: int | None = None
    trimmable: bool = False  # entries below the point wait for the next pass
    dead_letters: int = 0
    dead_memory_bytes: int = 0
    dead_oldest_age_s: float | None = None


@dataclass
class RedisMemory:
    """Redis's memory against its `maxmemory` (on a cluster: the fullest master)."""

    used_bytes: int = 0
    max_bytes: int = 0  # 0: no maxmemory
    policy: str = ""
    node: str = ""  # on a cluster, which master

    @property
    def share(self) -> float | None:
        return self.used_bytes / self.max_bytes if self.max_bytes else None

    @property
    def refuses_writes(self) -> bool:
        """Full: at maxmemory with nothing to evict (`noeviction`), Redis refuses new entries."""
        return bool(self.max_bytes) and self.used_bytes >= self.max_bytes and self.policy == "noeviction"


@dataclass
class RetentionState:
    """What the stream (every partition) keeps, what Redis has left, and the settings
    that decide it. Read by `read_retention`: status, the dashboard, both /metrics and
    the benchmark all show this one reading."""

    streams: list[KeptState] = field(default_factory=list)
    memory: RedisMemory | None = None
    stream_retention: str = ""  # STREAM_RETENTION as set
    kept_by_retention: str = ""  # what it keeps, in words
    dead_letter_retention: str = ""
    dead_cap: int = 0  # 0: no count limit
    dead_age_s: int = 0  # 0: no age limit

    @property
    def length(self) -> int:
        return sum(k.length for k in self.streams)

    @property
    def memory_bytes(self) -> int:
        return sum(k.memory_bytes for k in self.streams)

    @property
    def dead_memory_bytes(self) -> int:
        return sum(k.dead_memory_bytes for k in self.streams)

    @property
    def held(self) -> KeptState | None:
        """The stream that keeps the most entries, if it keeps any."""
        kept = [k for k in self.streams if k.length]
        return max(kept, key=lambda k: k.length) if kept else None

    def reason(self) -> str:
        """Why the entries are kept, in words: `group audit has 5,000 pending (…)`."""
        k = self.held
        if k is None:
            return "nothing: every acknowledged entry is trimmed"
        where = f" on {k.stream}" if len(self.streams) > 1 else ""
        if k.why == "pending":
            age = f", the oldest from {duration(k.oldest_age_s)} ago" if k.oldest_age_s is not None else ""
            text = f"group {k.holder} has {entries(k.holder_pending)} pending{where}{age}"
        elif k.why == "unread":
            lag = entries(k.holder_lag) if k.holder_lag is not None else "entries"
            text = f"group {k.holder} has not read {lag}{where}"
        elif k.why == "retention":
            text = f"STREAM_RETENTION={self.stream_retention} keeps {self.kept_by_retention}"
        elif k.why == "no_group":
            text = f"no consumer group has read {k.stream} yet"
        else:
            text = "-"
        if k.trimmable:
            text += " (the rest goes at the next trim)"
        return text


def read_retention(r: Any, settings: Settings, now_ms: int | None = None) -> RetentionState | None:
    """What every stream of `settings` keeps and why (the plan script, read-only), their
    memory (MEMORY USAGE) and Redis's against maxmemory (INFO memory; on a cluster, the
    fullest master): one pipeline, and one INFO. None where the server refuses the script
    (before Redis 7.0, which trimming needs too)."""
    if now_ms is None:
        now_ms = server_ms(r)
    parts = partitions(settings)
    pipe = r.pipeline(transaction=False)
    for part in parts:
        pipe.execute_command(*retention.plan_command(part, settings))
        pipe.execute_command("MEMORY", "USAGE", part.stream)
        pipe.execute_command("MEMORY", "USAGE", part.dead_stream)
    replies = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, ResponseError):
            return None
        if isinstance(reply, Exception):
            raise reply
    out = RetentionState(
        memory=read_memory(r),
        stream_retention=settings.stream_retention or "none",
        kept_by_retention=settings.stream_window.describe(),
        dead_letter_retention=settings.dead_letter_retention,
        dead_cap=0 if settings.dead_window.keep_all else settings.dead_window.count,
        dead_age_s=0 if settings.dead_window.keep_all else settings.dead_window.age_s,
    )
    for i, part in enumerate(parts):
        plan = retention.parse_plan(part.stream, replies[3 * i])
        kept = KeptState(
            stream=part.stream,
            length=plan.length,
            memory_bytes=int(replies[3 * i + 1] or 0),
            oldest_id=plan.first_id,
            point=plan.point,
            why=plan.why if plan.length else "",
            holder=plan.holder,
            holder_pending=plan.holder_pending,
            holder_lag=plan.holder_lag,
            trimmable=plan.trimmable,
            dead_letters=plan.dead_letters,
            dead_memory_bytes=int(replies[3 * i + 2] or 0),
        )
        if plan.first_id:
            kept.oldest_age_s = max(0.0, (now_ms - id_ms(plan.first_id)) / 1000)
        if plan.dead_first_id:
            kept.dead_oldest_age_s = max(0.0, (now_ms - id_ms(plan.dead_first_id)) / 1000)
        out.streams.append(kept)
    return out


def read_memory(r: Any) -> RedisMemory:
    """INFO memory: used against maxmemory; on a cluster, of the fullest master."""
    if stream.is_cluster(r):
        replies = r.info("memory", target_nodes=r.PRIMARIES)
        nodes = replies.items() if isinstance(replies, dict) and "used_memory" not in replies else []
    else:
        nodes = [("", r.info("memory"))]
    best: RedisMemory | None = None
    for name, info in nodes:
        m = RedisMemory(
            used_bytes=int(info.get("used_memory", 0)),
            max_bytes=int(info.get("maxmemory", 0)),
            policy=str(info.get("maxmemory_policy", "")),
            node=reply_text(name),
        )
        if best is None or (m.share or 0.0, m.used_bytes) > (best.share or 0.0, best.used_bytes):
            best = m
    return best or RedisMemory()


def retention_json(state: RetentionState) -> dict[str, Any]:
    """`state` as JSON, with its totals and the reason in words."""
    d = asdict(state)
    d.update(
        length=state.length,
        memory_bytes=state.memory_bytes,
        dead_memory_bytes=state.dead_memory_bytes,
        reason=state.reason(),
    )
    if state.memory is not None:
        d["memory"]["share"] = state.memory.share
    held = state.held
    d["held"] = None if held is None else {"stream": held.stream, "why": held.why, "group": held.holder}
    return d
