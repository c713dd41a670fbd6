"""XREADGROUP replies handed to the extension as the bytes Redis sent, not as objects.

hiredis would turn a reply of N entries into about 15 Python objects per entry (lists,
ids, names, values), which the extension then reads one by one; the garbage collector
walks them meanwhile. `InPlaceParser` is redis-py's hiredis parser but for the replies
read while `entries_in_place()` is on in the reading thread: their bytes go to a
`_native.ReplyReader`, and an XREADGROUP reply comes back as one `_native.Reply`.
Everything else stays redis-py's: the connection (TLS, AUTH, a cluster's redirections,
health checks, timeouts), and any other reply, which is handed to hiredis as it came
(an error, a null, a PONG read first)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError
from redis.utils import HIREDIS_AVAILABLE

try:
    from redis.utils import SENTINEL  # no timeout of a read's own
except ImportError:  # pragma: no cover
    SENTINEL = object()

from .. import _native

_wanted = threading.local()


@contextlib.contextmanager
def entries_in_place() -> Iterator[None]:
    """While on, an XREADGROUP reply this thread reads comes back as a `_native.Reply`."""
    _wanted.on = True
    try:
        yield
    finally:
        _wanted.on = False


def command_packer() -> Any | None:
    """The command packer to give redis-py's connections (`command_packer`), or None
    without hiredis: redis-py's own, without the pass over every argument it makes in
    Python first (to convert bytearrays, which hiredis refuses): an acknowledgement
    carries thousands of entry ids."""
    if not HIREDIS_AVAILABLE:
        return None
    packer: Any = CommandPacker  # its __init__ is redis-py's, typed in some versions only
    return packer()


def parser_class() -> type[Any] | None:
    """The parser to give redis-py's connections (`parser_class`), or None without hiredis."""
    return InPlaceParser if HIREDIS_AVAILABLE else None


if HIREDIS_AVAILABLE:
    import hiredis
    from redis._parsers.hiredis import _HiredisParser
    from redis._parsers.socket import (
        NONBLOCKING_EXCEPTIONS,
        SERVER_CLOSED_CONNECTION_ERROR,
    )

    class CommandPacker(HiredisRespSerializer):
        """hiredis's packing of a command, straight; any argument it refuses (a
        bytearray, a wrong type) goes the way of redis-py's serializer, converted or
        raised as a DataError."""

        def pack(self, *args: Any) -> list[bytes]:
            first = args[0]
            if isinstance(first, str):
                parts = (*first.encode().split(), *args[1:])
            elif b" " in first:
                parts = (*first.split(), *args[1:])
            else:
                parts = args
            try:
                return [hiredis.pack_command(parts)]
            except TypeError:
                return super().pack(*args)  # type: ignore[no-any-return]

    class InPlaceParser(_HiredisParser):
        """redis-py's hiredis parser, but for XREADGROUP replies read in place."""

        _replies: _native.ReplyReader | None = None

        def on_connect(self, connection: Any, **kwargs: Any) -> None:
            super().on_connect(connection, **kwargs)  # type: ignore[no-untyped-call]
            self._replies = _native.ReplyReader()

        def read_response(self, disable_decoding: bool = False, **kwargs: Any) -> Any:  # type: ignore[override]
            # push_request and timeout, where redis-py has them: passed on as they came.
            reader = getattr(self, "_reader", None)
            sock = getattr(self, "_sock", None)
            buf = getattr(self, "_buffer", None)
            replies = self._replies
            if (
                not getattr(_wanted, "on", False)
                or kwargs.get("timeout", SENTINEL) is not SENTINEL
                or reader is None
                or replies is None
                or sock is None
                or buf is None
                or reader.has_data()  # a reply hiredis has begun (or read ahead)
            ):
                return super().read_response(disable_decoding, **kwargs)
            try:
                while True:
                    n = sock.recv_into(buf)
                    if n == 0:
                        raise ConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
                    if replies.feed(buf, n):
                        break
            except NONBLOCKING_EXCEPTIONS as e:
                replies.take()
                raise ConnectionError(f"Error while reading from socket: {e.args}") from e
            except BaseException:
                replies.take()  # the connection is dropped: the next reply starts afresh
                raise
            reply, rest = replies.take()
            if rest:
                reader.feed(rest)  # not an XREADGROUP reply, or what came after it
            if reply is None:
                return super().read_response(disable_decoding, **kwargs)
            return reply

else:  # pragma: no cover - hiredis is a dependency

    class InPlaceParser:  # type: ignore[no-redef]
        """Not available without hiredis."""
