"""State across releases and backups: ``mailward serve`` upgrades a state directory
made by the previous release (revision 2ae0984, tests/fixtures/state-2ae0984), and
``mailward backup`` copies a running server's state so that the copy verifies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import proxy
from proxy.cli import main
from proxy.posture.sqlite import SCHEMA_VERSION, read_postures

pytestmark = pytest.mark.peer  # mailward serve as a subprocess

FIXTURE = Path(__file__).resolve().parent / "fixtures/state-2ae0984"
MAILWARD = str(Path(sys.executable).with_name("mailward"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deployment(tmp_path: Path) -> tuple[Path, int]:
    """`mailward init` (new certificates and audit key), the old release's state/
    copied in, a config with one loopback listener and the API on free ports."""
    root = tmp_path / "mw"
    assert main(["init", str(root)]) == 0
    for f in (FIXTURE / "state").iterdir():
        shutil.copy(f, root / "state" / f.name)
    api = _free_port()
    (root / "config/mailward.toml").write_text(f"""\
[server]
shutdown_grace = "1s"

[api]
listen = "127.0.0.1:{api}"

[[listeners]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:{_free_port()}"
upstream = "127.0.0.1:9"
upstream_ca = "certs/ca.pem"
""")
    return root, api


def _get(root: Path, port: int, path: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(root / "certs/ca.pem"))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx,
                                    timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(proc: subprocess.Popen[bytes], root: Path, port: int, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if _get(root, port, "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready: {log.read_text()}")


def _post_report(root: Path, port: int) -> None:
    """A new phone's report, accepted by the running server (201)."""
    for args in (["device", "enroll", "--id", "carol-phone", "--user", "carol@corp.example"],
                 ["device", "attest", "--id", "carol-phone", "--user", "carol@corp.example",
                  "--platform", "ios", "--apps", "com.microsoft.Office.Outlook",
                  "--out", "carol.jws"]):
        r = _cli(*args, cwd=root)
        assert r.returncode == 0, r.stderr
    req = urllib.request.Request(f"https://127.0.0.1:{port}/v1/attestations", method="POST",
                                 data=(root / "carol.jws").read_bytes(),
                                 headers={"Content-Type": "application/jose"})
    ctx = ssl.create_default_context(cafile=str(root / "certs/ca.pem"))
    with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
        assert r.status == 201


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILWARD, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**os.environ, "MAILWARD_CONFIG": ""})


def test_serve_upgrades_the_previous_release_state_and_backup_copies_it_online(
        tmp_path: Path) -> None:
    """The server starts on the old state (posture schema 1 -> 2, postures kept),
    names its version in /healthz, /metrics and its checkpoints; a backup taken while
    it runs verifies and its database opens; after SIGTERM the whole log (old records,
    old-format checkpoints, new ones under a new key) verifies."""
    root, api = _deployment(tmp_path)
    old_key, new_key = FIXTURE / "audit-signing.pub", root / "certs/audit-signing.pub"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([MAILWARD, "serve"], cwd=root, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, root, api, log)
        status, body = _get(root, api, "/healthz")
        assert status == 200 and json.loads(body)["version"] == proxy.__version__
        metrics = _get(root, api, "/metrics")[1].decode()
        assert f'mailward_build_info{{version="{proxy.__version__}"}} 1.0' in metrics
        _post_report(root, api)  # the server appends to the old log

        backup = tmp_path / "backup"
        r = _cli("backup", str(backup), cwd=root)
        assert r.returncode == 0, r.stderr
        assert {"posture.db", "audit.jsonl", "audit.jsonl.head"} <= {
            p.name for p in backup.iterdir()}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()

    db = sqlite3.connect(root / "state/posture.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    postures = read_postures(root / "state/posture.db", "bob-phone")
    assert [p.device_id for p in postures] == ["bob-phone"]
    assert any(a.id == "com.zhiliaoapp.musically" for a in postures[0].apps)

    r = _cli("audit", "verify", "--log", "state/audit.jsonl", "--key", str(old_key),
             "--key", str(new_key), cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    checkpoints = [json.loads(line) for line in (root / "state/audit.jsonl").read_text()
                   .splitlines() if '"event":"checkpoint"' in line]
    assert "version" not in checkpoints[0] and checkpoints[-1]["version"] == proxy.__version__

    r = _cli("audit", "verify", "--log", str(backup / "audit.jsonl"), "--key", str(old_key),
             "--key", str(new_key), cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"device_id":"carol-phone"' in (backup / "audit.jsonl").read_text()
    copy = sqlite3.connect(f"{(backup / 'posture.db').as_uri()}?mode=ro", uri=True)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("SELECT count(*) FROM posture").fetchone()[0] == 3


def test_backup_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    """backup writes into a new or empty directory only (exit 2, one line)."""
    root, _ = _deployment(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("")
    r = _cli("backup", str(tmp_path / "full"), cwd=root)
    assert r.returncode == 2 and "not empty" in r.stderr and r.stderr.count("\n") == 1


def test_backup_copies_rotated_audit_files_and_policies(tmp_path: Path) -> None:
    """Rotated audit files and state/policies/ are in the copy, and the copied chain
    verifies across the rotation."""
    root, _ = _deployment(tmp_path)
    shutil.rmtree(root / "state")
    (root / "state").mkdir(mode=0o700)
    cfg = root / "config/mailward.toml"
    cfg.write_text(cfg.read_text() + "\n[audit]\nrotate_bytes = 2000\n")
    for _ in range(4):  # each explain appends a record and a checkpoint
        _cli("explain", "--user", "a@corp.example", "--device", "d1", cwd=root)
    assert (root / "state/audit.jsonl.1").exists()
    (root / "state/policies").mkdir()
    (root / "state/policies/abc.toml").write_text("version = 'x'\n")
    r = _cli("backup", str(tmp_path / "b"), cwd=root)
    assert r.returncode == 0, r.stderr
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"audit.jsonl", "audit.jsonl.1", "audit.jsonl.head", "policies"} <= names
    assert (tmp_path / "b/policies/abc.toml").read_text() == "version = 'x'\n"
    r = _cli("audit", "verify", "--log", str(tmp_path / "b/audit.jsonl"), "--key",
             str(root / "certs/audit-signing.pub"), cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
