"""Every SMTP reply mailward makes itself, in one catalogue, and the upstream's replies
as they are relayed.

Replies are strings without the final CRLF; a multi-line reply has ``\\r\\n`` between
its lines. Since ENHANCEDSTATUSCODES is advertised, every reply of mailward's own
carries an RFC 3463 enhanced status code on every line (the catalogue test checks
it); the upstream's replies go out as the upstream wrote them, made ASCII.
"""

from __future__ import annotations

import textwrap
import unicodedata
from functools import partial

from aiosmtplib import SMTPResponse

#: Longest reply text per line; RFC 5321 allows 512 octets with the code.
REPLY_TEXT_CHARS = 400

_PUNCTUATION = (("\u2014", "-"), ("\u2013", "-"), ("\u2018", "'"), ("\u2019", "'"),
                ("\u201c", '"'), ("\u201d", '"'), ("\u2026", "..."))


def ascii_text(text: str) -> str:
    """Reply text is ASCII (RFC 5321); keep it readable rather than dropping words."""
    if text.isascii() and text.isprintable():  # the usual case, cheaply
        return text
    for a, b in _PUNCTUATION:
        text = text.replace(a, b)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(c if c.isprintable() else " " for c in text)


def reply(code: int, enhanced: str, text: str) -> str:
    """One reply (wrapped onto several lines if long), the enhanced code on each."""
    chunks = textwrap.wrap(ascii_text(text), REPLY_TEXT_CHARS) or [""]
    last = len(chunks) - 1
    return "\r\n".join(
        f"{code}{' ' if i == last else '-'}{enhanced} {c}" for i, c in enumerate(chunks)
    )


def relayed(resp: SMTPResponse) -> str:
    """The upstream's reply, as the upstream gave it (code and text, every line)."""
    lines = [ascii_text(line) for line in resp.message.split("\n")] or [""]
    last = len(lines) - 1
    return "\r\n".join(
        f"{resp.code}{' ' if i == last else '-'}{line}".rstrip() for i, line in enumerate(lines)
    )


def multiline(code: int, lines: list[str]) -> str:
    """``code-line`` for every line but the last, ``code line`` for the last (EHLO)."""
    last = len(lines) - 1
    return "\r\n".join(f"{code}{' ' if i == last else '-'}{line}" for i, line in enumerate(lines))


