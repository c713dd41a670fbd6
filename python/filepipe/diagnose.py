"""`filepipe benchmark`: where the time goes, and what to do about it.

The seed's `python benchmark.py` measured Redis and the database and said which one
was the bottleneck. This does the same with more figures (Redis, PostgreSQL, the
storage, this host's CPU), then models what each consumer design would do with
them and names the one component that limits throughput, with a fix.

The model, per batch of B entries. The consumer reads and prepares the next batch
while the loader commits the previous one, so the slower of two stages sets the pace:

    read stage = XREADGROUP(B) + B x storage time per file + B x parse/encode
    load stage = pooled COPY + INSERT + COMMIT of B rows + XACK(B)

Every term is measured as "fixed per batch + per entry", so the model also says which
batch size, or how many consumers, would hide the latency. `--pipeline N` checks the
model against a real run through a scratch stream and a scratch table.
"""

import contextlib
import hashlib
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from . import _native, db, stream, timescale
from .config import Settings
from .constants import MEMORY_WARN_SHARE, dead_letter_ids_key, heartbeat_key, trim_keys
from .errors import FilepipeError
from .partitions import partitions
from .redaction import error_line, mask_url, printable, scrub

Command = Callable[..., Any]

COMPONENTS = ("redis", "postgres", "storage", "consumer")
KIB = 1024
MIB = 1024 * KIB
DEFAULT_FILE_SIZE = 64 * KIB
SCRATCH_KEY_PREFIX = "filepipe:benchmark:"  # Redis keys of scratch streams
SCRATCH_TABLE_PREFIX = "filepipe_benchmark_"
SCRATCH_DIR_PREFIX = ".filepipe-benchmark-"  # under LOCAL_STORAGE_DIR; S3 keys too
COPY_ROWS = 20_000
CPU_ROWS = 2_000
# Fixed latency is "hidden" when it is at most this share of a stage's time.
HIDDEN_SHARE = 0.10
MAX_SUGGESTED_BATCH = 50_000
MAX_SUGGESTED_CONSUMERS = 64
# The seed's consumers, as the performance guide describes them.
SEED_OLD_BATCH = 10
SEED_FAST_BATCH = 50


# -- figures ------------------------------------------------------------------------------


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
    status: str = "ok"  # ok | unreachable | error
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
    status: str = "ok"  # ok | unreachable | error
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
        """One file after another, as the seed's consumers read them: one object's
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


# -- the model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """Per-batch costs, in milliseconds, as fixed + per-entry terms."""

    batch_size: int
    file_size: int
    redis_rtt: float
    redis_read_fixed: float
    redis_read_per: float
    redis_ack_fixed: float
    redis_ack_per: float
    pg_rtt: float
    pg_new_connection: float
    pg_load_fixed: float
    pg_load_per: float
    storage_fixed: float  # per batch
    storage_per: float  # per file, measured a batch at a time
    storage_single: float  # one file after another (the seed's consumers)
    cpu_per: float  # parse + encode per event
    loaders: int = 1  # batches loaded at once, each on its own pooled connection (FILEPIPE_POOL_SIZE)

    def read_stage(self, b: int) -> dict[str, float]:
        """Reading a batch, measuring its files, encoding it (the reader thread)."""
        return {
            "redis": self.redis_read_fixed + b * self.redis_read_per,
            "storage": self.storage_fixed + b * self.storage_per,
            "consumer": b * self.cpu_per,
        }

    def load_ms(self, b: int) -> float:
        """Loading one batch on one connection."""
        return self.pg_load_fixed + b * self.pg_load_per

    def load_stage(self, b: int) -> dict[str, float]:
        """Loading, per batch: `loaders` batches are loaded at once on their own
        connections, so each costs the pipeline 1/loaders of its load time."""
        return {"postgres": self.load_ms(b) / max(1, self.loaders)}

    def ack_stage(self, b: int) -> dict[str, float]:
        """Acknowledging a batch (the acknowledger thread, overlapped with the next load)."""
        return {"redis": self.redis_ack_fixed + b * self.redis_ack_per}

    def stages(self, b: int) -> list[dict[str, float]]:
        return [self.read_stage(b), self.load_stage(b), self.ack_stage(b)]

    def batch_ms(self, b: int) -> float:
        """The pace: the slowest of the three overlapping stages."""
        return max(max(sum(st.values()) for st in self.stages(b)), 1e-6)

    def rate(self, b: int | None = None) -> float:
        """Files/s of one filepipe consumer at batch size `b`."""
        b = b or self.batch_size
        return b * 1000.0 / self.batch_ms(b)

    def run_seconds(self, events: int) -> float:
        """A drain run of `events` from a standing start: open the first connection,
        fill the pipeline with one batch, then one batch per pace, then a few round trips
        to find nothing left."""
        b = max(1, min(self.batch_size, events))
        fill = sum(self.read_stage(b).values()) + self.load_ms(b) + sum(self.ack_stage(b).values())
        rest = (math.ceil(events / b) - 1) * self.batch_ms(b)
        return (self.pg_new_connection + fill + rest + 5 * self.redis_rtt) / 1000

    def old_consumer_ms(self) -> float:
        """Per file, the seed's first consumer: a new connection, INSERT and COMMIT per
        file, one XACK per file, XREADGROUP of 10."""
        return (
            self.redis_read_fixed / SEED_OLD_BATCH
            + self.redis_read_per
            + self.storage_single
            + self.cpu_per
            + self.pg_new_connection
            + 2 * self.pg_rtt
            + self.pg_load_per
            + self.redis_ack_fixed
        )

    def old_rate(self) -> float:
        return 1000.0 / self.old_consumer_ms()

    def fast_rate(self) -> float:
        """The seed's fast consumer: pooled connection, `executemany` of 50 (one round
        trip per row with psycopg2), one commit and one XACK per batch."""
        b = SEED_FAST_BATCH
        ms = (
            self.redis_read_fixed
            + b * self.redis_read_per
            + b * (self.storage_single + self.cpu_per + self.pg_rtt + self.pg_load_per)
            + self.pg_rtt
            + self.redis_ack_fixed
            + b * self.redis_ack_per
        )
        return b * 1000.0 / ms

    def _stages_fixed_per(self) -> list[tuple[float, float]]:
        n = max(1, self.loaders)
        return [
            (
                self.redis_read_fixed + self.storage_fixed,
                self.redis_read_per + self.storage_per + self.cpu_per,
            ),
            (self.pg_load_fixed / n, self.pg_load_per / n),
            (self.redis_ack_fixed, self.redis_ack_per),
        ]

    def _latency_free_per(self) -> float:
        return max(per for _, per in self._stages_fixed_per())

    def hiding_batch_size(self) -> int:
        """The smallest batch size at which one consumer runs within HIDDEN_SHARE of its
        latency-free speed: no stage's fixed cost sets the pace any more."""
        best = self._latency_free_per() * (1 + HIDDEN_SHARE)
        need = 1.0
        for fixed, per in self._stages_fixed_per():
            if fixed <= 0:
                continue
            if best - per <= 0:
                return MAX_SUGGESTED_BATCH
            need = max(need, fixed / (best - per))
        return min(MAX_SUGGESTED_BATCH, max(SEED_OLD_BATCH, _nice_up(need)))

    def hiding_consumers(self, b: int | None = None) -> int:
        """How many consumers at batch size `b` do the work of as many latency-free ones:
        the batch time over the work in it."""
        b = b or self.batch_size
        work = b * self._latency_free_per()
        if work <= 0:
            return 1
        ratio = self.batch_ms(b) / work
        return max(1, min(MAX_SUGGESTED_CONSUMERS, math.ceil(ratio / (1 + HIDDEN_SHARE) - 1e-9)))

    def without(self, component: str) -> "Model":
        """This model with `component` taking no time at all."""
        zero: dict[str, dict[str, Any]] = {
            "redis": {"redis_read_fixed": 0, "redis_read_per": 0, "redis_ack_fixed": 0, "redis_ack_per": 0},
            "postgres": {"pg_load_fixed": 0, "pg_load_per": 0},
            "storage": {"storage_fixed": 0, "storage_per": 0},
            "consumer": {"cpu_per": 0},
        }
        return replace(self, **zero[component])

    def cost(self, component: str, b: int | None = None) -> float:
        """The share of each batch's time that `component` accounts for: how much
        shorter a batch would be if it took no time (0 when the other stage hides it)."""
        b = b or self.batch_size
        return max(0.0, 1.0 - self.without(component).batch_ms(b) / self.batch_ms(b))

    def time_in(self, component: str, b: int | None = None) -> float:
        """Milliseconds `component` spends on one batch, in both stages."""
        b = b or self.batch_size
        if component == "postgres":
            return self.load_ms(b)
        return sum(st.get(component, 0.0) for st in self.stages(b))

    def latency_share(self, component: str, b: int | None = None) -> float:
        """The share of `component`'s time per batch that does not grow with the batch."""
        b = b or self.batch_size
        fixed = {
            "redis": self.redis_read_fixed + self.redis_ack_fixed,
            "postgres": self.pg_load_fixed,
            "storage": self.storage_fixed,
        }.get(component, 0.0)
        spent = self.time_in(component, b)
        return min(1.0, fixed / spent) if spent > 0 else 0.0

    def loaders_to_hide(self, b: int | None = None) -> int:
        """Connections loading at once (FILEPIPE_POOL_SIZE) for loading to stop setting
        the pace at batch size `b`."""
        b = b or self.batch_size
        others = max(sum(self.read_stage(b).values()), sum(self.ack_stage(b).values()), 1e-6)
        return max(1, min(16, math.ceil(self.load_ms(b) / others - 1e-9)))


