"""Mixed load with its correctness checks: N concurrent sessions (half IMAP, a quarter
SMTP submission, a quarter ActiveSync) from D devices, 20% with TikTok, against
``mailward serve`` (a subprocess, started exactly as ops start it) in front of the
project's embedded upstream (:mod:`proxy.demo.upstream`, in its own process); mid-run
two policy reloads (the file edited, version bumped) and F compliant devices turned
non-compliant through ``POST /v1/attestations``.

    .venv/bin/python bench/load.py [--sessions 2000] [--devices 200] [--flips 20] [--json]

Set-up: ``certs init``, one device certificate per device (each device its own user),
listeners ``imaps`` (implicit TLS), ``submission`` (STARTTLS) and ``activesync``
(HTTPS), all with device client certificates (ActiveSync: DeviceId matching the
certificate). Every device's posture is first reported by the MDM attester.

The run, in order:

1. every session is opened (at most ``--concurrency`` being set up at once): IMAP logs
   in, SELECTs and enters IDLE; SMTP does STARTTLS, AUTH PLAIN, ``MAIL FROM`` (250
   allowed / 550 denied) and, allowed, RSET and waits; ActiveSync sends FolderSync
   (200 allowed / 403 denied) and, allowed, parks a Ping (the upstream holds it);
2. policy reload 1 (version bump); when its record is in the audit log, the first
   half of the flips: TikTok reports POSTed concurrently, alternately signed by the
   device itself and by the MDM attester; policy reload 2 is written at once, then the
   second half; the sessions of flipped devices must end: IMAP ``* BYE``, SMTP ``421``
   (or a close), ActiveSync Ping ``403``, each timestamped by the client on receipt;
3. a new IMAP login from every flipped device (must be refused); one more second in
   which no other session may end; peak RSS from ``/proc/<pid>/status`` (VmHWM);
4. SIGTERM: every live session must end (with its goodbye), the server exit 0; then
   ``mailward audit verify`` and the audit log read back.

Checks (the exit status is 1 if any fails): misclassified = 0 (a TikTok device
allowed, a compliant one denied or its session ended, a flipped device let in again,
a flip answered "compliant"); audit records missing = 0 and duplicated = 0 (exactly
one ``decision`` per IMAP/SMTP login attempt and per ActiveSync device-session or
refused request, one ``attestation`` per accepted report, one gate ``session_end`` per
ended session of a flipped device, one ``policy_reload`` per reload); ``audit verify``
exit 0 after SIGTERM; every session of a flipped device ended with its goodbye within
``--end-timeout``; every session ended at shutdown, the server exit 0; no client errors.

Figures: time from the API's 201 (on receipt) to each session's end, p50/p99/max (goal:
max <= 2 s; ``--strict-timing`` makes a miss fail the run); the API's answer time for
the flips; time to decision p50/p99 from the records' ``latency_us``; the server's peak
RSS. ``--json`` prints one JSON object on stdout (the text report goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
TIKTOK = "com.zhiliaoapp.musically"
MAIL_APP = "com.microsoft.office.outlook"
EAS = "/Microsoft-Server-ActiveSync"
WBXML = bytes.fromhex("03016a00455c4f4b033100015203350001010101")
START_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 30.0  # one protocol step of a client (the machine may be busy)
GOAL_END_S = 2.0

CONFIG = """\
[server]
state_dir = "state"
policy = "config/policy.toml"
shutdown_grace = "1s"

[audit]
path = "state/audit.jsonl"

[api]
listen = "{host}:{ports[api]}"
tls = true

[[listeners]]
name = "imaps"
protocol = "imap"
listen = "{host}:{ports[imap]}"
tls = "implicit"
client_cert = "optional"
upstream = "{host}:{up[imap]}"
upstream_tls = "implicit"
upstream_ca = "certs/ca.pem"

[[listeners]]
name = "submission"
protocol = "smtp"
listen = "{host}:{ports[smtp]}"
tls = "starttls"
client_cert = "optional"
upstream = "{host}:{up[smtp]}"
upstream_tls = "starttls"
upstream_ca = "certs/ca.pem"

