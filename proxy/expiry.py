"""When the certificates and CRLs mailward relies on run out (DESIGN "Health").

A server certificate past notAfter stops every TLS listener; a device CA or attester
certificate past notAfter makes every report ``untrusted_chain``; a CRL past
nextUpdate makes certificate-identified sessions fail closed. Operators should hear
of each well before: ``check-config`` warns 30 days ahead and the server exports
``mailward_cert_expiry_seconds{file}`` (seconds left; negative once past).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy.config import Config

#: ``check-config`` warns when something expires within this many seconds.
WARN_AHEAD_S: Final = 30 * 86400


def watched_files(cfg: Config) -> list[tuple[str, Path]]:
    """(setting, file) of every certificate bundle and CRL in the configuration."""
    files: list[tuple[str, Path | None]] = [
        ("tls.cert", cfg.tls.cert),
        ("tls.client_ca", cfg.tls.client_ca),
        ("trust.device_ca", cfg.trust.device_ca),
    ]
    files += [(f"trust.attesters[{i}]", p) for i, p in enumerate(cfg.trust.attesters)]
    files += [(f"trust.crl[{i}]", p) for i, p in enumerate(cfg.trust.crl)]
    return [(key, path) for key, path in files if path is not None]


def expires_at(path: Path) -> float | None:
    """The earliest notAfter of the certificates in a PEM bundle, or a CRL's
    nextUpdate (PEM or DER); None when the file is missing or holds neither."""
    from cryptography import x509

    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            return None
        return min(c.not_valid_after_utc.timestamp() for c in certs)
    for load in (x509.load_pem_x509_crl, x509.load_der_x509_crl):
        try:
            crl = load(data)
        except ValueError:
            continue
        nxt = crl.next_update_utc
        return None if nxt is None else nxt.timestamp()
    return None


def remaining(cfg: Config, now: float) -> list[tuple[str, Path, float]]:
    """(setting, file, seconds left) for each watched file that has an end date."""
    out = []
    for key, path in watched_files(cfg):
        end = expires_at(path)
        if end is not None:
            out.append((key, path, end - now))
    return out


def warnings(cfg: Config, now: float) -> list[str]:
    """``check-config``'s lines for certificates ending within :data:`WARN_AHEAD_S`
    (CRLs are reissued often and have their own 7-day warning in ``check-config``)."""
    lines = []
    for key, path, left in remaining(cfg, now):
        if left < WARN_AHEAD_S and not key.startswith("trust.crl"):
            when = "expired" if left < 0 else f"expires in {left / 86400:.0f} days"
            lines.append(f"{path}: {key} {when}; renew it before it stops mail")
    return lines
