"""IMAP syntax shared by the client-side parser (``imap_wire``), the upstream login
(``imap_upstream``) and the pre-auth conversation (``imap_preauth``): limits, the two
error types, the lexer for command arguments, and response-line builders.

No I/O and no state: functions of their arguments.

Errors say whose fault they are, as h11's do. :class:`RemoteProtocolError`: the peer
(client or upstream server) sent something bad; ``reply`` hints at the answer (``BAD``
and carry on, ``BYE`` and close, ``NO``). :class:`LocalProtocolError`: this program
used an API in a state that does not allow it (a bug, never the peer's doing). Both
derive from :class:`ImapProtocolError`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from proxy.frontends import sasl

# ----------------------------------------------------------------------------- limits

#: Longest command line (without literals), CRLF included.
MAX_LINE_BYTES = 8 * 1024
#: Largest literal accepted before login (LOGIN user/password, ID values).
MAX_LITERAL_BYTES = 8 * 1024
#: Largest whole command, lines plus literals (bounds a command built of many literals).
MAX_COMMAND_BYTES = 4 * 8 * 1024
#: RFC 2971: at most 30 field/value pairs in an ID command.
MAX_ID_FIELDS = 30
#: Longest upstream response (with literals) read before login; more is an error.
MAX_UPSTREAM_RESPONSE_BYTES = 64 * 1024
#: Longest value sent upstream as a quoted string (longer ones go as literals).
MAX_QUOTED_BYTES = 999
#: Tags the proxy uses for its own upstream commands; a client may not use them, or an
#: answer meant for the proxy could pass for the answer to the client's LOGIN.
RESERVED_TAG_PREFIX = "mw."
#: SASL mechanisms whose messages name the user (see ``imap_sasl``): the parser accepts
#: AUTHENTICATE with these; the listener offers those its upstream offers.
SUPPORTED_MECHANISMS = ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER")
#: Longest refusal text (characters) in ``* NO [ALERT]``, the tagged NO and ``* BYE``.
MAX_REFUSAL_CHARS = 300

# ----------------------------------------------------------------------------- errors

Reply = Literal["BAD", "NO", "BYE"]


class ImapProtocolError(Exception):
    """Base of the two errors below (``except ImapProtocolError`` catches both)."""


class RemoteProtocolError(ImapProtocolError):
    """The peer sent something bad. ``reply`` is the status to answer it with."""

    def __init__(self, message: str, *, reply: Reply = "BAD", code: str = "") -> None:
        super().__init__(message)
        self.reply: Reply = reply
        self.code = code  # a response code for the answer, e.g. CANNOT


class LocalProtocolError(ImapProtocolError):
    """The caller used a connection in a state that does not allow it (a bug here)."""


# ----------------------------------------------------------------------------- lexing

#: A line ending in a literal announcement ``{n}`` or ``{n+}`` (n bounded in digits).
LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}\r?\n\Z")
#: A tag: ASTRING-CHAR minus "+".
TAG_RE = re.compile(rb"[!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+")
_UNQUOTABLE = re.compile(rb"[^\x20-\x7e]")
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}


class SyntaxProblem(Exception):
    """A command is malformed; the parser turns it into a ``BadCommand`` event."""


@dataclass(frozen=True, slots=True)
class StringToken:
    """A quoted string or a literal (both strings, unlike atoms)."""

    data: bytes


LPAREN, RPAREN = object(), object()
Token = bytes | StringToken | object  # atom bytes, string, or a paren marker


def tokens(segments: list[bytes | StringToken]) -> list[Token]:
    """Split a command (text segments and literals, in order) into tokens."""
    out: list[Token] = []
    for seg in segments:
        if isinstance(seg, StringToken):
            out.append(seg)
            continue
        i, n = 0, len(seg)
        while i < n:
            c = seg[i]
            if c == 0x20:
                i += 1
            elif c in (0x28, 0x29):
                out.append(LPAREN if c == 0x28 else RPAREN)
                i += 1
            elif c == 0x22:
                token, i = _quoted(seg, i + 1)
                out.append(token)
            else:
                start = i
                while i < n and seg[i] not in _ATOM_SPECIALS:
                    i += 1
                if i == start:
                    raise SyntaxProblem(f"unexpected character {chr(c)!r}")
                out.append(seg[start:i])
    return out


def _quoted(seg: bytes, i: int) -> tuple[StringToken, int]:
    """The quoted string starting after the opening quote at ``i - 1``; returns the
    string and the index after its closing quote."""
    buf = bytearray()
    n = len(seg)
    while True:
        if i >= n:
            raise SyntaxProblem("unterminated quoted string")
        c = seg[i]
        if c == 0x5C:
            if i + 1 >= n or seg[i + 1] not in (0x22, 0x5C):
                raise SyntaxProblem("bad escape in quoted string")
            buf.append(seg[i + 1])
            i += 2
        elif c == 0x22:
            return StringToken(bytes(buf)), i + 1
        elif c in (0x0D, 0x0A, 0x00):
            raise SyntaxProblem("bad character in quoted string")
        else:
            buf.append(c)
            i += 1


def astring(tok: Token, what: str) -> str:
    """An astring as text: atom or string, UTF-8, no NUL."""
    if isinstance(tok, StringToken):
        raw = tok.data
    elif isinstance(tok, bytes):
        raw = tok
    else:
        raise SyntaxProblem(f"{what}: expected a string")
    return utf8_text(raw, what)


def utf8_text(raw: bytes, what: str, error: type[Exception] = SyntaxProblem) -> str:
    """``raw`` as UTF-8 text without NUL, else ``error`` naming ``what``."""
    if b"\x00" in raw:
        raise error(f"{what}: NUL is not allowed")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what}: not UTF-8") from None


def nstring(tok: Token, what: str) -> str | None:
    """A string or NIL (None)."""
    if isinstance(tok, bytes) and tok.upper() == b"NIL":
        return None
    if not isinstance(tok, StringToken):
        raise SyntaxProblem(f"{what}: expected a string or NIL")
    return astring(tok, what)


def sasl_base64(data: bytes) -> bytes:
    """A SASL response line or initial response, base64-decoded (RFC 4959: ``=`` is an
    empty initial response); not base64 is a ``SyntaxProblem`` (answer BAD)."""
    return sasl.decode_base64(data, SyntaxProblem, invalid="invalid base64")


def decode_plain(message: bytes) -> tuple[str, str, str]:
    """RFC 4616 PLAIN message -> (authzid, authcid, password); a malformed one is the
    client's fault (``RemoteProtocolError``, answer BAD)."""
    return sasl.decode_plain(message, RemoteProtocolError,
                             malformed="malformed PLAIN credentials")


