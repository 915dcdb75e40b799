"""Sans-IO client side of the login to the upstream IMAP server.

No networking code: :class:`UpstreamLogin` is fed events (:class:`UpstreamDataReceived`,
:class:`UpstreamTlsEstablished`) and returns commands (:class:`SendToUpstream`,
:class:`StartUpstreamTls`, :class:`ReportCapabilities`, :class:`LoginAnswered`), which
the executor in ``imap.py`` performs. The conversation, in order:

1. the greeting (``* OK``; its ``[CAPABILITY ...]`` code is kept when no STARTTLS follows);
2. with ``starttls``: ``mw.tls STARTTLS``, its tagged OK, the handshake (bytes the
   server sent after the OK are discarded: they were not protected by TLS);
3. ``mw.cap CAPABILITY`` when the capabilities are not known yet;
4. ``mw.id ID (... "x-originating-ip" ...)`` when the server has ID (RFC 2971), so the
   server logs and rate-limits the client's address (Dovecot believes it from
   ``login_trusted_networks`` only), pipelined with
5. ``<client tag> LOGIN <user> <password>`` (quoted strings, LITERAL+ literals, or
   synchronizing literals sent after the server's ``+``), or ``<client tag>
   AUTHENTICATE <mechanism>`` relaying a client's token message (with SASL-IR when the
   server has it; an error challenge is acknowledged as the mechanism says), and its
   tagged answer, which ends the conversation (:class:`LoginAnswered`).

A *probe* (:meth:`UpstreamLogin.probe`) stops after step 3: it reports the server's
capabilities and logs out.

Anything unexpected from the server (a greeting that is not OK, a refused STARTTLS,
``* BYE``, a response over :data:`MAX_UPSTREAM_RESPONSE_BYTES`) raises
:class:`RemoteProtocolError` with ``reply = "NO"``: the client is told the server is
unavailable. Timeouts belong to the executor.
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.frontends.events import ReportCapabilities, SendToUpstream, StartUpstreamTls
from proxy.frontends.imap_sasl import ERROR_ACKNOWLEDGEMENT
from proxy.frontends.imap_syntax import (
    LITERAL_AT_END,
    MAX_ID_FIELDS,
    MAX_UPSTREAM_RESPONSE_BYTES,
    LocalProtocolError,
    RemoteProtocolError,
    quotable,
    quote,
)
from proxy.frontends.preauth_wire import UpstreamConversation

#: Tags of the proxy's own upstream commands (never sent to the client; clients may
#: not use the ``mw.`` prefix, see ``imap_syntax.RESERVED_TAG_PREFIX``).
TAG_ID, TAG_TLS, TAG_CAP, TAG_BYE = "mw.id", "mw.tls", "mw.cap", "mw.bye"
#: Stands for "the server's continuation request" in the list of awaited answers.
_CONTINUATION = "+"
_CAPS_IN_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)

# ------------------------------------------------------------------ events and commands
# Protocol-neutral ones (``events``: UpstreamDataReceived, SendToUpstream, ...) and the answer.


@dataclass(frozen=True, slots=True)
class LoginAnswered:
    """The server's tagged answer to LOGIN (and the untagged lines before it)."""

    ok: bool
    untagged: bytes
    tagged: bytes


UpstreamCommand = SendToUpstream | StartUpstreamTls | ReportCapabilities | LoginAnswered


class Phase(enum.Enum):
    GREETING = "greeting"  # waiting for "* OK"
    TALKING = "talking"  # waiting for the answers listed in ``_expect``
    HANDSHAKE = "handshake"  # STARTTLS accepted, waiting for the TLS handshake
    DONE = "done"  # LOGIN answered


def logout_command() -> bytes:
    """What the proxy sends before it drops an upstream connection it will not use."""
    return f"{TAG_BYE} LOGOUT\r\n".encode()


def id_command(client_fields: Sequence[tuple[str, str | None]] | None,
               client_ip: str, client_port: int, connected_ip: str = "",
               connected_port: int = 0) -> bytes:
    """``mw.id ID (...)``: the client's own fields that are safe to pass on, then
    ``x-originating-ip`` / ``-port`` (the client's address) and ``x-connected-ip`` /
    ``-port`` (the proxy's address the client connected to), the fields Dovecot reads
    (the client's own ``x-`` fields never)."""
    fields: list[tuple[str, str]] = []
    for k, v in client_fields or ():
        # Names as well as values: a CR/LF in either would inject upstream commands.
        if (v is not None and not k.lower().startswith("x-") and quotable(k.encode())
                and quotable(v.encode())):
            fields.append((k, v))
    fields.append(("x-originating-ip", client_ip))
    fields.append(("x-originating-port", str(client_port)))
    if connected_ip:
        fields.append(("x-connected-ip", connected_ip))
        fields.append(("x-connected-port", str(connected_port)))
    body = " ".join(f"{quote(k)} {quote(v)}" for k, v in fields[-MAX_ID_FIELDS:])
    return f"{TAG_ID} ID ({body})\r\n".encode()


