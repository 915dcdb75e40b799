"""The ActiveSync front end against a real aiohttp upstream over TLS.

Clients: ``pyactivesync`` (a third-party EAS client library, driven in a thread since
it is synchronous) and hand-built aiohttp requests in both query forms. The upstream
records the exact bytes and headers it receives. The gate, SQLite posture store,
audit log, verifier and API are the real ones; reports are signed with ``proxy.pki``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pyactivesync
import pytest
import requests
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from pki_helpers import TIKTOK, USER, TestPki, report
from pyactivesync._wbxml import WBXMLReader, WBXMLWriter, find, text_of, wtag
from yarl import URL

from proxy.api import make_app
from proxy.audit import AuditLog
from proxy.config import ListenerConfig, load_policy
from proxy.frontends import FrontendContext
from proxy.frontends.activesync import (
    RunningActiveSync,
    basic_user,
    blocked_response,
    resolve_user,
    start,
    status_wbxml,
)
from proxy.frontends.eas_query import encode_binary, parse_query
from proxy.gate import Gate
from proxy.policy import Policy
from proxy.posture.sqlite import SqlitePostureStore

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse"
EAS = "/Microsoft-Server-ActiveSync"
PUBLIC_URL = "https://mail.corp.example"
LONGPOLL_S = float(os.environ.get("MAILWARD_TEST_LONGPOLL_S", "3"))


def auth(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------- upstream


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Upstream:
    """A tiny EAS server: checks Basic credentials, answers Provision, FolderSync, Sync,
    Ping (after ``ping_delay``), SendMail and a streamed ItemOperations."""

    seen: list[Seen] = field(default_factory=list)
    ping_delay: float = 0.1
    first_chunk_read: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    streamed: bytes = b""
    drop: set[str] = field(default_factory=set)  # commands answered by closing, once
    base: str = ""  # https://127.0.0.1:<port>, the upstream's own address
    autodiscover_answer: bytes | None = None  # answered verbatim to autodiscover.xml

    def posts(self, command: str | None = None) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and (
            command is None or parse_query(URL(s.raw_path, encoded=True).raw_query_string
                                           ).command == command)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.raw_query_string
        command = parse_query(query).command if request.method == "POST" else ""
        if command == "SmartForward":  # read the first chunk, signal, then the rest
            first = await request.content.readany()
            self.first_chunk_read.set()
            body = first + await request.content.read()
        else:
            body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers),
                              body))
        if command in self.drop:  # act as if the keep-alive connection had died
            self.drop.discard(command)
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if request.headers.get("Authorization") != auth() and \
                request.headers.get("Authorization") != auth("bob@corp.example"):
            return web.Response(status=401, text="Unauthorized",
                                headers={"WWW-Authenticate": 'Basic realm="upstream"'})
        if request.method == "OPTIONS":
            return web.Response(headers={"MS-ASProtocolVersions": "14.0,14.1,16.0,16.1",
                                         "MS-ASProtocolCommands": "Sync,FolderSync,Ping"})
        wbxml = {"Content-Type": "application/vnd.ms-sync.wbxml"}
        if command == "Provision":
            w = WBXMLWriter().tag("Provision", "Provision", children=[
                wtag("Provision", "Status", text="1"),
                wtag("Provision", "Policies", children=[wtag("Provision", "Policy", children=[
                    wtag("Provision", "PolicyType", text="MS-EAS-Provisioning-WBXML"),
                    wtag("Provision", "Status", text="1"),
                    wtag("Provision", "PolicyKey", text="1307"),
                ])]),
            ])
            return web.Response(body=w.render(), headers=wbxml)
        if command == "FolderSync":
            w = WBXMLWriter().tag("FolderHierarchy", "FolderSync", children=[
                wtag("FolderHierarchy", "Status", text="1"),
                wtag("FolderHierarchy", "SyncKey", text="1"),
                wtag("FolderHierarchy", "Changes", children=[
                    wtag("FolderHierarchy", "Count", text="1"),
                    wtag("FolderHierarchy", "Add", children=[
                        wtag("FolderHierarchy", "ServerId", text="5"),
                        wtag("FolderHierarchy", "ParentId", text="0"),
                        wtag("FolderHierarchy", "DisplayName", text="Inbox"),
                        wtag("FolderHierarchy", "Type", text="2"),
                    ]),
                ]),
            ])
            return web.Response(body=w.render(), headers=wbxml)
        if command == "Sync":
            w = WBXMLWriter().tag("AirSync", "Sync", children=[
                wtag("AirSync", "Collections", children=[wtag("AirSync", "Collection", children=[
                    wtag("AirSync", "SyncKey", text="2"),
                    wtag("AirSync", "CollectionId", text="5"),
                    wtag("AirSync", "Status", text="1"),
                ])]),
            ])
            return web.Response(body=w.render(), headers=wbxml)
        if command == "Ping":
            await asyncio.sleep(self.ping_delay)
            w = WBXMLWriter().tag("Ping", "Ping", children=[wtag("Ping", "Status", text="1")])
            return web.Response(body=w.render(), headers=wbxml)
        if command == "ItemOperations":  # first chunk, wait, the rest: proves streaming
            resp = web.StreamResponse(headers={**wbxml, "X-Upstream": "yes"})
            resp.content_length = len(self.streamed)
            await resp.prepare(request)
            await resp.write(self.streamed[:1000])
            await self.release.wait()
            await resp.write(self.streamed[1000:])
            await resp.write_eof()
            return resp
        return web.Response(status=200, headers={"X-Received-Sha256":
                                                 hashlib.sha256(body).hexdigest()})


    async def autodiscover(self, request: web.Request) -> web.Response:
        """Autodiscover as MS-ASCMD 4.2 shows it (the XML form, Basic auth required)
        and Exchange Online's anonymous JSON v1.0 form."""
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers),
                              body))
        if ".json" in request.path.lower():
            return self._autodiscover_json(request)
        if request.headers.get("Authorization") != auth():
            return web.Response(status=401, text="Unauthorized",
                                headers={"WWW-Authenticate": 'Basic realm="upstream"'})
        if self.autodiscover_answer is not None:
            return web.Response(body=self.autodiscover_answer, content_type="text/xml")
        address = body.split(b"<EMailAddress>")[1].split(b"</EMailAddress>")[0].decode()
        return web.Response(body=autodiscover_response(self.base, address),
                            content_type="text/xml", charset="utf-8")

    def _autodiscover_json(self, request: web.Request) -> web.Response:
        urls = {"activesync": "/Microsoft-Server-ActiveSync",
                "autodiscoverv1": "/autodiscover/autodiscover.xml",
                "ews": "/EWS/Exchange.asmx"}
        protocol = request.query.get("Protocol", "")
        if protocol.lower() not in urls:
            return web.json_response({"ErrorCode": "InvalidProtocol",
                                      "ErrorMessage": f"The given protocol value "
                                                      f"'{protocol}' is invalid."}, status=400)
        return web.json_response({"Protocol": protocol,
                                  "Url": self.base + urls[protocol.lower()]})


