"""Local PKI for trials and tests: ``certs init``, device enrolment, test posture reports.

Everything here is a plain function over paths and key objects; ``proxy.cli`` does the
argument parsing. Certificates follow the RFC 5280 profile that strict verifiers
(Python 3.13's ``VERIFY_X509_STRICT``, ``cryptography.x509.verification``) require:
subject and authority key identifiers, critical key usage, critical basic constraints
(with a path length on CAs), an extended key usage on every leaf, random serials.
Keys are P-256 ECDSA (the audit key is Ed25519); private keys are unencrypted PKCS#8
PEM files with mode 0600, written atomically.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.attestation import TYP
from proxy.ids import DEVICE_ID_RE, USER_RE, device_uri
from proxy.posture import PLATFORMS

__all__ = [
    "KNOWN_APP_NAMES",
    "PkiError",
    "PrivateKey",
    "certs_init",
    "enroll_device",
    "load_certs",
    "load_private_key",
    "make_ca",
    "make_claims",
    "make_leaf",
    "sign_report",
]

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=730)
BACKDATE = dt.timedelta(minutes=5)

# A tiny table of display names, so test reports read like real ones. Not a catalogue.
KNOWN_APP_NAMES: Mapping[str, str] = {
    "com.zhiliaoapp.musically": "TikTok",
    "com.ss.android.ugc.trill": "TikTok",
    "com.zhiliaoapp.musically.go": "TikTok",
}

_DNS_RE = re.compile(
    r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


class PkiError(Exception):
    """A PKI operation was refused or failed; the message is one clear sentence."""


# --------------------------------------------------------------------------- loading


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read {what} {path}: {e.strerror or e}") from e


def load_certs(path: Path | str) -> list[x509.Certificate]:
    """All certificates in a PEM file, in file order (raises PkiError if none)."""
    path = Path(path)
    data = _read(path, "certificate file")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise PkiError(f"{path} does not hold PEM certificates ({e})") from e
    return certs


def load_private_key(path: Path | str) -> PrivateKey:
    """An unencrypted PEM private key (PKCS#8, SEC1 or PKCS#1)."""
    path = Path(path)
    data = _read(path, "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{path} does not hold an unencrypted PEM private key ({e})") from e
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise PkiError(f"{path} holds an unsupported key type ({type(key).__name__})")
    return key


# ----------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailward"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """CAs sign certificates and CRLs; leaves only sign (TLS handshakes, JWS)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    cn: str,
    *,
    key: PrivateKey | None = None,
    path_length: int = 0,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA certificate (10 years unless told otherwise) and its key."""
    key = key or _new_key()
    start = not_before or _now() - BACKDATE
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or start + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, _sign_hash(key))
    )
    return cert, key


def make_leaf(
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    *,
    cn: str,
    eku: Sequence[x509.ObjectIdentifier],
    san: Sequence[x509.GeneralName] = (),
    key: PrivateKey | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """An end-entity certificate (2 years unless told otherwise) issued by ``issuer``.

    Key usage is digitalSignature only (enough for ECDHE-ECDSA TLS and for JWS)."""
    key = key or _new_key()
    start = not_before or _now() - BACKDATE
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or start + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(issuer_key, _sign_hash(issuer_key)), key


def device_cert_san(device_id: str, user: str) -> list[x509.GeneralName]:
    """SAN entries of a device certificate: the device URN and the user's address."""
    return [
        x509.UniformResourceIdentifier(device_uri(device_id)),
        x509.RFC822Name(user),
    ]


def _server_names(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()

    def add(name: str, *, strict: bool) -> None:
        name = name.strip().lower().rstrip(".")
        if not name or name in seen:
            return
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not _DNS_RE.fullmatch(name) or len(name) > 253:
                if strict:
                    raise PkiError(f"{name!r} is neither a DNS name nor an IP address") from None
                return
            names.append(x509.DNSName(name))
        seen.add(name)

    for fixed in ("localhost", "127.0.0.1", "::1"):
        add(fixed, strict=True)
    add(socket.gethostname(), strict=False)  # skipped if the host name is not DNS-safe
    for h in hostnames:
        add(h, strict=True)
    return names


# ------------------------------------------------------------------------ file output


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    for p in paths:
        if p.exists() or p.is_symlink():
            raise PkiError(f"{p} already exists; refusing to overwrite it (use --force)")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path`` with ``data``; the file never exists with looser mode."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PkiError(f"cannot create directory {directory}: {e.strerror or e}") from e


#: What ``mailward certs init`` writes.
TRIAL_FILES: Final = (
    "ca.pem", "ca.key", "server.pem", "server.key", "device-ca.pem", "device-ca.key",
    "mdm-attester.pem", "mdm-attester.key", "audit-signing.key", "audit-signing.pub",
    "admin.token",
)
#: Keys the server never needs: written to ``<certs>/offline/``, which no server
#: setting names (``device enroll`` / ``device attest`` take ``--ca-dir``).
OFFLINE_DIR: Final = "offline"
OFFLINE_KEYS: Final = frozenset({"ca.key", "device-ca.key", "mdm-attester.key"})


def trial_path(directory: Path, name: str) -> Path:
    """Where ``certs init`` puts ``name`` (CA keys under :data:`OFFLINE_DIR`)."""
    return directory / OFFLINE_DIR / name if name in OFFLINE_KEYS else directory / name


def certs_init(
    directory: Path, *, force: bool = False, hostnames: Sequence[str] = ()
) -> list[Path]:
    """Write a complete trial PKI into ``directory`` and return the paths written.

    Refuses (PkiError naming the file) if any output file exists, unless ``force``."""
    directory = Path(directory)
    out = {name: trial_path(directory, name) for name in TRIAL_FILES}
    _refuse_existing(out.values(), force)
    files = _trial_pki(_server_names(hostnames))
    _mkdir(directory)
    try:
        (directory / OFFLINE_DIR).mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise PkiError(f"cannot create directory {directory / OFFLINE_DIR}: "
                       f"{e.strerror or e}") from e
    written = []
    for name, data, mode in files:
        try:
            _write(out[name], data, mode)
        except OSError as e:
            raise PkiError(f"cannot write {out[name]}: {e.strerror or e}") from e
        written.append(out[name])
    return written


def _trial_pki(san: list[x509.GeneralName]) -> list[tuple[str, bytes, int]]:
    """(file name, contents, mode) of every file in :data:`TRIAL_FILES`, keys first."""
    ca, ca_key = make_ca("mailward local CA")
    server, server_key = make_leaf(
        ca,
        ca_key,
        cn=str(san[0].value) if san else "localhost",
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        san=san,
    )
    dca, dca_key = make_ca("mailward device CA")
    mdm, mdm_key = make_leaf(
        dca, dca_key, cn="mailward MDM attester", eku=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    audit_key = ed25519.Ed25519PrivateKey.generate()
    audit_pub = audit_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return [
        ("ca.key", _key_pem(ca_key), 0o600),
        ("ca.pem", _pem(ca), 0o644),
        ("server.key", _key_pem(server_key), 0o600),
        ("server.pem", _pem(server) + _pem(ca), 0o644),
        ("device-ca.key", _key_pem(dca_key), 0o600),
        ("device-ca.pem", _pem(dca), 0o644),
        ("mdm-attester.key", _key_pem(mdm_key), 0o600),
        ("mdm-attester.pem", _pem(mdm) + _pem(dca), 0o644),
        ("audit-signing.key", _key_pem(audit_key), 0o600),
        ("audit-signing.pub", audit_pub, 0o644),
        ("admin.token", secrets.token_urlsafe(32).encode(), 0o600),
    ]


def _check_device_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise PkiError(
            f"invalid device id {device_id!r}: use 1-128 characters of A-Z a-z 0-9 . _ : -"
        )


def _check_user(user: str) -> str:
    if not isinstance(user, str) or not USER_RE.fullmatch(user) or not user.isascii():
        raise PkiError(f"invalid user {user!r}: expected an ASCII e-mail address")
    return user.lower()


def enroll_device(
    *,
    device_ca_cert: Path,
    device_ca_key: Path,
    device_id: str,
    user: str,
    out_dir: Path,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue a device certificate; write ``out_dir/device.key`` and ``out_dir/device.pem``.

    ``device.pem`` holds the leaf followed by every certificate of the device CA file."""
    _check_device_id(device_id)
    user = _check_user(user)
    out_dir = Path(out_dir)
    key_path, cert_path = out_dir / "device.key", out_dir / "device.pem"
    _refuse_existing((key_path, cert_path), force)

    ca_chain = load_certs(device_ca_cert)
    ca_key = load_private_key(device_ca_key)
    ca = ca_chain[0]
    pub = ca_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ca_pub = ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub != ca_pub:
        raise PkiError(f"{device_ca_key} is not the key of the certificate in {device_ca_cert}")

    leaf, key = make_leaf(
        ca,
        ca_key,
        cn=device_id,
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        san=device_cert_san(device_id, user),
    )
    _mkdir(out_dir)
    try:
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, _pem(leaf) + b"".join(_pem(c) for c in ca_chain), 0o644)
    except OSError as e:
        raise PkiError(f"cannot write to {out_dir}: {e.strerror or e}") from e
    return key_path, cert_path


# --------------------------------------------------------------------------- reports


def make_claims(
    *,
    device_id: str,
    user: str,
    platform: str,
    apps: Sequence[str | Mapping[str, Any]],
    os_version: str = "",
    managed: bool = False,
    issuer: str | None = None,
    now: float | None = None,
    ttl_s: int = 3600,
    nonce: str | None = None,
    jti: str | None = None,
) -> dict[str, Any]:
    """Claims of a posture report as DESIGN.md specifies (iat = now, exp = iat + ttl)."""
    _check_device_id(device_id)
    if platform not in PLATFORMS:
        raise PkiError(f"invalid platform {platform!r}: expected one of {', '.join(PLATFORMS)}")
    app_list: list[dict[str, Any]] = []
    for app in apps:
        if isinstance(app, str):
            app_id = app.strip()
            if not app_id:
                continue
            entry: dict[str, Any] = {"id": app_id}
            if app_id in KNOWN_APP_NAMES:
                entry["name"] = KNOWN_APP_NAMES[app_id]
        elif isinstance(app, Mapping) and isinstance(app.get("id"), str) and app["id"]:
            entry = dict(app)
        else:
            raise PkiError(f"invalid app entry {app!r}: expected an app id or {{'id': ...}}")
        app_list.append(entry)
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer if issuer is not None else device_uri(device_id),
        "sub": device_id,
        "user": user.lower(),
        "platform": platform,
        "os_version": os_version or "",
        "managed": managed,
        "apps": app_list,
        "iat": iat,
        "exp": iat + int(ttl_s),
        "jti": jti or uuid.uuid4().hex,
    }
    if nonce is not None:
        claims["nonce"] = nonce
    return claims


def sign_report(
    claims: Mapping[str, Any], key: PrivateKey, chain: Sequence[x509.Certificate]
) -> str:
    """A compact JWS over ``claims`` with an ``x5c`` header (leaf first).

    ES256 for a P-256 key, EdDSA for an Ed25519 key; anything else is refused."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        alg = "ES256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    else:
        raise PkiError("posture reports are signed with a P-256 or Ed25519 key only")
    if not chain:
        raise PkiError("a posture report needs the signer's certificate chain")
    x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]
    # PyJWS rather than jwt.encode: it signs the claims as given (tests sign bad ones).
    payload = json.dumps(dict(claims), separators=(",", ":")).encode()
    return jwt.PyJWS().encode(payload, key, algorithm=alg, headers={"typ": TYP, "x5c": x5c})