def login_segments(tag: str, user: str, password: str, literal_plus: bool) -> list[bytes]:
    """``LOGIN`` as the pieces to send: the first at once, each further one after a
    continuation request (one per synchronizing literal)."""
    segments: list[bytes] = []
    out = f"{tag} LOGIN ".encode()
    for value, sep in ((user, b" "), (password, b"\r\n")):
        raw = value.encode("utf-8")
        if quotable(raw):
            out += quote(value).encode() + sep
        elif literal_plus:
            out += b"{%d+}\r\n" % len(raw) + raw + sep
        else:
            segments.append(out + b"{%d}\r\n" % len(raw))
            out = raw + sep
    segments.append(out)
    return segments


def authenticate_segments(tag: str, mechanism: str, response: bytes,
                          sasl_ir: bool) -> list[bytes]:
    """``AUTHENTICATE`` as the pieces to send (as :func:`login_segments`): with SASL-IR
    one line, else the command and, after the server's ``+``, the response."""
    encoded = base64.b64encode(response)
    if sasl_ir:
        return [f"{tag} AUTHENTICATE {mechanism} ".encode() + (encoded or b"=") + b"\r\n"]
    return [f"{tag} AUTHENTICATE {mechanism}\r\n".encode(), encoded + b"\r\n"]


def _status(line: bytes, tag: str) -> str:
    """``OK``, ``NO`` or ``BAD`` of a tagged response (also without text after it)."""
    words = line[len(tag) + 1 :].split(None, 1)
    return words[0].upper().decode("ascii", "replace") if words else ""


def _capabilities(text: bytes) -> tuple[str, ...]:
    return tuple(c.decode("ascii", "replace") for c in text.split() if c)


def _capabilities_in_code(line: bytes) -> tuple[str, ...] | None:
    """The ``[CAPABILITY ...]`` response code of a greeting, if any."""
    m = _CAPS_IN_CODE.search(line)
    return None if m is None else _capabilities(m.group(1))


# --------------------------------------------------------------------------- the login