def autodiscover_request(address: str) -> bytes:
    """An Autodiscover request as in MS-ASCMD 4.2.1."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\r\n'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/'
        'mobilesync/requestschema/2006">\r\n  <Request>\r\n'
        f'    <EMailAddress>{address}</EMailAddress>\r\n'
        '    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/'
        'mobilesync/responseschema/2006</AcceptableResponseSchema>\r\n'
        '  </Request>\r\n</Autodiscover>\r\n').encode()


def autodiscover_response(base: str, address: str, mobilesync: str = "") -> bytes:
    """The answer of MS-ASCMD 4.2.4 (server settings: MobileSync and CertEnroll), the
    server names being ``base`` (``mobilesync`` for the MobileSync entry if given)."""
    eas = (mobilesync or base) + "/Microsoft-Server-ActiveSync"
    return (
        '<?xml version="1.0" encoding="utf-8"?>\r\n'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/'
        'responseschema/2006">\r\n'
        '  <Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/'
        'mobilesync/responseschema/2006">\r\n'
        '    <Culture>en:us</Culture>\r\n'
        '    <User>\r\n      <DisplayName>Chris Gray</DisplayName>\r\n'
        f'      <EMailAddress>{address}</EMailAddress>\r\n    </User>\r\n'
        '    <Action>\r\n      <Settings>\r\n'
        '        <Server>\r\n          <Type>MobileSync</Type>\r\n'
        f'          <Url>{eas}</Url>\r\n'
        f'          <Name>{eas}</Name>\r\n'
        '        </Server>\r\n'
        '        <Server>\r\n          <Type>CertEnroll</Type>\r\n'
        f'          <Url>{base}/CertEnroll</Url>\r\n'
        '          <Name />\r\n'
        '          <ServerData>CertEnrollTemplate</ServerData>\r\n'
        '        </Server>\r\n'
        '      </Settings>\r\n    </Action>\r\n'
        '  </Response>\r\n</Autodiscover>\r\n').encode()


# ------------------------------------------------------------------------ env


@dataclass
class Env:
    upstream: Upstream
    proxy: RunningActiveSync
    pki: TestPki
    gate: Gate
    store: SqlitePostureStore
    audit: AuditLog
    policy: list[Policy]
    client_ssl: ssl.SSLContext
    ca_path: Path
    api: TestClient
    records: list[dict[str, Any]]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.proxy.port}{EAS}"

    async def attest(self, device_id: str, apps: list[str], user: str = USER) -> None:
        resp = await self.api.post(
            "/v1/attestations", data=report(self.pki.device(device_id, user),
                                            device_id=device_id, user=user, apps=apps),
            headers={"Content-Type": "application/jose"})
        assert resp.status == 201, await resp.text()

    def decisions(self, device_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == "decision"
                and r.get("device_id") == device_id]

    async def post(self, query: str, body: Any = b"", *, headers: dict[str, str] | None = None,
                   **kw: Any) -> aiohttp.ClientResponse:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.client_ssl)
                                         ) as s:
            h = {"Authorization": auth(), "MS-ASProtocolVersion": "14.1",
                 "Content-Type": "application/vnd.ms-sync.wbxml", **(headers or {})}
            resp = await s.post(URL(f"{self.url}?{query}", encoded=True), data=body,
                                headers=h, **kw)
            await resp.read()
            return resp


class RecordingAudit(AuditLog):
    """The real audit log, remembering what it wrote for assertions."""

    records: list[dict[str, Any]]

    async def write(self, fields: Any) -> dict[str, Any]:
        rec = await super().write(fields)
        self.records.append(rec)
        return rec


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def _start_upstream(ca: trustme.CA, up: Upstream) -> tuple[web.AppRunner, int]:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", EAS, up.handle)
    for prefix in ("/autodiscover/", "/Autodiscover/"):
        app.router.add_route("*", prefix + "{rest:.*}", up.autodiscover)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=0.5)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _start_proxy(ca: trustme.CA, gate: Gate, upstream: str,
                       longpoll_s: float = 60.0, public_url: str | None = PUBLIC_URL
                       ) -> RunningActiveSync:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    up_ctx = ssl.create_default_context()
    ca.configure_trust(up_ctx)
    listener = ListenerConfig(name="eas", protocol="activesync", host="127.0.0.1", port=0,
                              upstream=upstream, longpoll_timeout_s=longpoll_s,
                              upstream_connect_timeout_s=2, upstream_timeout_s=5,
                              public_url=public_url)
    return await start(FrontendContext(listener, gate, server_ctx, up_ctx))


@pytest.fixture
async def env(tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[Env]:
    # requests lets these variables override a session's own CA bundle.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    upstream = Upstream()
    up_runner, up_port = await _start_upstream(ca, upstream)
    upstream.base = f"https://127.0.0.1:{up_port}"
    pki = TestPki()
    store = SqlitePostureStore(tmp_path / "posture.db")
    audit = RecordingAudit(tmp_path / "audit.jsonl", signing_key=None)
    audit.records = []
    policy = [load_policy(ROOT / "config" / "policy.toml")]
    gate = Gate(store=store, audit=audit, policy=lambda: policy[0])
    proxy = await _start_proxy(ca, gate, f"https://127.0.0.1:{up_port}", 60.0)
    api = TestClient(TestServer(make_app(gate=gate, store=store, verifier=pki.verifier(),
                                         policy=lambda: policy[0], audit=audit)))
    await api.start_server()
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    e = Env(upstream, proxy, pki, gate, store, audit, policy, client_ssl, ca_path, api,
            audit.records)
    try:
        yield e
    finally:
        await proxy.close(0.5)
        await api.close()
        await up_runner.cleanup()
        await store.close()
        await audit.close()


def pyclient(env: Env, device_id: str, user: str = USER) -> pyactivesync.Client:
    return pyactivesync.Client(f"127.0.0.1:{env.proxy.port}", user, PASSWORD,
                               device_id=device_id, device_type="iPhone",
                               verify_ssl=str(env.ca_path), timeout=30)  # type: ignore[arg-type]


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


# ------------------------------------------------------- a real client library


async def test_pyactivesync_compliant_device_syncs(env: Env) -> None:
    """pyactivesync provisions, lists folders, syncs and pings through mailward; one
    decision record covers all of it."""
    await env.attest("dev-ok", ["com.example.mail"])

    def run() -> tuple[Any, Any, Any]:
        with pyclient(env, "dev-ok") as c:
            folders = c.list_folders()
            synced = c.sync_folder("5")
            pinged = c.ping("5", heartbeat=60)
            return folders, synced, pinged

    folders, synced, pinged = await in_thread(run)
    assert [f.name for f in folders] == ["Inbox"]
    assert synced.sync_key == "2"
    assert pinged.status == "1"
    assert [len(env.upstream.posts(c)) for c in ("Provision", "FolderSync", "Sync", "Ping")] \
        == [2, 1, 1, 1]
    # The policy key the client learnt passes through in its header.
    assert env.upstream.posts("FolderSync")[0].headers["X-MS-PolicyKey"] == "1307"
    assert [s.method for s in env.upstream.seen].count("OPTIONS") == 1  # one credential check
    [decision] = env.decisions("dev-ok")
    assert (decision["decision"], decision["protocol"], decision["user"]) == (
        "allow", "activesync", USER)
    session = env.proxy.frontend.sessions.by_key[("dev-ok", USER, "")]
    assert session.requests == 5


async def test_pyactivesync_tiktok_device_gets_403(env: Env) -> None:
    """A TikTok device: 403, EAS status 129 in WBXML, the text naming TikTok; nothing
    but the credential check reaches the upstream."""
    await env.attest("dev-tt", [TIKTOK])

    def run() -> requests.Response:
        with pyclient(env, "dev-tt") as c, pytest.raises(requests.HTTPError) as info:
            c.list_folders()
        return info.value.response

    resp = await in_thread(run)
    assert resp.status_code == 403
    assert "TikTok" in resp.headers["X-Mailward-Refusal"]
    assert resp.headers["X-MS-ASThrottle"] == "ExternalCompliance"
    assert text_of(find(WBXMLReader(resp.content).parse(), "Provision.Status")) == "129"
    assert env.upstream.posts() == []
    [decision] = env.decisions("dev-tt")
    assert decision["decision"] == "deny"
    assert decision["reasons"][0]["app_name"] == "TikTok"


# ------------------------------------------------------ hand-built requests


async def test_plain_form_exact_bytes_and_headers(env: Env) -> None:
    """The upstream receives the body byte for byte and every end-to-end header; hop-by-
    hop headers are dropped and X-Forwarded-For is added."""
    await env.attest("dev-ok", [])
    body = os.urandom(300_000)
    query = f"Cmd=SendMail&User={USER.replace('@', '%40')}&DeviceId=dev-ok&DeviceType=iPhone"
    sent = {
        "MS-ASProtocolVersion": "16.1", "X-MS-PolicyKey": "1307",
        "MS-ASAcceptMultiPart": "T", "User-Agent": "Apple-iPhone/1402.1",
        "Content-Type": "message/rfc822", "Accept-Language": "en-us",
        "Connection": "keep-alive, X-Hop", "X-Hop": "secret", "TE": "trailers",
    }
    resp = await env.post(query, body, headers=sent)
    assert resp.status == 200
    assert resp.headers["X-Received-Sha256"] == hashlib.sha256(body).hexdigest()
    [seen] = env.upstream.posts("SendMail")
    assert seen.body == body
    assert seen.raw_path == f"{EAS}?{query}"
    for name in ("MS-ASProtocolVersion", "X-MS-PolicyKey", "MS-ASAcceptMultiPart",
                 "User-Agent", "Content-Type", "Accept-Language", "Authorization"):
        assert seen.headers.getall(name) == [sent.get(name, auth())], name
    assert seen.headers["Content-Length"] == str(len(body))
    assert "X-Hop" not in seen.headers and "TE" not in seen.headers
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["X-Forwarded-Proto"] == "https"


async def test_base64_form_is_understood_and_passed_verbatim(env: Env) -> None:
    """A base64 query (binary GUID device id) is decided on and forwarded unchanged."""
    guid = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    await env.attest(guid.hex().upper(), [])
    query = encode_binary(command="Sync", device_id=guid, device_type="Android",
                          protocol_version="14.1", policy_key=1307, user=USER)
    resp = await env.post(query.replace("+", "%2B").replace("/", "%2F"), b"\x03\x01\x6a\x00")
    assert resp.status == 200
    [seen] = env.upstream.posts("Sync")
    assert seen.raw_path.endswith(query.replace("+", "%2B").replace("/", "%2F"))
    assert env.decisions(guid.hex().upper())[0]["decision"] == "allow"


async def test_base64_form_tiktok_device_refused(env: Env) -> None:
    """The same device refusal holds for base64-form requests."""
    await env.attest("ANDROIDC0FFEE", [TIKTOK])
    query = encode_binary(command="FolderSync", device_id="ANDROIDC0FFEE",
                          device_type="Android", protocol_version="16.1")
    resp = await env.post(query, b"")
    assert resp.status == 403
    assert "TikTok" in resp.headers["X-Mailward-Refusal"]


async def test_request_and_response_bodies_stream(env: Env) -> None:
    """Neither direction buffers a whole body: the upstream reads the first request
    chunk before the client sends the rest, and the client reads the first response
    chunk before the upstream sends the rest."""
    await env.attest("dev-ok", [])
    q = f"User={USER}&DeviceId=dev-ok&DeviceType=x&Cmd="
    sent_rest = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await asyncio.wait_for(env.upstream.first_chunk_read.wait(), 5)
        sent_rest.set()
        yield b"b" * 1000

    resp = await env.post(q + "SmartForward&ItemId=1&CollectionId=5", body())
    assert resp.status == 200 and sent_rest.is_set()
    assert env.upstream.posts("SmartForward")[0].body == b"a" * 1000 + b"b" * 1000

    env.upstream.streamed = os.urandom(200_000)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=env.client_ssl)) as s:
        r = await s.post(URL(f"{env.url}?{q}ItemOperations", encoded=True), data=b"",
                         headers={"Authorization": auth()})
        assert r.status == 200 and r.headers["X-Upstream"] == "yes"
        first = await asyncio.wait_for(r.content.readexactly(1000), 5)
        assert first == env.upstream.streamed[:1000]
        env.upstream.release.set()
        assert first + await r.content.read() == env.upstream.streamed


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("Cmd=Sync&User=u&DeviceType=x", 400),  # no device id
        ("Cmd=Sync&DeviceId=a%20b", 400),
        ("!!notbase64!!", 400),
        (encode_binary(command="Sync", device_id="D", device_type="x")[:-6], 400),
    ],
)
async def test_bad_queries_are_400(env: Env, query: str, status: int) -> None:
    """Bad or incomplete queries are refused with 400, never reaching the upstream."""
    resp = await env.post(query)
    assert resp.status == status
    assert env.upstream.seen == []


async def test_missing_basic_auth_is_401(env: Env) -> None:
    """No Basic credentials: 401 with a Basic challenge, nothing upstream."""
    resp = await env.post("Cmd=Sync&DeviceId=d&DeviceType=x",
                          headers={"Authorization": "Bearer abc"})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    assert env.upstream.seen == []


async def test_burst_of_first_requests_from_a_refused_device(env: Env) -> None:
    """A non-compliant phone opening with several requests at once: every one gets the
    403 (none a 500, none left hanging) and each refusal is its own decision record."""
    await env.attest("dev-bad", ["com.zhiliaoapp.musically"])
    q = "Cmd={}&User=alice%40corp.example&DeviceId=dev-bad&DeviceType=iPhone"
    responses = await asyncio.wait_for(asyncio.gather(
        *(env.post(q.format(cmd)) for cmd in ("FolderSync", "Ping", "Sync", "Sync"))), 10)
    assert [r.status for r in responses] == [403] * 4
    assert [d["decision"] for d in env.decisions("dev-bad")] == ["deny"] * 4
    assert env.proxy.frontend.sessions.admitting == {}


async def test_user_mismatch_is_403(env: Env) -> None:
    """A query User other than the Basic user is refused and recorded."""
    await env.attest("dev-ok", [])
    resp = await env.post("Cmd=Sync&User=mallory%40corp.example&DeviceId=dev-ok&DeviceType=x")
    assert resp.status == 403
    assert env.upstream.seen == []
    denies = [r for r in env.records if r.get("event") == "decision"]
    assert [r["decision"] for r in denies] == ["deny"]
    assert denies[0]["reasons"][0]["code"] == "user_mismatch"


async def test_wrong_password_passes_401_and_is_not_cached(env: Env) -> None:
    """The upstream's 401 reaches the client, is recorded as auth_failed, and the next
    request (right password) is checked and decided afresh."""
    await env.attest("dev-ok", [])
    q = f"Cmd=Sync&User={USER}&DeviceId=dev-ok&DeviceType=x"
    resp = await env.post(q, headers={"Authorization": auth(password="wrong")})
    assert resp.status == 401 and "upstream" in resp.headers["WWW-Authenticate"]
    [rec] = env.decisions("dev-ok")
    assert rec["reasons"][0]["code"] == "auth_failed"
    assert env.proxy.frontend.sessions.by_key == {}
    assert (await env.post(q)).status == 200
    assert [r["decision"] for r in env.decisions("dev-ok")] == ["deny", "allow"]


async def test_cached_session_dropped_when_upstream_says_401(env: Env) -> None:
    """A cached device-session whose credentials stop working is dropped."""
    await env.attest("dev-ok", [])
    q = f"Cmd=Sync&User={USER}&DeviceId=dev-ok&DeviceType=x"
    assert (await env.post(q)).status == 200
    assert (await env.post(q, headers={"Authorization": auth(password="nope")})).status == 401
    assert env.proxy.frontend.sessions.by_key == {}
    ends = [r for r in env.records if r.get("reason") == "eas_session"]
    assert ends and ends[-1]["detail"] == "auth_failed requests=2"


async def test_one_decision_per_device_session_and_policy_version(env: Env) -> None:
    """Many requests of one device cost one decision; a new policy version decides
    again; closing the listener records how many requests each decision covered."""
    await env.attest("dev-ok", [])
    q = f"Cmd=Sync&User={USER}&DeviceId=dev-ok&DeviceType=x"
    results = await asyncio.gather(*(env.post(q) for _ in range(5)))
    assert [r.status for r in results] == [200] * 5
    assert len(env.decisions("dev-ok")) == 1
    env.policy[0] = replace(env.policy[0], version="v-next")
    assert (await env.post(q)).status == 200
    decisions = env.decisions("dev-ok")
    assert [d["policy_version"] for d in decisions][-1] == "v-next" and len(decisions) == 2
    await env.proxy.close(0.1)
    ends = [r["detail"] for r in env.records if r.get("reason") == "eas_session"]
    assert ends == ["policy_changed requests=5", "listener_closed requests=1"]


async def test_options_discovery_passes_through(env: Env) -> None:
    """OPTIONS goes to the upstream without a decision and its headers come back."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=env.client_ssl)) as s, \
            s.options(env.url, headers={"Authorization": auth()}) as r:
        assert r.status == 200
        assert r.headers["MS-ASProtocolVersions"] == "14.0,14.1,16.0,16.1"
    assert env.records == []


