"""ActiveSync device identity end to end (issue 12) and in-flight requests under every
re-evaluation (issue 13).

Two phones of one employee: the compliant one, enrolled with a device certificate
(SAN ``urn:mailward:device:PHONE1`` and her address), and a TikTok phone that borrows
PHONE1's DeviceId. Clients are ``pyactivesync`` (given the certificate through its
``requests`` session) and raw TLS clients (hand-written HTTP/1.1 over
``asyncio.open_connection``), against the fake EAS upstream of ``test_activesync``; the
gate, posture store, audit log and API are the real ones.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pyactivesync
import pytest
import requests
import trustme
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from pki_helpers import TIKTOK, USER, Signer, TestPki
from test_activesync import (
    EAS,
    PASSWORD,
    ROOT,
    Env,
    RecordingAudit,
    Upstream,
    _start_upstream,
    auth,
    autodiscover_request,
)

from proxy.api import make_app
from proxy.config import ListenerConfig, load_policy
from proxy.frontends import FrontendContext
from proxy.frontends.activesync import start
from proxy.gate import Gate
from proxy.net.tls import server_context
from proxy.posture.sqlite import SqlitePostureStore

pytestmark = pytest.mark.conversation

BOB = "bob@corp.example"
Mode = Literal["none", "optional", "required"]


class Phones:
    """Certificates of the phones in these tests, as PEM files."""

    def __init__(self, pki: TestPki, directory: Path) -> None:
        self.pki, self.dir = pki, directory

    def cert(self, device_id: str, user: str = USER) -> tuple[str, str]:
        signer: Signer = self.pki.device(device_id, user)
        cert, key = self.dir / f"{device_id}.crt", self.dir / f"{device_id}.key"
        cert.write_bytes(signer.cert.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(signer.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return str(cert), str(key)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def make_env(tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
                   ) -> AsyncIterator[Callable[..., Awaitable[tuple[Env, Phones]]]]:
    """Start mailward with an ActiveSync listener whose TLS context asks for device
    certificates (built by ``proxy.net.tls.server_context``, as the server does)."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(client_cert: Mode = "optional", eas_claims: Literal["allow", "deny"] = "allow"
                   ) -> tuple[Env, Phones]:
        upstream = Upstream()
        up_runner, up_port = await _start_upstream(ca, upstream)
        pki = TestPki()
        phones = Phones(pki, tmp_path)
        device_ca, _ = pki.write_files(tmp_path / "trust")
        server_pem = ca.issue_cert("127.0.0.1", "localhost")
        server_pem.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
        server_pem.private_key_pem.write_to_path(str(tmp_path / "server.key"))
        server_tls = server_context(tmp_path / "server.crt", tmp_path / "server.key",
                                    client_ca=device_ca, client_cert=client_cert)
        up_tls = ssl.create_default_context()
        ca.configure_trust(up_tls)
        store = SqlitePostureStore(tmp_path / "posture.db")
        audit = RecordingAudit(tmp_path / "audit.jsonl", signing_key=None)
        audit.records = []
        policy = [load_policy(ROOT / "config" / "policy.toml")]
        gate = Gate(store=store, audit=audit, policy=lambda: policy[0])
        await gate.load_trust()
        listener = ListenerConfig(
            name="eas", protocol="activesync", host="127.0.0.1", port=0,
            upstream=f"https://127.0.0.1:{up_port}", client_cert=client_cert,
            eas_claims=eas_claims, upstream_connect_timeout_s=2, upstream_timeout_s=5)
        proxy = await start(FrontendContext(listener, gate, server_tls, up_tls))
        api = TestClient(TestServer(make_app(gate=gate, store=store, verifier=pki.verifier(),
                                             policy=lambda: policy[0], audit=audit)))
        await api.start_server()
        client_ssl = ssl.create_default_context()
        ca.configure_trust(client_ssl)
        ca_path = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))

        async def cleanup() -> None:
            await proxy.close(0.5)
            await api.close()
            await up_runner.cleanup()
            await store.close()
            await audit.close()

        cleanups.append(cleanup)
        env = Env(upstream, proxy, pki, gate, store, audit, policy, client_ssl, ca_path, api,
                  audit.records)
        return env, phones

    yield make
    for cleanup in cleanups:
        await cleanup()


def pyclient(env: Env, device_id: str, cert: tuple[str, str] | None = None,
             user: str = USER) -> pyactivesync.Client:
    """pyactivesync, presenting ``cert`` (PEM files) when given."""
    client = pyactivesync.Client(f"127.0.0.1:{env.proxy.port}", user, PASSWORD,
                                 device_id=device_id, device_type="iPhone",
                                 verify_ssl=str(env.ca_path), timeout=30)  # type: ignore[arg-type]
    if cert is not None:
        client._transport.session.cert = cert
    return client


async def folders(env: Env, device_id: str, cert: tuple[str, str] | None = None,
                  user: str = USER) -> int:
    """The HTTP status pyactivesync gets listing folders (provisioning first)."""

    def run() -> int:
        with pyclient(env, device_id, cert, user) as c:
            try:
                c.list_folders()
            except requests.HTTPError as e:
                return int(e.response.status_code)
            return 200

    return await asyncio.to_thread(run)


