"""Pure syntax of SMTP submission commands (``smtp_wire`` uses them): paths,
``KEYWORD=value`` parameters and their RFC values, SASL encodings.

MAIL and RCPT parameters: a parameter whose extension the upstream does not offer is
refused as unknown (555), like an unknown one; the others are checked for syntax
(RFC 5321 esmtp-keyword / esmtp-value, no control characters, no repeats) and for
their RFC values (1870, 6152, 6531, 3461), and relayed as the client wrote them, so
nothing but a well-formed parameter reaches the upstream's command line. SIZE is
mailward's own too: checked against its limit whatever the upstream offers, and
relayed only if the upstream offers SIZE.

Everything here takes bytes and returns a value, or the reply refusing it (from
``smtp_replies.Replies``), or raises :class:`ClientError`; nothing else escapes
(the property tests feed it arbitrary bytes).
"""

from __future__ import annotations

import re

from proxy.frontends import sasl
from proxy.frontends.smtp_events import ClientError
from proxy.frontends.smtp_replies import Replies

#: Longest ENVID and ORCPT values (RFC 3461 4.4, 4.2).
MAX_ENVID_CHARS = 100
MAX_ORCPT_CHARS = 500
#: Service extensions mailward can relay, as EHLO keywords. The EHLO answer and
#: ``Connection.extensions`` hold those of them the upstream offers.
RELAYED_EXTENSIONS = ("SIZE", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                      "DSN", "CHUNKING", "VRFY", "ETRN")
#: MAIL FROM parameters: keyword -> the extension that must be on (None: always).
MAIL_PARAMETERS: dict[bytes, str | None] = {
    b"SIZE": None, b"BODY": None, b"SMTPUTF8": "SMTPUTF8", b"RET": "DSN", b"ENVID": "DSN"}
#: RCPT TO parameters: keyword -> the extension that must be on.
RCPT_PARAMETERS: dict[bytes, str | None] = {b"NOTIFY": "DSN", b"ORCPT": "DSN"}

# RFC 5321 4.1.2 esmtp-param; values may hold UTF-8 (RFC 6531 3.3), never controls,
# spaces or "=".
_PARAMETER = re.compile(rb"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\x80-\xff]+))?")
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")  # RFC 3461 4
_ORCPT = re.compile(rb"[A-Za-z0-9!#$%&'*/?^_`{|}~.-]+;[\x21-\x3c\x3e-\x7e\x80-\xff]+")
_NOTIFY = frozenset({b"SUCCESS", b"FAILURE", b"DELAY"})


def parse_path(text: bytes) -> tuple[bytes, bytes] | None:
    """A reverse or forward path at the start of ``text``: (``<path>``, the rest).
    A bare address is put in angle brackets; ``(b"", b"")`` when there is none; None
    when it is malformed. What is inside the brackets is the upstream's to judge."""
    text = text.strip()
    if not text:
        return b"", b""
    if not text.startswith(b"<"):
        address, _, rest = text.partition(b" ")
        if b"<" in address or b">" in address:
            return None
        return b"<" + address + b">", rest.strip()
    quoted, i = False, 1
    while i < len(text):
        c = text[i]
        if quoted and c == 0x5C:  # backslash: the next byte is quoted
            i += 2
            continue
        if c == 0x22:
            quoted = not quoted
        elif not quoted and c == 0x3E:
            return text[: i + 1], text[i + 1 :].strip()
        elif not quoted and c == 0x3C:
            return None
        i += 1
    return None


def parse_parameters(text: bytes) -> dict[bytes, bytes | None] | None:
    """``KEYWORD[=value]`` parameters (RFC 5321 4.1.2) -> {upper-cased keyword: value
    as written}; None if one is malformed or a keyword repeats."""
    out: dict[bytes, bytes | None] = {}
    for param in text.split():
        m = _PARAMETER.fullmatch(param)
        if m is None:
            return None
        key = m[1].upper()
        if key in out:
            return None
        out[key] = m[2]
    return out


def _value_error(key: bytes, value: bytes | None, usage: str) -> str | None:
    """The reply refusing the value of a known parameter, or None (RFC 1870, 6152,
    6531, 3461)."""
    if key == b"SIZE":
        return None if value is not None and value.isdigit() else Replies.syntax(usage)
    if key == b"BODY":
        return None if value is not None and value.upper() in (b"7BIT", b"8BITMIME") \
            else Replies.BAD_BODY
    if key == b"SMTPUTF8":
        return None if value is None else Replies.BAD_SMTPUTF8
    if key == b"RET":
        return None if value is not None and value.upper() in (b"FULL", b"HDRS") \
            else Replies.BAD_RET
    if key == b"ENVID":
        return None if (value is not None and len(value) <= MAX_ENVID_CHARS
                        and _XTEXT.fullmatch(value)) else Replies.BAD_ENVID
    if key == b"NOTIFY":
        words = (value or b"").upper().split(b",")
        ok = words == [b"NEVER"] or (len(set(words)) == len(words) and set(words) <= _NOTIFY)
        return None if value is not None and ok else Replies.BAD_NOTIFY
    if key == b"ORCPT":
        return None if (value is not None and len(value) <= MAX_ORCPT_CHARS
                        and _ORCPT.fullmatch(value)) else Replies.BAD_ORCPT
    raise AssertionError(f"no check for {key!r}")  # every known keyword has one


def check_parameters(
    text: bytes, known: dict[bytes, str | None], extensions: frozenset[str],
    usage: str, unknown: str, size_limit: int | None = None,
) -> tuple[bytes, ...] | str:
    """The parameters to relay (``KEYWORD=value``), or the reply refusing them:
    malformed (501), unknown or not offered (``unknown``, a 555), a bad value (501),
    a SIZE over ``size_limit`` (552)."""
    parsed = parse_parameters(text)
    if parsed is None:
        return Replies.syntax(usage)
    out: list[bytes] = []
    for key, value in parsed.items():
        if key not in known:
            return unknown
        extension = known[key]
        if extension is not None and extension not in extensions:
            return unknown
        error = _value_error(key, value, usage)
        if error is not None:
            return error
        if key == b"BODY" and value is not None and value.upper() == b"8BITMIME" \
                and "8BITMIME" not in extensions:
            return unknown
        if key == b"SIZE" and size_limit is not None and int(value or 0) > size_limit:
            return Replies.SIZE_EXCEEDED
        if key == b"SIZE" and "SIZE" not in extensions:
            continue  # mailward enforces the limit itself; the upstream never had SIZE
        out.append(key if value is None else key + b"=" + value)
    return tuple(out)


def b64decode(data: bytes) -> bytes:
    """A SASL response (RFC 4954: ``=`` is empty); raises ClientError."""
    return sasl.decode_base64(data, lambda _text: ClientError(Replies.BAD_BASE64))


def decode_plain(message: bytes) -> tuple[bytes, bytes, bytes]:
    """RFC 4616 PLAIN message -> (authzid, authcid, password); raises ClientError."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise ClientError(Replies.BAD_PLAIN)
    return parts[0], parts[1], parts[2]


__all__ = [
    "MAIL_PARAMETERS", "MAX_ENVID_CHARS", "MAX_ORCPT_CHARS", "RCPT_PARAMETERS",
    "RELAYED_EXTENSIONS", "b64decode", "check_parameters", "decode_plain",
    "parse_parameters", "parse_path",
]
