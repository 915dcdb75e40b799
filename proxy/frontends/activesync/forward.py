"""Forwarding an admitted request to the upstream and its answer back, streaming.

Requests with a body of known length up to ``CHUNK_BYTES`` (nearly all EAS traffic)
go over the pool of keep-alive HTTP/1.1 connections
(:mod:`~proxy.frontends.activesync.upstream`); answers of any size or framing are
streamed back. Larger or chunked request bodies are streamed through one pooled
aiohttp ``ClientSession``, which also carries the credential check (``OPTIONS``).
Both paths forward the same headers (:func:`~proxy.frontends.activesync.wire.
forwarded_headers`) and pass bodies byte for byte (no automatic decompression).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.frontends.activesync.guard import CappedBody
from proxy.frontends.activesync.hygiene import EAS_PATH, NOT_FORWARDED, upstream_target
from proxy.frontends.activesync.refusal import text_response
from proxy.frontends.activesync.upstream import UPSTREAM_ERRORS, UpstreamPool
from proxy.frontends.activesync.wire import (
    CHUNK_BYTES,
    HOP_BY_HOP_AND,
    Header,
    Memo,
    RequestHead,
    UnsendableRequest,
    UpstreamClosedEarly,
    UpstreamProtocolError,
    end_to_end,
    forward_head,
    forwarded_headers,
    header_text,
)

if TYPE_CHECKING:
    import ssl

    from proxy.config import ListenerConfig

#: Commands that only read, so resending one after a stale keep-alive connection
#: cannot change mailbox state. SendMail, SmartReply, SmartForward, Sync (which may
#: carry client changes), MoveItems and the like are never resent.
RESENDABLE_COMMANDS: Final = frozenset({
    "Ping", "GetItemEstimate", "Search", "ResolveRecipients", "ValidateCert",
    "GetAttachment", "FolderSync", "Settings",
})
#: Longest upstream answer body passed on from a refused credential check.
_REFUSAL_BODY_BYTES: Final = 64 * 1024
_CONTENT_LENGTH: Final = frozenset({b"content-length"})
_NO_BODY_HEADERS: Final = frozenset({b"content-length", b"content-type"})
#: Client headers the pooled path drops (it writes Content-Length itself).
_POOLED_DROP: Final = NOT_FORWARDED | _CONTENT_LENGTH
#: ... and for a request sent without its body (OPTIONS).
_BODILESS_DROP: Final = NOT_FORWARDED | _NO_BODY_HEADERS

#: Told of an upstream 401 (the request it answered) before the answer goes out.
OnAuthFailed = Callable[[web.BaseRequest], Awaitable[None]]


class Progress:
    """How far an exchange got: the response, once one was started. (No ``__init__``:
    made for every request, and most never set it.)"""

    response: web.StreamResponse | None = None


def client_headers(headers: list[Header], drop: frozenset[bytes] = frozenset()
                   ) -> list[tuple[str, str]]:
    """Upstream answer headers for the client: end to end only, as aiohttp text (UTF-8,
    else Latin-1), in order; a list, which ``web.Response`` copies into its own
    multidict. One plain pass for the usual answer (UTF-8 and no ``Connection``
    header); the general filter otherwise."""
    skip = HOP_BY_HOP_AND[drop]
    out: list[tuple[str, str]] = []
    try:
        for name, value in headers:
            lowered = name.lower()
            if lowered in skip:
                if lowered == b"connection":  # it names more to drop
                    break
                continue
            out.append((name.decode(), value.decode()))
        else:
            return out
    except UnicodeDecodeError:
        pass
    return [(header_text(k), header_text(v)) for k, v in end_to_end(headers, drop)]


def _target(raw_target: str) -> bytes:
    return upstream_target(raw_target).encode("utf-8", "surrogateescape")


#: Upstream targets by the client's (a phone repeats the same few all day).
_TARGETS: Final[Memo[str, bytes]] = Memo(_target, 4096)
#: Reasons as text, by the bytes of the upstream's status line.
_REASONS: Final[Memo[bytes, str]] = Memo(header_text, 64)


class Forwarder:
    """The upstream of one listener: its connection pool and aiohttp client."""

    def __init__(self, cfg: ListenerConfig, upstream_tls: ssl.SSLContext | None) -> None:
        self.cfg = cfg
        base = URL(cfg.upstream)
        self.upstream = base.with_path("").with_query(None).with_fragment(None)
        self._base = str(self.upstream).rstrip("/")
        self._ssl: Any = False
        if self.upstream.scheme == "https":
            self._ssl = upstream_tls if upstream_tls is not None else True
        self.pool = UpstreamPool(self.upstream, self._ssl, cfg.upstream_connect_timeout_s)
        self._client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            ssl=self._ssl, limit=0, limit_per_host=0,  # every long-poll holds a connection
            keepalive_timeout=30, ttl_dns_cache=60,
        )
        self._client = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # pass bodies byte for byte
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),  # never mix clients' cookies
            timeout=aiohttp.ClientTimeout(total=None),
        )

    @property
    def client(self) -> aiohttp.ClientSession:
        """The pooled aiohttp client (after :meth:`start`)."""
        assert self._client is not None
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        self.pool.close()

    def _timeout(self, read_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.upstream_connect_timeout_s,
                                     sock_read=read_s)

    @staticmethod
    def _headers(request: web.BaseRequest, drop: frozenset[bytes] = NOT_FORWARDED
                 ) -> list[Header]:
        return forwarded_headers(request.raw_headers, request.remote or "", request.scheme,
                                 drop)

    def _request_head(self, request: web.BaseRequest, body_length: int,
                      drop: frozenset[bytes]) -> RequestHead:
        """The head the pooled path sends upstream: the target rebuilt from path and
        query, ``Host`` the upstream's, the forwarded headers, ``Content-Length`` the
        body's (``UnsendableRequest`` when a header is not valid HTTP). Written anew for
        every request: nothing of a client's credentials outlives it."""
        return forward_head(request.method.encode(), _TARGETS[request.raw_path],
                            self.pool.host_header, request.raw_headers, request.remote or "",
                            request.scheme, drop, body_length)

    async def check_credentials(self, request: web.BaseRequest) -> web.Response | None:
        """Ask the upstream to check the credentials (``OPTIONS`` with the same
        ``Authorization``). None when it accepted them, its answer when it refused
        them (401, 403); one of :data:`UPSTREAM_ERRORS` when it cannot tell."""
        assert self._client is not None
        headers = CIMultiDict([(header_text(k), header_text(v))
                               for k, v in self._headers(request, _BODILESS_DROP)])
        async with self._client.options(
            self.upstream.with_path(EAS_PATH), headers=headers, allow_redirects=False,
            timeout=self._timeout(self.cfg.upstream_timeout_s),
        ) as up:
            if 200 <= up.status < 300:
                return None
            if up.status in (401, 403):
                body = await up.content.read(_REFUSAL_BODY_BYTES)  # may be cut short
                return web.Response(status=up.status, body=body, headers=client_headers(
                    list(up.raw_headers), _CONTENT_LENGTH))
            raise UpstreamProtocolError(f"credential check answered {up.status}")

    def forward(self, request: web.BaseRequest, progress: Progress, *,
                resendable: bool, on_auth_failed: OnAuthFailed | None, max_body: int
                ) -> Awaitable[web.StreamResponse]:
        """Stream ``request`` to the upstream and the answer back; ``on_auth_failed``
        runs when the upstream answers 401. A body of known length up to CHUNK_BYTES
        (nearly every EAS request) is read first and goes over the pool; larger or
        chunked request bodies are streamed through aiohttp's client, a chunked one
        refused with 413 once it passes ``max_body`` (the caller refuses a longer
        ``Content-Length`` before anything is forwarded). ``OPTIONS`` goes
        without its body, if it had one. (Not a coroutine itself: it picks the one to
        await, one frame less on every resumption of a request.)"""
        if request.method == "OPTIONS":
            return self._exchange(request, None, progress, resendable, on_auth_failed,
                                  _BODILESS_DROP)
        length = request.content_length
        if request.body_exists and (length is None or length > CHUNK_BYTES):
            return self._stream(request, progress, on_auth_failed,
                                max_body if length is None else None)
        return self._exchange(request, length, progress, resendable, on_auth_failed,
                              _POOLED_DROP)

    async def _exchange(self, request: web.BaseRequest, length: int | None,
                        progress: Progress, resendable: bool,
                        on_auth_failed: OnAuthFailed | None, drop: frozenset[bytes]
                        ) -> web.StreamResponse:
        """One exchange over a pooled connection, the request body (``length`` bytes,
        None for none) read first. When a reused connection turns out closed before
        any answer byte, a ``resendable`` request is sent once more on a fresh one;
        any other request fails (503): the upstream may have acted on it, and a
        message must never be sent twice."""
        body = b""
        if length and request.body_exists:
            content = request.content
            try:  # a small body has mostly arrived with its head: take it at once
                body = content.read_nowait(length)
                if len(body) < length:
                    body += await content.readexactly(length - len(body))
            except asyncio.IncompleteReadError:
                return text_response(400, "The request body ended early.")
        try:
            request_head = self._request_head(request, len(body), drop)
        except UnsendableRequest:
            return text_response(400, "The request cannot be forwarded.")
        pool = self.pool
        timeout = self.cfg.longpoll_timeout_s
        conn = pool.get_idle()
        try:
            while True:
                if conn is None:
                    conn = await pool.connect()
                conn.send(request_head, body)
                try:
                    head = await conn.read_head(timeout)
                    break
                except UpstreamClosedEarly:
                    if not (resendable and conn.reused):
                        raise
                    conn.abort()  # a stale keep-alive connection: try a fresh one
                    conn = None
            if head.status == 401 and on_auth_failed is not None:
                await on_auth_failed(request)
            reason = _REASONS[head.reason]
            if head.length is not None and head.length <= CHUNK_BYTES:
                data = head.body  # most answers: it came whole with its head
                if data is None:
                    data = await conn.read_rest(timeout)
                return web.Response(status=head.status, reason=reason, body=data,
                                    headers=client_headers(head.headers, _CONTENT_LENGTH))
            # A chunked answer's Content-Length, if any, is not the client's framing.
            out = client_headers(head.headers, _CONTENT_LENGTH if head.length is None
                                 else frozenset())
            progress.response = response = web.StreamResponse(
                status=head.status, reason=reason, headers=out)
            await response.prepare(request)
            while chunk := await conn.read_body(timeout):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            if conn is not None:
                pool.release(conn)  # closes it unless its answer was read whole

    async def _stream(self, request: web.BaseRequest, progress: Progress,
                      on_auth_failed: OnAuthFailed | None, cap: int | None
                      ) -> web.StreamResponse:
        """A request body of unknown or large size, streamed through aiohttp's client;
        one of unknown size is cut off after ``cap`` bytes (413)."""
        assert self._client is not None
        # The query goes upstream exactly as the client sent it.
        url = URL(self._base + upstream_target(request.raw_path), encoded=True)
        headers = CIMultiDict([(header_text(k), header_text(v))
                               for k, v in self._headers(request)])
        capped = CappedBody(request.content, cap) if cap is not None else None
        try:
            async with self._client.request(
                request.method, url, headers=headers,
                data=capped.chunks(CHUNK_BYTES) if capped is not None else request.content,
                allow_redirects=False, timeout=self._timeout(self.cfg.longpoll_timeout_s),
                compress=False, chunked=None,
            ) as up:
                if up.status == 401 and on_auth_failed is not None:
                    await on_auth_failed(request)
                progress.response = response = web.StreamResponse(
                    status=up.status, reason=up.reason,
                    headers=client_headers(list(up.raw_headers)))
                await response.prepare(request)
                async for chunk in up.content.iter_chunked(CHUNK_BYTES):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except UPSTREAM_ERRORS:
            if capped is None or not capped.over or progress.response is not None:
                raise
            return too_large()


def too_large() -> web.Response:
    """413 for a body over ``eas_max_body``; the rest of it is not read."""
    response = text_response(413, "The request is too large.")
    response.force_close()
    return response
