"""Scale-out end to end: two ``mailward serve`` instances behind a real nginx ``stream``
load balancer with PROXY protocol, sharing a real ``redis-server`` (deploy/scale/).

The module's tests form one scenario, in order: a report ingested on A is used by B
and replayed on B is refused; the audit record names the phone's address (not
nginx's); a device turning non-compliant through A ends its IMAP IDLE and its
ActiveSync Ping on B within 2 s; a policy reload on A reaches B within 2 s; Redis
stopped gives the degraded behaviour and recovers; both audit logs verify.
"""

from __future__ import annotations

import base64
import http.client
import imaplib
import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from peers import peer_missing
from peers.redis import RedisServer, require_redis
from test_server import (
    ALICE,
    BOB,
    CAROL,
    OUTLOOK,
    PHONES,
    REACT_S,
    TELEGRAM_RULE,
    TIKTOK,
    policy_text,
    read_bye,
)

from proxy.audit import query
from proxy.demo.run import Phone
from proxy.demo.upstream import UpstreamThread
from proxy.pki import (
    certs_init,
    enroll_device,
    load_certs,
    load_private_key,
    make_claims,
    sign_report,
)

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("deploy_scale", ROOT / "deploy/scale/scale.py")
assert _spec is not None and _spec.loader is not None
scale = importlib.util.module_from_spec(_spec)
sys.modules["deploy_scale"] = scale  # dataclasses look their module up
_spec.loader.exec_module(scale)

#: The phones connect from this loopback address; nginx connects from 127.0.0.1.
PHONE_IP = "127.0.0.2"
#: Erin's phone uses ActiveSync only.
ERIN = Phone("erin-phone", "erin@corp.example", "erin-pw", "android", (OUTLOOK,))
ENROLLED = (*PHONES, ERIN)


