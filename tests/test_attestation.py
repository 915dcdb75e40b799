"""Posture report verification: every refusal code, the accepted shapes, and fuzzing."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pki_helpers import (
    TIKTOK,
    USER,
    InMemoryPostureStore,
    Signer,
    TestPki,
    default_header,
    hand_jws,
    report,
)

from proxy.attestation import (
    MAX_APPS,
    MAX_REPORT_BYTES,
    REASON_CODES,
    TYP,
    AttestationError,
    Verifier,
    ingest,
)
from proxy.pki import make_claims, make_leaf, sign_report

MAX_AGE = 24 * 3600.0
NOW = time.time()


@pytest.fixture(scope="module")
def pki() -> TestPki:
    p = TestPki()
    p.attester("Example MDM")
    p.attester("Ed MDM", ed25519_key=True)
    return p


@pytest.fixture(scope="module")
def device(pki: TestPki) -> Signer:
    return pki.device("dev-1")


@pytest.fixture
def verifier(pki: TestPki) -> Verifier:
    return pki.verifier()


def verify(
    v: Verifier,
    token: str | bytes,
    *,
    now: float = NOW,
    max_age_s: float = MAX_AGE,
    require_nonce: bool = False,
):
    return v.verify(token, now=now, max_age_s=max_age_s, require_nonce=require_nonce)


def refused(v: Verifier, token: str | bytes, code: str, **kw) -> AttestationError:
    with pytest.raises(AttestationError) as info:
        verify(v, token, **kw)
    assert info.value.code == code, info.value
    assert info.value.detail and "\n" not in info.value.detail
    return info.value


# ------------------------------------------------------------------------ accepted


def test_es256_device_report_accepted(verifier: Verifier, device: Signer) -> None:
    token = report(
        device, user="Alice@Corp.Example", now=NOW, os_version="14", managed=True, nonce="n1"
    )
    p = verify(verifier, token)
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert (p.device_id, p.user, p.platform, p.os_version, p.managed) == (
        "dev-1",
        "alice@corp.example",
        "android",
        "14",
        True,
    )
    assert p.app_ids == {TIKTOK}
    assert p.apps[0].name == "TikTok"
    assert p.attested_by == "device"
    assert p.received_at == NOW
    assert p.nonce == "n1"


def test_eddsa_attester_report_accepted_for_any_device(pki: TestPki, verifier: Verifier) -> None:
    mdm = next(a for a in pki.attesters if a.cert.subject.rfc4514_string().startswith("CN=Ed"))
    for device_id in ("dev-1", "some-other:device.42"):
        token = report(mdm, device_id=device_id, now=NOW)
        assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
        p = verify(verifier, token)
        assert p.device_id == device_id
        assert p.attested_by == "mdm:Ed MDM"


def test_es256_attester_without_root_in_x5c(pki: TestPki, verifier: Verifier) -> None:
    mdm = pki.attesters[0]
    token = report(Signer(mdm.key, [mdm.cert]), device_id="x", now=NOW)
    assert verify(verifier, token).attested_by == "mdm:Example MDM"


def test_surrounding_whitespace_and_bytes(verifier: Verifier, device: Signer) -> None:
    token = report(device, now=NOW)
    assert verify(verifier, f"\n  {token}\r\n").device_id == "dev-1"
    assert verify(verifier, token.encode() + b"\n").device_id == "dev-1"


def test_from_files(tmp_path: Path, pki: TestPki, device: Signer) -> None:
    ca_path, attester_paths = pki.write_files(tmp_path)
    v = Verifier.from_files(ca_path, attester_paths)
    assert verify(v, report(pki.attesters[0], device_id="zz", now=NOW)).attested_by.startswith(
        "mdm:"
    )
    assert verify(v, report(device, now=NOW)).attested_by == "device"


def test_chain_cache_respects_certificate_validity(pki: TestPki) -> None:
    v = pki.verifier()
    short = pki.device("dev-1", not_after=dt.datetime.fromtimestamp(NOW + 600, dt.UTC))
    token = report(short, now=NOW)
    verify(v, token)
    verify(v, token)  # served from the cache
    # Same token later: the leaf has expired, so the cached result must not be used.
    refused(v, token, "untrusted_chain", now=NOW + 700)


def test_reason_codes_are_the_documented_set() -> None:
    assert set(REASON_CODES) == {
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
    }


# ----------------------------------------------------------------- size, structure


def test_oversized(verifier: Verifier, device: Signer) -> None:
    refused(verifier, "a" * (MAX_REPORT_BYTES + 1), "too_large")
    refused(verifier, b"a." * (MAX_REPORT_BYTES // 2 + 1), "too_large")
    # A validly signed report that is too large is refused before parsing.
    big = report(device, now=NOW, apps=[{"id": "x" * 1000}] * 300)
    assert len(big) > MAX_REPORT_BYTES
    refused(verifier, big, "too_large")
    # Multi-byte characters count as bytes.
    refused(verifier, "é" * (MAX_REPORT_BYTES // 2 + 1), "too_large")


def test_truncated_token(verifier: Verifier, device: Signer) -> None:
    token = report(device, now=NOW)
    refused(verifier, token.rsplit(".", 1)[0], "malformed")
    refused(verifier, token[: len(token) // 2], "malformed")
    refused(verifier, token[:-10], "bad_signature")
    refused(verifier, "", "malformed")
    refused(verifier, "   ", "malformed")


def test_non_json_payload(verifier: Verifier, device: Signer) -> None:
    header = default_header(device.chain, "ES256")
    refused(verifier, hand_jws(header, b"not json", sign=lambda m: b"x" * 64), "malformed")
    refused(verifier, hand_jws(header, b"[1, 2]", sign=lambda m: b"x" * 64), "malformed")
    refused(verifier, hand_jws(header, b'{"iat": NaN}', sign=lambda m: b"x" * 64), "malformed")
    deep = b'{"a":' + b"[" * 80_000 + b"]" * 80_000 + b"}"
    refused(verifier, hand_jws(header, deep, sign=lambda m: b"x" * 64), "malformed")
    # The same holds for a correctly signed non-JSON payload.
    token = jwt.PyJWS().encode(
        b"\xff\xfe", device.key, algorithm="ES256", headers={"typ": TYP, "x5c": header["x5c"]}
    )
    refused(verifier, token, "malformed")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.pop("typ"),
        lambda h: h.update(typ="JWT"),
        lambda h: h.pop("x5c"),
        lambda h: h.update(x5c=[]),
        lambda h: h.update(x5c="MIIB"),
        lambda h: h.update(x5c=["not base64!"]),
        lambda h: h.update(x5c=["AAAA"]),
        lambda h: h.update(x5c=[1]),
        lambda h: h.pop("alg"),
        lambda h: h.update(crit=["exp"]),
        lambda h: h.update(b64=False, crit=["b64"]),
    ],
    ids=[
        "no-typ",
        "wrong-typ",
        "no-x5c",
        "empty-x5c",
        "x5c-string",
        "x5c-bad-b64",
        "x5c-not-der",
        "x5c-int",
        "no-alg",
        "crit",
        "b64-false",
    ],
)
def test_bad_header_is_malformed(verifier: Verifier, device: Signer, mutate) -> None:
    header = default_header(device.chain, "ES256")
    mutate(header)
    claims = make_claims(device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW)
    token = hand_jws(header, claims, sign=lambda m: b"x" * 64)
    refused(verifier, token, "malformed")


# -------------------------------------------------------------- algorithm, signature


def test_alg_none(verifier: Verifier, device: Signer) -> None:
    claims = make_claims(device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW)
    for alg in ("none", "None", "NONE"):
        refused(verifier, hand_jws(default_header(device.chain, alg), claims), "alg_not_allowed")


def test_hs256_with_public_key_as_hmac_secret(verifier: Verifier, device: Signer) -> None:
    """The classic key-confusion attack: HMAC keyed with the certificate's public key."""
    claims = make_claims(device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW)
    pub = device.cert.public_key()
    for secret in (
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        device.cert.public_bytes(serialization.Encoding.PEM),
    ):
        token = hand_jws(
            default_header(device.chain, "HS256"),
            claims,
            sign=lambda m, s=secret: hmac.new(s, m, hashlib.sha256).digest(),
        )
        refused(verifier, token, "alg_not_allowed")


