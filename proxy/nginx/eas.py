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

Every request that reaches the gate gets one ``decision`` record: unlike the front
end, nginx keeps no device-session here, so a phone's every request is decided
(and a revocation or new posture applies from its next request).
"""

from __future__ import annotations

import dataclasses
import time

from aiohttp import web

from proxy.config import ListenerConfig
from proxy.frontends.activesync.forward import Forwarder
from proxy.frontends.activesync.guard import LoginThrottle, UpstreamUnavailable
from proxy.frontends.activesync.handler import basic_user, resolve_user
from proxy.frontends.activesync.hygiene import EAS_PATH
from proxy.frontends.activesync.refusal import header_safe, unavailable
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
                 certs: CertificateCheck) -> None:
        self.gate, self.lc, self.upstream, self.certs = gate, lc, forwarder, certs
        self.name = listener_name(lc)
        self.throttle = LoginThrottle(gate, self.name)

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
        if cert is not None or origin.client_cert != "required":
            refused = await self._verify_credentials(request, req, identity, origin)
            if refused is not None:
                return refused
        decision = await self.gate.decide(identity, origin)
        if decision.allow:
            return web.Response(status=200)
        if decision.temporary:
            return unavailable()
        return forbidden(decision.user_text())

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
