"""How much another Python thread could run while a call was running: a measure of
whether the call released the GIL."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable


def timed_with_free_share(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds `fn` took, the share of them during which another Python thread could
    run). That thread ticks every millisecond while it holds the GIL, so the longest gap
    between its ticks is how long it was kept waiting: a share near 0 means `fn` held
    the GIL throughout."""
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    other = threading.Thread(target=tick)
    other.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    stop.set()
    other.join()
    edges = [t0, *(t for t in ticks if t0 < t < t1), t1]
    longest = max(b - a for a, b in itertools.pairwise(edges))
    return t1 - t0, 1 - longest / (t1 - t0) if t1 > t0 else 0.0
