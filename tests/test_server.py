"""``mailward serve`` end to end: one process, every listener, real clients at once.

The server runs as a subprocess (the same start command as the Docker image) in front
of the embedded upstream (:mod:`proxy.demo.upstream`). Three phones: Alice's becomes
non-compliant when the policy bans Telegram, Carol's stays compliant, Bob's has TikTok
and is refused throughout. The module's tests form one scenario, in order: health,
all protocols at once plus a valid reload, an invalid reload, SIGTERM. Start-up
errors each get a fresh process.
"""

from __future__ import annotations

import base64
import getpass
import imaplib
import importlib.util
import json
import os
import re
import shlex
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.serve import free_port, mailward, serve, wait_serving
from helpers.tls import Pki, enrolled_pki

from proxy.audit import query
from proxy.demo.run import Phone
from proxy.demo.upstream import UpstreamThread
from proxy.pki import (
    load_certs,
    load_private_key,
    make_claims,
    sign_report,
)

ROOT = Path(__file__).resolve().parent.parent
OUTLOOK, TELEGRAM, TIKTOK = (
    "com.microsoft.office.outlook", "org.telegram.messenger", "com.zhiliaoapp.musically")
REACT_S = 2.0  # the design's bound for ending sessions after a change
FRONTENDS = [p for p in ("imap", "smtp", "activesync")
             if importlib.util.find_spec(f"proxy.frontends.{p}") is not None]
# test_every_front_end_is_in_the_build fails if one is missing; the others assume all.

POLICY = """\
version = "{version}"
mode = "enforce"
platforms = ["android", "ios", "ipados"]
max_posture_age = "24h"

[[prohibited]]
name = "TikTok"
ids = ["{tiktok}"]
reason = "TikTok reads the clipboard."
remediation = "Uninstall TikTok to restore company mail."
{extra}"""
TELEGRAM_RULE = f"""
[[prohibited]]
name = "Telegram"
ids = ["{TELEGRAM}"]
reason = "Telegram backs up chats outside the company."
remediation = "Uninstall Telegram to restore company mail."
"""


ALICE = Phone("alice-phone", "alice@corp.example", "alice-pw", "android", (OUTLOOK, TELEGRAM))
CAROL = Phone("carol-phone", "carol@corp.example", "carol-pw", "ios", (OUTLOOK,))
BOB = Phone("bob-phone", "bob@corp.example", "bob-pw", "android", (OUTLOOK, TIKTOK))
DAVE = Phone("dave-tablet", "dave@corp.example", "dave-pw", "ipados", (OUTLOOK,))
PHONES = (ALICE, CAROL, BOB, DAVE)


def policy_text(version: str, extra: str = "") -> str:
    return POLICY.format(version=version, tiktok=TIKTOK, extra=extra)


