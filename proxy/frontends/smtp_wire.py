"""Sans-IO parser and state machine for the server side of SMTP submission.

This module contains no networking code. A :class:`Connection` takes the bytes a client
sent with :meth:`Connection.receive_data` and hands out one event at a time with
:meth:`Connection.next_event` (or :data:`NEED_DATA` / :data:`PAUSED`). After each event
it pauses until the executor (``smtp.py``) answers it with :meth:`Connection.send`,
which turns a reply into bytes and moves the state machine by the reply's code: a
``354`` to DATA starts reading the message, a ``334`` to AUTH reads one SASL line, a
``235`` authenticates, a ``250`` to MAIL opens the transaction, and so on. So commands a
client pipelines are handled one by one, each only after the previous one's reply, and
bytes after the end of a message are commands, never part of it.

Understood: EHLO/HELO, STARTTLS (RFC 3207), AUTH PLAIN and LOGIN (RFC 4954), MAIL
and RCPT with the parameters of :data:`MAIL_PARAMETERS` / :data:`RCPT_PARAMETERS`,
DATA, BDAT (RFC 3030 CHUNKING), RSET, NOOP, QUIT, HELP, VRFY, ETRN, EXPN. Syntax and
sequence errors, and commands answered the same way every time, come out as
:class:`ReplyNeeded` with the reply to send (texts from ``smtp_replies.Replies``).

Extensions: ``extensions`` are those advertised (the upstream's, of
:data:`RELAYED_EXTENSIONS`); parameters and commands of others are unknown.
BDAT: a chunk is always consumed, also when refused (dropped, never parsed as
commands; RFC 3030 4.2), its reply follows it; a BDAT without a readable size ends
the connection, since where its chunk ends is unknown.

Smuggling (the 2023 SMTP smuggling attacks): only ``<CRLF>.<CRLF>`` ends a message.
A dot between bare LFs or CRs (``\\n.\\n``, ``\\r.\\r``, ``\\n.\\r\\n``, ...) is message
content, and whatever follows it stays inside the message. Bytes pipelined after
STARTTLS are discarded (RFC 3207 4.2).

Limits are the constants below; breaking one gives a :class:`LimitExceeded` event whose
reply ends the connection. Time limits belong to the executor (a parser has no clock).

Errors: the client's bad input is never an exception, it is an event (and
:func:`decode_plain` raises :class:`ClientError`); :class:`UsageError` means the
executor used the connection in a state that does not allow it.

The events, errors and sentinels are defined in ``smtp_events`` and re-exported here.
Everything that affects the state machine lives in :data:`TRANSITIONS`,
:meth:`Connection.send` and :meth:`Connection.starttls_done`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from proxy.frontends.smtp_events import (
    MECHANISMS,
    NEED_DATA,
    PASS_THROUGH,
    PAUSED,
    AuthCancelled,
    AuthResponse,
    AuthStarted,
    ChunkReceived,
    ClientError,
    DataRequested,
    Event,
    Hello,
    LimitExceeded,
    MailFrom,
    MessageReceived,
    PassThrough,
    PrivacyRequired,
    QuitRequested,
    RcptTo,
    ReplyNeeded,
    ResetRequested,
    Sentinel,
    SmtpWireError,
    StartTlsRequested,
    UsageError,
    check_reply,
)
from proxy.frontends.smtp_replies import Replies
from proxy.frontends.smtp_syntax import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    RELAYED_EXTENSIONS,
    b64decode,
    check_parameters,
    decode_plain,
    parse_path,
)

# ----------------------------------------------------------------------------- limits

#: Longest line outside a message (CRLF included); longer ends the connection.
MAX_LINE_BYTES = 8 * 1024
#: Longest command line (RFC 5321 4.5.3.1.4); longer gets ``500`` and the session goes on.
MAX_COMMAND_BYTES = 512
#: What MAIL may add after EHLO: SIZE (RFC 1870 says 26 octets) and SMTPUTF8 (10).
MAIL_PARAMETER_BYTES = 26 + 10
#: What DSN adds to MAIL (ENVID, RET) and to RCPT (NOTIFY, ORCPT): RFC 3461 4.
DSN_MAIL_BYTES, DSN_RCPT_BYTES = 100, 500
#: Largest message by default; the executor sets the upstream's, if lower.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Default number of commands a client may send before it is authenticated.
MAX_PREAUTH_COMMANDS = 50
#: Unrecognised commands per connection; the last one ends the connection.
MAX_UNRECOGNIZED_COMMANDS = 5
#: Commands allowed before TLS on a STARTTLS listener (RFC 3207 4).
ALLOWED_BEFORE_TLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})

# ----------------------------------------------------------------------------- states


class State(enum.Enum):
    COMMAND = "command"  # reading a command line
    REPLYING = "replying"  # an event is out; its reply (send) comes next
    SASL = "sasl"  # reading one SASL response line (after a 334)
    DATA = "data"  # reading the message (after a 354)
    CHUNK = "chunk"  # reading a BDAT chunk (right after the BDAT command)
    STARTTLS = "starttls"  # after the 220: handshake; bytes received are discarded
    CLOSED = "closed"  # QUIT answered, a 421 sent or a limit broken


#: (command being answered, reply code) -> state after the reply; ``*`` matches any
#: code. A 421 closes in every state (it may also be sent unasked). Anything else
#: goes back to COMMAND. (The one state entered without a reply: CHUNK, on a BDAT
#: command, since its chunk follows at once; the chunk read, its event awaits the reply.)
TRANSITIONS: dict[tuple[str, str], State] = {
    ("STARTTLS", "220"): State.STARTTLS,
    ("AUTH", "334"): State.SASL,
    ("DATA", "354"): State.DATA,
    ("QUIT", "221"): State.CLOSED,
    ("LIMIT", "*"): State.CLOSED,
    ("*", "421"): State.CLOSED,
}

# ----------------------------------------------------------------------------- syntax

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # TAB is whitespace, CR/LF end lines
_BDAT = re.compile(rb"(\d{1,18})(?:[ \t]+(LAST))?", re.IGNORECASE)
#: MAIL and RCPT: (command, keyword before the path, parameters known, reply to others).
_PATH_COMMANDS: dict[type[MailFrom | RcptTo], tuple[str, bytes, dict[bytes, str | None], str]] = {
    MailFrom: ("MAIL FROM", b"FROM:", MAIL_PARAMETERS, Replies.MAIL_PARAMETERS),
    RcptTo: ("RCPT TO", b"TO:", RCPT_PARAMETERS, Replies.RCPT_PARAMETERS),
}


# ------------------------------------------------------------------------- connection

_Handler = Callable[["Connection", str, bytes], Event | Sentinel]


class Connection:
    """The server side of one client connection (see the module docstring)."""

    def __init__(
        self,
        *,
        tls: bool = False,
        starttls: bool = False,
        cleartext_auth: bool = False,
        max_commands: int = MAX_PREAUTH_COMMANDS,
        message_limit: int = MAX_MESSAGE_BYTES,
        extensions: frozenset[str] = frozenset(RELAYED_EXTENSIONS),
    ) -> None:
        self.state = State.COMMAND
        self.tls = tls  # implicit TLS, or STARTTLS completed
        self.starttls_available = starttls
        self.cleartext_auth = cleartext_auth  # config allows AUTH without TLS
        self.max_commands = max_commands
        self.message_limit = message_limit
        self.extensions = extensions  # advertised: parameters and commands they allow
        self.helo: str | None = None  # the name given in EHLO/HELO
        self.extended = False  # EHLO rather than HELO
        self.authenticated = False  # a 235 was sent
        self.in_mail = False  # a 250 answered MAIL; the transaction is open
        self.recipients = 0  # RCPTs answered 250/251 in this transaction
        self.chunked = -1  # BDAT bytes accepted in this transaction; -1: no BDAT yet
        self.commands = 0  # commands before authentication
        self.unrecognized = 0
        self._greeted = False
        self._pending = ""  # the command whose reply is due
        self._buf = bytearray()
        self._pos = 0  # start of unparsed data in _buf
        self._scan = 0  # DATA: where to look for the end of the message from
        self._too_big = False  # DATA: over the limit; the rest is read and dropped
        self._chunk_left = 0  # CHUNK: bytes of the chunk still to come
        self._chunk_last = False  # CHUNK: BDAT ... LAST
        self._chunk_refusal: ReplyNeeded | PrivacyRequired | None = None  # CHUNK: dropped

    # ------------------------------------------------------------- input side

    @property
    def buffered(self) -> int:
        """Unparsed bytes held (the executor stops reading when this grows)."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client (dropped after STARTTLS and once closed)."""
        if self.state not in (State.STARTTLS, State.CLOSED):
            self._buf += data

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA, or PAUSED (an answer is due, or it is over)."""
        if self.state in (State.REPLYING, State.STARTTLS, State.CLOSED):
            return PAUSED
        if self.state is State.DATA:
            return self._message()
        if self.state is State.CHUNK:
            return self._chunk()
        line = self._line()
        if line is None:
            if self._pos:  # keep only unparsed bytes
                del self._buf[: self._pos]
                self._pos = 0
            return NEED_DATA
        if isinstance(line, LimitExceeded):
            return line
        if self.state is State.SASL:
            return self._sasl(line)
        return self._command(line)

    def _line(self) -> bytes | LimitExceeded | None:
        nl = self._buf.find(b"\n", self._pos, self._pos + MAX_LINE_BYTES)
        if nl < 0:
            if len(self._buf) - self._pos >= MAX_LINE_BYTES:
                return self._limit("line", Replies.LINE_LIMIT)
            return None
        line = bytes(self._buf[self._pos : nl]).rstrip(b"\r\n")
        self._pos = nl + 1
        return line

    # ------------------------------------------------------------ output side

    def send(self, reply: str) -> bytes:
        """The bytes of ``reply`` (lines joined by CRLF, no final CRLF), answering the
        last event; a 421 may also be sent unasked, and a 220 greeting first."""
        code = check_reply(reply)
        if self.state is State.CLOSED:
            raise UsageError("the connection is closed")
        if self.state is State.REPLYING:
            self._answered(code)
        elif TRANSITIONS.get(("*", code)) is State.CLOSED:  # unasked: a 421
            self._closed()
        elif code == "220" and not self._greeted and self.state is State.COMMAND:
            pass  # the greeting
        else:
            raise UsageError(f"no command awaits a reply (state {self.state.value})")
        self._greeted = True
        return reply.encode("ascii") + b"\r\n"

    def starttls_done(self) -> None:
        """TLS is up: everything pipelined after STARTTLS is dropped, and the client
        starts afresh with EHLO (RFC 3207 4.2)."""
        if self.state is not State.STARTTLS:
            raise UsageError(f"starttls_done in state {self.state.value}")
        self.state = State.COMMAND
        self.tls = True
        self._buf.clear()
        self._pos = 0
        self.helo, self.extended = None, False
        self._reset_transaction()

    def _answered(self, code: str) -> None:
        """The reply to the pending command: what it records, and the next state."""
        pending = self._pending
        if pending == "AUTH" and code == "235":
            self.authenticated = True
        elif pending == "MAIL" and code == "250":
            self.in_mail = True
        elif pending == "RCPT" and code in ("250", "251"):
            self.recipients += 1
        elif pending == "MESSAGE" or (pending == "BDAT" and (
                code != "250" or self._chunk_last)):  # the message done, or failed
            self._reset_transaction()
        self.state = (TRANSITIONS.get((pending, code)) or TRANSITIONS.get((pending, "*"))
                      or TRANSITIONS.get(("*", code)) or State.COMMAND)
        if self.state is State.DATA:
            del self._buf[: self._pos]
            self._pos = self._scan = 0
            self._too_big = False
        elif self.state is State.CLOSED:
            self._closed()
        if self.state is not State.SASL:
            self._pending = ""

    def _closed(self) -> None:
        self.state = State.CLOSED
        self._buf.clear()
        self._pos = 0

    def _reset_transaction(self) -> None:
        self.in_mail, self.recipients, self.chunked = False, 0, -1

    def _event(self, command: str, event: Event) -> Event:
        self._pending = command
        self.state = State.REPLYING
        return event

    def _reply(self, command: str, reply: str) -> ReplyNeeded:
        self._pending = command
        self.state = State.REPLYING
        return ReplyNeeded(reply)

    def _limit(self, limit: str, reply: str) -> LimitExceeded:
        self._buf.clear()
        self._pos = 0
        self._pending = "LIMIT"
        self.state = State.REPLYING
        return LimitExceeded(limit, reply)

    # ---------------------------------------------------------------- messages

    def _message(self) -> Event | Sentinel:
        """DATA: the message once ``<CRLF>.<CRLF>`` (and nothing else) ended it."""
        buf = self._buf
        if not self._too_big and buf.startswith(b".\r\n", self._pos):  # empty message
            end = after = self._pos
            after += 3
        else:
            i = buf.find(b"\r\n.\r\n", max(self._scan - 4, self._pos))
            if i < 0:
                if len(buf) - self._pos > self.message_limit + 2:
                    # Too big: read on to the end, keeping only a tail that may begin
                    # the end mark (not its start: ".\r\n" there ends nothing).
                    self._too_big = True
                    del buf[self._pos : len(buf) - 4]
                self._scan = len(buf)
                return NEED_DATA
            end, after = i + 2, i + 5
        content = bytes(buf[self._pos : end])
        self._pos = after
        if self._too_big or len(content) > self.message_limit:
            return self._reply("MESSAGE", Replies.MESSAGE_TOO_BIG)
        content = content.replace(b"\r\n.", b"\r\n")  # RFC 5321 4.5.2 transparency
        if content.startswith(b"."):
            content = content[1:]
        return self._event("MESSAGE", MessageReceived(content))

    def _chunk(self) -> Event | Sentinel:
        """CHUNK: the chunk once all its bytes are here; a refused one is dropped as
        it arrives, then its refusal is the event."""
        buf, left = self._buf, self._chunk_left
        if self._chunk_refusal is not None:
            take = min(len(buf) - self._pos, left)
            del buf[: self._pos + take]
            self._pos, left = 0, left - take
            self._chunk_left = left
            if left:
                return NEED_DATA
            refusal, self._chunk_refusal = self._chunk_refusal, None
            if isinstance(refusal, PrivacyRequired):
                return self._event("BDAT", refusal)
            return self._reply("BDAT", refusal.reply)
        if len(buf) - self._pos < left:
            return NEED_DATA
        data = bytes(buf[self._pos : self._pos + left])
        self._pos += left
        self._chunk_left = 0
        self.chunked += len(data)
        return self._event("BDAT", ChunkReceived(data, self._chunk_last))

    def _sasl(self, line: bytes) -> Event:
        line = line.strip()
        if line == b"*":
            return self._event("AUTH", AuthCancelled())
        try:
            return self._event("AUTH", AuthResponse(b64decode(line)))
        except ClientError as exc:
            return self._reply("AUTH", exc.reply)

    # ---------------------------------------------------------------- commands

    def _command(self, line: bytes) -> Event | Sentinel:
        word, _, arg = line.partition(b" ")
        name = word.upper().decode("ascii", "replace")
        if not line or not word.isascii() or _CONTROL.search(line):
            return self._reply("", Replies.BAD_SYNTAX)
        arg = arg.strip()
        limit = MAX_COMMAND_BYTES
        if name == "AUTH":
            limit = MAX_LINE_BYTES  # RFC 4954 4: AUTH lines may be up to 12288
        elif name == "MAIL" and self.extended:
            limit += MAIL_PARAMETER_BYTES + DSN_MAIL_BYTES * ("DSN" in self.extensions)
        elif name == "RCPT" and "DSN" in self.extensions:
            limit += DSN_RCPT_BYTES
        if len(line) > limit:
            return self._reply("", Replies.LINE_TOO_LONG)
        handler = _HANDLERS.get(name)
        if handler is None:
            return self._unrecognized(name)
        if not self.authenticated:
            self.commands += 1
            if self.commands > self.max_commands:
                return self._limit("commands", Replies.TOO_MANY_COMMANDS)
        if (self.starttls_available and not self.tls and not self.cleartext_auth
                and name not in ALLOWED_BEFORE_TLS):
            if name == "BDAT":  # its chunk is dropped first
                return self._bdat(name, arg, PrivacyRequired(name))
            return self._event(name, PrivacyRequired(name))
        return handler(self, name, arg)

    def _unrecognized(self, name: str) -> Event:
        self.unrecognized += 1
        if self.unrecognized >= MAX_UNRECOGNIZED_COMMANDS:
            return self._limit("unrecognized", Replies.TOO_MANY_UNRECOGNIZED)
        if not (name.isprintable() and len(name) <= 32):
            return self._reply("", Replies.BAD_SYNTAX)
        return self._reply("", Replies.unrecognized(name))

    def _out_of_order(self, *rules: tuple[bool, str]) -> str | None:
        """The reply refusing a transaction command: before EHLO/HELO or AUTH, else
        the reply of the first rule whose condition holds; None when it may go on."""
        if self.helo is None:
            return Replies.send_hello_first("HELO")
        if not self.authenticated:
            return Replies.AUTH_REQUIRED
        return next((reply for broken, reply in rules if broken), None)

    def _hello(self, name: str, arg: bytes) -> Event:
        if not arg:
            return self._reply(name, Replies.syntax(f"{name} hostname"))
        self.helo = arg.decode("utf-8", "surrogateescape")
        self.extended = name == "EHLO"
        self._reset_transaction()
        return self._event(name, Hello(self.helo, self.extended))

    def _starttls(self, name: str, arg: bytes) -> Event:
        if self.tls:
            return self._reply(name, Replies.TLS_ACTIVE)
        if arg:
            return self._reply(name, Replies.syntax("STARTTLS"))
        if not self.starttls_available:
            return self._reply(name, Replies.TLS_UNAVAILABLE)
        return self._event(name, StartTlsRequested())

    def _auth(self, name: str, arg: bytes) -> Event:
        refusal = self._auth_refusal(arg)
        if refusal is not None:
            return self._reply(name, refusal)
        args = arg.split()
        mechanism = args[0].upper().decode("ascii", "replace")
        try:
            response = b64decode(args[1]) if len(args) == 2 else None
        except ClientError as exc:
            return self._reply(name, exc.reply)
        return self._event(name, AuthStarted(mechanism, response))

    def _auth_refusal(self, arg: bytes) -> str | None:
        if self.helo is None:
            return Replies.send_hello_first("EHLO")
        if not self.extended:
            return Replies.AUTH_NOT_RECOGNIZED
        if not (self.tls or self.cleartext_auth):
            return Replies.ENCRYPTION_REQUIRED
        if self.authenticated:
            return Replies.ALREADY_AUTHENTICATED
        args = arg.split()
        if not args:
            return Replies.AUTH_NOT_ENOUGH
        if len(args) > 2:
            return Replies.AUTH_TOO_MANY
        if args[0].upper().decode("ascii", "replace") not in MECHANISMS:
            return Replies.AUTH_MECHANISM
        return None

    def _mail(self, name: str, arg: bytes) -> Event:
        return self._path_command(name, arg, MailFrom, self._out_of_order(),
                                  nested=Replies.NESTED_MAIL if self.in_mail else None)

    def _rcpt(self, name: str, arg: bytes) -> Event:
        return self._path_command(name, arg, RcptTo,
                                  self._out_of_order((not self.in_mail, Replies.NEED_MAIL)))

    def _path_command(self, name: str, arg: bytes, event: type[MailFrom | RcptTo],
                      refusal: str | None, nested: str | None = None) -> Event:
        """``MAIL FROM:<path> params`` / ``RCPT TO:<path> params`` -> the event, or the
        reply refusing it: ``refusal`` (out of order), a bad path, ``nested`` (MAIL in a
        transaction: said only of a good path), then unknown or bad parameters."""
        if refusal is not None:
            return self._reply(name, refusal)
        command, keyword, known, unknown = _PATH_COMMANDS[event]
        usage = f"{command}: <address>" + (" [SP <mail-parameters>]" if self.extended else "")
        if arg[: len(keyword)].upper() != keyword:
            return self._reply(name, Replies.syntax(usage))
        parsed = parse_path(arg[len(keyword) :])
        if parsed is None:
            return self._reply(name, Replies.BAD_ADDRESS)
        path, rest = parsed
        if not path or (rest and not self.extended):
            return self._reply(name, Replies.syntax(usage))
        if nested is not None:
            return self._reply(name, nested)
        size_limit = self.message_limit if event is MailFrom else None  # SIZE=
        params = check_parameters(rest, known, self.extensions, usage, unknown, size_limit)
        if isinstance(params, str):
            return self._reply(name, params)
        return self._event(name, event(path, params))

    def _data(self, name: str, arg: bytes) -> Event:
        refusal = self._out_of_order((not self.recipients, Replies.NEED_RCPT),
                                     (self.chunked >= 0, Replies.DATA_AFTER_BDAT),
                                     (bool(arg), Replies.syntax("DATA")))
        if refusal is not None:
            return self._reply(name, refusal)
        return self._event(name, DataRequested())

    def _bdat(self, name: str, arg: bytes,
              refusal: ReplyNeeded | PrivacyRequired | None = None) -> Event | Sentinel:
        """BDAT <size> [LAST]: read the chunk now (RFC 3030 2); refused, it is
        dropped and the refusal follows it."""
        if "CHUNKING" not in self.extensions:
            return self._unrecognized(name)
        m = _BDAT.fullmatch(arg)
        if m is None:  # where the chunk ends is unknown: nothing after is a command
            return self._limit("bdat_syntax", Replies.BDAT_SYNTAX)
        size, last = int(m[1]), m[2] is not None
        if refusal is None:
            reply = self._out_of_order(
                (not self.recipients, Replies.NEED_RCPT if self.in_mail else Replies.NEED_MAIL),
                (max(self.chunked, 0) + size > self.message_limit, Replies.MESSAGE_TOO_BIG))
            refusal = None if reply is None else ReplyNeeded(reply)
        self._chunk_left, self._chunk_last, self._chunk_refusal = size, last, refusal
        self.chunked = max(self.chunked, 0)
        self.state = State.CHUNK
        return self._chunk()

    def _rset(self, name: str, arg: bytes) -> Event:
        if arg:
            return self._reply(name, Replies.syntax("RSET"))
        self._reset_transaction()
        return self._event(name, ResetRequested())

    def _quit(self, name: str, arg: bytes) -> Event:
        if arg:
            return self._reply(name, Replies.syntax("QUIT"))
        return self._event(name, QuitRequested())

    def _simple(self, name: str, arg: bytes) -> Event:
        """NOOP, HELP, VRFY, EXPN: answered the same way every time; VRFY and ETRN
        are the upstream's to answer when it offers them."""
        if name == "ETRN" and "ETRN" not in self.extensions:
            return self._unrecognized(name)
        if name == "NOOP":
            return self._reply(name, Replies.OK)
        if name == "EXPN":
            return self._reply(name, Replies.EXPN)
        if not self.authenticated:
            return self._reply(name, Replies.AUTH_REQUIRED)
        if name == "HELP":
            return self._reply(name, Replies.HELP)
        if not arg:
            return self._reply(name, Replies.syntax(f"{name} <argument>"))
        if name in self.extensions:
            return self._event(name, PassThrough(name, arg))
        return self._reply(name, Replies.VRFY)


