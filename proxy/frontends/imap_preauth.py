"""The IMAP pre-auth conversation as a sans-IO layer: events in, commands out.

As mitmproxy's layers: :class:`Preauth` holds the state of one client connection before
login and has no I/O, no clock and no ``await``. The executor (``imap.py``) feeds it
events, past tense (:class:`Connected`, :class:`DataReceived`, :class:`TlsEstablished`,
:class:`UpstreamAnswered`, :class:`DecisionMade`, :class:`TimedOut`, ...), and performs
the commands it returns, imperative (:class:`SendToClient`, :class:`StartTls`,
:class:`OpenUpstream`, :class:`RequestDecision`, :class:`Splice`, :class:`Close`, ...),
in order. A command that has an outcome (``StartTls``, ``OpenUpstream``,
``RequestDecision``) is the last of its list; the executor feeds the outcome back as
the next event. Client bytes go through the sans-IO parser ``imap_wire.Connection``;
what every protocol does alike (the session events, the records rule: one ``decision``
record per login attempt, else one ``session_end``) is ``preauth_layer.PreauthLayer``'s.

The rules (DESIGN.md, "Sessions, in order"):

- Before TLS, CAPABILITY shows STARTTLS and LOGINDISABLED, and LOGIN / AUTHENTICATE get
  ``NO [PRIVACYREQUIRED]`` without reaching the upstream or the gate (unless cleartext is
  allowed on loopback). Bytes pipelined after STARTTLS are discarded by the parser.
- The upstream checks the credentials first: its NO goes to the client as it is and is
  recorded as ``auth_failed``; the client may try again.
- Only then the gate decides. Deny: ``* NO [ALERT]``, ``NO [AUTHORIZATIONFAILED]``,
  ``* BYE``, all three with the same short reason (``imap_syntax.refusal_text``):
  clients that retry on the same connection show only the last line they read.
  Temporary deny: ``NO [UNAVAILABLE]``, the client may retry. Upstream unreachable:
  ``NO [UNAVAILABLE]``, ``* BYE``, a temporary deny record. Allow: the upstream's
  answer goes to the client and the connections are spliced; a warning that comes
  with the allow (a rule's ``enforce_from`` is ahead, rationed by ``proxy.notify``)
  goes first, as ``* OK [ALERT] <warning with the date>``.
- ``AUTHENTICATE``: the mechanisms of ``imap_sasl`` that the upstream offers (PLAIN
  always: it is relayed as ``LOGIN``); the exchange reads the user, the upstream
  verifies the credentials.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from proxy.frontends.events import (
    ClientClosed,
    Close,
    CloseUpstream,
    Connected,
    Crashed,
    DataReceived,
    DecisionMade,
    RecordAuthFailed,
    RecordUnavailable,
    RequestDecision,
    SendToClient,
    SessionCommand,
    SessionEnd,
    SessionEvent,
    ShutdownRequested,
    Splice,
    StartTls,
    TimedOut,
    TlsEstablished,
    TlsFailed,
    UpstreamFailed,
)
from proxy.frontends.imap_sasl import Challenge, Credentials, SaslExchange, SaslRefused
from proxy.frontends.imap_syntax import (
    RemoteProtocolError,
    bye_line,
    capability_line,
    continuation_line,
    greeting_line,
    id_line,
    refusal_text,
    tagged_line,
    untagged_line,
)
from proxy.frontends.imap_wire import (
    AuthenticateCancelled,
    AuthenticateData,
    AuthenticateStarted,
    BadCommand,
    CommandReceived,
    Connection,
    ContinuationNeeded,
    Event,
    IdReceived,
    LimitExceeded,
    LoginAttempted,
    PrivacyRequired,
    StartTlsRequested,
)
from proxy.frontends.preauth_layer import PreauthLayer
from proxy.gate import Identity
from proxy.policy import Decision

#: Capabilities the proxy itself implements before login.
PROXY_CAPABILITIES = ("IMAP4rev1", "SASL-IR", "LITERAL+", "ID")
UNAVAILABLE_TEXT = "The mail server is temporarily unavailable. Please try again later."
SHUTDOWN_TEXT = "Server shutting down"
PRIVACY_TEXT = "Use STARTTLS or the TLS port before logging in"
TIMEOUT_TEXT = "Autologout; too slow before login"
#: Mechanisms offered whatever the upstream says: PLAIN goes upstream as ``LOGIN``.
OWN_MECHANISMS = ("PLAIN",)

# ---------------------------------------------------------------- events and commands
# The session's events and commands are protocol-neutral (``events``), except the two
# that carry the login: the client's tag, and the upstream's tagged answer.


@dataclass(frozen=True, slots=True)
class UpstreamAnswered:
    """The upstream's tagged answer to the login (untagged lines before it)."""

    ok: bool
    untagged: bytes
    tagged: bytes


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Connect upstream and log in (``imap_upstream``); then feed UpstreamAnswered or
    UpstreamFailed. ``mechanism`` empty: ``LOGIN`` with the password; else
    ``AUTHENTICATE <mechanism>`` relaying the client's ``response`` (a token)."""

    tag: str
    user: str
    password: str = field(repr=False)
    client_id: tuple[tuple[str, str | None], ...] | None = None
    mechanism: str = ""
    response: bytes = field(default=b"", repr=False)


