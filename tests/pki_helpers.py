"""Test factories for certificates and posture reports (importable by any test module).

    from pki_helpers import TestPki, InMemoryPostureStore, hand_jws

``TestPki`` builds an in-memory device CA with device and attester certificates, so
tests need no files; ``write_files(dir)`` materialises the ``[trust]`` files when a
test needs paths (config, CLI, API). ``InMemoryPostureStore`` is a minimal
``PostureStore`` with the documented commit semantics.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.attestation import CLOCK_SKEW_S, TYP, Verifier
from proxy.pki import PrivateKey, device_cert_san, make_ca, make_claims, make_leaf, sign_report
from proxy.posture import App, CommitResult, Posture

USER = "alice@corp.example"
TIKTOK = "com.zhiliaoapp.musically"


@dataclass
class Signer:
    """A signing key with its chain (leaf first)."""

    key: PrivateKey
    chain: list[x509.Certificate]

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]


class TestPki:
    """A device CA with helpers to issue device and attester certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, cn: str = "test device CA") -> None:
        self.ca, self.ca_key = make_ca(cn)
        self.attesters: list[Signer] = []

    def device(
        self,
        device_id: str = "dev-1",
        user: str = USER,
        *,
        key: PrivateKey | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        include_root: bool = True,
    ) -> Signer:
        cert, k = make_leaf(
            self.ca,
            self.ca_key,
            cn=device_id,
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
            san=device_cert_san(device_id, user),
            key=key,
            not_before=not_before,
            not_after=not_after,
        )
        return Signer(k, [cert, self.ca] if include_root else [cert])

    def attester(self, cn: str = "Example MDM", *, ed25519_key: bool = False) -> Signer:
        """A new MDM attester certificate, registered with :meth:`verifier`."""
        key = ed25519.Ed25519PrivateKey.generate() if ed25519_key else None
        cert, k = make_leaf(
            self.ca, self.ca_key, cn=cn, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], key=key
        )
        signer = Signer(k, [cert, self.ca])
        self.attesters.append(signer)
        return signer

    def verifier(self, **kw: Any) -> Verifier:
        return Verifier([self.ca], [a.cert for a in self.attesters], **kw)

    def write_files(self, directory: Path) -> tuple[Path, list[Path]]:
        """Write device-ca.pem and attester-N.pem; return (device CA path, attester paths)."""
        directory.mkdir(parents=True, exist_ok=True)
        ca_path = directory / "device-ca.pem"
        ca_path.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))
        paths = []
        for i, a in enumerate(self.attesters):
            p = directory / f"attester-{i}.pem"
            p.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in a.chain))
            paths.append(p)
        return ca_path, paths


def report(
    signer: Signer,
    *,
    device_id: str = "dev-1",
    user: str = USER,
    platform: str = "android",
    apps: Sequence[str | Mapping[str, Any]] = (TIKTOK,),
    now: float | None = None,
    **overrides: Any,
) -> str:
    """A signed report; ``overrides`` replace claims (value ``None`` deletes the claim)."""
    claims = make_claims(device_id=device_id, user=user, platform=platform, apps=apps, now=now)
    for k, v in overrides.items():
        if v is None:
            claims.pop(k, None)
        else:
            claims[k] = v
    return sign_report(claims, signer.key, signer.chain)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def x5c(chain: Sequence[x509.Certificate]) -> list[str]:
    return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]


def hand_jws(
    header: Mapping[str, Any],
    payload: Mapping[str, Any] | bytes,
    sign: Any = None,
) -> str:
    """Build a compact JWS by hand: ``sign(signing_input: bytes) -> bytes`` or no signature."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(raw)}"
    sig = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64url(sig)}"


def default_header(chain: Sequence[x509.Certificate], alg: str) -> dict[str, Any]:
    return {"alg": alg, "typ": TYP, "x5c": x5c(chain)}


@dataclass
class InMemoryPostureStore:
    """Minimal PostureStore: nonces, jti memory and latest posture, all in dicts."""

    skew_s: float = CLOCK_SKEW_S
    nonces: dict[str, float] = field(default_factory=dict)  # nonce -> expires_at
    jtis: dict[str, float] = field(default_factory=dict)  # jti -> forget after
    postures: dict[str, Posture] = field(default_factory=dict)

    async def commit_attestation(
        self, posture: Posture, nonce: str | None, now: float
    ) -> CommitResult:
        if nonce is not None and self.nonces.get(nonce, -1.0) < now:
            return "bad_nonce"
        if self.jtis.get(posture.jti, -1.0) >= now:
            return "replay"
        if nonce is not None:
            del self.nonces[nonce]
        self.jtis[posture.jti] = posture.exp + self.skew_s
        self.postures[posture.device_id] = posture
        return "ok"

    async def get(self, device_id: str) -> Posture | None:
        return self.postures.get(device_id)

    async def devices_for_user(self, user: str) -> list[Posture]:
        return [p for p in self.postures.values() if p.user == user.lower()]

    async def issue_nonce(self, nonce: str, expires_at: float) -> None:
        self.nonces[nonce] = expires_at

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def fresh_posture(device: str, user: str, apps: tuple[App, ...] = ()) -> Posture:
    """A verified-looking Android posture attested 10 s ago, for front-end tests that
    put postures into the store directly."""
    import time
    import uuid

    now = int(time.time())
    return Posture(device_id=device, user=user, platform="android", os_version="14",
                   managed=True, apps=(App("com.example.notes", "1.0", "Notes"), *apps),
                   iat=now - 10, exp=now + 3600, jti=uuid.uuid4().hex, issuer="test",
                   attested_by="device")


def make_crl(pki: TestPki, serials: Sequence[int] = (), *, next_update_s: float = 86400,
             last_update_s: float = -60) -> bytes:
    """A CRL (PEM) of the test device CA revoking ``serials``, with nextUpdate
    ``next_update_s`` from now (negative: already past)."""
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(pki.ca.subject)
               .last_update(now + dt.timedelta(seconds=min(last_update_s, next_update_s - 1)))
               .next_update(now + dt.timedelta(seconds=next_update_s)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(pki.ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)
