"""Autodiscover through mailward: the account-setup requests phones send before
ActiveSync, passed to the upstream without a gate decision.

Served paths (any letter case, as clients spell them differently):

* ``/autodiscover/autodiscover.xml`` -- MS-ASCMD's Autodiscover command (``POST`` of
  the ``mobilesync`` request schema; ``GET`` is passed too, servers answer it with
  an error document);
* ``/autodiscover/autodiscover.json`` with ``/v1.0/<address>`` or without, as Outlook
  for iOS and Android ask: ``GET .../autodiscover.json/v1.0/<address>?Protocol=ActiveSync``.

The request passes the same hygiene as ActiveSync (checked by the handler first:
:func:`~proxy.frontends.activesync.hygiene.refusal`), its body is capped
(:data:`MAX_BODY_BYTES`, 413 beyond) and must arrive within
:data:`BODY_TIMEOUT_S`, and the target goes upstream rebuilt from a strict form
(:func:`upstream_target`): a path spelt any other way, say with ``%2e%2e`` or an
encoded ``/``, is 404 and never reaches an upstream that might read it as
``/Microsoft-Server-ActiveSync`` -- which would be ActiveSync without a decision.

Autodiscover takes Basic credentials, so it is a password-guessing endpoint too: a
request with Basic credentials of a throttled (user, address) pair waits before it is
forwarded (:meth:`~proxy.frontends.activesync.guard.LoginThrottle.before`), and an
upstream 401 to it is reported to the ``on_auth_failed`` hook given by the front end
(its :meth:`~proxy.frontends.activesync.handler.ActiveSyncFrontend.autodiscover_auth_failed`,
which counts the failed login and waits the rest of its delay). An Autodiscover
answer never clears the pair's failures: the JSON form is anonymous, so its 200 proves
nothing about the password.

The answer is read whole (at most :data:`MAX_ANSWER_BYTES`; 502 beyond) and, when the
listener has a ``public_url``, the upstream's own address in it is replaced
(:mod:`~proxy.frontends.activesync.rewrite`); everything else passes as the upstream
sent it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.frontends.activesync.forward import Forwarder, client_headers
from proxy.frontends.activesync.hygiene import NOT_FORWARDED
from proxy.frontends.activesync.refusal import text_response, unavailable
from proxy.frontends.activesync.rewrite import Rewriter, Unchanged
from proxy.frontends.activesync.upstream import UPSTREAM_ERRORS
from proxy.frontends.activesync.wire import forwarded_headers, header_text
from proxy.oplog import get_logger

if TYPE_CHECKING:
    from proxy.config import ListenerConfig
    from proxy.frontends.activesync.guard import LoginThrottle
    from proxy.ids import ClientCert

log = get_logger("mailward.activesync.autodiscover")

Kind = Literal["xml", "json"]
#: Largest request body accepted (Autodiscover requests are a few hundred bytes).
MAX_BODY_BYTES: Final = 64 * 1024
#: Largest upstream answer passed on (they are a few KiB).
MAX_ANSWER_BYTES: Final = 1024 * 1024
#: Time a client has to send its request body.
BODY_TIMEOUT_S: Final = 15.0
METHODS: Final = frozenset({"GET", "POST"})

XML_PATH: Final = "/autodiscover/autodiscover.xml"
JSON_PATH: Final = "/autodiscover/autodiscover.json"
_JSON_TARGET: Final = re.compile(
    r"(?i)(/autodiscover/autodiscover\.json)(?:(/v1\.0)(?:/([^/]+))?)?/?")
#: An address (or bare local part) as it may appear in the JSON path, decoded.
_ADDRESS: Final = re.compile(r"[A-Za-z0-9!#$&'*+=?^_`{|}~.-]+(?:@[A-Za-z0-9.-]+)?")
#: Client headers not sent upstream: the answer must come unencoded to be rewritten.
_DROP: Final = NOT_FORWARDED | {b"content-length", b"accept-encoding"}
_CONTENT_LENGTH: Final = frozenset({b"content-length"})

#: Told of a refused login: (user, client address, device certificate, seconds waited).
OnAuthFailed = Callable[[str, str, "ClientCert | None", float], Awaitable[None]]


def autodiscover_kind(path: str) -> Kind | None:
    """Which Autodiscover form a (decoded) request path asks for, or None."""
    p = path.lower()
    if p == XML_PATH:
        return "xml"
    if p == JSON_PATH or p.startswith(JSON_PATH + "/"):
        return "json"
    return None


def upstream_target(raw_target: str) -> str | None:
    """The target sent upstream for a raw origin-form target, or None when its path is
    not one of the served forms spelt plainly. The query passes as sent."""
    path, sep, query = raw_target.partition("?")
    if path.lower() == XML_PATH:
        return path + sep + query  # only the letter case can differ
    m = _JSON_TARGET.fullmatch(path)
    if m is None:
        return None
    base, version, address = m.groups()
    target = base + (version or "")
    if address is not None:
        try:
            decoded = unquote(address, errors="strict")
        except UnicodeDecodeError:
            return None
        if decoded in (".", "..") or not _ADDRESS.fullmatch(decoded):
            return None
        target += "/" + quote(decoded, safe="@!$&'*+=^_`{|}~")
    return target + sep + query


async def read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes | None:
    """The whole stream, or None once it holds more than ``cap`` bytes."""
    data = bytearray()
    while chunk := await stream.readany():
        data += chunk
        if len(data) > cap:
            return None
    return bytes(data)


class Autodiscover:
    """The Autodiscover side of one ActiveSync listener."""

    def __init__(self, cfg: ListenerConfig, forwarder: Forwarder,
                 on_auth_failed: OnAuthFailed, throttle: LoginThrottle | None = None) -> None:
        self.cfg = cfg
        self.forwarder = forwarder
        self.on_auth_failed = on_auth_failed
        self.throttle = throttle
        self.rewriter = Rewriter(cfg.upstream, cfg.public_url) if cfg.public_url else None
        self._base = str(forwarder.upstream).rstrip("/")

    async def serve(self, request: web.BaseRequest, kind: Kind, user: str | None,
                    cert: ClientCert | None = None) -> web.StreamResponse:
        """Answer one Autodiscover request (hygiene already checked); ``user`` is the
        Basic user, None without Basic credentials; ``cert`` the connection's
        verified device certificate."""
        target = upstream_target(request.raw_path)
        if target is None:
            self._abuse(request, "autodiscover_bad_target")
            return text_response(404, "Not found.")
        if request.method not in METHODS:
            self._abuse(request, "bad_method")
            return text_response(405, "Autodiscover requests use POST or GET.",
                                 {"Allow": "GET, POST"})
        body = b""
        if request.method == "POST":
            read = await self._body(request)
            if isinstance(read, web.StreamResponse):
                return read
            body = read
        waited = 0.0
        if user is not None and self.throttle is not None:
            waited = await self.throttle.before(user, request.remote or "", cert)
        try:
            status, reason, headers, answer = await self._exchange(request, target, body)
        except UPSTREAM_ERRORS as e:
            log.warning("autodiscover upstream failed", error=str(e) or type(e).__name__)
            return unavailable()
        if answer is None:
            log.warning("autodiscover answer too large", limit=MAX_ANSWER_BYTES)
            return text_response(502, "The mail server's answer is too large.")
        if status == 401 and user is not None:
            await self.on_auth_failed(user, request.remote or "", cert, waited)
        if status == 200:
            answer = self._rewritten(kind, headers, answer)
        return web.Response(status=status, reason=reason, body=answer, headers=headers)

    def _abuse(self, request: web.BaseRequest, kind: str) -> None:
        if self.throttle is not None:
            self.throttle.abuse(request.remote or "", kind)

    async def _body(self, request: web.BaseRequest) -> bytes | web.StreamResponse:
        """The request body, or the answer refusing it (413 too large, 408 too slow)."""
        length = request.content_length
        too_large = text_response(413, "The Autodiscover request is too large.")
        too_large.force_close()  # the rest of the body is not read
        if length is not None and length > MAX_BODY_BYTES:
            return too_large
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await read_capped(request.content, MAX_BODY_BYTES)
        except TimeoutError:
            slow = text_response(408, "The request body was not sent in time.")
            slow.force_close()
            return slow
        return too_large if body is None else body

    async def _exchange(self, request: web.BaseRequest, target: str, body: bytes
                        ) -> tuple[int, str, CIMultiDict[str], bytes | None]:
        """One upstream exchange: status, reason, answer headers for the client and
        the answer body (None when larger than :data:`MAX_ANSWER_BYTES`)."""
        headers = CIMultiDict(
            (header_text(k), header_text(v)) for k, v in forwarded_headers(
                request.raw_headers, request.remote or "", request.scheme, _DROP))
        timeout = aiohttp.ClientTimeout(total=self.cfg.upstream_timeout_s,
                                        sock_connect=self.cfg.upstream_connect_timeout_s)
        async with self.forwarder.client.request(
            request.method, URL(self._base + target, encoded=True), headers=headers,
            data=body if request.method == "POST" else None, allow_redirects=False,
            timeout=timeout, compress=False,
        ) as up:
            answer = await read_capped(up.content, MAX_ANSWER_BYTES)
            return (up.status, up.reason or "",
                    CIMultiDict(client_headers(list(up.raw_headers), _CONTENT_LENGTH)), answer)

    def _rewritten(self, kind: Kind, headers: CIMultiDict[str], answer: bytes) -> bytes:
        """``answer`` with the upstream's address replaced by ``public_url`` (see
        :mod:`~proxy.frontends.activesync.rewrite`), or unchanged."""
        if self.rewriter is None:
            return answer
        if headers.get("Content-Encoding", "identity").lower() != "identity":
            log.warning("autodiscover answer not rewritten", reason="content-encoding")
            return answer
        try:
            return self.rewriter.xml(answer) if kind == "xml" else self.rewriter.json(answer)
        except Unchanged as e:
            if e.reason != "no upstream address":
                log.warning("autodiscover answer not rewritten", reason=e.reason, form=kind)
            return answer