class PhoneImap(imaplib.IMAP4_SSL):
    """IMAP over TLS from :data:`PHONE_IP`, so the proxy sees a different address
    from the balancer's."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(PHONE_IP, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


@dataclass
class Cluster:
    root: Path
    layout: Any
    upstream: Any
    redis: RedisServer
    procs: dict[str, subprocess.Popen[bytes]]
    nginx: subprocess.Popen[bytes]

    def tls(self, phone: Any = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root / "certs/ca.pem"))
        if phone is not None:
            d = self.root / "certs/devices" / phone.device_id
            ctx.load_cert_chain(d / "device.pem", d / "device.key")
        return ctx

    def api(self, name: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        port = self.layout.ports[f"{name}_api"]
        req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=body,
                                     method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=self.tls(), timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def report(self, phone: Any, apps: tuple[str, ...]) -> bytes:
        d = self.root / "certs/devices" / phone.device_id
        claims = make_claims(device_id=phone.device_id, user=phone.user,
                             platform=phone.platform, apps=list(apps))
        return sign_report(claims, load_private_key(d / "device.key"),
                           load_certs(d / "device.pem")).encode()

    def attest(self, name: str, token: bytes) -> tuple[int, bytes]:
        return self.api(name, "POST", "/v1/attestations", token,
                        {"Content-Type": "application/jose"})

    def audit(self, name: str, **filters: Any) -> list[dict[str, Any]]:
        return list(query(self.root / f"state-{name}/audit.jsonl", **filters))

    def imap(self, phone: Any, port_key: str) -> imaplib.IMAP4:
        m = PhoneImap("127.0.0.1", self.layout.ports[port_key], ssl_context=self.tls(phone),
                      timeout=10)
        m.login(phone.user, phone.password)
        return m

    def log(self, name: str) -> str:
        return (self.root / f"serve-{name}.log").read_text(errors="replace")


class PhonePing(threading.Thread):
    """An ActiveSync Ping long poll from :data:`PHONE_IP` to ``port`` (nginx); its
    ``status``, ``refusal`` header and ``ended`` (monotonic) once it returns."""

    def __init__(self, c: Cluster, phone: Phone, port: int) -> None:
        super().__init__(daemon=True)
        self.c, self.phone, self.port = c, phone, port
        self.status: int | None = None
        self.refusal = ""
        self.ended: float | None = None

    def run(self) -> None:
        p = self.phone
        auth = base64.b64encode(f"{p.user}:{p.password}".encode()).decode()
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=90,
                                           source_address=(PHONE_IP, 0),
                                           context=self.c.tls())
        try:
            conn.request("POST", "/Microsoft-Server-ActiveSync?Cmd=Ping&User="
                         f"{p.user}&DeviceId={p.device_id}&DeviceType=Phone",
                         body=b"\x03\x01\x6a\x00", headers={
                             "Authorization": f"Basic {auth}", "MS-ASProtocolVersion": "14.1",
                             "Content-Type": "application/vnd.ms-sync.wbxml"})
            resp = conn.getresponse()
            resp.read()
            self.status, self.refusal = resp.status, resp.getheader("X-Mailward-Refusal", "")
        except OSError:
            self.status = -1
        finally:
            conn.close()
            self.ended = time.monotonic()


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


def _ready(c: Cluster, name: str) -> bool:
    assert c.procs[name].poll() is None, c.log(name)
    try:
        return c.api(name, "GET", "/readyz")[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_redis()
    if not (os.path.exists(scale.NGINX) and os.path.exists(scale.STREAM_MODULE)):
        peer_missing("nginx with the stream module is not installed (Debian packages nginx, "
                     "libnginx-mod-stream; `make peers`)")
    root = tmp_path_factory.mktemp("scale")
    certs_init(root / "certs")
    for p in ENROLLED:
        enroll_device(device_ca_cert=root / "certs/device-ca.pem",
                      device_ca_key=root / "certs/offline/device-ca.key",
                      device_id=p.device_id, user=p.user,
                      out_dir=root / "certs/devices" / p.device_id)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(root / "certs/server.pem", root / "certs/server.key")
    thread = UpstreamThread(users={p.user: p.password for p in ENROLLED}, ssl_context=ctx,
                            imap_tls="implicit", smtp_tls="starttls", ping_hold_s=60.0)
    upstream = thread.start()
    redis = RedisServer(root / "redis").start()
    layout = scale.write_configs(root, redis.url, f"127.0.0.1:{upstream.ports['imap']}",
                                 "certs/ca.pem", policy_text("t-1"), upstream.eas_url)
    procs = {n: scale.start_instance(layout, n) for n in scale.INSTANCES}
    nginx = None
    try:
        nginx = scale.start_nginx(layout)
        c = Cluster(root, layout, upstream, redis, procs, nginx)
        for n in scale.INSTANCES:
            _wait(lambda n=n: _ready(c, n), 30, f"instance {n} ready")
        yield c
    finally:
        for proc in [nginx, *procs.values()]:
            if proc is not None:
                scale.stop(proc)
        redis.stop()
        thread.stop()


def test_report_on_a_is_used_by_b_and_a_replay_on_b_is_refused(cluster: Cluster) -> None:
    """A report ingested on A lets the phone in through B; the same report sent to B is
    a replay (409); B's decision record names the phone's address, not nginx's."""
    token = cluster.report(ALICE, (OUTLOOK,))
    assert cluster.attest("a", token)[0] == 201
    status, body = cluster.attest("b", token)
    assert status == 409 and b"replay" in body
    m = cluster.imap(ALICE, "pin_b")
    m.logout()
    records = cluster.audit("b", event="decision", user=ALICE.user)
    assert records and records[-1]["decision"] == "allow"
    assert records[-1]["client_ip"] == PHONE_IP
    assert records[-1]["posture_cached"] is False


def test_untrusted_proxy_header_source_is_refused(cluster: Cluster) -> None:
    """A connection straight to an instance's PROXY-protocol listener from an address
    outside trusted_proxies is closed without a greeting."""
    port = cluster.layout.ports["b_imaps"]
    got = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=(PHONE_IP, 0)) as s:
            s.sendall(b"PROXY TCP4 198.51.100.1 127.0.0.1 1 2\r\n")
            got = s.recv(100)
    except ConnectionResetError:  # refused with a reset, perhaps before we sent
        pass
    assert got == b""


