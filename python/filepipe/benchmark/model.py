"""The model: what one consumer's pipeline would do with the measured figures.

Per batch of B entries, three stages overlap (the reader reads and prepares the next
batch while the loader commits this one and the acknowledger acks the last), so the
slowest sets the pace:

    read stage = XREADGROUP(B) + B x storage time per file + B x parse/encode
    load stage = pooled COPY + INSERT + COMMIT of B rows (÷ connections loading at once)
    ack stage  = XACK(B)

Every term is "fixed per batch + per entry", so the model also says which batch size, or
how many consumers, would hide the latency, and what the guide's consumers would do."""

import math
from dataclasses import dataclass, replace
from typing import Any

from .figures import HostFigures, PostgresFigures, RedisFigures, StorageFigures

# Fixed latency is "hidden" when it is at most this share of a stage's time.
HIDDEN_SHARE = 0.10
MAX_SUGGESTED_BATCH = 50_000
MAX_SUGGESTED_CONSUMERS = 64
# The guide's consumers, as the performance guide describes them.
SEED_OLD_BATCH = 10
SEED_FAST_BATCH = 50


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
    storage_single: float  # one file after another (the guide's consumers)
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
        """Per file, the guide's first consumer: a new connection, INSERT and COMMIT per
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
        """The guide's fast consumer: pooled connection, `executemany` of 50 (one round
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