# -------------------------------------------------------------------- output helpers


def clean_line(text: str) -> bytes:
    """One response line: no CR/LF/NUL from policy texts can split or forge responses."""
    safe = "".join(" " if ch in "\r\n\x00" else ch for ch in text).strip() or "."
    return safe.encode("utf-8") + b"\r\n"


#: Typographic punctuation with a plain ASCII spelling (the rest of non-ASCII is
#: decomposed, accents dropped).
_ASCII_PUNCTUATION = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
    "\u2014": "-", "\u2026": "...", "\u00a0": " ", "\u2022": "-"})


def refusal_text(text: str, limit: int = MAX_REFUSAL_CHARS) -> str:
    """A refusal as it is shown on the client's screen: ASCII (pre-login IMAP is 7-bit;
    accents dropped, typographic punctuation spelled plainly), one line, at most
    ``limit`` characters (cut at a word, ending in "...")."""
    plain = unicodedata.normalize("NFKD", text.translate(_ASCII_PUNCTUATION))
    ascii_only = "".join(ch if " " <= ch <= "~" else " " for ch in plain
                         if not unicodedata.combining(ch))
    line = " ".join(ascii_only.split())
    if len(line) > limit:
        cut = line[: limit - 3]
        line = (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "..."
    return line or "Access denied by policy"


def quote(text: str) -> str:
    """An IMAP quoted string (caller ensures no CR/LF)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quotable(raw: bytes) -> bool:
    """Safe as an IMAP4rev1 quoted string: 7-bit, no CR/LF/NUL, not too long."""
    return len(raw) <= MAX_QUOTED_BYTES and _UNQUOTABLE.search(raw) is None


def greeting_line(capabilities: list[str], text: str = "mailward ready") -> bytes:
    return b"* OK [CAPABILITY " + " ".join(capabilities).encode() + b"] " + clean_line(text)


def capability_line(capabilities: list[str]) -> bytes:
    return b"* CAPABILITY " + " ".join(capabilities).encode() + b"\r\n"


def tagged_line(tag: str | None, status: str, text: str, code: str = "") -> bytes:
    """``<tag> <status> [<code>] <text>``; tag None or "*" gives an untagged line."""
    head = (tag or "*").encode() + b" " + status.encode() + b" "
    if code:
        head += b"[" + code.encode() + b"] "
    return head + clean_line(text)


def untagged_line(status: str, text: str, code: str = "") -> bytes:
    return tagged_line("*", status, text, code)


def bye_line(text: str) -> bytes:
    return b"* BYE " + clean_line(text)


def continuation_line(text: str = "") -> bytes:
    return b"+ " + clean_line(text) if text else b"+ \r\n"


def id_line(fields: dict[str, str]) -> bytes:
    body = " ".join(f"{quote(k)} {quote(v)}" for k, v in fields.items())
    return b"* ID (" + body.encode() + b")\r\n"
