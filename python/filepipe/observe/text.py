"""How the observers write figures: durations, sizes, counts and clock times, one way
for `filepipe status`, the dashboard (whose script mirrors `duration` and `clock`) and
the problems both list; and how every command words a count (`plural`)."""

from __future__ import annotations

from datetime import datetime, timezone


def duration(seconds: float) -> str:
    """`0.4 s`, `12 s`, `3m 05s`, `2h 07m`, `1d 4h`."""
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d {int(s % 86400 // 3600)}h"


def size(n: float) -> str:
    """`512 B`, `3.2 KiB`, … `1.5 GiB`."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} GiB"


def plural(n: int, word: str, many: str | None = None) -> str:
    """`word` for one, else `many` (by default `word` + "s"): `f"{n} {plural(n, 'event')}"`
    is "1 event", "300 events"; the count is formatted by the caller."""
    return word if n == 1 else many or word + "s"


def entries(n: int) -> str:
    """`1 entry`, `5,000 entries`."""
    return f"{n:,} {plural(n, 'entry', 'entries')}"


def clock(at: float) -> str:
    """A moment (`time.time()`) as `2026-12-02 06:40:12 UTC`."""
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