_HANDLERS: dict[str, _Handler] = {
    "EHLO": Connection._hello,
    "HELO": Connection._hello,
    "STARTTLS": Connection._starttls,
    "AUTH": Connection._auth,
    "MAIL": Connection._mail,
    "RCPT": Connection._rcpt,
    "DATA": Connection._data,
    "BDAT": Connection._bdat,
    "RSET": Connection._rset,
    "QUIT": Connection._quit,
    "NOOP": Connection._simple,
    "HELP": Connection._simple,
    "VRFY": Connection._simple,
    "EXPN": Connection._simple,
    "ETRN": Connection._simple,
}

__all__ = [  # the events and errors too: users import everything from here
    "ALLOWED_BEFORE_TLS", "MAIL_PARAMETERS", "MAX_COMMAND_BYTES", "MAX_LINE_BYTES",
    "MAX_MESSAGE_BYTES", "MAX_PREAUTH_COMMANDS", "MAX_UNRECOGNIZED_COMMANDS", "MECHANISMS",
    "NEED_DATA", "PASS_THROUGH", "PAUSED", "RCPT_PARAMETERS", "RELAYED_EXTENSIONS",
    "TRANSITIONS", "AuthCancelled", "AuthResponse", "AuthStarted", "ChunkReceived",
    "ClientError", "Connection", "DataRequested", "Event", "Hello", "LimitExceeded",
    "MailFrom", "MessageReceived", "PassThrough", "PrivacyRequired", "QuitRequested",
    "RcptTo", "ReplyNeeded", "ResetRequested", "Sentinel", "SmtpWireError",
    "StartTlsRequested", "State", "UsageError", "b64decode", "check_parameters",
    "decode_plain", "parse_path",
]