def _nice_up(x: float) -> int:
    """The next 1-2-5 number at or above `x` (50, 100, 200, 500, 1000, ...)."""
    if x <= 1:
        return 1
    exp = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * exp >= x - 1e-9:
            return int(m * exp)
    return int(10 * exp)


def build_model(
    batch_size: int,
    file_size: int,
    r: RedisFigures,
    pg: PostgresFigures,
    st: StorageFigures,
    host: HostFigures,
    loaders: int = 1,
) -> Model:
    return Model(
        batch_size=batch_size,
        file_size=file_size,
        redis_rtt=r.rtt_ms,
        redis_read_fixed=r.read_fixed_ms,
        redis_read_per=r.read_per_entry_ms,
        redis_ack_fixed=r.rtt_ms,
        redis_ack_per=r.ack_per_entry_ms,
        pg_rtt=pg.rtt_ms,
        pg_new_connection=pg.new_connection.avg if pg.new_connection else pg.connect_ms,
        pg_load_fixed=pg.load_fixed_ms,
        pg_load_per=pg.load_per_row_ms,
        storage_fixed=st.fixed_ms,
        storage_per=st.per_file_ms,
        storage_single=st.sequential_ms,
        cpu_per=host.parse_encode_us / 1000.0,
        loaders=loaders,
    )


# -- grades ---------------------------------------------------------------------------------


def grade_round_trip(ms: float) -> tuple[str, bool]:
    """(mark, slow) for a network round trip."""
    if ms < 2:
        return "✓ Excellent (local)", False
    if ms < 25:
        return "✓ Good for cloud", False
    if ms < 50:
        return "⚠ High latency", True
    return "⚠ SLOW!", True


def grade_connect(ms: float) -> tuple[str, bool]:
    if ms < 50:
        return "✓ Fast", False
    if ms < 150:
        return "✓ Good for cloud", False
    return "⚠ SLOW!", True


def grade_new_connection(ms: float) -> tuple[str, bool]:
    if ms < 100:
        return "✓ Cheap (and filepipe pools them)", False
    return "⚠ Creating connections is expensive!", True


def grade_copy(rows_per_s: float) -> tuple[str, bool]:
    if rows_per_s >= 20_000:
        return "✓ Good", False
    return "⚠ SLOW!", True


def grade_storage(st: StorageFigures) -> tuple[str, bool]:
    if st.kind == "s3":
        one = st.one_file.p50 if st.one_file else 0.0
        if one >= 150 or (st.mb_per_s < 20 and st.files_per_s < 200):
            return "⚠ SLOW!", True
        return ("✓ Good", False) if one < 50 else ("✓ Good for cloud", False)
    if st.mb_per_s >= 100 or st.files_per_s >= 2000:
        return "✓ Good", False
    if st.mb_per_s >= 30 or st.files_per_s >= 500:
        return "⚠ Slow disk", True
    return "⚠ SLOW!", True


def slow_components(report: "Report") -> dict[str, list[str]]:
    """Each component's figures graded slow, by name."""
    out: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    r, pg = report.redis, report.postgres
    if r.status == "ok" and grade_round_trip(r.rtt_ms)[1]:
        out["redis"].append(f"round trip {r.rtt_ms:.1f} ms")
    if pg.status == "ok":
        if grade_round_trip(pg.rtt_ms)[1]:
            out["postgres"].append(f"round trip {pg.rtt_ms:.1f} ms")
        if grade_connect(pg.connect_ms)[1]:
            out["postgres"].append(f"connection {pg.connect_ms:.0f} ms")
        if pg.copy_s > 0 and grade_copy(pg.copy_rows_per_s)[1]:
            out["postgres"].append(f"COPY {pg.copy_rows_per_s:,.0f} rows/s")
    st = report.storage
    if st is not None and st.status == "ok" and grade_storage(st)[1]:
        out["storage"].append(f"{st.mb_per_s:.0f} MB/s" if st.kind == "local" else "GET latency")
    return out


# -- the verdict ----------------------------------------------------------------------------

NAMES = {"redis": "Redis", "postgres": "PostgreSQL", "storage": "storage", "consumer": "the consumer"}
ALARMS = {
    "redis": "REDIS IS THE BOTTLENECK!",
    "postgres": "DATABASE IS THE BOTTLENECK!",
    "storage": "STORAGE IS THE BOTTLENECK!",
    "consumer": "THE CONSUMER IS THE BOTTLENECK!",
}


@dataclass
class Verdict:
    bottleneck: str
    alarm: bool
    headline: str
    reason: str
    solution: str
    improvement: str = ""
    factor: float | None = None
    notes: list[str] = field(default_factory=list)