def write_policy(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic, like editors and config management


def listeners_toml(ports: dict[str, int], up: Any, protocols: list[str]) -> str:
    blocks = {
        "imap": [("imaps", "implicit", "imap", "implicit"),
                 ("imap-starttls", "starttls", "imap", "implicit")],
        "smtp": [("submission", "starttls", "smtp", "starttls"),
                 ("submissions", "implicit", "smtp", "starttls")],
    }
    out = []
    for proto in protocols:
        if proto == "activesync":
            out.append(f"""
[[listeners]]
name = "activesync"
protocol = "activesync"
listen = "127.0.0.1:{ports['activesync']}"
upstream = "{up.eas_url}"
upstream_ca = "certs/ca.pem"
""")
            continue
        for name, tls, key, up_tls in blocks[proto]:
            out.append(f"""
[[listeners]]
name = "{name}"
protocol = "{proto}"
listen = "127.0.0.1:{ports[name]}"
tls = "{tls}"
client_cert = "optional"
unidentified = "deny"
upstream = "127.0.0.1:{up.ports[key]}"
upstream_tls = "{up_tls}"
upstream_ca = "certs/ca.pem"
""")
    return "".join(out)


def write_config(root: Path, name: str, body: str, *, api_port: int) -> Path:
    cfg = root / name / "mailward.toml"
    cfg.parent.mkdir(exist_ok=True)
    if not (cfg.parent / "policy.toml").exists():
        (cfg.parent / "policy.toml").write_text(policy_text("t-1"))
    cfg.write_text(f"""\
[server]
state_dir = "state"
policy = "{name}/policy.toml"
shutdown_grace = "1s"
recheck_interval = "1s"

[api]
listen = "127.0.0.1:{api_port}"
tls = true
{body}""")
    return cfg


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployment root: certs, three enrolled phones, the policy."""
    root = tmp_path_factory.mktemp("deploy")
    enrolled_pki(root / "certs", [(p.device_id, p.user) for p in PHONES])
    (root / "config").mkdir()
    (root / "config/policy.toml").write_text(policy_text("t-1"))
    return root


@pytest.fixture(scope="module")
def upstream(deploy: Path) -> Iterator[Any]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(deploy / "certs/server.pem", deploy / "certs/server.key")
    thread = UpstreamThread(users={p.user: p.password for p in PHONES}, ssl_context=ctx,
                            imap_tls="implicit", smtp_tls="starttls", ping_hold_s=60.0)
    yield thread.start()
    thread.stop()


@dataclass
class Served:
    root: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    clients: dict[str, Any] = field(default_factory=dict)

    def tls(self, phone: Phone | None = None) -> ssl.SSLContext:
        return Pki(self.root / "certs").client_ctx(phone.device_id if phone else None)

    def api(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"https://127.0.0.1:{self.ports['api']}{path}",
                                     data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=self.tls(), timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        return list(query(self.root / "state/audit.jsonl", **filters))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(s: Served, timeout_s: float = 20.0) -> None:
    wait_serving(s.proc, lambda: s.api("GET", "/readyz")[0] == 200, s.log, timeout_s)


@pytest.fixture(scope="module")
def served(deploy: Path, upstream: Any) -> Iterator[Served]:
    ports = {n: free_port() for n in ("api", "imaps", "imap-starttls", "submission",
                                       "submissions", "activesync")}
    cfg = write_config(deploy, "config", listeners_toml(ports, upstream, FRONTENDS),
                       api_port=ports["api"])
    s = Served(deploy, cfg, deploy / "serve.log", serve(cfg, deploy / "serve.log"), ports)
    try:
        wait_ready(s)
        for p in PHONES:
            attest(s, p, p.apps)
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def attest(s: Served, p: Phone, apps: tuple[str, ...]) -> dict[str, Any]:
    """POST a posture report signed with the phone's device key."""
    d = s.root / "certs/devices" / p.device_id
    claims = make_claims(device_id=p.device_id, user=p.user, platform=p.platform,
                         apps=list(apps))
    token = sign_report(claims, load_private_key(d / "device.key"), load_certs(d / "device.pem"))
    status, body = s.api("POST", "/v1/attestations", token.encode(),
                         {"Content-Type": "application/jose"})
    assert status == 201, body
    result: dict[str, Any] = json.loads(body)
    return result


# ------------------------------------------------------------------ clients


def imap_idle(s: Served, phone: Phone, listener: str = "imaps") -> imaplib.IMAP4:
    """A logged-in IMAP session of ``phone`` sitting in IDLE."""
    if listener == "imaps":
        m: imaplib.IMAP4 = imaplib.IMAP4_SSL("127.0.0.1", s.ports[listener],
                                             ssl_context=s.tls(phone), timeout=10)
    else:
        m = imaplib.IMAP4("127.0.0.1", s.ports[listener], timeout=10)
        m.starttls(ssl_context=s.tls(phone))
    m.login(phone.user, phone.password)
    m.select("INBOX")
    m.send(m._new_tag() + b" IDLE\r\n")
    assert m.readline().startswith(b"+")
    return m


def read_bye(m: imaplib.IMAP4, timeout_s: float) -> bytes:
    """The ``* BYE`` line the proxy sends, or b"" if none comes in time."""
    assert m.sock is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m.sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            line = m.readline()
        except (OSError, imaplib.IMAP4.abort):
            return b""
        if not line:
            return b""
        if line.startswith(b"* BYE"):
            return line
    return b""


def smtp_session(s: Served, phone: Phone, listener: str = "submission") -> smtplib.SMTP:
    """An authenticated submission session that has sent one message."""
    if listener == "submissions":
        c: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", s.ports[listener],
                                           context=s.tls(phone), timeout=10)
    else:
        c = smtplib.SMTP("127.0.0.1", s.ports[listener], timeout=10)
        c.starttls(context=s.tls(phone))
    c.login(phone.user, phone.password)
    c.sendmail(phone.user, [phone.user], f"Subject: from {phone.device_id}\r\n\r\nhi\r\n")
    return c


