"""Identifiers shared by posture reports, TLS client certificates and ActiveSync.

A device id is the same string everywhere it appears: a report's ``sub``, the SAN URI
``urn:mailward:device:<id>`` of a device certificate, and an ActiveSync ``DeviceId``.
This module holds their syntax and the certificate reading; it imports
``cryptography`` only when a certificate is read, so the sans-IO ActiveSync decoder
can import it cheaply.
"""

from __future__ import annotations

import re
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
