"""The consumer's housekeeper: the thread that trims its streams, caps their dead letters and
removes departed consumers, and says in the log what it did and what failed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from .. import constants as c
from .. import metrics
from ..config import Settings
from ..observe.text import duration
from ..partitions import Partition
from ..redaction import error_line
from ..retry import is_transient_redis
from .departed import remove_departed
from .trim import TrimResult, trim

log = logging.getLogger("filepipe")


class Housekeeper:
    """Trims a consumer's streams from its own thread: every `interval` seconds, and as
    soon as `after_entries` entries were acknowledged since the last pass. `acked()` is
    all the consumer calls; `stop()` does a last pass (without waiting for the lease), so
    a drained stream is left trimmed."""

    def __init__(
        self,
        settings: Settings,
        r: redis.Redis,
        parts: Sequence[Partition],
        owner: str,
        *,
        interval: float = c.TRIM_INTERVAL_S,
        after_entries: int = c.TRIM_AFTER_ENTRIES,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = r
        self.parts = list(parts)
        self.owner = owner
        self.interval = interval
        self.after_entries = after_entries
        self.on_error = on_error
        self.last: dict[str, TrimResult] = {}
        self._acked = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error = ""
        self._reported = False  # the error is in the heartbeat's last_error
        self._next_departed = time.monotonic() + min(c.DEPARTED_CHECK_S, settings.claim_idle_ms / 1000)
        self._departed_checked = False  # in this run, by the thread
        self._dead_warned: set[str] = set()
        self._dead_age_warned: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="filepipe-housekeeper", daemon=True)
        self._thread.start()

    def acked(self, n: int) -> None:
        """The consumer acknowledged `n` entries (called from its acknowledger)."""
        self._acked += n
        if self._acked >= self.after_entries:
            self._wake.set()

    def stop(self, also: Callable[[Any], None] | None = None) -> bool:
        """Ends the thread, then makes a last pass (departed consumers included), with
        `also`'s commands in its pipeline (trim.trim). False if it was not running (then
        neither is made)."""
        if self._thread is None:
            return False
        self._stop.set()
        self._wake.set()
        self._thread.join(30)
        self._thread = None
        # Departed consumers were looked for when the thread started (unless that failed).
        self.run_once(lease_ms=0, departed=not self._departed_checked, also=also)
        return True

    def _run(self) -> None:
        # Departed consumers first, while the consumer starts reading: a short drain's
        # stop then waits for the last trim only.
        self._departed_checked = self._remove_all_departed()
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            if self._stop.is_set():
                return
            self._wake.clear()
            self.run_once()
            # However fast entries are acknowledged, a pass at most every 100 ms.
            self._stop.wait(0.1)

    def run_once(
        self,
        *,
        lease_ms: int = c.TRIM_LEASE_MS,
        departed: bool | None = None,
        also: Callable[[Any], None] | None = None,
    ) -> list[TrimResult]:
        """One pass over every stream; departed consumers are looked for too with
        `departed`, or when it is time (None); never raises: a failure is logged once."""
        self._acked = 0
        try:
            results = trim(self.redis, self.parts, self.settings, self.owner, lease_ms=lease_ms, also=also)
            for result in results:
                self._report(result)
            if departed or (departed is None and time.monotonic() >= self._next_departed):
                self._next_departed = time.monotonic() + c.DEPARTED_CHECK_S
                for part, result in zip(self.parts, results, strict=True):
                    if result.leased:
                        self._remove_departed(part)
        except Exception as e:
            self._failed(e)
            return []
        if any(result.leased for result in results):
            self._recovered()
        return results

    def _report(self, result: TrimResult) -> None:
        self.last[result.stream] = result
        if not result.leased:
            return
        if result.trimmed:
            metrics.TRIMMED.inc(result.trimmed)
            log.debug(
                "trimmed %d entries of %s (kept %d: %s)",
                result.trimmed,
                result.stream,
                result.length,
                result.why,
            )
        dead = next(p.dead_stream for p in self.parts if p.stream == result.stream)
        window = self.settings.dead_window
        if result.dead_dropped:
            metrics.DEAD_DROPPED.inc(result.dead_dropped)
            log.warning(
                "dead-letter stream %s is full: dropped its %d oldest dead letters "
                "(DEAD_LETTER_RETENTION=%s keeps %s)",
                dead,
                result.dead_dropped,
                self.settings.dead_letter_retention,
                window.describe(),
            )
        settings = self.settings.dead_letter_retention
        if window.count and not window.keep_all:
            n = result.dead_letters
            self._near_cap(
                self._dead_warned,
                dead,
                n / window.count,
                lambda: (
                    f"dead-letter stream {dead} holds {n} dead letters, {100 * n // window.count}% of "
                    f"DEAD_LETTER_RETENTION={settings}: the oldest are dropped beyond {window.count} "
                    "(replay or purge them with `filepipe dlq`)"
                ),
            )
        age = result.dead_oldest_age_ms
        if window.age_s and not window.keep_all and age is not None:
            share = age / (window.age_s * 1000)
            self._near_cap(
                self._dead_age_warned,
                dead,
                share,
                lambda: (
                    f"dead-letter stream {dead} holds dead letters {duration(age / 1000)} old, "
                    f"{int(100 * share)}% of DEAD_LETTER_RETENTION={settings}: those older than "
                    f"{window.age_text} are dropped (replay or purge them with `filepipe dlq`)"
                ),
            )

    @staticmethod
    def _near_cap(warned: set[str], dead: str, share: float, warning: Callable[[], str]) -> None:
        """Warns once when a dead-letter stream reaches DEAD_LETTER_WARN_SHARE of a cap (its
        count or its age), and again only after it fell below half that."""
        if share >= c.DEAD_LETTER_WARN_SHARE:
            if dead not in warned:
                warned.add(dead)
                log.warning("%s", warning())
        elif share < c.DEAD_LETTER_WARN_SHARE / 2:
            warned.discard(dead)

    def _remove_all_departed(self) -> bool:
        try:
            for part in self.parts:
                self._remove_departed(part)
        except Exception as e:
            self._failed(e)
            return False
        return True

    def _remove_departed(self, part: Partition) -> None:
        s = self.settings
        removed = remove_departed(self.redis, part, s.group, s.claim_idle_ms, keep=self.owner)
        if removed:
            metrics.CONSUMERS_REMOVED.inc(len(removed))
            shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
            log.info(
                "removed %d departed consumer%s from group %s on %s (nothing pending, no heartbeat): %s",
                len(removed),
                "" if len(removed) == 1 else "s",
                s.group,
                part.stream,
                shown,
            )

    def _failed(self, e: BaseException) -> None:
        message = error_line(e).split(" script: ")[0]  # not the script's sha and line
        if message == self._error:
            return
        self._error = message
        if is_transient_redis(e) or isinstance(e, RedisClusterException):
            # The reader and the acknowledger already say that Redis is down or refusing.
            log.info("trimming paused while Redis is unreachable or refuses writes (%s)", message)
            return
        log.warning("trimming failed (%s): acknowledged entries stay in Redis until it works", message)
        self._reported = True
        if self.on_error is not None:
            self.on_error(f"trimming: {message}")

    def _recovered(self) -> None:
        if self._error:
            log.info("trimming works again")
            self._error = ""
            if self._reported and self.on_error is not None:
                self.on_error("")
            self._reported = False