def test_rs256(pki: TestPki, verifier: Verifier) -> None:
    rsa_device = pki.device("dev-1", key=rsa.generate_private_key(65537, 2048))
    claims = make_claims(device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW)
    header = default_header(rsa_device.chain, "RS256")
    token = jwt.encode(
        claims, rsa_device.key, algorithm="RS256", headers={"typ": TYP, "x5c": header["x5c"]}
    )
    refused(verifier, token, "alg_not_allowed")
    # ES256 claimed over an RSA certificate is refused as well.
    token = hand_jws(default_header(rsa_device.chain, "ES256"), claims, sign=lambda m: b"x" * 64)
    refused(verifier, token, "alg_not_allowed")


def test_alg_key_mismatch(pki: TestPki, verifier: Verifier, device: Signer) -> None:
    claims = make_claims(device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW)
    # EdDSA header over a P-256 certificate.
    refused(
        verifier,
        hand_jws(default_header(device.chain, "EdDSA"), claims, sign=lambda m: b"x" * 64),
        "alg_not_allowed",
    )
    # ES256 with a P-384 certificate.
    p384 = pki.device("dev-1", key=ec.generate_private_key(ec.SECP384R1()))
    refused(
        verifier,
        hand_jws(default_header(p384.chain, "ES256"), claims, sign=lambda m: b"x" * 64),
        "alg_not_allowed",
    )
    refused(
        verifier,
        hand_jws(default_header(p384.chain, "ES384"), claims, sign=lambda m: b"x" * 96),
        "alg_not_allowed",
    )


