"""Identifiers shared by posture reports, TLS client certificates and ActiveSync.

A device id is the same string everywhere it appears: a report's ``sub``, the SAN URI
``urn:mailward:device:<id>`` of a device certificate, and an ActiveSync ``DeviceId``.
This module holds their syntax and the certificate reading; it imports
``cryptography`` only when a certificate is read, so the sans-IO ActiveSync decoder
can import it cheaply.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Final

#: 1-128 characters; the same pattern for reports, certificates and EAS DeviceIds.
DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: The SAN URI prefix that names a device in its certificate.
DEVICE_URI_PREFIX: Final = "urn:mailward:device:"
#: A mailbox as reports and certificates carry it (local@domain, no controls).
USER_RE: Final = re.compile(r"[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,255}")


def device_uri(device_id: str) -> str:
    """The SAN URI that names ``device_id`` in a device certificate."""
    return DEVICE_URI_PREFIX + device_id


def device_id_from_der(der: bytes | None) -> str | None:
    """The device id in a (verified) client certificate's SAN, if any."""
    if not der:
        return None
    from cryptography import x509  # deferred: the EAS decoder imports this module

    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(DEVICE_URI_PREFIX) and len(uri) > len(DEVICE_URI_PREFIX):
            return uri[len(DEVICE_URI_PREFIX) :]
    return None


@dataclass(frozen=True, slots=True)
class ClientCert:
    """What the gate needs of a verified client certificate (the front end verified
    it in the TLS handshake): the device and user it names, and what a CRL lists it
    by (issuer name DER, serial number)."""

    device_id: str | None  # SAN URI urn:mailward:device:<id>
    user: str | None = None  # SAN rfc822Name, lower-cased
    serial: int | None = None
    issuer: bytes = b""  # DER of the issuer name
    fingerprint: str = ""  # SHA-256 hex of the certificate


@functools.lru_cache(maxsize=4096)
def client_cert_from_der(der: bytes | None) -> ClientCert | None:
    """A verified client certificate's identity facts; remembered by the
    certificate's bytes (a phone presents the same certificate on every connection)."""
    if not der:
        return None
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            mails = san.get_values_for_type(x509.RFC822Name)
        except x509.ExtensionNotFound:
            uris, mails = [], []
        issuer = cert.issuer.public_bytes()
        serial = cert.serial_number
    except ValueError:
        return None
    device = next((u[len(DEVICE_URI_PREFIX):] for u in uris
                   if u.startswith(DEVICE_URI_PREFIX) and len(u) > len(DEVICE_URI_PREFIX)), None)
    return ClientCert(device_id=device, user=mails[0].lower() if mails else None,
                      serial=serial, issuer=issuer,
                      fingerprint=hashlib.sha256(der).hexdigest())
