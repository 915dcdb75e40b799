"""POP3 front end: the I/O executor of the sans-IO pre-auth conversation.

The protocol logic has no I/O and lives beside this file: ``pop3_wire`` parses what the
client sends before login, ``pop3_preauth`` is the conversation (events in, commands
out: greet, answer CAPA, STLS, refuse cleartext logins, log in upstream, ask the gate,
refuse or splice), and ``pop3_upstream`` is the login to the upstream server. This
module performs their commands; every ``await`` is here. ``protocol = "pop3"``
listeners: 995 with implicit TLS, 110 with STLS (RFC 2595).

One :class:`_Pop3Session` per client connection:

1. TLS: implicit (the handshake starts at once) or STLS. A verified client
   certificate's SAN names the device (``proxy.net.tls.client_cert_from_ssl``).
2. Pre-auth: client bytes go to the layer (with the idle and total time limits), its
   commands are performed in order (``preauth_exec.PreauthSession``, shared with
   IMAP), and outcomes (TLS up, the upstream's answer, the gate's decision) are fed
   back as events. The login's answer waits what the failed-login throttle says.
3. Login: connect upstream (implicit TLS / STLS / none, certificate verified) and run
   ``pop3_upstream.UpstreamLogin`` to the server's answer.
4. Allow: the upstream's ``+OK`` goes to the client and both transports are spliced
   (``imap_transport.Pipe``, shared with IMAP: no per-byte Python work, flow control
   by write buffers).
   The session is registered with the gate, which may end it.

Ending a live session (the gate's :meth:`_Pop3Session.terminate`, listener shutdown):
POP3 has no unsolicited responses, so a line written in the middle of a RETR would be
read as part of the message. The proxy closes both connections without a word, and
without QUIT upstream: a POP3 session that ends without QUIT never enters the UPDATE
state (RFC 1939 section 6), so messages the client marked with DELE stay in the
mailbox. The client sees a dropped connection; the reason is in the audit log and in
the notice mail, and the next login gets ``-ERR [SYS/PERM] <reason>``.

Audit: a login attempt gives one ``decision`` record (from the gate; an unreachable
upstream is a temporary deny ``upstream_unavailable``); a connection that completed
TLS and ends before any login attempt gives one ``session_end`` record with the
reason; one that never completed TLS is counted into the per-minute ``abuse_summary``.
"""

from __future__ import annotations

import ssl

from proxy.frontends import FrontendContext
from proxy.frontends.imap_transport import UpstreamConnection, UpstreamError
from proxy.frontends.pop3_preauth import (
    OpenUpstream,
    Preauth,
    UpstreamAnswered,
)
from proxy.frontends.pop3_upstream import UpstreamLogin, quit_command
from proxy.frontends.pop3_wire import RemoteProtocolError
from proxy.frontends.preauth_exec import PreauthListener, PreauthSession, converse_upstream
from proxy.gate import Origin, origin_for
from proxy.oplog import get_logger

log = get_logger("mailward.pop3")

#: Upstream CAPA lines (by their first word) the proxy replaces with its own view.
_OWN_CAPABILITIES = {"STLS", "USER", "SASL", "RESP-CODES", "AUTH-RESP-CODE",
                     "IMPLEMENTATION", "CAPA"}
#: Advertised until the first upstream CAPA tells what the server supports.
DEFAULT_UPSTREAM_CAPABILITIES = ("TOP", "UIDL")


# -------------------------------------------------------------------------- listener


class Pop3Listener(PreauthListener):
    """A started POP3 listener (``RunningListener``)."""

    log = log
    default_capabilities = DEFAULT_UPSTREAM_CAPABILITIES

    def new_session(self) -> _Pop3Session:
        return _Pop3Session(self)

    def learn_capabilities(self, caps: tuple[str, ...]) -> None:
        """The upstream's CAPA before login, minus what the proxy answers itself."""
        self.upstream_capabilities = [
            c for c in caps if c.split()[0].upper() not in _OWN_CAPABILITIES]


async def start(ctx: FrontendContext) -> Pop3Listener:
    """Start the POP3 listener described by ``ctx.listener``."""
    return await Pop3Listener(ctx).start()


# --------------------------------------------------------------------------- session


class _Pop3Session(PreauthSession):
    """One client connection: the executor of its pre-auth layer (``pop3_preauth``,
    performed by ``preauth_exec.PreauthSession``), then a registered live session."""

    __slots__ = ()

    log = log
    shutdown_text = ""  # nothing is said to a live session (see the module docstring)
    upstream_errors = (UpstreamError, RemoteProtocolError, OSError, ssl.SSLError,
                       TimeoutError, ConnectionError)
    upstream_goodbye = quit_command()
    abort_upstream = True  # no QUIT when a live session is ended: DELEs are not applied

    def __init__(self, owner: Pop3Listener) -> None:
        cfg = owner.listener
        super().__init__(owner, Preauth(
            tls_mode=cfg.tls,
            cleartext_allowed=cfg.allow_cleartext_auth and cfg.is_loopback,
            max_commands=cfg.max_preauth_commands,
            upstream_capabilities=owner.capabilities,
        ))
        self.owner: Pop3Listener = owner

    def _origin(self, client_ip: str) -> Origin:
        return origin_for(self.cfg, client_ip)

    # ------------------------------------------------------------------ upstream

    async def _login_upstream(self, command: OpenUpstream) -> UpstreamAnswered:
        """Connect and run the sans-IO ``UpstreamLogin`` to the server's answer."""
        self.upstream = UpstreamConnection()
        login = UpstreamLogin(user=command.user, password=command.password,
                              starttls=self.cfg.upstream_tls == "starttls",
                              client_ip=self.origin.client_ip, client_port=self.client_port)
        answer = await converse_upstream(self.cfg, self.owner.ctx.upstream_tls,
                                         self.upstream, login, self.owner.learn_capabilities)
        assert answer is not None  # a POP3 login always ends with an answer
        return UpstreamAnswered(answer.ok, answer.line)


__all__ = ["Pop3Listener", "start"]
