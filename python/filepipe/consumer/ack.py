"""Acknowledging: each committed batch's dead letters are written and its entries
acknowledged in one atomic script. Dead letters a full Redis refuses are held (their
entries stay pending) and written again once it has room."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis
from redis.exceptions import RedisClusterException

from .. import metrics, stream
from .._faults import crash_point
from ..config import Settings
from ..partitions import Partition
from ..redaction import error_line
from ..retention import Housekeeper
from ..retry import Abandoned, Backoff, is_transient_redis
from ..stream import AckResult, DeadLetter
from .liveness import InHand
from .prepare import Prepared
from .progress import Progress, Stats

log = logging.getLogger("filepipe")

# Dead letters a full Redis refused are kept (their entries pending) up to this many bytes
# while later batches are acknowledged; past it, acknowledging waits for Redis to have room.
HELD_MAX_BYTES = 32 * 1024 * 1024


def log_deleted(part: Partition, ids: list[bytes]) -> None:
    """Tells of entries deleted from the stream while pending."""
    shown = ", ".join(i.decode(errors="replace") for i in ids[:3]) + (" …" if len(ids) > 3 else "")
    log.warning(
        "%d entr%s of %s deleted from the stream while pending (%s): acknowledged, "
        "with nothing to load or dead-letter",
        len(ids),
        "y" if len(ids) == 1 else "ies",
        part.stream,
        shown,
    )


class Ack:
    """The acknowledger's work (one thread), and the dead letters it holds back."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        r: redis.Redis,
        parts: list[Partition],
        stats: Stats,
        progress: Progress,
        in_hand: InHand,
        housekeeper: Housekeeper,
        backoff: Backoff,
        held_backoff: Backoff,
        abandon: threading.Event,
        beat: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.name = name
        self.redis = r
        self.parts = parts
        self.stats = stats
        self.progress = progress
        self.in_hand = in_hand
        self.housekeeper = housekeeper
        self.backoff = backoff
        self.held_backoff = held_backoff
        self.abandon = abandon
        self.beat = beat
        # Dead letters a full Redis refused, by stream, waiting (their entries pending) to be
        # written again while later batches are acknowledged; retried on `held_backoff`.
        self._held: dict[str, list[DeadLetter]] = {}
        self.held_bytes = 0
        self._held_retry_at = 0.0

    # -- the stage -------------------------------------------------------------------

    def finish_batch(self, item: tuple[Prepared, int, list[DeadLetter]]) -> None:
        """Acknowledges a committed batch and counts it."""
        p, inserted, row_dead = item
        part = p.part
        result = self.ack(part, p.ids, p.dead + row_dead)
        held = {d.source_id for d in result.held}
        self.in_hand.landed(part.stream, [i for i in p.ids if i not in held] if held else p.ids)
        self.housekeeper.acked(result.acked)
        crash_point("after_ack")
        st = self.stats
        duplicates = p.rows - len(row_dead) - inserted
        st.batches += 1
        st.inserted += inserted
        st.duplicates += duplicates
        self._count(result)
        self._hold(part, result)
        metrics.record_batch(
            len(p.ids),
            result.acked,
            inserted,
            duplicates,
            result.written,
            time.monotonic() - p.read_at,
            p.input_bytes,
        )
        self.progress.batch(inserted, result.written, st)
        self.beat()
        # Many held back: wait for Redis to take them before acknowledging more.
        while self.held_bytes > HELD_MAX_BYTES and not self.abandon.is_set():
            self.retry_held(wait=True)

    def drop(self, item: tuple[Prepared, int, list[DeadLetter]]) -> None:
        p = item[0]
        self.in_hand.landed(p.part.stream, p.ids)

    def idle(self) -> float | None:
        """How long to wait for a batch before retrying held dead letters or writing the
        progress lines that are due (None: until a batch comes)."""
        waits = [w for w in (self._held_wait(), self.progress.due()) if w is not None]
        return min(waits) if waits else None

    def on_idle(self) -> None:
        if self._held:
            self.retry_held()
        self.progress.tick(self.stats)

    def on_end(self) -> None:
        """The last batch is in: dead letters still held back get the stop timeout to be
        written, then their entries stay pending."""
        while self._held and not self.abandon.is_set():
            self.retry_held(wait=True)

    # -- acknowledging ---------------------------------------------------------------

    def ack(self, part: Partition, ids: list[bytes], dead: list[DeadLetter]) -> AckResult:
        """Writes the dead letters and acknowledges, in one atomic script. If the reply is
        lost, the script may or may not have run: before running it again, ask Redis which
        entries are still pending, and run it for those (it would write no dead letter
        twice anyway). Entries no longer pending then are counted as the lost run's."""
        s = self.settings
        done = AckResult()
        while True:
            try:
                result = metrics.timed(
                    metrics.ACK_SECONDS,
                    stream.ack,
                    self.redis,
                    part.stream,
                    s.group,
                    ids,
                    dead,
                    dead_stream=part.dead_stream,
                    consumer=self.name,
                    max_fields=s.max_entry_fields,
                    max_bytes=s.max_entry_bytes,
                )
                self.backoff.succeeded()
                done.add(result)
                return done
            except Exception as e:
                if stream.group_missing(e):
                    # Nothing is pending in a group that is gone: the reader recreates it.
                    log.info(
                        "nothing to acknowledge on %s: the group is gone (%s)", part.stream, error_line(e)
                    )
                    return done
                if not is_transient_redis(e):
                    raise
                self.backoff.failed(e)
                if self.abandon.is_set():
                    raise Abandoned("Redis: gave up acknowledging") from e
            pending = self.backoff.call(
                lambda i=ids: self._still_pending(part, i),  # type: ignore[misc]
                is_transient_redis,
                writes=False,
            )
            # What is no longer pending, the lost run (or another consumer) has done.
            done.acked += sum(1 for i in ids if i not in pending)
            done.written += [d for d in dead if d.source_id not in pending]
            ids = [i for i in ids if i in pending]
            dead = [d for d in dead if d.source_id in pending]
            if not ids:
                return done

    def _still_pending(self, part: Partition, ids: list[bytes]) -> set[bytes]:
        try:
            return stream.still_pending(self.redis, part.stream, self.settings.group, ids)
        except redis.ResponseError as e:
            if stream.group_missing(e):
                return set()  # the group is gone, and with it what was pending
            raise

    def _count(self, result: AckResult) -> None:
        """Adds what the acknowledgement script did to the totals."""
        st = self.stats
        st.dead_lettered += len(result.written)
        st.acked += result.acked
        st.reasons.update(d.reason for d in result.written)

    # -- dead letters held back --------------------------------------------------------

    def held_count(self) -> int:
        return sum(len(v) for v in self._held.values())

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def _hold(self, part: Partition, result: AckResult) -> None:
        """Keeps the dead letters a full Redis refused, to write them once it has room;
        their entries stay pending (and in this consumer's hands) until then."""
        if not result.held:
            return
        self._put_held(part.stream, result.held)
        error = redis.exceptions.OutOfMemoryError(result.refusal.removeprefix("OOM "))
        self._held_retry_at = time.monotonic() + self.held_backoff.record(error)

    def _put_held(self, stream_name: str, dead: list[DeadLetter]) -> None:
        if dead:
            self._held.setdefault(stream_name, []).extend(dead)
            self.held_bytes += sum(d.size() for d in dead)

    def _take_held(self, stream_name: str, n: int | None = None) -> list[DeadLetter]:
        """Removes and returns (up to `n` of) the dead letters held for `stream_name`."""
        held = self._held.pop(stream_name, [])
        if n is not None and len(held) > n:
            self._held[stream_name] = held[n:]
            held = held[:n]
        self.held_bytes -= sum(d.size() for d in held)
        return held

    def _held_wait(self) -> float | None:
        """How long the acknowledger may wait for a batch before retrying held dead letters."""
        if not self._held:
            return None
        return max(0.0, self._held_retry_at - time.monotonic())

    def retry_held(self, *, wait: bool = False) -> None:
        """Tries again to write the dead letters a full Redis refused (and to acknowledge
        their entries). With `wait`, first waits for the backoff's delay."""
        if wait:
            self.abandon.wait(self._held_wait() or 0.0)
        if time.monotonic() < self._held_retry_at or self.abandon.is_set():
            return
        self.in_hand.keep()
        self._forget_gone()
        for part in self.parts:
            held = self._take_held(part.stream, self.settings.batch_size)  # the rest: next retry
            if not held:
                continue
            ids = [d.source_id for d in held]
            result = self.ack(part, ids, held)
            still = {d.source_id for d in result.held}
            self.in_hand.landed(part.stream, [i for i in ids if i not in still])
            self._count(result)
            metrics.record_acked(result.acked, result.written)
            self.progress.batch(0, result.written, self.stats)
            self._hold(part, result)
        if not self._held:
            self.held_backoff.succeeded()
        self.beat()

    def _forget_gone(self) -> None:
        """Held dead letters of entries no longer pending are not needed any more: their
        entry was deleted from the stream (XCLAIM, keeping the claim, has removed it from
        the pending list: acknowledged), or acknowledged elsewhere."""
        for part in self.parts:
            held = self._held.get(part.stream)
            if not held:
                continue
            gone = set(self.in_hand.take_gone(part.stream, [d.source_id for d in held]))
            if not gone:
                continue
            kept = [d for d in self._take_held(part.stream) if d.source_id not in gone]
            self._put_held(part.stream, kept)
            self.in_hand.landed(part.stream, list(gone))
            with contextlib.suppress(redis.RedisError, RedisClusterException):
                deleted = [i for i in gone if not self.redis.xrange(part.stream, i, i, count=1)]
                if deleted:
                    log_deleted(part, deleted)
                    self.stats.deleted += len(deleted)
                    self.stats.acked += len(deleted)
                    metrics.record_deleted(len(deleted))
                    metrics.record_acked(len(deleted), [])
