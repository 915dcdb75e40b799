"""IMAP front end: the I/O executor of the sans-IO pre-auth conversation.

The protocol logic has no I/O and lives beside this file: ``imap_wire`` parses what
the client sends before login, ``imap_preauth`` is the conversation (events in,
commands out: greet, answer CAPABILITY/ID/NOOP, STARTTLS, refuse cleartext logins, log
in upstream, ask the gate, refuse or splice), and ``imap_upstream`` is the login to the
upstream server. This module and ``preauth_exec`` (the executor shared with POP3)
perform their commands; every ``await`` is there.

One :class:`_ImapSession` per client connection:

1. TLS: implicit (the handshake starts at once) or STARTTLS. A verified client
   certificate's SAN names the device (``proxy.net.tls.client_cert_from_ssl``).
2. Pre-auth: client bytes go to the layer (with the idle and total time limits), its
   commands are performed in order (``preauth_exec.PreauthSession``), and outcomes
   (TLS up, the upstream's answer, the gate's decision) are fed back as events.
3. Login: connect upstream (implicit TLS / STARTTLS / none, certificate verified) and
   run ``imap_upstream.UpstreamLogin`` to the tagged answer. The upstream's capabilities
   (which SASL mechanisms to offer, IDLE, ...) are learnt from a probe when the
   listener starts (:meth:`ImapListener.probe_upstream`) and refreshed by every login.
4. Allow: the upstream's tagged OK goes to the client and both transports are spliced
   (``Pipe`` buffered protocols writing straight into each other's transport, with
   pause/resume_reading driven by the peer's write buffer; no per-byte Python work and
   no coroutine per session). The session is registered with the gate, which may
   :meth:`_ImapSession.terminate` it (``* BYE <reason>``).

Both connections of a session are ``proxy.net.socket_transport.SocketTransport`` objects
(OpenSSL on the socket), not the event loop's transports: an idle session then holds
no receive buffer and no TLS buffers, however much mail it once carried.

Audit: a login attempt gives one ``decision`` record (from the gate; an unreachable
upstream is a temporary deny ``upstream_unavailable``); a connection that completed
TLS and ends before any login attempt gives one ``session_end`` record with the
reason; one that never completed TLS is counted into the per-minute ``abuse_summary``
(``login_limits``). Limits: the accept loop counts connections and handshakes per
address (``[limits]``), and a login's answer waits what the failed-login throttle says.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from proxy.frontends import FrontendContext
from proxy.frontends.imap_preauth import (
    OWN_MECHANISMS,
    SHUTDOWN_TEXT,
    DecisionMade,
    OpenUpstream,
    Preauth,
    RequestDecision,
    UpstreamAnswered,
)
from proxy.frontends.imap_syntax import SUPPORTED_MECHANISMS, bye_line
from proxy.frontends.imap_transport import UpstreamConnection
from proxy.frontends.imap_upstream import UpstreamLogin, logout_command
from proxy.frontends.preauth_exec import (
    UPSTREAM_ERRORS,
    PreauthListener,
    PreauthSession,
    converse_upstream,
)
from proxy.gate import Origin
from proxy.oplog import get_logger

log = get_logger("mailward.imap")

#: Upstream pre-auth capabilities the proxy replaces with its own view.
_OWN_CAPABILITIES = {"IMAP4REV1", "SASL-IR", "LITERAL+", "ID", "STARTTLS", "LOGINDISABLED",
                     "LOGIN-REFERRALS"}
#: Advertised until the first upstream greeting tells what the server supports.
DEFAULT_UPSTREAM_CAPABILITIES = ("IDLE", "ENABLE")
#: The upstream's capabilities are asked for at start-up within this time.
PROBE_TIMEOUT_S = 5.0


# -------------------------------------------------------------------------- listener


class ImapListener(PreauthListener):
    """A started IMAP listener (``RunningListener``)."""

    log = log
    default_capabilities = DEFAULT_UPSTREAM_CAPABILITIES

    def __init__(self, ctx: FrontendContext) -> None:
        super().__init__(ctx)
        self.upstream_mechanisms: list[str] = []  # relayable SASL mechanisms it offers

    def new_session(self) -> _ImapSession:
        return _ImapSession(self)

    def mechanisms(self) -> list[str]:
        """The upstream's SASL mechanisms that the proxy can relay (``imap_sasl``)."""
        return self.upstream_mechanisms

    def learn_capabilities(self, caps: Sequence[str]) -> None:
        """Pre-auth capabilities of the upstream (from its greeting), minus our own."""
        keep = [c for c in caps
                if c.upper() not in _OWN_CAPABILITIES and not c.upper().startswith("AUTH=")]
        offered = {c.upper()[5:] for c in caps if c.upper().startswith("AUTH=")}
        self.upstream_capabilities = keep
        self.upstream_mechanisms = [m for m in SUPPORTED_MECHANISMS
                                    if m in offered and m not in OWN_MECHANISMS]

    async def probe_upstream(self) -> None:
        """Learn the upstream's capabilities before the first client asks (best effort:
        until a login succeeds in telling, only PLAIN is offered)."""
        up = UpstreamConnection()
        login = UpstreamLogin.probe(starttls=self.listener.upstream_tls == "starttls")
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await converse_upstream(self.listener, self.ctx.upstream_tls, up, login,
                                        self.learn_capabilities)
        except UPSTREAM_ERRORS as exc:
            log.warning("upstream probe failed; offering PLAIN only until a login",
                        listener=self.name, upstream=self.listener.upstream,
                        error=str(exc)[:200] or type(exc).__name__)
        finally:
            up.pipe.close()



