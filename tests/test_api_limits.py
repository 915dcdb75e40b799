"""The API under abuse: rate limits per address (429 + Retry-After) that never touch
the admin token or an MDM's attester-signed reports, bounded challenge nonces,
garbage summarised instead of recorded, a slowloris head cut off, and a posture
store locked by another process: decisions and /readyz go on, writes get 503."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers.fakes import ListAudit
from pki_helpers import USER, TestPki, report

from proxy.api import make_app, start_api
from proxy.config import ApiConfig, LimitsConfig, load_policy
from proxy.gate import Gate, Identity, NullObserver, Origin
from proxy.net.limits import Limits
from proxy.posture.sqlite import SqlitePostureStore

pytestmark = pytest.mark.conversation

ROOT = Path(__file__).resolve().parent.parent
TOKEN = b"admin-token-for-limits"
JOSE = {"Content-Type": "application/jose"}
ADMIN = {"Authorization": "Bearer " + TOKEN.decode()}


class Env:
    def __init__(self, tmp: Path, cfg: LimitsConfig) -> None:
        self.pki = TestPki()
        self.mdm = self.pki.attester("Example MDM")
        self.store = SqlitePostureStore(tmp / "posture.db")
        self.audit = ListAudit()
        policy = load_policy(ROOT / "config" / "policy.toml")
        self.limits = Limits(cfg)
        self.gate = Gate(store=self.store, audit=self.audit, policy=lambda: policy,
                         observer=NullObserver(), limits=self.limits)
        self.app = make_app(gate=self.gate, store=self.store, verifier=self.pki.verifier(),
                            policy=lambda: policy, audit=self.audit, admin_token=TOKEN)
        self.client = TestClient(TestServer(self.app))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path, LimitsConfig(api_rate_per_ip=1, api_rate_burst=5,
                                   max_outstanding_nonces=3))
    await e.client.start_server()
    try:
        yield e
    finally:
        await e.client.close()
        await e.store.close()


async def test_garbage_reports_are_throttled_and_summarised(env: Env) -> None:
    """1,500 garbage reports used to get 1,500 answers and 1,500 fsync'd records: now
    the burst gets its 400s, the rest 429 with Retry-After, and no audit record is
    written; one abuse_summary per address carries the count."""
    statuses = []
    for _ in range(30):
        resp = await env.client.post("/v1/attestations", data=b"not.a.report", headers=JOSE)
        statuses.append(resp.status)
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"] == "rate_limited"
    assert statuses[:5] == [400] * 5 and set(statuses[5:]) == {429}
    assert env.audit.records == []
    (summary,) = env.limits.abuse_summaries()
    assert summary["counts"] == {"report_malformed": 5}


async def test_admin_token_and_mdm_reports_are_never_throttled(env: Env) -> None:
    """Requests with the admin token and reports signed by an MDM attester pass any
    number of times from one address; the same address without them is throttled."""
    for i in range(12):
        resp = await env.client.post("/v1/explain", json={"user": USER}, headers=ADMIN)
        assert resp.status == 200, await resp.text()
        token = report(env.mdm, device_id=f"mdm-dev-{i}", apps=[])
        resp = await env.client.post("/v1/attestations", data=token, headers=JOSE)
        assert resp.status == 201, await resp.text()
    await env.gate.settle()
    statuses = [(await env.client.get("/v1/challenge")).status for _ in range(8)]
    assert 429 in statuses


async def test_a_false_attester_claim_costs_the_whole_burst(env: Env) -> None:
    """A report carrying the attester's certificate but a forged signature is refused
    (422) and empties its address's budget: the next request without credentials
    is 429."""
    good = report(env.mdm, apps=[])
    h, p, _ = good.split(".")
    forged = f"{h}.{p}.{'A' * 86}"
    resp = await env.client.post("/v1/attestations", data=forged, headers=JOSE)
    assert (resp.status, (await resp.json())["error"]) == (422, "bad_signature")
    assert (await env.client.get("/v1/challenge")).status == 429


async def test_outstanding_nonces_are_bounded(env: Env) -> None:
    """300 GET /v1/challenge used to leave 300 nonce rows: beyond
    max_outstanding_nonces per address the answer is 429."""
    env.limits.cfg = LimitsConfig(max_outstanding_nonces=3)  # no rate limit here
    statuses = [(await env.client.get("/v1/challenge")).status for _ in range(10)]
    assert statuses == [200] * 3 + [429] * 7
    assert env.limits.outstanding_nonces("127.0.0.1") == 3


async def test_device_report_with_nonce_frees_its_place(env: Env) -> None:
    """A nonce used by an accepted report no longer counts as outstanding."""
    env.limits.cfg = LimitsConfig(max_outstanding_nonces=3)
    nonce = (await (await env.client.get("/v1/challenge")).json())["nonce"]
    assert env.limits.outstanding_nonces() == 1
    token = report(env.pki.device(), apps=[], nonce=nonce)
    resp = await env.client.post("/v1/attestations", data=token, headers=JOSE)
    assert resp.status == 201
    assert env.limits.outstanding_nonces() == 0
    await env.gate.settle()


def _slowloris(port: int, gap: float, total: float) -> tuple[bool, float]:
    """Send a request head one byte per ``gap`` seconds; (cut off?, seconds)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(gap)
        for b in head:
            try:
                s.sendall(bytes([b]))
                data = s.recv(1)
                if data == b"":
                    return True, time.monotonic() - started
            except TimeoutError:
                pass
            except OSError:
                return True, time.monotonic() - started
            if time.monotonic() - started > total:
                break
    return False, time.monotonic() - started


