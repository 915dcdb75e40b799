"""mailward's policy for sites that keep nginx as their mail or ActiveSync proxy.

nginx does the TLS and the protocol; mailward answers its two authentication
questions on a plain-HTTP loopback listener (``[nginx]`` in ``mailward.toml``,
DESIGN "Scale-out and nginx integration"), deciding through the same gate and writing
the same audit records as its own front ends:

* :mod:`.protocol` -- nginx's requests and mailward's answers, without I/O
  (``auth_http`` headers in, ``Auth-Status``/``Auth-Server``/``Auth-Wait`` out;
  ``auth_request`` facts in, a status out), fuzzed with hypothesis;
* :mod:`.certs` -- the device certificate nginx passes, verified against
  ``[tls] client_ca``;
* :mod:`.upstreams` -- the password checked against the real upstream with the
  front ends' own upstream login code;
* :mod:`.mail` -- ``GET /auth_http`` (nginx ``mail``: IMAP, POP3, SMTP);
* :mod:`.eas` -- ``GET /auth_request`` (nginx ``http`` in front of ActiveSync), decided
  once per device-session;
* :mod:`.app` -- the aiohttp listener: loopback only, the shared-secret header, limits.

:func:`start` is what ``mailward serve`` calls when ``[nginx]`` is configured.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping

from proxy.config import Config
from proxy.gate import Gate
from proxy.nginx.app import RunningNginxListener, bind, make_app, read_secret
from proxy.nginx.certs import CertificateCheck
from proxy.nginx.mail import MailAuth
from proxy.startup import StartupError, bind_error


async def start(cfg: Config, gate: Gate,
                upstream_tls: Mapping[str, ssl.SSLContext | None]) -> RunningNginxListener:
    """Start the ``[nginx]`` listener (``cfg.nginx`` must be set); ``upstream_tls``
    maps listener names to their upstream TLS contexts. :class:`StartupError` when
    the secret or the CA is unusable or the address cannot be bound."""
    ng = cfg.nginx
    assert ng is not None
    try:
        secret = read_secret(ng)
        certs = CertificateCheck(cfg.tls.client_ca)
    except (ValueError, OSError) as exc:
        raise StartupError(str(exc)) from None
    served = {lc.protocol: lc for lc in cfg.listeners if lc.nginx_upstream is not None}
    mail = MailAuth(gate, {p: lc for p, lc in served.items() if p != "activesync"},
                    upstream_tls, certs, socket.gethostname())
    closers: list[Callable[[], Awaitable[None]]] = []
    eas = None
    if "activesync" in served:
        from proxy.frontends.activesync.forward import Forwarder
        from proxy.nginx.eas import EasAuth

        lc = served["activesync"]
        forwarder = Forwarder(lc, upstream_tls.get(lc.name))
        await forwarder.start()
        closers.append(forwarder.close)
        eas = EasAuth(gate, lc, forwarder, certs)
        eas.start()
        closers.insert(0, eas.close)  # its session_end records before the upstream goes
    app = make_app(ng, secret, lambda: gate.limits, mail, eas)
    try:
        running = await bind(ng, app, gate.limits)
    except (ValueError, OSError) as exc:
        for close in closers:
            await close()
        if isinstance(exc, ValueError):
            raise StartupError(str(exc)) from None
        raise bind_error("nginx.listen", ng.host, ng.port, exc) from None
    running.closers = tuple(closers)
    return running


__all__ = ["RunningNginxListener", "start"]