async def start(ctx: FrontendContext) -> ImapListener:
    """Start the IMAP listener described by ``ctx.listener``."""
    listener = ImapListener(ctx)
    await listener.probe_upstream()
    return await listener.start()


# --------------------------------------------------------------------------- session


class _ImapSession(PreauthSession):
    """One client connection: the executor of its pre-auth layer (``imap_preauth``,
    performed by ``preauth_exec.PreauthSession``), then a registered live session."""

    __slots__ = ("local_addr",)

    log = log
    shutdown_text = SHUTDOWN_TEXT
    upstream_goodbye = logout_command()

    def __init__(self, owner: ImapListener) -> None:
        cfg = owner.listener
        self.local_addr = ("", 0)  # the proxy's address the client connected to
        super().__init__(owner, Preauth(
            tls_mode=cfg.tls,
            cleartext_allowed=cfg.allow_cleartext_auth and cfg.is_loopback,
            max_commands=cfg.max_preauth_commands,
            upstream_capabilities=owner.capabilities,
            upstream_mechanisms=owner.mechanisms,
        ))
        self.owner: ImapListener = owner

    def _origin(self, client_ip: str) -> Origin:
        return Origin("imap", self.cfg.name, client_ip, self.cfg.unidentified)

    async def _perform(self, command: Any) -> Any:
        """As the shared executor, and an allowed login learns the warning to show
        (``* OK [ALERT]``, once per device per day: ``gate.warning_alert``)."""
        outcome = await super()._perform(command)
        if isinstance(command, RequestDecision) and isinstance(outcome, DecisionMade):
            alert = await self.gate.warning_alert(command.identity, self.origin,
                                                  outcome.decision)
            if alert:
                outcome = dataclasses.replace(outcome, alert=alert)
        return outcome

    def _on_made(self, transport: asyncio.BaseTransport) -> None:
        local = transport.get_extra_info("sockname") or ("", 0)
        self.local_addr = (str(local[0]), int(local[1]) if len(local) > 1 else 0)
        super()._on_made(transport)

    # ------------------------------------------------------------------ upstream

    async def _login_upstream(self, command: OpenUpstream) -> UpstreamAnswered:
        """Connect and run the sans-IO ``UpstreamLogin`` to its tagged answer."""
        self.upstream = UpstreamConnection()
        login = UpstreamLogin(
            tag=command.tag, user=command.user, password=command.password,
            starttls=self.cfg.upstream_tls == "starttls", id_fields=command.client_id,
            client_ip=self.origin.client_ip, client_port=self.client_port,
            connected=self.local_addr, mechanism=command.mechanism,
            response=command.response)
        answer = await converse_upstream(self.cfg, self.owner.ctx.upstream_tls,
                                         self.upstream, login, self.owner.learn_capabilities)
        assert answer is not None  # not a probe
        return UpstreamAnswered(answer.ok, answer.untagged, answer.tagged)

    # ---------------------------------------------------------------- ending

    def _last_words(self, text: str) -> bytes:
        return bye_line(text)


__all__ = ["ImapListener", "start"]
