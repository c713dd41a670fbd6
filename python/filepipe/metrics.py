"""Prometheus metrics the consumer counts.

Names follow the Prometheus conventions: a `filepipe_` prefix, `_total` on counters,
base units (`_seconds`). The consumer's hot path only increments counters and
observes histograms once per batch, never per record. The figures that need a round
trip (pending, lag, what the stream keeps) and the server that exposes them all are
in `observe.export` (`serve_metrics`), beside the other observers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .stream import DeadLetter

T = TypeVar("T")

# -- what the consumer counts (the default registry: one consumer per process) --------

PROCESSED = Counter("filepipe_processed_total", "Stream entries recorded as a new row in the events table.")
DUPLICATES = Counter("filepipe_duplicates_total", "Redelivered stream entries whose row was already present.")
REJECTED = Counter(
    "filepipe_rejected_total", "Stream entries written to the dead-letter stream, by reason.", ["reason"]
)
ACKED = Counter("filepipe_acked_total", "Stream entries acknowledged (loaded, dead-lettered or deleted).")
DELETED = Counter(
    "filepipe_deleted_total",
    "Stream entries deleted from the stream while pending (XDEL, a trim): acknowledged with nothing to load.",
)
RETRIES = Counter("filepipe_retries_total", "Retries after a passing failure, by service.", ["service"])
BATCH_SECONDS = Histogram(
    "filepipe_batch_duration_seconds",
    "Time from reading a batch to acknowledging it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
BATCH_ENTRIES = Histogram(
    "filepipe_batch_entries",
    "Stream entries per batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 100_000),
)
BATCH_BYTES = Histogram(
    "filepipe_batch_bytes",
    "Bytes of stream entries (ids, field names and values) per batch.",
    buckets=tuple(float(2**k) for k in range(12, 32, 2)),  # 4 KiB … 1 GiB
)
COPY_SECONDS = Histogram(
    "filepipe_copy_duration_seconds",
    "One COPY + merge + COMMIT of a batch into PostgreSQL (successful attempts).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ACK_SECONDS = Histogram(
    "filepipe_ack_duration_seconds",
    "One XACK (with the batch's dead letters) round trip to Redis (successful attempts).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
READ_SIZE = Gauge(
    "filepipe_read_size_entries",
    "Stream entries the consumer asks for per read: raised to cover the measured round trips.",
)
ROUND_TRIP_SECONDS = Gauge(
    "filepipe_round_trip_seconds",
    "The round trip to a service, as the consumer measured it last (the least of its recent probes).",
    ["service"],
)
TRIMMED = Counter(
    "filepipe_trimmed_entries_total",
    "Stream entries trimmed by this consumer once every consumer group had acknowledged them.",
)
DEAD_DROPPED = Counter(
    "filepipe_dead_letters_dropped_total",
    "Dead letters dropped by this consumer because DEAD_LETTER_RETENTION was exceeded.",
)
CONSUMERS_REMOVED = Counter(
    "filepipe_consumers_removed_total",
    "Departed consumers (nothing pending, no heartbeat) removed from the group by this consumer.",
)


def record_batch(
    entries: int,
    acked: int,
    inserted: int,
    duplicates: int,
    dead: Iterable[DeadLetter],
    seconds: float,
    nbytes: int = 0,
) -> None:
    """Counts one acknowledged batch: a handful of increments, whatever its size. `acked`
    and `dead` are what the acknowledgement script did (the dead letters it wrote)."""
    BATCH_ENTRIES.observe(entries)
    BATCH_BYTES.observe(nbytes)
    BATCH_SECONDS.observe(seconds)
    record_acked(acked, dead)
    if inserted:
        PROCESSED.inc(inserted)
    if duplicates > 0:
        DUPLICATES.inc(duplicates)


def record_acked(acked: int, dead: Iterable[DeadLetter]) -> None:
    """Counts entries acknowledged and dead letters written."""
    if acked:
        ACKED.inc(acked)
    reasons: dict[str, int] = {}
    for d in dead:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    for reason, n in reasons.items():
        REJECTED.labels(reason=reason).inc(n)


def record_deleted(n: int) -> None:
    """Counts entries found deleted from the stream while pending."""
    if n:
        DELETED.inc(n)


def record_retry(service: str) -> None:
    """Counts one retry of `service` (Redis, PostgreSQL, Storage)."""
    RETRIES.labels(service=service.lower()).inc()


def timed(histogram: Histogram, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Calls `fn` and observes its duration in `histogram` if it succeeds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    histogram.observe(time.perf_counter() - start)
    return result
