"""A loopback TCP proxy for fault and latency tests: adds delay each way, stalls
(keeps connections open but forwards nothing), cuts every connection, or refuses
new ones. It only ever listens on and connects to 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque


class TcpProxy:
    """`TcpProxy(target_port).start()`; then point clients at `proxy.port`."""

    def __init__(
        self, target_port: int, *, delay_ms: float = 0.0, listen_port: int = 0, record: bool = False
    ) -> None:
        self.target_port = target_port
        # With `record`: (time.monotonic(), "up" to the server or "down" to the client, bytes)
        # of every chunk as it arrives, before its delay.
        self.chunks: list[tuple[float, str, bytes]] | None = [] if record else None
        self.delay = delay_ms / 1000.0
        self.listen_port = listen_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._refusing = False
        self.connections = 0

    # -- control (thread-safe) --------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def set_delay(self, delay_ms: float) -> None:
        """One-way delay added to every chunk, in both directions."""
        self.delay = delay_ms / 1000.0

    def stall(self) -> None:
        """Stop forwarding bytes; connections stay open (a silent network)."""
        self._call(lambda: self._flowing.clear() if self._flowing else None)

    def resume(self) -> None:
        """Forward again (and accept again)."""
        self._refusing = False
        self._call(lambda: self._flowing.set() if self._flowing else None)

    def cut(self) -> None:
        """Close every open connection (both ends see a reset/EOF)."""
        self._call(self._close_all)

    def refuse(self) -> None:
        """Cut everything and close new connections as soon as they arrive."""
        self._refusing = True
        self.cut()

    def close(self) -> None:
        async def shutdown() -> None:
            self._close_all()
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()  # else its selector and self-pipe leak (a ResourceWarning)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------

    def _call(self, fn: object) -> None:
        async def run() -> None:
            fn()  # type: ignore[operator]

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def _close_all(self) -> None:
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._conns.clear()

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self.connections += 1
        self._conns.update((client_w, server_w))
        await asyncio.gather(
            self._pump(client_r, server_w, "up"),
            self._pump(server_r, client_w, "down"),
            return_exceptions=True,
        )
        for w in (client_w, server_w):
            self._conns.discard(w)
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str) -> None:
        assert self._flowing is not None
        chunks: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        done = False

        async def receive() -> None:
            nonlocal done
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    now = time.monotonic()
                    if self.chunks is not None:
                        self.chunks.append((now, way, data))
                    chunks.append((now + self.delay, data))
                    arrived.set()
            finally:
                done = True
                arrived.set()

        async def send() -> None:
            assert self._flowing is not None
            while True:
                while not chunks:
                    if done:
                        with contextlib.suppress(Exception):
                            writer.write_eof()
                        return
                    arrived.clear()
                    await arrived.wait()
                due, data = chunks[0]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                chunks.popleft()
                writer.write(data)
                await writer.drain()

        await asyncio.gather(receive(), send())


def main() -> None:
    """`python -m tests.support.proxy TARGET_PORT DELAY_MS`: runs a delaying proxy in its
    own process (so it does not compete for a benchmark's GIL) and prints its port."""
    import sys

    target, delay = int(sys.argv[1]), float(sys.argv[2])
    proxy = TcpProxy(target, delay_ms=delay).start()
    print(proxy.port, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        proxy.close()


if __name__ == "__main__":
    main()