async def test_longpoll_passes_through(env: Env) -> None:
    """A Ping that the upstream holds for several seconds comes back intact."""
    await env.attest("dev-ok", [])
    env.upstream.ping_delay = LONGPOLL_S
    started = time.monotonic()
    resp = await env.post(f"Cmd=Ping&User={USER}&DeviceId=dev-ok&DeviceType=x")
    assert resp.status == 200
    assert time.monotonic() - started >= LONGPOLL_S


async def _ended_within(env: Env, device: str, trigger: Callable[[], Awaitable[None]]
                        ) -> tuple[aiohttp.ClientResponse, bytes, float]:
    env.upstream.ping_delay = 60
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=env.client_ssl)) as s:
        poll = asyncio.ensure_future(s.post(
            URL(f"{env.url}?Cmd=Ping&User={USER}&DeviceId={device}&DeviceType=x", encoded=True),
            data=b"", headers={"Authorization": auth(), "MS-ASProtocolVersion": "14.1"}))
        for _ in range(100):  # wait until the Ping is parked at the upstream
            await asyncio.sleep(0.05)
            if env.upstream.posts("Ping"):
                break
        assert not poll.done()
        started = time.monotonic()
        await trigger()
        resp = await asyncio.wait_for(poll, 10)
        body = await resp.read()
        return resp, body, time.monotonic() - started


