"""certs init and device enrolment: files, modes, RFC 5280 profile, real TLS handshakes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    DNSName,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

from proxy.attestation import Verifier
from proxy.pki import (
    PkiError,
    certs_init,
    enroll_device,
    load_certs,
    load_private_key,
    make_claims,
    sign_report,
    trial_path,
)

FILES = {
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "device-ca.pem",
    "device-ca.key",
    "mdm-attester.pem",
    "mdm-attester.key",
    "audit-signing.key",
    "audit-signing.pub",
    "admin.token",
}
PRIVATE = {
    "ca.key",
    "server.key",
    "device-ca.key",
    "mdm-attester.key",
    "audit-signing.key",
    "admin.token",
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs") / "certs"
    certs_init(d, hostnames=["mail.corp.example", "192.0.2.7"])
    return d


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


OFFLINE = {"ca.key", "device-ca.key", "mdm-attester.key"}


def test_certs_init_writes_every_file(tmp_path: Path) -> None:
    """Every file is written; the keys the server never needs go to offline/ (0700)."""
    written = certs_init(tmp_path / "c")
    assert {p.name for p in written} == FILES
    assert {p.name for p in written if p.parent.name == "offline"} == OFFLINE
    # no temp files left
    assert {p.name for p in (tmp_path / "c").iterdir()} == FILES - OFFLINE | {"offline"}
    assert {p.name for p in (tmp_path / "c" / "offline").iterdir()} == OFFLINE
    assert _mode(tmp_path / "c" / "offline") == 0o700
    for p in written:
        assert p.stat().st_size > 0
        if p.name in PRIVATE:
            assert _mode(p) == 0o600, p


def test_keys_and_token(certs: Path) -> None:
    for name in ("ca.key", "server.key", "device-ca.key", "mdm-attester.key"):
        text = trial_path(certs, name).read_text()
        assert text.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
        key = load_private_key(trial_path(certs, name))
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
    audit = serialization.load_pem_private_key((certs / "audit-signing.key").read_bytes(), None)
    assert isinstance(audit, ed25519.Ed25519PrivateKey)
    assert (certs / "audit-signing.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    pub = serialization.load_pem_public_key((certs / "audit-signing.pub").read_bytes())
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(audit.sign(b"head"), b"head")
    token = (certs / "admin.token").read_text()
    assert len(token) == 43 and token.strip() == token  # 32 bytes, urlsafe base64
    assert token != trial_path(certs, "ca.key").read_text()


def test_rfc5280_profile(certs: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca, dca = load_certs(certs / "ca.pem")[0], load_certs(certs / "device-ca.pem")[0]
    server_chain = load_certs(certs / "server.pem")
    mdm_chain = load_certs(certs / "mdm-attester.pem")
    assert server_chain[1:] == [ca]
    assert mdm_chain[1:] == [dca]
    for cacert in (ca, dca):
        bc = cacert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == 0
        ku = cacert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        life = cacert.not_valid_after_utc - cacert.not_valid_before_utc
        assert dt.timedelta(days=3649) < life < dt.timedelta(days=3651)
    assert ca.public_key() != dca.public_key()
    for leaf, issuer, eku in (
        (server_chain[0], ca, ExtendedKeyUsageOID.SERVER_AUTH),
        (mdm_chain[0], dca, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        ext = leaf.extensions
        assert ext.get_extension_for_class(x509.BasicConstraints).critical
        assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
        ku = ext.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
        assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
        aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest
        ext.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert leaf.not_valid_before_utc < now - dt.timedelta(minutes=4)
        life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert dt.timedelta(days=729) < life < dt.timedelta(days=731)
    assert server_chain[0].serial_number != mdm_chain[0].serial_number


def test_server_san(certs: Path) -> None:
    san = (
        load_certs(certs / "server.pem")[0]
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "mail.corp.example"} <= set(dns)
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "192.0.2.7")} <= set(ips)


def test_server_chain_verifies_with_cryptography(certs: Path) -> None:
    store = Store(load_certs(certs / "ca.pem"))
    leaf, *rest = load_certs(certs / "server.pem")
    for name in (DNSName("localhost"), IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = PolicyBuilder().store(store).build_server_verifier(name).verify(leaf, rest)
        assert chain[-1] == load_certs(certs / "ca.pem")[0]


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> str:
    """A full TLS handshake over memory BIOs; returns the negotiated version."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, conn in (("c", client), ("s", server)):
            if not done[key]:
                try:
                    conn.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"
    return client.version() or ""


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1", "mail.corp.example"])
def test_server_pem_handshake_with_strict_client(certs: Path, hostname: str) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=certs / "ca.pem")
    # What Python 3.13 turns on by default.
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    assert _handshake(server_ctx, client_ctx, hostname).startswith("TLS")


def test_server_pem_rejected_by_client_trusting_other_ca(certs: Path, tmp_path: Path) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=certs / "device-ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, client_ctx, "localhost")


