"""nginx's two questions and mailward's answers, without I/O.

``auth_http`` (ngx_mail_auth_http_module): nginx sends the login it received as
request headers (``Auth-User`` and ``Auth-Pass`` URL-encoded, ``Auth-Protocol``,
``Auth-Login-Attempt``, ``Client-IP``, and with ``auth_http_pass_client_cert on`` the
client certificate as URL-encoded PEM in ``Auth-SSL-Cert``); :func:`parse_mail_request`
turns them into a :class:`MailRequest`. The answer is headers only
(:class:`MailAnswer`): ``Auth-Status: OK`` with ``Auth-Server``/``Auth-Port``, or the
refusal text nginx sends the client (IMAP ``<tag> NO <text>``, POP3 ``-ERR <text>``,
SMTP ``<Auth-Error-Code> <text>``), with ``Auth-Wait`` (seconds) when the client may
try again on the same connection; without it nginx closes the connection.

``auth_request`` (ngx_http_auth_request_module): the subrequest carries the original
request's headers (``Authorization``) plus what the nginx location sets:
:data:`ORIGINAL_URI` (``$request_uri``), :data:`ORIGINAL_METHOD`, :data:`REAL_IP`,
:data:`CLIENT_CERT` (``$ssl_client_escaped_cert``); :func:`parse_eas_request` makes an
:class:`EasRequest`. The status answers (200, 401, 403 with :data:`REFUSAL_HEADER`).

Invariant (property-tested): any header values give a request or
:class:`BadAuthRequest`, and any answer renders as header values of printable ASCII
only, so nothing a client sends can split a header or reach nginx as a 500.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import unquote_to_bytes, urlsplit

from proxy.frontends.imap_syntax import refusal_text

MailProtocol = Literal["imap", "pop3", "smtp"]
PROTOCOLS: Final = ("imap", "pop3", "smtp")
#: Methods whose password mailward can check upstream (``login`` is SASL LOGIN).
PASSWORD_METHODS: Final = frozenset({"plain", "login"})
#: nginx keeps memory per attempt: after this many the answer has no Auth-Wait (close).
MAX_WAITED_ATTEMPTS: Final = 10
#: Longest user name and password accepted (bytes, after URL decoding).
MAX_USER_BYTES: Final = 320
MAX_PASSWORD_BYTES: Final = 1024
#: Longest client certificate (PEM, after URL decoding).
MAX_CERT_BYTES: Final = 16 * 1024
#: Longest refusal text nginx is given (it becomes one protocol line).
MAX_TEXT_CHARS: Final = 400

ORIGINAL_URI: Final = "X-Original-URI"
ORIGINAL_METHOD: Final = "X-Original-Method"
REAL_IP: Final = "X-Real-IP"
CLIENT_CERT: Final = "X-SSL-Client-Cert"
#: The refusal text on a 403 to ``auth_request`` (as the ActiveSync front end's).
REFUSAL_HEADER: Final = "X-Mailward-Refusal"


class BadAuthRequest(Exception):
    """nginx's request lacks something or carries a value that cannot be a login."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class MailRequest:
    """One login nginx's mail proxy asks about."""

    method: str
    user: str
    password: str = field(repr=False)
    protocol: MailProtocol
    attempt: int
    client_ip: str
    client_host: str = ""
    cert_pem: bytes | None = field(default=None, repr=False)
    smtp_helo: str | None = None


@dataclass(frozen=True, slots=True)
class EasRequest:
    """One ActiveSync request nginx's ``auth_request`` asks about."""

    method: str
    path: str
    raw_query: str
    authorization: str | None = field(repr=False)
    client_ip: str
    cert_pem: bytes | None = field(default=None, repr=False)


def _decode(value: str, what: str, limit: int) -> bytes:
    raw = unquote_to_bytes(value)
    if len(raw) > limit:
        raise BadAuthRequest(f"{what} longer than {limit} bytes")
    return raw


