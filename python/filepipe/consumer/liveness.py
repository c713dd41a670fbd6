"""What tells the group this consumer is alive: its heartbeat, and the claims on the
entries it holds, kept fresh while they wait (an outage, a table that refuses rows, a
full Redis) so that no other consumer reclaims them as a dead consumer's."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from .. import stream
from ..config import Settings
from ..constants import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, heartbeat_key
from ..heartbeat import Heartbeat
from ..partitions import Partition
from ..retry import is_transient_redis
from .progress import Stats

log = logging.getLogger("filepipe")


class InHand:
    """The entry ids, by stream, of every entry this process has read and not yet
    acknowledged or let go. XAUTOCLAIM cannot tell them (idle in Redis's eyes during a
    long wait) from a dead consumer's; `keep` claims them again so that Redis does not
    either. (A set of ids per stream: a batch goes in and out by set operations, with no
    Python object made per entry.)"""

    def __init__(self, r: redis.Redis, settings: Settings, name: str) -> None:
        self.redis = r
        self.settings = settings
        self.name = name
        self._entries: dict[str, set[bytes]] = {}
        self._gone: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()
        self._kept_at = time.monotonic()

    def add(self, stream_name: str, ids: list[bytes]) -> None:
        with self._lock:
            self._entries.setdefault(stream_name, set()).update(ids)

    def landed(self, stream_name: str, ids: list[bytes]) -> None:
        """These entries are no longer in this consumer's hands (acknowledged, or let go)."""
        with self._lock:
            for held in (self._entries, self._gone):
                in_stream = held.get(stream_name)
                if in_stream:
                    in_stream.difference_update(ids)

    def snapshot(self, stream_name: str) -> set[bytes]:
        """A copy of the ids in hand on `stream_name` now."""
        with self._lock:
            return set(self._entries.get(stream_name, ()))

    def keep(self, *, force: bool = False) -> None:
        """Every `claim_idle_ms / 2`, claims the entries in hand again (XCLAIM JUSTID: their
        delivery count stays, and a full Redis allows it). Best effort: a Redis fault is
        reported by whichever stage waits for Redis."""
        now = time.monotonic()
        if not force and now - self._kept_at < self.settings.claim_idle_ms / 2000:
            return
        self._kept_at = now
        with self._lock:
            by_stream = {name: list(ids) for name, ids in self._entries.items() if ids}
        for name, ids in by_stream.items():
            try:
                kept, checked = self._claim_own(name, ids)
            except (redis.RedisError, RedisClusterException) as e:
                if not is_transient_redis(e):
                    log.debug("could not keep the claim on %d entries of %s: %s", len(ids), name, e)
                continue
            gone = [i for i in ids if i in checked and i not in kept]
            if gone:
                # XCLAIM drops entries deleted from the stream from the pending list; the
                # others were acknowledged, or reclaimed by another consumer.
                with self._lock:
                    in_hand = self._entries.get(name, set())
                    self._gone.setdefault(name, set()).update(i for i in gone if i in in_hand)

    def _claim_own(self, name: str, ids: list[bytes]) -> tuple[set[bytes], set[bytes]]:
        """Claims again those of `ids` still pending with this consumer (not those another
        consumer reclaimed meanwhile: they are its now). Returns the ids still ours, and
        the ids whose state this found out (the pending list read may end early)."""
        count = len(ids) * 2
        rows: list[dict[str, Any]] = self.redis.xpending_range(
            name,
            self.settings.group,
            min=min(ids, key=stream.id_key),
            max=max(ids, key=stream.id_key),
            count=count,
            consumername=self.name,
        )
        checked = set(ids)
        if len(rows) >= count:  # read up to the last row only
            last = stream.id_key(rows[-1]["message_id"])
            checked = {i for i in ids if stream.id_key(i) <= last}
        own: list[Any] = [r["message_id"] for r in rows if r["message_id"] in checked]
        if not own:
            return set(), checked
        kept: list[bytes] = self.redis.xclaim(
            name,
            self.settings.group,
            self.name,
            0,
            own,  # type: ignore[assignment]
            justid=True,
        )
        return set(kept), checked

    def take_gone(self, stream_name: str, ids: list[bytes]) -> list[bytes]:
        """Which of `ids` the last `keep` found no longer pending (taken: asked once)."""
        with self._lock:
            found = self._gone.get(stream_name)
            if not found:
                return []
            gone = [i for i in ids if i in found]
            found.difference_update(gone)
        return gone


class Liveness:
    """The heartbeat, one per stream read (beside it: on a cluster, in its hash slot),
    refreshed at most every HEARTBEAT_INTERVAL_S, and with it the claims on the entries
    in hand. Anything that waits calls `beat()`."""

    def __init__(
        self,
        r: redis.Redis,
        settings: Settings,
        name: str,
        parts: list[Partition],
        stats: Stats,
        in_hand: InHand,
        dead_letters_waiting: Callable[[], int],
    ) -> None:
        self.redis = r
        self.settings = settings
        self.name = name
        self.parts = parts
        self.stats = stats
        self.in_hand = in_hand
        self.dead_letters_waiting = dead_letters_waiting
        self.host = socket.gethostname()
        self._last = 0.0
        self._aside: threading.Thread | None = None

    def beat(self, force: bool = False) -> None:
        self.in_hand.keep()
        now = time.monotonic()
        if not force and now - self._last < HEARTBEAT_INTERVAL_S:
            return
        self._last = now
        self._write()

    def beat_aside(self) -> None:
        """A heartbeat now, written from a thread of its own (the caller goes on): the next
        `beat()` is due HEARTBEAT_INTERVAL_S from now."""
        self._last = time.monotonic()
        self._aside = threading.Thread(target=self._write, name="filepipe-heartbeat", daemon=True)
        self._aside.start()

    def _write(self) -> None:
        st = self.stats
        s = self.settings
        beat = Heartbeat(
            name=self.name,
            host=self.host,
            pid=os.getpid(),
            stream=s.stream,
            partitions=s.partitions,
            group=s.group,
            started=st.started,
            updated=time.time(),
            inserted=st.inserted,
            duplicates=st.duplicates,
            dead_lettered=st.dead_lettered,
            dead_letters_waiting=self.dead_letters_waiting(),
            deleted=st.deleted,
            batches=st.batches,
            rate=round(st.rate(), 2),
            last_error=st.last_error,
        )
        value = beat.to_json()
        # Liveness is best effort; the read loop reports Redis outages.
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            stream.set_heartbeats(
                self.redis, {heartbeat_key(p.stream, self.name): value for p in self.parts}, HEARTBEAT_TTL_S
            )

    def remove(self) -> None:
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            pipe = self.redis.pipeline(transaction=False)
            self.removal(pipe)
            pipe.execute()

    def removal(self, pipe: Any) -> None:
        """Adds the deletion of the heartbeats to `pipe` (sent by the caller)."""
        if self._aside is not None:
            self._aside.join(10)  # (written after their deletion, it would outlive the consumer)
        for part in self.parts:
            pipe.delete(heartbeat_key(part.stream, self.name))