def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    d = tmp_path / "c"
    certs_init(d)
    before = {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(PkiError, match=r"ca\.pem|ca\.key"):
        certs_init(d)
    assert {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    # A single existing key is enough to refuse, and the message names it.
    (d2 := tmp_path / "d").mkdir()
    (d2 / "audit-signing.key").write_text("precious")
    with pytest.raises(PkiError, match=r"audit-signing\.key"):
        certs_init(d2)
    assert [p.name for p in d2.iterdir()] == ["audit-signing.key"]
    written = certs_init(d, force=True)
    assert {p.name for p in written} == FILES
    assert trial_path(d, "ca.key").read_bytes() != before["ca.key"]
    assert _mode(trial_path(d, "ca.key")) == 0o600


def test_invalid_hostname(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="bad host"):
        certs_init(tmp_path, hostnames=["bad host"])
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------- enrolment


def test_enroll_device(certs: Path, tmp_path: Path) -> None:
    out = tmp_path / "devices" / "phone-1"
    key_path, cert_path = enroll_device(
        device_ca_cert=certs / "device-ca.pem",
        device_ca_key=trial_path(certs, "device-ca.key"),
        device_id="phone-1",
        user="Alice@Corp.Example",
        out_dir=out,
    )
    assert (key_path, cert_path) == (out / "device.key", out / "device.pem")
    assert _mode(key_path) == 0o600
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    key = load_private_key(key_path)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    leaf, *chain = load_certs(cert_path)
    assert chain == load_certs(certs / "device-ca.pem")
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:mailward:device:phone-1"
    ]
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@corp.example"]
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "phone-1"

    # Verifies as a client certificate against device-ca.pem only.
    store = Store(load_certs(certs / "device-ca.pem"))
    verified = PolicyBuilder().store(store).build_client_verifier().verify(leaf, chain)
    assert verified.chain[0] == leaf
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store(load_certs(certs / "ca.pem"))).build_client_verifier().verify(
            leaf, chain
        )

    # And a mTLS handshake with it succeeds against a server requiring device-ca.pem.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    server_ctx.load_verify_locations(certs / "device-ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    client_ctx = ssl.create_default_context(cafile=certs / "ca.pem")
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    client_ctx.load_cert_chain(cert_path, key_path)
    _handshake(server_ctx, client_ctx, "localhost")


def test_enroll_refuses_overwrite_and_bad_input(certs: Path, tmp_path: Path) -> None:
    kw = {
        "device_ca_cert": certs / "device-ca.pem",
        "device_ca_key": trial_path(certs, "device-ca.key"),
        "user": "bob@corp.example",
        "out_dir": tmp_path,
    }
    enroll_device(device_id="d1", **kw)
    first = (tmp_path / "device.key").read_bytes()
    with pytest.raises(PkiError, match=r"device\.key"):
        enroll_device(device_id="d1", **kw)
    enroll_device(device_id="d1", force=True, **kw)
    assert (tmp_path / "device.key").read_bytes() != first
    for bad in ("", "x" * 129, "has space", "slash/no", "ünï"):
        with pytest.raises(PkiError, match="device id"):
            enroll_device(device_id=bad, **{**kw, "out_dir": tmp_path / "x"})
    with pytest.raises(PkiError, match="user"):
        enroll_device(device_id="d2", **{**kw, "user": "nobody", "out_dir": tmp_path / "y"})
    with pytest.raises(PkiError, match="not the key"):
        enroll_device(
            device_id="d3",
            **{**kw, "device_ca_key": trial_path(certs, "ca.key"), "out_dir": tmp_path / "z"}
        )
    with pytest.raises(PkiError, match="cannot read"):
        enroll_device(
            device_id="d4",
            **{**kw, "device_ca_cert": tmp_path / "missing.pem", "out_dir": tmp_path / "w"},
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------- reports


def test_make_claims() -> None:
    c = make_claims(
        device_id="p1",
        user="A@B.example",
        platform="ios",
        apps=["com.zhiliaoapp.musically", "com.example.mail", "", {"id": "x", "version": "2"}],
        now=1_700_000_000.7,
        ttl_s=600,
        nonce="n",
    )
    assert c["apps"] == [
        {"id": "com.zhiliaoapp.musically", "name": "TikTok"},
        {"id": "com.example.mail"},
        {"id": "x", "version": "2"},
    ]
    assert (c["iat"], c["exp"], c["sub"], c["user"], c["nonce"]) == (
        1_700_000_000,
        1_700_000_600,
        "p1",
        "a@b.example",
        "n",
    )
    assert len(c["jti"]) == 32
    assert make_claims(device_id="p1", user="u@x", platform="ios", apps=[])["jti"] != c["jti"]
    with pytest.raises(PkiError, match="platform"):
        make_claims(device_id="p1", user="u@x", platform="symbian", apps=[])
    with pytest.raises(PkiError, match="device id"):
        make_claims(device_id="p 1", user="u@x", platform="ios", apps=[])


def test_enrolled_device_and_attester_reports_verify(certs: Path, tmp_path: Path) -> None:
    key_path, cert_path = enroll_device(
        device_ca_cert=certs / "device-ca.pem",
        device_ca_key=trial_path(certs, "device-ca.key"),
        device_id="phone-2",
        user="carol@corp.example",
        out_dir=tmp_path,
    )
    v = Verifier.from_files(certs / "device-ca.pem", [certs / "mdm-attester.pem"])
    now = time.time()
    claims = make_claims(
        device_id="phone-2",
        user="carol@corp.example",
        platform="android",
        apps=["com.ss.android.ugc.trill"],
        now=now,
    )
    p = v.verify(
        sign_report(claims, load_private_key(key_path), load_certs(cert_path)),
        now=now,
        max_age_s=86400,
        require_nonce=False,
    )
    assert (p.device_id, p.attested_by, p.apps[0].name) == ("phone-2", "device", "TikTok")
    token = sign_report(
        {**claims, "sub": "anything", "jti": "j2"},
        load_private_key(trial_path(certs, "mdm-attester.key")),
        load_certs(certs / "mdm-attester.pem"),
    )
    p = v.verify(token, now=now, max_age_s=86400, require_nonce=False)
    assert p.attested_by == "mdm:mailward MDM attester"


def test_sign_report_refuses_other_keys(certs: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(PkiError, match="P-256 or Ed25519"):
        sign_report({}, p384, load_certs(certs / "ca.pem"))
    with pytest.raises(PkiError, match="chain"):
        sign_report({}, load_private_key(certs / "server.key"), [])
