"""Rates, one definition per window, each with the name shown beside it.

A rate is files per second: entries loaded into the table (new rows and redeliveries
already present), dead letters counted apart. It is read from a counter sampled over
time (the group's acknowledged entries on the dashboard, a consumer's heartbeat
figures) as (last - first) / elapsed over the window ending at the newest sample:

* `LAST_10_S`: the dashboard's headline card, every point of its chart (the card is
  the chart's last point) and its consumer rows (over what there is in the first 10 s);
* `LAST_MINUTE`: `filepipe status`'s throughput, rows the table received in the last
  60 s by its own clock (`processed_at`), and the dashboard's second figure (shown once
  it has sampled a whole minute: over less it would not be the same figure);
* `SINCE_START`: a consumer's total over its whole run, idle time included
  (`filepipe status`'s consumer rows, the consumer's progress lines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..heartbeat import Heartbeat


@dataclass(frozen=True)
class Window:
    name: str  # as shown: "last 10 s"
    seconds: float | None  # None: since start


LAST_10_S = Window("last 10 s", 10.0)
LAST_MINUTE = Window("last minute", 60.0)
SINCE_START = Window("since start", None)


def over(
    points: Sequence[tuple[float, int | None]], window: Window, end: int | None = None, *, whole: bool = False
) -> float | None:
    """The rate of a counter sampled at `points` ((time, value), oldest first) over
    `window`, ending at `points[end]` (the newest by default): from the newest point at
    least `window.seconds` older, or while the samples span less, from the oldest known
    one (with `whole`, None until they span the window). None with fewer than two known
    points. A counter that went down (a restart) counts as no progress."""
    i = len(points) - 1 if end is None else end
    if i < 1:
        return None
    t1, v1 = points[i]
    j = 0
    if window.seconds is not None:
        j = i - 1
        while j > 0 and points[j][0] > t1 - window.seconds:
            j -= 1
        if whole and t1 - points[j][0] < window.seconds:
            return None
    while j < i and points[j][1] is None:
        j += 1
    t0, v0 = points[j]
    if v0 is None or v1 is None or t1 <= t0:
        return None
    return max(v1 - v0, 0) / (t1 - t0)


def since_start(beat: Heartbeat) -> float | None:
    """A consumer's rate since it started, from its heartbeat (`SINCE_START`)."""
    if not beat.started or beat.updated <= beat.started:
        return beat.rate
    return beat.loaded / (beat.updated - beat.started)