async def test_slow_request_head_is_cut_off(tmp_path: Path) -> None:
    """A client sending one header byte at a time is disconnected after
    header_timeout (0.5 s here), counted as a limit hit; a normal request works."""
    e = Env(tmp_path, LimitsConfig(header_timeout_s=0.5))
    hits: list[str] = []
    e.limits._on_hit = lambda limit, listener: hits.append(limit)
    running = await start_api(ApiConfig("127.0.0.1", 0, False, None), e.app)
    try:
        cut, took = await asyncio.to_thread(_slowloris, running.port, 0.2, 10)
        assert cut and took < 5
        assert "header_timeout" in hits
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await running.close()
        await e.store.close()


LOCKER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
c.execute("INSERT INTO nonce (nonce, expires_at, used) VALUES ('locker', 0, 0)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
"""


async def test_a_locked_store_stalls_neither_decisions_nor_readyz(tmp_path: Path) -> None:
    """Another process holds the SQLite write lock (BEGIN IMMEDIATE): decisions for
    known devices still complete with their outcome (used to stall 5 s each),
    /readyz answers 200 at once, and a posture report gets 503 within seconds."""
    e = Env(tmp_path, LimitsConfig())
    await e.client.start_server()
    ok = report(e.pki.device("dev-ok"), device_id="dev-ok", apps=[])
    bad = report(e.pki.device("dev-bad"), device_id="dev-bad")
    for token in (ok, bad):
        assert (await e.client.post("/v1/attestations", data=token, headers=JOSE)).status == 201
    await e.gate.settle()
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(e.store.path), "20"],
                              stdout=subprocess.PIPE)
    try:
        assert locker.stdout is not None
        assert (await asyncio.to_thread(locker.stdout.readline)).strip() == b"locked"
        started = time.monotonic()
        origin = Origin("imap", "imaps", "192.0.2.1", unidentified="deny")
        decisions = await asyncio.gather(*(
            e.gate.decide(Identity(USER, dev, "client_cert"), origin)
            for dev in ["dev-ok", "dev-bad"] * 10))
        assert [d.allow for d in decisions] == [True, False] * 10
        assert time.monotonic() - started < 3  # generous: they took 5 s each before
        t0 = time.monotonic()
        resp = await e.client.get("/readyz")
        assert resp.status == 200 and time.monotonic() - t0 < 1
        t0 = time.monotonic()
        fresh = report(e.pki.device("dev-new"), device_id="dev-new", apps=[])
        resp = await e.client.post("/v1/attestations", data=fresh, headers=JOSE)
        assert resp.status == 503 and time.monotonic() - t0 < 4
        assert resp.headers["Retry-After"]
    finally:
        locker.kill()
        locker.wait()
        await e.client.close()
        await e.store.close()