class Replies:
    """Every reply mailward makes itself (the upstream's replies are relayed as is).

    The texts of the protocol errors are those aiosmtpd gave (mailward's front end was
    built on it), with the enhanced codes mailward added to them."""

    # -- the session
    OK = "250 2.0.0 OK"
    BYE = "221 2.0.0 Bye"
    AUTH_OK = "235 2.7.0 Authentication successful"
    READY_FOR_TLS = "220 2.0.0 Ready to start TLS"
    START_MAIL = "354 End data with <CR><LF>.<CR><LF>"
    HELP = ("250 2.0.0 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT "
            "RSET STARTTLS VRFY")
    VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
    PLAIN_CHALLENGE = "334 "  # RFC 4954 4: the space is mandatory
    USERNAME_CHALLENGE = "334 VXNlcm5hbWU6"  # base64 "Username:"
    PASSWORD_CHALLENGE = "334 UGFzc3dvcmQ6"  # base64 "Password:"

    # -- TLS and authentication
    STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
    TLS_ACTIVE = "503 5.5.1 TLS already active"
    TLS_UNAVAILABLE = "454 4.7.0 TLS not available"
    AUTH_REQUIRED = "530 5.7.0 Authentication required"
    ENCRYPTION_REQUIRED = ("538 5.7.11 Encryption required for requested authentication "
                           "mechanism")
    ALREADY_AUTHENTICATED = "503 5.5.1 Already authenticated"
    AUTH_NOT_ENOUGH = "501 5.5.4 Not enough value"
    AUTH_TOO_MANY = "501 5.5.4 Too many values"
    AUTH_MECHANISM = "504 5.5.4 Unrecognized authentication type"
    AUTH_NOT_RECOGNIZED = "500 5.5.2 Error: command 'AUTH' not recognized"
    AUTH_ABORTED = "501 5.7.0 Auth aborted"
    BAD_BASE64 = "501 5.5.2 Can't decode base64"
    BAD_PLAIN = "501 5.5.2 Can't split auth value"
    USER_NOT_UTF8 = "501 5.5.2 The user name is not valid UTF-8"

    # -- syntax and sequence
    BAD_SYNTAX = "500 5.5.2 Error: bad syntax"
    LINE_TOO_LONG = "500 5.5.2 Command line too long"
    TOO_MANY_UNRECOGNIZED = "502 5.5.1 Too many unrecognized commands, goodbye."
    EXPN = "502 5.5.1 EXPN not implemented"
    NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
    NEED_MAIL = "503 5.5.1 Error: need MAIL command"
    NEED_RCPT = "503 5.5.1 Error: need RCPT command"
    BAD_ADDRESS = "553 5.1.3 Error: malformed address"
    BAD_BODY = "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"
    BAD_SMTPUTF8 = "501 5.5.4 Error: SMTPUTF8 takes no arguments"
    SIZE_EXCEEDED = "552 5.3.4 Error: message size exceeds fixed maximum message size"
    MESSAGE_TOO_BIG = "552 5.3.4 Error: message too big"
    MAIL_PARAMETERS = "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
    RCPT_PARAMETERS = "555 5.5.4 RCPT TO parameters not recognized or not implemented"
    BAD_RET = "501 5.5.4 Error: RET can only be one of FULL, HDRS"
    BAD_ENVID = "501 5.5.4 Error: ENVID must be xtext of at most 100 characters"
    BAD_NOTIFY = "501 5.5.4 Error: NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
    BAD_ORCPT = "501 5.5.4 Error: ORCPT must be addr-type;address of at most 500 characters"
    BDAT_SYNTAX = "501 5.5.4 Syntax: BDAT <size> [LAST], closing"
    DATA_AFTER_BDAT = "503 5.5.1 Error: DATA after BDAT in one transaction"

    # -- ending the connection
    TOO_MANY_COMMANDS = "421 4.7.0 Too many commands before authentication, closing"
    TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many failed authentication attempts, closing"
    PREAUTH_TIMEOUT = "421 4.4.2 Authentication not completed in time, closing"
    IDLE_TIMEOUT = "421 4.4.2 Idle too long, closing"
    SHUTDOWN = "421 4.3.2 Service shutting down, please reconnect"
    INTERNAL_ERROR = "421 4.3.0 Internal error, closing"
    LINE_LIMIT = "500 5.5.2 Line too long, closing"

    # -- the upstream
    UPSTREAM_DOWN = reply(
        421, "4.4.1", "The mail server cannot be reached. Please try again in a few minutes."
    )
    AUTH_UNSUPPORTED = reply(
        454, "4.7.0", "The mail server offers no supported login method. Contact IT support."
    )
    MESSAGE_NOT_SENT = reply(
        451, "4.4.1",
        "The mail server did not confirm this message, so it was not sent. Please try again.",
    )

    # -- with one argument: the session's own words put into a fixed text ...
    greeting = staticmethod("220 {} mailward".format)  # the hostname
    syntax = staticmethod("501 5.5.4 Syntax: {}".format)  # the usage
    unrecognized = staticmethod('500 5.5.2 Error: command "{}" not recognized'.format)
    send_hello_first = staticmethod("503 5.5.1 Error: send {} first".format)  # HELO/EHLO
    # -- ... or a text for the user, made safe by ``reply``
    denied = staticmethod(partial(reply, 550, "5.7.1"))
    temporary = staticmethod(partial(reply, 454, "4.7.0"))
    terminated = staticmethod(partial(reply, 421, "4.7.0"))


__all__ = ["REPLY_TEXT_CHARS", "Replies", "ascii_text", "multiline", "relayed", "reply"]