def tls_client(env: Env, cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(env.ca_path))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


async def raw_post(env: Env, command: str, device_id: str, cert: tuple[str, str] | None,
                   user: str = USER) -> tuple[int, bytes]:
    """One hand-written POST over a raw TLS connection: (status, whole answer)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.proxy.port, ssl=tls_client(env, cert), server_hostname="localhost")
    try:
        writer.write(
            f"POST {EAS}?Cmd={command}&User={user}&DeviceId={device_id}&DeviceType=iPhone "
            f"HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth(user)}\r\n"
            "MS-ASProtocolVersion: 14.1\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


def decisions(env: Env, device_id: str) -> list[dict[str, Any]]:
    return env.decisions(device_id)


def last_reason(env: Env, device_id: str) -> str:
    return str(decisions(env, device_id)[-1]["reasons"][0]["code"])


async def parked_ping(env: Env, device_id: str, cert: tuple[str, str] | None
                      ) -> asyncio.Task[tuple[int, bytes]]:
    """A Ping held open by the upstream, once it is parked there."""
    env.upstream.ping_delay = 60
    before = len(env.upstream.posts("Ping"))
    task = asyncio.ensure_future(raw_post(env, "Ping", device_id, cert))
    for _ in range(200):
        await asyncio.sleep(0.025)
        if len(env.upstream.posts("Ping")) > before:
            return task
    raise AssertionError("the Ping never reached the upstream")


async def answered_within(task: asyncio.Task[tuple[int, bytes]], trigger: Awaitable[Any]
                          ) -> tuple[int, float]:
    started = time.monotonic()
    await trigger
    status, _ = await asyncio.wait_for(task, 10)
    return status, time.monotonic() - started


# --------------------------------------------------------------- the attacks


async def test_borrowed_device_id_without_certificate_after_the_phone_used_it(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """Once PHONE1 used its certificate, a bare claim of DeviceId PHONE1 (the TikTok
    phone, no certificate) is 403 ``certificate_required``; records name the source."""
    env, phones = await make_env()
    await env.attest("PHONE1", [])
    assert await folders(env, "PHONE1", phones.cert("PHONE1")) == 200
    assert await folders(env, "PHONE1") == 403
    first, last = decisions(env, "PHONE1")[0], decisions(env, "PHONE1")[-1]
    assert (first["decision"], first["device_source"]) == ("allow", "client_cert")
    assert (last["decision"], last["device_source"]) == ("deny", "claim")
    assert last_reason(env, "PHONE1") == "certificate_required"
    # The real phone keeps working (its cached decision is keyed by its certificate).
    assert await folders(env, "PHONE1", phones.cert("PHONE1")) == 200


async def test_bare_claim_session_ends_when_the_phone_binds(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """A bare-claim session of PHONE1 opened before the real phone's first certificate
    request is ended (its open Ping 403 within 2 s) when that request binds PHONE1."""
    env, phones = await make_env()
    await env.attest("PHONE1", [])
    ping = await parked_ping(env, "PHONE1", None)
    status, elapsed = await answered_within(
        ping, folders(env, "PHONE1", phones.cert("PHONE1")))
    assert status == 403 and elapsed < 2.0
    assert (await raw_post(env, "Sync", "PHONE1", None))[0] == 403
    assert last_reason(env, "PHONE1") == "certificate_required"


async def test_borrowed_device_id_with_the_tiktok_phones_own_certificate(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """The TikTok phone's own certificate with PHONE1's DeviceId: 403 ``device_mismatch``."""
    env, phones = await make_env()
    await env.attest("PHONE1", [])
    status, answer = await raw_post(env, "Sync", "PHONE1", phones.cert("TIKPHONE"))
    assert status == 403 and b"X-MS-ASThrottle: ExternalCompliance" in answer
    assert last_reason(env, "PHONE1") == "device_mismatch"
    assert env.upstream.posts() == []


async def test_another_users_certificate(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """Bob's phone certificate used by alice (its DeviceId too): 403 ``user_mismatch``."""
    env, phones = await make_env()
    await env.attest("BOBPHONE", [], user=BOB)
    assert await folders(env, "BOBPHONE", phones.cert("BOBPHONE", BOB)) == 403
    assert last_reason(env, "BOBPHONE") == "user_mismatch"
    assert await folders(env, "BOBPHONE", phones.cert("BOBPHONE", BOB), user=BOB) == 200


