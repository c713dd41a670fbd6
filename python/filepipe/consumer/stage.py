"""What every stage of the consumer shares: one stop (with one deadline for every
stage), and a `Stage`, worker threads fed by one bounded queue.

A stage's loop exists here once: take an item, end at the end marker, drop the item
instead of handling it once the consumer failed or gave up, record a failure for the
reader's thread to raise, mark the item done. So does its shutdown: hand it the end
marker, let it finish what it holds until the stop deadline, then give up (the entries
in hand stay pending and are delivered again).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ..retry import Abandoned

log = logging.getLogger("filepipe")

T = TypeVar("T")

# How long stage threads still get once the consumer gave up on the batches in hand: they
# only drop what is queued by then (a thread stuck in a network call is left behind).
_AFTER_GIVING_UP_S = 10.0


class Lifecycle:
    """The consumer's stop, shared by every stage: a stop request, the one deadline a
    stop has to finish the batches in hand, giving up on them past it (`abandon`), and
    the first failure of any thread (raised by `run()` in the reader's thread)."""

    def __init__(self, stop_timeout: float) -> None:
        self.stop_timeout = stop_timeout
        self.stopping = threading.Event()
        self.abandon = threading.Event()
        self.failed: BaseException | None = None
        self._stopped_at: float | None = None
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Asks every stage to finish the batches in hand."""
        self.deadline()
        self.stopping.set()

    def deadline(self) -> float:
        """When a stop gives up on the batches in hand: `stop_timeout` after it began."""
        with self._lock:
            if self._stopped_at is None:
                self._stopped_at = time.monotonic()
            return self._stopped_at + self.stop_timeout

    def fail(self, e: BaseException) -> None:
        """A stage failed: the consumer stops, and `run()` raises the first failure."""
        with self._lock:
            if self.failed is None:
                self.failed = e
        self.stopping.set()

    def give_up(self) -> None:
        """Past the stop deadline: the batches in hand are left unacknowledged."""
        with self._lock:
            if self.abandon.is_set():
                return
            self.abandon.set()
        log.warning(
            "stop timeout (%.0f s) reached: leaving the batches in hand unacknowledged; "
            "they will be delivered again",
            self.stop_timeout,
        )

    @property
    def giving_up(self) -> bool:
        """Whether work in hand is to be dropped rather than done (a failure, or a stop
        past its deadline)."""
        return self.failed is not None or self.abandon.is_set()

    @property
    def running(self) -> bool:
        return self.failed is None and not self.stopping.is_set()

    def past_deadline(self) -> bool:
        return self.stopping.is_set() and time.monotonic() > self.deadline()


class _End:
    """The end marker a stage's queue ends with."""


_END = _End()


class Stage(Generic[T]):
    """`workers` threads that `handle` the items of one bounded queue, in order.

    An item taken once the consumer gives up (`Lifecycle.giving_up`), or whose handling
    raised Abandoned, goes to `drop` instead: its entries stay pending. Any other
    exception fails the consumer. With `idle`, a worker that waited `idle()` seconds
    (None: forever) for an item calls `on_idle`; `on_end` runs in the last worker once
    the end marker came (unless the consumer gave up)."""

    def __init__(
        self,
        name: str,
        life: Lifecycle,
        handle: Callable[[T], None],
        *,
        maxsize: int,
        workers: int = 1,
        drop: Callable[[T], None] | None = None,
        idle: Callable[[], float | None] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.life = life
        self.handle = handle
        self.drop = drop
        self.idle = idle
        self.on_idle = on_idle
        self.on_end = on_end
        self.queue: queue.Queue[T | _End] = queue.Queue(maxsize=maxsize)
        self._ended = 0
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(
                target=self._loop, name=f"filepipe-{name}{f'-{i}' if workers > 1 else ''}", daemon=True
            )
            for i in range(workers)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def add_workers(self, n: int) -> None:
        """Starts `n` more workers on the same queue, while the stage runs (not once a stop
        or its end began)."""
        with self._lock:
            if self._ended or not self.life.running:
                return
            first = len(self.threads)
            added = [
                threading.Thread(target=self._loop, name=f"filepipe-{self.name}-{i}", daemon=True)
                for i in range(first, first + n)
            ]
            self.threads.extend(added)
            for t in added:
                t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def busy(self) -> bool:
        """Whether an item is queued or being handled."""
        return self.queue.unfinished_tasks > 0

    def put(self, item: T, give_up: Callable[[], bool]) -> bool:
        """Queues `item`, waiting for room while `give_up()` is false. False if it was
        not queued."""
        while True:
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                if give_up():
                    return False

    def _loop(self) -> None:
        while True:
            timeout = self.idle() if self.idle is not None else None
            try:
                item = self.queue.get(timeout=timeout)
            except queue.Empty:
                self._run(self.on_idle)
                continue
            try:
                if isinstance(item, _End):
                    self._end()
                    return
                if self.life.giving_up:
                    self._run(self.drop, item)
                    continue
                try:
                    self.handle(item)
                except Abandoned:
                    self._run(self.drop, item)
            except BaseException as e:  # surfaced by run() in the reader's thread
                self.life.fail(e)
            finally:
                self.queue.task_done()

    def _end(self) -> None:
        self.queue.put(_END)  # for the sibling workers (the queue has room: this one was taken)
        with self._lock:
            self._ended += 1
            last = self._ended == len(self.threads)
        if last and not self.life.giving_up:
            self._run(self.on_end)

    def _run(self, fn: Callable[..., None] | None, *args: object) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Abandoned:
            pass
        except BaseException as e:
            self.life.fail(e)

    def finish(self) -> None:
        """Ends the stage: it finishes what it holds until the stop deadline; past it,
        the consumer gives up and the stage drops the rest."""
        if not any(t.ident is not None for t in self.threads):
            return  # never started
        deadline = self.life.deadline()
        while self.alive():
            try:
                self.queue.put(_END, timeout=0.2)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    self.life.give_up()
        end: float | None = None
        while self.alive():
            for t in self.threads:
                t.join(0.2)
            now = time.monotonic()
            if now > deadline:
                self.life.give_up()
                end = end or now + _AFTER_GIVING_UP_S
                if now > end:
                    log.warning("%s thread did not end in time; leaving it behind", self.name)
                    return