def decide(report: "Report") -> Verdict:
    """Names the component that limits throughput, and the fix."""
    down = report.unreachable
    if down:
        first = down[0]
        what = {"redis": "REDIS", "postgres": "THE DATABASE", "storage": "STORAGE"}.get(first, first.upper())
        where = {
            "redis": f"REDIS_URL ({report.redis.url})",
            "postgres": f"PG_URI ({report.postgres.uri})",
            "storage": report.storage.where if report.storage else "the storage settings",
        }.get(first, first)
        return Verdict(
            bottleneck=first,
            alarm=True,
            headline=f"✗ {what} IS UNREACHABLE",
            reason=_error_of(report, first),
            solution=(
                f"create LOCAL_STORAGE_DIR {report.settings.local_storage_dir} or point it at the files"
                if first == "storage" and report.storage is not None and report.storage.kind == "local"
                else f"check {where}: nothing moves until it answers"
            ),
        )
    m = report.model
    assert m is not None
    b = m.batch_size
    costs = {c: m.cost(c) for c in COMPONENTS}
    comp = max(COMPONENTS, key=lambda c: costs[c])
    slow = slow_components(report)
    rate = m.rate()
    solution, factor, improvement = _fix(report, m, comp, m.latency_share(comp) >= 0.5)
    spent = m.time_in(comp)
    share = f"{costs[comp]:.0%} of each batch's time"
    if comp == "redis":
        reason = f"each batch of {b} waits {spent:.1f} ms on Redis (round trip {m.redis_rtt:.1f} ms): {share}"
    elif comp == "postgres":
        reason = (
            f"each batch of {b} waits {spent:.1f} ms on PostgreSQL (round trip {m.pg_rtt:.1f} ms, "
            f"{m.pg_load_per * 1000:.1f} µs per row): {share}"
        )
    elif comp == "storage":
        s3 = report.storage is not None and report.storage.kind == "s3"
        what = "fetching and hashing the objects" if s3 else "reading and hashing the files"
        reason = f"{what} takes {spent:.1f} ms per batch of {b}: {share}"
    else:
        reason = f"parsing and encoding take {spent:.1f} ms per batch of {b}: {share}"

    alarm = bool(slow[comp])
    others_slow = [c for c in COMPONENTS if c != comp and slow[c]]
    if alarm:
        headline = f"⚠️  {ALARMS[comp]}"
    elif others_slow:
        headline = f"Throughput is limited by {NAMES[comp]}."
    else:
        headline = "✓ No slow service: Redis, the database and storage keep up."
        reason = f"Throughput is limited by {NAMES[comp]}: {reason}"
    notes: list[str] = []
    for other in others_slow:
        figures = ", ".join(slow[other])
        if other == "postgres" and not any(f.startswith("round trip") for f in slow[other]):
            notes.append(
                f"PostgreSQL is slow to connect ({figures}), but filepipe pools its connections: "
                "that costs nothing per batch."
            )
            continue
        name = NAMES[other][:1].upper() + NAMES[other][1:]
        if costs[other] < 0.01:
            notes.append(f"{name} is slow too ({figures}), but at batch {b} the other stages hide it.")
            continue
        note = f"{name} is slow too ({figures}): {costs[other]:.0%} of each batch's time"
        hide = m.hiding_batch_size()
        if other in ("redis", "postgres") and m.latency_share(other) >= 0.5 and hide > b:
            note += f"; CONSUMER_BATCH_SIZE={hide} would hide it"
        notes.append(note + ".")
    old = m.old_rate()
    notes.append(
        f"filepipe (batch {b}): {rate:,.0f} files/sec per consumer, "
        f"{rate / old:,.0f}x the old consumer ({old:,.1f} files/sec)."
    )
    return Verdict(comp, alarm, headline, reason, solution, improvement, factor, notes)


def _fix(report: "Report", m: Model, comp: str, latency_bound: bool) -> tuple[str, float | None, str]:
    b = m.batch_size
    rate = m.rate()
    cpus = report.host.cpus if report.host else 1

    def better(new_rate: float) -> tuple[float, str]:
        f = new_rate / rate if rate > 0 else 1.0
        return f, f"{f:.1f}x faster ({rate:,.0f} → {new_rate:,.0f} files/sec)"

    if comp in ("redis", "postgres") and latency_bound:
        hide_b = m.hiding_batch_size()
        n = m.hiding_consumers()
        if hide_b > b:
            f, text = better(m.rate(hide_b))
            alt = f", or run {n} consumers at batch {b}" if n > 1 else ""
            pool = m.loaders_to_hide()
            if comp == "postgres" and pool > m.loaders:
                alt = f", or FILEPIPE_POOL_SIZE={pool} ({pool} batches loading at once)"
            return (
                f"CONSUMER_BATCH_SIZE={hide_b} (round trips are paid per batch, not per file){alt}",
                f,
                text,
            )
        if n > 1:
            f, text = better(rate * n)
            return f"run {n} consumers (each waits on the network while the others work)", f, text
    if comp == "postgres":
        more = m.loaders * 2
        f, text = better(replace(m, loaders=more).rate())
        return (
            (
                f"PostgreSQL's write speed is the limit: load on more connections at once "
                f"(FILEPIPE_POOL_SIZE={more}, or more consumers) while the database has idle CPU and disk; "
                "beyond that, a bigger database"
            ),
            f,
            "up to " + text,
        )
    if comp == "redis":
        return (
            (
                "Redis spends most of each batch per entry: keep entries small (no file contents in the "
                "stream); beyond one Redis node, partition the stream (Redis Cluster)"
            ),
            None,
            "",
        )
    st = report.storage
    if comp == "storage" and st is not None and st.kind == "s3":
        if st.effective_concurrency < 0.5 * st.threads:
            return (
                (
                    f"S3 serves only {st.mb_per_s:.1f} MB/s with {st.effective_concurrency:.1f} of "
                    f"{st.threads} requests in flight: the endpoint or the network to it is the limit, "
                    "not latency. Run the consumers close to the bucket (same region) or use a faster "
                    "endpoint; more concurrency will not help"
                ),
                None,
                "",
            )
        n = max(2, m.hiding_consumers())
        f, text = better(rate * n)
        return (
            (
                f"S3 GETs wait on the network: run {n} consumers (or raise S3_MAX_CONCURRENCY above "
                f"{st.threads}), and run them in the bucket's region"
            ),
            f,
            "up to " + text,
        )
    if comp == "storage":
        threads = st.threads if st else 1
        if threads < cpus:
            f, text = better(rate * min(cpus / threads, 4.0))
            return f"FILEPIPE_HASH_THREADS={cpus} (read and hash on every core)", f, "up to " + text
        return (
            (
                "run consumers on more hosts, close to the files (or use faster disks): "
                "this host reads and hashes as fast as it can"
            ),
            None,
            "",
        )
    n = max(2, cpus)
    f, text = better(rate * n)
    return f"run {n} consumers on this host (one per core), then more hosts", f, "up to " + text


def _error_of(report: "Report", comp: str) -> str:
    if comp == "redis":
        return report.redis.error
    if comp == "postgres":
        return report.postgres.error
    return report.storage.error if report.storage else ""


# -- the report -------------------------------------------------------------------------------