def test_bad_signature(pki: TestPki, verifier: Verifier, device: Signer) -> None:
    other = pki.device("dev-1")
    # Signed by another key than the x5c leaf's.
    claims = make_claims(device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW)
    refused(verifier, sign_report(claims, other.key, device.chain), "bad_signature")
    # Payload altered after signing.
    token = report(device, now=NOW)
    h, _, s = token.split(".")
    altered = dict(claims, apps=[])
    forged = f"{h}.{hand_jws({}, altered).split('.')[1]}.{s}"
    refused(verifier, forged, "bad_signature")


# -------------------------------------------------------------------------- chain


def test_wrong_ca(verifier: Verifier) -> None:
    stranger = TestPki("some other CA")
    refused(verifier, report(stranger.device("dev-1"), now=NOW), "untrusted_chain")
    # An attester of another CA with the same name is not an attester.
    mdm = stranger.attester("Example MDM")
    refused(verifier, report(mdm, device_id="dev-1", now=NOW), "untrusted_chain")


def test_x5c_root_is_not_a_trust_anchor(verifier: Verifier) -> None:
    """A chain that includes its own (untrusted) root in x5c is still untrusted."""
    stranger = TestPki("self-made CA")
    refused(verifier, report(stranger.device("dev-1"), now=NOW), "untrusted_chain")


def test_expired_leaf_certificate(pki: TestPki, verifier: Verifier) -> None:
    old = pki.device(
        "dev-1",
        not_before=dt.datetime.fromtimestamp(NOW - 3 * 365 * 86400, dt.UTC),
        not_after=dt.datetime.fromtimestamp(NOW - 365 * 86400, dt.UTC),
    )
    refused(verifier, report(old, now=NOW), "untrusted_chain")


def test_ca_cert_as_signer_is_untrusted(pki: TestPki, verifier: Verifier) -> None:
    ca_signer = Signer(pki.ca_key, [pki.ca])
    refused(verifier, report(ca_signer, now=NOW), "untrusted_chain")