async def test_live_longpoll_ends_403_within_2s_on_noncompliant_posture(env: Env) -> None:
    """A parked Ping ends with 403 (status 129, TikTok named) within 2 s of a report
    showing TikTok arriving at the API."""
    await env.attest("dev-ok", [])
    resp, body, elapsed = await _ended_within(
        env, "dev-ok", lambda: env.attest("dev-ok", [TIKTOK]))
    assert resp.status == 403 and elapsed < 2.0
    assert "TikTok" in resp.headers["X-Mailward-Refusal"]
    assert text_of(find(WBXMLReader(body).parse(), "Ping.Status")) == "129"
    assert ("dev-ok", USER, "") not in env.proxy.frontend.sessions.by_key
    assert any(r.get("event") == "session_end" and r.get("reason") == "posture_changed"
               for r in env.records)
    # The next request is decided afresh, and refused.
    again = await env.post(f"Cmd=Sync&User={USER}&DeviceId=dev-ok&DeviceType=x")
    assert again.status == 403


async def test_live_longpoll_ends_on_policy_change(env: Env) -> None:
    """A policy change that now denies ends the parked Ping the same way."""
    await env.attest("dev-ok", ["com.example.chat"])
    rule = replace(env.policy[0].prohibited[0], name="Chat", ids=("com.example.chat",))
    stricter = replace(env.policy[0], version="v2", prohibited=(rule,))

    async def change() -> None:
        env.policy[0] = stricter
        await env.gate.policy_changed()

    resp, _, elapsed = await _ended_within(env, "dev-ok", change)
    assert resp.status == 403 and elapsed < 2.0
    assert "Chat" in resp.headers["X-Mailward-Refusal"]


