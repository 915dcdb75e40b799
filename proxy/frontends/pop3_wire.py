"""Sans-IO parser and state machine for the pre-authentication part of POP3.

This module contains no networking code. A :class:`Connection` takes the bytes a client
sent with :meth:`Connection.receive_data`, hands out events with
:meth:`Connection.next_event` (or :data:`NEED_DATA` / :data:`PAUSED`); replies are
built as bytes by this module's pure functions (:func:`ok_line`, :func:`err_line`,
:func:`capa_response`, ...). The conversation layer (``pop3_preauth``)
decides what to answer and tells the connection how things went
(:meth:`Connection.starttls_done`, :meth:`Connection.login_refused`,
:meth:`Connection.login_accepted`).

Only what a client may say in the AUTHORIZATION state is understood (RFC 1939, 2449,
2595, 5034): CAPA, QUIT, STLS, USER / PASS, and AUTH (without arguments: the mechanism
list; ``AUTH PLAIN`` with or without an initial response, ``=`` for an empty one, ``*``
to cancel). APOP is not offered (mailward needs the password to log in upstream), so it
and everything else get a :class:`BadCommand` (``-ERR``, the client may go on). Before
TLS, USER, PASS and ``AUTH PLAIN`` give :class:`PrivacyRequired` (unless the listener
allows cleartext on loopback). Every line counts towards the command limit, so a flood
of junk is bounded like a flood of CAPAs.

Limits are constants with units (:data:`MAX_LINE_BYTES`, :data:`MAX_PREAUTH_COMMANDS`);
breaking one gives a :class:`LimitExceeded` event, after which the connection is dead
(the layer answers ``-ERR`` and closes). Time limits belong to the executor: a sans-IO
parser has no clock.

Errors say whose fault they are: :class:`RemoteProtocolError` when the client's input
made the connection unusable (any input either parses or raises this, never anything
else), :class:`LocalProtocolError` when the caller reports an outcome the state does not
allow. Both are :class:`Pop3ProtocolError`.

RFC 1939's AUTHORIZATION state is ``State.COMMANDS`` here, and TRANSACTION is
``State.HANDED_OVER``: the machine (:class:`State`, re-exported here, and
``TRANSITIONS``) is the one ``preauth_wire`` shares with IMAP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Unpack

from proxy.frontends import sasl
from proxy.frontends.events import NEED_DATA, PAUSED, Credentials, Marker, SecretData, Sentinel
from proxy.frontends.preauth_wire import MAX_PREAUTH_COMMANDS, ClientWire, State, WireOptions
from proxy.frontends.smtp_replies import ascii_text

#: Longest command line before login, CRLF included (RFC 2449 says 255 octets; SASL
#: responses may be longer, and DESIGN.md allows 8 KiB before login on every protocol).
MAX_LINE_BYTES = 8 * 1024
#: Longest response line the proxy writes, CRLF included (RFC 2449 section 4).
MAX_RESPONSE_BYTES = 512
#: SASL mechanisms the proxy reads the user from (and the upstream verifies).
MECHANISMS = ("PLAIN",)
#: Commands of the TRANSACTION state: named in the answer when sent too early.
_TRANSACTION_COMMANDS = frozenset(
    {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "LAST"})
_COMMAND_NAME = re.compile(rb"[A-Za-z]{1,16}")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in arguments (TAB is allowed)


class Pop3ProtocolError(Exception):
    """The base of this module's errors."""


class RemoteProtocolError(Pop3ProtocolError):
    """The client's input made the connection unusable; answer ``-ERR`` and close."""


class LocalProtocolError(Pop3ProtocolError):
    """The caller reported an outcome the state does not allow (a bug, not input)."""


class SyntaxProblem(Exception):
    """A bad command: answered ``-ERR``, the conversation goes on (internal)."""


# ----------------------------------------------------------------------------- events


# NEED_DATA (``next_event`` needs more bytes from the client) and PAUSED (no events
# until an outcome is reported: STLS handshake, login result; or the conversation is
# over) are the sans-IO sentinels the wire parsers share (``events``).


class CapaRequested(Marker):
    """CAPA (RFC 2449)."""


class QuitRequested(Marker):
    """QUIT before login: answer +OK and close."""


class StlsRequested(Marker):
    """STLS (RFC 2595): answer +OK, then the handshake."""


@dataclass(frozen=True, slots=True)
class UserGiven:
    """USER: the name is kept for PASS; the proxy answers +OK itself."""

    user: str


class LoginAttempted(Credentials):
    """PASS after USER: the credentials are complete."""


class MechanismsRequested(Marker):
    """AUTH without arguments: list the SASL mechanisms (RFC 1734 style, as Dovecot)."""


