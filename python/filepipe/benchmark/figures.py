"""What the benchmark measures: one dataclass of figures per component, as measured,
with the figures derived from them (per entry, per row, per file) as properties."""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings

COMPONENTS = ("redis", "postgres", "storage", "consumer")
KIB = 1024
MIB = 1024 * KIB
DEFAULT_FILE_SIZE = 64 * KIB


@dataclass(frozen=True)
class Timing:
    """Times of one repeated operation, in milliseconds."""

    n: int
    avg: float
    p50: float
    p99: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Timing":
        ms = sorted(s * 1000.0 for s in seconds)
        if not ms:
            return cls(0, 0.0, 0.0, 0.0)
        return cls(len(ms), sum(ms) / len(ms), _percentile(ms, 50), _percentile(ms, 99))


def _percentile(sorted_ms: Sequence[float], pct: float) -> float:
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_ms)))
    return sorted_ms[rank - 1]


@dataclass
class RedisFigures:
    url: str
    status: str = "ok"  # ok | unreachable | refused (for good: the settings must change) | error
    error: str = ""
    version: str = ""
    connect_ms: float = 0.0
    ping: Timing | None = None
    xadd: Timing | None = None
    xreadgroup: Timing | None = None
    batch: int = 0
    batch_read_ms: float = 0.0
    batch_ack_ms: float = 0.0
    recent_file_size: int | None = None  # declared sizes of the latest stream entries
    # What the configured stream keeps and why, and Redis's memory (status.read_retention).
    stream_entries: int | None = None
    stream_memory_bytes: int | None = None
    kept: str = ""
    memory_used_bytes: int | None = None
    memory_max_bytes: int | None = None  # 0: no maxmemory
    memory_policy: str = ""

    @property
    def rtt_ms(self) -> float:
        return self.ping.p50 if self.ping else 0.0

    @property
    def read_fixed_ms(self) -> float:
        return self.xreadgroup.p50 if self.xreadgroup else self.rtt_ms

    @property
    def read_per_entry_ms(self) -> float:
        if self.batch <= 1:
            return 0.0
        return max(0.0, self.batch_read_ms - self.read_fixed_ms) / (self.batch - 1)

    @property
    def ack_per_entry_ms(self) -> float:
        if self.batch <= 0:
            return 0.0
        return max(0.0, self.batch_ack_ms - self.rtt_ms) / self.batch


@dataclass
class PostgresFigures:
    uri: str
    table: str
    status: str = "ok"  # ok | unreachable | refused (for good: the settings must change) | error
    error: str = ""
    server_version: str = ""
    timescaledb: str = ""  # installed version; "" when not installed
    timescaledb_available: bool = False
    # TimescaleDB as `timescale.read_table` finds it: state, edition, chunks (see TableFacts).
    timescale: dict[str, Any] = field(default_factory=dict)
    timescale_lines: list[list[str]] = field(default_factory=list)
    # The other kind of table, loaded the same way, when TimescaleDB can be used: what a
    # batch costs on a hypertable against a plain table (or the reverse), in the same run.
    other_kind: str = ""  # plain | hypertable | "" (not measured)
    other_load_batch_ms: float = 0.0
    table_exists: bool = False
    hypertable: bool = False
    connect_ms: float = 0.0
    new_connection: Timing | None = None
    round_trip: Timing | None = None
    copy_rows: int = 0
    copy_bytes: int = 0
    copy_s: float = 0.0
    load_rows: int = 0
    load_one_ms: float = 0.0
    load_batch_ms: float = 0.0
    load_estimated: bool = False  # no scratch table could be created: load is derived from COPY
    notes: list[str] = field(default_factory=list)
    recent_file_size: int | None = None
    recent_s3_keys: list[tuple[str, int]] = field(default_factory=list)

    @property
    def rtt_ms(self) -> float:
        return self.round_trip.p50 if self.round_trip else 0.0

    @property
    def copy_rows_per_s(self) -> float:
        return self.copy_rows / self.copy_s if self.copy_s > 0 else 0.0

    @property
    def copy_mb_per_s(self) -> float:
        return self.copy_bytes / MIB / self.copy_s if self.copy_s > 0 else 0.0

    @property
    def load_fixed_ms(self) -> float:
        return self.load_one_ms

    @property
    def load_per_row_ms(self) -> float:
        """The slope between loading one row and a batch; never less than a row costs in
        the (larger, steadier) COPY measurement, since network jitter can hide the slope."""
        copy_floor = 1000.0 / self.copy_rows_per_s if self.copy_rows_per_s > 0 else 0.0
        if self.load_rows <= 1:
            return copy_floor
        return max(copy_floor, (self.load_batch_ms - self.load_one_ms) / (self.load_rows - 1))


