"""Keep-alive HTTP/1.1 connections to the upstream: the I/O around
:class:`~proxy.frontends.activesync.wire.UpstreamWire`.

An :class:`UpstreamConnection` is an ``asyncio.Protocol`` carrying one request at a
time: the request (its body at most ``CHUNK_BYTES``) goes out in one write, the answer
is read with flow control (reading pauses while more than :data:`HIGH_WATER` bytes
wait for the consumer), so a large answer streams through in pieces of at most
``CHUNK_BYTES``. :class:`UpstreamPool`
keeps the idle ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Final, Literal, cast, overload

import aiohttp
from yarl import URL

from proxy.frontends.activesync.wire import (
    CHUNK_BYTES,
    RequestHead,
    ResponseHead,
    UpstreamProtocolError,
    UpstreamWire,
)

#: What an unreachable or misbehaving upstream raises, on either path (the pool's
#: and aiohttp's).
UPSTREAM_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError,
                          asyncio.IncompleteReadError)
#: Received bytes waiting for the consumer above which reading pauses.
HIGH_WATER: Final = 4 * CHUNK_BYTES
#: Upstream keep-alive connections kept idle in the pool.
POOL_IDLE_CONNECTIONS: Final = 100


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream; see the module docstring."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.wire = UpstreamWire()
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._pending = bytearray()  # received, not yet given to the wire
        self._eof_fed = False
        self._starved = False  # the wire asked for more bytes than it was given
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        # One timer per connection, re-armed lazily (as the request-head timeout in
        # proxy.net.http_guard): each wait only sets its deadline. A timer per wait cost
        # about 2% of the CPU of a small request (a handle made and cancelled each time).
        self._deadline = 0.0  # when the wait under way times out
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the armed timer fires

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) > HIGH_WATER and not self._paused and \
                self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def abort(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _wait_until(self, loop: asyncio.AbstractEventLoop, timeout: float
                    ) -> asyncio.Future[None]:
        """A future for the next bytes (or the end), failed with ``TimeoutError`` after
        ``timeout`` seconds; the connection's timer is armed unless it fires in time."""
        self._deadline = deadline = loop.time() + timeout
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._check_deadline)
            self._timer_at = deadline
        self._waiter = fut = loop.create_future()
        return fut

    def _check_deadline(self) -> None:
        """The timer fired: fail a wait past its deadline, re-arm for a later one, or
        stay off when nothing waits (the next wait arms it)."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self.closed:
            return
        loop = asyncio.get_running_loop()
        if self._deadline > loop.time():
            self._timer = loop.call_at(self._deadline, self._check_deadline)
            self._timer_at = self._deadline
            return
        waiter.set_exception(TimeoutError())

    # -- one exchange
    def send(self, head: RequestHead, body: bytes) -> None:
        """Write a request (``head`` from ``wire.request_head``) with its body."""
        assert self.transport is not None
        self.transport.write(self.wire.request(head, body))
        self._starved = True  # nothing of the answer has been given to the wire yet

    @overload
    async def _next_event(self, timeout: float, head: Literal[True]) -> ResponseHead: ...
    @overload
    async def _next_event(self, timeout: float, head: Literal[False]) -> bytes: ...

    async def _next_event(self, timeout: float, head: bool) -> ResponseHead | bytes:
        """The wire's next event, the head (``head``) or a body piece, fed with what
        arrived or waited for (``TimeoutError`` after ``timeout`` seconds without a
        byte). One coroutine, the waiting inlined: it runs for every answer."""
        wire = self.wire
        while True:
            if self._starved:  # the wire needs bytes: give it some, or wait for them
                if self._pending:
                    piece = bytes(self._pending[:CHUNK_BYTES])
                    del self._pending[:CHUNK_BYTES]
                    wire.receive_data(piece)
                elif self.closed and not self._eof_fed:
                    self._eof_fed = True
                    wire.receive_data(b"")
                elif self.closed:
                    raise UpstreamProtocolError("upstream answer cut short")
                else:
                    if self._paused and self.transport is not None:
                        self._paused = False
                        self.transport.resume_reading()
                    try:
                        await self._wait_until(asyncio.get_running_loop(), timeout)
                    finally:
                        self._waiter = None
                    continue
                self._starved = False
            event = wire.next_event()
            if event is not None:
                if isinstance(event, ResponseHead) is not head:
                    raise UpstreamProtocolError("upstream answer out of order")
                return event
            self._starved = True

    def read_head(self, timeout: float) -> Awaitable[ResponseHead]:
        """The answer's status line and headers, with the whole body when it came with
        them (``UpstreamClosedEarly`` when the connection ended before any byte of
        it)."""
        return self._next_event(timeout, True)

    def read_body(self, timeout: float) -> Awaitable[bytes]:
        """The next piece of the answer's body, at most CHUNK_BYTES; b"" at its end."""
        return self._next_event(timeout, False)

    async def read_rest(self, timeout: float) -> bytes:
        """The rest of the answer's body, whole (for an answer of known small length)."""
        pieces = []
        while piece := await self._next_event(timeout, False):
            pieces.append(piece)
        return b"".join(pieces)

    @property
    def reusable(self) -> bool:
        return not self.closed and not self._pending and self.wire.reusable


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one upstream; LIFO, so the warmest is reused
    and the oldest idle ones age out (after ``idle_s``, or when the upstream closes
    them). Any number may be busy (each long-poll holds one)."""

    def __init__(self, url: URL, ssl: Any, connect_timeout: float,
                 *, idle_s: float = 30.0, max_idle: int = POOL_IDLE_CONNECTIONS) -> None:
        self.host = url.raw_host or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.idle_s = idle_s
        self.max_idle = max_idle
        self.idle: list[UpstreamConnection] = []
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if url.explicit_port is None else f"{host}:{self.port}"
                            ).encode("idna" if not host.isascii() else "ascii")

    def get_idle(self) -> UpstreamConnection | None:
        """A pooled connection still open and young enough, or None."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                conn.reused = True
                return conn
            conn.abort()
        return None

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(
            UpstreamConnection, self.host, self.port, ssl=self.ssl or None,
            server_hostname=self.host if self.ssl else None), self.connect_timeout)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool when its answer was read whole and it stays open; else
        closed."""
        if conn.reusable and len(self.idle) < self.max_idle:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
