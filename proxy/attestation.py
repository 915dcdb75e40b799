"""Verify device posture reports (DESIGN.md, "Device posture attestation").

A report is a compact JWS whose protected header carries ``alg``, ``typ`` and the
signer's chain in ``x5c``. :meth:`Verifier.verify` checks it in this order and stops at
the first failure with a stable reason code:

1. size       -- at most 256 KiB after stripping surrounding whitespace (``too_large``);
2. structure  -- three base64url parts, JSON-object header and payload, ``typ``, a
                 parseable ``x5c`` (``malformed``);
3. algorithm  -- ``ES256`` with a P-256 leaf key or ``EdDSA`` with an Ed25519 leaf key,
                 nothing else (``alg_not_allowed``);
4. signature  -- by the leaf's public key with PyJWT's implementation of exactly that
                 one algorithm (``bad_signature``);
5. chain      -- the leaf chains to the configured device CA bundle (never to anything
                 in ``x5c``), is valid now and has the digitalSignature key usage
                 (``untrusted_chain``). Successful results are cached per chain;
   A signing certificate on a configured CRL is ``revoked``;
6. claims     -- types and formats (``malformed``), device binding (``device_mismatch``),
                 device reports allowed at all (``device_reports_disabled`` under
                 ``[trust] device_reports = "deny"``), the device certificate's rfc822
                 user (``user_mismatch``), times (``expired``, ``not_yet_valid``: ``iat``
                 more than 60 s ahead), nonce presence (``bad_nonce``).

Revocation of the device (``revoked``), the platform rule (``platform_mismatch``: a
device's own report may not change the platform its MDM posture or first report
gave), replay (per issuer: the signing certificate's SHA-256 plus ``jti``) and nonce
consumption come last and need the store: :func:`ingest` verifies and then commits
atomically through :meth:`PostureStore.commit_attestation`, so a refused report
changes nothing and does not use up its ``jti``.

A verified report's :class:`~proxy.posture.Posture` names its authority
(``source``): ``device`` for a device certificate, ``attester:<first 8 hex of the
attester certificate's SHA-256>`` for an MDM attester.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, TypeGuard, get_args

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
)
from jwt.algorithms import get_default_algorithms

from proxy.crl import CrlSet
from proxy.ids import DEVICE_ID_RE, USER_RE, device_uri
from proxy.posture import DEVICE_AUTHORITY, PLATFORMS, App, Posture, PostureStore

MAX_REPORT_BYTES: Final = 256 * 1024
MAX_APPS: Final = 5000
MAX_CHAIN_LEN: Final = 8
CLOCK_SKEW_S: Final = 300
ALLOWED_ALGS: Final = ("ES256", "EdDSA")
TYP: Final = "mailward-posture+jwt"

ReasonCode = Literal[
    "too_large",
    "malformed",
    "alg_not_allowed",
    "bad_signature",
    "untrusted_chain",
    "device_mismatch",
    "expired",
    "not_yet_valid",
    "bad_nonce",
    "replay",
    "revoked",
    "platform_mismatch",
    "user_mismatch",
    "device_reports_disabled",
]
REASON_CODES: Final[tuple[ReasonCode, ...]] = get_args(ReasonCode)
TOO_LARGE: Final = "too_large"
MALFORMED: Final = "malformed"
ALG_NOT_ALLOWED: Final = "alg_not_allowed"
BAD_SIGNATURE: Final = "bad_signature"
UNTRUSTED_CHAIN: Final = "untrusted_chain"
DEVICE_MISMATCH: Final = "device_mismatch"
EXPIRED: Final = "expired"
NOT_YET_VALID: Final = "not_yet_valid"
BAD_NONCE: Final = "bad_nonce"
REPLAY: Final = "replay"
REVOKED: Final = "revoked"
PLATFORM_MISMATCH: Final = "platform_mismatch"
USER_MISMATCH: Final = "user_mismatch"
DEVICE_REPORTS_DISABLED: Final = "device_reports_disabled"
#: How far ``iat`` may be ahead of the clock (DESIGN: 60 s; ``exp`` gets the full skew).
IAT_AHEAD_S: Final = 60

_B64URL_RE: Final = re.compile(rb"[A-Za-z0-9_-]*")
# Strings from reports end up in logs and protocol replies: no control characters.
_TEXT_RE: Final = re.compile(r"[^\x00-\x1f\x7f]{1,1024}")
# PyJWT's algorithm objects, one per allowed "alg" (ES256 converts the raw R||S
# signature and refuses any other length). We call them directly instead of
# jwt.PyJWS.decode, which re-parses the token and checks every base64 character in a
# Python loop (~30 ms for a 256 KiB report).
_JWS_ALGS: Final = {name: get_default_algorithms()[name] for name in ALLOWED_ALGS}
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | Any

# Web PKI defaults (RFC 5280 profile, clientAuth EKU if an EKU is present), except that
# the leaf needs no subjectAltName: MDM attester certificates often have none.
_CA_POLICY: Final = ExtensionPolicy.webpki_defaults_ca()
_EE_POLICY: Final = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
)


class AttestationError(Exception):
    """A refused report: ``code`` is a stable reason code, ``detail`` one sentence."""

    def __init__(self, code: ReasonCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code: ReasonCode = code
        self.detail = detail


def _refuse(code: ReasonCode, detail: str) -> NoReturn:
    raise AttestationError(code, detail)


@dataclass(frozen=True, slots=True)
class _Signer:
    """What a verified chain tells us about its leaf; cached while the chain is valid."""

    public_key: PublicKey
    attester: str | None  # subject CN when the leaf is a configured MDM attester
    device_uris: frozenset[str]
    valid_from: float
    valid_until: float
    users: frozenset[str] = frozenset()  # rfc822 SANs, lower-cased
    fingerprint: str = ""  # SHA-256 hex of the leaf: the jti issuer
    serial: int = 0
    issuer: bytes = b""  # DER of the leaf's issuer name (for CRLs)


def _fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def _common_name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cns[0].value if cns else cert.subject.rfc4514_string()
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _b64url(part: bytes) -> bytes:
    """Decode unpadded base64url (the alphabet was checked already); ValueError if bad."""
    return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))


def _b64url_json(part: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url(part), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        _refuse(MALFORMED, f"the report {what} is not base64url-encoded JSON.")
    if not isinstance(value, dict):
        _refuse(MALFORMED, f"the report {what} is not a JSON object.")
    return value


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-standard JSON constant {name}")


class Verifier:
    """Verifies posture reports against a device CA bundle and a set of MDM attesters.

    Not thread-safe; meant to be shared by one event loop (it caches chain results)."""

    CACHE_SIZE: Final = 4096

    def __init__(
        self,
        device_ca: Sequence[x509.Certificate],
        attesters: Sequence[x509.Certificate] = (),
        *,
        skew_s: float = CLOCK_SKEW_S,
        device_reports: bool = True,
        crl: CrlSet | None = None,
    ) -> None:
        """``device_reports`` False refuses reports signed by device certificates
        (``[trust] device_reports = "deny"``); ``crl`` lists revoked signers."""
        if not device_ca:
            raise ValueError("the device CA bundle holds no certificates")
        self._anchors = list(device_ca)
        self._anchor_fps = {
            _fingerprint(c.public_bytes(serialization.Encoding.DER)) for c in device_ca
        }
        self._store = Store(self._anchors)
        self._attesters = {
            _fingerprint(c.public_bytes(serialization.Encoding.DER)): _common_name(c)
            for c in attesters
        }
        self.skew_s = skew_s
        self._cache: OrderedDict[tuple[bytes, ...], _Signer] = OrderedDict()
        self._client_verifier: tuple[int, ClientVerifier] | None = None
        self.device_reports = device_reports
        self.crl = crl

    @property
    def anchors(self) -> list[x509.Certificate]:
        """The device CA bundle (CRLs are checked against it)."""
        return list(self._anchors)

    def claims_attester(self, token: bytes) -> bool:
        """Does this report name a configured MDM attester as its signer (x5c leaf)?
        A cheap look at the header only, nothing verified: the API exempts such
        reports from its rate limit, and charges the address when the report then
        fails verification, so a false claim buys nothing."""
        if not self._attesters:
            return False
        head = token.strip().split(b".", 1)[0]
        if len(head) > 64 * 1024 or not _B64URL_RE.fullmatch(head):
            return False
        try:
            x5c = json.loads(_b64url(head)).get("x5c")
            leaf = base64.b64decode(x5c[0], validate=True)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError,
                binascii.Error, RecursionError):
            return False
        return _fingerprint(leaf) in self._attesters

    def forget_device(self, device: str) -> int:
        """Drop cached chain verifications of certificates naming ``device``
        (compared case-insensitively): after a revocation, nothing of it is trusted
        from memory. Returns how many were dropped."""
        uri = device_uri(device).lower()
        stale = [k for k, s in self._cache.items()
                 if any(u.lower() == uri for u in s.device_uris)]
        for k in stale:
            del self._cache[k]
        return len(stale)

    @classmethod
    def from_files(
        cls,
        device_ca_path: Path | str,
        attester_paths: Sequence[Path | str] = (),
        *,
        skew_s: float = CLOCK_SKEW_S,
        device_reports: bool = True,
        crl_paths: Sequence[Path] = (),
    ) -> Verifier:
        """Load the device CA bundle and attester certificates (the first certificate of
        each attester file is the attester; the rest is its chain) and the CRLs.
        Raises ValueError or OSError naming the file."""
        anchors = _load_pem(Path(device_ca_path))
        attesters = [_load_pem(Path(p))[0] for p in attester_paths]
        crl = CrlSet(list(crl_paths), anchors) if crl_paths else None
        return cls(anchors, attesters, skew_s=skew_s, device_reports=device_reports, crl=crl)

    # ---------------------------------------------------------------- verification

    def verify(
        self, token: str | bytes, *, now: float, max_age_s: float, require_nonce: bool
    ) -> Posture:
        """Verify a report completely except replay and nonce consumption (see module
        docstring). Raises AttestationError; returns the Posture on success."""
        header, claims, signing_input, signature = _parse_jws(_check_size(token))
        alg, der_chain = _check_header(header)

        key = tuple(_fingerprint(d) for d in der_chain)
        signer = self._cached(key, now)
        certs = self._parse_chain(der_chain) if signer is None else None
        public_key = signer.public_key if signer is not None else _public_key(certs)

        _check_alg(alg, public_key)
        if not _JWS_ALGS[alg].verify(signing_input, public_key, signature):
            _refuse(BAD_SIGNATURE, "the report signature does not verify with its certificate.")

        if signer is None:
            assert certs is not None
            signer = self._verify_chain(certs, key, now)
        if self.crl:
            status = self.crl.check(signer.issuer, signer.serial, now)
            if status == "revoked":
                _refuse(REVOKED, "the signing certificate is revoked (CRL).")
            if status == "stale":
                _refuse(UNTRUSTED_CHAIN, "the CRL for the signing certificate is past its "
                        "nextUpdate; it cannot be checked.")
        return self._check_claims(claims, signer, now, max_age_s, require_nonce)

    def _cached(self, key: tuple[bytes, ...], now: float) -> _Signer | None:
        signer = self._cache.get(key)
        if signer is None:
            return None
        if not signer.valid_from <= now <= signer.valid_until:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return signer

    @staticmethod
    def _parse_chain(der_chain: list[bytes]) -> list[x509.Certificate]:
        try:
            return [x509.load_der_x509_certificate(d) for d in der_chain]
        except (ValueError, x509.InvalidVersion):  # InvalidVersion is not a ValueError
            _refuse(MALFORMED, "the report header x5c holds an unparseable certificate.")

    def _verifier_at(self, now: float) -> ClientVerifier:
        second = int(now)
        if self._client_verifier is None or self._client_verifier[0] != second:
            when = dt.datetime.fromtimestamp(second, dt.UTC)
            verifier = (
                PolicyBuilder()
                .store(self._store)
                .time(when)
                .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
                .build_client_verifier()
            )
            self._client_verifier = (second, verifier)
        return self._client_verifier[1]

    def _verify_chain(
        self, certs: list[x509.Certificate], key: tuple[bytes, ...], now: float
    ) -> _Signer:
        leaf = certs[0]
        intermediates = [
            c for c, fp in zip(certs[1:], key[1:], strict=True) if fp not in self._anchor_fps
        ]
        try:
            verified = self._verifier_at(now).verify(leaf, intermediates)
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
            digital_signature = usage.digital_signature
            sans = [ext.value for ext in leaf.extensions
                    if isinstance(ext.value, x509.SubjectAlternativeName)]
            uris = frozenset(u for san in sans
                             for u in san.get_values_for_type(x509.UniformResourceIdentifier))
            users = frozenset(m.lower() for san in sans
                              for m in san.get_values_for_type(x509.RFC822Name))
        except x509.ExtensionNotFound:
            _refuse(UNTRUSTED_CHAIN, "the signing certificate has no key usage extension.")
        except Exception:  # VerificationError, or malformed extensions in hostile input
            _refuse(
                UNTRUSTED_CHAIN,
                "the signing certificate does not chain to the device CA or is not valid now.",
            )
        if not digital_signature:
            _refuse(
                UNTRUSTED_CHAIN, "the signing certificate lacks the digitalSignature key usage."
            )
        signer = _Signer(
            public_key=leaf.public_key(),
            attester=self._attesters.get(key[0]),
            device_uris=uris,
            valid_from=max(c.not_valid_before_utc for c in verified.chain).timestamp(),
            valid_until=min(c.not_valid_after_utc for c in verified.chain).timestamp(),
            users=users,
            fingerprint=key[0].hex(),
            serial=leaf.serial_number,
            issuer=leaf.issuer.public_bytes(),
        )
        self._cache[key] = signer
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return signer

    def _check_claims(
        self,
        c: dict[str, Any],
        signer: _Signer,
        now: float,
        max_age_s: float,
        require_nonce: bool,
    ) -> Posture:
        """The claims' meaning, once their syntax is checked: who may attest this
        device, the time window, the nonce the policy requires."""
        p = _well_formed(c)
        if signer.attester is None and device_uri(p.device_id) not in signer.device_uris:
            _refuse(
                DEVICE_MISMATCH,
                "the signing certificate is neither an MDM attester nor "
                "the certificate of the reported device.",
            )
        if signer.attester is None and not self.device_reports:
            _refuse(DEVICE_REPORTS_DISABLED, "reports signed by a device certificate are not "
                    "accepted here; the device management service reports posture.")
        if signer.attester is None and signer.users and p.user not in signer.users:
            _refuse(USER_MISMATCH, "the report names another user than the device "
                    "certificate.")
        if p.iat > now + min(self.skew_s, IAT_AHEAD_S):
            _refuse(NOT_YET_VALID, "the report was issued in the future (check the clock).")
        if now > p.exp + self.skew_s:
            _refuse(EXPIRED, "the report has expired.")
        if now - p.iat > max_age_s + self.skew_s:
            _refuse(EXPIRED, "the report is older than the maximum posture age.")
        if p.exp - p.iat > max_age_s:
            _refuse(EXPIRED, "the report lifetime (exp - iat) exceeds the maximum posture age.")
        if require_nonce and p.nonce is None:
            _refuse(BAD_NONCE, "the policy requires a nonce from /v1/challenge.")
        if signer.attester is None:
            attested_by, source = "device", DEVICE_AUTHORITY
        else:
            attested_by, source = f"mdm:{signer.attester}", f"attester:{signer.fingerprint[:8]}"
        return dataclasses.replace(p, attested_by=attested_by, received_at=now, source=source,
                                   signer=signer.fingerprint)


def _well_formed(c: dict[str, Any]) -> Posture:
    """The claims as a :class:`Posture` (not yet attributed to its signer), or
    ``malformed`` naming the first claim of the wrong type or syntax."""
    iss, sub, user, platform = (c.get(k) for k in ("iss", "sub", "user", "platform"))
    os_version, managed = c.get("os_version", ""), c.get("managed", False)
    iat, exp, jti, nonce = (c.get(k) for k in ("iat", "exp", "jti", "nonce"))
    if not _text(iss):
        _refuse(MALFORMED, "the report iss is missing or not a string.")
    if not isinstance(sub, str) or not DEVICE_ID_RE.fullmatch(sub):
        _refuse(MALFORMED, "the report sub is not a valid device id.")
    if not isinstance(user, str) or not USER_RE.fullmatch(user):
        _refuse(MALFORMED, "the report user is not an e-mail address.")
    if not isinstance(platform, str) or platform not in PLATFORMS:
        _refuse(MALFORMED, f"the report platform is not one of {', '.join(PLATFORMS)}.")
    if not _text(os_version, empty_ok=True):
        _refuse(MALFORMED, "the report os_version is not a string.")
    if not isinstance(managed, bool):
        _refuse(MALFORMED, "the report managed claim is not a boolean.")
    if not _is_int(iat) or not _is_int(exp) or exp < iat:
        _refuse(MALFORMED, "the report iat/exp are not integers with exp >= iat.")
    if not _text(jti):
        _refuse(MALFORMED, "the report jti is missing or not a string.")
    if nonce is not None and not _text(nonce):
        _refuse(MALFORMED, "the report nonce is not a string.")
    return Posture(
        device_id=sub,
        user=user.lower(),
        platform=platform,
        os_version=os_version,
        managed=managed,
        apps=_parse_apps(c.get("apps")),
        iat=iat,
        exp=exp,
        jti=jti,
        issuer=iss,
        attested_by="",
        nonce=nonce,
    )


def _check_size(token: str | bytes) -> bytes:
    if isinstance(token, str):
        token = token.strip()
        if len(token) > MAX_REPORT_BYTES:  # every character is at least one byte
            _refuse(TOO_LARGE, f"the report is larger than {MAX_REPORT_BYTES} bytes.")
        data = token.encode("utf-8", "surrogatepass")
    elif isinstance(token, bytes | bytearray | memoryview):
        data = bytes(token).strip()
    else:
        raise TypeError("token must be str or bytes")
    if len(data) > MAX_REPORT_BYTES:
        _refuse(TOO_LARGE, f"the report is larger than {MAX_REPORT_BYTES} bytes.")
    return data


def _parse_jws(data: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Split a compact JWS: (header, claims, signing input, signature bytes)."""
    parts = data.split(b".")
    # An empty signature is structurally fine, so that "alg": "none" is alg_not_allowed.
    if len(parts) != 3 or not all(_B64URL_RE.fullmatch(p) for p in parts):
        _refuse(MALFORMED, "the report is not a compact JWS (three base64url parts).")
    header = _b64url_json(parts[0], "header")
    claims = _b64url_json(parts[1], "payload")
    try:
        signature = _b64url(parts[2])
    except ValueError:
        _refuse(MALFORMED, "the report signature is not base64url.")
    return header, claims, parts[0] + b"." + parts[1], signature


