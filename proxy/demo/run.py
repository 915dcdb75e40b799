"""``mailward demo``: the whole story in under a minute, on a throw-away directory.

1. ``certs init`` in a temporary deployment root, a config with every listener on a
   free loopback port, and a policy that bans TikTok on phones;
2. an embedded upstream mail server (:mod:`proxy.demo.upstream`, in a thread);
3. ``mailward serve`` as a child process (the same interpreter), exactly as ops run it;
4. two phones enrolled (device certificates) and their signed posture reports POSTed
   to ``/v1/attestations``: Alice's is compliant, Bob's has TikTok;
5. both phones use stdlib ``imaplib`` and ``smtplib`` over TLS with their device
   certificates: Alice reads and sends mail, Bob is refused with the reason;
6. while Alice's phone is in IMAP IDLE, the policy file is edited to ban an app she
   has; the hot reload ends her session with ``* BYE`` and the reason;
7. the decisions, read back from the audit log, and ``mailward audit verify``.

The child is killed in ``finally`` whatever happens, and the directory is removed
(``MAILWARD_DEMO_KEEP=1`` keeps it for a look around).
"""

from __future__ import annotations

import contextlib
import imaplib
import importlib.util
import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 20.0
CLIENT_TIMEOUT_S = 10.0
BYE_TIMEOUT_S = 5.0  # the design promises 2 s; the demo allows some slack
TIKTOK = "com.zhiliaoapp.musically"
TELEGRAM = "org.telegram.messenger"
OUTLOOK = "com.microsoft.office.outlook"
APP_NAMES = {TIKTOK: "TikTok", TELEGRAM: "Telegram", OUTLOOK: "Outlook"}

POLICY = """\
# Demo policy: TikTok is banned on phones and tablets.
version = "{version}"
mode = "enforce"
platforms = ["android", "ios", "ipados"]
max_posture_age = "24h"
unknown_device = "deny"
stale_posture = "deny"

[[prohibited]]
name = "TikTok"
ids = ["{tiktok}", "com.ss.android.ugc.trill"]
reason = "TikTok was found reading the clipboard, which exposes company mail content."
remediation = "Uninstall TikTok from this device to restore company mail."
"""

TELEGRAM_RULE = f"""
[[prohibited]]
name = "Telegram"
ids = ["{TELEGRAM}"]
reason = "Telegram backs up chats to servers outside the company's control."
remediation = "Uninstall Telegram from this device to restore company mail."
"""


CONFIG = """\
# Written by `mailward demo`; every path is relative to {root}.
[server]
state_dir = "state"
policy = "config/policy.toml"
shutdown_grace = "2s"
recheck_interval = "5s"

[audit]
path = "state/audit.jsonl"
checkpoint_every = 1000
checkpoint_interval = "60s"

[api]
listen = "127.0.0.1:{api}"
tls = true
"""

#: One ``[[listeners]]`` table per front end, in front of the embedded upstream.
LISTENERS = {
    "imap": """
[[listeners]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:{ports[imaps]}"
tls = "implicit"
client_cert = "optional"
unidentified = "deny"
upstream = "127.0.0.1:{up_ports[imap]}"
upstream_tls = "implicit"
upstream_ca = "certs/ca.pem"
""",
    "smtp": """
[[listeners]]
name = "submission"
protocol = "smtp"
listen = "127.0.0.1:{ports[submission]}"
tls = "starttls"
client_cert = "optional"
unidentified = "deny"
upstream = "127.0.0.1:{up_ports[smtp]}"
upstream_tls = "starttls"
upstream_ca = "certs/ca.pem"
""",
    "activesync": """
[[listeners]]
name = "activesync"
protocol = "activesync"
listen = "127.0.0.1:{ports[activesync]}"
tls = "implicit"
client_cert = "optional"
upstream = "{eas_url}"
upstream_tls = "implicit"
upstream_ca = "certs/ca.pem"
""",
}


class DemoError(Exception):
    """A step of the demo did not go as it should."""


@dataclass(frozen=True)
class Phone:
    device_id: str
    user: str
    password: str
    platform: str
    apps: tuple[str, ...]


