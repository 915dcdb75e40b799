"""The motivating case against a running ``mailward serve`` (no mail clients: the
server's own gate answers through ``POST /v1/explain``): a TikTok ban is saved, the
preview shows who it cuts off, the policy guard holds it back until the file carries
its confirm line, then decisions deny; ``mailward policy rollback`` (another process)
puts the previous version back within 2 s and the same device is allowed again;
history and the audit log tell the story with both versions and their actors."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import (
    POLICY,
    REACT_S,
    TIKTOK,
    Served,
    attest,
    free_port,
    serve,
    wait_ready,
    write_config,
    write_policy,
)

from proxy.demo.run import Phone
from proxy.pki import certs_init, enroll_device

pytestmark = pytest.mark.peer  # mailward serve as a subprocess, like test_server

OUTLOOK = "com.microsoft.office.outlook"
ALICE = Phone("alice-phone", "alice@corp.example", "pw", "android", (OUTLOOK, TIKTOK))
BOB = Phone("bob-phone", "bob@corp.example", "pw", "ios", (OUTLOOK, TIKTOK))
CAROL = Phone("carol-phone", "carol@corp.example", "pw", "android", (OUTLOOK,))
DAVE = Phone("dave-tablet", "dave@corp.example", "pw", "ipados", (OUTLOOK,))
PHONES = (ALICE, BOB, CAROL, DAVE)
#: The policy before the ban: it bans something nobody has.
BEFORE = POLICY.replace('"{tiktok}"', '"com.example.nothing"').replace(
    'name = "TikTok"', 'name = "Nothing"').format(version="before", extra="")
BAN = POLICY.format(version="tiktok-ban", tiktok=TIKTOK, extra="")


def cli(s: Served, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("mailward")), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MAILWARD_CONFIG": str(s.config)})


def enrolled_root(root: Path) -> Path:
    """``root`` with a trial PKI (``certs init``), the four phones enrolled and an
    empty ``config/``."""
    certs_init(root / "certs")
    for p in PHONES:
        enroll_device(device_ca_cert=root / "certs/device-ca.pem",
                      device_ca_key=root / "certs/offline/device-ca.key",
                      device_id=p.device_id, user=p.user,
                      out_dir=root / "certs/devices" / p.device_id)
    (root / "config").mkdir()
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = enrolled_root(tmp_path_factory.mktemp("polops"))
    (root / "config/policy.toml").write_text(BEFORE)
    ports = {"api": free_port()}
    cfg = write_config(root, "config", "", api_port=ports["api"])
    s = Served(root, cfg, root / "serve.log", serve(cfg, root / "serve.log"), ports)
    try:
        wait_ready(s)
        for p in PHONES:
            attest(s, p, p.apps)
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def decide(s: Served, phone: Phone) -> str:
    token = (s.root / "certs/admin.token").read_text().strip()
    body = json.dumps({"user": phone.user, "device_id": phone.device_id,
                       "protocol": "imap"}).encode()
    status, answer = s.api("POST", "/v1/explain", body, {
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert status == 200, answer
    return str(json.loads(answer)["decision"])


def wait_for(what: str, check: object, timeout_s: float = REACT_S) -> float:
    """Seconds until ``check()`` holds (fails after ``timeout_s``)."""
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - started < timeout_s, what
        time.sleep(0.05)
    return time.monotonic() - started


def test_tiktok_ban_preview_guard_apply_and_one_step_rollback(served: Served) -> None:
    """Preview -> guard -> confirm -> deny -> rollback -> allow within 2 s -> history
    and audit records name both versions with how and actor."""
    s = served
    assert decide(s, ALICE) == decide(s, BOB) == "allow"
    policy_file = s.root / "config/policy.toml"
    write_policy(policy_file, BAN)  # saved: the guard holds it back (2 of 4 > 10%)
    wait_for("guard refusal logged", lambda: "policy guard" in s.log_text(), 5)
    assert decide(s, ALICE) == "allow"
    _, ready = s.api("GET", "/readyz")
    assert any(d.startswith("policy_guard_refused:tiktok-ban:")
               for d in json.loads(ready)["degraded"])
    _, metrics = s.api("GET", "/metrics")
    assert re.search(rb"^mailward_policy_reload_failures_total [1-9]", metrics, re.M)

    preview = cli(s, "policy", "preview", "--replay", "7d")
    assert preview.returncode == 3, preview.stderr
    assert "2 newly denied" in preview.stdout and "TikTok 2" in preview.stdout
    assert ALICE.device_id in preview.stdout and BOB.device_id in preview.stdout
    assert CAROL.device_id not in preview.stdout
    confirm = next(ln for ln in preview.stdout.splitlines() if ln.startswith("confirm = "))

    write_policy(policy_file, confirm + "\n" + BAN)  # confirmed: applied
    wait_for("the confirmed ban applies", lambda: decide(s, ALICE) == "deny", 5)
    assert decide(s, BOB) == "deny" and decide(s, CAROL) == "allow"
    assert '"degraded":[]' in s.api("GET", "/readyz")[1].decode().replace(" ", "")

    rollback = cli(s, "policy", "rollback")
    moved = time.monotonic()
    assert rollback.returncode == 0, rollback.stderr
    wait_for("rollback applied within 2 s", lambda: decide(s, ALICE) == "allow")
    assert time.monotonic() - moved < REACT_S
    assert decide(s, BOB) == "allow"

    history = cli(s, "policy", "history").stdout.splitlines()
    rows = [ln.split() for ln in history[1:]]
    assert [(r[0], r[3]) for r in rows] == [("before", "start"), ("tiktok-ban", "file"),
                                             ("before", "rollback")]
    assert rows[-1][4] == getpass.getuser() and rows[-1][-1] == "*"
    (rec,) = s.audit(event="policy_rollback")
    assert (rec["from_version"], rec["to_version"], rec["actor"]) == (
        "tiktok-ban", "before", getpass.getuser())
    reloads = s.audit(event="policy_reload")
    assert [r["result"] for r in reloads] == ["refused", "applied"]
    assert all(r["actor"] for r in reloads)
    assert [r["devices"]["newly_denied"] for r in s.audit(event="policy_preview")] == [2]


def test_preview_endpoint_answers_tools(served: Served) -> None:
    """POST /v1/policy/preview (admin) previews the file on disk, or a policy in the
    body, against the policy in force, as JSON, and records it."""
    s = served
    token = (s.root / "certs/admin.token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, _ = s.api("POST", "/v1/policy/preview", b"{}",
                      {"Content-Type": "application/json"})
    assert status == 401
    status, body = s.api("POST", "/v1/policy/preview", b"{}", auth)
    assert status == 200, body
    doc = json.loads(body)
    assert doc["newly_denied"] is True and doc["devices"]["newly_denied"] == 2
    assert doc["in_force"]["version"] == "before" and doc["guard"]["confirmed"] is True
    status, body = s.api("POST", "/v1/policy/preview",
                         json.dumps({"policy": BEFORE, "replay": "7d"}).encode(), auth)
    assert status == 200, body
    assert json.loads(body)["newly_denied"] is False
    status, body = s.api("POST", "/v1/policy/preview",
                         json.dumps({"policy": 'mode = "sometimes"'}).encode(), auth)
    assert status == 422 and json.loads(body)["error"] == "invalid_policy"
    assert [r["actor"] for r in s.audit(event="policy_preview")][-2:] == ["admin", "admin"]
