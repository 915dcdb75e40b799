"""The accept loop: a listening TCP socket that hands each accepted connection to a
callback, which wraps it in a :class:`proxy.net.socket_transport.SocketTransport`.

Like ``loop.create_server``, but the connections' transports are ours. It needs only
``add_reader``, so it runs on uvloop and stdlib asyncio alike. Running out of file
descriptors pauses accepting for ``ACCEPT_RETRY_S`` instead of spinning on a listening
socket that stays readable.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

from proxy.oplog import get_logger

log = get_logger("mailward.sockets")

#: Accepts per readiness callback of a listening socket.
ACCEPTS_PER_CALLBACK = 64
#: After running out of file descriptors, wait this long before accepting again.
ACCEPT_RETRY_S = 0.1

_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


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
    ) -> None:
        self._loop = loop
        self._on_accept = on_accept
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

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_CALLBACK):
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    log.warning("accept failed; pausing", error=str(exc))
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(ACCEPT_RETRY_S, self._resume, listener)
                return  # ECONNABORTED and the like: the next readiness will do
            try:
                self._on_accept(conn)
            except Exception:
                log.exception("accept handler failed")
                conn.close()

    def _resume(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()


__all__ = ["ACCEPTS_PER_CALLBACK", "ACCEPT_RETRY_S", "SocketServer"]
