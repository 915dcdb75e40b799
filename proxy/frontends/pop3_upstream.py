"""Sans-IO client side of the login to the upstream POP3 server.

No networking code: :class:`UpstreamLogin` is fed events (:class:`UpstreamDataReceived`,
:class:`UpstreamTlsEstablished`) and returns commands (:class:`SendToUpstream`,
:class:`StartUpstreamTls`, :class:`ReportCapabilities`, :class:`LoginAnswered`), which
the executor in ``pop3.py`` performs. One command is sent at a time and its answer
awaited (no pipelining: a login is a handful of short round trips to a near server).
The conversation, in order:

1. the greeting (``+OK``; Dovecot adds ``[XCLIENT]`` when it trusts the proxy);
2. with ``starttls``: ``STLS``, its ``+OK``, the handshake (bytes the server sent after
   the ``+OK`` are discarded: they were not protected by TLS);
3. ``CAPA`` (a server without it answers ``-ERR``: then USER/PASS, RFC 1939's baseline);
4. ``XCLIENT ADDR=<client> PORT=<port>`` when the greeting offered it, so the server
   logs and rate-limits (auth penalty) the phone's address, not the proxy's; its answer
   does not matter;
5. ``AUTH PLAIN <initial response>`` when the server offers SASL PLAIN (RFC 5034; the
   response waits for the server's ``+`` when the line would pass 255 octets), else
   ``USER`` and ``PASS``; the answer to the last one ends the conversation
   (:class:`LoginAnswered`, the server's own line, for the client).

Anything unexpected (a greeting that is not ``+OK``, a refused STLS, a line over
:data:`MAX_UPSTREAM_RESPONSE_BYTES`, a closed or silent server) raises
:class:`RemoteProtocolError` or is the executor's timeout: the client is told the
server is unavailable (``-ERR [SYS/TEMP]``).
"""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass

from proxy.frontends.events import ReportCapabilities, SendToUpstream, StartUpstreamTls
from proxy.frontends.pop3_wire import LocalProtocolError, RemoteProtocolError
from proxy.frontends.preauth_wire import UpstreamConversation

#: Longest answer (the CAPA list included) the proxy reads from the upstream before
#: login; more is not a POP3 server talking.
MAX_UPSTREAM_RESPONSE_BYTES = 64 * 1024
#: RFC 5034 section 4: an AUTH command with its initial response stays within 255 octets.
MAX_AUTH_LINE_BYTES = 255
_XCLIENT_IN_GREETING = re.compile(rb"^\+OK \[XCLIENT\]", re.IGNORECASE)
_UNSENDABLE = re.compile(r"[\r\n\x00]")  # in USER/PASS arguments: command injection

# ------------------------------------------------------------------ events and commands
# Protocol-neutral ones (``events``: UpstreamDataReceived, SendToUpstream, ...) and the answer.


@dataclass(frozen=True, slots=True)
class LoginAnswered:
    """The server's answer to the login: its ``+OK`` or ``-ERR`` line, CRLF included."""

    ok: bool
    line: bytes


UpstreamCommand = SendToUpstream | StartUpstreamTls | ReportCapabilities | LoginAnswered


class Step(enum.Enum):
    """What the proxy is waiting for; each has exactly one command in flight."""

    GREETING = "greeting"
    STLS = "stls"  # the answer to STLS
    HANDSHAKE = "handshake"  # STLS accepted, waiting for the TLS handshake
    CAPA = "capa"  # the CAPA list (or -ERR)
    XCLIENT = "xclient"
    AUTH_CONTINUATION = "auth_continuation"  # "+ " for AUTH PLAIN without IR
    USER = "user"
    LOGIN = "login"  # the answer to AUTH or PASS
    DONE = "done"


def quit_command() -> bytes:
    """What the proxy sends before it drops an upstream connection it did not use.
    Never sent on a spliced session: QUIT would commit the client's DELEs."""
    return b"QUIT\r\n"


def xclient_command(client_ip: str, client_port: int) -> bytes:
    return f"XCLIENT ADDR={client_ip} PORT={client_port}\r\n".encode("ascii")


def plain_response(user: str, password: str) -> bytes:
    """The base64 PLAIN message (RFC 4616) with no authorization identity."""
    raw = b"\x00" + user.encode("utf-8") + b"\x00" + password.encode("utf-8", "surrogateescape")
    return base64.b64encode(raw)


def parse_capa(lines: list[bytes]) -> tuple[str, ...]:
    """CAPA's lines (between ``+OK`` and ``.``) -> capability lines as text."""
    return tuple(line.decode("ascii", "replace").strip() for line in lines if line.strip())


def offers_plain(capabilities: tuple[str, ...]) -> bool:
    return any(c.upper().split()[:1] == ["SASL"] and "PLAIN" in c.upper().split()[1:]
               for c in capabilities if c)


# --------------------------------------------------------------------------- the login