async def test_upstream_down_is_503(tmp_path: Path, ca: trustme.CA) -> None:
    """No upstream: 503 with Retry-After, never a silent close."""
    store = SqlitePostureStore(tmp_path / "p.db")
    audit = AuditLog(tmp_path / "a.jsonl", signing_key=None)
    pol = load_policy(ROOT / "config" / "policy.toml")
    gate = Gate(store=store, audit=audit, policy=lambda: pol)
    proxy = await _start_proxy(ca, gate, "https://127.0.0.1:1")
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as s:
            url = f"https://127.0.0.1:{proxy.port}{EAS}?Cmd=Sync&DeviceId=d&DeviceType=x"
            async with s.post(URL(url, encoded=True), headers={"Authorization": auth()}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "30"
            async with s.options(f"https://127.0.0.1:{proxy.port}{EAS}") as r:
                assert r.status == 503
    finally:
        await proxy.close(0.1)
        await store.close()
        await audit.close()


# --------------------------------------------------------------- pure helpers


def test_status_wbxml_parses_with_a_third_party_reader() -> None:
    """Our 129 bodies decode with pyactivesync's WBXML reader to the command's Status."""
    for command, path in [("Sync", "AirSync.Status"), ("FolderSync", "FolderHierarchy.Status"),
                          ("Ping", "Ping.Status"), ("Provision", "Provision.Status"),
                          ("Settings", "Settings.Status"), ("MoveItems", "Move.Status"),
                          ("GetItemEstimate", "ItemEstimate.Status"),
                          ("ItemOperations", "ItemOperations.Status"),
                          ("FolderCreate", "FolderHierarchy.Status")]:
        body = status_wbxml(command, "129")
        assert body is not None
        assert text_of(find(WBXMLReader(body).parse(), path)) == "129", command
    assert status_wbxml("GetAttachment", "129") is None


def test_blocked_response_by_protocol_version() -> None:
    """14.0+ gets WBXML status 129; 12.1 (no common status codes) gets the text."""
    new = blocked_response("Sync", "14.1", "TikTök is installed.")
    assert new.status == 403 and new.content_type == "application/vnd.ms-sync.wbxml"
    assert new.headers["X-Mailward-Refusal"] == "TikT%C3%B6k is installed."
    old = blocked_response("Sync", "12.1", "TikTok is installed.")
    assert old.status == 403 and old.text == "TikTok is installed.\n"


@pytest.mark.parametrize(
    ("auth_user", "query_user", "expected"),
    [
        ("alice@corp.example", None, "alice@corp.example"),
        ("alice@corp.example", "ALICE@corp.example", "alice@corp.example"),
        ("CORP\\alice", "alice@corp.example", "alice@corp.example"),
        ("alice@corp.example", "alice", "alice@corp.example"),
        ("alice@corp.example", "bob@corp.example", None),
        ("alice@corp.example", "alice@evil.example", None),
        ("CORP\\bob", "alice", None),
    ],
)
def test_resolve_user(auth_user: str, query_user: str | None, expected: str | None) -> None:
    """The Basic user decides; the query User must name the same account."""
    assert resolve_user(auth_user, query_user) == expected


def test_basic_user() -> None:
    """Only well-formed Basic credentials yield a user."""
    assert basic_user(auth()) == USER
    assert basic_user("Bearer x") is None
    assert basic_user("Basic !!!") is None
    assert basic_user("Basic " + base64.b64encode(b"nocolon").decode()) is None
    assert basic_user(None) is None


# --------------------------------------------- small bodies: the lean upstream pool


async def test_small_body_exact_bytes_and_headers(env: Env) -> None:
    """A small known-length body (the lean pooled path) reaches the upstream byte for
    byte with the same header handling as a streamed one; a client's X-Forwarded-For
    and X-Forwarded-Proto are replaced by what mailward saw."""
    await env.attest("dev-ok", [])
    body = os.urandom(300)
    query = f"Cmd=SendMail&User={USER.replace('@', '%40')}&DeviceId=dev-ok&DeviceType=iPhone"
    sent = {
        "MS-ASProtocolVersion": "16.1", "X-MS-PolicyKey": "1307",
        "MS-ASAcceptMultiPart": "T", "User-Agent": "Apple-iPhone/1402.1",
        "Content-Type": "message/rfc822", "Connection": "keep-alive, X-Hop",
        "X-Hop": "secret", "TE": "trailers", "X-Forwarded-For": "198.51.100.7",
        "X-Forwarded-Proto": "http",
    }
    for _ in range(3):  # the second and third reuse the pooled upstream connection
        resp = await env.post(query, body, headers=sent)
        assert resp.status == 200
        assert resp.headers["X-Received-Sha256"] == hashlib.sha256(body).hexdigest()
    seen = env.upstream.posts("SendMail")[-1]
    assert seen.body == body and seen.raw_path == f"{EAS}?{query}"
    for name in ("MS-ASProtocolVersion", "X-MS-PolicyKey", "MS-ASAcceptMultiPart",
                 "User-Agent", "Content-Type", "Authorization"):
        assert seen.headers.getall(name) == [sent.get(name, auth())], name
    assert seen.headers["Content-Length"] == "300"
    assert "X-Hop" not in seen.headers and "TE" not in seen.headers
    assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.headers.getall("X-Forwarded-Proto") == ["https"]
    assert seen.headers["Host"] == f"127.0.0.1:{URL(env.proxy.frontend.cfg.upstream).port}"


async def test_message_is_never_resent_on_a_dead_keepalive_connection(env: Env) -> None:
    """When the upstream drops a reused connection without answering, a read-only
    command is resent on a fresh connection, but SendMail is not: the client gets a
    temporary error and the upstream saw the message exactly once."""
    await env.attest("dev-ok", [])
    q = "Cmd={}&User=alice%40corp.example&DeviceId=dev-ok&DeviceType=iPhone"
    assert (await env.post(q.format("Sync"))).status == 200  # warms a pooled connection
    env.upstream.drop.add("Ping")
    resp = await env.post(q.format("Ping"), b"ping")
    assert resp.status == 200
    assert len(env.upstream.posts("Ping")) == 2  # dropped once, resent once
    env.upstream.drop.add("SendMail")
    resp = await env.post(q.format("SendMail"), b"the message")
    assert resp.status in (502, 503)
    assert len(env.upstream.posts("SendMail")) == 1


class _RawUpstream(asyncio.Protocol):
    """Answers each request with the next canned answer; None closes the connection
    without answering."""

    answers: list[bytes | None]
    connections: int = 0

    def connection_made(self, transport: Any) -> None:
        type(self).connections += 1
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:  # the tests send bodiless requests
            self.buf = b""
            answer = self.answers.pop(0)
            if answer is None:
                self.t.close()
            else:
                self.t.write(answer)
                if b"Connection: close" in answer:
                    self.t.close()


async def _pool_exchange(pool: Any, answers: list[bytes | None]) -> list[tuple[int, bytes]]:
    from proxy.frontends.activesync import UpstreamClosedEarly, UpstreamConnection
    from proxy.frontends.activesync.wire import request_head

    out = []
    for _ in range(len([a for a in answers if a is not None])):
        conn: UpstreamConnection | None = pool.get_idle()
        while True:
            conn = conn or await pool.connect()
            conn.send(request_head(b"GET", b"/", [(b"Host", b"x")], 0), b"")
            try:
                head = await conn.read_head(5)
                break
            except UpstreamClosedEarly:
                assert conn.reused
                conn = None
        status, body = head.status, head.body or b""  # the body may come whole with its head
        while chunk := await conn.read_body(5):
            body += chunk
        pool.release(conn)
        out.append((status, body))
    return out


async def test_upstream_pool_framing_and_stale_connections() -> None:
    """The lean upstream connections read Content-Length, chunked (with extensions and
    trailers) and close-delimited bodies, skip interim 1xx answers, reuse keep-alive
    connections and replace one the upstream closed while it was pooled."""
    from proxy.frontends.activesync import UpstreamPool

    answers: list[bytes | None] = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        None,  # the pooled connection is closed: the next request goes on a fresh one
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
    ]

    class Up(_RawUpstream):
        pass

    Up.answers = answers
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(URL(f"http://127.0.0.1:{port}"), False, 2)
    try:
        got = await asyncio.wait_for(_pool_exchange(pool, list(answers)), 10)
        assert got == [(200, b"hello"), (200, b"abc" + b"x" * 16), (204, b""),
                       (200, b"until close")]
        assert Up.connections == 2  # one keep-alive connection, then the replacement
        assert pool.idle == []  # a close-delimited answer's connection is not pooled
    finally:
        pool.close()
        server.close()


