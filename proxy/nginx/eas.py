"""``GET /auth_request``: nginx's ``http`` proxy asks whether an ActiveSync request may
go to the upstream (ngx_http_auth_request_module).

The subrequest carries the phone's headers (``Authorization``) and what the nginx
location adds (:mod:`proxy.nginx.protocol`: the original URI and method, the client
address, the client certificate). It is decided as the ActiveSync front end decides
a new device-session, with its code: the query decoder
(:func:`proxy.frontends.eas_query.parse_query`), the Basic user and the query
``User`` (``handler.basic_user``, ``handler.resolve_user``), the failed-login
throttle (``guard.LoginThrottle``) and the credential check against the listener's
upstream (``forward.Forwarder.check_credentials``, an ``OPTIONS`` with the phone's
``Authorization`` and its address in ``X-Forwarded-For``; nothing else of the
subrequest, least of all the shared secret, goes upstream).

Answers (nginx passes 401 and 403 to the phone, anything else becomes its 500):
200 allow (and ``OPTIONS``, which the upstream answers itself as on the front end);
401 with ``WWW-Authenticate`` for missing or wrong credentials; 403 with
``X-Mailward-Refusal`` (the remediation text, percent-encoded where not ASCII) for a
deny or a request that is not ActiveSync; 503 with ``Retry-After`` when the
upstream, the posture store or the audit log is unavailable.

Decided once per device-session, as on the front end
(:mod:`proxy.frontends.activesync.sessions`): the first request of a (device, user,
client certificate, credentials) is checked upstream and decided, with one
``decision`` record; an allow is cached and answers that key's later requests at
once until the gate ends it (revocation, new posture, policy; its ``session_end``
record says why and how many requests it covered), the policy version changes, it
is an hour old or two hours idle. Refusals are never cached. Unlike the front end,
mailward never sees the upstream's answers here (nginx proxies the phone's request
itself), so a changed or wrong password cannot end a session from an upstream 401:
the key holds a keyed digest of the ``Authorization`` header instead, and other
credentials are a new key, checked upstream and counted by the failed-login
throttle. A request nginx has already passed on is not ended by a later
revocation (nginx does not ask again); the phone's next request is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from aiohttp import web

from proxy.config import ListenerConfig
from proxy.frontends.activesync.forward import Forwarder
from proxy.frontends.activesync.guard import LoginThrottle, UpstreamUnavailable
from proxy.frontends.activesync.handler import basic_user, resolve_user
from proxy.frontends.activesync.hygiene import EAS_PATH
from proxy.frontends.activesync.refusal import header_safe, unavailable
from proxy.frontends.activesync.sessions import DeviceSessions, SessionKey, session_key
from proxy.frontends.eas_query import QueryError, parse_query
from proxy.gate import Gate, Identity, Origin, origin_for
from proxy.nginx.certs import CertificateCheck, UntrustedCertificate
from proxy.nginx.mail import UNTRUSTED_TEXT, listener_name
from proxy.nginx.protocol import REFUSAL_HEADER, BadAuthRequest, EasRequest, parse_eas_request

#: Request headers of the phone that the credential check sends upstream.
CHECKED_HEADERS = ("Authorization", "User-Agent", "MS-ASProtocolVersion")
SIGN_IN = {"WWW-Authenticate": 'Basic realm="ActiveSync"'}


def forbidden(text: str) -> web.Response:
    """403 with the reason where nginx can pass it on (``auth_request_set``)."""
    return web.Response(status=403, text=text + "\n",
                        headers={REFUSAL_HEADER: header_safe(text)})


class EasAuth:
    """Answers ``auth_request`` for the ActiveSync listener with ``nginx_upstream``."""

    def __init__(self, gate: Gate, lc: ListenerConfig, forwarder: Forwarder,
                 certs: CertificateCheck, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.gate, self.lc, self.upstream, self.certs = gate, lc, forwarder, certs
        self.name = listener_name(lc)
        self.throttle = LoginThrottle(gate, self.name)
        self.clock = clock
        self.sessions = DeviceSessions(gate, clock, self.throttle)
        # Keys hold a digest of the credentials, keyed by a secret of this process so
        # that the table holds nothing a password could be checked against offline.
        self._credentials_key = secrets.token_bytes(32)

    def start(self) -> None:
        """Sweep idle and over-age device-sessions (in the running loop)."""
        self.sessions.start()

    async def close(self) -> None:
        """End every device-session (``session_end`` records)."""
        await self.sessions.close()

    def _key(self, identity: Identity, authorization: str) -> SessionKey:
        """The front end's device-session key, its certificate part extended by the
        credentials' digest (see the module docstring)."""
        device, user, cert = session_key(identity)
        digest = hmac.new(self._credentials_key, authorization.encode("utf-8",
                          "surrogateescape"), hashlib.sha256).hexdigest()
        return device, user, f"{cert}/{digest}"

    async def answer(self, request: web.Request) -> web.Response:
        try:
            req = parse_eas_request(request.headers)
        except BadAuthRequest as exc:
            self.throttle.abuse(request.headers.get("X-Real-IP", "") or "nginx", "bad_query")
            return forbidden(f"Bad ActiveSync request: {exc.detail}.")
        if req.method == "OPTIONS":  # protocol discovery: the upstream checks it
            return web.Response(status=200)
        if req.path.lower() != EAS_PATH.lower():
            self.throttle.abuse(req.client_ip, "unknown_path")
            return forbidden("Not an ActiveSync request.")
        try:
            query = parse_query(req.raw_query)
        except QueryError as exc:
            self.throttle.abuse(req.client_ip, "bad_query")
            return forbidden(f"Bad ActiveSync request: {exc.detail}.")
        auth_user = basic_user(req.authorization)
        if auth_user is None:
            return web.Response(status=401, text="Sign in with your mail account.\n",
                                headers=SIGN_IN)
        try:
            cert = self.certs.verify(req.cert_pem, time.time()) if req.cert_pem else None
        except UntrustedCertificate:
            self.throttle.abuse(req.client_ip, "untrusted_certificate")
            return forbidden(UNTRUSTED_TEXT)
        origin = dataclasses.replace(origin_for(self.lc, req.client_ip), listener=self.name)
        user = resolve_user(auth_user, query.user)
        if user is None:
            await self.gate.record_deny(Identity(auth_user, query.device_id, "claim",
                                                 cert=cert),
                                        origin, "user_mismatch",
                                        "query User differs from Basic auth")
            return forbidden("The account in the request does not match the signed-in "
                             "account.")
        identity = Identity(user, query.device_id, "claim", cert=cert)
        key = self._key(identity, req.authorization or "")
        session = self.sessions.cached(key) or await self.sessions.current(key)
        if session is None:
            return await self._admit(request, req, identity, origin, key)
        session.covered(self.clock())
        return web.Response(status=200)

    async def _admit(self, request: web.Request, req: EasRequest, identity: Identity,
                     origin: Origin, key: SessionKey) -> web.Response:
        """A new device-session: the upstream checks the credentials, the gate decides
        (with the session registered, so a re-evaluation meanwhile ends it), an allow
        is cached. A burst of first requests of one key waits for one decision."""
        async with self.sessions.admission(key) as admitted:
            if admitted is not None:
                admitted.covered(self.clock())
                return web.Response(status=200)
            if identity.cert is not None or origin.client_cert != "required":
                refused = await self._verify_credentials(request, req, identity, origin)
                if refused is not None:
                    return refused
            decision, session = await self.sessions.decide(identity, origin, key)
            if session is None:
                return unavailable() if decision.temporary else \
                    forbidden(decision.user_text())
            if not await self.sessions.activate(session):  # ended while deciding
                return forbidden(session.ended or "")
            session.covered(self.clock())
            return web.Response(status=200)

    async def _verify_credentials(self, request: web.Request, req: EasRequest,
                                  identity: Identity, origin: Origin) -> web.Response | None:
        """None when the upstream accepted the phone's credentials, else the answer."""
        phone = request.clone(headers={k: request.headers[k] for k in CHECKED_HEADERS
                                       if k in request.headers}, remote=req.client_ip)
        try:
            refused = await self.throttle.check_credentials(self.upstream, phone, identity,
                                                            origin)
        except UpstreamUnavailable:
            return unavailable()
        if refused is None:
            return None
        if refused.status == 401:
            return web.Response(status=401, text="Sign in with your mail account.\n",
                                headers=SIGN_IN)
        return forbidden("The mail server refused this account.")


__all__ = ["EasAuth", "forbidden"]
