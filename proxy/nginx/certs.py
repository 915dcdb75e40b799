"""The device certificate nginx passes on, verified again by mailward.

nginx verified the client's certificate in its own TLS handshake against its own
``ssl_client_certificate``; mailward does not take nginx's word for which CA that was.
:class:`CertificateCheck` verifies the PEM against ``[tls] client_ca``, the bundle the
front ends' handshakes use, now, as a TLS client certificate (cryptography's X.509
path validation), and hands the gate the same :class:`~proxy.ids.ClientCert` facts a
front end's handshake gives (device id, rfc822 user, what a CRL lists it by). Results
are remembered per certificate until it expires (a phone presents the same one on
every login); a CRL or a revocation is still the gate's to apply on every decision.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store

from proxy.ids import ClientCert, client_cert_from_der

#: Certificates whose verification is remembered (oldest dropped first).
CACHE_SIZE: Final = 4096


class UntrustedCertificate(Exception):
    """The certificate does not chain to ``[tls] client_ca`` or is not valid now."""


class CertificateCheck:
    """Verifies client certificates against one CA bundle (see the module docstring)."""

    def __init__(self, client_ca: Path | None) -> None:
        anchors = x509.load_pem_x509_certificates(client_ca.read_bytes()) \
            if client_ca is not None else []
        self._store = Store(anchors) if anchors else None
        self._cache: OrderedDict[str, tuple[ClientCert, float]] = OrderedDict()

    def verify(self, pem: bytes, now: float) -> ClientCert:
        """The certificate's identity facts; :class:`UntrustedCertificate` if it fails."""
        key = hashlib.sha256(pem).hexdigest()
        hit = self._cache.get(key)
        if hit is not None and now <= hit[1]:
            self._cache.move_to_end(key)
            return hit[0]
        if self._store is None:
            raise UntrustedCertificate("no [tls] client_ca to verify device certificates")
        try:
            certs = x509.load_pem_x509_certificates(pem)
            verifier = PolicyBuilder().store(self._store).time(
                dt.datetime.fromtimestamp(int(now), dt.UTC)).build_client_verifier()
            verified = verifier.verify(certs[0], certs[1:])
        except Exception as exc:  # ValueError, VerificationError: hostile input
            raise UntrustedCertificate(f"{type(exc).__name__}: {exc}"[:200]) from None
        facts = client_cert_from_der(certs[0].public_bytes(Encoding.DER))
        if facts is None:
            raise UntrustedCertificate("unreadable certificate")
        until = min(c.not_valid_after_utc for c in verified.chain).timestamp()
        self._cache[key] = (facts, until)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return facts


__all__ = ["CertificateCheck", "UntrustedCertificate"]