async def test_upstream_reads_time_out_at_each_waits_own_deadline() -> None:
    """Each wait for the upstream times out after its own timeout, also on a reused
    connection whose one timer was armed for an earlier wait: a later deadline is
    waited for in full, an earlier one is not waited past; an answer in time is read."""
    from proxy.frontends.activesync import UpstreamPool
    from proxy.frontends.activesync.wire import request_head

    class Answers(asyncio.Protocol):  # answers "now" at once, then nothing ever
        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            if b"/now" in data:
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await asyncio.get_running_loop().create_server(Answers, "127.0.0.1", 0)
    pool = UpstreamPool(URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"),
                        False, 2)
    loop = asyncio.get_running_loop()
    try:
        conn = await pool.connect()
        for first_timeout, timeout in ((0.3, 0.6), (30.0, 0.3)):
            conn.send(request_head(b"GET", b"/now", [(b"Host", b"x")], 0), b"")
            assert (await conn.read_head(first_timeout)).body == b"ok"
            conn.send(request_head(b"GET", b"/never", [(b"Host", b"x")], 0), b"")
            started = loop.time()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.read_head(timeout), 10)
            waited = loop.time() - started
            assert timeout - 0.05 <= waited < timeout + 1.0, (first_timeout, timeout, waited)
            conn.abort()
            conn = await pool.connect()
        conn.abort()
    finally:
        pool.close()
        server.close()


