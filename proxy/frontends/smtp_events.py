"""Events, errors and sentinels of the sans-IO SMTP server (``smtp_wire``).

Events are small frozen dataclasses, named for what the client did; credentials and
message contents are kept out of their ``repr``. Errors say whose fault it is:
:class:`ClientError` (the client's input) and :class:`UsageError` (the executor's use
of the connection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.frontends.events import NEED_DATA, PAUSED, Marker, Sentinel
from proxy.frontends.smtp_replies import Replies

#: SASL mechanisms the proxy can relay (it needs the password to log in upstream).
MECHANISMS = ("LOGIN", "PLAIN")
#: Commands relayed to the upstream as they are, when it offers the extension.
PASS_THROUGH = ("VRFY", "ETRN")


class SmtpWireError(Exception):
    """Base of this module's errors."""


class ClientError(SmtpWireError):
    """The client sent something the protocol does not allow; ``reply`` answers it."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class UsageError(SmtpWireError):
    """The executor used the connection in a way its state does not allow."""


_REPLY_LINE = re.compile(r"\d\d\d(?:[ -][\x20-\x7e]*)?")


def check_reply(reply: str) -> str:
    """The reply's code; raises UsageError for what is not a well-formed reply."""
    lines = reply.split("\r\n")
    code = lines[0][:3]
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if (not _REPLY_LINE.fullmatch(line) or line[:3] != code
                or line[3:4] != ("" if last and len(line) == 3 else " " if last else "-")):
            raise UsageError(f"not an SMTP reply: {reply[:80]!r}")
    return code


@dataclass(frozen=True, slots=True)
class Hello:
    """EHLO (``extended``) or HELO; the session starts afresh (RFC 5321 4.1.4)."""

    name: str
    extended: bool


class StartTlsRequested(Marker):
    """Answer ``220``, run the handshake, then call :meth:`Connection.starttls_done`."""


@dataclass(frozen=True, slots=True)
class AuthStarted:
    """AUTH with a mechanism of :data:`MECHANISMS`; ``initial_response`` decoded."""

    mechanism: str
    initial_response: bytes | None = field(repr=False)  # credentials: never logged

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"unsupported mechanism {self.mechanism!r}")


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """One SASL response line after a ``334``, decoded."""

    data: bytes = field(repr=False)  # credentials: never logged


class AuthCancelled(Marker):
    """The client answered a ``334`` with ``*`` (RFC 4954 4)."""


@dataclass(frozen=True, slots=True)
class PathGiven:
    """The base of MAIL FROM and RCPT TO: a syntactically valid path and the
    parameters mailward relays (``KEYWORD=value``: the keyword upper-cased, the value
    as the client wrote it)."""

    path: bytes  # with its angle brackets; ``<>`` for the null path
    params: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if not (self.path.startswith(b"<") and self.path.endswith(b">")):
            raise ValueError("a path is enclosed in angle brackets")


class MailFrom(PathGiven):
    """MAIL FROM: the sender and the MAIL parameters (SIZE, BODY, SMTPUTF8, DSN's)."""


class RcptTo(PathGiven):
    """RCPT TO: a recipient and the DSN parameters (NOTIFY, ORCPT) when DSN is on."""


class DataRequested(Marker):
    """DATA with recipients: answer ``354`` and the message follows."""


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """One BDAT chunk (RFC 3030), exactly ``size`` bytes as the client sent them; the
    reply to it comes after the chunk, ``last`` ends the message."""

    data: bytes = field(repr=False)  # message contents are never logged
    last: bool


@dataclass(frozen=True, slots=True)
class PassThrough:
    """A command the upstream answers as is, once logged in and when the upstream
    offers it (VRFY, ETRN); ``argument`` is what followed the command."""

    command: str
    argument: bytes

    def __post_init__(self) -> None:
        if self.command not in PASS_THROUGH:
            raise ValueError(f"not a pass-through command: {self.command!r}")


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """The message up to ``<CRLF>.<CRLF>``, dot-unstuffed, within the size limit."""

    content: bytes = field(repr=False)  # message contents are never logged


class ResetRequested(Marker):
    """RSET: the transaction is over."""


class QuitRequested(Marker):
    """QUIT: answer ``221`` and close."""


@dataclass(frozen=True, slots=True)
class ReplyNeeded:
    """The connection knows the answer: a syntax or sequence error, or a command
    answered the same way every time (NOOP, HELP, VRFY, EXPN)."""

    reply: str

    def __post_init__(self) -> None:
        check_reply(self.reply)


@dataclass(frozen=True, slots=True)
class PrivacyRequired:
    """A command other than EHLO/NOOP/STARTTLS/QUIT before TLS on a STARTTLS listener:
    answer ``reply`` (530 5.7.0) without doing anything else."""

    command: str
    reply: str = Replies.STARTTLS_FIRST


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """A limit was broken: send ``reply``, after which the connection is closed."""

    limit: str  # "line", "commands", "unrecognized", "bdat_syntax"
    reply: str

    def __post_init__(self) -> None:
        check_reply(self.reply)


Event = (
    Hello
    | StartTlsRequested
    | AuthStarted
    | AuthResponse
    | AuthCancelled
    | MailFrom
    | RcptTo
    | DataRequested
    | MessageReceived
    | ChunkReceived
    | PassThrough
    | ResetRequested
    | QuitRequested
    | ReplyNeeded
    | PrivacyRequired
    | LimitExceeded
)


__all__ = [
    "MECHANISMS", "NEED_DATA", "PASS_THROUGH", "PAUSED", "AuthCancelled", "AuthResponse",
    "AuthStarted", "ChunkReceived", "ClientError", "DataRequested", "Event", "Hello",
    "LimitExceeded", "MailFrom", "MessageReceived", "PassThrough", "PrivacyRequired",
    "QuitRequested", "RcptTo", "ReplyNeeded", "ResetRequested", "Sentinel", "SmtpWireError",
    "StartTlsRequested", "UsageError", "check_reply",
]
