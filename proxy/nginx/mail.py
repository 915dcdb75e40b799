"""``GET /auth_http``: nginx's mail proxy asks whether a login may go through.

The same order as mailward's own IMAP, POP3 and SMTP front ends (DESIGN "Sessions,
in order"), with nginx doing the TLS and the protocol:

1. The listener is the ``[[listeners]]`` table of the request's protocol that has
   ``nginx_upstream``; the :class:`~proxy.gate.Origin` is built from it with
   ``Client-IP`` as the client address and ``nginx:<listener>`` as the listener name
   (records show the login came through nginx).
2. The device: a certificate in ``Auth-SSL-Cert`` is verified against ``[tls]
   client_ca`` (:mod:`proxy.nginx.certs`) and identifies the device as a front end's
   handshake does; an untrusted one is refused like a failed handshake (counted, not
   recorded). Without one the client is unidentified and the listener's
   ``unidentified`` setting applies in the gate.
3. The upstream checks the password (:mod:`proxy.nginx.upstreams`); a wrong one is
   recorded as ``auth_failed`` and answered with the upstream's text and, while the
   failed-login throttle allows retries, ``Auth-Wait`` = the throttle's delay (at
   least 1 s). A throttled pair's right password waits the delay before its answer
   (``login_limits.login_answered``), as on the front ends. On a listener with
   ``client_cert = "required"`` and no certificate the upstream is not asked (no
   password oracle): the gate refuses.
4. The gate decides (one ``decision`` record): allow -> ``Auth-Status: OK`` with
   ``nginx_upstream``; deny -> the remediation text (IMAP ``[ALERT]``, POP3
   ``[SYS/PERM]``, SMTP ``550 5.7.1``); a temporary deny or an unreachable upstream
   -> a temporary refusal (IMAP ``[UNAVAILABLE]``, SMTP ``451 4.4.1``/``454 4.7.0``),
   never an OK.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from collections.abc import Mapping

from proxy.config import ListenerConfig
from proxy.frontends.login_limits import login_answered
from proxy.gate import UPSTREAM_UNAVAILABLE, Gate, Identity, Origin, origin_for
from proxy.gate.records import TEMPORARY_TEXT
from proxy.ids import ClientCert
from proxy.nginx.certs import CertificateCheck, UntrustedCertificate
from proxy.nginx.protocol import (
    PASSWORD_METHODS,
    MailAnswer,
    MailRequest,
    allowed,
    refused,
)
from proxy.nginx.upstreams import Checked, check_password
from proxy.oplog import get_logger

log = get_logger("mailward.nginx")

UNTRUSTED_TEXT = ("The device certificate is not trusted. Install the company mail "
                  "profile from the device management app.")
METHOD_TEXT = "Use a password login (PLAIN or LOGIN)."
NOT_SERVED_TEXT = "This protocol is not served here."


def listener_name(lc: ListenerConfig) -> str:
    """The listener name records carry for logins through nginx."""
    return f"nginx:{lc.name}"


class MailAuth:
    """Answers ``auth_http`` requests for the listeners with ``nginx_upstream``."""

    def __init__(self, gate: Gate, listeners: Mapping[str, ListenerConfig],
                 upstream_tls: Mapping[str, ssl.SSLContext | None],
                 certs: CertificateCheck, hostname: str) -> None:
        self.gate = gate
        self.listeners = dict(listeners)  # protocol -> listener
        self.upstream_tls = dict(upstream_tls)  # listener name -> context
        self.certs = certs
        self.hostname = hostname

    def origin(self, lc: ListenerConfig, client_ip: str) -> Origin:
        return dataclasses.replace(origin_for(lc, client_ip), listener=listener_name(lc))

    async def answer(self, req: MailRequest) -> MailAnswer:
        """The answer for nginx (see the module docstring)."""
        lc = self.listeners.get(req.protocol)
        if lc is None or lc.nginx_upstream is None:
            log.warning("auth_http for a protocol no listener serves through nginx",
                        protocol=req.protocol)
            return refused(req.protocol, "temporary", NOT_SERVED_TEXT)
        origin = self.origin(lc, req.client_ip)
        try:
            cert = self._certificate(req)
        except UntrustedCertificate as exc:
            log.info("untrusted client certificate from nginx", client_ip=req.client_ip,
                     error=str(exc))
            self.gate.limits.abuse(req.client_ip, "untrusted_certificate", origin.listener)
            return refused(req.protocol, "policy", UNTRUSTED_TEXT)
        device = cert.device_id if cert is not None else None
        identity = Identity(req.user, device, "client_cert" if device else "", cert=cert)
        if req.method not in PASSWORD_METHODS:
            await self.gate.record_deny(identity, origin, "auth_method_unsupported",
                                        f"nginx asked about a {req.method} login.")
            return refused(req.protocol, "request", METHOD_TEXT)
        if cert is None and origin.client_cert == "required":
            return await self._decide(req, lc, identity, origin)  # the gate refuses
        checked = await check_password(lc, self.upstream_tls.get(lc.name), req,
                                       self.hostname)
        if checked.outcome != "ok":
            return await self._not_accepted(req, identity, origin, checked)
        await login_answered(self.gate.limits, req.user, req.client_ip, origin.listener,
                             device, accepted=True)
        return await self._decide(req, lc, identity, origin)

    def _certificate(self, req: MailRequest) -> ClientCert | None:
        if req.cert_pem is None:
            return None
        return self.certs.verify(req.cert_pem, time.time())

    async def _decide(self, req: MailRequest, lc: ListenerConfig, identity: Identity,
                      origin: Origin) -> MailAnswer:
        decision = await self.gate.decide(identity, origin)
        if decision.allow:
            assert lc.nginx_upstream is not None
            return allowed(lc.nginx_upstream)
        if decision.temporary:
            return refused(req.protocol, "temporary", decision.user_text())
        return refused(req.protocol, "policy", decision.user_text())

    async def _not_accepted(self, req: MailRequest, identity: Identity, origin: Origin,
                            checked: Checked) -> MailAnswer:
        """The upstream refused the credentials, or could not check them."""
        gate, ip = self.gate, req.client_ip
        if checked.outcome == "unavailable":
            log.warning("upstream unavailable", listener=origin.listener,
                        error=checked.text)
            await gate.record_deny(identity, origin, UPSTREAM_UNAVAILABLE,
                                   f"The mail server could not be reached or did not "
                                   f"answer ({checked.text}).", temporary=True)
            return refused(req.protocol, "unavailable", TEMPORARY_TEXT)
        if checked.outcome == "temporary":
            await gate.record_deny(identity, origin, "upstream_auth_temporary",
                                   f"The mail server answered {checked.smtp_code} to the "
                                   "login.", temporary=True)
            await login_answered(gate.limits, req.user, ip, origin.listener,
                                 identity.device_id, accepted=False)
            return refused(req.protocol, "temporary", checked.text or TEMPORARY_TEXT,
                           smtp_code=checked.smtp_code)
        await gate.record_auth_failed(identity, origin)
        delay = gate.limits.auth_failed(req.user, ip, origin.listener, identity.device_id)
        return refused(req.protocol, "credentials",
                       checked.text or "Invalid login or password.", attempt=req.attempt,
                       delay_s=delay, smtp_code=checked.smtp_code)


__all__ = ["MailAuth", "listener_name"]
