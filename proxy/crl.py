"""Certificate revocation lists from an existing PKI (``[trust] crl = [...]``).

A :class:`CrlSet` loads each file (PEM or DER), checks its signature against the
configured CA certificates (a CRL no trusted CA signed is a load error), and indexes
the revoked serial numbers by issuer, so a check is one dictionary lookup. The same
set serves client certificates (the gate, for IMAP, SMTP and ActiveSync identities)
and report signers (the attestation verifier).

:meth:`CrlSet.reload_if_changed` re-reads files whose modification time or size
changed (the server calls it from its one-second poll, like the policy watch); a file
that fails to load keeps the last good copy and is logged. Past a CRL's
``nextUpdate`` every check against its issuer answers ``stale``: the gate refuses
certificate-identified sessions with a temporary error (fail closed) and logs it once
per CRL, and ``/readyz`` names it as degraded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509

from proxy.oplog import get_logger

log = get_logger("mailward.crl")

CrlStatus = Literal["ok", "revoked", "stale"]
#: ``check-config`` warns this long before a CRL's nextUpdate.
WARN_AHEAD_S = 7 * 24 * 3600


class CrlError(ValueError):
    """A CRL file cannot be used; the text names the file."""


@dataclass(frozen=True, slots=True)
class LoadedCrl:
    path: Path
    issuer: bytes  # DER of the issuer name
    next_update: float | None  # POSIX seconds; None: the CRL names none
    serials: frozenset[int]
    stamp: tuple[float, int]  # (mtime, size) when read


def load_crl(path: Path, anchors: Sequence[x509.Certificate]) -> LoadedCrl:
    """Read and verify one CRL file; CrlError naming the file if it is unusable."""
    try:
        data = path.read_bytes()
        st = path.stat()
    except OSError as exc:
        raise CrlError(f"{path}: cannot read CRL: {exc.strerror}") from None
    try:
        crl = (x509.load_pem_x509_crl(data) if b"-----BEGIN" in data
               else x509.load_der_x509_crl(data))
    except ValueError as exc:
        raise CrlError(f"{path}: not a CRL in PEM or DER ({exc})") from None
    signers = [c for c in anchors if c.subject == crl.issuer]
    if not any(_signed_by(crl, c) for c in signers):
        raise CrlError(f"{path}: CRL issuer {crl.issuer.rfc4514_string()} is not a "
                       "configured CA, or the signature does not verify")
    nxt = crl.next_update_utc
    return LoadedCrl(path, crl.issuer.public_bytes(),
                     nxt.timestamp() if nxt is not None else None,
                     frozenset(r.serial_number for r in crl), (st.st_mtime, st.st_size))


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return bool(crl.is_signature_valid(ca.public_key()))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


class CrlSet:
    """The configured CRLs, indexed by issuer; see the module docstring."""

    def __init__(self, paths: Sequence[Path], anchors: Sequence[x509.Certificate]) -> None:
        """Load every file now; CrlError if one is unusable (start-up must fail)."""
        self._anchors = list(anchors)
        self._crls = {p: load_crl(p, self._anchors) for p in paths}
        self._index = self._build()
        self._stale_logged: set[Path] = set()

    @classmethod
    def empty(cls) -> CrlSet:
        return cls((), ())

    def __bool__(self) -> bool:
        return bool(self._crls)

    def _build(self) -> dict[bytes, list[LoadedCrl]]:
        index: dict[bytes, list[LoadedCrl]] = {}
        for crl in self._crls.values():
            index.setdefault(crl.issuer, []).append(crl)
        return index

    def check(self, issuer: bytes, serial: int | None, now: float) -> CrlStatus:
        """``revoked`` when a CRL of ``issuer`` lists ``serial``; ``stale`` when one
        is past its nextUpdate; ``ok`` otherwise (also when no CRL covers the issuer)."""
        crls = self._index.get(issuer)
        if not crls:
            return "ok"
        for crl in crls:
            if serial is not None and serial in crl.serials:
                return "revoked"
        for crl in crls:
            if crl.next_update is not None and now > crl.next_update:
                self._log_stale(crl)
                return "stale"
        return "ok"

    def _log_stale(self, crl: LoadedCrl) -> None:
        if crl.path not in self._stale_logged:
            self._stale_logged.add(crl.path)
            log.error("CRL past its nextUpdate: certificate-identified sessions are refused "
                      "until it is renewed", file=str(crl.path), next_update=crl.next_update)

    def stale(self, now: float) -> list[Path]:
        """CRLs past their nextUpdate (``/readyz`` names them as degraded)."""
        return [c.path for c in self._crls.values()
                if c.next_update is not None and now > c.next_update]

    def expiring(self, now: float, within_s: float = WARN_AHEAD_S) -> list[tuple[Path, float]]:
        """(file, nextUpdate) of CRLs whose nextUpdate is within ``within_s``."""
        return [(c.path, c.next_update) for c in self._crls.values()
                if c.next_update is not None and c.next_update - now < within_s]

    def reload_if_changed(self) -> bool:
        """Re-read changed files; True when the index changed."""
        changed = False
        for path, old in list(self._crls.items()):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_mtime, st.st_size) == old.stamp:
                continue
            try:
                self._crls[path] = load_crl(path, self._anchors)
            except CrlError as exc:
                log.error("CRL reload refused; keeping the last good copy", error=str(exc))
                continue
            self._stale_logged.discard(path)
            log.info("CRL reloaded", file=str(path), revoked=len(self._crls[path].serials))
            changed = True
        if changed:
            self._index = self._build()
        return changed