[[listeners]]
name = "activesync"
protocol = "activesync"
listen = "{host}:{ports[eas]}"
tls = "implicit"
client_cert = "optional"
upstream = "https://{host}:{up[eas]}"
upstream_tls = "implicit"
upstream_ca = "certs/ca.pem"
"""


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


# ------------------------------------------------------------------ the plan


@dataclass
class Device:
    index: int
    id: str
    user: str
    password: str
    platform: str
    tiktok: bool  # from the start
    flip: bool = False  # compliant at first, turned non-compliant mid-run
    ctx: ssl.SSLContext | None = None
    key: Any = None
    chain: list[Any] = field(default_factory=list)
    flipped_at: float | None = None  # the API's 201, on receipt (monotonic)


@dataclass
class Plan:
    sessions: int
    devices: list[Device]
    kinds: list[tuple[str, Device]]  # (protocol, device) of every session

    @classmethod
    def make(cls, sessions: int, devices: int, flips: int) -> Plan:
        devs = [Device(i, f"dev-{i:04d}", f"u{i:04d}@corp.example", f"pw-{i}",
                       "android" if i % 2 == 0 else "ios", tiktok=i % 5 == 0)
                for i in range(devices)]
        compliant = [d for d in devs if not d.tiktok]
        if flips > len(compliant):
            raise SystemExit(f"--flips {flips}: only {len(compliant)} compliant devices")
        if flips:
            step = len(compliant) / flips
            for k in range(flips):
                compliant[int(k * step)].flip = True
        n_imap, n_smtp = sessions // 2, sessions // 4
        kinds = ([("imap", devs[k % devices]) for k in range(n_imap)]
                 + [("smtp", devs[k % devices]) for k in range(n_smtp)]
                 + [("activesync", devs[k % devices])
                    for k in range(sessions - n_imap - n_smtp)])
        return cls(sessions, devs, kinds)

    @property
    def flipped(self) -> list[Device]:
        return [d for d in self.devices if d.flip]


# ------------------------------------------------------------------ deployment


class Deployment:
    """A throw-away deployment root: certificates, the upstream and ``mailward serve``."""

    def __init__(self, root: Path, plan: Plan) -> None:
        self.root, self.plan = root, plan
        self.certs = root / "certs"
        self.config = root / "config" / "mailward.toml"
        self.policy = root / "config" / "policy.toml"
        self.audit = root / "state" / "audit.jsonl"
        self.ports = {"api": 0, "imap": 0, "smtp": 0, "eas": 0}
        self.server: subprocess.Popen[bytes] | None = None
        self.upstream: subprocess.Popen[bytes] | None = None
        self._audit_offset = 0
        self._audit_seen = ""

    def setup(self) -> None:
        from proxy.pki import certs_init, enroll_device, load_certs, load_private_key

        for sub in ("config", "state"):
            (self.root / sub).mkdir(parents=True)
        certs_init(self.certs)
        self.ca = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        self.mdm_key = load_private_key(self.certs / "offline" / "mdm-attester.key")
        self.mdm_chain = load_certs(self.certs / "mdm-attester.pem")
        ca_key = self.certs / "offline" / "device-ca.key"
        for d in self.plan.devices:
            out = self.certs / "devices" / d.id
            key_path, cert_path = enroll_device(
                device_ca_cert=self.certs / "device-ca.pem", device_ca_key=ca_key,
                device_id=d.id, user=d.user, out_dir=out)
            d.key, d.chain = load_private_key(key_path), load_certs(cert_path)
            d.ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
            d.ctx.load_cert_chain(cert_path, key_path)
        (self.root / "users.json").write_text(
            json.dumps({d.user: d.password for d in self.plan.devices}))
        self.write_policy("bench-1")

    def write_policy(self, version: str) -> None:
        tmp = self.policy.with_suffix(".tmp")
        from proxy.demo.run import POLICY  # TikTok banned on phones and tablets

        tmp.write_text(POLICY.format(version=version, tiktok=TIKTOK))
        os.replace(tmp, self.policy)  # atomic, as editors and config management do

    def start_upstream(self) -> dict[str, int]:
        log = open(self.root / "state" / "upstream.log", "ab")  # noqa: SIM115 - child owns it
        try:
            self.upstream = subprocess.Popen(
                [sys.executable, __file__, "--role-upstream", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        finally:
            log.close()
        assert self.upstream.stdout is not None
        line = self.upstream.stdout.readline()
        if not line:
            raise RuntimeError("the upstream did not start; see state/upstream.log")
        return dict(json.loads(line))

    def start_server(self, up: dict[str, int]) -> None:
        for attempt in range(3):  # a free port can be taken between probe and bind
            self.ports = {name: _free_port() for name in self.ports}
            self.config.write_text(CONFIG.format(host=HOST, ports=self.ports, up=up))
            log = open(self.root / "state" / "mailward.log", "ab")  # noqa: SIM115
            try:
                self.server = subprocess.Popen(
                    [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.root,
                    env={**os.environ, "MAILWARD_LOG_FORMAT": "json"})
            finally:
                log.close()
            if self._wait_ready():
                return
            text = (self.root / "state" / "mailward.log").read_text(errors="replace")
            if attempt == 2 or "already in use" not in text:
                raise RuntimeError("mailward serve did not become ready; see state/mailward.log")

    def _wait_ready(self) -> bool:
        import urllib.request

        assert self.server is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                url = f"https://{HOST}:{self.ports['api']}/readyz"
                with urllib.request.urlopen(url, context=self.ca, timeout=2) as resp:
                    if resp.status == 200:
                        return True
            time.sleep(0.1)
        return False

    def rss_kib(self, field_name: str = "VmRSS") -> int:
        assert self.server is not None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.server.pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        return 0

    async def audit_has(self, pattern: str, timeout: float) -> bool:
        """Wait until the audit log holds a line matching ``pattern`` (regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), open(self.audit, "rb") as f:
                f.seek(self._audit_offset)
                chunk = f.read()
                cut = chunk.rfind(b"\n") + 1
                self._audit_offset += cut
                self._audit_seen += chunk[:cut].decode("utf-8", "replace")
            if rx.search(self._audit_seen):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    def verify(self) -> tuple[int, str]:
        r = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify",
                            "--config", str(self.config)],
                           capture_output=True, text=True, timeout=300, check=False)
        return r.returncode, (r.stdout or r.stderr).strip()

    def stop(self) -> None:
        for proc in (self.server, self.upstream):
            if proc is not None and proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)


