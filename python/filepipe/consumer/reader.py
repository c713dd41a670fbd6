"""Reading: first this consumer's own pending entries, then new ones, and entries of
dead consumers reclaimed with XAUTOCLAIM; with partitions, each stream in turn."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from .. import _native, metrics, stream
from ..config import Settings
from ..partitions import Partition
from ..redaction import error_line
from ..retry import Backoff, is_transient_redis
from ..stream import Entries, Entry, ReadSize
from .ack import log_deleted
from .liveness import InHand
from .pace import Pace
from .progress import Stats
from .stage import Lifecycle

log = logging.getLogger("filepipe")

# A batch just read: its stream, its entries (each with its fields), and whether they were
# delivered before.
RawBatch = tuple[Partition, Entries, bool]


class Reader:
    """The reader, in the caller's thread: reads batches and hands them to `submit`."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        r: redis.Redis,
        parts: list[Partition],
        *,
        life: Lifecycle,
        drain: bool,
        backoff: Backoff,
        in_hand: InHand,
        stats: Stats,
        read_size: ReadSize,
        submit: Callable[[RawBatch, Callable[[], bool]], bool],
        busy: Callable[[], bool],
        beat: Callable[[], None],
        pace: Pace | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.redis = r
        self.parts = parts
        self.life = life
        self.drain = drain
        self.backoff = backoff
        self.in_hand = in_hand
        self.stats = stats
        self.read_size = read_size
        self._submit_to = submit
        self.busy = busy
        self.beat = beat
        self.pace = pace
        self._turn = 0  # the partition whose turn it is to be read first
        self._last_claim = 0.0
        self._read_new_once = False
        self._claim_cursor: dict[int, bytes] = {}

    def run(self) -> None:
        """Reads until stopped (or, draining, until nothing of the group's is left)."""
        s = self.settings
        parts = self.parts
        life = self.life
        # First, this consumer's own pending entries, partition by partition.
        history: dict[int, bytes] = dict.fromkeys(range(len(parts)), b"0")
        while life.running:
            self.beat()
            starting = len(parts) == 1 and history.get(0) == b"0" and not self._read_new_once
            if history and not starting:
                i, after = next(iter(history.items()))
                t0 = time.perf_counter()
                entries = self.redis_read(
                    lambda p=parts[i], h=after: stream.read_own_pending(  # type: ignore[misc]
                        self.redis, p.stream, s.group, self.name, self.read_size.count, h
                    )
                )
                if entries is None:
                    continue
                if not entries:
                    if self.pace is not None:  # an empty reply: one round trip, nothing else
                        self.pace.record("Redis", time.perf_counter() - t0)
                    del history[i]
                    continue
                history[i] = entries[-1][0]
                self.submit(parts[i], entries, redelivered=True)
                continue
            if self.pace is not None and not starting:
                self.pace.probe_redis(self.redis)  # when no read has timed a round trip for a while
            if starting:
                got = self._read_start(history)
            elif not self._claim_due():
                got = self._read_new()
            elif len(parts) == 1:
                got = self._claim_and_read_new(parts[0])
            elif self._reclaim_all():
                continue
            else:
                got = self._read_new()
            if got is None:
                continue
            self._read_new_once = True
            part, entries = got
            if entries:
                self.submit(part, entries, redelivered=False)
                continue
            if self.drain:
                # Nothing new: wait for the loader, then leave if nothing of ours is pending
                # and no dead consumer's entries are waiting to be reclaimed.
                self._wait_idle()
                if not life.running:
                    return
                # (The group's and this consumer's, in one round trip per stream.)
                counts = self.redis_read(
                    lambda: [stream.pending_counts(self.redis, p.stream, s.group, self.name) for p in parts]
                )
                if counts is None:
                    continue
                if any(mine for _, mine in counts):
                    history = {i: b"0" for i, (_, mine) in enumerate(counts) if mine}
                    continue
                if not any(group for group, _ in counts):
                    return
                # Entries still pending elsewhere belong to a live consumer (wait for it) or
                # to a dead one (reclaimed once idle long enough).
                if self._reclaim_all():
                    continue
                life.stopping.wait(0.2)

    def _read_start(self, history: dict[int, bytes]) -> tuple[Partition, Entries] | None:
        """The first reads of one stream, in one round trip: this consumer's own pending
        entries (left by an earlier run under its name), submitted, and new ones, returned
        as `_read_new` returns them. When the pending ones filled the read, more may
        follow: the new ones are left to the reads of pending entries, which come to them
        (once read, they are pending too), and None is returned, as after a fault."""
        s = self.settings
        part = self.parts[0]
        count = self.read_size.count
        t0 = time.perf_counter()
        both = self.redis_read(
            lambda: stream.read_own_pending_and_new(self.redis, part.stream, s.group, self.name, count)
        )
        if both is None:
            return None
        own, new = both
        if not own and self.pace is not None:
            # About one round trip: the first read of new entries is small (the pace keeps
            # the least of the round trips it measures).
            self.pace.record("Redis", time.perf_counter() - t0)
        if len(own) >= count:
            history[0] = own[-1][0]
            self.submit(part, own, redelivered=True)
            return None
        history.clear()
        if own:
            self.submit(part, own, redelivered=True)
        return part, new

    def _wait_idle(self) -> None:
        """Waits until every batch read has been acknowledged (or held back), keeping the
        heartbeat and the claims on the entries in hand fresh meanwhile."""
        while self.busy() and self.life.running:
            self.beat()
            time.sleep(0.005)

    def _read_new(self) -> tuple[Partition, Entries] | None:
        """Never-delivered entries, from one stream. With partitions, each in turn: a
        read that does not block on every partition, starting after the one read last,
        then, if all are empty, a short blocking read on one (a cluster cannot block on
        streams in different hash slots at once). Returns None after a Redis fault, and
        no entries when there is nothing new."""
        s = self.settings
        parts = self.parts
        if len(parts) == 1:
            # Draining: whatever is in the stream now, without waiting for more.
            block = 0 if self.drain else s.block_ms
            entries = self.redis_read(
                lambda: stream.read_new(
                    self.redis, parts[0].stream, s.group, self.name, self.read_size.count, block
                )
            )
            return None if entries is None else (parts[0], entries)
        for k in range(len(parts)):
            part = parts[(self._turn + k) % len(parts)]
            entries = self.redis_read(
                lambda p=part: stream.read_new(  # type: ignore[misc]
                    self.redis, p.stream, s.group, self.name, self.read_size.count, 0
                )
            )
            if entries is None or entries:
                # After a fault too, the next read starts at the next partition: one whose
                # node is down does not keep the others from being read.
                self._turn = (self._turn + k + 1) % len(parts)
                return None if entries is None else (part, entries)
        part = parts[self._turn]
        self._turn = (self._turn + 1) % len(parts)
        if self.drain:
            return part, []
        block = min(s.block_ms, 100)
        entries = self.redis_read(
            lambda: stream.read_new(self.redis, part.stream, s.group, self.name, self.read_size.count, block)
        )
        return None if entries is None else (part, entries)

    def redis_read(self, fn: Callable[[], Any]) -> Any:
        """Runs one Redis read; on a passing fault backs off and returns None."""
        try:
            result = fn()
        except Exception as e:
            if stream.group_missing(e):
                self.recreate_groups(e)
                return None
            if not is_transient_redis(e):
                raise
            self.backoff.failed(e)
            return None
        self.backoff.succeeded()
        return result

    def recreate_groups(self, e: BaseException) -> None:
        """Redis no longer has the group (flushed, restarted without persistence, the stream
        or the group deleted by hand): creates it again, at the start of the stream. What is
        delivered again then loads as already present."""
        s = self.settings
        self._claim_cursor.clear()
        for part in self.parts:
            created = self.backoff.call(
                lambda p=part: stream.ensure_group(self.redis, p.stream, s.group),  # type: ignore[misc]
                is_transient_redis,
            )
            if created:
                log.warning(
                    "group %s on %s was missing (%s): recreated it at the start of the stream; "
                    "Redis was flushed or restarted without persistence, or the stream or the "
                    "group was deleted",
                    s.group,
                    part.stream,
                    error_line(e),
                )
                # For `filepipe status`; best effort: a failure here is the next read's to report.
                with contextlib.suppress(redis.RedisError):
                    stream.note_recreated(self.redis, part.stream, s.group, self.name, error_line(e))

    def deliveries(self, part: Partition, entries: Entries) -> dict[bytes, int]:
        """How many times each of `entries` (read again) was delivered."""
        s = self.settings
        ids, _ = _native.entry_ids(entries)
        rows = self.redis_read(
            lambda: self.redis.xpending_range(
                part.stream,
                s.group,
                min=min(ids, key=stream.id_key),
                max=max(ids, key=stream.id_key),
                count=len(ids) * 2,
                consumername=self.name,
            )
        )
        return {r["message_id"]: int(r["times_delivered"]) for r in rows or []}

    def _claim_due(self) -> bool:
        # Not before the first read of new entries: at the start, that read goes first and
        # the claim follows while its batch is prepared (draining, a last look is taken
        # before leaving anyway).
        if not self._read_new_once:
            return False
        return time.monotonic() - self._last_claim >= self.settings.claim_idle_ms / 2000

    def _reclaim_all(self) -> bool:
        """Reclaims idle entries on every stream and submits them. True if any were."""
        found = False
        for part in self.parts:
            claimed = self._reclaim(part)
            if claimed:
                found = True
                self.submit(part, claimed, redelivered=True)
        return found

    def _reclaim(self, part: Partition) -> list[Entry]:
        """XAUTOCLAIM: takes over entries idle longer than `claim_idle_ms` (their
        consumer died or stalled). Returns them; the next call continues the scan."""
        s = self.settings
        self._last_claim = time.monotonic()
        # The entries in hand as the claim is sent. Only this thread adds to them, so one
        # not among them is in no batch of ours, and one among them is its batch's (to load
        # and to count) even if that batch is acknowledged and let go before the reply
        # comes back: asked after the reply, such an entry would be taken for nobody's.
        carried = self.in_hand.snapshot(part.stream)
        reply = self.redis_read(
            lambda: self.redis.xautoclaim(
                part.stream,
                s.group,
                self.name,
                min_idle_time=s.claim_idle_ms,
                start_id=self._claim_cursor.get(part.index or 0, b"0-0"),
                count=self.read_size.count,
            )
        )
        return [] if reply is None else self._claimed(part, reply, carried)

    def _claim_and_read_new(self, part: Partition) -> tuple[Partition, Entries] | None:
        """A claim (as `_reclaim`, its entries submitted) and a read of new entries, not
        blocking, in one round trip. Returns what `_read_new` does."""
        s = self.settings
        self._last_claim = time.monotonic()
        start = self._claim_cursor.get(part.index or 0, b"0-0")
        carried = self.in_hand.snapshot(part.stream)  # (as the claim is sent: see _reclaim)
        both = self.redis_read(
            lambda: stream.claim_and_read_new(
                self.redis, part.stream, s.group, self.name, self.read_size.count, s.claim_idle_ms, start
            )
        )
        if both is None:
            return None
        reply, new = both
        claimed = self._claimed(part, reply, carried)
        if claimed:
            self.submit(part, claimed, redelivered=True)
        return part, new

    def _claimed(self, part: Partition, reply: Any, carried: set[bytes]) -> list[Entry]:
        """The entries an XAUTOCLAIM reply took over that are not of a batch of ours
        (`carried`: in hand as the claim was sent); moves the scan's cursor on and counts
        the entries it found deleted."""
        s = self.settings
        key = part.index or 0
        cursor, claimed = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        self._claim_cursor[key] = cursor if cursor not in (b"0-0", "0-0") else b"0-0"
        # Our own entries in flight are already being processed (and counted with their
        # batch), even if Redis saw them idle long enough to be claimed, or deleted since
        # they were read with their fields.
        entries: list[Entry] = [e for e in claimed if e[0] not in carried]
        gone = [i for i in deleted if i not in carried]
        if deleted:
            # Entries deleted from the stream while pending: XAUTOCLAIM (Redis 7) has removed
            # them from the group's pending list, which acknowledges them. (Before 7.0 it
            # returned them among the claimed entries, without fields, like a history read.)
            self.stats.acked += len(deleted)
            metrics.record_acked(len(deleted), [])
        if gone:
            log_deleted(part, gone)
            self.stats.deleted += len(gone)
            metrics.record_deleted(len(gone))
        if entries:
            log.info("reclaimed %d entries idle for more than %d ms", len(entries), s.claim_idle_ms)
        return entries

    def submit(self, part: Partition, entries: Entries, *, redelivered: bool) -> None:
        """Hands a batch just read to the preparer. An entry read again without its fields
        (this consumer's history, a claim before Redis 7) was deleted from the stream while
        pending: there is nothing to load or to dead-letter, it is acknowledged here."""
        ids, gone = _native.entry_ids(entries)  # gone: nil fields (or, parsed by redis-py, empty)
        if gone:
            self._ack_deleted(part, gone)
            entries = [e for e in entries if e[1]]
            if not entries:
                return
            deleted = set(gone)
            ids = [i for i in ids if i not in deleted]
        self.in_hand.add(part.stream, ids)
        if not self._submit_to((part, entries, redelivered), self._give_up_handing_over):
            self.in_hand.landed(part.stream, ids)  # not handed over: pending, delivered again
        elif self.pace is not None:
            self.pace.first_prepared()  # the next read is sized by what the first batch showed

    def _ack_deleted(self, part: Partition, ids: list[bytes]) -> None:
        """Acknowledges entries read without their fields, at once: they never join a
        batch, so no claim of this consumer's (XAUTOCLAIM, or the XCLAIM that keeps the
        entries in hand) can remove them from the pending list behind a batch's back.
        Counted as XACK counts them: one another consumer's claim removed first is its to
        count. After a Redis fault they stay pending, to be met again."""
        s = self.settings
        reply = self.redis_read(lambda: self.redis.xack(part.stream, s.group, *ids))
        if reply is None:
            return
        log_deleted(part, ids)
        acked = int(reply)
        self.stats.deleted += acked
        self.stats.acked += acked
        metrics.record_deleted(acked)
        metrics.record_acked(acked, [])

    def _give_up_handing_over(self) -> bool:
        """Asked while the preparer has no room (the stages downstream wait: an outage, a
        table refusing rows); the entries in hand keep their claim and the heartbeat stays
        fresh meanwhile."""
        self.beat()
        return self.life.giving_up or self.life.past_deadline()