async def test_an_answer_in_pieces_is_read_whole() -> None:
    """An answer of known length whose body arrives after its head comes without the
    body on the head; read_rest reads the pieces to the end and the connection is
    pooled again."""
    from proxy.frontends.activesync import UpstreamPool
    from proxy.frontends.activesync.wire import request_head

    class Slow(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, self.t.write, b" half")

    server = await asyncio.get_running_loop().create_server(Slow, "127.0.0.1", 0)
    pool = UpstreamPool(URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"),
                        False, 2)
    try:
        conn = await pool.connect()
        conn.send(request_head(b"GET", b"/", [(b"Host", b"x")], 0), b"")
        head = await conn.read_head(5)
        assert (head.status, head.length, head.body) == (200, 10, None)
        assert await conn.read_rest(5) == b"first half"
        pool.release(conn)
        assert pool.idle == [conn]
    finally:
        pool.close()
        server.close()


# ------------------------------------------------------------------------ slow


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


LONGPOLLS = 200
#: Bound on the proxy's resident memory growth per parked long-poll (plain HTTP on
#: both legs, uvloop, real gate, SQLite store and audit log; one device each).
KIB_PER_LONGPOLL = 32


@pytest.mark.slow
async def test_200_concurrent_longpolls_stay_within_memory_bound() -> None:
    """200 Pings parked at the upstream through one mailward process (the bench's
    set-up: ``bench/activesync.py`` roles) cost at most KIB_PER_LONGPOLL KiB of
    resident memory each, all stay open, and the process still answers a Sync."""
    import socket
    import subprocess
    import sys
    import tempfile

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    bench = str(ROOT / "bench" / "activesync.py")
    up_port, mw_port = free_port(), free_port()
    state = tempfile.mkdtemp(prefix="mailward-longpolls-")
    procs = [subprocess.Popen([sys.executable, bench, "upstream", str(up_port)])]
    procs.append(subprocess.Popen([sys.executable, bench, "mailward", str(mw_port),
                                   str(up_port), state, str(LONGPOLLS + 1)]))
    loop = asyncio.get_running_loop()

    def request(device: str, command: str) -> bytes:
        body = b"\x03\x01\x6a\x00"
        return (f"POST {EAS}?Cmd={command}&User={USER.replace('@', '%40')}"
                f"&DeviceId={device}&DeviceType=iPhone HTTP/1.1\r\nHost: t\r\n"
                f"Authorization: {auth(password='pw')}\r\nMS-ASProtocolVersion: 14.1\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.lost = False

        def data_received(self, data: bytes) -> None:
            self.data += data

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost = True

    try:
        for _ in range(300):
            try:
                t, _ = await loop.create_connection(Client, "127.0.0.1", mw_port)
                t.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        # warm up: the first request pays for imports, pools and the first decision
        wt, warm = await loop.create_connection(Client, "127.0.0.1", mw_port)
        wt.write(request(f"dev{LONGPOLLS}", "Sync"))
        for _ in range(100):
            if b"\r\n\r\n" in warm.data:
                break
            await asyncio.sleep(0.05)
        assert warm.data.startswith(b"HTTP/1.1 200"), warm.data[:200]
        await asyncio.sleep(0.5)
        before = _rss_kib(procs[1].pid)
        clients = []
        for i in range(LONGPOLLS):
            t, c = await loop.create_connection(Client, "127.0.0.1", mw_port)
            t.write(request(f"dev{i}", "Ping"))
            clients.append(c)
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.sleep(3)
        after = _rss_kib(procs[1].pid)
        assert [c for c in clients if c.data or c.lost] == []  # all still parked
        warm.data = b""
        wt.write(request(f"dev{LONGPOLLS}", "Sync"))  # the process still serves
        for _ in range(100):
            if b"\r\n\r\n" in warm.data:
                break
            await asyncio.sleep(0.05)
        assert warm.data.startswith(b"HTTP/1.1 200")
        per = (after - before) / LONGPOLLS
        print(f"{per:.1f} KiB per parked long-poll ({before} -> {after} KiB)")
        assert per <= KIB_PER_LONGPOLL, f"{per:.1f} KiB per long-poll"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        import shutil

        shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------- request hygiene (issue 12)


async def raw_exchange(env: Env, head: bytes) -> tuple[int, bytes]:
    """Send ``head`` as is over TLS and return the answer's status and bytes."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.proxy.port, ssl=env.client_ssl, server_hostname="127.0.0.1")
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1]), data


def _raw_post(target: bytes, *extra: bytes, body: bytes = b"") -> bytes:
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: 127.0.0.1",
             b"Authorization: " + auth().encode(), b"MS-ASProtocolVersion: 14.1",
             b"Content-Length: %d" % len(body), *extra]
    if not any(x.lower().startswith(b"connection:") for x in extra):
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


RAW_Q = b"/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice%40corp.example&DeviceId=dev-ok" \
        b"&DeviceType=iPhone"


@pytest.mark.parametrize(("head", "reason"), [
    (_raw_post(RAW_Q, b"Authorization: " + auth("bob@corp.example").encode()),
     "duplicate_authorization"),
    (_raw_post(b"https://other.example" + RAW_Q), "absolute_form"),
    (_raw_post(b"http://127.0.0.1" + RAW_Q), "absolute_form"),
    (_raw_post(RAW_Q + b"#frag"), "fragment"),
    (_raw_post(RAW_Q, b"Connection: close, Authorization"), "connection_names_end_to_end"),
    (_raw_post(RAW_Q, b"Connection: Host, close"), "connection_names_end_to_end"),
    (_raw_post(RAW_Q, b"Connection: close, MS-ASProtocolVersion"),
     "connection_names_end_to_end"),
], ids=["two-authorization", "absolute-form", "absolute-form-same-host", "fragment",
        "connection-authorization", "connection-host", "connection-protocol-version"])
async def test_ambiguous_requests_are_400_and_never_reach_the_upstream(
        env: Env, head: bytes, reason: str) -> None:
    """Two Authorization headers, an absolute-form target, a fragment or a Connection
    header naming a header mailward reads: 400, counted with its reason against the
    client's address (summarised, not logged one by one), no decision and nothing sent
    upstream (not even the credential check)."""
    await env.attest("dev-ok", [])
    env.gate.limits.abuse_summaries()  # start from nothing
    status, _ = await raw_exchange(env, head)
    assert status == 400
    assert env.upstream.seen == []
    assert env.decisions("dev-ok") == []
    [summary] = env.gate.limits.abuse_summaries()
    assert (summary["client_ip"], summary["counts"]) == ("127.0.0.1", {reason: 1})


async def test_client_forwarding_and_method_override_headers_are_dropped(env: Env) -> None:
    """On the pooled and the streamed path, a client's X-Forwarded-For, Forwarded and
    X-HTTP-Method-Override / X-HTTP-Method / X-Method-Override never reach the
    upstream; X-Forwarded-For is the client's address as mailward saw it."""
    await env.attest("dev-ok", [])
    sent = {"X-Forwarded-For": "10.66.0.1", "Forwarded": "for=10.66.0.1",
            "X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE",
            "X-Method-Override": "PUT", "X-Forwarded-Host": "evil.example"}
    query = f"Cmd=SendMail&User={USER.replace('@', '%40')}&DeviceId=dev-ok&DeviceType=iPhone"
    for body in (b"small", os.urandom(200_000)):  # pooled, then streamed through aiohttp
        assert (await env.post(query, body, headers=sent)).status == 200
    for seen in env.upstream.posts("SendMail"):
        assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
        assert seen.headers.getall("X-Forwarded-Host") == [f"127.0.0.1:{env.proxy.port}"]
        for name in ("Forwarded", "X-HTTP-Method-Override", "X-HTTP-Method",
                     "X-Method-Override"):
            assert name not in seen.headers, name
    [options] = [s for s in env.upstream.seen if s.method == "OPTIONS"]  # credential check
    assert options.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert "X-HTTP-Method-Override" not in options.headers


async def test_upstream_target_is_rebuilt_from_path_and_query(env: Env) -> None:
    """A path spelt another way (percent-encoded) reaches the upstream as the one served
    path, with the query byte for byte."""
    await env.attest("dev-ok", [])
    status, _ = await raw_exchange(env, _raw_post(
        RAW_Q.replace(b"/Microsoft-Server", b"/Microsoft%2DServer"), body=b"\x03\x01\x6a\x00"))
    assert status == 200
    [seen] = env.upstream.posts("Sync")
    assert seen.raw_path == RAW_Q.decode()


@pytest.mark.peer
async def test_options_goes_upstream_without_a_body(env: Env) -> None:
    """An OPTIONS request with a body (curl) is answered, and the upstream receives it
    without the body, Content-Length or Content-Type."""
    import shutil
    import subprocess

    from peers import peer_missing

    curl = shutil.which("curl")
    if curl is None:
        peer_missing("curl not installed")
    proc = await asyncio.create_subprocess_exec(
        curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(env.ca_path),
        "-X", "OPTIONS", "-H", f"Authorization: {auth()}", "-H",
        "Content-Type: application/vnd.ms-sync.wbxml", "--data-binary", "smuggled body",
        env.url, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out == b"200"
    [seen] = env.upstream.seen
    assert seen.method == "OPTIONS" and seen.body == b""
    assert "Content-Length" not in seen.headers and "Content-Type" not in seen.headers
    assert seen.raw_path == EAS


async def test_pyactivesync_traffic_passes_the_hygiene_rules(env: Env) -> None:
    """A real client's ordinary requests are not refused: each reaches the upstream with
    one Authorization, an origin-form target and mailward's X-Forwarded-For."""
    await env.attest("dev-hyg", ["com.example.mail"])

    def run() -> None:
        with pyclient(env, "dev-hyg") as c:
            c.list_folders()
            c.sync_folder("5")

    await in_thread(run)
    assert env.upstream.posts("FolderSync") and env.upstream.posts("Sync")
    for seen in env.upstream.seen:
        assert len(seen.headers.getall("Authorization")) == 1
        assert seen.raw_path.startswith(EAS + "?") or seen.raw_path == EAS
        assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