@dataclass
class Report:
    settings: Settings
    redis: RedisFigures
    postgres: PostgresFigures
    storage: StorageFigures | None
    s3: StorageFigures | None
    host: HostFigures | None
    file_size: int
    file_size_source: str
    model: Model | None = None
    verdict: Verdict | None = None
    pipeline: PipelineRun | None = None

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
    def failed(self) -> list[str]:
        """Components that answered but could not be measured."""
        parts = [("redis", self.redis.status), ("postgres", self.postgres.status)]
        parts += [("storage", st.status) for st in (self.storage, self.s3) if st is not None]
        return [name for name, state in parts if state == "error"]

    @property
    def exit_code(self) -> int:
        """0 when every figure was measured; 1 when a service is unreachable or a
        measurement (or the end-to-end run) failed."""
        broken = self.unreachable or self.failed or (self.pipeline is not None and self.pipeline.error)
        return 1 if broken else 0

    def to_json(self) -> dict[str, Any]:
        m, v = self.model, self.verdict
        s = self.settings

        def figures(obj: Any) -> Any:
            if obj is None:
                return None
            d = asdict(obj)
            for name in dir(type(obj)):
                if isinstance(getattr(type(obj), name, None), property):
                    d[name] = getattr(obj, name)
            d.pop("recent_s3_keys", None)
            return d

        model: dict[str, Any] | None = None
        if m is not None:
            model = {
                "batch_size": m.batch_size,
                "file_size": m.file_size,
                "old_consumer_files_per_s": m.old_rate(),
                "fast_consumer_files_per_s": m.fast_rate(),
                "filepipe_files_per_s": m.rate(),
                "read_stage_ms": m.read_stage(m.batch_size),
                "load_stage_ms": m.load_stage(m.batch_size),
                "ack_stage_ms": m.ack_stage(m.batch_size),
                "loaders": m.loaders,
                "hiding_batch_size": m.hiding_batch_size(),
                "hiding_consumers": m.hiding_consumers(),
                "inputs_ms": asdict(m),
            }
        return {
            "bottleneck": v.bottleneck if v else None,
            "alarm": v.alarm if v else None,
            "verdict": asdict(v) if v else None,
            "unreachable": self.unreachable,
            "failed": self.failed,
            "settings": {
                "redis_url": mask_url(s.redis_url),
                "pg_uri": mask_url(s.pg_uri),
                "table": s.table,
                "storage_mode": s.storage_mode,
                "batch_size": m.batch_size if m else s.batch_size,
                "hash_threads": s.hash_threads,
            },
            "file_size": self.file_size,
            "file_size_source": self.file_size_source,
            "redis": figures(self.redis),
            "postgres": figures(self.postgres),
            "storage": figures(self.storage),
            "s3": figures(self.s3),
            "consumer": figures(self.host),
            "model": model,
            "pipeline": figures(self.pipeline),
        }


# -- measuring --------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _repeat(fn: Callable[[], Any], n: int) -> list[float]:
    return [_timed(fn) for _ in range(n)]


def _event_fields(i: int, key: str, size: int, storage: str) -> dict[bytes, bytes]:
    return {
        b"file_id": str(uuid.uuid4()).encode(),
        b"filename": f"benchmark file {i}.bin".encode(),
        b"key": key.encode(),
        b"size": str(size).encode(),
        b"storage": storage.encode(),
    }


def synthetic_batch(
    n: int, *, first_id_ms: int, size: int, storage: str = "local", key_prefix: str = "benchmark/"
) -> tuple[_native.EntryBatch, _native.Measurements]:
    """`n` valid entries (ids `<first_id_ms + i>-0`) and their measurements, as the
    consumer would have them before encoding."""
    entries = [
        (f"{first_id_ms + i}-0".encode(), _event_fields(i, f"{key_prefix}{i}.bin", size, storage))
        for i in range(n)
    ]
    batch = _native.parse_entries(entries, storage)
    m = _native.Measurements(len(batch))
    digest = hashlib.sha256(b"filepipe benchmark").digest()
    for i in range(len(batch)):
        m.set(i, size, digest, "application/octet-stream")
    return batch, m


def measure_redis(settings: Settings, samples: int, batch: int, tag: str) -> RedisFigures:
    """PING, XADD and XREADGROUP round trips, and a batch read and ack, on a scratch stream."""
    f = RedisFigures(url=mask_url(settings.redis_url))
    key = f"{SCRATCH_KEY_PREFIX}{{{tag}}}"  # a hash tag: the stream and its dead letters share a cluster slot
    group = "benchmark"
    r = stream.connect(settings, socket_timeout=max(10.0, settings.connect_timeout_s * 2))
    try:
        f.connect_ms = _timed(r.ping) * 1000
        f.version = str(r.info("server").get("redis_version", ""))
        f.ping = Timing.of(_repeat(r.ping, samples))
        fields = _event_fields(0, "benchmark/0.bin", DEFAULT_FILE_SIZE, "local")
        f.xadd = Timing.of(_repeat(lambda: r.xadd(key, fields), samples))  # type: ignore[arg-type]
        r.xgroup_create(key, group, id="0")
        f.xreadgroup = Timing.of(
            _repeat(lambda: r.xreadgroup(group, "benchmark", {key: ">"}, count=1), samples)
        )
        pipe = r.pipeline(transaction=False)
        for i in range(batch):
            pipe.xadd(key, _event_fields(i, f"benchmark/{i}.bin", DEFAULT_FILE_SIZE, "local"))  # type: ignore[arg-type]
        pipe.execute()
        entries: list[stream.Entry] = []

        def read() -> None:
            entries.extend(stream.read_new(r, key, group, "benchmark", batch, 0))

        f.batch_read_ms = _timed(read) * 1000
        ids = [e[0] for e in entries]
        f.batch = len(ids)
        f.batch_ack_ms = (
            _timed(lambda: stream.ack(r, key, group, ids, dead_stream=key + ":dead", consumer="benchmark"))
            * 1000
        )
        f.recent_file_size = _recent_declared_size(r, partitions(settings)[0].stream)
        _measure_memory(r, settings, f)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        f.status, f.error = "unreachable", f"cannot reach Redis at {f.url}: {error_line(e)}"
    except redis.RedisError as e:
        f.status, f.error = "error", f"Redis refused the benchmark: {error_line(e)}"
    finally:
        with contextlib.suppress(redis.RedisError):
            for name in (key, key + ":dead"):
                r.delete(name)
        r.close()
    return f


def _measure_memory(r: redis.Redis, settings: Settings, f: RedisFigures) -> None:
    """The stream's length, memory and what keeps its entries, and Redis's memory."""
    from .status import read_retention

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


def scratch_table(settings: Settings, tag: str) -> str:
    """A scratch table next to the events table (same schema)."""
    schema = settings.table.rsplit(".", 1)[0] + "." if "." in settings.table else ""
    return f"{schema}{SCRATCH_TABLE_PREFIX}{tag}"


def measure_postgres(
    settings: Settings,
    samples: int,
    connections: int,
    load_rows: int,
    tag: str,
    *,
    want_s3_keys: bool = False,
) -> PostgresFigures:
    """Connection costs, round trips, COPY throughput and the cost of loading a batch."""
    f = PostgresFigures(uri=mask_url(settings.pg_uri), table=settings.table)
    kwargs = db.connection_kwargs(settings)
    try:
        t0 = time.perf_counter()
        conn = psycopg.connect(settings.pg_uri, autocommit=True, **kwargs)
        f.connect_ms = (time.perf_counter() - t0) * 1000
    except psycopg.OperationalError as e:
        f.status, f.error = "unreachable", f"cannot reach PostgreSQL at {f.uri}: {error_line(e)}"
        return f
    try:
        with conn:
            _describe_server(conn, settings, f, want_s3_keys)
            f.round_trip = Timing.of(_repeat(lambda: conn.execute("SELECT 1").fetchone(), samples))

            def new_connection() -> None:
                psycopg.connect(settings.pg_uri, **kwargs).close()

            f.new_connection = Timing.of(_repeat(new_connection, connections))
            _measure_copy(conn, settings, f)
        _measure_load(settings, f, load_rows, tag)
    except psycopg.OperationalError as e:
        f.status, f.error = "unreachable", f"lost PostgreSQL at {f.uri}: {error_line(e)}"
    except psycopg.Error as e:
        f.status, f.error = "error", f"PostgreSQL refused the benchmark: {error_line(e)}"
    return f


