"""Certificate and CRL expiry (DESIGN "Health"): check-config warns 30 days ahead, the
server exports mailward_cert_expiry_seconds{file}."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import load_config
from proxy.expiry import WARN_AHEAD_S, expires_at, remaining, warnings
from proxy.pki import certs_init

pytestmark = pytest.mark.pure


def _cert(days: float) -> bytes:
    """A self-signed certificate (PEM) whose notAfter is ``days`` from now."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "soon")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_bundle_expires_with_its_earliest_certificate(tmp_path: Path) -> None:
    """A PEM bundle's end is the earliest notAfter in it; junk and missing files have none."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(_cert(400) + _cert(10))
    end = expires_at(bundle)
    assert end is not None and abs(end - (time.time() + 10 * 86400)) < 120
    (tmp_path / "junk.pem").write_bytes(b"not a certificate")
    assert expires_at(tmp_path / "junk.pem") is None
    assert expires_at(tmp_path / "missing.pem") is None


def test_fresh_trial_certificates_give_no_warning_and_a_soon_expiring_one_does(
        tmp_path: Path) -> None:
    """certs init's certificates are far from expiry; a server certificate ending in
    10 days is named in a warning with its setting; one already past says expired."""
    root = tmp_path
    (root / "config").mkdir()
    repo = Path(__file__).resolve().parents[1]
    for name in ("mailward.toml", "policy.toml"):
        (root / "config" / name).write_text((repo / "config" / name).read_text())
    certs_init(root / "certs")
    cfg = load_config(root / "config/mailward.toml")
    now = time.time()
    assert warnings(cfg, now) == []
    seconds = {key: left for key, _path, left in remaining(cfg, now)}
    assert {"tls.cert", "trust.device_ca"} <= set(seconds)
    assert all(left > WARN_AHEAD_S for left in seconds.values())

    (root / "certs/server.pem").write_bytes(_cert(10))
    lines = warnings(cfg, now)
    assert len(lines) == 1 and "tls.cert" in lines[0] and "expires in 10 days" in lines[0]
    (root / "certs/server.pem").write_bytes(_cert(-1))
    assert "expired" in warnings(cfg, now)[0]


@pytest.mark.conversation
def test_check_config_prints_the_warning_and_exits_0(tmp_path: Path) -> None:
    """`mailward check-config` with a server certificate ending in 10 days prints one
    `warning:` line naming it and still exits 0 (warnings never change the exit code)."""
    from helpers.serve import mailward

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "config").mkdir()
    for name in ("mailward.toml", "policy.toml"):
        (tmp_path / "config" / name).write_text((repo / "config" / name).read_text())
    certs_init(tmp_path / "certs")
    (tmp_path / "certs/server.pem").write_bytes(_cert(10))
    r = mailward("check-config", config=tmp_path / "config/mailward.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "tls.cert expires in 10 days" in warned[0]


def test_the_metric_carries_seconds_left_per_setting() -> None:
    """The Prometheus observer exports mailward_cert_expiry_seconds{file} as given."""
    from proxy.metrics import PrometheusObserver

    observer = PrometheusObserver()
    observer.cert_expiry("tls.cert", 86400.0)
    text = observer.expose()[0].decode()
    assert 'mailward_cert_expiry_seconds{file="tls.cert"} 86400.0' in text
