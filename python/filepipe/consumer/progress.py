"""What a consumer has done (`Stats`), and the progress lines it prints."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..observe.text import entries
from ..stream import DeadLetter

# The window of the rate the progress lines show.
RATE_WINDOW_S = 10.0


@dataclass
class Stats:
    """What a consumer has done since it started."""

    started: float = field(default_factory=time.time)
    batches: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0  # dead letters written (not those skipped as written before)
    acked: int = 0  # entries acknowledged, as the acknowledgement script counted them
    deleted: int = 0  # entries deleted from the stream while pending: acknowledged, nothing to load
    reasons: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    abandoned: str = ""  # why nothing was read: stopped while waiting for a service at the start

    def summary(self) -> str:
        """The line `filepipe consume` ends with."""
        if self.abandoned:
            return f"Abandoned: {self.abandoned}"
        return (
            f"Stopped: {self.inserted} inserted, {self.duplicates} already present, "
            f"{self.dead_lettered} dead-lettered, {self.deleted} deleted while pending, "
            f"{self.acked} acknowledged"
        )

    def rate(self) -> float:
        """Rows inserted per second since the start (idle time included)."""
        elapsed = time.time() - self.started
        return self.inserted / elapsed if elapsed > 0 else 0.0


class Progress:
    """The guide's progress lines, at most one group per `interval` seconds, the first
    one `interval` after the start (the first batches after a start are small: see
    ReadSize), written once the interval has passed even when no batch follows:

        ✓ Batch complete: 50 records inserted
        📊 Total: 150 | Rate: 35.23 files/sec (last 10 s)

    The rate is that of the last `RATE_WINDOW_S` seconds (or since the start, when that
    is shorter), not an average since the start that idle time drags down."""

    def __init__(self, write: Callable[[str], None] | None, interval: float = 1.0) -> None:
        self.write = write
        self.interval = interval
        self.pending = 0
        self.pending_dead: Counter[str] = Counter()
        self.last = time.monotonic()
        self.started = self.last
        self._samples: deque[tuple[float, int]] = deque()  # (monotonic, total inserted)
        self._lock = threading.Lock()

    def batch(self, inserted: int, dead: list[DeadLetter], stats: Stats) -> None:
        """Counts a batch; writes the lines if `interval` has passed since the last ones."""
        with self._lock:
            self.pending += inserted
            self.pending_dead.update(d.reason for d in dead)
            self._samples.append((time.monotonic(), stats.inserted))
        self.tick(stats)

    def due(self) -> float | None:
        """Seconds until lines are due (None: nothing to write)."""
        if self.write is None or (self.pending == 0 and not self.pending_dead):
            return None
        return max(0.0, self.last + self.interval - time.monotonic())

    def tick(self, stats: Stats) -> None:
        """Writes the lines if they are due."""
        if self.due() == 0.0:
            self.flush(stats)

    def rate(self, total: int, now: float) -> tuple[float, float]:
        """Rows per second over the last RATE_WINDOW_S seconds (or since the start, when
        that is shorter), and the length of that window. Every batch is a sample, so the
        total at the window's start is the last sample before it."""
        cutoff = now - RATE_WINDOW_S
        samples = self._samples
        while len(samples) > 1 and samples[1][0] <= cutoff:
            samples.popleft()
        at = samples[0][1] if samples and samples[0][0] <= cutoff else 0
        span = now - max(self.started, cutoff)
        return ((total - at) / span if span > 0 else 0.0), span

    def flush(self, stats: Stats) -> None:
        """Writes what was counted since the last lines, if anything."""
        with self._lock:
            if self.write is None or (self.pending == 0 and not self.pending_dead):
                return
            pending, dead = self.pending, Counter(self.pending_dead)
            self.pending = 0
            self.pending_dead.clear()
            now = time.monotonic()
            self.last = now
            rate, span = self.rate(stats.inserted, now)
        # The guide's line, word for word whatever the count: it is what users grep for.
        self.write(f"✓ Batch complete: {pending} records inserted")
        if dead:
            detail = ", ".join(f"{r}: {n}" for r, n in sorted(dead.items()))
            self.write(f"⚠ Dead-lettered {entries(sum(dead.values()))} ({detail})")
        window = f"{RATE_WINDOW_S:.0f}" if span >= RATE_WINDOW_S else f"{span:.1f}"
        self.write(f"📊 Total: {stats.inserted} | Rate: {rate:.2f} files/sec (last {window} s)")
