"""The transports' protocols of an IMAP session (no protocol logic here).

:class:`Pipe` is one side of a proxied connection: before the splice it hands what it
reads to a callback (the pre-auth executor, or :class:`UpstreamConnection` for the
upstream side); after it, it writes what it reads straight into the peer's transport,
with flow control driven by the peer's write buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from proxy.frontends.imap_syntax import MAX_UPSTREAM_RESPONSE_BYTES
from proxy.net.socket_transport import shared_read_buffer

#: Write-buffer limits of each spliced transport: above HIGH the other side stops
#: reading until the buffer drains to LOW (flow control, bounded memory per session).
SPLICE_WRITE_HIGH, SPLICE_WRITE_LOW = 1024 * 1024, 256 * 1024
#: How long a closing connection may take to flush and finish TLS shutdown.
CLOSE_LINGER_S = 2.0
#: The same after a splice, where up to a write buffer of mail may still be in flight.
SPLICE_CLOSE_LINGER_S = 30.0


class _NoEvent:
    """Stands in for an asyncio.Event once a session no longer waits for anything."""

    def set(self) -> None:
        pass


NO_EVENT: Any = _NoEvent()


class UpstreamError(Exception):
    """The upstream is unreachable, timed out or answered nonsense."""


class Pipe(asyncio.BufferedProtocol):
    """One side of a proxied connection.

    Reads land in the per-thread receive buffer (``shared_read_buffer``). Before
    the splice, the bytes go to ``on_data``; after it, a slice of the buffer goes
    straight to the peer's transport, with no per-chunk work beyond that write. When
    our transport's write buffer passes its high-water mark (``pause_writing``), the
    peer, which produces what we write, stops reading until it drains to the low one.
    """

    __slots__ = ("closed", "closing", "on_close", "on_data", "on_made", "peer", "transport")

    def __init__(
        self,
        on_data: Callable[[bytes], None] | None,
        on_close: Callable[[], None] | None = None,
        on_made: Callable[[asyncio.BaseTransport], None] | None = None,
    ) -> None:
        self.on_data = on_data
        self.on_close = on_close
        self.on_made = on_made
        self.peer: Pipe | None = None
        self.transport: Any = None
        self.closed = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.on_made is not None:
            self.on_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return shared_read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        view = shared_read_buffer()[:nbytes]
        peer = self.peer
        if peer is not None:
            peer.transport.write(view)  # what it cannot send now, it copies
        elif self.on_data is not None:
            self.on_data(bytes(view))

    def start_splice(self, peer: Pipe) -> None:
        """From now on, what we read goes to ``peer``'s transport."""
        self.peer = peer
        self.on_data = None
        with contextlib.suppress(Exception):  # a closing transport may refuse
            self.transport.set_write_buffer_limits(SPLICE_WRITE_HIGH, SPLICE_WRITE_LOW)

    def eof_received(self) -> bool:
        return False  # IMAP has no half-close: close both ways

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.close(SPLICE_CLOSE_LINGER_S)  # flushes what is buffered first
        if self.on_close is not None:
            self.on_close()

    def pause_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, linger_s: float | None = None) -> None:
        """Close after flushing; abort if still open after ``linger_s`` (a TLS peer
        that never answers close_notify would otherwise hold it for 30 s)."""
        if self.transport is not None and not self.closed and not self.closing:
            self.closing = True
            self.transport.close()
            asyncio.get_running_loop().call_later(
                CLOSE_LINGER_S if linger_s is None else linger_s, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamConnection:
    """The upstream connection before the splice: its pipe and the bytes it sent."""

    __slots__ = ("_wakeup", "inbox", "pipe")

    def __init__(self) -> None:
        self.pipe = Pipe(self._on_data, self._on_close)
        self.inbox = bytearray()
        self._wakeup = asyncio.Event()

    def _on_data(self, data: bytes) -> None:
        self.inbox += data
        if len(self.inbox) > MAX_UPSTREAM_RESPONSE_BYTES:
            self.pipe.transport.pause_reading()  # resumed by receive() or the splice
        self._wakeup.set()

    def _on_close(self) -> None:
        self._wakeup.set()

    def take(self) -> bytes:
        data = bytes(self.inbox)
        self.inbox.clear()
        if len(data) > MAX_UPSTREAM_RESPONSE_BYTES:
            self.pipe.transport.resume_reading()
        return data

    def release(self) -> bytes:
        """At the splice: what the upstream sent after its LOGIN answer (the client's);
        the buffer and the wake-up event are dropped (memory per live session)."""
        data = self.take()
        self.inbox = bytearray()
        self._wakeup = NO_EVENT
        return data

    async def receive(self, deadline: float) -> bytes:
        """What the upstream sent since the last call (waits for at least a byte)."""
        while not self.inbox:
            if self.pipe.closed:
                raise UpstreamError("upstream closed the connection")
            self._wakeup.clear()
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                raise UpstreamError("upstream timed out")
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                raise UpstreamError("upstream timed out") from None
        return self.take()


__all__ = ["CLOSE_LINGER_S", "NO_EVENT", "Pipe", "UpstreamConnection", "UpstreamError"]