def _describe_server(
    conn: psycopg.Connection[Any], settings: Settings, f: PostgresFigures, want_s3_keys: bool
) -> None:
    row = conn.execute("SHOW server_version").fetchone()
    f.server_version = str(row[0]).split()[0] if row else ""
    ext = timescale.read_extension(conn)
    f.timescaledb = ext.installed
    f.timescaledb_available = bool(ext.available or ext.installed)
    f.timescale = {"extension": {**asdict(ext), "state": ext.state}, "usable": ext.usable}
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (settings.table,)).fetchone()
    f.table_exists = bool(row and row[0])
    if not f.table_exists:
        if ext.state == "not preloaded":
            f.timescale_lines = [["TimescaleDB", ext.describe(), ""]]
        return
    facts = timescale.read_table(conn, settings.table, ext)
    f.timescale.update(facts.to_json())
    f.timescale_lines = [list(line) for line in facts.lines()]
    f.hypertable = facts.hypertable
    ident = db.table_ident(settings.table)
    try:
        row = conn.execute(
            sql.SQL(
                "SELECT avg(size_bytes)::float8 FROM (SELECT size_bytes FROM {} "
                "ORDER BY event_time DESC LIMIT 1000) recent"
            ).format(ident)
        ).fetchone()
        if row and row[0] is not None:
            f.recent_file_size = round(row[0])
        if want_s3_keys:
            rows = conn.execute(
                sql.SQL(
                    "SELECT storage_key, size_bytes FROM {} WHERE storage = 's3' "
                    "ORDER BY event_time DESC LIMIT 50"
                ).format(ident)
            ).fetchall()
            f.recent_s3_keys = [(str(k), int(n)) for k, n in rows]
    except psycopg.errors.UndefinedColumn:
        f.notes.append(f"{settings.table} does not have filepipe's columns")


def _measure_copy(conn: psycopg.Connection[Any], settings: Settings, f: PostgresFigures) -> None:
    """COPY into the consumer's own temporary staging table, then roll back."""
    binary = settings.copy_format == "binary"
    batch, m = synthetic_batch(COPY_ROWS, first_id_ms=1, size=DEFAULT_FILE_SIZE)
    buf = _native.encode_copy(batch, m, "benchmark", binary, stream=settings.stream)
    conn.autocommit = False
    try:
        db.configure_connection(conn)  # the staging table the consumer loads into
        with conn.cursor() as cur:
            t0 = time.perf_counter()
            with cur.copy(db.copy_statement(binary=binary)) as copy:
                copy.write(buf)
            f.copy_s = time.perf_counter() - t0
        f.copy_rows, f.copy_bytes = len(batch), len(buf)
        conn.rollback()
    finally:
        conn.autocommit = True


def _measure_load(settings: Settings, f: PostgresFigures, rows: int, tag: str) -> None:
    """The consumer's own load of a first delivery (pooled connection, COPY straight into
    the table) of one row and of `rows` rows, into a scratch copy of the events table
    (a hypertable with its chunk interval if it is one, else a plain table) that is dropped
    afterwards. Where TimescaleDB can be used, a batch is loaded into a scratch table of the
    other kind too, in turn with the first, for the cost of one kind against the other."""
    hyper = f.hypertable
    interval = f.timescale.get("chunk_interval_s")
    chunk = timedelta(seconds=interval) if hyper and interval else None
    # The other kind only where the extension is in this database already: a benchmark
    # creates no extension.
    ext = f.timescale.get("extension") or {}
    both = bool(ext.get("installed")) and bool(ext.get("preloaded"))
    try:
        f.load_one_ms, f.load_batch_ms, other = _time_loads(
            settings, rows, tag, hypertable=hyper, chunk=chunk, other=both, notes=f.notes
        )
        f.load_rows = rows
        if other is not None:
            f.other_kind, f.other_load_batch_ms = ("plain" if hyper else "hypertable"), other
    except FilepipeError as e:
        f.load_estimated = True
        f.load_rows = rows
        f.load_one_ms = 2 * f.rtt_ms  # COPY: the statement, then the data
        per_row = 1000.0 / f.copy_rows_per_s if f.copy_rows_per_s else 0.0
        f.load_batch_ms = f.load_one_ms + (rows - 1) * per_row
        f.notes.append(f"batch load estimated from COPY: {scrub(str(e))}")


def _time_loads(
    settings: Settings,
    rows: int,
    tag: str,
    *,
    hypertable: bool,
    chunk: timedelta | None,
    other: bool,
    notes: list[str],
) -> tuple[float, float, float | None]:
    """Median ms of loading one row and `rows` rows into a scratch table of the events
    table's kind, and (with `other`) of loading `rows` rows into one of the other kind, the
    two taking turns. Raises FilepipeError when the first scratch table cannot be created;
    the other kind is left out (with a note) when its table cannot be."""
    kinds = [hypertable, not hypertable] if other else [hypertable]
    scratches = [
        replace(settings, table=scratch_table(settings, tag + ("_h" if hyper else "_p")), pool_size=1)
        for hyper in kinds
    ]
    binary = settings.copy_format == "binary"
    pools: list[Any] = []
    next_id = [int(time.time() * 1000) - 10_000_000]

    def buffer(n: int) -> tuple[bytes, int]:
        batch, m = synthetic_batch(n, first_id_ms=next_id[0], size=DEFAULT_FILE_SIZE)
        next_id[0] += n
        return _native.encode_copy(batch, m, "benchmark", binary, stream=settings.stream), n

    def timed_ms(loader: db.Loader, buf: tuple[bytes, int]) -> float:
        t0 = time.perf_counter()
        loader.load(buf[0], buf[1], direct=True)
        return (time.perf_counter() - t0) * 1000

    try:
        loaders: list[db.Loader] = []
        for hyper, scratch in zip(kinds, scratches, strict=True):
            try:
                db.init_db(scratch, plain=not hyper, chunk_interval=chunk if hyper else None)
            except FilepipeError as e:
                if not loaders:
                    raise
                kind = "hypertable" if hyper else "plain table"
                notes.append(f"no {kind} to compare with: {scrub(str(e))}")
                break
            pool = db.create_pool(scratch, open=False)
            pools.append(pool)
            pool.open(wait=True, timeout=max(10.0, settings.connect_timeout_s * 2))
            loaders.append(db.Loader(pool, scratch))
        for loader in loaders:
            timed_ms(loader, buffer(1))  # warm up: the pool's first connection and its staging table
        ones = sorted(timed_ms(loaders[0], buffer(1)) for _ in range(3))
        many: list[list[float]] = [[] for _ in loaders]
        for _ in range(3):
            for i, loader in enumerate(loaders):
                many[i].append(timed_ms(loader, buffer(rows)))
        medians = [sorted(times)[1] for times in many]
        return ones[1], medians[0], medians[1] if len(medians) > 1 else None
    finally:
        for pool in pools:
            pool.close()
        for scratch in scratches:
            with contextlib.suppress(psycopg.Error), db.connect(scratch, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(db.table_ident(scratch.table)))


