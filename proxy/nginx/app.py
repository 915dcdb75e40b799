"""The ``[nginx]`` listener: plain HTTP on loopback, guarded by a shared secret.

* Only loopback: the config refuses another ``listen`` address and :func:`bind`
  refuses it again (and checks what was bound), since nginx's questions and
  mailward's answers cross it in cleartext, passwords included. It never shares the
  TLS API listener.
* The secret: every request must carry ``[nginx] auth_http_header`` with the
  contents of ``secret_file``, compared in constant time (``hmac.compare_digest``).
  A request without it is answered 403 before anything is parsed or decided, is
  counted as abuse of its address, and takes a token from that address's API rate
  bucket (``api_rate_per_ip``): a local process guessing the secret gets 429s. nginx
  itself, with the secret, is not rate-limited (it speaks for every phone); the
  failed-login throttle limits each phone.
* Limits as on the API: request heads within ``header_timeout`` (slowloris), header
  lines and fields capped (:data:`MAX_FIELD_BYTES`: a URL-encoded certificate fits),
  no request body (``GET`` only; :data:`MAX_BODY_BYTES`).
* Whatever goes wrong inside, ``/auth_http`` answers a temporary refusal and
  ``/auth_request`` a 503, never an OK and never a bare 500.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.config import NginxConfig
from proxy.net.http_guard import guarded
from proxy.net.limits import Limit, Limits
from proxy.nginx.eas import EasAuth, forbidden
from proxy.nginx.mail import MailAuth
from proxy.nginx.protocol import BadAuthRequest, parse_mail_request, refused
from proxy.oplog import get_logger

log = get_logger("mailward.nginx")

#: The listener name in limits and metrics.
LISTENER: Final = "nginx"
MAX_BODY_BYTES: Final = 1024
MAX_LINE_BYTES: Final = 8 * 1024
MAX_FIELD_BYTES: Final = 24 * 1024  # Auth-SSL-Cert: a URL-encoded PEM certificate
MAX_HEADERS: Final = 64
#: A secret shorter than this is refused at start-up (it could be guessed).
MIN_SECRET_CHARS: Final = 16

_MAIL: Final = web.AppKey("mail", MailAuth)
_EAS: Final = web.AppKey("eas", EasAuth)


def read_secret(cfg: NginxConfig) -> str:
    """The shared secret (one line); ``ValueError`` naming the file if unusable."""
    try:
        secret = cfg.secret_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ValueError(f"nginx.secret_file: cannot read {cfg.secret_file}: {why}") from None
    if len(secret) < MIN_SECRET_CHARS or any(c in secret for c in "\r\n"):
        raise ValueError(f"nginx.secret_file: {cfg.secret_file} must hold one line of at "
                         f"least {MIN_SECRET_CHARS} characters")
    return secret


def secret_middleware(header: str, secret: str, limits: Callable[[], Limits]
                      ) -> Middleware:
    """403 (429 once the address's budget is spent) without the secret; ``limits``
    returns the server's one :class:`Limits` (read on each refusal)."""
    expected = secret.encode()

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        given = request.headers.get(header, "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            ip = request.remote or ""
            limits().abuse(ip, "nginx_secret", LISTENER)
            wait = limits().api_request(ip, LISTENER)
            if wait > 0:
                return web.Response(status=429, text="Too many requests.\n",
                                    headers={"Retry-After": str(max(1, int(wait + 0.999)))})
            return web.Response(status=403, text="Forbidden.\n")
        return await handler(request)

    return check


async def auth_http(request: web.Request) -> web.Response:
    """nginx mail's question (see :mod:`proxy.nginx.mail`); always 200 with headers."""
    protocol = request.headers.get("Auth-Protocol", "").strip().lower()
    try:
        answer = await request.app[_MAIL].answer(parse_mail_request(request.headers))
    except BadAuthRequest as exc:
        log.info("auth_http request refused", detail=exc.detail)
        answer = refused(protocol, "request", "Invalid login or password.")
    except Exception as exc:  # fail closed, in words nginx passes on
        log.error("auth_http failed", error=f"{type(exc).__name__}: {exc}")
        answer = refused(protocol, "temporary", "Mail access is temporarily unavailable.")
    return web.Response(status=200, headers=answer.headers())


async def auth_request(request: web.Request) -> web.Response:
    """nginx http's question (see :mod:`proxy.nginx.eas`)."""
    eas = request.app.get(_EAS)
    if eas is None:
        return forbidden("ActiveSync is not served through nginx here.")
    try:
        return await eas.answer(request)
    except Exception as exc:  # fail closed
        log.error("auth_request failed", error=f"{type(exc).__name__}: {exc}")
        return web.Response(status=503, text="Temporarily unavailable.\n",
                            headers={"Retry-After": "30"})


def make_app(cfg: NginxConfig, secret: str, limits: Callable[[], Limits], mail: MailAuth,
             eas: EasAuth | None) -> web.Application:
    app = web.Application(middlewares=[secret_middleware(cfg.auth_http_header, secret,
                                                         limits)],
                          client_max_size=MAX_BODY_BYTES)
    app[_MAIL] = mail
    if eas is not None:
        app[_EAS] = eas
    app.router.add_get("/auth_http", auth_http)
    app.router.add_get("/auth_request", auth_request)
    return app


@dataclass
class RunningNginxListener:
    """The bound ``[nginx]`` listener."""

    port: int
    runner: web.AppRunner
    server: asyncio.Server
    closers: tuple[Callable[[], Awaitable[None]], ...] = ()
    name: str = LISTENER

    async def close(self, grace_s: float = 1.0) -> None:
        self.server.close()
        await self.runner.shutdown()
        await self.runner.cleanup()
        for close in self.closers:
            await close()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


async def bind(cfg: NginxConfig, app: web.Application, limits: Limits
               ) -> RunningNginxListener:
    """Serve ``app`` on ``cfg``'s loopback address (port 0 picks one); ``ValueError``
    for any address that is not loopback, ``OSError`` when it cannot bind."""
    if cfg.host != "localhost" and not _loopback(cfg.host):
        raise ValueError(f"nginx.listen: {cfg.host} is not a loopback address")
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                           max_line_size=MAX_LINE_BYTES, max_field_size=MAX_FIELD_BYTES,
                           max_headers=MAX_HEADERS)
    await runner.setup()
    assert runner.server is not None

    def cut_off(ip: str) -> None:
        limits.hit(Limit.HEADER_TIMEOUT, LISTENER, ip)
        limits.abuse(ip, "slow_request_head", LISTENER)

    factory = guarded(runner.server, limits.cfg.header_timeout_s, cut_off)
    try:
        server = await asyncio.get_running_loop().create_server(
            factory, cfg.host, cfg.port, backlog=1024, reuse_address=True,
            family=socket.AF_UNSPEC)
    except BaseException:
        await runner.cleanup()
        raise
    bound = [s.getsockname() for s in server.sockets]
    if not bound or not all(_loopback(str(a[0])) for a in bound):
        server.close()
        await runner.cleanup()
        raise ValueError(f"nginx.listen: {cfg.host} resolved to a non-loopback address")
    return RunningNginxListener(int(bound[0][1]), runner, server)


__all__ = ["LISTENER", "RunningNginxListener", "auth_http", "auth_request", "bind",
           "make_app", "read_secret", "secret_middleware"]
