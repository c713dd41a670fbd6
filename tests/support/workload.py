"""Building workloads for fault tests and benches: files in a storage root, events on
a stream (some of them poison), consumers as real subprocesses, and exact checks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from filepipe.config import Settings
from filepipe.partitions import stream_for

# Each poison kind: (reason the consumer must give, how to spoil a good event).
POISON_KINDS: list[tuple[str, dict[str, Any]]] = [
    ("missing_field", {"file_id": None}),
    ("bad_uuid", {"file_id": "not-a-uuid"}),
    ("bad_timestamp", {"uploaded_at": "2024-02-30T25:00:00Z"}),
    ("bad_size", {"size": "-3"}),
    ("bad_storage", {"storage": "tape"}),
    ("bad_content_type", {"content_type": "no slash"}),
    ("not_utf8", {"filename": b"\xc3\x28bad"}),
    ("nul_byte", {"filename": "nul\x00name"}),
    ("unsafe_key", {"key": "../outside/canary.txt"}),
    ("unsafe_key", {"key": "/etc/passwd"}),
    ("unsafe_key", {"key": "link-out"}),
    ("missing", {"key": "no/such/file.txt"}),
    ("too_large", {"key": "huge.bin"}),
    ("not_a_file", {"key": "fifo"}),
]


@dataclass
class Workload:
    good: int = 0
    poison: dict[bytes, str] = field(default_factory=dict)  # entry id -> expected reason
    ids: list[bytes] = field(default_factory=list)  # with partitions: `{i}/<entry id>`, as in stream_id


def prepare_storage(root: Path, *, max_file_bytes: int = 64 * 1024) -> None:
    """The special files poison entries point at: a canary outside the root, a symlink
    to it, a file over the size limit, a FIFO."""
    root.mkdir(parents=True, exist_ok=True)
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "canary.txt").write_bytes(b"CANARY: must never be read")
    link = root / "link-out"
    if not link.is_symlink():
        link.symlink_to(outside / "canary.txt")
    (root / "huge.bin").write_bytes(b"h" * (max_file_bytes + 1))
    fifo = root / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)


def write_data_files(root: Path, files: int = 200) -> None:
    """`root/data/0000.txt` … : the small files good events point at (0.5-1.5 KiB)."""
    for i in range(files):
        p = root / "data" / f"{i:04d}.txt"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"file {i}\n".encode() * (64 + i % 128))


def seed(
    r: redis.Redis,
    settings: Settings,
    root: Path,
    n: int,
    *,
    poison_every: int = 0,
    files: int = 200,
    chunk: int = 2000,
) -> Workload:
    """XADDs `n` events; every `poison_every`-th is poison (cycling through the kinds).
    Good events point at `files` distinct small files, written under `root`. With
    partitions, each event goes to the partition of its file id, like the producer's."""
    prepare_storage(root)
    write_data_files(root, files)
    w = Workload()
    pipe = r.pipeline(transaction=False)
    pending_kinds: list[str | None] = []
    prefixes: list[bytes] = []
    for i in range(n):
        fields: dict[str, Any] = {
            "file_id": str(uuid.uuid4()),
            "filename": f"file {i}.txt",
            "key": f"data/{i % files:04d}.txt",
            "size": "0",
            "uploaded_at": "2024-05-01T12:00:00Z",
        }
        reason = None
        if poison_every and i % poison_every == poison_every - 1:
            reason, spoil = POISON_KINDS[(i // poison_every) % len(POISON_KINDS)]
            for k, v in spoil.items():
                if v is None:
                    fields.pop(k)
                else:
                    fields[k] = v
        target = stream_for(settings, fields.get("file_id"))
        pipe.xadd(target, fields)
        pending_kinds.append(reason)
        prefixes.append(target[len(settings.stream) + 1 :].encode() + b"/" if settings.partitions else b"")
        if len(pending_kinds) >= chunk or i == n - 1:
            for entry_id, kind, prefix in zip(pipe.execute(), pending_kinds, prefixes, strict=True):
                key = prefix + entry_id
                w.ids.append(key)
                if kind is None:
                    w.good += 1
                else:
                    w.poison[key] = kind
            pending_kinds, prefixes = [], []
    return w


@dataclass
class Produced:
    """What `produce_paced` added, and how often Redis refused it for memory."""

    ids: list[bytes] = field(default_factory=list)
    poison: dict[bytes, str] = field(default_factory=dict)
    refusals: int = 0  # XADDs refused with OOM (each sent again)

    @property
    def good(self) -> int:
        return len(self.ids) - len(self.poison)


def backlog(r: redis.Redis, stream: str) -> int:
    """Entries some group has not acknowledged yet (the most of any group): what a producer
    that keeps pace with its consumers lets wait. Before any group, the stream's length."""
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:
        return 0
    if not groups:
        return int(r.xlen(stream))
    return max(int(g["pending"]) + int(g["lag"] if g["lag"] is not None else r.xlen(stream)) for g in groups)


def produce_paced(
    r: redis.Redis,
    settings: Settings,
    n: int,
    *,
    max_backlog: int,
    poison_every: int = 0,
    files: int = 200,
    give_up_s: float = 15.0,
    chunk: int = 500,
    hold: tuple[int, threading.Event] | None = None,
) -> Produced:
    """XADDs `n` events (pointing at `write_data_files`' files) in pipelined chunks, never
    letting more than `max_backlog` wait: a producer as fast as its consumers. An XADD
    refused for memory is counted and sent again; after `give_up_s` of refusals in a row,
    returns what it has. Poison kinds are the first nine (they need no special file).
    With `hold` (k, event), waits for the event once k events are sent: a fault set up
    meanwhile meets the producer with events still to send, however fast the consumer."""
    out = Produced()
    i = 0
    refused_since: float | None = None
    while i < n:
        if hold is not None and i >= hold[0]:
            hold[1].wait()
        while backlog(r, settings.stream) > max_backlog:
            time.sleep(0.005)
        batch: list[tuple[dict[str, Any], str | None]] = []
        for k in range(i, min(n, i + chunk)):
            fields: dict[str, Any] = {
                "file_id": str(uuid.uuid4()),
                "filename": f"file {k}.txt",
                "key": f"data/{k % files:04d}.txt",
                "size": "0",
            }
            reason = None
            if poison_every and k % poison_every == poison_every - 1:
                reason, spoil = POISON_KINDS[(k // poison_every) % 9]
                for name, v in spoil.items():
                    if v is None:
                        fields.pop(name)
                    else:
                        fields[name] = v
            batch.append((fields, reason))
        while batch:
            pipe = r.pipeline(transaction=False)
            for fields, _ in batch:
                pipe.xadd(settings.stream, fields)
            retry = []
            for (fields, reason), reply in zip(batch, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(reply, redis.ResponseError):
                    if "maxmemory" not in str(reply) and not str(reply).startswith("OOM"):
                        raise reply
                    out.refusals += 1
                    retry.append((fields, reason))
                    continue
                out.ids.append(reply)
                if reason is not None:
                    out.poison[reply] = reason
            i += len(batch) - len(retry)
            batch = retry
            if retry:
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > give_up_s:
                    return out
                time.sleep(0.05)
            else:
                refused_since = None
    return out


class MemoryWatch:
    """Samples Redis's used_memory every `interval` seconds (with `progress()`, what the
    run had done by then) and keeps the peak."""

    def __init__(
        self, r: redis.Redis, interval: float = 0.05, progress: Callable[[], int] | None = None
    ) -> None:
        self.r = r
        self.interval = interval
        self.progress = progress
        self.peak = 0
        self.samples: list[tuple[float, int, int]] = []  # (seconds, progress, used_memory)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.interval):
            used = int(self.r.info("memory")["used_memory"])
            self.peak = max(self.peak, used)
            done = self.progress() if self.progress is not None else 0
            self.samples.append((time.monotonic() - t0, done, used))

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def consumer_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `filepipe consume` subprocess for these settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FILEPIPE_", "REDIS", "PG_", "CONSUMER", "STREAM", "LOCAL_STORAGE"))
    }
    env.update(
        {
            "REDIS_URL": settings.redis_url,
            "PG_URI": settings.pg_uri,
            "STREAM_NAME": settings.stream,
            "CONSUMER_GROUP": settings.group,
            "FILEPIPE_TABLE": settings.table,
            "LOCAL_STORAGE_DIR": settings.local_storage_dir,
            "CONSUMER_BLOCK_MS": str(settings.block_ms),
            "CONSUMER_BATCH_SIZE": str(settings.batch_size),
            "MAX_FILE_BYTES": str(settings.max_file_bytes),
            "CLAIM_IDLE_MS": str(settings.claim_idle_ms),
            "MAX_DELIVERIES": str(settings.max_deliveries),
            "FILEPIPE_CONNECT_TIMEOUT": str(settings.connect_timeout_s),
            "FILEPIPE_STATEMENT_TIMEOUT_MS": str(settings.statement_timeout_ms),
            "STREAM_PARTITIONS": str(settings.partitions),
            "REDIS_CLUSTER": str(int(settings.redis_cluster)),
            "FILEPIPE_PGBOUNCER": str(int(settings.pgbouncer)),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def start_consumer(
    settings: Settings, name: str, *args: str, log: Path | None = None, **extra: str
) -> subprocess.Popen[bytes]:
    """`filepipe consume` as a real subprocess."""
    with open(log, "ab") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
        return subprocess.Popen(
            [sys.executable, "-m", "filepipe", "consume", "--consumer-name", name, "-q", *args],
            env=consumer_env(settings, **extra),
            stdout=out,
            stderr=out,
            cwd=settings.local_storage_dir,
        )


def wait_ready(
    r: redis.Redis, settings: Settings, name: str, proc: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    """Waits until consumer `name` has published its first heartbeat (it is reading)."""
    import json
    import time

    from filepipe.constants import heartbeat_key

    def mine() -> bool:
        beat = r.get(heartbeat_key(settings.stream, name))
        return beat is not None and json.loads(beat).get("pid") == proc.pid

    deadline = time.monotonic() + timeout
    while not mine():
        if proc.poll() is not None:
            raise RuntimeError(f"consumer {name} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumer {name} not ready after {timeout} s")
        time.sleep(0.05)


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Polls `check` until it returns something true (and returns that), or fails after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
