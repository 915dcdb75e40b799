"""The server side of IMAP ``AUTHENTICATE`` as mailward relays it: pure, no I/O.

mailward never checks a credential itself (DESIGN.md, "Sessions, in order"): it reads
the *user* from the client's SASL messages, because the gate decides per user, and
relays the credentials to the upstream, which verifies them. So only mechanisms whose
messages name the user can pass through:

- ``PLAIN`` (RFC 4616) and ``LOGIN`` (draft-murchison-sasl-login: the server prompts
  ``Username:`` then ``Password:``): user and password, relayed as the upstream's
  ``LOGIN`` command.
- ``XOAUTH2`` (Google's, also Microsoft's) and ``OAUTHBEARER`` (RFC 7628): the user the
  client *claims* (``user=``, or the GS2 header's ``a=``) and a bearer token; the
  message is relayed as it is with ``AUTHENTICATE``, so the upstream validates the
  token and that it was issued to that user. An ``OAUTHBEARER`` message without ``a=``
  names no user mailward could decide for: refused ``NO [CANNOT]``.

Mechanisms such as ``CRAM-MD5`` or ``SCRAM-*`` never reveal a password a proxy could
relay, and are not offered.

A :class:`SaslExchange` is fed the client's decoded responses (:meth:`SaslExchange.step`)
and returns the next :class:`Challenge` or the :class:`Credentials` to relay. A malformed
message raises :class:`RemoteProtocolError` with ``reply = "BAD"``; a well-formed one
that cannot be relayed, :class:`SaslRefused` (``NO``). Nothing else escapes (fuzzed in
``tests/test_imap_sasl.py``). Tokens and passwords are never in a ``repr``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.frontends.imap_syntax import (
    SUPPORTED_MECHANISMS,
    RemoteProtocolError,
    decode_plain,
    utf8_text,
)

#: Mechanisms relayed as the upstream's ``AUTHENTICATE`` (the upstream must offer them).
TOKEN_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
#: What the proxy answers an upstream's error challenge with (RFC 7628 3.2.3: a lone
#: %x01 for OAUTHBEARER; Google's XOAUTH2: an empty response); the tagged NO follows.
ERROR_ACKNOWLEDGEMENT = {"XOAUTH2": b"", "OAUTHBEARER": b"\x01"}
_KEY = re.compile(rb"[A-Za-z]+\Z")
#: RFC 7628 ``value``: VCHAR, SP, HTAB, CR, LF (no NUL, no %x01 separators).
_VALUE = re.compile(rb"[\x21-\x7e \t\r\n]*\Z")
_BEARER = re.compile(rb"[Bb][Ee][Aa][Rr][Ee][Rr] +[\x21-\x7e]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SaslRefused(RemoteProtocolError):
    """Well-formed, but not something the proxy may relay (answer ``NO [CANNOT]``);
    ``reason`` names it in the session_end record."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reply="NO", code="CANNOT")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``+ <base64 of data>`` and wait for the client's next response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """What goes upstream: ``mechanism`` empty means the ``LOGIN`` command with
    ``user`` and ``password``; else ``AUTHENTICATE <mechanism>`` with ``response``."""

    user: str
    password: str = field(default="", repr=False)
    mechanism: str = ""
    response: bytes = field(default=b"", repr=False)


def _text(raw: bytes, what: str) -> str:
    return utf8_text(raw, what, RemoteProtocolError)


def _user(raw: bytes, what: str) -> str:
    """A user name: UTF-8, not empty, no control characters."""
    user = _text(raw, what)
    if not user or _CONTROL.search(user):
        raise RemoteProtocolError(f"{what}: empty or with control characters")
    return user


def _pairs(parts: list[bytes], mechanism: str) -> dict[bytes, bytes]:
    """``key=value`` fields separated by %x01 (RFC 7628 ``kvpair``), each key once."""
    fields: dict[bytes, bytes] = {}
    for part in parts:
        key, eq, value = part.partition(b"=")
        if not eq or not _KEY.match(key) or not _VALUE.match(value) or key in fields:
            raise RemoteProtocolError(f"malformed {mechanism} response")
        fields[key] = value
    return fields


def _bearer(fields: dict[bytes, bytes], mechanism: str) -> None:
    if not _BEARER.match(fields.get(b"auth", b"")):
        raise RemoteProtocolError(f"{mechanism}: no bearer token")


def decode_xoauth2(message: bytes) -> str:
    """The user of an XOAUTH2 message: ``user=<user>^Aauth=Bearer <token>^A^A``."""
    if not message.endswith(b"\x01\x01") or len(message) < 3:
        raise RemoteProtocolError("malformed XOAUTH2 response")
    fields = _pairs(message[:-2].split(b"\x01"), "XOAUTH2")
    _bearer(fields, "XOAUTH2")
    return _user(fields.get(b"user", b""), "XOAUTH2 user")


def _saslname(raw: bytes) -> str:
    """RFC 5801 ``saslname``: ``=2C`` is a comma, ``=3D`` an equals sign, no other ``=``."""
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] == 0x3D:
            esc = raw[i : i + 3].upper()
            if esc not in (b"=2C", b"=3D"):
                raise RemoteProtocolError("OAUTHBEARER: bad escape in a=")
            out.append(0x2C if esc == b"=2C" else 0x3D)
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return _user(bytes(out), "OAUTHBEARER user")


def decode_oauthbearer(message: bytes) -> str:
    """The user of an OAUTHBEARER message (RFC 7628 3.1): the GS2 header's ``a=``.
    ``n,a=<user>,^Ahost=...^Aport=...^Aauth=Bearer <token>^A^A``."""
    flag, sep1, rest = message.partition(b",")
    authzid, sep2, kvs = rest.partition(b",")
    if not (sep1 and sep2) or not kvs.startswith(b"\x01") or not kvs.endswith(b"\x01\x01"):
        raise RemoteProtocolError("malformed OAUTHBEARER response")
    if flag not in (b"n", b"y"):
        raise RemoteProtocolError("OAUTHBEARER: channel binding is not supported")
    fields = _pairs(kvs[1:-2].split(b"\x01"), "OAUTHBEARER") if len(kvs) > 2 else {}
    _bearer(fields, "OAUTHBEARER")
    if not authzid:
        raise SaslRefused("OAUTHBEARER needs the user name (a=) to be relayed",
                          reason="sasl_no_user")
    if not authzid.startswith(b"a=") or len(authzid) == 2:
        raise RemoteProtocolError("malformed OAUTHBEARER authorization identity")
    return _saslname(authzid[2:])


class SaslExchange:
    """One ``AUTHENTICATE`` exchange of one mechanism (see the module docstring)."""

    __slots__ = ("_user", "mechanism")

    def __init__(self, mechanism: str) -> None:
        if mechanism not in SUPPORTED_MECHANISMS:
            raise ValueError(f"not a relayable mechanism: {mechanism}")
        self.mechanism = mechanism
        self._user: str | None = None  # LOGIN: the user name, once given

    def __repr__(self) -> str:
        return f"<SaslExchange {self.mechanism}>"

    def start(self) -> Challenge:
        """The first challenge when the client sent no initial response."""
        return Challenge(b"Username:" if self.mechanism == "LOGIN" else b"")

    def step(self, response: bytes) -> Challenge | Credentials:
        """The client's next (decoded) response -> the next challenge or the result."""
        match self.mechanism:
            case "PLAIN":
                authzid, user, password = decode_plain(response)
                if authzid and authzid != user:
                    # Logging in as someone else would bypass the per-user device check.
                    raise SaslRefused("Authorization identity not supported",
                                      reason="authzid_refused")
                return Credentials(user, password)
            case "LOGIN":
                if self._user is None:
                    self._user = _user(response, "user name")
                    return Challenge(b"Password:")
                return Credentials(self._user, _text(response, "password"))
            case "XOAUTH2":
                return Credentials(decode_xoauth2(response), mechanism="XOAUTH2",
                                   response=response)
        return Credentials(decode_oauthbearer(response), mechanism="OAUTHBEARER",
                           response=response)


__all__ = [
    "ERROR_ACKNOWLEDGEMENT",
    "TOKEN_MECHANISMS",
    "Challenge",
    "Credentials",
    "SaslExchange",
    "SaslRefused",
    "decode_oauthbearer",
    "decode_xoauth2",
]