def run_upstream(root: Path) -> None:
    """``--role-upstream ROOT``: the embedded upstream on uvloop, ports on stdout."""
    import uvloop

    from proxy.demo.upstream import DemoUpstream

    users = json.loads((root / "users.json").read_text())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(root / "certs" / "server.pem", root / "certs" / "server.key")

    async def main() -> None:
        up = await DemoUpstream(users, ssl_context=ctx, imap_tls="implicit",
                                smtp_tls="starttls", eas_tls=True, ping_hold_s=3600.0).start()
        print(json.dumps({"imap": up.ports["imap"], "smtp": up.ports["smtp"],
                          "eas": up.ports["eas"]}), flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())


# ------------------------------------------------------------------ clients


@dataclass
class Session:
    protocol: str
    device: Device
    outcome: str = ""  # allowed | denied | error
    detail: str = ""
    ended_at: float | None = None  # monotonic, on receipt of the goodbye or close
    how: str = ""  # bye | 421 | 403 | eof | http <status> | ...
    writer: asyncio.StreamWriter | None = None
    watcher: asyncio.Task[None] | None = None

    def end(self, how: str) -> None:
        if self.ended_at is None:
            self.ended_at, self.how = time.monotonic(), how

    @property
    def goodbye(self) -> bool:
        return self.how in ("bye", "421", "403", "http 503")

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.transport.abort()


def watch_lines(s: Session, r: asyncio.StreamReader, goodbye: bytes, how: str) -> None:
    """The session is allowed and set up: wait in the background for its end, a line
    starting with ``goodbye`` or the server closing the connection."""

    async def watch() -> None:
        while True:
            line = await r.readline()
            if not line:
                return s.end("eof")
            if line.startswith(goodbye):
                return s.end(how)

    s.outcome = "allowed"
    s.watcher = asyncio.create_task(watch())


async def _line(r: asyncio.StreamReader) -> bytes:
    line = await asyncio.wait_for(r.readline(), STEP_TIMEOUT_S)
    if not line:
        raise ConnectionError("closed by the server")
    return line