ALICE = Phone("alice-pixel", "alice@corp.example", "alice-pw", "android", (OUTLOOK, TELEGRAM))
BOB = Phone("bob-iphone", "bob@corp.example", "bob-pw", "ios", (OUTLOOK, TIKTOK))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str = "") -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"
        self.config = root / "config" / "mailward.toml"
        self.policy = root / "config" / "policy.toml"
        self.server_log = root / "state" / "mailward.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.upstream_thread: Any = None
        self.ports: dict[str, int] = {}
        self.protocols: list[str] = []

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        from proxy.pki import certs_init

        certs_init(self.certs)
        say(f"1. certs init in {self.certs}: local CA, server certificate, device CA, "
            "MDM attester, audit signing key")

        from proxy.demo.upstream import UpstreamThread

        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(self.certs / "server.pem", self.certs / "server.key")
        self.upstream_thread = UpstreamThread(
            users={p.user: p.password for p in (ALICE, BOB)}, ssl_context=sctx,
            imap_tls="implicit", smtp_tls="starttls", eas_tls=True, ping_hold_s=5.0,
        )
        up = self.upstream_thread.start()
        self.upstream = up
        say(f"2. embedded upstream mail server: IMAP 127.0.0.1:{up.ports['imap']} (TLS), "
            f"SMTP 127.0.0.1:{up.ports['smtp']} (STARTTLS), ActiveSync {up.eas_url}")

        (self.root / "config").mkdir()
        (self.root / "state").mkdir()
        self.policy.write_text(POLICY.format(version="demo-1", tiktok=TIKTOK))

    def write_config(self) -> None:
        up = self.upstream
        self.ports = {"api": _free_port(), "imaps": _free_port(), "submission": _free_port(),
                      "activesync": _free_port()}
        # Only listeners whose front end is part of this build.
        self.protocols = [p for p in ("imap", "smtp", "activesync")
                          if importlib.util.find_spec(f"proxy.frontends.{p}") is not None]
        listeners = "".join(
            LISTENERS[p].format(ports=self.ports, up_ports=up.ports, eas_url=up.eas_url)
            for p in self.protocols)
        self.config.write_text(CONFIG.format(root=self.root, api=self.ports["api"]) + listeners)

    def start_server(self) -> None:
        for attempt in range(3):  # a free port can be taken between probe and bind
            self.write_config()
            started = time.monotonic()
            log = open(self.server_log, "ab")  # noqa: SIM115 - the child owns it
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env={**os.environ, "MAILWARD_LOG_FORMAT": "json"},
                )
            finally:
                log.close()
            if self._wait_ready():
                break
            if attempt == 2 or "already in use" not in self.server_log.read_text():
                raise DemoError("mailward serve did not become ready; see " +
                                str(self.server_log))
        assert self.proc is not None
        names = {"imap": "imaps", "smtp": "submission", "activesync": "activesync"}
        bound = ", ".join(f"{names[p]} :{self.ports[names[p]]}" for p in self.protocols)
        say(f"3. mailward serve (pid {self.proc.pid}) is ready in "
            f"{time.monotonic() - started:.1f} s: {bound}, API :{self.ports['api']}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                status, _ = self.api("GET", "/readyz")
                if status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    # ------------------------------------------------------------------ helpers

    def tls(self, phone: Phone | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        if phone is not None:
            d = self.certs / "devices" / phone.device_id
            ctx.load_cert_chain(d / "device.pem", d / "device.key")
        return ctx

    def api(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            f"https://127.0.0.1:{self.ports['api']}{path}", data=body, method=method,
            headers=headers or {},
        )
        try:
            with urllib.request.urlopen(req, context=self.tls(), timeout=5) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    # ------------------------------------------------------------------ the story

    def enrol_and_attest(self) -> None:
        from proxy.pki import (
            enroll_device,
            load_certs,
            load_private_key,
            make_claims,
            sign_report,
        )

        say("4. two phones enrolled, their signed posture reports POSTed to /v1/attestations:")
        for phone in (ALICE, BOB):
            out = self.certs / "devices" / phone.device_id
            key_path, cert_path = enroll_device(
                device_ca_cert=self.certs / "device-ca.pem",
                device_ca_key=self.certs / "offline" / "device-ca.key",
                device_id=phone.device_id, user=phone.user, out_dir=out,
            )
            claims = make_claims(device_id=phone.device_id, user=phone.user,
                                 platform=phone.platform, apps=list(phone.apps),
                                 managed=True)
            token = sign_report(claims, load_private_key(key_path), load_certs(cert_path))
            status, doc = self.api("POST", "/v1/attestations", token.encode(),
                                   {"Content-Type": "application/jose"})
            if status != 201:
                raise DemoError(f"attestation of {phone.device_id} refused: {status} {doc}")
            verdict = "compliant" if doc["compliant"] else "NOT compliant (" + ", ".join(
                str(v.get("app_name") or v.get("code")) for v in doc["violations"]) + ")"
            apps = ", ".join(APP_NAMES.get(a, a) for a in phone.apps)
            say(f"   {phone.device_id:<12} {phone.user:<19} {phone.platform:<8} "
                f"apps: {apps:<24} -> {verdict}")

    def imap_login(self, phone: Phone) -> imaplib.IMAP4_SSL:
        m = imaplib.IMAP4_SSL("127.0.0.1", self.ports["imaps"], ssl_context=self.tls(phone),
                              timeout=CLIENT_TIMEOUT_S)
        m.login(phone.user, phone.password)
        return m

    def drive_clients(self) -> None:
        say("5. real mail clients (stdlib imaplib / smtplib, TLS with the device certificate):")
        if "imap" in self.protocols:
            m = self.imap_login(ALICE)
            _, data = m.select("INBOX")
            count = (data[0] or b"?").decode()
            say(f"   {ALICE.device_id:<12} IMAP  login OK, INBOX has {count} "
                "message(s)")
            m.logout()
            try:
                self.imap_login(BOB)
                raise DemoError("Bob's phone with TikTok was let in over IMAP")
            except imaplib.IMAP4.error as exc:
                say(f"   {BOB.device_id:<12} IMAP  refused: {_imap_text(exc)}")
        if "smtp" in self.protocols:
            with smtplib.SMTP("127.0.0.1", self.ports["submission"],
                              timeout=CLIENT_TIMEOUT_S) as s:
                s.starttls(context=self.tls(ALICE))
                s.login(ALICE.user, ALICE.password)
                s.sendmail(ALICE.user, [ALICE.user], _message(ALICE.user, "Sent via mailward"))
                say(f"   {ALICE.device_id:<12} SMTP  message accepted for delivery")
            with smtplib.SMTP("127.0.0.1", self.ports["submission"],
                              timeout=CLIENT_TIMEOUT_S) as s:
                s.starttls(context=self.tls(BOB))
                s.login(BOB.user, BOB.password)
                try:
                    s.sendmail(BOB.user, [BOB.user], _message(BOB.user, "Hello"))
                    raise DemoError("Bob's phone with TikTok could send mail")
                except smtplib.SMTPSenderRefused as exc:
                    say(f"   {BOB.device_id:<12} SMTP  refused at MAIL FROM: {exc.smtp_code} "
                        f"{exc.smtp_error.decode(errors='replace')}")

    def idle_then_ban(self) -> None:
        if "imap" not in self.protocols:
            return
        m = self.imap_login(ALICE)
        m.select("INBOX")
        tag = m._new_tag()  # imaplib has no IDLE before Python 3.14: speak it directly
        m.send(tag + b" IDLE\r\n")
        line = m.readline()
        if not line.startswith(b"+"):
            raise DemoError(f"IDLE was not accepted: {line!r}")
        text = self.policy.read_text().replace('version = "demo-1"', 'version = "demo-2"')
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(text + TELEGRAM_RULE)
        os.replace(tmp, self.policy)  # atomic, as editors and config management do
        edited = time.monotonic()
        say(f"6. {ALICE.device_id} is in IMAP IDLE; policy.toml edited: Telegram is now "
            "prohibited (version demo-2)")
        assert m.sock is not None
        m.sock.settimeout(BYE_TIMEOUT_S)
        bye = b""
        with contextlib.suppress(OSError, imaplib.IMAP4.abort):
            while not bye:
                line = m.readline()
                if not line:
                    break
                if line.startswith(b"* BYE"):
                    bye = line.rstrip()
        with contextlib.suppress(OSError):
            m.shutdown()
        if not bye:
            raise DemoError("the IDLE session was not ended after the policy change")
        say(f"   hot reload ended the session after {time.monotonic() - edited:.1f} s: "
            f"{bye.decode(errors='replace')}")

    def stop_server(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise DemoError("mailward serve did not stop within 15 s of SIGTERM") from None
        if code != 0:
            raise DemoError(f"mailward serve exited with {code}; see {self.server_log}")

    def report(self) -> None:
        from proxy.audit import query

        say("7. what happened, read back from the audit log (state/audit.jsonl):")
        rows: list[tuple[str, ...]] = [
            ("time", "event", "user", "device", "proto", "result", "why")]
        for r in query(self.root / "state" / "audit.jsonl"):
            rows.append(_row(r))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            say("   " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())

    def verify(self) -> bool:
        r = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "audit", "verify", "--config", str(self.config)],
            capture_output=True, text=True, timeout=60,
        )
        say(f"8. mailward audit verify: {(r.stdout or r.stderr).strip()}")
        if r.returncode == 0:
            say("   audit log verified")
            return True
        say("   AUDIT LOG NOT VERIFIED")
        return False

    def run(self) -> int:
        say(f"mailward demo: a throw-away deployment in {self.root}")
        self.setup()
        self.start_server()
        self.enrol_and_attest()
        self.drive_clients()
        self.idle_then_ban()
        self.stop_server()
        self.report()
        return 0 if self.verify() else 1

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.upstream_thread is not None:
            self.upstream_thread.stop()

    def server_log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.server_log.read_text().splitlines()[-lines:])
        return ""


