"""Sans-IO parser and state machine for the pre-authentication part of IMAP.

This module contains no networking code. A :class:`Connection` takes the bytes a client
sent with :meth:`Connection.receive_data`, hands out events with
:meth:`Connection.next_event` (or :data:`NEED_DATA` / :data:`PAUSED`); replies are
built as bytes by the pure functions of ``imap_syntax`` (``tagged_line``,
``greeting_line``, ...). The I/O executor (``imap.py``) writes those bytes, talks to
the upstream and the gate, and tells the connection how things went
(:meth:`Connection.starttls_done`, :meth:`Connection.login_refused`,
:meth:`Connection.login_accepted`).

Only what a client may say before login is understood: CAPABILITY, NOOP, LOGOUT, ID
(RFC 2971), STARTTLS, LOGIN (atoms, quoted strings, literals ``{n}`` and ``{n+}``) and
AUTHENTICATE with the mechanisms of ``imap_sasl``, with or without an initial response
(RFC 4959), each further response line after :meth:`Connection.sasl_continue`. Anything else gets a
:class:`BadCommand`. Every buffer is bounded by the limits in ``imap_syntax``
(``MAX_LINE_BYTES`` and friends, re-exported here); exceeding one gives a
:class:`LimitExceeded` event, after which the connection is dead (the executor answers
and closes). Time limits (idle, total pre-auth time) belong to the executor: a sans-IO
parser has no clock.

Errors say whose fault they are: :class:`RemoteProtocolError` when the client's input
made the connection unusable (any input either parses or raises this, never anything
else), :class:`LocalProtocolError` when the caller reports an outcome the state does not
allow. Both are :class:`ImapProtocolError`.

States and transitions are ``preauth_wire``'s (:class:`State`, re-exported here, and
``TRANSITIONS``), shared with POP3: RFC 3501's "not authenticated" is
``State.COMMANDS``, "authenticated" is ``State.HANDED_OVER``. The lexer and the reply
builders live in ``imap_syntax``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Unpack

from proxy.frontends.events import NEED_DATA, PAUSED, Sentinel
from proxy.frontends.imap_syntax import (
    LITERAL_AT_END,
    LPAREN,
    MAX_COMMAND_BYTES,
    MAX_ID_FIELDS,
    MAX_LINE_BYTES,
    MAX_LITERAL_BYTES,
    RESERVED_TAG_PREFIX,
    RPAREN,
    SUPPORTED_MECHANISMS,
    TAG_RE,
    ImapProtocolError,
    LocalProtocolError,
    RemoteProtocolError,
    StringToken,
    SyntaxProblem,
    Token,
    astring,
    decode_plain,
    nstring,
    quote,
    sasl_base64,
    tokens,
)
from proxy.frontends.preauth_wire import MAX_PREAUTH_COMMANDS, ClientWire, State, WireOptions

# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Tagged:
    """The base of the client's events: the tag of its command. An event without
    fields of its own is a subclass of this one without a decorator."""

    tag: str


@dataclass(frozen=True, slots=True)
class CommandReceived(Tagged):
    """CAPABILITY, NOOP or LOGOUT: commands without arguments."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in ("CAPABILITY", "NOOP", "LOGOUT"):
            raise ValueError(f"not an argument-less command: {self.name}")


@dataclass(frozen=True, slots=True)
class IdReceived(Tagged):
    """RFC 2971 ID; ``fields`` is None for ``ID NIL``."""

    fields: tuple[tuple[str, str | None], ...] | None


class StartTlsRequested(Tagged):
    """STARTTLS: answer OK, run the handshake, then :meth:`Connection.starttls_done`."""


@dataclass(frozen=True, slots=True)
class LoginAttempted(Tagged):
    """LOGIN with a user name and a password."""

    user: str
    password: str = field(repr=False)  # never in logs or tracebacks


@dataclass(frozen=True, slots=True)
class AuthenticateStarted(Tagged):
    """AUTHENTICATE with a mechanism of ``SUPPORTED_MECHANISMS``. With an initial
    response the connection then waits for the outcome (a login result, or
    :meth:`Connection.sasl_continue` after a further challenge); without, the executor
    sends a challenge and an :class:`AuthenticateData` follows."""

    mechanism: str
    initial_response: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthenticateData(Tagged):
    """The client's response line to a SASL challenge, base64-decoded."""

    data: bytes = field(repr=False)


class AuthenticateCancelled(Tagged):
    """``*`` instead of a SASL response line."""


class PrivacyRequired(Tagged):
    """LOGIN announced a synchronizing literal before TLS: the command is dropped
    without ``+``, so the client is never invited to send its password in the clear
    (RFC 3501 7.5: after a tagged answer the client does not send the literal)."""


class ContinuationNeeded(Tagged):
    """A synchronizing literal within limits: send ``+ Ready`` so the client sends it."""


