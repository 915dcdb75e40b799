"""The POP3 pre-auth conversation as a sans-IO layer: events in, commands out.

As mitmproxy's layers (and ``imap_preauth``): :class:`Preauth` holds the state of one
client connection before login and has no I/O, no clock and no ``await``. The executor
(``pop3.py``) feeds it events, past tense (:class:`Connected`, :class:`DataReceived`,
:class:`TlsEstablished`, :class:`UpstreamAnswered`, :class:`DecisionMade`,
:class:`TimedOut`, ...), and performs the commands it returns, imperative
(:class:`SendToClient`, :class:`StartTls`, :class:`OpenUpstream`,
:class:`RequestDecision`, :class:`Splice`, :class:`Close`, ...), in order. A command
that has an outcome (``StartTls``, ``OpenUpstream``, ``RequestDecision``) is the last of
its list; the executor feeds the outcome back as the next event. Client bytes go
through the sans-IO parser ``pop3_wire.Connection``; the session events every protocol
answers alike and the records rule (one ``decision`` record per login attempt, else one
``session_end``) are ``preauth_layer.PreauthLayer``'s.

The rules (DESIGN.md, "Sessions, in order" and "Refusals the user sees"):

- Before TLS, CAPA shows STLS and neither USER nor SASL; USER, PASS and AUTH PLAIN get
  ``-ERR [SYS/PERM]`` (RFC 3206: not a credentials problem, so not ``[AUTH]``) without
  reaching the upstream or the gate, unless cleartext is allowed on loopback. Bytes
  pipelined after STLS are discarded by the parser.
- The upstream checks the credentials first: its ``-ERR`` goes to the client as it is
  and is recorded as ``auth_failed``; the client may try again.
- Only then the gate decides. Deny: ``-ERR [SYS/PERM] <reason>`` and close (not
  ``[AUTH]``, which makes mail apps ask for the password again). Temporary deny:
  ``-ERR [SYS/TEMP] <text>``, the client may retry. Upstream unreachable:
  ``-ERR [SYS/TEMP]``, close, a temporary deny record. Allow: the upstream's ``+OK``
  goes to the client and the connections are spliced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.frontends.events import (
    CloseUpstream,
    Credentials,
    SendToClient,
    SessionCommand,
    SessionEvent,
    Splice,
    StartTls,
)
from proxy.frontends.pop3_wire import (
    MECHANISMS,
    AuthCancelled,
    AuthData,
    AuthStarted,
    BadCommand,
    CapaRequested,
    Connection,
    Event,
    LimitExceeded,
    LoginAttempted,
    MechanismsRequested,
    PrivacyRequired,
    QuitRequested,
    RemoteProtocolError,
    StlsRequested,
    UserGiven,
    capa_response,
    continuation_line,
    decode_plain,
    err_line,
    mechanisms_response,
    ok_line,
)
from proxy.frontends.preauth_layer import PreauthLayer
from proxy.gate import Identity
from proxy.policy import Decision

#: Capabilities the proxy itself implements before login (RFC 2449, RFC 3206).
PROXY_CAPABILITIES = ("RESP-CODES", "AUTH-RESP-CODE")
GREETING_TEXT = "mailward POP3 ready"
UNAVAILABLE_TEXT = "The mail server is temporarily unavailable. Please try again later."
SHUTDOWN_TEXT = "Server shutting down. Please try again later."
PRIVACY_TEXT = "Use STLS or the TLS port (995) before logging in"
TIMEOUT_TEXT = "Autologout; too slow before login"
#: RFC 3206 response codes: a condition of the system that will not change by itself
#: (the user must act: uninstall the app, use TLS), and one that will.
PERMANENT, TEMPORARY = "SYS/PERM", "SYS/TEMP"

# ---------------------------------------------------------------- events and commands
# The session's events and commands are protocol-neutral (``events``), except the two
# that carry the login: POP3 has no tags, and the upstream answers with one line.


@dataclass(frozen=True, slots=True)
class UpstreamAnswered:
    """The upstream's answer to the login: its whole ``+OK`` or ``-ERR`` line."""

    ok: bool
    line: bytes


class OpenUpstream(Credentials):
    """Connect upstream and log in (``pop3_upstream``); then feed UpstreamAnswered or
    UpstreamFailed."""


PreauthEvent = SessionEvent | UpstreamAnswered
PreauthCommand = SessionCommand | OpenUpstream

# ------------------------------------------------------------------------------- layer