@dataclass
class StorageFigures:
    kind: str  # local | s3
    where: str
    status: str = "ok"  # ok | unreachable | error | skipped
    error: str = ""
    file_size: int = 0
    files: int = 0
    threads: int = 1
    source: str = "scratch files"
    one_file: Timing | None = None
    batch_s: float = 0.0
    batch_files: int = 0
    warm_batch_s: float = 0.0
    cold: bool = False
    # How local files were read (`_native.file_reads()`): io_uring, or one call at a time.
    reads: str = ""

    @property
    def files_per_s(self) -> float:
        return self.batch_files / self.batch_s if self.batch_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.files_per_s * self.file_size / MIB

    @property
    def warm_mb_per_s(self) -> float:
        if self.warm_batch_s <= 0:
            return 0.0
        return self.batch_files * self.file_size / MIB / self.warm_batch_s

    @property
    def per_file_ms(self) -> float:
        """Storage time per file when a whole batch is measured (concurrently)."""
        return 1000.0 / self.files_per_s if self.files_per_s > 0 else 0.0

    @property
    def effective_concurrency(self) -> float:
        """Requests in flight on average during the batch (Little's law)."""
        return self.files_per_s * (self.one_file.p50 if self.one_file else 0.0) / 1000

    @property
    def fixed_ms(self) -> float:
        """Storage time per batch beyond its files: starting the work, waiting for the
        last file (one object's latency on S3)."""
        return max(0.0, (self.one_file.p50 if self.one_file else 0.0) - self.per_file_ms)

    @property
    def sequential_ms(self) -> float:
        """One file after another, as the guide's consumers read them: one object's
        latency on S3; the per-file time on one thread for local files."""
        if self.kind == "s3" and self.one_file:
            return self.one_file.p50
        return self.per_file_ms * max(1, self.threads)


@dataclass
class HostFigures:
    cpus: int
    parse_encode_us: float  # per event, in the extension


@dataclass
class PipelineRun:
    events: int
    inserted: int = 0
    dead_lettered: int = 0
    produce_s: float = 0.0
    consume_s: float = 0.0
    model_files_per_s: float = 0.0
    model_steady_files_per_s: float = 0.0
    error: str = ""

    @property
    def files_per_s(self) -> float:
        return self.inserted / self.consume_s if self.consume_s > 0 else 0.0


@dataclass
class Figures:
    """Everything measured in one run, and the settings it ran with."""

    settings: Settings
    redis: RedisFigures
    postgres: PostgresFigures
    storage: StorageFigures | None  # the storage the consumers use
    s3: StorageFigures | None  # S3 when a bucket is configured (the same object if it is used)
    host: HostFigures | None
    file_size: int
    file_size_source: str
    tag: str = ""  # in the name of every scratch stream, table, file and object of the run

    @property
    def unreachable(self) -> list[str]:
        down = []
        if self.redis.status == "unreachable":
            down.append("redis")
        if self.postgres.status == "unreachable":
            down.append("postgres")
        if self.storage is not None and self.storage.status == "unreachable":
            down.append("storage")
        return down

    @property
    def refused(self) -> list[str]:
        """Services that answered but will not take a connection with these settings."""
        services = (("redis", self.redis.status), ("postgres", self.postgres.status))
        return [name for name, state in services if state == "refused"]

    @property
    def failed(self) -> list[str]:
        """Components that answered but could not be measured."""
        parts = [("redis", self.redis.status), ("postgres", self.postgres.status)]
        parts += [("storage", st.status) for st in (self.storage, self.s3) if st is not None]
        return [name for name, state in parts if state == "error"]


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn()` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeat(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds each of `n` calls of `fn()` takes."""
    return [timed(fn) for _ in range(n)]
