"""SASL data that IMAP, POP3 and SMTP decode alike (pure, no I/O).

A response line or initial response is base64 (``=`` is an empty one: RFC 4954, 4959,
5034); a PLAIN message is ``authzid NUL authcid NUL password`` (RFC 4616). The front
ends differ only in how they answer bad data, so each passes its own error type:
``error(text)`` is what is raised, with the protocol's wording where it has its own.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

ErrorFactory = Callable[[str], Exception]


def decode_base64(data: bytes, error: ErrorFactory, *,
                  invalid: str = "Invalid base64") -> bytes:
    """``data`` base64-decoded; raises ``error(invalid)`` when it is not base64."""
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise error(invalid) from None


def decode_plain(message: bytes, error: ErrorFactory, *,
                 malformed: str = "Malformed PLAIN credentials") -> tuple[str, str, str]:
    """A PLAIN message -> (authzid, authcid, password); raises ``error(malformed)``
    without two NULs or with an empty authcid, and ``error(...)`` when it is not
    UTF-8."""
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise error(malformed)
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise error("PLAIN credentials are not UTF-8") from None
    return authzid, authcid, password


__all__ = ["ErrorFactory", "decode_base64", "decode_plain"]
