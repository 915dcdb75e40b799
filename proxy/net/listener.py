"""The accept loop: a listening TCP socket that hands each accepted connection to a
callback, which wraps it in a :class:`proxy.net.socket_transport.SocketTransport`.

Like ``loop.create_server``, but the connections' transports are ours. It needs only
``add_reader``, so it runs on uvloop and stdlib asyncio alike.

Limits (:mod:`proxy.net.limits`, ``limits=`` or the server's installed ones): each
accepted connection is counted against its client address by a
:class:`~proxy.net.limits.Ticket`, and closed at once when the address is over
``max_connections_per_ip`` or ``max_handshakes`` handshakes are in progress on the
listener, so a burst is refused, never left waiting ungreeted. The ticket is handed
to the connection's :class:`~proxy.net.socket_transport.SocketTransport` through
:func:`take_ticket` (by file descriptor, in the same callback), which releases it
when a device certificate verifies and when the connection closes.

PROXY protocol (``proxy_protocol = true`` on a listener): a connection is served
only from ``[server] trusted_proxies``, otherwise closed at once; its PROXY v1/v2
header (:mod:`proxy.net.proxy_protocol`) is read before anything else (before TLS),
within :data:`PROXY_HEADER_TIMEOUT_S`, and the client address it names is the one the
limits count and the transport reports as ``peername`` (:func:`take_peer`), so
records and limits see the phone, not the load balancer. The server announces a
listener's policy with :func:`expect_proxy_protocol` before starting it.

Running out of file descriptors: one descriptor is kept in reserve; it is given up
to accept and close the waiting connections (so their clients see a close, not a
silent connection stuck in the kernel's queue), then accepting pauses for
``ACCEPT_RETRY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.net import limits as _limits
from proxy.net.limits import Limit, Limits, Ticket
from proxy.net.proxy_protocol import MAX_HEADER_BYTES, ProxyProtocolError, parse
from proxy.oplog import get_logger

log = get_logger("mailward.sockets")

#: Accepts per readiness callback of a listening socket.
ACCEPTS_PER_CALLBACK = 64
#: After running out of file descriptors, wait this long before accepting again.
ACCEPT_RETRY_S = 0.1

_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

#: A PROXY protocol header must arrive within this long after the connection.
PROXY_HEADER_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ProxyProtocol:
    """A listener that takes PROXY protocol headers from these networks only."""

    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def of(cls, cidrs: tuple[str, ...]) -> ProxyProtocol:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs))

    def trusts(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted)


#: Listeners about to start that take PROXY protocol, by (host, port) as configured.
_expected: dict[tuple[str, int], ProxyProtocol] = {}
#: Client addresses from PROXY headers, by file descriptor, until the transport
#: takes them (:func:`take_peer`).
_peers: dict[int, tuple[str, int]] = {}


def expect_proxy_protocol(host: str, port: int, policy: ProxyProtocol | None) -> None:
    """The listener the server starts next on ``host:port`` takes PROXY headers
    (``None``: forget it again once started)."""
    if policy is None:
        _expected.pop((host, port), None)
    else:
        _expected[(host, port)] = policy


def take_peer(fd: int) -> tuple[str, int] | None:
    """The client address a PROXY header gave for an accepted socket, if any."""
    return _peers.pop(fd, None)


#: Tickets of connections accepted in this callback, by file descriptor, until their
#: transport takes them (:func:`take_ticket`).
_tickets: dict[int, tuple[Ticket, Limits, str]] = {}


def take_ticket(fd: int) -> tuple[Ticket, Limits, str] | None:
    """The limits ticket of an accepted socket, its limits and listener name (for
    :class:`~proxy.net.socket_transport.SocketTransport`); None for other sockets."""
    return _tickets.pop(fd, None)


def _reserve_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class SocketServer:
    """A listening TCP socket that hands each accepted connection to ``on_accept``
    (which builds its :class:`~proxy.net.socket_transport.SocketTransport`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_accept: Callable[[socket.socket], None],
        host: str,
        port: int,
        *,
        backlog: int = 1024,
        limits: Limits | None = None,
        listener: str = "",
        proxy_protocol: ProxyProtocol | None = None,
    ) -> None:
        """``limits`` defaults to the server's installed ones; ``listener`` (the
        metric label) to the name the server gave this port; ``proxy_protocol`` to
        what the server announced for ``host:port``."""
        self._proxy = proxy_protocol or _expected.get((host, port))
        self._pending: set[asyncio.Task[None]] = set()
        self._loop = loop
        self._on_accept = on_accept
        self._limits = limits
        self._listener = listener
        self._reserve = _reserve_fd()
        self.sockets: list[socket.socket] = []
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        try:
            for family, type_, proto, _, addr in infos:
                sock = socket.socket(family, type_, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # Every address family on the same port: the first one chosen for port 0.
                where: tuple[Any, ...] = (addr[0], port, *addr[2:])
                sock.bind(where)
                sock.listen(backlog)
                sock.setblocking(False)
                if port == 0:
                    port = sock.getsockname()[1]
        except OSError:
            self.close()
            raise
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    def _names(self) -> tuple[Limits | None, str]:
        limits = self._limits or _limits.installed()
        name = self._listener
        if not name and limits is not None:
            name = limits.names.get(self.port, str(self.port))
        return limits, name

    def _accept(self, listener: socket.socket) -> None:
        limits, name = self._names()
        for _ in range(ACCEPTS_PER_CALLBACK):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    log.warning("accept failed; pausing", error=str(exc))
                    if limits is not None:
                        limits.hit(Limit.FILE_DESCRIPTORS, name)
                    self._shed(listener)
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(ACCEPT_RETRY_S, self._resume, listener)
                return  # ECONNABORTED and the like: the next readiness will do
            if self._proxy is not None:
                self._proxied(conn, addr, self._proxy)
                continue
            self._hand_over(conn, addr, limits, name)

    def _hand_over(self, conn: socket.socket, addr: Any, limits: Limits | None,
                   name: str) -> None:
        if limits is not None and not self._admit(conn, addr, limits, name):
            return
        try:
            self._on_accept(conn)
        except Exception:
            log.exception("accept handler failed")
            conn.close()
        finally:
            fd = conn.fileno()
            left = _tickets.pop(fd, None) if fd >= 0 else None
            if left is not None:  # no transport took it
                left[0].close()
            if fd >= 0:
                _peers.pop(fd, None)

    def _proxied(self, conn: socket.socket, addr: Any, policy: ProxyProtocol) -> None:
        """A connection on a PROXY protocol listener: only from a trusted proxy;
        its header is read off the event loop's accept path."""
        ip = addr[0] if isinstance(addr, tuple) else ""
        if not policy.trusts(ip):
            log.warning("PROXY protocol connection from an untrusted address; closed",
                        client_ip=ip, listener=self._listener)
            _refuse(conn)
            return
        task = self._loop.create_task(self._read_header(conn, addr))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _read_header(self, conn: socket.socket, addr: Any) -> None:
        try:
            async with asyncio.timeout(PROXY_HEADER_TIMEOUT_S):
                header = await _proxy_header(self._loop, conn)
        except (ProxyProtocolError, TimeoutError, OSError) as exc:
            log.warning("bad or missing PROXY protocol header; closed",
                        proxy_ip=addr[0] if isinstance(addr, tuple) else "",
                        error=str(exc) or type(exc).__name__)
            _refuse(conn)
            return
        if header.source is not None and header.command == "PROXY":
            addr = header.source
        limits, name = self._names()
        if conn.fileno() >= 0:
            _peers[conn.fileno()] = (str(addr[0]), int(addr[1]))
        self._hand_over(conn, addr, limits, name)

    @staticmethod
    def _admit(conn: socket.socket, addr: Any, limits: Limits, name: str) -> bool:
        ip = addr[0] if isinstance(addr, tuple) else ""
        ticket = limits.connection_opened(ip, name) if ip else None
        if ticket is None or not limits.may_handshake(name, ip):
            if ticket is not None:
                ticket.close()
            _refuse(conn)
            return False
        _tickets[conn.fileno()] = (ticket, limits, name)
        return True

    def _shed(self, listener: socket.socket) -> None:
        """Out of descriptors: give up the reserve one to accept and close the
        waiting connections, then take it back."""
        if self._reserve is None:
            return
        os.close(self._reserve)
        self._reserve = None
        try:
            for _ in range(ACCEPTS_PER_CALLBACK):
                conn, _addr = listener.accept()
                _refuse(conn)
        except OSError:
            pass
        finally:
            self._reserve = _reserve_fd()

    def _resume(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def close(self) -> None:
        for task in self._pending:
            task.cancel()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None


async def _proxy_header(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> Any:
    """Read exactly the PROXY header off ``conn`` (peeking, so the client's bytes
    after it stay in the socket for TLS or the protocol)."""
    conn.setblocking(False)
    while True:
        try:
            data = conn.recv(MAX_HEADER_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, conn)
            continue
        if not data:
            raise ProxyProtocolError("connection closed before the PROXY header")
        header = parse(data)
        if header is not None:
            got = b""
            while len(got) < header.length:  # all peeked already: recv returns at once
                got += conn.recv(header.length - len(got))
            return header
        await asyncio.sleep(0.01)  # more of the header is on its way


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def bind_failure(exc: OSError) -> str:
    """Why a listening socket could not be bound, for an operator."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    return exc.strerror or str(exc)


def _refuse(conn: socket.socket) -> None:
    """Close a connection we will not serve at once, with a reset (no TIME_WAIT, and
    the client learns at once)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


__all__ = ["ACCEPTS_PER_CALLBACK", "ACCEPT_RETRY_S", "ProxyProtocol", "SocketServer",
           "bind_failure", "expect_proxy_protocol", "take_peer", "take_ticket"]