def test_leaf_without_digital_signature_or_with_server_eku(
    pki: TestPki, verifier: Verifier
) -> None:
    server, key = make_leaf(pki.ca, pki.ca_key, cn="dev-1", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    refused(verifier, report(Signer(key, [server, pki.ca]), now=NOW), "untrusted_chain")


# ------------------------------------------------------------------------- claims


def test_device_signing_for_another_device(verifier: Verifier, device: Signer) -> None:
    refused(verifier, report(device, device_id="dev-2", now=NOW), "device_mismatch")


def test_apps_not_a_list(verifier: Verifier, device: Signer) -> None:
    for apps in (
        {"id": TIKTOK},
        TIKTOK,
        None,
        [TIKTOK],
        [{"version": "1"}],
        [{"id": 5}],
        [{"id": "a", "version": 3}],
    ):
        token = report(device, now=NOW, apps=())
        claims = jwt.decode(token, options={"verify_signature": False})
        if apps is None:
            claims.pop("apps")
        else:
            claims["apps"] = apps
        refused(verifier, sign_report(claims, device.key, device.chain), "malformed")


def test_too_many_apps(verifier: Verifier, device: Signer) -> None:
    assert verify(verifier, report(device, now=NOW, apps=["a"] * MAX_APPS))
    refused(verifier, report(device, now=NOW, apps=["a"] * (MAX_APPS + 1)), "malformed")


@pytest.mark.parametrize(
    "overrides",
    [
        {"sub": "bad id with spaces"},
        {"sub": "x" * 129},
        {"user": "not-an-address"},
        {"user": 7},
        {"platform": "symbian"},
        {"platform": None},
        {"managed": "yes"},
        {"os_version": 14},
        {"iat": "1700000000"},
        {"exp": 1.5},
        {"iat": True},
        {"jti": None},
        {"jti": ""},
        {"iss": None},
        {"nonce": 12},
        {"user": "alice\r\n@corp.example"},
        {"os_version": "14\x00"},
        {"apps": [{"id": "com.example\r\nBYE"}]},
        {"apps": [{"id": "a", "name": "x" * 1025}]},
    ],
    ids=lambda o: "-".join(f"{k}={v!r}"[:20] for k, v in o.items()),
)
def test_bad_claims_are_malformed(verifier: Verifier, device: Signer, overrides) -> None:
    claims = make_claims(device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW)
    for k, v in overrides.items():
        if v is None:
            claims.pop(k)
        else:
            claims[k] = v
    refused(verifier, sign_report(claims, device.key, device.chain), "malformed")


def test_exp_passed(verifier: Verifier, device: Signer) -> None:
    token = report(device, now=NOW - 7200)  # exp = iat + 3600 -> an hour ago
    refused(verifier, token, "expired")
    # Within the skew it is still accepted.
    assert verify(verifier, report(device, now=NOW - 3600 - 200))


def test_iat_in_the_future(verifier: Verifier, device: Signer) -> None:
    """iat may be at most 60 s ahead of the clock (DESIGN; exp keeps 5 minutes)."""
    refused(verifier, report(device, now=NOW + 600), "not_yet_valid")
    refused(verifier, report(device, now=NOW + 200), "not_yet_valid")
    refused(verifier, report(device, now=NOW + 61), "not_yet_valid")
    assert verify(verifier, report(device, now=NOW + 60))


def test_iat_older_than_max_age(verifier: Verifier, device: Signer) -> None:
    token = report(device, now=NOW - 3000)  # still unexpired (exp = iat + 3600)
    refused(verifier, token, "expired", max_age_s=600)
    assert verify(verifier, token, max_age_s=3600)


def test_lifetime_longer_than_max_age(verifier: Verifier, device: Signer) -> None:
    token = sign_report(
        make_claims(
            device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW, ttl_s=7 * 86400
        ),
        device.key,
        device.chain,
    )
    err = refused(verifier, token, "expired", max_age_s=86400)
    assert "lifetime" in err.detail


def test_exp_before_iat(verifier: Verifier, device: Signer) -> None:
    refused(verifier, report(device, now=NOW, exp=int(NOW) - 10), "malformed")


def test_require_nonce(verifier: Verifier, device: Signer) -> None:
    refused(verifier, report(device, now=NOW), "bad_nonce", require_nonce=True)
    assert verify(verifier, report(device, now=NOW, nonce="abc"), require_nonce=True)


# ----------------------------------------------------------------- ingest, replay


async def test_replayed_jti(verifier: Verifier, device: Signer) -> None:
    store = InMemoryPostureStore()
    token = report(device, now=NOW)
    await ingest(verifier, store, token, now=NOW, max_age_s=MAX_AGE, require_nonce=False)
    with pytest.raises(AttestationError) as info:
        await ingest(verifier, store, token, now=NOW + 1, max_age_s=MAX_AGE, require_nonce=False)
    assert info.value.code == "replay"
    # A different report reusing the jti is a replay too.
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    again = report(device, now=NOW, apps=[], jti=jti)
    with pytest.raises(AttestationError, match="replay"):
        await ingest(verifier, store, again, now=NOW + 2, max_age_s=MAX_AGE, require_nonce=False)


async def test_expired_and_reused_nonce(verifier: Verifier, device: Signer) -> None:
    store = InMemoryPostureStore()
    await store.issue_nonce("old", NOW - 1)
    await store.issue_nonce("fresh", NOW + 60)
    kw = {"now": NOW, "max_age_s": MAX_AGE, "require_nonce": True}
    with pytest.raises(AttestationError) as info:
        await ingest(verifier, store, report(device, now=NOW, nonce="old"), **kw)
    assert info.value.code == "bad_nonce"
    with pytest.raises(AttestationError, match="bad_nonce"):
        await ingest(verifier, store, report(device, now=NOW, nonce="never-issued"), **kw)
    p = await ingest(verifier, store, report(device, now=NOW, nonce="fresh"), **kw)
    assert p.nonce == "fresh"
    with pytest.raises(AttestationError) as info:
        await ingest(verifier, store, report(device, now=NOW, nonce="fresh"), **kw)
    assert info.value.code == "bad_nonce"


async def test_refused_report_changes_nothing(verifier: Verifier, device: Signer) -> None:
    store = InMemoryPostureStore()
    kw = {"now": NOW, "max_age_s": MAX_AGE, "require_nonce": False}
    await ingest(verifier, store, report(device, now=NOW, apps=[]), **kw)
    before = dict(store.postures), dict(store.jtis)
    bad = report(device, now=NOW - 7200, jti="j-refused")  # expired
    with pytest.raises(AttestationError, match="expired"):
        await ingest(verifier, store, bad, **kw)
    assert (dict(store.postures), dict(store.jtis)) == before
    # The refused report did not use up its jti.
    await ingest(verifier, store, report(device, now=NOW, jti="j-refused"), **kw)


async def test_sqlite_store(tmp_path: Path, verifier: Verifier, device: Signer) -> None:
    sqlite = pytest.importorskip("proxy.posture.sqlite")
    store = sqlite.SqlitePostureStore(tmp_path / "posture.db")
    kw = {"now": NOW, "max_age_s": MAX_AGE, "require_nonce": True}
    try:
        await store.issue_nonce("n-1", NOW + 60)
        token = report(device, now=NOW, nonce="n-1")
        posture = await ingest(verifier, store, token, **kw)
        assert await store.get("dev-1") == posture
        with pytest.raises(AttestationError) as info:
            await ingest(verifier, store, token, **kw)
        assert info.value.code in ("bad_nonce", "replay")
        await store.issue_nonce("n-2", NOW + 60)
        replay = report(device, now=NOW, nonce="n-2", jti=posture.jti)
        with pytest.raises(AttestationError) as info:
            await ingest(verifier, store, replay, **kw)
        assert info.value.code == "replay"
    finally:
        await store.close()


# ------------------------------------------------------------------------ fuzzing


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(),
        st.binary(),
        st.from_regex(
            r"[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*\."
            r"[A-Za-z0-9_\-]*",
            fullmatch=True,
        ),
    )
)
def test_arbitrary_input_raises_only_attestation_error(token: str | bytes) -> None:
    v = _FUZZ_PKI.verifier()
    with pytest.raises(AttestationError):
        verify(v, token)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_report_raises_only_attestation_error(data: st.DataObject) -> None:
    token = _FUZZ_TOKEN
    i = data.draw(st.integers(0, len(token) - 1))
    action = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
    ch = data.draw(st.characters(codec="ascii"))
    mutated = {
        "replace": token[:i] + ch + token[i + 1 :],
        "delete": token[:i] + token[i + 1 :],
        "insert": token[:i] + ch + token[i:],
        "truncate": token[:i],
    }[action]
    with contextlib.suppress(AttestationError):
        verify(_FUZZ_VERIFIER, mutated)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "iss",
                "sub",
                "user",
                "platform",
                "os_version",
                "managed",
                "apps",
                "iat",
                "exp",
                "jti",
                "nonce",
            ]
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=8,
        ),
    )
)
def test_signed_arbitrary_claims_raise_only_attestation_error(claims: dict) -> None:
    base = make_claims(device_id="dev-1", user=USER, platform="ios", apps=[], now=NOW)
    token = sign_report({**base, **claims}, _FUZZ_DEVICE.key, _FUZZ_DEVICE.chain)
    with contextlib.suppress(AttestationError):
        verify(_FUZZ_VERIFIER, token)