def measure_host(settings: Settings) -> HostFigures:
    """Parse + encode cost per event in the extension (the consumer's own CPU work,
    besides hashing, which is counted with the storage)."""
    binary = settings.copy_format == "binary"
    entries = [
        (
            f"{1_700_000_000_000 + i}-0".encode(),
            _event_fields(i, f"benchmark/{i}.bin", DEFAULT_FILE_SIZE, "local"),
        )
        for i in range(CPU_ROWS)
    ]
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        batch = _native.parse_entries(entries, "local")
        t1 = time.perf_counter()
        m = _native.Measurements(len(batch))
        digest = hashlib.sha256(b"x").digest()
        for i in range(len(batch)):
            m.set(i, DEFAULT_FILE_SIZE, digest, "application/octet-stream")
        t2 = time.perf_counter()
        _native.encode_copy(batch, m, "benchmark", binary, stream=settings.stream)
        t3 = time.perf_counter()
        best = min(best, (t1 - t0) + (t3 - t2))
    return HostFigures(cpus=os.cpu_count() or 1, parse_encode_us=best / CPU_ROWS * 1e6)


def _write_files(directory: Path, count: int, size: int, *, evict: bool) -> bool:
    """Writes `count` distinct files of `size` bytes. With `evict`, flushes them to disk
    and drops them from the page cache so they are read cold; returns whether it could."""
    directory.mkdir(parents=True, exist_ok=False)
    block = os.urandom(min(size, MIB))
    paths = []
    for i in range(count):
        p = directory / f"{i}.bin"
        with open(p, "wb") as out:
            prefix = f"{i}:".encode()
            written = 0
            while written < size:
                chunk = (prefix + block)[: size - written]
                out.write(chunk)
                written += len(chunk)
        paths.append(p)
    if not evict or not hasattr(os, "posix_fadvise"):
        return False
    os.sync()  # the pages must be clean to be dropped
    cold = True
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            cold = False
        finally:
            os.close(fd)
    return cold


def _measure_files(
    storage: Any, mode: str, keys: Sequence[str], size: int, max_bytes: int
) -> tuple[float, str]:
    """Measures the files `keys` as one batch, as the consumer would; returns the time it
    took and the first failure's message ('' if none). The batch holds exactly these
    files: a backend may measure every record of the batch it is given."""
    entries = [(f"{i + 1}-0".encode(), _event_fields(i, k, size, mode)) for i, k in enumerate(keys)]
    batch = _native.parse_entries(entries, mode)
    m = _native.Measurements(len(batch))
    t0 = time.perf_counter()
    storage.measure(batch, list(range(len(batch))), m, max_bytes)
    elapsed = time.perf_counter() - t0
    failures = m.failures()
    return elapsed, (failures[0][2] if failures else "")