def _text(value: str, what: str, limit: int) -> str:
    try:
        text = _decode(value, what, limit).decode("utf-8")
    except UnicodeDecodeError:
        raise BadAuthRequest(f"{what} is not UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise BadAuthRequest(f"{what} holds control characters")
    return text


def client_ip(value: str | None) -> str:
    """The client address nginx names, as a normalised IP literal."""
    if not value:
        raise BadAuthRequest("no client address")
    try:
        return ipaddress.ip_address(value.strip().strip("[]")).compressed
    except ValueError:
        raise BadAuthRequest("the client address is not an IP address") from None


def certificate(value: str | None) -> bytes | None:
    """URL-encoded PEM from nginx (None when absent or empty)."""
    if not value:
        return None
    pem = _decode(value, "client certificate", MAX_CERT_BYTES)
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise BadAuthRequest("the client certificate is not PEM")
    return pem


def parse_mail_request(headers: Mapping[str, str]) -> MailRequest:
    """The login in nginx's ``auth_http`` request; :class:`BadAuthRequest` if none."""
    protocol = headers.get("Auth-Protocol", "").strip().lower()
    if protocol not in PROTOCOLS:
        raise BadAuthRequest("Auth-Protocol must be imap, pop3 or smtp")
    try:
        attempt = int(headers.get("Auth-Login-Attempt", "1").strip())
    except ValueError:
        raise BadAuthRequest("Auth-Login-Attempt is not a number") from None
    if not 1 <= attempt <= 1_000_000:
        raise BadAuthRequest("Auth-Login-Attempt out of range")
    user = _text(headers.get("Auth-User", ""), "Auth-User", MAX_USER_BYTES)
    if not user.strip():
        raise BadAuthRequest("no Auth-User")
    helo = headers.get("Auth-SMTP-Helo")
    return MailRequest(
        method=headers.get("Auth-Method", "plain").strip().lower()[:32],
        user=user,
        password=_text(headers.get("Auth-Pass", ""), "Auth-Pass", MAX_PASSWORD_BYTES),
        protocol=protocol,  # type: ignore[arg-type]  # one of PROTOCOLS
        attempt=attempt,
        client_ip=client_ip(headers.get("Client-IP")),
        client_host=_token(headers.get("Client-Host")),
        cert_pem=certificate(headers.get("Auth-SSL-Cert")),
        smtp_helo=_token(helo) or None,
    )


def parse_eas_request(headers: Mapping[str, str]) -> EasRequest:
    """The ActiveSync request behind an ``auth_request`` subrequest."""
    uri = headers.get(ORIGINAL_URI, "")
    if not uri.startswith("/"):
        raise BadAuthRequest(f"{ORIGINAL_URI} must be the request's path and query")
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise BadAuthRequest(f"{ORIGINAL_URI} is not a request target") from None
    method = headers.get(ORIGINAL_METHOD, "POST").strip().upper()
    if not method.isascii() or not method.isalpha() or len(method) > 16:
        raise BadAuthRequest(f"{ORIGINAL_METHOD} is not an HTTP method")
    return EasRequest(method=method, path=parts.path, raw_query=parts.query,
                      authorization=headers.get("Authorization"),
                      client_ip=client_ip(headers.get(REAL_IP)),
                      cert_pem=certificate(headers.get(CLIENT_CERT)))


def header_text(text: str) -> str:
    """A refusal as one header value: the IMAP front end's refusal text (printable
    ASCII, typographic punctuation spelled plainly, one line, at most
    :data:`MAX_TEXT_CHARS` characters)."""
    return refusal_text(text, MAX_TEXT_CHARS)


def _token(value: str | None) -> str:
    """A host or EHLO name nginx passes on, printable ASCII without spaces."""
    return "".join(c for c in value or "" if " " < c <= "~")[:255]


# ------------------------------------------------------------------ answers

Refusal = Literal["credentials", "policy", "temporary", "unavailable", "request"]

#: Per refusal kind: the IMAP response code, the POP3 one, the SMTP reply code.
_CODES: Final[dict[Refusal, tuple[str, str, str]]] = {
    "credentials": ("[AUTHENTICATIONFAILED]", "[AUTH]", "535 5.7.8"),
    "policy": ("[ALERT]", "[SYS/PERM]", "550 5.7.1"),
    "temporary": ("[UNAVAILABLE]", "[SYS/TEMP]", "454 4.7.0"),
    "unavailable": ("[UNAVAILABLE]", "[SYS/TEMP]", "451 4.4.1"),
    "request": ("[AUTHENTICATIONFAILED]", "[AUTH]", "535 5.7.0"),
}


@dataclass(frozen=True, slots=True)
class MailAnswer:
    """mailward's answer to one ``auth_http`` request (see the module docstring)."""

    status: str
    server: str | None = None
    port: int | None = None
    wait: int | None = None
    error_code: str | None = None

    def headers(self) -> dict[str, str]:
        out = {"Auth-Status": self.status}
        if self.server is not None and self.port is not None:
            out["Auth-Server"], out["Auth-Port"] = self.server, str(self.port)
        if self.wait is not None:
            out["Auth-Wait"] = str(self.wait)
        if self.error_code is not None:
            out["Auth-Error-Code"] = self.error_code
        return out


def allowed(upstream: str) -> MailAnswer:
    """``Auth-Status: OK`` sending nginx to ``upstream`` (``IP:port``, ``[v6]:port``)."""
    host, _, port = upstream.rpartition(":")
    return MailAnswer("OK", host.strip("[]"), int(port))


def refused(protocol: str, kind: Refusal, text: str, *, attempt: int = 1,
            delay_s: float | None = None, smtp_code: str | None = None) -> MailAnswer:
    """A refusal nginx tells the client, in the protocol's words. ``delay_s`` (a wrong
    password) lets the client retry after ``Auth-Wait`` (at least 1 s, nginx's 0
    means close), until :data:`MAX_WAITED_ATTEMPTS`; ``smtp_code`` overrides the
    SMTP reply code (the upstream's own)."""
    imap, pop3, smtp = _CODES[kind]
    body = header_text(text)
    wait = None
    if delay_s is not None and attempt < MAX_WAITED_ATTEMPTS:
        wait = max(1, math.ceil(delay_s))
    if protocol == "smtp":
        return MailAnswer(body, wait=wait, error_code=smtp_code or smtp)
    code = imap if protocol == "imap" else pop3
    status = body if body.startswith("[") else f"{code} {body}"
    return MailAnswer(status[:MAX_TEXT_CHARS], wait=wait)


__all__ = [
    "CLIENT_CERT",
    "MAX_WAITED_ATTEMPTS",
    "ORIGINAL_METHOD",
    "ORIGINAL_URI",
    "PASSWORD_METHODS",
    "PROTOCOLS",
    "REAL_IP",
    "REFUSAL_HEADER",
    "BadAuthRequest",
    "EasRequest",
    "MailAnswer",
    "MailRequest",
    "allowed",
    "header_text",
    "parse_eas_request",
    "parse_mail_request",
    "refused",
]