class UpstreamLogin(UpstreamConversation[Phase, UpstreamCommand]):
    """One login conversation with the upstream server (see the module docstring);
    ``handle`` and its guard are ``UpstreamConversation``'s."""

    def __init__(self, *, tag: str, user: str, password: str, starttls: bool,
                 id_fields: Sequence[tuple[str, str | None]] | None = None,
                 client_ip: str = "", client_port: int = 0,
                 connected: tuple[str, int] = ("", 0), mechanism: str = "",
                 response: bytes = b"") -> None:
        super().__init__(Phase.GREETING, handshake=Phase.HANDSHAKE, done=Phase.DONE,
                         starttls_verb="STARTTLS", local_error=LocalProtocolError)
        self.rest = b""  # what the server sent after the LOGIN answer (for the client)
        self._tag, self._user, self._password = tag, user, password
        self._mechanism, self._response = mechanism, response  # AUTHENTICATE, if set
        self._acknowledged = False  # an error challenge was answered
        self._starttls = starttls
        self._probe = False
        self._client = (id_fields, client_ip, client_port, *connected)  # for ID
        self._expect: list[str] = []  # awaited answers: tags, or _CONTINUATION
        self._untagged: list[bytes] = []
        self._segments: list[bytes] = []  # LOGIN pieces waiting for a continuation

    @classmethod
    def probe(cls, *, starttls: bool) -> UpstreamLogin:
        """A conversation that only learns the capabilities (no login, no ID)."""
        login = cls(tag="", user="", password="", starttls=starttls)
        login._probe = True
        return login

    def __repr__(self) -> str:  # never the password or token
        return f"<UpstreamLogin tag={self._tag!r} user={self._user!r} {self.phase.value}>"

    def _tls_established(self) -> list[UpstreamCommand]:
        self.phase = Phase.TALKING
        self._expect = [TAG_CAP]
        return [SendToUpstream(f"{TAG_CAP} CAPABILITY\r\n".encode())]

    def _respond(self, line: bytes) -> list[UpstreamCommand]:
        return self._greeting(line) if self.phase is Phase.GREETING else self._answer(line)

    # ------------------------------------------------------------------ reading

    def _next_response(self) -> bytes | None:
        """One response, literals inlined, CRLF included; None until it is complete."""
        buf, pos = self._buf, 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            m = LITERAL_AT_END.search(buf, pos, nl + 1)
            if m is None:
                line = bytes(buf[: nl + 1])
                del buf[: nl + 1]
                return line
            pos = nl + 1 + int(m.group(1))
            if len(buf) < pos:
                break
        if len(buf) > MAX_UPSTREAM_RESPONSE_BYTES:
            raise RemoteProtocolError("upstream response too long", reply="NO")
        return None

    # ------------------------------------------------------------------ phases

    def _greeting(self, line: bytes) -> list[UpstreamCommand]:
        if not line.upper().startswith(b"* OK"):
            raise RemoteProtocolError(f"upstream greeting {line[:100]!r}", reply="NO")
        self.phase = Phase.TALKING
        if self._starttls:
            self._expect = [TAG_TLS]
            return [SendToUpstream(f"{TAG_TLS} STARTTLS\r\n".encode())]
        caps = _capabilities_in_code(line)
        if caps is None:
            self._expect = [TAG_CAP]
            return [SendToUpstream(f"{TAG_CAP} CAPABILITY\r\n".encode())]
        return self._login(caps)

    def _answer(self, line: bytes) -> list[UpstreamCommand]:
        awaited = self._expect[0]
        if awaited == _CONTINUATION:
            if line.startswith(b"+"):
                self._expect.pop(0)
                return [SendToUpstream(self._segments.pop(0))]
            if line.startswith(self._tag.encode() + b" "):  # refused before the literal
                return [self._finish(line, untagged=b"")]
            if line.startswith(b"* BYE"):
                raise RemoteProtocolError(f"upstream said {line[:200]!r}", reply="NO")
            return []
        if not line.startswith(awaited.encode() + b" "):
            if line.startswith(b"+") and awaited == self._tag and self._mechanism:
                return [self._acknowledge_error()]
            if line.startswith(b"* BYE"):
                raise RemoteProtocolError(f"upstream said {line[:200]!r}", reply="NO")
            self._untagged.append(line)
            return []
        self._expect.pop(0)
        untagged, self._untagged = self._untagged, []
        if awaited == TAG_TLS:
            return self._starttls_answered(line)
        if awaited == TAG_CAP:
            caps = next((_capabilities(u[len(b"* CAPABILITY "):].strip()) for u in untagged
                         if u.upper().startswith(b"* CAPABILITY ")), ())
            return self._login(caps)
        if awaited == TAG_ID:
            return []  # the ID command's answers are the proxy's own business
        return [self._finish(line, untagged=b"".join(untagged))]

    def _starttls_answered(self, line: bytes) -> list[UpstreamCommand]:
        if _status(line, TAG_TLS) != "OK":
            raise RemoteProtocolError("upstream refused STARTTLS", reply="NO")
        self.phase = Phase.HANDSHAKE
        self._buf.clear()  # sent before TLS: a man in the middle may have injected it
        return [StartUpstreamTls()]

    def _acknowledge_error(self) -> SendToUpstream:
        """The server refused a token with an error challenge (RFC 7628 3.2.2): answer
        it so that the tagged NO follows; a second challenge is cancelled (``*``)."""
        if self._acknowledged:
            return SendToUpstream(b"*\r\n")
        self._acknowledged = True
        ack = ERROR_ACKNOWLEDGEMENT.get(self._mechanism, b"")
        return SendToUpstream(base64.b64encode(ack) + b"\r\n")

    def _login(self, caps: tuple[str, ...]) -> list[UpstreamCommand]:
        upper = {c.upper() for c in caps}
        if self._probe:
            self.phase = Phase.DONE
            return [ReportCapabilities(caps), SendToUpstream(logout_command())]
        if self._mechanism:
            segments = authenticate_segments(self._tag, self._mechanism, self._response,
                                             "SASL-IR" in upper)
        else:
            segments = login_segments(self._tag, self._user, self._password,
                                      "LITERAL+" in upper)
        first, self._segments = segments[0], segments[1:]
        send_id = "ID" in upper
        # ID's answers come first, under its own tag; then one continuation per
        # synchronizing literal; then LOGIN's tagged answer.
        self._expect = [TAG_ID] * send_id + [_CONTINUATION] * len(self._segments) + [self._tag]
        # Pipelined: ID and LOGIN go out together, saving a round trip.
        data = (id_command(*self._client) if send_id else b"") + first
        return [ReportCapabilities(caps), SendToUpstream(data)]

    def _finish(self, tagged: bytes, *, untagged: bytes) -> LoginAnswered:
        self.phase = Phase.DONE
        self.rest = bytes(self._buf)
        self._buf.clear()
        self._password, self._response = "", b""
        return LoginAnswered(_status(tagged, self._tag) == "OK", untagged, tagged)


__all__ = [
    "TAG_BYE",
    "LoginAnswered",
    "Phase",
    "ReportCapabilities",
    "SendToUpstream",
    "StartUpstreamTls",
    "UpstreamCommand",
    "UpstreamLogin",
    "authenticate_segments",
    "id_command",
    "login_segments",
    "logout_command",
]
