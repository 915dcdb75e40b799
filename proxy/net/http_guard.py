"""``header_timeout`` for aiohttp servers (the API; ActiveSync and Autodiscover can use
it the same way): a request head must arrive whole within the timeout, counted from
the connection's start or from the first byte of a later request on it. A slowloris
client (one header byte every 10 s) is cut off; a long upload is not, because the
clock stops once the head is parsed, and it never runs while a request is handled.

aiohttp's ``RequestHandler`` has no such timeout (only keep-alive between requests),
so :class:`HeaderTimeoutHandler` adds it; :func:`guarded` turns a ``web.Server`` into
a protocol factory that makes them (for ``loop.create_server`` or
:class:`~proxy.net.listener.SocketServer`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

_data_received = RequestHandler.data_received


class HeaderTimeoutHandler(RequestHandler):
    """aiohttp's request handler with a deadline for each request head.

    One timer per connection, re-armed lazily: a request only notes when its head
    began (``_head_since``) and when it was parsed; the timer, when it fires, cuts the
    connection if a head is still pending past its deadline, re-arms for the pending
    head's deadline if that is later, and stays off when none is pending (the next
    head's first byte arms it). A timer per request cost ActiveSync about 10% of its
    Python calls per request (heap pushes among the cancelled timers of every
    keep-alive connection)."""

    __slots__ = ("_head_since", "_head_timeout", "_head_timer", "_on_head_timeout")

    def __init__(self, manager: web.Server, *, head_timeout: float,
                 on_head_timeout: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._on_head_timeout = on_head_timeout
        self._head_since: float | None = None  # when the pending head began
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_since = time.monotonic()
        self._head_timer = self._loop.call_later(self._head_timeout, self._check)

    def data_received(self, data: bytes) -> None:
        if self._head_since is None and not self._request_in_progress and not self._messages:
            self._head_since = time.monotonic()  # the first byte of a new request head
            if self._head_timer is None:
                self._head_timer = self._loop.call_later(self._head_timeout, self._check)
        before = self._request_count
        _data_received(self, data)  # super()'s, without making a super object each time
        if self._request_count != before:
            self._head_since = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _check(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None or self._request_in_progress or self._messages:
            return
        left = since + self._head_timeout - time.monotonic()
        if left > 0:  # a later head than the one the timer was armed for
            self._head_timer = self._loop.call_later(left, self._check)
            return
        if self._on_head_timeout is not None:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            self._on_head_timeout(str(peer[0]) if isinstance(peer, tuple) else "")
        self.force_close()


def guarded(server: web.Server, head_timeout: float,
            on_head_timeout: Callable[[str], None] | None = None
            ) -> Callable[[], HeaderTimeoutHandler]:
    """A protocol factory for ``server`` whose connections have ``head_timeout``.
    ``on_head_timeout(client_ip)`` is told of each connection cut off."""

    def factory() -> HeaderTimeoutHandler:
        # What web.Server.__call__ does, with our handler class.
        return HeaderTimeoutHandler(server, loop=server._loop, head_timeout=head_timeout,
                                    on_head_timeout=on_head_timeout, **server._kwargs)

    return factory


__all__ = ["HeaderTimeoutHandler", "guarded"]