_FUZZ_PKI = TestPki()
_FUZZ_DEVICE = _FUZZ_PKI.device("dev-1")
_FUZZ_VERIFIER = _FUZZ_PKI.verifier()
_FUZZ_TOKEN = report(_FUZZ_DEVICE, now=NOW)


# ------------------------------------------------------------ issue 12: authority


def test_report_names_its_authority_and_issuer(pki: TestPki, verifier: Verifier,
                                               device: Signer) -> None:
    """A device report's authority is `device`; an MDM attester's is
    `attester:<fp8>`; each carries its signing certificate's fingerprint (jti issuer)."""
    mine = verify(verifier, report(device))
    assert mine.source == "device" and len(mine.signer) == 64
    mdm = verify(verifier, report(pki.attesters[0]))
    assert mdm.source == f"attester:{mdm.signer[:8]}" and mdm.is_mdm
    assert mdm.signer != mine.signer


def test_device_reports_disabled(pki: TestPki, device: Signer) -> None:
    """With [trust] device_reports = "deny", a device-signed report is refused
    device_reports_disabled; the MDM's still goes through."""
    v = pki.verifier(device_reports=False)
    refused(v, report(device), "device_reports_disabled")
    assert verify(v, report(pki.attesters[0]))


def test_device_certificate_of_bob_cannot_attest_alice(pki: TestPki, verifier: Verifier) -> None:
    """The rfc822 SAN of a device certificate binds the report's user."""
    bobs = pki.device("bob-phone", "bob@corp.example")
    refused(verifier, report(bobs, device_id="bob-phone", user=USER), "user_mismatch")
    assert verify(verifier, report(bobs, device_id="bob-phone", user="Bob@corp.example"))


