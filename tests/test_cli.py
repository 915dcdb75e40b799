"""The CLI walk-through of the core issue, end to end from a fresh directory:
certs init -> device enroll -> device attest -> posture ingest -> explain -> audit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.serve import mailward as run_mailward

ROOT = Path(__file__).resolve().parent.parent
TIKTOK = "com.zhiliaoapp.musically"


def mailward(deploy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script in ``deploy``, as an operator would."""
    return run_mailward(*args, config=deploy / "config/mailward.toml", cwd=deploy)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployment root with the shipped config, fresh certs and two attested phones."""
    d = tmp_path_factory.mktemp("deploy")
    (d / "config").mkdir()
    for name in ("mailward.toml", "policy.toml"):
        shutil.copy(ROOT / "config" / name, d / "config" / name)
    assert mailward(d, "certs", "init", "--dir", "certs").returncode == 0
    for dev, user, apps in (
        ("phone-tiktok", "alice@corp.example", f"com.example.mail,{TIKTOK}"),
        ("phone-clean", "bob@corp.example", "com.example.mail"),
    ):
        r = mailward(d, "device", "enroll", "--id", dev, "--user", user)
        assert r.returncode == 0, r.stderr
        assert (d / "certs/devices" / dev / "device.pem").exists()
        r = mailward(d, "device", "attest", "--id", dev, "--user", user, "--platform",
                     "android", "--apps", apps, "--out", f"{dev}.jws")
        assert r.returncode == 0, r.stderr
    return d


def test_ingest_accepts_and_reports_compliance(deploy: Path) -> None:
    """posture ingest prints one line per file: accepted, with the compliance verdict."""
    r = mailward(deploy, "posture", "ingest", "phone-tiktok.jws", "phone-clean.jws")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "phone-tiktok.jws: accepted phone-tiktok noncompliant" in r.stdout
    assert "phone-clean.jws: accepted phone-clean compliant" in r.stdout


def test_ingest_refusals_print_reason_codes(deploy: Path) -> None:
    """Refused reports print the design's reason code; the exit code is 1."""
    # A replay: the same report again (ingested by the test above or here).
    mailward(deploy, "posture", "ingest", "phone-clean.jws")
    good = (deploy / "phone-clean.jws").read_text().strip()
    (deploy / "big.jws").write_text("a" * (256 * 1024 + 1))
    (deploy / "garbage.jws").write_text("not.a.jws")
    (deploy / "truncated.jws").write_text(good[: len(good) // 2])
    r = mailward(deploy, "posture", "ingest", "phone-clean.jws", "big.jws", "garbage.jws",
                 "truncated.jws")
    assert r.returncode == 1
    lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert lines["phone-clean.jws"].startswith("refused replay:")
    assert lines["big.jws"].startswith("refused too_large:")
    assert lines["garbage.jws"].startswith("refused malformed:")
    assert lines["truncated.jws"].startswith("refused ")
    assert "Traceback" not in r.stderr


def test_explain_exit_codes_and_audit_records(deploy: Path) -> None:
    """explain: exit 3 naming TikTok for the TikTok phone, 0 for the clean one, and
    each answer is an `explain` record in the audit log."""
    mailward(deploy, "posture", "ingest", "phone-tiktok.jws", "phone-clean.jws")
    r = mailward(deploy, "explain", "--user", "alice@corp.example", "--device", "phone-tiktok")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "TikTok" in r.stdout and "deny" in r.stdout
    r = mailward(deploy, "explain", "--user", "bob@corp.example", "--device", "phone-clean",
                 "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["decision"] == "allow"
    r = mailward(deploy, "explain", "--user", "bob@corp.example", "--device", "nope")
    assert r.returncode == 3 and "unknown_device" in r.stdout
    r = mailward(deploy, "explain", "--user", "alice@corp.example", "--device", "phone-clean")
    assert r.returncode == 3 and "user_mismatch" in r.stdout

    q = mailward(deploy, "audit", "query", "--event", "explain", "--format", "json")
    assert q.returncode == 0, q.stderr
    records = [json.loads(line) for line in q.stdout.splitlines()]
    by_device = {r["device_id"]: r for r in records}
    assert by_device["phone-tiktok"]["decision"] == "deny"
    assert by_device["phone-tiktok"]["reasons"][0]["app_id"] == TIKTOK
    assert by_device["phone-clean"]["decision"] in ("allow", "deny")
    assert all(r["event"] == "explain" for r in records)
    q = mailward(deploy, "audit", "query", "--decision", "deny", "--format", "csv")
    assert q.stdout.splitlines()[0].startswith(("ts,", "seq,"))


def test_audit_verify_detects_any_change(deploy: Path, tmp_path: Path) -> None:
    """audit verify: 0 on the intact log; 1 naming the line after a byte is changed
    or a line is deleted."""
    mailward(deploy, "explain", "--user", "bob@corp.example", "--device", "phone-clean")
    log = deploy / "state/audit.jsonl"
    r = mailward(deploy, "audit", "verify")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4

    copy = tmp_path / "audit.jsonl"
    flipped = bytearray(b"".join(lines))
    offset = len(b"".join(lines[:2])) + 10  # a byte inside line 3
    flipped[offset] ^= 0x01
    copy.write_bytes(bytes(flipped))
    r = mailward(deploy, "audit", "verify", "--log", str(copy))
    assert r.returncode == 1
    assert ":3:" in r.stderr

    copy.write_bytes(b"".join(lines[:1] + lines[2:]))  # delete line 2
    r = mailward(deploy, "audit", "verify", "--log", str(copy))
    assert r.returncode == 1
    assert ":2:" in r.stderr


def test_ingest_records_share_the_api_schema(deploy: Path) -> None:
    """Every `attestation` record written by posture ingest, accepted or refused,
    has the keys of the API's records (one record builder in the gate)."""
    from proxy.gate import ReportSource, attestation_record

    (deploy / "garbage-2.jws").write_text("not.a.jws")
    mailward(deploy, "posture", "ingest", "phone-clean.jws", "garbage-2.jws")
    lines = (deploy / "state/audit.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("event") == "attestation"]
    assert {r["result"] for r in records} == {"accepted", "refused"}
    keys = set(attestation_record(ReportSource("api"), None, None, code="x"))
    assert all(keys <= set(r) and r["source"] == "cli" and r["file"] for r in records)
    assert len({frozenset(r) for r in records}) == 1


HEAVY = ("asyncio", "structlog", "prometheus_client", "jwt", "aiohttp", "aiosmtpd",
         "aiosmtplib", "uvloop", "watchfiles", "proxy.server", "proxy.api",
         "proxy.frontends.imap", "proxy.frontends.smtp", "proxy.frontends.activesync")


def test_explain_does_no_heavy_import_work(deploy: Path) -> None:
    """explain imports none of the server machinery, not even asyncio
    (bench/startup.py times it against `mailward --help`)."""
    code = (
        "import sys; from proxy.cli import main; rc = main(['explain', '--user', "
        "'bob@corp.example', '--device', 'phone-clean']); "
        f"print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=deploy, capture_output=True,
                       text=True, timeout=60,
                       env={**os.environ, "MAILWARD_CONFIG": str(deploy / "config/mailward.toml")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_user_errors_are_one_line(deploy: Path) -> None:
    """Bad input is one clear line on stderr and exit 2, never a traceback."""
    r = mailward(deploy, "posture", "ingest", "missing.jws")
    assert r.returncode == 1 and "missing.jws: refused" in r.stdout
    r = mailward(deploy, "device", "enroll", "--id", "bad id!", "--user", "a@b.c")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = mailward(deploy, "explain", "--user", "a@b.c", "--device", "x", "--config",
                 str(deploy / "nope.toml"))
    assert r.returncode == 2 and "file not found" in r.stderr
    r = mailward(deploy, "certs", "init", "--dir", "certs")
    assert r.returncode == 2 and "exists" in r.stderr.lower()


# ------------------------------------------------------------------ issue 12


def test_ingest_line_names_the_source_in_force(deploy: Path) -> None:
    """The accepted line reports the posture now in force with its source."""
    r = mailward(deploy, "device", "attest", "--id", "phone-clean", "--user",
                 "bob@corp.example", "--platform", "android", "--apps", "com.example.mail",
                 "--out", "again.jws")
    assert r.returncode == 0, r.stderr
    r = mailward(deploy, "posture", "ingest", "again.jws")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("accepted phone-clean compliant source=device"), r.stdout


def test_device_commands_and_explain_show_revoked(deploy: Path) -> None:
    """revoke (an id never seen, in advance), list, explain naming `revoked`,
    alias, unbind, forget and unrevoke: each an audit record with the OS user."""
    r = mailward(deploy, "device", "revoke", "Lost-Phone", "--why", "left on a train")
    assert r.returncode == 0, r.stderr
    r = mailward(deploy, "explain", "--user", "alice@corp.example", "--device", "lost-phone",
                 "--protocol", "activesync")
    assert r.returncode == 3 and "- revoked: " in r.stdout, r.stdout
    r = mailward(deploy, "device", "list", "--revoked", "--format", "json")
    assert [json.loads(x)["device"] for x in r.stdout.splitlines()] == ["lost-phone"]
    for args in (("alias", "phone-clean", "EAS-CLEAN"), ("unbind", "phone-clean"),
                 ("unrevoke", "lost-phone", "--why", "found"), ("forget", "lost-phone")):
        r = mailward(deploy, "device", *args)
        assert r.returncode == 0, (args, r.stderr)
    r = mailward(deploy, "audit", "query", "--format", "json")
    events = [json.loads(x) for x in r.stdout.splitlines()]
    mine = [e for e in events if e["event"].startswith("device_")]
    assert [e["event"] for e in mine] == ["device_revoked", "device_alias", "device_unbound",
                                          "device_unrevoked", "device_forgotten"]
    assert all(e["actor"] for e in mine)
    r = mailward(deploy, "device", "unrevoke", "x")
    assert r.returncode == 2 and "--why" in r.stderr  # unrevoke needs a reason


def test_check_config_refuses_cleartext_api_off_loopback(deploy: Path, tmp_path: Path) -> None:
    """[api] tls = false on a non-loopback address: exit 2, file:line message."""
    cfg = tmp_path / "config" / "mailward.toml"
    cfg.parent.mkdir()
    text = (deploy / "config/mailward.toml").read_text()
    cfg.write_text(text.replace('listen = "127.0.0.1:8443"\ntls = true',
                                'listen = "0.0.0.0:8443"\ntls = false'))
    r = mailward(deploy, "check-config", "--config", str(cfg))
    assert r.returncode == 2
    line = next(n for n, x in enumerate(cfg.read_text().splitlines(), 1) if x == "tls = false")
    assert f"mailward.toml:{line}: api.tls: " in r.stderr, r.stderr


def test_check_config_warns_about_a_crl_near_next_update(deploy: Path, tmp_path: Path) -> None:
    """A CRL whose nextUpdate is less than 7 days away is a `warning:` line, exit 0;
    a CRL no configured CA signed is exit 2 naming the file."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from proxy.pki import load_private_key

    ca = x509.load_pem_x509_certificate((deploy / "certs/device-ca.pem").read_bytes())
    key = load_private_key(deploy / "certs/offline/device-ca.key")
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
           .last_update(now).next_update(now + dt.timedelta(days=3))
           .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    (tmp_path / "device-ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    cfg = deploy / "config" / "crl.toml"
    text = (deploy / "config/mailward.toml").read_text()
    cfg.write_text(text.replace('# crl = ["certs/device-ca.crl"]',
                                f'crl = ["{tmp_path / "device-ca.crl"}"]'))
    r = mailward(deploy, "check-config", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "warning: " in r.stdout and "device-ca.crl" in r.stdout and "nextUpdate" in r.stdout
    (tmp_path / "device-ca.crl").write_bytes(b"not a crl")
    r = mailward(deploy, "check-config", "--config", str(cfg))
    assert r.returncode == 2 and "device-ca.crl" in r.stderr


def test_check_config_reads_the_nginx_secret(deploy: Path, tmp_path: Path) -> None:
    """With [nginx], check-config refuses an unusable secret file as serve would (exit 2,
    file named) and accepts a usable one."""
    secret = tmp_path / "nginx.secret"
    cfg = deploy / "config" / "nginx.toml"
    text = (deploy / "config/mailward.toml").read_text()
    cfg.write_text(text + f'\n[nginx]\nsecret_file = "{secret}"\n')
    secret.write_text("short\n")
    r = mailward(deploy, "check-config", "--config", str(cfg))
    assert r.returncode == 2 and "nginx.secret_file" in r.stderr and str(secret) in r.stderr
    secret.write_text("a-long-enough-shared-secret-0123456789\n")
    r = mailward(deploy, "check-config", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
