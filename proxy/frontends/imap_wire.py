"""Sans-IO parser and state machine for the pre-authentication part of IMAP.

This module contains no networking code. A :class:`Connection` takes the bytes a client
sent with :meth:`Connection.receive_data`, hands out events with
:meth:`Connection.next_event` (or :data:`NEED_DATA` / :data:`PAUSED`), and its
``send_*`` helpers turn replies into bytes. The I/O executor (``imap.py``) writes those
bytes, talks to the upstream and the gate, and tells the connection how things went
(:meth:`Connection.starttls_done`, :meth:`Connection.login_refused`,
:meth:`Connection.login_accepted`).

Only what a client may say before login is understood: CAPABILITY, NOOP, LOGOUT, ID
(RFC 2971), STARTTLS, LOGIN (atoms, quoted strings, literals ``{n}`` and ``{n+}``) and
AUTHENTICATE PLAIN with or without an initial response (RFC 4959). Anything else gets a
:class:`BadCommand`. Every buffer is bounded by the limits below; exceeding one gives a
:class:`LimitExceeded` event, after which the connection is dead (the executor answers
and closes). Time limits (idle, total pre-auth time) belong to the executor: a sans-IO
parser has no clock.

Everything that affects the state machine lives in :data:`TRANSITIONS` and the methods
that use it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------- limits

#: Longest command line (without literals), CRLF included.
MAX_LINE_BYTES = 8 * 1024
#: Largest literal accepted before login (LOGIN user/password, ID values).
MAX_LITERAL_BYTES = 8 * 1024
#: Largest whole command, lines plus literals (bounds a command built of many literals).
MAX_COMMAND_BYTES = 4 * 8 * 1024
#: Default number of commands a client may send before it is logged in.
MAX_PREAUTH_COMMANDS = 50
#: RFC 2971: at most 30 field/value pairs in an ID command.
MAX_ID_FIELDS = 30
#: Tags the proxy uses for its own upstream commands; a client may not use them, or an
#: answer meant for the proxy could pass for the answer to the client's LOGIN.
RESERVED_TAG_PREFIX = "mw."
#: Mechanisms this proxy can relay (it needs the password to log in upstream).
SUPPORTED_MECHANISMS = ("PLAIN",)


class ImapProtocolError(Exception):
    """The connection cannot be used any more: the peer broke a limit earlier or the
    caller used the connection in a state that does not allow it."""


# ----------------------------------------------------------------------------- events


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_event`` needs more bytes from the client.
NEED_DATA = _Sentinel("NEED_DATA")
#: ``next_event`` will not produce events until the executor reports an outcome
#: (STARTTLS handshake, login result) or because the conversation is over.
PAUSED = _Sentinel("PAUSED")


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """CAPABILITY, NOOP or LOGOUT: commands without arguments."""

    tag: str
    name: str

    def __post_init__(self) -> None:
        if self.name not in ("CAPABILITY", "NOOP", "LOGOUT"):
            raise ValueError(f"not an argument-less command: {self.name}")


@dataclass(frozen=True, slots=True)
class IdReceived:
    """RFC 2971 ID; ``fields`` is None for ``ID NIL``."""

    tag: str
    fields: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True, slots=True)
class StartTlsRequested:
    tag: str


@dataclass(frozen=True, slots=True)
class LoginAttempted:
    tag: str
    user: str
    password: str = field(repr=False)  # never in logs or tracebacks


@dataclass(frozen=True, slots=True)
class AuthenticateStarted:
    """AUTHENTICATE PLAIN. With an initial response the credentials are complete (the
    connection then waits for the login result); without, the executor sends
    :meth:`Connection.send_continuation` and an :class:`AuthenticateData` follows."""

    tag: str
    mechanism: str
    initial_response: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthenticateData:
    tag: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthenticateCancelled:
    tag: str


@dataclass(frozen=True, slots=True)
class PrivacyRequired:
    """LOGIN announced a synchronizing literal before TLS: the command is dropped
    without ``+``, so the client is never invited to send its password in the clear
    (RFC 3501 7.5: after a tagged answer the client does not send the literal)."""

    tag: str


@dataclass(frozen=True, slots=True)
class ContinuationNeeded:
    """A synchronizing literal within limits: send ``+ Ready`` so the client sends it."""

    tag: str


@dataclass(frozen=True, slots=True)
class BadCommand:
    """Syntax error or a command not allowed before login: answer BAD, carry on."""

    tag: str  # "*" when no tag could be read
    text: str


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """A size or count limit was broken: answer (BAD or BYE) and close."""

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
    | BadCommand
    | LimitExceeded
)

# ----------------------------------------------------------------------------- states


class State(enum.Enum):
    NOT_AUTHENTICATED = "not_authenticated"  # reading commands
    AUTHENTICATING = "authenticating"  # reading one SASL response line
    STARTTLS = "starttls"  # handshake in progress; buffered bytes will be discarded
    AWAITING_LOGIN = "awaiting_login"  # credentials handed out; waiting for the result
    AUTHENTICATED = "authenticated"  # handed over to the upstream; parser done
    LOGGED_OUT = "logged_out"
    ERROR = "error"  # a limit was broken


#: (state, trigger) -> next state. Triggers are event class names or executor calls.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.NOT_AUTHENTICATED, "StartTlsRequested"): State.STARTTLS,
    (State.NOT_AUTHENTICATED, "LoginAttempted"): State.AWAITING_LOGIN,
    (State.NOT_AUTHENTICATED, "AuthenticateStarted+ir"): State.AWAITING_LOGIN,
    (State.NOT_AUTHENTICATED, "AuthenticateStarted"): State.AUTHENTICATING,
    (State.NOT_AUTHENTICATED, "LOGOUT"): State.LOGGED_OUT,
    (State.NOT_AUTHENTICATED, "LimitExceeded"): State.ERROR,
    (State.AUTHENTICATING, "AuthenticateData"): State.AWAITING_LOGIN,
    (State.AUTHENTICATING, "AuthenticateCancelled"): State.NOT_AUTHENTICATED,
    (State.AUTHENTICATING, "BadCommand"): State.NOT_AUTHENTICATED,
    (State.AUTHENTICATING, "LimitExceeded"): State.ERROR,
    (State.AUTHENTICATING, "login_refused"): State.NOT_AUTHENTICATED,  # e.g. no TLS yet
    (State.STARTTLS, "starttls_done"): State.NOT_AUTHENTICATED,
    (State.AWAITING_LOGIN, "login_refused"): State.NOT_AUTHENTICATED,
    (State.AWAITING_LOGIN, "login_accepted"): State.AUTHENTICATED,
}

# ----------------------------------------------------------------------------- lexing

_LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}\r?\n\Z")
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
_TAG_RE = re.compile(rb"[!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+")  # ASTRING-CHAR minus "+"


class _Syntax(Exception):
    """Internal: a command is malformed (becomes a BadCommand)."""


@dataclass(frozen=True, slots=True)
class _Literal:
    data: bytes


_LPAREN, _RPAREN = object(), object()
_Token = bytes | _Literal | object  # atom bytes, string, or a paren marker


def _tokens(segments: list[bytes | _Literal]) -> list[_Token]:
    """Split a command (text segments and literals, in order) into tokens. A quoted
    string becomes a ``_Literal`` too: both are strings, unlike atoms."""
    out: list[_Token] = []
    for seg in segments:
        if isinstance(seg, _Literal):
            out.append(seg)
            continue
        i, n = 0, len(seg)
        while i < n:
            c = seg[i]
            if c == 0x20:
                i += 1
            elif c == 0x28:
                out.append(_LPAREN)
                i += 1
            elif c == 0x29:
                out.append(_RPAREN)
                i += 1
            elif c == 0x22:
                buf = bytearray()
                i += 1
                while True:
                    if i >= n:
                        raise _Syntax("unterminated quoted string")
                    c = seg[i]
                    if c == 0x5C:
                        if i + 1 >= n or seg[i + 1] not in (0x22, 0x5C):
                            raise _Syntax("bad escape in quoted string")
                        buf.append(seg[i + 1])
                        i += 2
                    elif c == 0x22:
                        i += 1
                        break
                    elif c in (0x0D, 0x0A, 0x00):
                        raise _Syntax("bad character in quoted string")
                    else:
                        buf.append(c)
                        i += 1
                out.append(_Literal(bytes(buf)))
            else:
                start = i
                while i < n and seg[i] not in _ATOM_SPECIALS:
                    i += 1
                if i == start:
                    raise _Syntax(f"unexpected character {chr(c)!r}")
                out.append(seg[start:i])
    return out


def _text(tok: _Token, what: str) -> str:
    """An astring as text: atom or string, UTF-8."""
    if isinstance(tok, _Literal):
        raw = tok.data
    elif isinstance(tok, bytes):
        raw = tok
    else:
        raise _Syntax(f"{what}: expected a string")
    if b"\x00" in raw:
        raise _Syntax(f"{what}: NUL is not allowed")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Syntax(f"{what}: not UTF-8") from None


def _nstring(tok: _Token, what: str) -> str | None:
    if isinstance(tok, bytes) and tok.upper() == b"NIL":
        return None
    if not isinstance(tok, _Literal):
        raise _Syntax(f"{what}: expected a string or NIL")
    return _text(tok, what)


def decode_plain(message: bytes) -> tuple[str, str, str]:
    """RFC 4616 PLAIN message -> (authzid, authcid, password)."""
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise ImapProtocolError("malformed PLAIN credentials")
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise ImapProtocolError("PLAIN credentials are not UTF-8") from None
    return authzid, authcid, password


def _b64(data: bytes) -> bytes:
    if data == b"=":  # RFC 4959: "=" is an empty initial response
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _Syntax("invalid base64") from None


# ------------------------------------------------------------------------- connection


class Connection:
    """Pre-auth IMAP server side of one client connection (see module docstring)."""

    def __init__(
        self,
        *,
        max_commands: int = MAX_PREAUTH_COMMANDS,
        tls: bool = False,
        starttls: bool = True,
        cleartext_login: bool = False,
    ) -> None:
        self.state = State.NOT_AUTHENTICATED
        self.tls = tls
        self.cleartext_login = cleartext_login  # config allows LOGIN before TLS
        self.starttls_available = starttls
        self.max_commands = max_commands
        self.commands = 0
        self._buf = bytearray()
        self._pos = 0  # start of unparsed data in _buf
        # The command being assembled: text segments and literals, in order.
        self._segments: list[bytes | _Literal] = []
        self._command_bytes = 0
        self._literal_left: int | None = None  # bytes still to read into a literal
        self._literal_sync_pending = False
        self._auth_tag = ""

    # ------------------------------------------------------------- input side

    @property
    def buffered(self) -> int:
        """Unparsed bytes held (the executor pauses reading when this grows)."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client."""
        if self.state in (State.ERROR, State.AUTHENTICATED, State.LOGGED_OUT):
            return  # nothing more will be parsed; dropping keeps memory bounded
        if self.state is State.STARTTLS:
            return  # pipelined after STARTTLS: discarded (STARTTLS injection)
        self._buf += data

    def next_event(self) -> Event | _Sentinel:
        if self.state is State.ERROR:
            raise ImapProtocolError("connection is unusable after a broken limit")
        if self.state in (State.STARTTLS, State.AWAITING_LOGIN, State.AUTHENTICATED,
                          State.LOGGED_OUT):
            return PAUSED
        event = self._parse()
        if event is NEED_DATA and self._pos:
            # compact so the buffer holds only unparsed bytes
            del self._buf[: self._pos]
            self._pos = 0
        return event

    # --------------------------------------------------------- executor calls

    def starttls_done(self) -> None:
        """TLS is up: drop everything the client pipelined after STARTTLS."""
        self._transition("starttls_done")
        self.tls = True
        self._buf.clear()
        self._pos = 0

    def login_refused(self) -> None:
        self._transition("login_refused")

    def login_accepted(self) -> bytes:
        """Hand over to the upstream; returns bytes the client pipelined after login."""
        self._transition("login_accepted")
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def _transition(self, trigger: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise ImapProtocolError(f"{trigger} not allowed in state {self.state.value}") from None

    # ----------------------------------------------------------------- parsing

    def _parse(self) -> Event | _Sentinel:
        while True:
            if self._literal_left is not None:
                avail = len(self._buf) - self._pos
                if avail < self._literal_left:
                    return NEED_DATA
                end = self._pos + self._literal_left
                self._segments.append(_Literal(bytes(self._buf[self._pos : end])))
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
            m = _LITERAL_AT_END.search(line)
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
        self.state = TRANSITIONS[(self.state, "LimitExceeded")]
        self._buf.clear()
        self._pos = 0
        self._segments = []
        return LimitExceeded(tag, limit, text)

    def _sasl_response(self, line: bytes) -> Event:
        self._segments = []
        self._command_bytes = 0
        tag = self._auth_tag
        data = line.rstrip(b"\r\n")
        if data == b"*":
            self._transition("AuthenticateCancelled")
            return AuthenticateCancelled(tag)
        try:
            decoded = _b64(data) if data else b""
        except _Syntax as exc:
            self._transition("BadCommand")
            return BadCommand(tag, f"AUTHENTICATE: {exc}")
        self._transition("AuthenticateData")
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
        except _Syntax as exc:
            return BadCommand(tag, str(exc))

    @staticmethod
    def _current_tag_of(segments: list[bytes | _Literal]) -> str | None:
        first = segments[0] if segments else b""
        if isinstance(first, _Literal):
            return None
        m = _TAG_RE.match(first)
        if m is None or m.end() >= len(first) or first[m.end()] != 0x20:
            return None
        return m.group().decode("ascii")

    def _command(self, tag: str, segments: list[bytes | _Literal]) -> Event:
        toks = _tokens(segments)
        if not toks or not isinstance(toks[0], bytes):
            raise _Syntax("Missing command")
        name = toks[0].upper().decode("ascii", "replace")
        args = toks[1:]
        if name in ("CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"):
            if args:
                raise _Syntax(f"{name} takes no arguments")
            if name == "STARTTLS":
                if self.tls:
                    raise _Syntax("TLS is already active")
                if not self.starttls_available:
                    raise _Syntax("STARTTLS is not available here")
                self._transition("StartTlsRequested")
                return StartTlsRequested(tag)
            if name == "LOGOUT":
                self._transition("LOGOUT")
            return CommandReceived(tag, name)
        if name == "ID":
            return IdReceived(tag, self._id_fields(args))
        if name == "LOGIN":
            if len(args) != 2:
                raise _Syntax("LOGIN needs a user name and a password")
            user, password = _text(args[0], "user name"), _text(args[1], "password")
            self._transition("LoginAttempted")
            return LoginAttempted(tag, user, password)
        if name == "AUTHENTICATE":
            return self._authenticate(tag, args)
        raise _Syntax(f"Command {name[:32]} not allowed before login"
                      if name.isascii() and name.isprintable() else "Unknown command")

    def _authenticate(self, tag: str, args: list[_Token]) -> Event:
        if not args or len(args) > 2 or not all(isinstance(a, bytes) for a in args):
            raise _Syntax("AUTHENTICATE needs a mechanism and at most an initial response")
        mech = args[0].upper().decode("ascii", "replace")  # type: ignore[union-attr]
        if mech not in SUPPORTED_MECHANISMS:
            raise _Syntax(f"Unsupported authentication mechanism {mech[:32]}")
        if len(args) == 2:
            ir = _b64(args[1])  # type: ignore[arg-type]
            self._transition("AuthenticateStarted+ir")
            return AuthenticateStarted(tag, mech, ir)
        self._transition("AuthenticateStarted")
        self._auth_tag = tag
        return AuthenticateStarted(tag, mech, None)

    @staticmethod
    def _id_fields(args: list[_Token]) -> tuple[tuple[str, str | None], ...] | None:
        if len(args) == 1 and isinstance(args[0], bytes) and args[0].upper() == b"NIL":
            return None
        if len(args) < 2 or args[0] is not _LPAREN or args[-1] is not _RPAREN:
            raise _Syntax("ID needs NIL or a parenthesized list")
        inner = args[1:-1]
        if len(inner) % 2 or len(inner) > 2 * MAX_ID_FIELDS:
            raise _Syntax("ID needs at most 30 field/value pairs")
        fields = []
        for k, v in zip(inner[::2], inner[1::2], strict=True):
            if not isinstance(k, _Literal):
                raise _Syntax("ID field names are strings")
            fields.append((_text(k, "ID field")[:30], _nstring(v, "ID value")))
        return tuple(fields)

    # ------------------------------------------------------------ output side

    @staticmethod
    def send_greeting(capabilities: list[str], text: str = "mailward ready") -> bytes:
        return b"* OK [CAPABILITY " + " ".join(capabilities).encode() + b"] " + _clean(text)

    @staticmethod
    def send_capability(capabilities: list[str]) -> bytes:
        return b"* CAPABILITY " + " ".join(capabilities).encode() + b"\r\n"

    @staticmethod
    def send_tagged(tag: str | None, status: str, text: str, code: str = "") -> bytes:
        head = (tag or "*").encode() + b" " + status.encode() + b" "
        if code:
            head += b"[" + code.encode() + b"] "
        return head + _clean(text)

    @staticmethod
    def send_untagged(status: str, text: str, code: str = "") -> bytes:
        return Connection.send_tagged("*", status, text, code)

    @staticmethod
    def send_bye(text: str) -> bytes:
        return b"* BYE " + _clean(text)

    @staticmethod
    def send_continuation(text: str = "") -> bytes:
        return b"+ " + _clean(text) if text else b"+ \r\n"

    @staticmethod
    def send_id(fields: dict[str, str]) -> bytes:
        body = " ".join(f"{quote(k)} {quote(v)}" for k, v in fields.items())
        return b"* ID (" + body.encode() + b")\r\n"


def _clean(text: str) -> bytes:
    """One response line: no CR/LF/NUL from policy texts can split or forge responses."""
    safe = "".join(" " if ch in "\r\n\x00" else ch for ch in text).strip() or "."
    return safe.encode("utf-8") + b"\r\n"


def quote(text: str) -> str:
    """An IMAP quoted string (caller ensures no CR/LF)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = [
    "MAX_COMMAND_BYTES",
    "MAX_LINE_BYTES",
    "MAX_LITERAL_BYTES",
    "MAX_PREAUTH_COMMANDS",
    "NEED_DATA",
    "PAUSED",
    "TRANSITIONS",
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
    "LoginAttempted",
    "PrivacyRequired",
    "StartTlsRequested",
    "State",
    "decode_plain",
]