@dataclass(frozen=True, slots=True)
class BadCommand(Tagged):
    """Syntax error or a command not allowed before login: answer BAD, carry on. The
    tag is "*" when none could be read."""

    text: str


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """A size or count limit was broken: answer (BAD or BYE) and close; ``tag`` is None
    when none could be read."""

    tag: str | None
    limit: str  # "line", "literal", "command", "commands"
    text: str


Event = (
    CommandReceived
    | IdReceived
    | StartTlsRequested
    | LoginAttempted
    | AuthenticateStarted
    | AuthenticateData
    | AuthenticateCancelled
    | ContinuationNeeded
    | PrivacyRequired
    | BadCommand
    | LimitExceeded
)

# ------------------------------------------------------------------------- connection


class Connection(ClientWire):
    """Pre-auth IMAP server side of one client connection (see module docstring); the
    buffer and the state change through ``preauth_wire.TRANSITIONS`` are ``ClientWire``'s."""

    def __init__(self, **options: Unpack[WireOptions]) -> None:
        super().__init__(local_error=LocalProtocolError, **options)
        # The command being assembled: text segments and literals, in order.
        self._segments: list[bytes | StringToken] = []
        self._command_bytes = 0
        self._literal_left: int | None = None  # bytes still to read into a literal
        self._auth_tag = ""

    # ------------------------------------------------------------- input side

    def next_event(self) -> Event | Sentinel:
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection is unusable after a broken limit", reply="BYE")
        if self.paused:
            return PAUSED
        event = self._parse()
        if event is NEED_DATA:
            self._compact()
        return event

    # --------------------------------------------------------- executor calls

    def sasl_continue(self) -> None:
        """A SASL challenge was sent: read the client's next response line."""
        self._transition("sasl_continue")

    # ----------------------------------------------------------------- parsing

    def _parse(self) -> Event | Sentinel:
        while True:
            if self._literal_left is not None:
                avail = len(self._buf) - self._pos
                if avail < self._literal_left:
                    return NEED_DATA
                end = self._pos + self._literal_left
                self._segments.append(StringToken(bytes(self._buf[self._pos : end])))
                self._pos = end
                self._literal_left = None
            nl = self._buf.find(b"\n", self._pos, self._pos + MAX_LINE_BYTES)
            if nl < 0:
                if len(self._buf) - self._pos >= MAX_LINE_BYTES:
                    head = self._segments or [bytes(self._buf[self._pos : self._pos + 256])]
                    tag = self._current_tag_of(head)
                    return self._limit(tag, "line", "Command line too long")
                return NEED_DATA
            line = bytes(self._buf[self._pos : nl + 1])
            self._pos = nl + 1
            self._command_bytes += len(line)
            if self._command_bytes > MAX_COMMAND_BYTES:
                return self._limit(self._current_tag(), "command", "Command too long")
            if self.state is State.AUTHENTICATING:
                return self._sasl_response(line)
            m = LITERAL_AT_END.search(line)
            if m is None:
                self._segments.append(line.rstrip(b"\r\n"))
                return self._finish_command()
            size, non_sync = int(m.group(1)), m.group(2) == b"+"
            self._segments.append(line[: m.start()])
            if size > MAX_LITERAL_BYTES or self._command_bytes + size > MAX_COMMAND_BYTES:
                # No "+": a client waiting for it never sends the literal.
                return self._limit(self._current_tag(), "literal",
                                   f"Literal too large (limit {MAX_LITERAL_BYTES} bytes)")
            if not non_sync and not (self.tls or self.cleartext_login) and self._is_login():
                tag = self._current_tag() or "*"
                self._segments, self._command_bytes = [], 0
                self.commands += 1  # counted like any command, so bounded the same way
                return PrivacyRequired(tag)
            self._command_bytes += size
            self._literal_left = size
            if not non_sync:
                return ContinuationNeeded(self._current_tag() or "*")

    def _current_tag(self) -> str | None:
        return self._current_tag_of(self._segments)

    def _is_login(self) -> bool:
        first = self._segments[0] if self._segments else b""
        words = first.split(None, 2) if isinstance(first, bytes) else []
        return len(words) >= 2 and words[1].upper() == b"LOGIN"

    def _limit(self, tag: str | None, limit: str, text: str) -> LimitExceeded:
        self._break()
        self._segments = []
        return LimitExceeded(tag, limit, text)

    def _sasl_response(self, line: bytes) -> Event:
        self._segments = []
        self._command_bytes = 0
        tag = self._auth_tag
        data = line.rstrip(b"\r\n")
        if data == b"*":
            self._transition("sasl_cancelled")
            return AuthenticateCancelled(tag)
        try:
            decoded = sasl_base64(data) if data else b""
        except SyntaxProblem as exc:
            self._transition("bad_command")
            return BadCommand(tag, f"AUTHENTICATE: {exc}")
        self._transition("sasl_response")
        return AuthenticateData(tag, decoded)

    def _finish_command(self) -> Event:
        segments, self._segments, self._command_bytes = self._segments, [], 0
        tag = self._current_tag_of(segments)
        # Every line counts, so a flood of junk is bounded like a flood of NOOPs.
        self.commands += 1
        if self.commands > self.max_commands:
            return self._limit(tag, "commands", "Too many commands before login")
        if tag is None:
            if segments == [b""]:
                return BadCommand("*", "Empty command line")
            return BadCommand("*", "Missing or invalid tag")
        if tag.lower().startswith(RESERVED_TAG_PREFIX):
            return BadCommand(tag, "Tags starting with mw. are reserved")
        first = segments[0]
        assert isinstance(first, bytes)
        segments = [first[len(tag) + 1 :], *segments[1:]]
        try:
            return self._command(tag, segments)
        except SyntaxProblem as exc:
            return BadCommand(tag, str(exc))

    @staticmethod
    def _current_tag_of(segments: list[bytes | StringToken]) -> str | None:
        first = segments[0] if segments else b""
        if isinstance(first, StringToken):
            return None
        m = TAG_RE.match(first)
        if m is None or m.end() >= len(first) or first[m.end()] != 0x20:
            return None
        return m.group().decode("ascii")

    def _command(self, tag: str, segments: list[bytes | StringToken]) -> Event:
        toks = tokens(segments)
        if not toks or not isinstance(toks[0], bytes):
            raise SyntaxProblem("Missing command")
        name = toks[0].upper().decode("ascii", "replace")
        args = toks[1:]
        if name in ("CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"):
            if args:
                raise SyntaxProblem(f"{name} takes no arguments")
            if name == "STARTTLS":
                if self.tls:
                    raise SyntaxProblem("TLS is already active")
                if not self.starttls_available:
                    raise SyntaxProblem("STARTTLS is not available here")
                self._transition("starttls")
                return StartTlsRequested(tag)
            if name == "LOGOUT":
                self._transition("goodbye")
            return CommandReceived(tag, name)
        if name == "ID":
            return IdReceived(tag, self._id_fields(args))
        if name == "LOGIN":
            if len(args) != 2:
                raise SyntaxProblem("LOGIN needs a user name and a password")
            user, password = astring(args[0], "user name"), astring(args[1], "password")
            self._transition("login")
            return LoginAttempted(tag, user, password)
        if name == "AUTHENTICATE":
            return self._authenticate(tag, args)
        raise SyntaxProblem(f"Command {name[:32]} not allowed before login"
                      if name.isascii() and name.isprintable() else "Unknown command")

    def _authenticate(self, tag: str, args: list[Token]) -> Event:
        if not args or len(args) > 2 or not all(isinstance(a, bytes) for a in args):
            raise SyntaxProblem("AUTHENTICATE needs a mechanism and at most an initial response")
        mech = args[0].upper().decode("ascii", "replace")  # type: ignore[union-attr]
        if mech not in SUPPORTED_MECHANISMS:
            raise SyntaxProblem(f"Unsupported authentication mechanism {mech[:32]}")
        self._auth_tag = tag
        if len(args) == 2:
            ir = sasl_base64(args[1])  # type: ignore[arg-type]
            self._transition("sasl_start+ir")
            return AuthenticateStarted(tag, mech, ir)
        self._transition("sasl_start")
        return AuthenticateStarted(tag, mech, None)

    @staticmethod
    def _id_fields(args: list[Token]) -> tuple[tuple[str, str | None], ...] | None:
        if len(args) == 1 and isinstance(args[0], bytes) and args[0].upper() == b"NIL":
            return None
        if len(args) < 2 or args[0] is not LPAREN or args[-1] is not RPAREN:
            raise SyntaxProblem("ID needs NIL or a parenthesized list")
        inner = args[1:-1]
        if len(inner) % 2 or len(inner) > 2 * MAX_ID_FIELDS:
            raise SyntaxProblem("ID needs at most 30 field/value pairs")
        fields = []
        for k, v in zip(inner[::2], inner[1::2], strict=True):
            if not isinstance(k, StringToken):
                raise SyntaxProblem("ID field names are strings")
            fields.append((astring(k, "ID field")[:30], nstring(v, "ID value")))
        return tuple(fields)


__all__ = [
    "MAX_COMMAND_BYTES",
    "MAX_LINE_BYTES",
    "MAX_LITERAL_BYTES",
    "MAX_PREAUTH_COMMANDS",
    "NEED_DATA",
    "PAUSED",
    "AuthenticateCancelled",
    "AuthenticateData",
    "AuthenticateStarted",
    "BadCommand",
    "CommandReceived",
    "Connection",
    "ContinuationNeeded",
    "Event",
    "IdReceived",
    "ImapProtocolError",
    "LimitExceeded",
    "LocalProtocolError",
    "LoginAttempted",
    "PrivacyRequired",
    "RemoteProtocolError",
    "Sentinel",
    "StartTlsRequested",
    "State",
    "decode_plain",
    "quote",
]