class UpstreamLogin(UpstreamConversation[Step, UpstreamCommand]):
    """One login conversation with the upstream server (see the module docstring);
    ``handle`` and its guard are ``UpstreamConversation``'s."""

    def __init__(self, *, user: str, password: str, starttls: bool,
                 client_ip: str = "", client_port: int = 0) -> None:
        super().__init__(Step.GREETING, handshake=Step.HANDSHAKE, done=Step.DONE,
                         starttls_verb="STLS", local_error=LocalProtocolError)
        self.rest = b""  # what the server sent after the login answer (for the client)
        self._user, self._password = user, password
        self._starttls = starttls
        self._client = (client_ip, client_port)
        self._xclient = False  # the greeting offered XCLIENT
        self._plain = False  # the server offers SASL PLAIN (from its CAPA)
        self._capa: list[bytes] | None = None  # CAPA lines while the list is read

    def __repr__(self) -> str:  # never the password
        return f"<UpstreamLogin user={self._user!r} {self.phase.value}>"

    def _tls_established(self) -> list[UpstreamCommand]:
        return self._send(Step.CAPA, b"CAPA\r\n")

    def _next_response(self) -> bytes | None:
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > MAX_UPSTREAM_RESPONSE_BYTES:
                raise RemoteProtocolError("upstream response too long")
            return None
        line = bytes(self._buf[: nl + 1])
        del self._buf[: nl + 1]
        return line

    def _send(self, step: Step, data: bytes) -> list[UpstreamCommand]:
        self.phase = step
        return [SendToUpstream(data)]

    # ------------------------------------------------------------------ answers

    def _respond(self, line: bytes) -> list[UpstreamCommand]:
        ok = line.startswith(b"+OK")
        match self.phase:
            case Step.GREETING:
                if not ok:
                    raise RemoteProtocolError(f"upstream greeting {line[:100]!r}")
                self._xclient = _XCLIENT_IN_GREETING.match(line) is not None
                if self._starttls:
                    return self._send(Step.STLS, b"STLS\r\n")
                return self._send(Step.CAPA, b"CAPA\r\n")
            case Step.STLS:
                if not ok:
                    raise RemoteProtocolError("upstream refused STLS")
                self.phase = Step.HANDSHAKE
                self._buf.clear()  # sent before TLS: a man in the middle may have injected it
                return [StartUpstreamTls()]
            case Step.CAPA:
                return self._capa_line(line, ok)
            case Step.XCLIENT:  # refused or not, the login goes on
                return self._login()
            case Step.AUTH_CONTINUATION:
                if line.startswith(b"+ ") or line.rstrip(b"\r\n") == b"+":
                    return self._send(Step.LOGIN, plain_response(self._user, self._password)
                                      + b"\r\n")
                return [self._finish(line)]
            case Step.USER:
                if not ok:
                    return [self._finish(line)]
                return self._send(Step.LOGIN, b"PASS "
                                  + self._password.encode("utf-8", "surrogateescape") + b"\r\n")
            case _:  # Step.LOGIN
                if line.startswith(b"+ "):
                    raise RemoteProtocolError("upstream asked for more SASL data")
                return [self._finish(line)]

    def _capa_line(self, line: bytes, ok: bool) -> list[UpstreamCommand]:
        if self._capa is None:
            if not ok:  # no CAPA (RFC 1939 server): USER/PASS it is
                return self._after_capa(())
            self._capa = []
            return []
        if line.rstrip(b"\r\n") != b".":
            self._capa.append(line)
            return []
        caps = parse_capa(self._capa)
        self._capa = None
        return self._after_capa(caps)

    def _after_capa(self, caps: tuple[str, ...]) -> list[UpstreamCommand]:
        self._plain = offers_plain(caps)
        out: list[UpstreamCommand] = [ReportCapabilities(caps)]
        ip, port = self._client
        if self._xclient and ip:
            return out + self._send(Step.XCLIENT, xclient_command(ip, port))
        return out + self._login()

    def _login(self) -> list[UpstreamCommand]:
        if self._plain:
            response = plain_response(self._user, self._password)
            line = b"AUTH PLAIN " + response + b"\r\n"
            if len(line) <= MAX_AUTH_LINE_BYTES:
                return self._send(Step.LOGIN, line)
            return self._send(Step.AUTH_CONTINUATION, b"AUTH PLAIN\r\n")
        if _UNSENDABLE.search(self._user) or _UNSENDABLE.search(self._password):
            # Only AUTH PLAIN can carry these; USER/PASS would split into commands.
            self.phase = Step.DONE
            self._password = ""
            return [LoginAnswered(False, b"-ERR [AUTH] These credentials cannot be sent "
                                         b"to the mail server.\r\n")]
        return self._send(Step.USER, b"USER " + self._user.encode("utf-8") + b"\r\n")

    def _finish(self, line: bytes) -> LoginAnswered:
        self.phase = Step.DONE
        self.rest = bytes(self._buf)
        self._buf.clear()
        self._password = ""
        return LoginAnswered(line.startswith(b"+OK"), line)


__all__ = [
    "MAX_AUTH_LINE_BYTES",
    "MAX_UPSTREAM_RESPONSE_BYTES",
    "LoginAnswered",
    "ReportCapabilities",
    "SendToUpstream",
    "StartUpstreamTls",
    "Step",
    "UpstreamCommand",
    "UpstreamLogin",
    "offers_plain",
    "parse_capa",
    "plain_response",
    "quit_command",
    "xclient_command",
]