class EasPing(threading.Thread):
    """An ActiveSync Ping long poll; ``status`` and ``ended`` once it returns."""

    def __init__(self, s: Served, phone: Phone) -> None:
        super().__init__(daemon=True)
        self.s, self.phone = s, phone
        self.status: int | None = None
        self.ended: float | None = None
        self.headers: dict[str, str] = {}

    def run(self) -> None:
        p = self.phone
        auth = base64.b64encode(f"{p.user}:{p.password}".encode()).decode()
        url = (f"https://127.0.0.1:{self.s.ports['activesync']}/Microsoft-Server-ActiveSync"
               f"?Cmd=Ping&User={p.user}&DeviceId={p.device_id}&DeviceType=Phone")
        req = urllib.request.Request(url, data=b"\x03\x01\x6a\x00", method="POST", headers={
            "Authorization": f"Basic {auth}", "MS-ASProtocolVersion": "14.1",
            "Content-Type": "application/vnd.ms-sync.wbxml"})
        try:
            with urllib.request.urlopen(req, context=self.s.tls(), timeout=90) as r:
                self.status = r.status
        except urllib.error.HTTPError as exc:
            self.status, self.headers = exc.code, dict(exc.headers)
        except OSError:
            self.status = -1
        self.ended = time.monotonic()


# ------------------------------------------------------------------ the scenario


def test_every_front_end_is_in_the_build() -> None:
    """serve starts imap, smtp and activesync listeners; all three modules exist."""
    assert FRONTENDS == ["imap", "smtp", "activesync"]