@dataclass(frozen=True, slots=True)
class AuthStarted:
    """AUTH PLAIN. With an initial response the credentials are complete (the
    connection then waits for the login result); without, the layer sends
    :func:`continuation_line` and an :class:`AuthData` follows."""

    mechanism: str
    initial_response: bytes | None = field(repr=False)


class AuthData(SecretData):
    """The client's SASL response line, base64-decoded."""


class AuthCancelled(Marker):
    """``*`` instead of a SASL response (RFC 5034)."""


@dataclass(frozen=True, slots=True)
class PrivacyRequired:
    """USER, PASS or AUTH PLAIN before TLS: refused, never sent upstream."""

    command: str

    def __post_init__(self) -> None:
        if self.command not in ("USER", "PASS", "AUTH"):
            raise ValueError(f"not a command that carries credentials: {self.command}")


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A syntax error or a command not allowed before login: ``-ERR``, carry on."""

    text: str


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """A size or count limit was broken: answer ``-ERR`` and close."""

    limit: str  # "line", "commands"
    text: str


Event = (
    CapaRequested
    | QuitRequested
    | StlsRequested
    | UserGiven
    | LoginAttempted
    | MechanismsRequested
    | AuthStarted
    | AuthData
    | AuthCancelled
    | PrivacyRequired
    | BadCommand
    | LimitExceeded
)

# ------------------------------------------------------------------------ pure helpers


def sasl_base64(data: bytes) -> bytes:
    """A SASL initial response or response line, decoded (``=`` is empty, RFC 5034);
    not base64 is a ``SyntaxProblem`` (``-ERR``, carry on)."""
    return sasl.decode_base64(data, SyntaxProblem)


def decode_plain(message: bytes) -> tuple[str, str, str]:
    """RFC 4616 PLAIN message -> (authzid, authcid, password); a malformed one is the
    client's fault (``RemoteProtocolError``: the layer answers ``-ERR``)."""
    return sasl.decode_plain(message, RemoteProtocolError)


def response_text(text: str) -> str:
    """Text for one response line: ASCII, no control characters, and short enough
    that the line stays within :data:`MAX_RESPONSE_BYTES`."""
    safe = " ".join(ascii_text(text).split())
    return safe[: MAX_RESPONSE_BYTES - 32] or "."


def ok_line(text: str) -> bytes:
    return f"+OK {response_text(text)}\r\n".encode("ascii")


def err_line(text: str, code: str | None = None) -> bytes:
    """``-ERR [CODE] text``: RFC 2449 response codes (RESP-CODES, AUTH-RESP-CODE)."""
    prefix = f"[{code}] " if code else ""
    return f"-ERR {prefix}{response_text(text)}\r\n".encode("ascii")


def multiline(first: bytes, items: Iterable[str]) -> bytes:
    """A multi-line response: the status line, one line per item, then ``.``."""
    body = b"".join(response_text(i).encode("ascii") + b"\r\n" for i in items)
    return first + body + b".\r\n"


def capa_response(capabilities: Iterable[str]) -> bytes:
    return multiline(b"+OK Capability list follows\r\n", capabilities)


def mechanisms_response(mechanisms: Iterable[str]) -> bytes:
    return multiline(b"+OK\r\n", mechanisms)


def continuation_line() -> bytes:
    """The server's empty SASL challenge (RFC 5034: ``+`` then a space)."""
    return b"+ \r\n"


# ------------------------------------------------------------------------- connection