async def _tagged(r: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await _line(r)
        if line.startswith(tag + b" "):
            return line


async def imap_session(s: Session, port: int) -> None:
    d = s.device
    r, w = await asyncio.open_connection(HOST, port, ssl=d.ctx)
    s.writer = w
    await _line(r)
    w.write(f"a1 LOGIN {d.user} {d.password}\r\n".encode())
    line = await _tagged(r, b"a1")
    if not line.startswith(b"a1 OK"):
        s.outcome = "denied" if b"AUTHORIZATIONFAILED" in line else "error"
        s.detail = line.decode(errors="replace").strip()
        s.close()
        return
    w.write(b"a2 SELECT INBOX\r\n")
    await _tagged(r, b"a2")
    w.write(b"a3 IDLE\r\n")
    line = await _line(r)
    if not line.startswith(b"+"):
        raise ConnectionError(f"IDLE refused: {line!r}")
    watch_lines(s, r, b"* BYE", "bye")


async def _smtp(r: asyncio.StreamReader, w: asyncio.StreamWriter | None = None,
                command: str | None = None) -> tuple[int, str]:
    if w is not None and command is not None:
        w.write(command.encode() + b"\r\n")
    while True:
        line = await _line(r)
        if line[3:4] != b"-":
            return int(line[:3]), line.decode(errors="replace").strip()


async def smtp_session(s: Session, port: int) -> None:
    d = s.device
    r, w = await asyncio.open_connection(HOST, port)
    s.writer = w
    await _smtp(r)
    await _smtp(r, w, "EHLO bench.example")
    code, text = await _smtp(r, w, "STARTTLS")
    if code != 220:
        raise ConnectionError(text)
    await w.start_tls(d.ctx, server_hostname=HOST)  # type: ignore[attr-defined]
    await _smtp(r, w, "EHLO bench.example")
    blob = base64.b64encode(f"\0{d.user}\0{d.password}".encode()).decode()
    code, text = await _smtp(r, w, f"AUTH PLAIN {blob}")
    if code != 235:
        raise ConnectionError(text)
    code, text = await _smtp(r, w, f"MAIL FROM:<{d.user}>")
    if code != 250:
        s.outcome, s.detail = ("denied" if code == 550 else "error"), text
        with contextlib.suppress(Exception):
            await _smtp(r, w, "QUIT")
        s.close()
        return
    await _smtp(r, w, "RSET")
    watch_lines(s, r, b"421", "421")


def eas_request(d: Device, command: str) -> bytes:
    auth = base64.b64encode(f"{d.user}:{d.password}".encode()).decode()
    head = (f"POST {EAS}?Cmd={command}&User={d.user.replace('@', '%40')}&DeviceId={d.id}"
            f"&DeviceType={'Android' if d.platform == 'android' else 'iPhone'} HTTP/1.1\r\n"
            f"Host: {HOST}\r\nAuthorization: Basic {auth}\r\nMS-ASProtocolVersion: 14.1\r\n"
            f"Content-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: {len(WBXML)}"
            "\r\n\r\n")
    return head.encode() + WBXML


async def http_response(r: asyncio.StreamReader, timeout: float | None = STEP_TIMEOUT_S
                        ) -> int:
    """Read one HTTP/1.1 response (status line, headers, body); its status."""
    status_line = await asyncio.wait_for(r.readline(), timeout)
    if not status_line:
        raise ConnectionError("closed by the server")
    status = int(status_line.split()[1])
    length, chunked = 0, False
    while (line := await _line(r)) not in (b"\r\n", b"\n"):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while (size := int((await _line(r)).split(b";")[0], 16)) > 0:
            await r.readexactly(size + 2)
        await _line(r)
    elif length:
        await r.readexactly(length)
    return status


async def eas_session(s: Session, port: int) -> None:
    d = s.device
    r, w = await asyncio.open_connection(HOST, port, ssl=d.ctx)
    s.writer = w
    w.write(eas_request(d, "FolderSync"))
    status = await http_response(r)
    if status != 200:
        s.outcome = "denied" if status == 403 else "error"
        s.detail = f"FolderSync {status}"
        s.close()
        return
    w.write(eas_request(d, "Ping"))  # held by the upstream: a phone waiting for mail
    s.outcome = "allowed"

    async def watch() -> None:
        try:
            status = await http_response(r, None)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            return s.end("eof")
        s.end("403" if status == 403 else f"http {status}")

    s.watcher = asyncio.create_task(watch())


OPENERS: dict[str, Callable[[Session, int], Awaitable[None]]] = {
    "imap": imap_session, "smtp": smtp_session, "activesync": eas_session}
PORT_OF = {"imap": "imap", "smtp": "smtp", "activesync": "eas"}


async def open_session(s: Session, ports: dict[str, int], limit: asyncio.Semaphore) -> None:
    async with limit:
        try:
            await OPENERS[s.protocol](s, ports[PORT_OF[s.protocol]])
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            s.outcome, s.detail = "error", f"{type(exc).__name__}: {exc}"
            s.close()


# ------------------------------------------------------------------ the run


@dataclass
class Run:
    """Everything the client side saw, for the checks and the report."""

    plan: Plan
    sessions: list[Session] = field(default_factory=list)
    relogins: list[Session] = field(default_factory=list)
    flip_api_s: list[float] = field(default_factory=list)
    flip_answers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    initial_reports: int = 0
    reloads_seen: int = 0
    open_s: float = 0.0
    rss_ready_kib: int = 0
    rss_peak_kib: int = 0
    sigterm_at: float = 0.0  # monotonic
    shutdown_s: float = 0.0
    exit_code: int | None = None
    live_at_shutdown: int = 0
    verify_code: int = -1
    verify_text: str = ""


def report_token(dep: Deployment, d: Device, *, tiktok: bool, by_device: bool) -> str:
    from proxy.pki import make_claims, sign_report

    apps = [MAIL_APP, TIKTOK] if tiktok else [MAIL_APP]
    claims = make_claims(device_id=d.id, user=d.user, platform=d.platform, apps=apps,
                         managed=True, issuer=None if by_device else "mdm:bench")
    if by_device:
        return sign_report(claims, d.key, d.chain)
    return sign_report(claims, dep.mdm_key, dep.mdm_chain)


async def post_report(http: Any, dep: Deployment, token: str) -> tuple[int, Any]:
    async with http.post(f"https://{HOST}:{dep.ports['api']}/v1/attestations",
                         data=token.encode(),
                         headers={"Content-Type": "application/jose"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def attest_all(http: Any, dep: Deployment, run: Run) -> None:
    """The MDM reports every device's posture (TikTok on 20% of them)."""
    limit = asyncio.Semaphore(16)

    async def one(d: Device) -> None:
        async with limit:
            status, doc = await post_report(http, dep, report_token(
                dep, d, tiktok=d.tiktok, by_device=False))
        if status != 201 or doc.get("compliant") is d.tiktok:
            raise RuntimeError(f"initial report of {d.id}: {status} {doc}")
        run.initial_reports += 1

    await asyncio.gather(*(one(d) for d in run.plan.devices))


async def flip(http: Any, dep: Deployment, run: Run, devices: list[Device]) -> None:
    """TikTok reports for ``devices``, POSTed at once; each device's 201 is stamped."""

    async def one(k: int, d: Device) -> None:
        token = report_token(dep, d, tiktok=True, by_device=k % 2 == 0)
        sent = time.monotonic()
        status, doc = await post_report(http, dep, token)
        d.flipped_at = time.monotonic()
        run.flip_api_s.append(d.flipped_at - sent)
        run.flip_answers[d.id] = (status, doc)

    await asyncio.gather(*(one(d.index, d) for d in devices))


async def reload(dep: Deployment, run: Run, version: str, *, wait: bool) -> None:
    dep.write_policy(version)
    if wait:
        await wait_reload(dep, run, version)


async def wait_reload(dep: Deployment, run: Run, version: str) -> None:
    if await dep.audit_has(rf'"new_version":\s*"{version}"', 30):
        run.reloads_seen += 1
    else:
        say(f"policy {version} was not applied within 30 s")


async def wait_ended(sessions: list[Session], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(s.ended_at is None for s in sessions) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def relogin(dep: Deployment, run: Run) -> None:
    """A new IMAP login from every flipped device: the new posture must refuse it."""
    limit = asyncio.Semaphore(32)
    run.relogins = [Session("imap", d) for d in run.plan.flipped]
    await asyncio.gather(*(open_session(s, dep.ports, limit) for s in run.relogins))
    for s in run.relogins:
        s.close()


async def shutdown(dep: Deployment, run: Run) -> None:
    """SIGTERM; every live session must end (with its goodbye), the server exit 0."""
    assert dep.server is not None
    live = [s for s in run.sessions if s.outcome == "allowed" and s.ended_at is None]
    run.live_at_shutdown = len(live)
    started = run.sigterm_at = time.monotonic()
    dep.server.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    try:
        run.exit_code = await asyncio.wait_for(loop.run_in_executor(None, dep.server.wait), 60)
    except TimeoutError:
        run.exit_code = None
    await wait_ended(live, 5)
    ended = [s.ended_at for s in live if s.ended_at is not None]
    run.shutdown_s = (max(ended) - started) if ended else 0.0
    for s in run.sessions:
        s.close()


async def drive(dep: Deployment, run: Run, args: argparse.Namespace) -> None:
    import aiohttp

    plan = run.plan
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=dep.ca)) as http:
        await attest_all(http, dep, run)
        say(f"  {run.initial_reports} posture reports accepted (MDM attester)")
        limit = asyncio.Semaphore(args.concurrency)
        run.sessions = [Session(p, d) for p, d in plan.kinds]
        started = time.monotonic()
        await asyncio.gather(*(open_session(s, dep.ports, limit) for s in run.sessions))
        run.open_s = time.monotonic() - started
        outcomes = Counter(s.outcome for s in run.sessions)
        say(f"  {len(run.sessions)} sessions set up in {run.open_s:.1f} s: "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
        run.rss_ready_kib = dep.rss_kib()
        await reload(dep, run, "bench-2", wait=True)
        half = len(plan.flipped) // 2
        await flip(http, dep, run, plan.flipped[:half])
        await reload(dep, run, "bench-3", wait=False)
        await flip(http, dep, run, plan.flipped[half:])
        mine = [s for s in run.sessions if s.device.flip and s.outcome == "allowed"]
        await wait_ended(mine, args.end_timeout)
        await wait_reload(dep, run, "bench-3")
        say(f"  {len(plan.flipped)} devices flipped, 2 policy reloads; "
            f"{sum(s.ended_at is not None for s in mine)}/{len(mine)} of their sessions ended")
        await relogin(dep, run)
        await asyncio.sleep(1.0)  # nothing else may end meanwhile
        run.rss_peak_kib = dep.rss_kib("VmHWM")
        await shutdown(dep, run)
    run.verify_code, run.verify_text = await asyncio.get_running_loop().run_in_executor(
        None, dep.verify)


# ------------------------------------------------------------------ checks


def misclassified(run: Run) -> list[str]:
    """What the clients saw that contradicts the devices' posture."""
    bad = []
    for s in run.sessions:
        d = s.device
        if d.tiktok and s.outcome == "allowed":
            bad.append(f"{s.protocol} {d.id} has TikTok and was allowed")
        elif not d.tiktok and s.outcome == "denied":
            bad.append(f"{s.protocol} {d.id} is compliant and was denied: {s.detail}")
        elif (not d.tiktok and not d.flip and s.outcome == "allowed"
              and s.ended_at is not None and s.ended_at < run.sigterm_at):
            bad.append(f"{s.protocol} {d.id} is compliant and its session ended ({s.how})")
        elif d.flip and s.outcome == "allowed" and s.how.startswith("http 2"):
            bad.append(f"{s.protocol} {d.id} flipped and its Ping was answered {s.how}")
    for s in run.relogins:
        if s.outcome == "allowed":
            bad.append(f"imap {s.device.id} flipped and a new login was allowed")
    for dev, (status, doc) in run.flip_answers.items():
        if status != 201 or doc.get("compliant") is not False:
            bad.append(f"flip of {dev} answered {status} {doc}")
    return bad


def expected_records(run: Run) -> Counter[tuple[str, ...]]:
    """The audit records the run must have written, by (event, protocol, device, ...)."""
    exp: Counter[tuple[str, ...]] = Counter()
    eas_allowed: set[str] = set()
    for s in [*run.sessions, *run.relogins]:
        if s.outcome not in ("allowed", "denied"):
            continue
        decision = "allow" if s.outcome == "allowed" else "deny"
        if s.protocol == "activesync" and decision == "allow":
            eas_allowed.add(s.device.id)  # one device-session, whatever its connections
        else:
            exp["decision", s.protocol, s.device.id, decision] += 1
        if s.device.flip and decision == "allow" and s.protocol != "activesync":
            exp["session_end", s.protocol, s.device.id] += 1
    for dev in eas_allowed:
        exp["decision", "activesync", dev, "allow"] += 1
    for d in run.plan.flipped:
        if d.id in eas_allowed:
            exp["session_end", "activesync", d.id] += 1
    for d in run.plan.devices:
        exp["attestation", d.id] += 1 + d.flip
    exp["policy_reload",] += 2
    return exp


def actual_records(path: Path) -> tuple[Counter[tuple[str, ...]], list[int]]:
    """The same keys read back from the audit log, and every decision's latency_us."""
    from proxy.audit import query

    got: Counter[tuple[str, ...]] = Counter()
    latencies = []
    for r in query(path):
        event = r.get("event")
        if event == "decision":
            got["decision", r["protocol"], r.get("device_id") or "", r["decision"]] += 1
            latencies.append(int(r.get("latency_us") or 0))
        elif event == "session_end" and r.get("reason") in ("posture_changed",
                                                            "policy_changed"):
            got["session_end", r["protocol"], r.get("device_id") or ""] += 1
        elif event == "attestation" and r.get("result") == "accepted":
            got["attestation", r.get("device_id") or ""] += 1
        elif event == "policy_reload" and r.get("result") == "applied":
            got["policy_reload",] += 1
    return got, latencies


def _diff(a: Counter[tuple[str, ...]], b: Counter[tuple[str, ...]]) -> list[str]:
    return [f"{' '.join(k)} x{a[k] - b[k]}" for k in sorted(a) if a[k] > b[k]]


def summarise(run: Run, dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    plan = run.plan
    exp = expected_records(run)
    got, latencies = actual_records(dep.audit)
    missing, extra = _diff(exp, got), _diff(got, exp)
    mine = [s for s in run.sessions if s.device.flip and s.outcome == "allowed"]
    ends = [max(0.0, s.ended_at - s.device.flipped_at) for s in mine
            if s.ended_at is not None and s.device.flipped_at is not None]
    not_ended = [f"{s.protocol} {s.device.id} ({s.how or 'still open'})" for s in mine
                 if s.ended_at is None or not s.goodbye]
    errors = [f"{s.protocol} {s.device.id}: {s.detail}" for s in [*run.sessions, *run.relogins]
              if s.outcome == "error"]
    live = [s for s in run.sessions if s.outcome == "allowed" and not s.device.flip]
    shut_open = sum(s.ended_at is None for s in live)
    shut_goodbye = sum(s.goodbye for s in live)
    wrong = misclassified(run)
    end_max = max(ends, default=0.0)
    checks = {
        "misclassified": (len(wrong), len(wrong) == 0),
        "audit records missing": (sum(exp[k] - got[k] for k in exp if exp[k] > got[k]),
                                  not missing),
        "audit records duplicated": (sum(got[k] - exp[k] for k in got if got[k] > exp[k]),
                                     not extra),
        "audit verify exit": (run.verify_code, run.verify_code == 0),
        "flipped sessions not ended with goodbye": (len(not_ended), not not_ended),
        "client errors": (len(errors), not errors),
        "sessions open after shutdown": (shut_open, shut_open == 0),
        "server exit after SIGTERM": (run.exit_code, run.exit_code == 0),
    }
    if args.strict_timing:
        checks["flipped session end over 2 s"] = (sum(e > GOAL_END_S for e in ends),
                                                  end_max <= GOAL_END_S)
    outcomes = Counter(f"{s.protocol} {s.outcome}" for s in run.sessions)
    return {
        "sessions": plan.sessions, "devices": len(plan.devices),
        "tiktok_devices": sum(d.tiktok for d in plan.devices), "flips": len(plan.flipped),
        "imap": sum(p == "imap" for p, _ in plan.kinds),
        "smtp": sum(p == "smtp" for p, _ in plan.kinds),
        "activesync": sum(p == "activesync" for p, _ in plan.kinds),
        "outcomes": dict(sorted(outcomes.items())), "open_s": round(run.open_s, 2),
        "flipped_sessions": len(mine), "flipped_sessions_ended": len(ends),
        "end_p50_s": round(_pct(ends, 0.5), 3), "end_p99_s": round(_pct(ends, 0.99), 3),
        "end_max_s": round(end_max, 3), "end_goal_met": end_max <= GOAL_END_S and not not_ended,
        "flip_api_p50_ms": round(_pct(run.flip_api_s, 0.5) * 1000, 1),
        "flip_api_max_ms": round(max(run.flip_api_s, default=0.0) * 1000, 1),
        "decisions": len(latencies),
        "decision_p50_ms": round(_pct(latencies, 0.5) / 1000, 2),
        "decision_p99_ms": round(_pct(latencies, 0.99) / 1000, 2),
        "rss_ready_mib": round(run.rss_ready_kib / 1024, 1),
        "rss_peak_mib": round(run.rss_peak_kib / 1024, 1),
        "live_at_shutdown": run.live_at_shutdown, "shutdown_goodbyes": shut_goodbye,
        "shutdown_s": round(run.shutdown_s, 2), "verify": run.verify_text,
        "checks": {k: {"value": v, "ok": ok} for k, (v, ok) in checks.items()},
        "ok": all(ok for _, ok in checks.values()),
        "details": {"misclassified": wrong[:20], "missing": missing[:20],
                    "duplicated": extra[:20], "not_ended": not_ended[:20],
                    "errors": errors[:20]},
    }


def print_report(res: dict[str, Any]) -> None:
    say(f"\nmailward load: {res['sessions']} sessions ({res['imap']} IMAP, {res['smtp']} SMTP, "
        f"{res['activesync']} ActiveSync) from {res['devices']} devices "
        f"({res['tiktok_devices']} with TikTok), {res['flips']} flipped, 2 policy reloads "
        f"({os.cpu_count()} CPUs)")
    say("outcomes: " + ", ".join(f"{k} {v}" for k, v in res["outcomes"].items())
        + f"; set up in {res['open_s']} s")
    say(f"flipped devices' sessions ended: {res['flipped_sessions_ended']}/"
        f"{res['flipped_sessions']}, from the API's 201 p50 {res['end_p50_s']} s   "
        f"p99 {res['end_p99_s']} s   max {res['end_max_s']} s   (goal max <= {GOAL_END_S:g} s: "
        f"{'met' if res['end_goal_met'] else 'NOT MET'})")
    say(f"flip reports answered 201 in p50 {res['flip_api_p50_ms']} ms   "
        f"max {res['flip_api_max_ms']} ms")
    say(f"time to decision ({res['decisions']} decisions) p50 {res['decision_p50_ms']} ms   "
        f"p99 {res['decision_p99_ms']} ms")
    say(f"server RSS at ready {res['rss_ready_mib']} MiB   peak {res['rss_peak_mib']} MiB")
    say(f"shutdown: {res['live_at_shutdown']} live sessions, {res['shutdown_goodbyes']} ended "
        f"with their goodbye in {res['shutdown_s']} s; audit verify: {res['verify']}")
    say("checks:")
    for name, c in res["checks"].items():
        say(f"  {name:<42} {c['value']!s:>6}   {'ok' if c['ok'] else 'FAILED'}")
    for name, items in res["details"].items():
        for item in items:
            say(f"  {name}: {item}")
    say("result: " + ("all checks passed" if res["ok"] else "CHECKS FAILED"))


# ------------------------------------------------------------------ main


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--flips", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="one JSON summary on stdout")
    ap.add_argument("--concurrency", type=int, default=64, help="sessions set up at once")
    ap.add_argument("--end-timeout", type=float, default=15.0,
                    help="how long flipped devices' sessions may take to end (s)")
    ap.add_argument("--strict-timing", action="store_true",
                    help=f"also fail when a flipped session took over {GOAL_END_S:g} s")
    ap.add_argument("--keep", action="store_true", help="keep the deployment directory")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    plan = Plan.make(args.sessions, args.devices, args.flips)
    root = Path(tempfile.mkdtemp(prefix="mailward-load-"))
    dep = Deployment(root, plan)
    keep = args.keep
    try:
        started = time.monotonic()
        dep.setup()
        dep.start_server(dep.start_upstream())
        say(f"load: deployment in {root} ready in {time.monotonic() - started:.1f} s "
            f"(server pid {dep.server.pid if dep.server else '?'})")
        run = Run(plan)
        import uvloop

        uvloop.run(drive(dep, run, args))
        res = summarise(run, dep, args)
        keep = keep or not res["ok"]
    except BaseException:
        keep = True
        raise
    finally:
        dep.stop()
        if keep:
            say(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print_report(res)
    if args.json:
        print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


def _entry(argv: Iterable[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["--role-upstream"]:
        run_upstream(Path(argv[1]))
        return 0
    return main(argv)


if __name__ == "__main__":
    sys.exit(_entry(sys.argv[1:]))
