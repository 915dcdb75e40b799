"""The checkpoint keys: Ed25519 only, the private key as PKCS#8 PEM, the public key as
SubjectPublicKeyInfo PEM.

The common case is recognised by its DER prefix (RFC 8410), which spares one-shot CLI
commands the import of cryptography's whole serialization package; anything else
goes through cryptography's PEM loader and is refused unless it is Ed25519.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

if TYPE_CHECKING:
    from proxy.config import Config

# DER prefixes of an Ed25519 key in PKCS#8 v1 (private) and SubjectPublicKeyInfo
# (public) form, RFC 8410: the raw 32-byte key follows.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")

_WANT_PRIVATE = "the audit signing key must be Ed25519 in PKCS#8 PEM (mailward certs init)"
_WANT_PUBLIC = "the audit verify key must be Ed25519 in SubjectPublicKeyInfo PEM"


def _pem_body(pem: bytes) -> bytes | None:
    lines = [ln.strip() for ln in pem.strip().splitlines()]
    if len(lines) < 3 or not lines[0].startswith(b"-----BEGIN ") or not lines[-1].startswith(
            b"-----END "):
        return None
    try:
        return base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except binascii.Error:
        return None


def _kind(key: object) -> str:
    """'an EC (secp256r1) key', 'an RSA-2048 key', ... for error messages."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"an EC ({key.curve.name}) key"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"an RSA-{key.key_size} key"
    return f"a {type(key).__name__}"


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 checkpoint key (PKCS#8 PEM). ValueError (one line naming ``path``)
    if it is not one; OSError if it cannot be read."""
    pem = path.read_bytes()
    der = _pem_body(pem)
    if der and len(der) == 48 and der.startswith(_ED25519_PKCS8_PREFIX):
        return Ed25519PrivateKey.from_private_bytes(der[16:])
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            f"{path} does not hold an unencrypted PEM private key; {_WANT_PRIVATE}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds {_kind(key)}; {_WANT_PRIVATE}")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 checkpoint public key (SubjectPublicKeyInfo PEM). ValueError (one
    line naming ``path``) if it is not one; OSError if it cannot be read."""
    pem = path.read_bytes()
    der = _pem_body(pem)
    if der and len(der) == 44 and der.startswith(_ED25519_SPKI_PREFIX):
        return Ed25519PublicKey.from_public_bytes(der[12:])
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path} does not hold a PEM public key; {_WANT_PUBLIC}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds {_kind(key)}; {_WANT_PUBLIC}")
    return key


def signing_key_from_config(cfg: Config) -> Ed25519PrivateKey | None:
    """``[audit] signing_key`` loaded and checked; None when it is set to ``""``.
    Raises :class:`proxy.config.ConfigError` (one line naming the config and the key
    file) when the file is missing, unreadable or not an Ed25519 PKCS#8 PEM key."""
    from proxy.config import ConfigError

    path = cfg.audit.signing_key
    if path is None:
        return None
    try:
        return load_signing_key(path)
    except FileNotFoundError:
        problem = f"file not found: {path} (mailward certs init creates it)"
    except OSError as exc:
        problem = f"cannot read {path}: {exc.strerror or exc}"
    except ValueError as exc:
        problem = str(exc)
    raise ConfigError(cfg.source, "audit.signing_key", problem)


def signing_key_warnings(path: Path | None) -> list[str]:
    """Why whoever runs this could replace the signing key (one line each; none when
    ``path`` is None). What is checkable: run as the serving user (not root), whether
    that user may write the file or its directory (and so swap the key); run as root,
    only the file's mode and owner: group or others may write, or a non-root owner
    may."""
    if path is None or not path.exists():
        return []
    if os.geteuid() == 0:
        st = path.stat()
        if st.st_mode & 0o022:
            return [f"{path} is writable by its group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 0440"]
        if st.st_uid != 0 and st.st_mode & 0o200:
            return [f"{path} is writable by its owner, uid {st.st_uid}; if that is the "
                    "serving user, make the key read-only to it (chown root, chmod 0440)"]
        return []
    user = getpass.getuser()
    warnings = []
    if os.access(path, os.W_OK):
        warnings.append(f"{path} is writable by {user} (this user); the serving user must "
                        "only read it (owned by root or a key admin, chmod 0440)")
    if os.access(path.parent, os.W_OK):
        warnings.append(f"{path.parent} is writable by {user} (this user), who can replace "
                        "the key in it; keep the key in a directory the serving user cannot "
                        "write")
    return warnings