def test_crl_revoked_signer_refused(tmp_path: Path, pki: TestPki) -> None:
    """A signing certificate on a configured CRL is refused `revoked`, even when its
    chain verification was cached; a CRL past nextUpdate fails closed."""
    from pki_helpers import make_crl

    from proxy.crl import CrlSet

    stolen = pki.device("dev-crl")
    v = pki.verifier()
    token = report(stolen, device_id="dev-crl")
    assert verify(v, token)  # cached now
    path = tmp_path / "device-ca.crl"
    path.write_bytes(make_crl(pki, [stolen.cert.serial_number]))
    v.crl = CrlSet([path], [pki.ca])
    refused(v, token, "revoked")
    path.write_bytes(make_crl(pki, [], next_update_s=-3600))  # before NOW (module import)
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime even within a tick
    assert v.crl.reload_if_changed()  # reloaded on change, like the policy
    refused(v, token, "untrusted_chain")


def test_forget_device_drops_cached_chains(pki: TestPki) -> None:
    """Revoking a device drops its cached chain verifications (ids case-insensitive)."""
    v = pki.verifier()
    verify(v, report(pki.device("Phone-X"), device_id="Phone-X"))
    assert v.forget_device("phone-x") == 1
    assert v.forget_device("phone-x") == 0