def _imap_text(exc: BaseException) -> str:
    """The human text of a refused IMAP login (imaplib wraps it in repr noise)."""
    text = str(exc)
    if "[" in text:
        text = text[text.index("[") :]
    return text.strip("]'\" ").replace("\\'", "'")


def _message(user: str, subject: str) -> str:
    return f"From: {user}\r\nTo: {user}\r\nSubject: {subject}\r\n\r\nSent from the demo.\r\n"


def _row(r: dict[str, Any]) -> tuple[str, ...]:
    event = str(r.get("event", ""))
    ts = str(r.get("ts", ""))[11:19]
    user = str(r.get("user") or "")
    device = str(r.get("device_id") or "")
    proto = str(r.get("protocol") or "")
    if event == "decision":
        result = str(r.get("decision", ""))
        why = ",".join(_reason(x) for x in r.get("reasons") or []) or "compliant"
    elif event == "attestation":
        result = str(r.get("result", ""))
        why = "compliant" if r.get("compliant") else ",".join(r.get("violations") or []) \
            or str(r.get("code") or "")
    elif event == "policy_reload":
        result = str(r.get("result", ""))
        why = f"{r.get('old_version')} -> {r.get('new_version')} ({r.get('trigger')})"
    elif event == "session_end":
        result = str(r.get("reason", ""))
        why = str(r.get("detail") or "")
    else:
        result, why = str(r.get("result", "")), ""
    return ts, event, user, device, proto, result, why


def _reason(reason: Any) -> str:
    if isinstance(reason, dict):
        code = str(reason.get("code", ""))
        app = reason.get("app_name") or reason.get("app_id")
        return f"{code}:{app}" if app else code
    return str(reason)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="mailward-demo-"))
    keep = bool(os.environ.get("MAILWARD_DEMO_KEEP"))
    demo = Demo(root)
    code = 1
    try:
        code = demo.run()
    except (DemoError, OSError, imaplib.IMAP4.error, smtplib.SMTPException) as exc:
        say(f"demo failed: {type(exc).__name__}: {exc}")
        tail = demo.server_log_tail()
        if tail:
            say("last lines of the server log:\n" + tail)
        keep = True
    finally:
        demo.cleanup()
        if keep:
            say(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return code


__all__ = ["Demo", "DemoError", "main"]

if __name__ == "__main__":
    sys.exit(main())