def _check_header(header: dict[str, Any]) -> tuple[str, list[bytes]]:
    """The header's alg (any string; checked later) and the DER certificates of x5c."""
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() != TYP:
        _refuse(MALFORMED, f"the report header typ is not {TYP}.")
    if "crit" in header or "b64" in header:
        _refuse(MALFORMED, "the report header uses unsupported critical parameters.")
    alg = header.get("alg")
    if not isinstance(alg, str):
        _refuse(MALFORMED, "the report header has no alg.")
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not 1 <= len(x5c) <= MAX_CHAIN_LEN:
        _refuse(
            MALFORMED, f"the report header x5c is not a list of 1-{MAX_CHAIN_LEN} certificates."
        )
    if not all(isinstance(c, str) for c in x5c):
        _refuse(MALFORMED, "the report header x5c holds a non-string entry.")
    try:
        return alg, [base64.b64decode(c, validate=True) for c in x5c]
    except binascii.Error:
        _refuse(MALFORMED, "the report header x5c is not standard base64.")


def _check_alg(alg: str, public_key: PublicKey) -> None:
    if alg not in ALLOWED_ALGS:
        _refuse(ALG_NOT_ALLOWED, f"algorithm {alg[:20]!r} is not allowed; use ES256 or EdDSA.")
    if alg == "ES256":
        ok = isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, ec.SECP256R1
        )
    else:
        ok = isinstance(public_key, ed25519.Ed25519PublicKey)
    if not ok:
        _refuse(ALG_NOT_ALLOWED, f"the signing certificate's key does not fit {alg}.")


