"""Fault injection for the test suite's crash tests.

`FILEPIPE_CRASH_AT=<point>[:<nth>]` kills the process with SIGKILL the nth time
it passes `point`: during_copy (the COPY's rows sent, the COPY not ended), after_copy,
before_commit (the merge's rows inserted, its transaction open), after_commit,
after_ack. Unset, it costs one environment lookup per batch."""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Dies here if the test suite asked for it."""
    spec = os.environ.get("FILEPIPE_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