def test_start_command_and_docker_healthcheck(served: Served) -> None:
    """The Dockerfile's HEALTHCHECK command, run as written, passes against serve."""
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^\s*CMD (\[.*\])\s*$", text.split("HEALTHCHECK", 1)[1], re.M)
    assert m, "no HEALTHCHECK CMD in the Dockerfile"
    argv = json.loads(m.group(1))
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    url = f"https://127.0.0.1:{served.ports['api']}/healthz"
    r = subprocess.run(argv, env={**os.environ, "MAILWARD_HEALTH_URL": url},
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, shlex.join(argv) + r.stderr
    status, body = served.api("GET", "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    started = [json.loads(line) for line in served.log_text().splitlines()
               if '"event": "started"' in line]
    want_uvloop = importlib.util.find_spec("uvloop") is not None \
        and os.environ.get("MAILWARD_LOOP") != "asyncio"
    assert started and (started[0]["loop"] == "uvloop") == want_uvloop


def test_valid_reload_ends_exactly_the_sessions_it_should(served: Served) -> None:
    """Alice (Telegram) and Carol are connected on every protocol at once; Bob (TikTok)
    is refused. After the policy bans Telegram, every session of Alice's phone ends
    within 2 s with its protocol's goodbye and Carol's sessions carry on."""
    s, c = served, served.clients
    c["alice_imap"] = imap_idle(s, ALICE)
    c["alice_imap_starttls"] = imap_idle(s, ALICE, "imap-starttls")
    c["carol_imap"] = imap_idle(s, CAROL)
    with pytest.raises(imaplib.IMAP4.error, match="TikTok"):
        imap_idle(s, BOB)
    c["alice_smtp"] = smtp_session(s, ALICE)
    c["carol_smtp"] = smtp_session(s, CAROL, "submissions")
    bob = smtplib.SMTP("127.0.0.1", s.ports["submission"], timeout=10)
    bob.starttls(context=s.tls(BOB))
    bob.login(BOB.user, BOB.password)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        bob.sendmail(BOB.user, [BOB.user], "Subject: x\r\n\r\nx\r\n")
    assert refused.value.smtp_code == 550 and b"TikTok" in refused.value.smtp_error
    bob.close()
    c["alice_eas"], c["carol_eas"] = EasPing(s, ALICE), EasPing(s, CAROL)
    c["alice_eas"].start()
    c["carol_eas"].start()
    bob_eas = EasPing(s, BOB)
    bob_eas.run()
    assert bob_eas.status == 403
    time.sleep(0.5)  # both Pings are now held open by the upstream
    assert c["alice_eas"].status is None and c["carol_eas"].status is None

    write_policy(s.root / "config/policy.toml", policy_text("t-2", TELEGRAM_RULE))
    edited = time.monotonic()
    s.proc.send_signal(signal.SIGHUP)

    for key in ("alice_imap", "alice_imap_starttls"):
        bye = read_bye(c[key], REACT_S + 0.5)
        assert b"Telegram" in bye, (key, bye)
        assert time.monotonic() - edited < REACT_S + 0.5
    sock = c["alice_smtp"].sock
    sock.settimeout(REACT_S + 0.5)
    code, msg = c["alice_smtp"].getreply()
    assert code == 421 and b"4.7.0" in msg and b"Telegram" in msg, (code, msg)
    assert sock.recv(1) == b"", "the proxy keeps the connection open after 421"
    c["alice_eas"].join(REACT_S + 0.5)
    assert c["alice_eas"].status == 403
    assert c["alice_eas"].ended is not None and c["alice_eas"].ended - edited < REACT_S + 0.5
    assert time.monotonic() - edited < REACT_S + 1.5

    # Carol's sessions are untouched.
    m = c["carol_imap"]
    m.send(b"DONE\r\n")
    line = m.readline()
    while line.startswith(b"* "):  # e.g. "* 2 EXISTS" for the message Carol sent
        line = m.readline()
    assert line.split()[1] == b"OK", line
    assert m.noop()[0] == "OK"
    assert c["carol_smtp"].noop()[0] == 250
    assert c["carol_eas"].is_alive() and c["carol_eas"].status is None

    reloads = s.audit(event="policy_reload")
    assert [(r["result"], r["old_version"], r["new_version"]) for r in reloads] == [
        ("applied", "t-1", "t-2")]
    ended = [r for r in s.audit(event="session_end") if r.get("reason") == "policy_changed"]
    expected = {"imap": 2, "smtp": 1, "activesync": 1}
    assert sorted(r["protocol"] for r in ended) == sorted(
        p for p in FRONTENDS for _ in range(expected[p]))
    assert {r["device_id"] for r in ended} == {ALICE.device_id}


def test_invalid_reload_changes_nothing_and_is_reported(served: Served) -> None:
    """A broken policy is refused: logged with file:line, counted, recorded; the old
    policy stays in force and no session is touched."""
    s, c = served, served.clients
    broken = policy_text("t-3", TELEGRAM_RULE).replace('mode = "enforce"', 'mode = "sometimes"')
    write_policy(s.root / "config/policy.toml", broken)
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + REACT_S
    while time.monotonic() < deadline and "policy reload refused" not in s.log_text():
        time.sleep(0.05)
    refusals = [json.loads(line) for line in s.log_text().splitlines()
                if "policy reload refused" in line]
    assert refusals and refusals[-1]["error"].startswith(
        f"{s.root / 'config/policy.toml'}:2: mode:")
    records = [r for r in s.audit(event="policy_reload") if r["result"] == "refused"]
    assert records and "mode" in records[-1]["error"] and records[-1]["old_version"] == "t-2"
    _, metrics = s.api("GET", "/metrics")
    assert re.search(rb"^mailward_policy_reload_failures_total [1-9]", metrics, re.M)
    assert re.search(rb'^mailward_policy_info\{sha256="[0-9a-f]{64}",version="t-2"\} 1', metrics,
                     re.M)
    assert b'version="t-3"' not in metrics
    assert c["carol_imap"].noop()[0] == "OK"
    with pytest.raises(imaplib.IMAP4.error, match="Telegram"):
        imap_idle(s, ALICE)  # the t-2 ban still holds
    assert c["carol_smtp"].noop()[0] == 250
    assert c["carol_eas"].is_alive()


def test_cli_revoke_ends_a_live_idle_session(served: Served) -> None:
    """`mailward device revoke`, a separate process, ends Dave's live IMAP IDLE session
    of the running server within 2 s of its exit (the server polls the store's change
    feed), is recorded with the OS user as actor, refuses Dave's next login
    (`revoked`), shows in `device list --revoked`; `unrevoke` lets Dave back in."""
    s = served
    m = imap_idle(s, DAVE)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return mailward(*args, config=s.config)

    r = cli("device", "revoke", "DAVE-TABLET", "--why", "lost on the train")
    revoked = time.monotonic()
    assert r.returncode == 0, r.stderr
    bye = read_bye(m, REACT_S + 0.5)
    assert b"blocked" in bye, bye
    assert time.monotonic() - revoked < REACT_S
    m.shutdown()
    with pytest.raises(imaplib.IMAP4.error, match="blocked"):
        imap_idle(s, DAVE)
    (rec,) = s.audit(event="device_revoked")
    assert (rec["actor"], rec["device"], rec["why"]) == (
        getpass.getuser(), DAVE.device_id, "lost on the train")
    denied = s.audit(event="decision", device=DAVE.device_id)[-1]
    assert [x["code"] for x in denied["reasons"]] == ["revoked"]
    listed = cli("device", "list", "--revoked", "--format", "json")
    assert [json.loads(line)["device"] for line in listed.stdout.splitlines()] == [
        DAVE.device_id]
    assert cli("device", "unrevoke", DAVE.device_id, "--why", "found").returncode == 0
    deadline = time.monotonic() + REACT_S
    while True:
        try:
            imap_idle(s, DAVE).shutdown()
            break
        except imaplib.IMAP4.error:
            assert time.monotonic() < deadline, "unrevoke did not reach the server"
            time.sleep(0.1)


def test_new_attestation_ends_that_devices_sessions(served: Served) -> None:
    """Continuous access evaluation through the API: Dave's tablet reports TikTok while
    it holds IMAP, SMTP and ActiveSync sessions; all of them end within 2 s, Carol's
    do not."""
    s, c = served, served.clients
    live: dict[str, Any] = {}
    live["imap"] = imap_idle(s, DAVE)
    live["smtp"] = smtp_session(s, DAVE)
    live["eas"] = EasPing(s, DAVE)
    live["eas"].start()
    time.sleep(0.5)
    assert live["eas"].status is None
    sent = time.monotonic()
    assert attest(s, DAVE, (OUTLOOK, TIKTOK))["compliant"] is False
    assert b"TikTok" in read_bye(live["imap"], REACT_S)
    live["imap"].shutdown()
    live["smtp"].sock.settimeout(REACT_S)
    assert live["smtp"].getreply()[0] == 421
    live["smtp"].close()
    live["eas"].join(REACT_S)
    assert live["eas"].status == 403
    assert time.monotonic() - sent < REACT_S + 0.5
    ended = [r for r in s.audit(event="session_end") if r.get("reason") == "posture_changed"]
    assert {r["device_id"] for r in ended} == {DAVE.device_id}
    assert len(ended) == len(live)
    assert c["carol_imap"].noop()[0] == "OK"
    assert c["carol_smtp"].noop()[0] == 250


def test_sigterm_shuts_down_cleanly_and_the_audit_log_verifies(served: Served) -> None:
    """SIGTERM: sessions get the grace period and a goodbye, exit 0, and the audit log
    (sealed by a final checkpoint) verifies."""
    s, c = served, served.clients
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(15) == 0, s.log_text()
    assert read_bye(c["carol_imap"], 1).startswith(b"* BYE")
    for client in c.values():
        if isinstance(client, imaplib.IMAP4):
            client.shutdown()
        elif isinstance(client, smtplib.SMTP):
            client.close()
    r = mailward("audit", "verify", "--config", str(s.config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert ", 0 after the last checkpoint" in r.stdout
    records = s.audit(event="checkpoint")
    assert records, "no final checkpoint"
    late = [json.loads(line)["listener"] for line in s.log_text().splitlines()
            if "still closing after the grace period" in line]
    assert late == [], f"listeners {late} did not close within shutdown_grace + 5 s"


# ------------------------------------------------------------------ start-up errors


def _start_and_fail(config: Path, log: Path) -> list[str]:
    proc = serve(config, log)
    assert proc.wait(20) == 2
    return log.read_text().strip().splitlines()


def test_port_in_use_is_one_line_and_exit_2(deploy: Path, upstream: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"imaps": port, "imap-starttls": free_port()}
        cfg = write_config(deploy, "config-busy", listeners_toml(ports, upstream, ["imap"]),
                           api_port=free_port())
        lines = _start_and_fail(cfg, deploy / "busy.log")
    assert lines == [f"mailward: listeners.imaps: cannot listen on 127.0.0.1:{port}: "
                     "address already in use"]


def test_missing_certificate_is_one_line_and_exit_2(deploy: Path, upstream: Any) -> None:
    body = listeners_toml({"imaps": free_port(), "imap-starttls": free_port()}, upstream,
                          ["imap"])
    cfg = write_config(deploy, "config-nocert",
                       '\n[tls]\ncert = "certs/missing.pem"\n' + body, api_port=free_port())
    lines = _start_and_fail(cfg, deploy / "nocert.log")
    assert len(lines) == 1
    assert lines[0].startswith("mailward: tls.cert: file not found: ")
    assert lines[0].endswith("certs/missing.pem (mailward certs init creates it)")


def test_bad_config_is_one_line_with_file_and_line(deploy: Path) -> None:
    cfg = write_config(deploy, "config-bad", """
[[listeners]]
name = "news"
protocol = "nntp"
listen = "127.0.0.1:1119"
upstream = "127.0.0.1:119"
""", api_port=free_port())
    lines = _start_and_fail(cfg, deploy / "bad.log")
    assert len(lines) == 1
    assert lines[0].startswith(f"mailward: {cfg}:")
    assert re.search(r"mailward\.toml:\d+: listeners\[0\]\.protocol: must be one of", lines[0])


def test_unreadable_key_is_one_line_and_exit_2(deploy: Path, upstream: Any) -> None:
    bad_key = deploy / "certs/garbage.key"
    bad_key.write_text("not a key\n")
    body = listeners_toml({"imaps": free_port(), "imap-starttls": free_port()}, upstream,
                          ["imap"])
    cfg = write_config(deploy, "config-badkey",
                       '\n[tls]\nkey = "certs/garbage.key"\n' + body, api_port=free_port())
    lines = _start_and_fail(cfg, deploy / "badkey.log")
    assert len(lines) == 1 and lines[0].startswith("mailward: tls.cert/tls.key: cannot load")


def test_posture_ageing_ends_sessions(deploy: Path, upstream: Any) -> None:
    """Posture that ages past max_posture_age mid-session is a deny like any other:
    the periodic sweep (recheck_interval = 1s) ends the session."""
    ports = {"api": free_port(), "imaps": free_port(), "imap-starttls": free_port()}
    (deploy / "config-age").mkdir(exist_ok=True)
    (deploy / "config-age/policy.toml").write_text(
        policy_text("age-1").replace('max_posture_age = "24h"', 'max_posture_age = "3s"'))
    body = listeners_toml(ports, upstream, ["imap"])
    cfg = write_config(deploy, "config-age", body, api_port=ports["api"])
    cfg.write_text(cfg.read_text().replace('state_dir = "state"', 'state_dir = "state-age"')
                   + '\n[posture]\nstore = "sqlite:///state-age/posture.db"\n'
                   + '\n[audit]\npath = "state-age/audit.jsonl"\n')
    s = Served(deploy, cfg, deploy / "age.log", serve(cfg, deploy / "age.log"), ports)
    try:
        wait_ready(s)
        d = deploy / "certs/devices" / CAROL.device_id
        claims = make_claims(device_id=CAROL.device_id, user=CAROL.user,
                             platform=CAROL.platform, apps=list(CAROL.apps), ttl_s=3)
        token = sign_report(claims, load_private_key(d / "device.key"),
                            load_certs(d / "device.pem"))
        status, _ = s.api("POST", "/v1/attestations", token.encode(),
                          {"Content-Type": "application/jose"})
        assert status == 201
        m = imap_idle(s, CAROL)
        bye = read_bye(m, 3 + 1 + REACT_S)
        m.shutdown()
        assert bye.startswith(b"* BYE"), bye
        ended = list(query(deploy / "state-age/audit.jsonl", event="session_end"))
        assert [(r["reason"], r["detail"]) for r in ended] == [("posture_aged", "stale_posture")]
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(15) == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)