async def test_required_certificate_missing(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """``client_cert = "required"``: no certificate is a 403 ``certificate_required``
    (recorded; the upstream never sees the password), OPTIONS included; with it, 200."""
    env, phones = await make_env(client_cert="required")
    await env.attest("PHONE1", [])
    assert await folders(env, "PHONE1") == 403
    assert last_reason(env, "PHONE1") == "certificate_required"
    assert env.upstream.seen == []
    assert await folders(env, "PHONE1", phones.cert("PHONE1")) == 200


async def test_required_certificate_missing_autodiscover(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """``client_cert = "required"``: Autodiscover without a certificate is 403 and the
    upstream never sees the password (no password oracle); with one, it is answered."""
    env, phones = await make_env(client_cert="required")
    body = autodiscover_request(USER)

    async def post(cert: tuple[str, str] | None) -> int:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", env.proxy.port, ssl=tls_client(env, cert),
            server_hostname="localhost")
        try:
            writer.write(
                "POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: localhost\r\n"
                f"Authorization: {auth()}\r\nContent-Type: text/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            answer = await reader.read()
        finally:
            writer.close()
        return int(answer.split(b" ", 2)[1])

    assert await post(None) == 403
    assert env.upstream.seen == []
    assert await post(phones.cert("PHONE1")) == 200
    assert [s.raw_path for s in env.upstream.seen] == ["/autodiscover/autodiscover.xml"]


async def test_bare_claims_refused_with_eas_claims_deny(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """``eas_claims = "deny"``: a DeviceId without a certificate is 403
    ``device_claim_refused``; the enrolled phone gets in."""
    env, phones = await make_env(eas_claims="deny")
    await env.attest("PHONE2", [])
    assert (await raw_post(env, "Sync", "PHONE2", None))[0] == 403
    assert last_reason(env, "PHONE2") == "device_claim_refused"
    assert (await raw_post(env, "Sync", "PHONE2", phones.cert("PHONE2")))[0] == 200
    assert decisions(env, "PHONE2")[-1]["device_source"] == "client_cert"


async def test_unbind_clears_the_binding(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """``device unbind`` (the gate call the CLI makes) lets bare claims of the device
    in again, and the next certificate request binds it again."""
    env, phones = await make_env()
    await env.attest("PHONE1", [])
    assert (await raw_post(env, "Sync", "PHONE1", phones.cert("PHONE1")))[0] == 200
    assert (await raw_post(env, "Sync", "PHONE1", None))[0] == 403
    await env.gate.unbind("PHONE1", actor="admin", via="cli")
    assert (await raw_post(env, "Sync", "PHONE1", None))[0] == 200
    assert any(r.get("event") == "device_unbound" for r in env.records)


async def test_revoked_device_open_ping_ends_within_2s(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """Revoking the enrolled phone ends its open Ping (held by the upstream) with 403
    within 2 s; its next request is refused ``revoked``."""
    env, phones = await make_env()
    await env.attest("PHONE1", [])
    cert = phones.cert("PHONE1")
    ping = await parked_ping(env, "PHONE1", cert)
    status, elapsed = await answered_within(
        ping, env.gate.revoke("PHONE1", why="lost", actor="admin", via="cli"))
    assert status == 403 and elapsed < 2.0
    assert (await raw_post(env, "Sync", "PHONE1", cert))[0] == 403
    assert last_reason(env, "PHONE1") == "revoked"


# ----------------------------------------------- in-flight requests (issue 13)


async def test_ping_open_across_a_policy_reload_ends_on_a_tiktok_report(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """A Ping open before a policy version change, whose device-session the next request
    replaces, still ends 403 within 2 s once the device's TikTok report is accepted."""
    env, _ = await make_env()
    await env.attest("PHONE3", [])
    ping = await parked_ping(env, "PHONE3", None)
    env.policy[0] = replace(env.policy[0], version="v-reloaded")
    assert await env.gate.policy_changed() == 0  # still compliant: nothing ends
    assert (await raw_post(env, "Sync", "PHONE3", None))[0] == 200  # decides again
    status, elapsed = await answered_within(ping, env.attest("PHONE3", [TIKTOK]))
    assert status == 403 and elapsed < 2.0
    await env.gate.settle()  # the API answers before the re-checks have written their records
    ends = [r["detail"] for r in env.records if r.get("reason") == "eas_session"]
    assert ends == ["policy_changed requests=1", "terminated requests=1"]


async def test_decision_racing_a_tiktok_report_does_not_stick(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A TikTok report accepted while the first request's decision reads the old
    posture ends the new device-session: that request may still be answered on the
    posture it read (it began before the report; when the re-check lands while it is
    forwarded, its answer becomes 403), but its allow does not stick: once the API's
    background re-check has run, the next request is 403 and never reaches the
    upstream."""
    env, _ = await make_env()
    await env.attest("PHONE4", [])
    read = env.gate._postures
    reported = asyncio.Event()

    async def slow_read(device_id: str) -> Any:
        postures = await read(device_id)
        if device_id == "PHONE4" and not reported.is_set():
            reported.set()
            await env.attest("PHONE4", [TIKTOK])  # lands between the read and the cache
        return postures

    monkeypatch.setattr(env.gate, "_postures", slow_read)
    first = (await raw_post(env, "Sync", "PHONE4", None))[0]
    assert first in (200, 403)  # 403 when the re-check ended it mid-forward
    await env.gate.settle()
    forwarded = len(env.upstream.posts("Sync"))
    assert forwarded <= 1
    assert (await raw_post(env, "Sync", "PHONE4", None))[0] == 403
    assert len(env.upstream.posts("Sync")) == forwarded  # the second never goes upstream
