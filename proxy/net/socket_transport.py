"""An asyncio transport over a non-blocking socket whose TLS is OpenSSL on the socket
itself (``ssl.SSLSocket``), and :func:`open_connection`, which connects one. The accept
loop that makes them for listeners, :class:`SocketServer`, is in :mod:`proxy.net.listener`
and re-exported here.

Why not the event loop's own TLS transport: uvloop's and asyncio's run OpenSSL over
memory BIOs. Each connection then owns a 256 KiB receive buffer and two BIO buffers
that grow to the largest write the connection ever carried and never shrink, so a
phone's IMAP session that once fetched a large attachment keeps that memory for hours
(``bench/imap.py``, same run: an idle IMAP session on uvloop's TLS transport 43 KiB,
and 256 KiB more once it has fetched 1 MiB; on this one 28 KiB, and nothing more;
``bench/tls_memory.py`` shows the same for HTTPS). With OpenSSL on the socket, its record
buffers are released whenever they are empty (CPython sets ``SSL_MODE_RELEASE_BUFFERS``)
and plaintext is read into one buffer per thread, shared by every connection. It also
saves two copies per byte each way.

:class:`SocketTransport` speaks plain TCP until :meth:`SocketTransport.start_tls`
upgrades it in place (implicit TLS starts there at once; STARTTLS after the OK), so no
byte is ever read by a plaintext reader that the handshake needed. It implements the
parts of ``asyncio.Transport`` that protocols use: write with flow control
(``pause_writing``/``resume_writing``), pause/resume reading, close (flush, then TLS
close_notify), abort, and ``get_extra_info`` (``peername``, ``sockname``, ``socket``,
``ssl_object``, ``sslcontext``, ``peercert``, ``cipher``). Protocols may be buffered
(``get_buffer``/``buffer_updated``) or not (``data_received``).

Only what the loop offers everywhere is used (``add_reader``/``add_writer``), so it runs
on uvloop and stdlib asyncio alike.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from proxy.net import memory
from proxy.net.limits import Limits, Ticket
from proxy.net.listener import SocketServer, take_peer, take_ticket
from proxy.net.memory import shared_read_buffer
from proxy.oplog import get_logger

log = get_logger("mailward.sockets")

#: Reads per readiness callback before other connections get a turn.
READS_PER_CALLBACK = 16
#: Bytes handed to one ``send``: OpenSSL must be given the same bytes again after a
#: would-block, so unsent TLS data is retried in pieces of at most this size.
SEND_CHUNK_BYTES = 64 * 1024
#: Default write-buffer limits (as asyncio's): above HIGH ``pause_writing``.
WRITE_HIGH_BYTES, WRITE_LOW_BYTES = 64 * 1024, 16 * 1024
#: After a close, how long the peer's further input is read and discarded (see
#: :meth:`SocketTransport._linger`).
LINGER_S = 2.0



class SocketTransport(asyncio.Transport):
    """A connected stream socket as an asyncio transport; TLS once :meth:`start_tls`
    has completed. Unsent bytes are always copied, never kept as views of the caller's
    buffer (which may be :func:`shared_read_buffer`)."""

    # Phones hold IMAP sessions for hours: no per-instance __dict__.
    __slots__ = (
        "_buffered",
        "_closed",
        "_closing",
        "_drained",
        "_fd",
        "_handshake",
        "_high",
        "_inflight",
        "_linger_timer",
        "_loop",
        "_lost_scheduled",
        "_low",
        "_outgoing",
        "_outgoing_size",
        "_peer",
        "_protocol",
        "_protocol_paused",
        "_read_paused",
        "_reading",
        "_sock",
        "_ticket",
        "_tls",
        "_writer_added",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        start_reading: bool = True,
    ) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._loop = loop
        self._sock: socket.socket | ssl.SSLSocket = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        super().__init__()
        self._tls = False
        # Unsent bytes; None while there are none (an empty deque alone is 600 bytes).
        self._outgoing: collections.deque[memoryview] | None = None
        self._outgoing_size = 0
        self._inflight: memoryview | None = None  # TLS bytes OpenSSL must be offered again
        self._high, self._low = WRITE_HIGH_BYTES, WRITE_LOW_BYTES
        self._protocol_paused = False  # we called pause_writing
        self._reading = False
        self._read_paused = False
        self._writer_added = False
        self._closing = False  # close() called: flush, then shut down
        self._closed = False  # socket closed, connection_lost scheduled
        self._handshake: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lost_scheduled = False
        # An accepted connection's limits ticket (proxy.net.listener): released when a
        # device certificate verifies or the connection closes.
        self._ticket: tuple[Ticket, Limits, str] | None = take_ticket(self._fd)
        self._peer = take_peer(self._fd)  # the client's address from a PROXY header
        memory.connection_opened()
        self._loop.call_soon(protocol.connection_made, self)
        if start_reading:
            self._loop.call_soon(self._start_reading)

    # ------------------------------------------------------------- asyncio API

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # Asked of the socket (and OpenSSL) when wanted, not kept per connection.
        if name == "socket":
            return self._sock
        if name == "peername" and self._peer is not None:
            return self._peer
        if name in ("peername", "sockname") and not self._closed:
            try:
                return self._sock.getpeername() if name == "peername" else self._sock.getsockname()
            except OSError:
                return default
        if self._tls and self._handshake is None and isinstance(self._sock, ssl.SSLSocket):
            if name == "ssl_object":
                return self._sock
            if name == "sslcontext":
                return self._sock.context
            if name == "peercert":
                return self._sock.getpeercert()
            if name == "cipher":
                return self._sock.cipher()
        return default  # nothing is passed as ``extra``

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._read_paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        self._read_paused = False
        if not self._closing and self._handshake is None:
            self._start_reading()

    def get_write_buffer_size(self) -> int:
        return self._outgoing_size + (len(self._inflight) if self._inflight is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = WRITE_HIGH_BYTES if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high_water()

    def can_write_eof(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._closed:
            return  # as asyncio's: writes after close are dropped
        if self._handshake is not None:
            raise RuntimeError("write() while start_tls() is upgrading the connection")
        if not data:
            return
        if not self._outgoing and self._inflight is None:
            try:
                data = self._send_now(memoryview(data))
            except OSError as exc:  # ssl.SSLError included
                self._fatal(exc)
                return
            if not data and self._inflight is None:
                return
        if data:
            if self._outgoing is None:
                self._outgoing = collections.deque()
            # A copy (the caller's buffer may be reused), then views of it as it goes out.
            self._outgoing.append(memoryview(bytes(data)))
            self._outgoing_size += len(data)
        self._add_writer()
        self._check_high_water()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _release_ticket(self) -> None:
        """The connection no longer counts against its address (it is closing; a
        lingering close takes at most LINGER_S more)."""
        if self._ticket is not None:
            self._ticket[0].close()
            self._ticket = None

    def close(self) -> None:
        """Stop reading; send what is buffered, then (TLS) close_notify, then close."""
        self._release_ticket()
        if self._closing or self._closed:
            return
        if self._handshake is not None:  # mid-upgrade: nothing to flush, no TLS to end
            self._force_close(None)
            return
        self._closing = True
        self._stop_reading()
        if not (self._outgoing or self._inflight):
            self._shutdown()

    def abort(self) -> None:
        self._force_close(None)

    # ------------------------------------------------------------------- TLS

    async def start_tls(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Upgrade to TLS in place. Bytes still buffered for writing (a STARTTLS OK)
        go out first, in plaintext; reading stops at once, so the handshake reads
        everything after. Raises ``ssl.SSLError``, ``ConnectionError`` or
        ``TimeoutError``; on failure the transport is aborted."""
        if self._tls or self._closed or self._closing:
            raise ConnectionError("transport closed or already TLS")
        self._stop_reading()
        self._handshake = self._loop.create_future()
        try:
            if self._outgoing or self._inflight is not None:  # flush plaintext first
                self._drained = self._loop.create_future()
                self._add_writer()
                async with asyncio.timeout(timeout):
                    await self._drained
            raw = self._sock
            assert not isinstance(raw, ssl.SSLSocket)
            tls_sock = ctx.wrap_socket(
                raw, server_side=server_side, server_hostname=server_hostname,
                do_handshake_on_connect=False,
            )
            self._sock = tls_sock
            self._tls = True
            counted = self._ticket if server_side else None
            if counted is not None:
                counted[1].handshake_started(counted[2])
            try:
                self._handshake_step()
                async with asyncio.timeout(timeout):
                    await self._handshake
            except BaseException:
                if counted is not None:
                    counted[1].handshake_finished(
                        counted[2], self._peer[0] if self._peer else _peer_ip(tls_sock), ok=False)
                raise
            if counted is not None:
                counted[1].handshake_finished(counted[2], "", ok=True)
                if tls_sock.getpeercert():  # a verified device certificate
                    counted[0].verified()
        except BaseException:
            self._force_close(None)
            raise
        finally:
            self._handshake = self._drained = None
        if not self._read_paused and not self._closing:
            self._start_reading()
        if self._outgoing or self._inflight is not None:
            self._add_writer()

    def _handshake_step(self) -> None:
        fut = self._handshake
        if fut is None or fut.done() or self._closed:
            return
        self._loop.remove_reader(self._fd)
        self._remove_writer()
        sock = self._sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._loop.add_reader(self._fd, self._handshake_step)
        except ssl.SSLWantWriteError:
            self._add_writer(self._handshake_step)
        except (ssl.SSLError, OSError) as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    # --------------------------------------------------------------- reading

    def _start_reading(self) -> None:
        if self._reading or self._closed or self._closing or self._read_paused:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._read_ready)
        if self._tls and self._sock.pending():  # type: ignore[union-attr]
            self._loop.call_soon(self._read_ready)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self._closed:
                self._loop.remove_reader(self._fd)

    def _read_ready(self) -> None:
        for _ in range(READS_PER_CALLBACK):
            if not self._reading:
                return
            buffered = self._buffered
            buf = memoryview(
                self._protocol.get_buffer(-1) if buffered else shared_read_buffer())  # type: ignore[attr-defined]
            try:
                n, more = self._fill(buf)
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if n:
                try:
                    if buffered:
                        self._protocol.buffer_updated(n)  # type: ignore[attr-defined]
                    else:
                        self._protocol.data_received(bytes(buf[:n]))  # type: ignore[attr-defined]
                except Exception as exc:
                    self._fatal(exc)
                    return
            if more is None:
                self._eof()
                return
            if not more:
                return
        if self._reading:  # budget spent with input left: come back after the others
            self._loop.call_soon(self._read_ready)

    def _fill(self, buf: memoryview) -> tuple[int, bool | None]:
        """Read into ``buf``: ``(bytes read, more)``, ``more`` None at end of input.

        With TLS, one ``recv_into`` returns one record (a peer may send small ones), so
        records are gathered until the buffer is full or the socket is drained: what is
        passed on, and so what is written to the other side, comes in large pieces."""
        sock = self._sock
        filled = 0
        while filled < len(buf):
            try:
                n = sock.recv_into(buf[filled:] if filled else buf)
            except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
                return filled, False
            except ssl.SSLWantWriteError:
                return filled, False  # only renegotiation wants this, and it is refused
            if n == 0:
                return filled, None
            filled += n
            if not self._tls:
                break  # one recv takes what the kernel holds
        return filled, True

    def _eof(self) -> None:
        self._stop_reading()
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except Exception as exc:
            self._fatal(exc)
            return
        if not keep_open:
            self.close()

    # --------------------------------------------------------------- writing

    def _send_now(self, data: memoryview) -> memoryview:
        """Send what the socket takes now; return the rest (empty when all went)."""
        sock = self._sock
        if not self._tls:
            while data:
                try:
                    n = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    return data
                data = data[n:]
            return data
        while data:
            chunk = data[:SEND_CHUNK_BYTES]
            try:
                # All of it (CPython does not enable partial writes), or would-block
                # with OpenSSL holding the state of the records it has sealed.
                sent = sock.send(chunk)
            except ssl.SSLWantWriteError:
                self._inflight = memoryview(bytes(chunk))
                return data[len(chunk):]
            except ssl.SSLWantReadError:  # renegotiation: refused (OP_NO_RENEGOTIATION)
                raise ConnectionError("TLS renegotiation is not supported") from None
            data = data[sent:]
        return data

    def _write_ready(self) -> None:
        if self._closed:
            return
        try:
            if self._inflight is not None:
                inflight, self._inflight = self._inflight, None
                rest = self._send_now(inflight)
                if self._inflight is not None or rest:
                    return  # still would block (rest is empty: inflight < one chunk)
            while self._outgoing:
                data = self._outgoing.popleft()
                if not self._outgoing:
                    self._outgoing = None
                self._outgoing_size -= len(data)
                rest = self._send_now(data)
                if rest:
                    if self._outgoing is None:
                        self._outgoing = collections.deque()
                    self._outgoing.appendleft(rest)  # a view of our own copy
                    self._outgoing_size += len(rest)
                if self._inflight is not None or rest:
                    break
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        if self._protocol_paused and self.get_write_buffer_size() <= self._low:
            self._protocol_paused = False
            self._call_protocol("resume_writing")
        if not self._outgoing and self._inflight is None:
            self._remove_writer()
            drained = self._drained
            if drained is not None and not drained.done():
                drained.set_result(None)  # start_tls: plaintext flushed, wrap now
            elif self._closing:
                self._shutdown()

    def _add_writer(self, callback: Callable[[], None] | None = None) -> None:
        if self._closed:
            return
        self._loop.add_writer(self._fd, callback or self._write_ready)
        self._writer_added = True

    def _remove_writer(self) -> None:
        if self._writer_added and not self._closed:
            self._loop.remove_writer(self._fd)
        self._writer_added = False

    def _check_high_water(self) -> None:
        if not self._protocol_paused and self.get_write_buffer_size() > self._high:
            self._protocol_paused = True
            self._call_protocol("pause_writing")

    # --------------------------------------------------------------- closing

    def _shutdown(self) -> None:
        """Send close_notify (TLS, best effort, never waiting for the peer's), close."""
        if self._closed or self._linger_timer is not None:
            return  # already done, or lingering
        sock = self._sock
        if self._tls and self._handshake is None and isinstance(sock, ssl.SSLSocket):
            try:
                sock.unwrap()
            except ssl.SSLWantReadError:
                pass  # ours is sent; the peer's is not awaited
            except ssl.SSLWantWriteError:
                self._add_writer(self._retry_shutdown)
                return
            except (ssl.SSLError, OSError, ValueError):
                pass
        self._linger()

    def _linger(self) -> None:
        """Half-close, then read and drop what the peer still sends until it closes
        or ``LINGER_S`` passes. Closing a socket with unread input makes the kernel
        send RST, and a peer that gets RST may lose our last response before reading
        it (a ``BAD``/``BYE`` after a flood of pipelined commands, say)."""
        try:
            self._sock.shutdown(socket.SHUT_WR)  # an SSLSocket drops its SSL state here
        except OSError:
            self._force_close(None)
            return
        self._loop.add_reader(self._fd, self._linger_read)
        self._linger_timer = self._loop.call_later(LINGER_S, self._force_close, None)
        self._schedule_connection_lost(None)  # for the protocol, the connection is over

    def _linger_read(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._force_close(None)

    def _retry_shutdown(self) -> None:
        self._remove_writer()
        self._shutdown()

    def _fatal(self, exc: BaseException) -> None:
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.debug("connection error", error=str(exc)[:200])
        elif isinstance(exc, OSError):
            log.debug("socket error", error=str(exc)[:200])
        else:
            log.exception("protocol callback failed")
        self._force_close(exc if isinstance(exc, Exception) else None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        memory.connection_closed()
        self._release_ticket()
        self._reading = False
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._loop.remove_reader(self._fd)
        if self._writer_added:
            self._loop.remove_writer(self._fd)
            self._writer_added = False
        self._outgoing = None
        self._outgoing_size = 0
        self._inflight = None
        for fut in (self._handshake, self._drained):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection closed before TLS was up"))
                fut.exception()  # retrieved: start_tls may already have given up on it
        with contextlib.suppress(OSError):
            self._sock.close()
        self._schedule_connection_lost(exc)

    def _schedule_connection_lost(self, exc: Exception | None) -> None:
        if not self._lost_scheduled:
            self._lost_scheduled = True
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = asyncio.Protocol()  # drop references to the session

    def _call_protocol(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except Exception:
            log.exception("protocol callback failed", callback=name)


def _peer_ip(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else ""


# The client side (upstream connections) is in its own module; it needs the class above.
from proxy.net.connect import open_connection  # noqa: E402

__all__ = ["SocketServer", "SocketTransport", "open_connection", "shared_read_buffer"]