def _time_storage(
    f: StorageFigures, storage: Any, keys: list[str], max_bytes: int, *, warm_again: bool
) -> None:
    """One file at a time (a few), then the rest as one batch (and again, cached)."""
    single = keys[: min(5, max(1, len(keys) // 4))]
    rest = keys[len(single) :] or single
    times = []
    for key in single:
        elapsed, problem = _measure_files(storage, f.kind, [key], f.file_size, max_bytes)
        if problem:
            f.status, f.error = "error", problem
            return
        times.append(elapsed)
    f.one_file = Timing.of(times)
    f.batch_s, problem = _measure_files(storage, f.kind, rest, f.file_size, max_bytes)
    f.batch_files = len(rest)
    if problem:
        f.status, f.error = "error", problem
        return
    if warm_again:
        f.warm_batch_s, _ = _measure_files(storage, f.kind, rest, f.file_size, max_bytes)


def measure_local(settings: Settings, file_size: int, tag: str) -> StorageFigures:
    """Read + hash throughput of scratch files under LOCAL_STORAGE_DIR, cold when the
    kernel lets us drop them from the page cache, then warm."""
    from .storage import open_storage

    root = Path(settings.local_storage_dir)
    storage = open_storage(settings, "local")
    f = StorageFigures(
        kind="local", where=storage.describe(), file_size=file_size, threads=settings.hash_threads
    )
    if not root.is_dir():
        f.status = "unreachable"
        f.error = f"LOCAL_STORAGE_DIR {settings.local_storage_dir} does not exist or is not a directory"
        return f
    count = max(20, min(200, (256 * MIB) // max(file_size, 1)))
    scratch = root / f"{SCRATCH_DIR_PREFIX}{tag}"
    try:
        f.cold = _write_files(scratch, count, file_size, evict=True)
        f.files = count
        keys = [f"{scratch.name}/{i}.bin" for i in range(count)]
        _time_storage(f, storage, keys, settings.max_file_bytes, warm_again=True)
    except OSError as e:
        f.status, f.error = "error", f"cannot write scratch files in {root}: {e.strerror or e}"
    except FilepipeError as e:
        f.status, f.error = "unreachable", scrub(str(e))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        storage.close()
    return f


def measure_s3(
    settings: Settings, file_size: int, tag: str, existing: list[tuple[str, int]]
) -> StorageFigures:
    """GET latency (one object) and throughput (a batch, concurrently) from S3: recent
    objects of the events table when there are some, else scratch objects (deleted after)."""
    from .storage import open_storage

    try:
        storage: Any = open_storage(settings, "s3")
    except FilepipeError as e:
        return StorageFigures(
            kind="s3", where=f"s3://{settings.s3_bucket}", status="error", error=scrub(str(e))
        )
    f = StorageFigures(
        kind="s3",
        where=storage.describe(),
        file_size=file_size,
        threads=int(getattr(storage, "max_concurrency", 1)),
    )
    written: list[str] = []
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"{SCRATCH_DIR_PREFIX}{tag}"
    try:
        if len(existing) >= 5:
            keys = [k for k, _ in existing]
            f.file_size = round(sum(n for _, n in existing) / len(existing))
            f.source = "recent objects of the events table"
        else:
            count = max(10, min(50, (64 * MIB) // max(file_size, 1)))
            _write_files(workdir, count, file_size, evict=False)
            keys = []
            for i in range(count):
                key = f"{SCRATCH_DIR_PREFIX}{tag}/{i}.bin"
                storage.put_file(workdir / f"{i}.bin", key)
                written.append(key)
                keys.append(key)
        f.files = len(keys)
        _time_storage(f, storage, keys, settings.max_file_bytes, warm_again=False)
        if f.status == "error" and "could not be fetched" in f.error:
            f.status = "unreachable"
    except FilepipeError as e:
        f.status, f.error = "unreachable", scrub(str(e))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _delete_s3(storage, written)
        storage.close()
    return f


def _delete_s3(storage: Any, keys: list[str]) -> None:
    client = getattr(storage, "client", None)
    if not keys or client is None:
        return
    with contextlib.suppress(Exception):
        for i in range(0, len(keys), 1000):
            objects = [{"Key": storage.object_key(k)} for k in keys[i : i + 1000]]
            client.delete_objects(Bucket=storage.bucket, Delete={"Objects": objects, "Quiet": True})


def run_pipeline(
    settings: Settings,
    events: int,
    file_size: int,
    tag: str,
    model: Model | None,
    *,
    hypertable: bool = False,
) -> PipelineRun:
    """Produces `events` synthetic events into a scratch stream and consumes them into a
    scratch table with a real consumer in drain mode; everything is removed afterwards."""
    from .consumer import Consumer
    from .producer import Producer, event_for
    from .storage import open_storage

    result = PipelineRun(events=events)
    if model is not None:
        result.model_files_per_s = events / model.run_seconds(events)
        result.model_steady_files_per_s = model.rate(min(model.batch_size, events))
    scratch = replace(
        settings,
        stream=f"{SCRATCH_KEY_PREFIX}{tag}:pipeline",
        dead_letter_stream="",
        table=scratch_table(settings, tag + "_pipeline"),
        consumer_name=f"benchmark-{tag}",
        block_ms=0,
    )
    distinct = min(events, max(500, (512 * MIB) // max(file_size, 1)))
    folder = f"{SCRATCH_DIR_PREFIX}{tag}-pipeline"
    mode = settings.storage_mode
    local_dir = Path(settings.local_storage_dir) / folder
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / folder
    storage: Any = None
    written: list[str] = []
    r = stream.connect(scratch)
    try:
        db.init_db(scratch, plain=not hypertable)  # the events table's kind
        storage = open_storage(scratch, mode)
        if mode == "local":
            _write_files(local_dir, distinct, file_size, evict=True)
            keys = [f"{folder}/{i}.bin" for i in range(distinct)]
        else:
            _write_files(workdir, distinct, file_size, evict=False)
            keys = []
            for i in range(distinct):
                storage.put_file(workdir / f"{i}.bin", f"{folder}/{i}.bin")
                written.append(f"{folder}/{i}.bin")
                keys.append(f"{folder}/{i}.bin")
        producer = Producer(scratch, storage=storage, r=r)
        t0 = time.perf_counter()
        from datetime import datetime, timezone

        for i in range(events):
            now = datetime.now(timezone.utc)
            producer.enqueue(
                event_for(
                    str(uuid.uuid4()), f"benchmark file {i}.bin", keys[i % distinct], file_size, mode, now
                )
            )
        producer.flush()
        result.produce_s = time.perf_counter() - t0
        consumer = Consumer(scratch, drain=True, write=None)
        t0 = time.perf_counter()
        stats = consumer.run()
        result.consume_s = time.perf_counter() - t0
        result.inserted, result.dead_lettered = stats.inserted, stats.dead_lettered
        if stats.dead_lettered:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.reasons.items()))
            result.error = f"{stats.dead_lettered} events were dead-lettered ({reasons})"
    except (redis.ConnectionError, redis.TimeoutError) as e:
        result.error = f"cannot reach Redis at {mask_url(settings.redis_url)}: {error_line(e)}"
    except (FilepipeError, psycopg.Error, redis.RedisError, OSError) as e:
        result.error = error_line(e)
    finally:
        with contextlib.suppress(redis.RedisError):
            for part in partitions(scratch):  # one key at a time: they may live on different cluster nodes
                keys = [part.stream, part.dead_stream, dead_letter_ids_key(part.stream),
                        heartbeat_key(part.stream, scratch.consumer_name)]
                for key in keys + trim_keys(part.stream):
                    r.delete(key)
        r.close()
        with contextlib.suppress(psycopg.Error), db.connect(scratch, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(db.table_ident(scratch.table)))
        shutil.rmtree(local_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if storage is not None:
            _delete_s3(storage, written)
            storage.close()
    return result


def benchmark(
    settings: Settings,
    *,
    samples: int = 20,
    connections: int = 5,
    file_size: int | None = None,
    pipeline: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measures everything, builds the model and decides the verdict."""
    say = progress or (lambda _msg: None)
    tag = uuid.uuid4().hex[:10]
    batch = settings.batch_size
    probe = max(1000, min(batch, 5000))  # rows per timed batch: enough for a per-row slope
    say("Measuring Redis ...")
    r = measure_redis(settings, samples, 1000, tag)
    say("Measuring PostgreSQL ...")
    pg = measure_postgres(settings, samples, connections, probe, tag, want_s3_keys=bool(settings.s3_bucket))
    if file_size is not None:
        size, source = file_size, "--file-size"
    elif pg.recent_file_size:
        size, source = pg.recent_file_size, f"average of the latest events in {settings.table}"
    elif r.recent_file_size:
        size, source = r.recent_file_size, f"declared sizes of the latest entries of {settings.stream}"
    else:
        size, source = DEFAULT_FILE_SIZE, "default: no events yet"
    size = max(1, min(size, settings.max_file_bytes))
    say("Measuring storage ...")
    local = measure_local(settings, size, tag) if settings.storage_mode == "local" else None
    s3 = measure_s3(settings, size, tag, pg.recent_s3_keys) if settings.s3_bucket else None
    host = measure_host(settings)
    report = Report(
        settings=settings,
        redis=r,
        postgres=pg,
        storage=local if local is not None else s3,
        s3=s3,
        host=host,
        file_size=size,
        file_size_source=source,
    )
    st = report.storage
    if r.status == "ok" and pg.status == "ok" and st is not None and st.status == "ok":
        report.model = build_model(batch, size, r, pg, st, host, loaders=settings.pool_size)
    if report.model is not None or report.unreachable:
        report.verdict = decide(report)
    if pipeline > 0 and not report.unreachable:
        say(f"Running {pipeline} events end to end ...")
        report.pipeline = run_pipeline(settings, pipeline, size, tag, report.model, hypertable=pg.hypertable)
    return report


# -- output ---------------------------------------------------------------------------------


def _size(n: float) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB".replace(".0 ", " ")
    if n >= KIB:
        return f"{n / KIB:.1f} KiB".replace(".0 ", " ")
    return f"{n:.0f} B"


def _line(label: str, value: str, mark: str = "") -> str:
    text = f"  {label + ':':<24}{value:<14}"
    return (text + "  " + mark).rstrip() if mark else text.rstrip()


def render(report: Report) -> str:
    """The human report, in the seed's words."""
    out: list[str] = []
    s = report.settings
    out.append(f"filepipe benchmark · Redis {mask_url(s.redis_url)} · PostgreSQL {mask_url(s.pg_uri)}")
    out.append("")
    r = report.redis
    out.append("REDIS PERFORMANCE")
    if r.status != "ok":
        out.append(f"  ✗ {r.error}")
    else:
        assert r.ping and r.xadd and r.xreadgroup
        out.append(_line("Connection time", f"{r.connect_ms:.2f} ms"))
        out.append(_line("PING (avg)", f"{r.ping.avg:.2f} ms", grade_round_trip(r.ping.p50)[0]))
        out.append(_line("PING (p50 / p99)", f"{r.ping.p50:.2f} / {r.ping.p99:.2f} ms"))
        out.append(_line("XADD (avg)", f"{r.xadd.avg:.2f} ms"))
        out.append(_line("XREADGROUP (avg)", f"{r.xreadgroup.avg:.2f} ms"))
        out.append(
            _line(
                f"XREADGROUP {r.batch}",
                f"{r.batch_read_ms:.2f} ms",
                f"({r.read_per_entry_ms * 1000:.1f} µs per entry)",
            )
        )
        out.append(_line(f"XACK {r.batch}", f"{r.batch_ack_ms:.2f} ms"))
        out += _render_memory(r, s.stream)
    out.append("")

    pg = report.postgres
    out.append("TIMESCALEDB PERFORMANCE")
    if pg.status == "unreachable" or not pg.server_version:
        out.append(f"  ✗ {pg.error}")
    else:
        ts = (
            f"TimescaleDB {pg.timescaledb}"
            if pg.timescaledb
            else (
                "TimescaleDB available, not installed"
                if pg.timescaledb_available
                else "TimescaleDB not installed"
            )
        )
        out.append(_line("Server", f"PostgreSQL {pg.server_version}, {ts}"))
        if not pg.table_exists:
            out.append(_line(f"Table {pg.table}", "does not exist (run `filepipe init-db`)"))
        out += [
            _line(f"Table {pg.table}" if label == "Kind" else label, value, detail)
            for label, value, detail in pg.timescale_lines
        ]
        out.append(_line("Connection time", f"{pg.connect_ms:.2f} ms", grade_connect(pg.connect_ms)[0]))
        if pg.new_connection:
            out.append(
                _line(
                    "New connection (avg)",
                    f"{pg.new_connection.avg:.2f} ms",
                    grade_new_connection(pg.new_connection.avg)[0],
                )
            )
        if pg.round_trip:
            out.append(
                _line(
                    "Pooled round trip", f"{pg.round_trip.avg:.2f} ms", grade_round_trip(pg.round_trip.p50)[0]
                )
            )
            out.append(
                _line("Round trip (p50 / p99)", f"{pg.round_trip.p50:.2f} / {pg.round_trip.p99:.2f} ms")
            )
        if pg.copy_s > 0:
            out.append(
                _line(
                    "COPY throughput",
                    f"{pg.copy_rows_per_s:,.0f} rows/s",
                    f"{pg.copy_mb_per_s:.1f} MB/s  {grade_copy(pg.copy_rows_per_s)[0]}",
                )
            )
        if pg.load_rows:
            how = " (estimated)" if pg.load_estimated else ""
            out.append(
                _line(
                    f"Batch load ({pg.load_rows})",
                    f"{pg.load_batch_ms:.2f} ms",
                    f"{pg.load_fixed_ms:.2f} ms per batch + {pg.load_per_row_ms * 1000:.1f} µs per row{how}",
                )
            )
        if pg.other_kind and pg.load_batch_ms > 0:
            here = "hypertable" if pg.hypertable else "plain table"
            ratio = pg.other_load_batch_ms / pg.load_batch_ms
            out.append(
                _line(
                    f"Same batch, {pg.other_kind}",
                    f"{pg.other_load_batch_ms:.2f} ms",
                    f"{ratio:.2f}x the {here}'s (scratch tables of both kinds, loaded in turn)",
                )
            )
        if pg.status == "error":
            out.append(f"  ✗ {pg.error}")
        for note in pg.notes:
            out.append(f"  note: {note}")
    out.append("")

    out.append("STORAGE PERFORMANCE")
    out.append(_line("File size", _size(report.file_size), f"({report.file_size_source})"))
    if report.storage is not None:
        _render_storage(out, report.storage)
    if report.settings.storage_mode != "local":
        out.append(_line("Local read+hash", f"not used (STORAGE_MODE={report.settings.storage_mode})"))
    if report.s3 is not None and report.s3 is not report.storage:
        _render_storage(out, report.s3)
    if report.s3 is None:
        out.append(_line("S3", "not configured (skipped)"))
    out.append("")

    if report.host:
        out.append("CONSUMER (this host)")
        out.append(_line("Parse + encode", f"{report.host.parse_encode_us:.2f} µs per event"))
        out.append(_line("CPU cores", str(report.host.cpus)))
        out.append("")

    m = report.model
    if m is not None:
        b = m.batch_size
        out.append(f"ESTIMATED THROUGHPUT ({_size(m.file_size)} files, one consumer)")
        out.append(
            f"  Old consumer (new connection per file):  {m.old_rate():>10,.1f} files/sec"
            f"   ({m.old_consumer_ms():.1f} ms per file)"
        )
        out.append(
            f"  Fast consumer (pooled, batch of {SEED_FAST_BATCH}):      {m.fast_rate():>10,.1f} files/sec"
        )
        out.append(f"  filepipe (batch {b}):{' ' * max(1, 23 - len(str(b)))}{m.rate():>10,.1f} files/sec")
        read, load, ack = m.read_stage(b), m.load_ms(b), m.ack_stage(b)["redis"]
        out.append(f"  Per batch of {b} (three stages overlap; the slowest sets the pace):")
        out.append(
            f"    read stage  {sum(read.values()):9.2f} ms = Redis {read['redis']:.2f} + storage "
            f"{read['storage']:.2f} + consumer {read['consumer']:.2f}"
        )
        per_conn = f" ÷ {m.loaders} connections" if m.loaders > 1 else ""
        out.append(f"    load stage  {load / max(1, m.loaders):9.2f} ms = PostgreSQL {load:.2f}{per_conn}")
        out.append(f"    ack stage   {ack:9.2f} ms = Redis {ack:.2f}")
        hide_b, n = m.hiding_batch_size(), m.hiding_consumers()
        out.append(
            f"  To hide the latency: CONSUMER_BATCH_SIZE ≥ {hide_b}, or {n} consumer"
            f"{'s' if n > 1 else ''} at batch {b}"
        )
        out.append("")

    p = report.pipeline
    if p is not None:
        out.append(f"END-TO-END RUN (--pipeline {p.events})")
        if p.produce_s:
            out.append(_line("Produced", f"{p.events:,} events in {p.produce_s:.2f} s"))
        if p.consume_s:
            out.append(
                _line(
                    "Consumed",
                    f"{p.inserted:,} rows in {p.consume_s:.2f} s",
                    f"→ {p.files_per_s:,.1f} files/sec, start to finish",
                )
            )
            out.append(
                _line(
                    "Model",
                    f"{p.model_files_per_s:,.1f} files/sec",
                    f"for this run; {p.model_steady_files_per_s:,.1f} once running",
                )
            )
        if p.error:
            out.append(f"  ✗ {p.error}")
        out.append("")

    v = report.verdict
    if v is not None:
        out.append(v.headline)
        if v.reason:
            out.append(f"   {v.reason[:1].upper() + v.reason[1:]}")
        out.append(f"   SOLUTION: {v.solution}")
        if v.improvement:
            out.append(f"   Expected improvement: {v.improvement}")
        for note in v.notes:
            out.append(f"   {note}")
    elif not report.unreachable:
        out.append("✗ Not enough figures for a verdict: see the errors above.")
    return scrub("\n".join(printable(line) for line in out))


def _render_memory(r: RedisFigures, stream_name: str) -> list[str]:
    out = []
    if r.memory_used_bytes is not None:
        if r.memory_max_bytes:
            share = r.memory_used_bytes / r.memory_max_bytes
            mark = "⚠ nearly full" if share >= MEMORY_WARN_SHARE else "✓"
            limit = f"of {_size(r.memory_max_bytes)} maxmemory ({share:.0%}, {r.memory_policy})  {mark}"
        else:
            limit = "(no maxmemory)"
        out.append(_line("Memory", _size(r.memory_used_bytes), limit))
    if r.stream_entries is not None:
        out.append(_line(f"Stream {stream_name}", f"{r.stream_entries:,} entries",
                         f"{_size(r.stream_memory_bytes or 0)}; kept: {r.kept}"))
    return out


def _render_storage(out: list[str], st: StorageFigures) -> None:
    label = "Local read+hash" if st.kind == "local" else "S3 GET+hash"
    if st.status != "ok":
        out.append(_line(label, "✗ " + st.error))
        return
    mark, _slow = grade_storage(st)
    detail = (
        f"{st.files_per_s:,.0f} files/s, {st.threads} {'threads' if st.kind == 'local' else 'concurrent'}"
    )
    out.append(_line(label, f"{st.mb_per_s:,.1f} MB/s", f"{detail}{', cold' if st.cold else ''}  {mark}"))
    if st.kind == "local" and st.warm_batch_s > 0:
        out.append(_line("Local (cached)", f"{st.warm_mb_per_s:,.1f} MB/s"))
    if st.one_file:
        label_one = "One file" if st.kind == "local" else "GET latency (p50)"
        out.append(_line(label_one, f"{st.one_file.p50:.2f} ms", f"({st.files} {st.source})"))
