"""``mailward serve`` with an Intune connector (the fake Graph of tests/mdm_fakes.py):
a TikTok install seen by a sync ends the phone's IMAP IDLE and ActiveSync Ping within
2 s of that sync, uninstalling restores access on the next one, the records name
``mdm:intune``; ``mailward mdm sync`` from the command line."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mdm_fakes import OUTLOOK, TIKTOK, FakeDevice, FakeMdm, FakeMdmThread
from test_server import (
    REACT_S,
    EasPing,
    Served,
    free_port,
    imap_idle,
    listeners_toml,
    mailward,
    read_bye,
    serve,
    wait_ready,
    write_config,
)

from proxy.demo.run import Phone
from proxy.demo.upstream import UpstreamThread
from proxy.pki import certs_init, enroll_device

pytestmark = pytest.mark.peer  # mailward serve as a subprocess

ERIN = Phone("erin-phone", "erin@corp.example", "erin-pw", "android", ())
POLICY = """\
version = "mdm-1"
mode = "enforce"
platforms = ["android", "ios", "ipados"]
max_posture_age = "24h"

[[prohibited]]
name = "TikTok"
ids = ["com.zhiliaoapp.musically"]
names = ["TikTok*"]
reason = "TikTok reads the clipboard."
remediation = "Uninstall TikTok to restore company mail."
"""


def mdm_toml(base: str, interval: str = "1s") -> str:
    return f"""
[[mdm]]
name = "intune"
kind = "intune"
tenant = "corp.example"
client_id = "mailward"
secret_file = "certs/intune.secret"
base_url = "{base}/v1.0"
token_url = "{base}/corp.example/oauth2/v2.0/token"
interval = "{interval}"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, FakeMdmThread]]:
    root = tmp_path_factory.mktemp("mdm-deploy")
    certs_init(root / "certs")
    (root / "certs/intune.secret").write_text("s3cret\n")
    enroll_device(device_ca_cert=root / "certs/device-ca.pem",
                  device_ca_key=root / "certs/offline/device-ca.key", device_id=ERIN.device_id,
                  user=ERIN.user, out_dir=root / "certs/devices" / ERIN.device_id)
    (root / "config").mkdir()
    (root / "config/policy.toml").write_text(POLICY)
    fake = FakeMdmThread(FakeMdm())
    fake.start().add(FakeDevice(id="0f0e-erin", user=ERIN.user, eas_id=ERIN.device_id,
                                serial="ERINSERIAL", apps=[OUTLOOK]))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(root / "certs/server.pem", root / "certs/server.key")
    upstream = UpstreamThread(users={ERIN.user: ERIN.password}, ssl_context=ctx,
                              imap_tls="implicit", smtp_tls="starttls", ping_hold_s=60.0)
    up = upstream.start()
    ports = {n: free_port() for n in ("api", "imaps", "imap-starttls", "activesync")}
    body = listeners_toml(ports, up, ["imap", "activesync"]) + mdm_toml(fake.fake.base)
    cfg = write_config(root, "config", body, api_port=ports["api"])
    s = Served(root, cfg, root / "serve.log", serve(cfg, root / "serve.log"), ports)
    try:
        wait_ready(s)
        wait_for(lambda: s.audit(event="mdm_sync"), "the first sync")
        yield s, fake
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)
        upstream.stop()
        fake.stop()


def wait_for(check: Any, what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def set_apps(fake: FakeMdmThread, apps: list[tuple[str, str, str]]) -> float:
    """Change the phone's apps in the fake MDM; returns when that happened."""
    def change() -> None:
        d = fake.fake.devices["0f0e-erin"]
        d.apps = list(apps)
        d.touch()
    fake.call(change)
    return time.monotonic()


def sync_seen(fake: FakeMdmThread, after: float) -> float:
    """The time the connector read the phone's apps after ``after``."""
    return float(wait_for(lambda: (t := fake.fake.apps_served.get("0f0e-erin", 0.0)) > after
                          and t, "a sync that reads the change"))


def test_tiktok_install_ends_idle_and_ping_within_2s(world: tuple[Served, FakeMdmThread]) -> None:
    """The sync that sees TikTok ends the IMAP IDLE and the ActiveSync Ping of that
    phone within 2 s; the records name mdm:intune."""
    s, fake = world
    imap = imap_idle(s, ERIN)
    ping = EasPing(s, ERIN)
    ping.start()
    time.sleep(0.5)
    assert ping.status is None
    seen = sync_seen(fake, set_apps(fake, [OUTLOOK, TIKTOK]))
    assert b"TikTok" in read_bye(imap, REACT_S + 1)
    bye_at = time.monotonic()
    imap.shutdown()
    ping.join(REACT_S + 1)
    assert ping.status == 403 and ping.ended is not None
    assert bye_at - seen < REACT_S and ping.ended - seen < REACT_S
    logins = [r for r in s.audit(event="decision") if r["device_id"] == ERIN.device_id]
    assert logins and {r["posture_source"] for r in logins} == {"mdm:intune"}
    attested = s.audit(event="attestation")[-1]
    assert attested["authority"] == "mdm:intune" and attested["compliant"] is False
    ended = [r for r in s.audit(event="session_end")
             if r["device_id"] == ERIN.device_id and r["reason"] == "posture_changed"]
    assert len(ended) == 2


def test_uninstall_restores_access_on_next_sync(world: tuple[Served, FakeMdmThread]) -> None:
    """Once the next sync sees TikTok gone, the phone logs in again."""
    s, fake = world
    sync_seen(fake, set_apps(fake, [OUTLOOK]))
    time.sleep(0.3)  # the pass commits after reading
    imap = wait_for(lambda: _try_login(s), "a login after the uninstall")
    imap.shutdown()
    allowed = [r for r in s.audit(event="decision") if r["device_id"] == ERIN.device_id][-1]
    assert allowed["decision"] == "allow" and allowed["posture_source"] == "mdm:intune"


def _try_login(s: Served) -> Any:
    try:
        return imap_idle(s, ERIN)
    except Exception:
        return None


def test_readyz_names_a_failing_connector(world: tuple[Served, FakeMdmThread]) -> None:
    """An unreachable MDM keeps readiness but is named in /readyz's degraded list."""
    s, fake = world
    fake.call(fake.fake.fail, *[500] * 40)
    body = wait_for(lambda: (b := json.loads(s.api("GET", "/readyz")[1]))["degraded"] and b,
                    "a degraded readyz")
    assert body["ready"] is True
    assert body["degraded"][0].startswith("mdm:intune failing (http); last success 2")
    fake.call(fake.fake.failures.clear)


def test_cli_mdm_sync(world: tuple[Served, FakeMdmThread]) -> None:
    """mailward mdm sync: a summary and exit 0; an unknown --name is exit 2; a failing
    MDM is exit 1; --dry-run writes no record."""
    s, fake = world
    env = str(s.config)
    ok = mailward("mdm", "sync", "--config", env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("intune: full: 1 devices seen, 0 changed")
    assert mailward("mdm", "sync", "--config", env, "--name", "nope").returncode == 2
    records = len(s.audit(event="mdm_sync"))
    dry = mailward("mdm", "sync", "--config", env, "--dry-run")
    assert dry.returncode == 0 and "(dry run)" in dry.stdout
    fake.call(fake.fake.fail, *[500] * 400)
    failed = mailward("mdm", "sync", "--config", env)
    fake.call(fake.fake.failures.clear)
    assert failed.returncode == 1 and "HTTP 500" in failed.stdout
    assert len(s.audit(event="mdm_sync")) >= records
    assert Path(s.root / "state/posture.db").exists()