PreauthEvent = SessionEvent | UpstreamAnswered
PreauthCommand = SessionCommand | OpenUpstream

# ------------------------------------------------------------------------------- layer


class Preauth(PreauthLayer):
    """One client connection before login (see the module docstring)."""

    conn: Connection

    def __init__(self, *, tls_mode: str, cleartext_allowed: bool, max_commands: int,
                 upstream_capabilities: Callable[[], Sequence[str]] = tuple,
                 upstream_mechanisms: Callable[[], Sequence[str]] = tuple) -> None:
        super().__init__(Connection(max_commands=max_commands, tls=False,
                                    starttls=tls_mode == "starttls",
                                    cleartext_login=cleartext_allowed),
                         tls_mode=tls_mode, upstream_capabilities=upstream_capabilities)
        self.cleartext_allowed = cleartext_allowed
        self.upstream_mechanisms = upstream_mechanisms  # relayable ones it offers
        self._sasl: SaslExchange | None = None  # the AUTHENTICATE exchange in progress
        self.client_id: tuple[tuple[str, str | None], ...] | None = None
        self._tag = ""  # of the login attempt in flight

    def capabilities(self) -> list[str]:
        caps = list(PROXY_CAPABILITIES)
        if not self.conn.tls and self.tls_mode == "starttls":
            caps.append("STARTTLS")
        if self._cleartext_ok():
            caps += [f"AUTH={m}" for m in self.mechanisms()]
        else:
            caps.append("LOGINDISABLED")
        return caps + list(self.upstream_capabilities())

    def mechanisms(self) -> list[str]:
        """SASL mechanisms offered: PLAIN, and the relayable ones the upstream has."""
        return [*OWN_MECHANISMS, *self.upstream_mechanisms()]

    def _cleartext_ok(self) -> bool:
        return self.conn.tls or self.cleartext_allowed

    # ------------------------------------------------------------------ events

    def _greeting(self) -> bytes:
        return greeting_line(self.capabilities())

    def _unavailable_reply(self) -> bytes:
        return (tagged_line(self._tag, "NO", UNAVAILABLE_TEXT, "UNAVAILABLE")
                + bye_line(UNAVAILABLE_TEXT))

    def _timeout_reply(self) -> bytes:
        return bye_line(TIMEOUT_TEXT)

    def _shutdown_reply(self) -> bytes:
        return bye_line(SHUTDOWN_TEXT)

    def _upstream_answered(self, event: UpstreamAnswered) -> list[PreauthCommand]:
        # A refusal is the tagged NO alone, e.g. NO [AUTHENTICATIONFAILED].
        answer = event.untagged + event.tagged if event.ok else event.tagged
        return self._login_answered(event.ok, answer)

    def _decided(self, decision: Decision, shutting_down: bool,
                 alert: str = "") -> list[PreauthCommand]:
        self.decided = True
        tag = self._tag
        if not decision.allow:
            text = refusal_text(decision.user_text())
            if decision.temporary:
                self.conn.login_refused()
                return [CloseUpstream(), SendToClient(tagged_line(tag, "NO", text, "UNAVAILABLE")),
                        *self._drain()]
            return [CloseUpstream(),
                    SendToClient(untagged_line("NO", text, "ALERT")
                                 + tagged_line(tag, "NO", text, "AUTHORIZATIONFAILED")
                                 + bye_line(text)),
                    *self._close("denied")]
        if shutting_down:
            return [CloseUpstream(),
                    SendToClient(tagged_line(tag, "NO", UNAVAILABLE_TEXT, "UNAVAILABLE")
                                 + bye_line(SHUTDOWN_TEXT)),
                    *self._close("shutdown")]
        self.finished = True
        answer, self._answer = self._answer, b""
        if alert:  # untagged, before the tagged OK: clients show it as the login's
            answer = untagged_line("OK", refusal_text(alert), "ALERT") + answer
        return [Splice(answer, self.conn.login_accepted(), self.identity)]

    # ------------------------------------------------------------ client commands

    def _client_event(self, ev: Event) -> list[PreauthCommand]:
        """One parsed client command -> commands (login and limits in their methods)."""
        match ev:
            case CommandReceived(tag, "CAPABILITY"):
                return [SendToClient(capability_line(self.capabilities())
                                     + tagged_line(tag, "OK", "CAPABILITY completed"))]
            case CommandReceived(tag, "NOOP"):
                return [SendToClient(tagged_line(tag, "OK", "NOOP completed"))]
            case CommandReceived(tag, _):  # LOGOUT
                return [SendToClient(bye_line("Logging out")
                                     + tagged_line(tag, "OK", "LOGOUT completed")),
                        *self._close("logout")]
            case IdReceived(tag, fields):
                self.client_id = fields
                return [SendToClient(id_line({"name": "mailward"})
                                     + tagged_line(tag, "OK", "ID completed"))]
            case StartTlsRequested(tag):
                return [SendToClient(tagged_line(tag, "OK", "Begin TLS negotiation now")),
                        StartTls()]
            case ContinuationNeeded():
                return [SendToClient(continuation_line("Ready"))]
            case PrivacyRequired(tag):  # dropped by the parser: no LOGIN state to leave
                return [self._privacy_required(tag)]
            case LoginAttempted(tag, user, password):
                return self._login(tag, Credentials(user, password))
            case AuthenticateStarted(tag, mechanism, initial_response):
                return self._authenticate_started(tag, mechanism, initial_response)
            case AuthenticateData(tag, data):
                return self._authenticate(tag, data)
            case AuthenticateCancelled(tag):
                self._sasl = None
                return [SendToClient(tagged_line(tag, "BAD", "AUTHENTICATE cancelled"))]
            case BadCommand(tag, text):
                self._sasl = None  # e.g. bad base64 ended an AUTHENTICATE exchange
                self.end_reason = "bad_syntax"
                return [SendToClient(tagged_line(tag, "BAD", text))]
            case LimitExceeded(tag, limit, text):
                reply = tagged_line(tag, "BAD", text) if tag else b""
                return [SendToClient(reply + bye_line(text)), *self._close(f"limit_{limit}")]
        raise AssertionError(f"unhandled parser event {ev!r}")  # pragma: no cover

    def _privacy_required(self, tag: str) -> SendToClient:
        self.end_reason = "cleartext_refused"
        return SendToClient(tagged_line(tag, "NO", PRIVACY_TEXT, "PRIVACYREQUIRED"))

    def _refuse_cleartext(self, tag: str) -> list[PreauthCommand]:
        self.conn.login_refused()
        return [self._privacy_required(tag)]

    def _authenticate_started(self, tag: str, mechanism: str,
                              initial_response: bytes | None) -> list[PreauthCommand]:
        if not self._cleartext_ok():
            return self._refuse_cleartext(tag)
        if mechanism not in self.mechanisms():  # parsed, but the upstream lacks it
            self.end_reason = "bad_syntax"
            self.conn.login_refused()
            return [SendToClient(tagged_line(
                tag, "BAD", f"Unsupported authentication mechanism {mechanism}"))]
        self._sasl = SaslExchange(mechanism)
        if initial_response is None:
            return [_challenge(self._sasl.start())]
        return self._authenticate(tag, initial_response)

    def _authenticate(self, tag: str, message: bytes) -> list[PreauthCommand]:
        """One client response of the exchange: a further challenge, or the login."""
        sasl = self._sasl
        assert sasl is not None  # the parser emits AuthenticateData only after a start
        try:
            result = sasl.step(message)
        except RemoteProtocolError as exc:
            self._sasl = None
            self.end_reason = exc.reason if isinstance(exc, SaslRefused) else "bad_syntax"
            self.conn.login_refused()
            return [SendToClient(tagged_line(tag, exc.reply, str(exc), exc.code))]
        if isinstance(result, Challenge):
            self.conn.sasl_continue()
            return [_challenge(result)]
        self._sasl = None
        return self._login(tag, result)

    def _login(self, tag: str, cred: Credentials) -> list[PreauthCommand]:
        if not self._cleartext_ok():
            return self._refuse_cleartext(tag)
        self._tag = tag
        self.identity = Identity(cred.user, self.device_id,
                                 "client_cert" if self.device_id else "", cert=self.cert)
        return [OpenUpstream(tag, cred.user, cred.password, self.client_id, cred.mechanism,
                             cred.response)]


def _challenge(challenge: Challenge) -> SendToClient:
    """``+ <base64>`` (``+ `` alone for an empty challenge)."""
    return SendToClient(b"+ " + base64.b64encode(challenge.data) + b"\r\n")


__all__ = [
    "OWN_MECHANISMS",
    "PROXY_CAPABILITIES",
    "SHUTDOWN_TEXT",
    "UNAVAILABLE_TEXT",
    "ClientClosed",
    "Close",
    "CloseUpstream",
    "Connected",
    "Crashed",
    "DataReceived",
    "DecisionMade",
    "OpenUpstream",
    "Preauth",
    "PreauthCommand",
    "PreauthEvent",
    "RecordAuthFailed",
    "RecordUnavailable",
    "RequestDecision",
    "SendToClient",
    "SessionEnd",
    "ShutdownRequested",
    "Splice",
    "StartTls",
    "TimedOut",
    "TlsEstablished",
    "TlsFailed",
    "UpstreamAnswered",
    "UpstreamFailed",
]