def _public_key(certs: list[x509.Certificate] | None) -> PublicKey:
    assert certs
    try:
        return certs[0].public_key()
    except Exception:  # unsupported or malformed key in hostile input
        _refuse(ALG_NOT_ALLOWED, "the signing certificate's key type is not supported.")


def _load_pem(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not a PEM certificate file ({e})") from e
    return certs


def _text(v: object, *, empty_ok: bool = False) -> TypeGuard[str]:
    """A string of at most 1024 characters without control characters."""
    return isinstance(v, str) and (bool(_TEXT_RE.fullmatch(v)) or (empty_ok and v == ""))


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_apps(apps: object) -> tuple[App, ...]:
    if not isinstance(apps, list):
        _refuse(MALFORMED, "the report apps claim is not a list.")
    if len(apps) > MAX_APPS:
        _refuse(MALFORMED, f"the report lists more than {MAX_APPS} apps.")
    out = []
    for a in apps:
        if not isinstance(a, dict) or not _text(a.get("id")):
            _refuse(MALFORMED, "an entry of the report apps claim has no string id.")
        version, name = a.get("version", ""), a.get("name", "")
        if not _text(version, empty_ok=True) or not _text(name, empty_ok=True):
            _refuse(MALFORMED, "an entry of the report apps claim has a non-string field.")
        out.append(App(id=a["id"], version=version, name=name))
    return tuple(out)


async def ingest(
    verifier: Verifier,
    store: PostureStore,
    token: str | bytes,
    *,
    now: float,
    max_age_s: float,
    require_nonce: bool,
) -> Posture:
    """Verify a report and commit it (nonce use, jti memory, posture) atomically."""
    posture = verifier.verify(token, now=now, max_age_s=max_age_s, require_nonce=require_nonce)
    result = await store.commit_attestation(posture, posture.nonce, now)
    if result == "bad_nonce":
        _refuse(BAD_NONCE, "the nonce is unknown, expired or already used.")
    if result == "replay":
        _refuse(REPLAY, "a report with this jti was already accepted.")
    if result == "revoked":
        _refuse(REVOKED, "the device is revoked.")
    if result == "platform_mismatch":
        _refuse(PLATFORM_MISMATCH, "a device's own report cannot change the platform its "
                "device management (or its first report) gave.")
    return posture
