"""SIGTERM and SIGINT as a request to stop, from the moment `filepipe consume` starts.

The command installs these handlers first thing, before it imports anything heavy, so a
signal that arrives while it starts, connects, or waits for a service that does not
answer yet is a stop request like any other: the consumer sees it as soon as it exists
and returns (exit 0) without reading anything more. A second signal leaves at once
(exit 128 + the signal); whatever was not acknowledged stays pending and is delivered
again.

The supervisor starts its workers with both signals blocked, and `install` unblocks
them: a signal sent to a worker before its handlers exist waits, pending in the kernel,
instead of killing it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """What the signals asked for: `event` is set by the first one."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.count = 0
        self._listeners: list[Callable[[int], None]] = []

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        if self.count > 1:
            os._exit(128 + signum)
        self.signum = signum
        self.event.set()
        for listener in list(self._listeners):
            listener(signum)

    def listen(self, fn: Callable[[int], None]) -> None:
        """Calls `fn(signum)` at the first signal, or now if it has come already."""
        self._listeners.append(fn)
        if self.signum is not None:
            fn(self.signum)

    def unlisten(self, fn: Callable[[int], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)


_request: StopRequest | None = None
_previous: dict[int, Any] = {}


def install() -> StopRequest:
    """Makes SIGTERM and SIGINT stop requests (in the main thread), and unblocks them.
    Idempotent: returns the one request of this process."""
    global _request
    if _request is None:
        _request = StopRequest()
        for sig in SIGNALS:
            _previous[sig] = signal.signal(sig, _request.handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    return _request


def installed() -> StopRequest | None:
    """The process's stop request, if `install` was called."""
    return _request


def uninstall() -> None:
    """Puts back the handlers that were there before `install`."""
    global _request
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _request = None