class Connection(ClientWire):
    """Pre-auth POP3 server side of one client connection (see module docstring); the
    buffer and the state change through ``preauth_wire.TRANSITIONS`` are ``ClientWire``'s."""

    def __init__(self, **options: Unpack[WireOptions]) -> None:
        super().__init__(local_error=LocalProtocolError, **options)
        self.user: str | None = None  # from USER, until PASS or a refused login

    # ------------------------------------------------------------- input side

    def next_event(self) -> Event | Sentinel:
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection is unusable after a broken limit")
        if self.paused:
            return PAUSED
        nl = self._buf.find(b"\n", self._pos, self._pos + MAX_LINE_BYTES)
        if nl < 0:
            if len(self._buf) - self._pos >= MAX_LINE_BYTES:
                return self._limit("line", "Command line too long")
            self._compact()
            return NEED_DATA
        line = bytes(self._buf[self._pos : nl]).removesuffix(b"\r")
        self._pos = nl + 1
        self.commands += 1
        if self.commands > self.max_commands:
            return self._limit("commands", "Too many commands before login")
        if self.state is State.AUTHENTICATING:
            return self._sasl_response(line)
        try:
            return self._command(line)
        except SyntaxProblem as exc:
            return BadCommand(str(exc))

    # --------------------------------------------------------- executor calls

    def starttls_done(self) -> None:
        """TLS is up after STLS: drop what the client pipelined, and a USER name."""
        super().starttls_done()
        self.user = None

    def login_refused(self) -> None:
        """The login failed or was refused; the client may try again (with a new USER)."""
        super().login_refused()
        self.user = None

    # ----------------------------------------------------------------- parsing

    def _limit(self, limit: str, text: str) -> LimitExceeded:
        self._break()
        return LimitExceeded(limit, text)

    def _cleartext_ok(self) -> bool:
        return self.tls or self.cleartext_login

    def _sasl_response(self, line: bytes) -> Event:
        if line == b"*":
            self._transition("sasl_cancelled")
            return AuthCancelled()
        try:
            decoded = sasl_base64(line) if line else b""
        except SyntaxProblem as exc:
            self._transition("bad_command")
            return BadCommand(f"AUTH: {exc}")
        self._transition("sasl_response")
        return AuthData(decoded)

    def _command(self, line: bytes) -> Event:
        name_bytes, _, arg = line.partition(b" ")
        if not _COMMAND_NAME.fullmatch(name_bytes):
            raise SyntaxProblem("Unknown command" if line.strip() else "Empty command line")
        name = name_bytes.upper().decode("ascii")
        if name in ("CAPA", "QUIT", "STLS") and arg.strip():
            raise SyntaxProblem(f"{name} takes no arguments")
        match name:
            case "CAPA":
                return CapaRequested()
            case "QUIT":
                self._transition("goodbye")
                return QuitRequested()
            case "STLS":
                return self._stls()
            case "USER":
                return self._user(arg)
            case "PASS":
                return self._pass(arg)
            case "AUTH":
                return self._auth(arg)
            case "APOP":
                raise SyntaxProblem("APOP is not supported; use USER/PASS or AUTH PLAIN")
        if name in _TRANSACTION_COMMANDS:
            raise SyntaxProblem(f"{name} is not allowed before login")
        raise SyntaxProblem("Unknown command")

    def _stls(self) -> Event:
        if self.tls:
            raise SyntaxProblem("TLS is already active")
        if not self.starttls_available:
            raise SyntaxProblem("STLS is not available here")
        self._transition("starttls")
        return StlsRequested()

    def _user(self, arg: bytes) -> Event:
        if not self._cleartext_ok():
            return PrivacyRequired("USER")
        if not arg or _CONTROL.search(arg):
            raise SyntaxProblem("USER needs a user name")
        try:
            self.user = arg.decode("utf-8")
        except UnicodeDecodeError:
            raise SyntaxProblem("The user name is not UTF-8") from None
        return UserGiven(self.user)

    def _pass(self, arg: bytes) -> Event:
        if not self._cleartext_ok():
            self.user = None
            return PrivacyRequired("PASS")
        if self.user is None:
            raise SyntaxProblem("No user name given; send USER first")
        if b"\x00" in arg:
            raise SyntaxProblem("Invalid password")
        user, self.user = self.user, None
        self._transition("login")
        # The rest of the line, spaces included (passwords may contain them); bytes
        # that are not UTF-8 survive the round trip to the upstream unchanged.
        return LoginAttempted(user, arg.decode("utf-8", "surrogateescape"))

    def _auth(self, arg: bytes) -> Event:
        words = arg.split()
        if not words:
            return MechanismsRequested()
        if len(words) > 2:
            raise SyntaxProblem("AUTH needs a mechanism and at most an initial response")
        mech = words[0].upper().decode("ascii", "replace")
        if mech not in MECHANISMS:
            raise SyntaxProblem("Unsupported authentication mechanism")
        if not self._cleartext_ok():
            return PrivacyRequired("AUTH")
        if len(words) == 2:
            ir = sasl_base64(words[1])
            self._transition("sasl_start+ir")
            return AuthStarted(mech, ir)
        self._transition("sasl_start")
        return AuthStarted(mech, None)


__all__ = [
    "MAX_LINE_BYTES",
    "MAX_PREAUTH_COMMANDS",
    "MAX_RESPONSE_BYTES",
    "MECHANISMS",
    "NEED_DATA",
    "PAUSED",
    "AuthCancelled",
    "AuthData",
    "AuthStarted",
    "BadCommand",
    "CapaRequested",
    "Connection",
    "Event",
    "LimitExceeded",
    "LocalProtocolError",
    "LoginAttempted",
    "MechanismsRequested",
    "Pop3ProtocolError",
    "PrivacyRequired",
    "QuitRequested",
    "RemoteProtocolError",
    "Sentinel",
    "State",
    "StlsRequested",
    "UserGiven",
    "capa_response",
    "continuation_line",
    "decode_plain",
    "err_line",
    "mechanisms_response",
    "ok_line",
    "response_text",
    "sasl_base64",
]
