"""The transports' protocols of a POP3 session (no protocol logic here).

:class:`Pipe` is one side of a proxied connection: before the splice it hands what it
reads to a callback (the pre-auth executor, or :class:`UpstreamConnection` for the
upstream side); after it, what it reads goes straight into the peer's transport, and
the peer stops reading while our write buffer is above its high-water mark.

The interface is that of ``imap_transport`` on the IMAP branch (the same splice, sized
the same way); once both are merged, one module can serve both front ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from proxy.frontends.pop3_upstream import MAX_UPSTREAM_RESPONSE_BYTES
from proxy.net.socket_transport import shared_read_buffer

#: Write-buffer limits of each spliced transport: above HIGH the other side stops
#: reading until the buffer drains to LOW (bounded memory per session while a large
#: RETR streams to a slow phone).
SPLICE_WRITE_HIGH, SPLICE_WRITE_LOW = 1024 * 1024, 256 * 1024
#: How long a closing connection may take to flush and finish the TLS shutdown.
CLOSE_LINGER_S = 2.0
#: The same after a splice, where up to a write buffer of mail may still be in flight.
SPLICE_CLOSE_LINGER_S = 30.0


class UpstreamError(Exception):
    """The upstream is unreachable, timed out or closed during the login."""


class Pipe(asyncio.BufferedProtocol):
    """One side of a proxied connection (see the module docstring). Reads land in the
    per-thread buffer (``shared_read_buffer``); a spliced pipe writes a slice of it to
    the peer's transport, which copies only what it cannot send at once."""

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
        if self.peer is not None:
            self.peer.transport.write(view)
        elif self.on_data is not None:
            self.on_data(bytes(view))

    def start_splice(self, peer: Pipe) -> None:
        """From now on, what we read goes to ``peer``'s transport."""
        self.peer = peer
        self.on_data = None
        with contextlib.suppress(Exception):  # a closing transport may refuse
            self.transport.set_write_buffer_limits(SPLICE_WRITE_HIGH, SPLICE_WRITE_LOW)

    def eof_received(self) -> bool:
        return False  # POP3 has no half-close: close both ways

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
        """Close after flushing; abort if still open after ``linger_s``."""
        if self.transport is not None and not self.closed and not self.closing:
            self.closing = True
            self.transport.close()
            asyncio.get_running_loop().call_later(
                CLOSE_LINGER_S if linger_s is None else linger_s, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamConnection:
    """The upstream connection before the splice: its pipe and what it sent."""

    __slots__ = ("_wakeup", "inbox", "pipe")

    def __init__(self) -> None:
        self.pipe = Pipe(self._on_data, self._on_close)
        self.inbox = bytearray()
        self._wakeup: asyncio.Event | None = asyncio.Event()

    def _on_data(self, data: bytes) -> None:
        self.inbox += data
        if len(self.inbox) > MAX_UPSTREAM_RESPONSE_BYTES:
            self.pipe.transport.pause_reading()  # resumed by take() or the splice
        if self._wakeup is not None:
            self._wakeup.set()

    def _on_close(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def take(self) -> bytes:
        data = bytes(self.inbox)
        self.inbox.clear()
        if len(data) > MAX_UPSTREAM_RESPONSE_BYTES:
            self.pipe.transport.resume_reading()
        return data

    def release(self) -> bytes:
        """At the splice: what the upstream sent after its login answer (the client's);
        the buffer and the wake-up event are dropped (memory per live session)."""
        data = self.take()
        self.inbox = bytearray()
        self._wakeup = None
        return data

    async def receive(self, deadline: float) -> bytes:
        """What the upstream sent since the last call (waits for at least a byte)."""
        while not self.inbox:
            wakeup = self._wakeup
            if self.pipe.closed or wakeup is None:
                raise UpstreamError("upstream closed the connection")
            wakeup.clear()
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                raise UpstreamError("upstream timed out")
            try:
                await asyncio.wait_for(wakeup.wait(), timeout)
            except TimeoutError:
                raise UpstreamError("upstream timed out") from None
        return self.take()


__all__ = ["CLOSE_LINGER_S", "Pipe", "UpstreamConnection", "UpstreamError"]