def test_noncompliant_through_a_ends_idle_on_b(cluster: Cluster) -> None:
    """Carol's IDLE runs on B; TikTok reported through A ends it within 2 s."""
    assert cluster.attest("a", cluster.report(CAROL, (OUTLOOK,)))[0] == 201
    m = cluster.imap(CAROL, "pin_b")
    m.select("INBOX")
    m.send(m._new_tag() + b" IDLE\r\n")
    assert m.readline().startswith(b"+")
    started = time.monotonic()
    assert cluster.attest("a", cluster.report(CAROL, (OUTLOOK, TIKTOK)))[0] == 201
    bye = read_bye(m, REACT_S + 1)
    took = time.monotonic() - started
    assert b"TikTok" in bye and took <= REACT_S, (bye, took)
    ends = cluster.audit("b", event="session_end", user=CAROL.user)
    assert ends and ends[-1]["client_ip"] == PHONE_IP


def test_noncompliant_through_a_ends_activesync_ping_on_b(cluster: Cluster) -> None:
    """Erin's ActiveSync Ping is held open on B (through nginx); TikTok reported through
    A ends it within 2 s with 403 naming TikTok; B's record names the phone's address."""
    assert cluster.attest("a", cluster.report(ERIN, (OUTLOOK,)))[0] == 201
    ping = PhonePing(cluster, ERIN, cluster.layout.ports["pin_b_eas"])
    ping.start()
    _wait(lambda: ("Ping", ERIN.user) in cluster.upstream.eas_requests, 10,
          "Erin's Ping parked at the upstream")
    assert ping.ended is None
    allowed = cluster.audit("b", event="decision", user=ERIN.user)
    assert allowed and allowed[-1]["decision"] == "allow"
    assert allowed[-1]["protocol"] == "activesync" and allowed[-1]["client_ip"] == PHONE_IP
    assert not cluster.audit("a", event="decision", user=ERIN.user)  # B holds it, not A
    started = time.monotonic()
    assert cluster.attest("a", cluster.report(ERIN, (OUTLOOK, TIKTOK)))[0] == 201
    ping.join(REACT_S + 1)
    assert ping.ended is not None, "the Ping on B did not end"
    took = ping.ended - started
    assert ping.status == 403 and "TikTok" in ping.refusal and took <= REACT_S, (
        ping.status, ping.refusal, took)
    ends = cluster.audit("b", event="session_end", user=ERIN.user)
    assert ends and ends[-1]["client_ip"] == PHONE_IP


def test_policy_reload_on_a_reaches_b(cluster: Cluster) -> None:
    """A SIGHUP reload on A (its file changed) is applied by B within 2 s."""
    path = cluster.root / "config/policy-a.toml"
    path.write_text(policy_text("t-2", TELEGRAM_RULE))
    started = time.monotonic()
    cluster.procs["a"].send_signal(signal.SIGHUP)

    def applied() -> bool:
        return any(r.get("new_version") == "t-2" and r.get("result") == "applied"
                   for r in cluster.audit("b", event="policy_reload"))

    _wait(applied, REACT_S + 1, "B applied A's policy")
    assert time.monotonic() - started <= REACT_S + 0.5
    assert (cluster.root / "state-b/policies").is_dir()


