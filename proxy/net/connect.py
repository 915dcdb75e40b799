"""Outgoing connections on :class:`~proxy.net.socket_transport.SocketTransport`
(upstreams): :func:`open_connection` (re-exported by ``proxy.net.socket_transport``)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.net.socket_transport import SocketTransport


async def open_connection(
    host: str,
    port: int,
    protocol: asyncio.BaseProtocol,
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float,
) -> SocketTransport:
    """Connect to ``host:port`` (each resolved address in turn) and, with ``tls``,
    complete a verified TLS handshake, all within ``timeout``. ``protocol`` gets
    ``connection_made`` once connected; raises ``OSError``/``ssl.SSLError``/
    ``TimeoutError`` (the socket closed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def left() -> float:
        return max(0.0, deadline - loop.time())

    # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
    # cancellation that arrives just as the awaited call completes.
    async with asyncio.timeout(left()):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(left()):
                await loop.sock_connect(sock, addr)
        except (OSError, TimeoutError) as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            error = exc
            continue
        from proxy.net.socket_transport import SocketTransport  # it imports this module

        transport = SocketTransport(loop, sock, protocol, start_reading=tls is None)
        if tls is not None:
            await transport.start_tls(tls, server_side=False, server_hostname=host,
                                      timeout=left())
        return transport
    raise error