class Preauth(PreauthLayer):
    """One client connection before login (see the module docstring)."""

    conn: Connection

    def __init__(self, *, tls_mode: str, cleartext_allowed: bool, max_commands: int,
                 upstream_capabilities: Callable[[], Sequence[str]] = tuple) -> None:
        super().__init__(Connection(max_commands=max_commands, tls=False,
                                    starttls=tls_mode == "starttls",
                                    cleartext_login=cleartext_allowed),
                         tls_mode=tls_mode, upstream_capabilities=upstream_capabilities)

    def capabilities(self) -> list[str]:
        """CAPA before login: the upstream's (TOP, UIDL, ...), then the proxy's own."""
        caps = [*self.upstream_capabilities(), *PROXY_CAPABILITIES]
        if not self.conn.tls and self.tls_mode == "starttls":
            caps.append("STLS")
        if self._cleartext_ok():
            caps += ["USER", "SASL " + " ".join(MECHANISMS)]
        return caps

    def _cleartext_ok(self) -> bool:
        return self.conn.tls or self.conn.cleartext_login

    # ------------------------------------------------------------------ events

    def _greeting(self) -> bytes:
        return ok_line(GREETING_TEXT)

    def _unavailable_reply(self) -> bytes:
        return err_line(UNAVAILABLE_TEXT, TEMPORARY)

    def _timeout_reply(self) -> bytes:
        return err_line(TIMEOUT_TEXT)

    def _shutdown_reply(self) -> bytes:
        return err_line(SHUTDOWN_TEXT, TEMPORARY)

    def _upstream_answered(self, event: UpstreamAnswered) -> list[PreauthCommand]:
        return self._login_answered(event.ok, event.line)  # e.g. -ERR [AUTH]

    def _decided(self, decision: Decision, shutting_down: bool,
                 alert: str = "") -> list[PreauthCommand]:  # POP3 has no ALERT
        self.decided = True
        if not decision.allow:
            text = decision.user_text()
            if decision.temporary:
                self.conn.login_refused()
                return [CloseUpstream(), SendToClient(err_line(text, TEMPORARY)),
                        *self._drain()]
            return [CloseUpstream(), SendToClient(err_line(text, PERMANENT)),
                    *self._close("denied")]
        if shutting_down:
            return [CloseUpstream(), SendToClient(err_line(SHUTDOWN_TEXT, TEMPORARY)),
                    *self._close("shutdown")]
        self.finished = True
        answer, self._answer = self._answer, b""
        return [Splice(answer, self.conn.login_accepted(), self.identity)]

    # ------------------------------------------------------------ client commands

    def _client_event(self, ev: Event) -> list[PreauthCommand]:
        """One parsed client command -> commands (login and limits in their methods)."""
        match ev:
            case CapaRequested():
                return [SendToClient(capa_response(self.capabilities()))]
            case QuitRequested():
                return [SendToClient(ok_line("Logging out")), *self._close("logout")]
            case StlsRequested():
                return [SendToClient(ok_line("Begin TLS negotiation now")), StartTls()]
            case UserGiven():
                return [SendToClient(ok_line("Send PASS"))]
            case LoginAttempted(user, password):
                return self._login(user, password)
            case MechanismsRequested():
                mechs = MECHANISMS if self._cleartext_ok() else ()
                return [SendToClient(mechanisms_response(mechs))]
            case AuthStarted(_, None):
                return [SendToClient(continuation_line())]
            case AuthStarted(_, initial_response) | AuthData(initial_response):
                assert initial_response is not None
                return self._authenticate(initial_response)
            case AuthCancelled():
                return [SendToClient(err_line("AUTH cancelled"))]
            case PrivacyRequired():
                self.end_reason = "cleartext_refused"
                return [SendToClient(err_line(PRIVACY_TEXT, PERMANENT))]
            case BadCommand(text):
                self.end_reason = "bad_syntax"
                return [SendToClient(err_line(text))]
            case LimitExceeded(limit, text):
                return [SendToClient(err_line(text)), *self._close(f"limit_{limit}")]
        raise AssertionError(f"unhandled parser event {ev!r}")  # pragma: no cover

    def _authenticate(self, message: bytes) -> list[PreauthCommand]:
        try:
            authzid, user, password = decode_plain(message)
        except RemoteProtocolError as exc:
            self.end_reason = "bad_syntax"
            self.conn.login_refused()
            return [SendToClient(err_line(str(exc)))]
        if authzid and authzid != user:
            # Logging in as someone else would bypass the per-user device check.
            self.end_reason = "authzid_refused"
            self.conn.login_refused()
            return [SendToClient(err_line("Authorization identity not supported"))]
        return self._login(user, password)

    def _login(self, user: str, password: str) -> list[PreauthCommand]:
        self.identity = Identity(user, self.device_id, "client_cert" if self.device_id else "",
                                 cert=self.cert)
        return [OpenUpstream(user, password)]


__all__ = [
    "GREETING_TEXT",
    "PERMANENT",
    "PRIVACY_TEXT",
    "PROXY_CAPABILITIES",
    "SHUTDOWN_TEXT",
    "TEMPORARY",
    "TIMEOUT_TEXT",
    "UNAVAILABLE_TEXT",
    "OpenUpstream",
    "Preauth",
    "PreauthCommand",
    "PreauthEvent",
    "UpstreamAnswered",
]