def test_redis_stopped_degrades_and_recovers(cluster: Cluster) -> None:
    """With Redis stopped: /readyz stays 200 and names redis_unreachable, a device B
    read recently is decided from its cache (posture_cached), one never read is
    refused temporarily, new reports get 503, a revocation on A stands at once; after
    Redis restarts the degradation clears by itself, the revocation reaches B and
    decisions are read from Redis again."""
    dave = PHONES[3]
    assert cluster.attest("a", cluster.report(dave, (OUTLOOK,)))[0] == 201
    cluster.imap(dave, "pin_b").logout()  # B has read Dave's posture
    cluster.redis.stop()
    try:
        _wait(lambda: _degraded(cluster, "b") and _degraded(cluster, "a"), 10,
              "both name Redis in /readyz")
        cluster.imap(dave, "pin_b").logout()
        last = cluster.audit("b", event="decision", user=dave.user)[-1]
        assert last["decision"] == "allow" and last["posture_cached"] is True
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            cluster.imap(BOB, "pin_a")  # never read: fail closed, temporarily
        assert cluster.attest("a", cluster.report(dave, (OUTLOOK,)))[0] == 503
        assert _revoke(cluster, "a", ALICE.device_id) == 200  # kept in A's state/
        with pytest.raises(imaplib.IMAP4.error, match="AUTHORIZATIONFAILED"):
            cluster.imap(ALICE, "pin_a")
    finally:
        cluster.redis.start()

    _wait(lambda: not _degraded(cluster, "a") and not _degraded(cluster, "b"), 15,
          "both recovered")
    recovered = time.monotonic()
    # A puts its revocation back into Redis on its next feed poll; B follows the feed.
    _wait(lambda: _refused(cluster, ALICE, "pin_b"), REACT_S + 1,
          "A's revocation reached B through Redis")
    assert time.monotonic() - recovered <= REACT_S + 0.5
    refused = cluster.audit("b", event="decision", user=ALICE.user)[-1]
    assert refused["decision"] == "deny" and refused["posture_cached"] is False
    assert cluster.attest("a", cluster.report(dave, (OUTLOOK,)))[0] == 201
    cluster.imap(dave, "pin_b").logout()
    last = cluster.audit("b", event="decision", user=dave.user)[-1]
    assert last["decision"] == "allow" and last["posture_cached"] is False


def _refused(c: Cluster, phone: Phone, port_key: str) -> bool:
    try:
        c.imap(phone, port_key).logout()
    except imaplib.IMAP4.error as exc:
        assert "AUTHORIZATIONFAILED" in str(exc), exc
        return True
    return False


def _degraded(c: Cluster, name: str) -> bool:
    status, body = c.api(name, "GET", "/readyz")
    assert status == 200, body
    return any(n.startswith("redis_unreachable") for n in json.loads(body)["degraded"])


def _revoke(c: Cluster, name: str, device: str) -> int:
    token = (c.root / "certs/admin.token").read_text().strip()
    return c.api(name, "POST", f"/v1/devices/{device}/revoke", b'{"why": "lost"}',
                 {"Authorization": f"Bearer {token}",
                  "Content-Type": "application/json"})[0]


def test_audit_logs_of_both_verify(cluster: Cluster) -> None:
    """After SIGTERM, both instances' audit logs verify together and `audit query`
    merges them by time."""
    for proc in cluster.procs.values():
        scale.stop(proc)
    mailward = str(Path(sys.executable).with_name("mailward"))
    done = subprocess.run(
        [mailward, "audit", "verify", "--log", str(cluster.root / "state-a/audit.jsonl"),
         "--log", str(cluster.root / "state-b/audit.jsonl"), "--key",
         str(cluster.root / "certs/audit-signing.pub")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "MAILWARD_CONFIG": str(cluster.layout.config("a"))})
    assert done.returncode == 0, done.stdout + done.stderr
    merged = subprocess.run(
        [mailward, "audit", "query", "--log", str(cluster.root / "state-a/audit.jsonl"),
         "--log", str(cluster.root / "state-b/audit.jsonl"), "--format", "json"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "MAILWARD_CONFIG": str(cluster.layout.config("a"))})
    assert merged.returncode == 0, merged.stderr
    records = [json.loads(line) for line in merged.stdout.splitlines()]
    keys = [(r["ts"], r["instance"], r["seq"]) for r in records]
    assert keys == sorted(keys)  # merged by time, ties by instance then seq
    assert {r["instance"] for r in records} == {"a", "b"}
    assert len(records) == len(cluster.audit("a")) + len(cluster.audit("b"))
