"""The ``[nginx]`` listener without nginx: its parsers and answers (pure, fuzzed), its
configuration, and its conversations with the real gate over an in-process upstream
(``proxy.demo.upstream``: IMAP, SMTP and ActiveSync), driven as nginx drives it.
The real nginx is in ``test_nginx_peer.py``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from helpers.frontend_env import FrontendEnv
from helpers.serve import free_port
from helpers.tls import Pki, enrolled_pki
from hypothesis import given, settings
from hypothesis import strategies as st
from pki_helpers import fresh_posture as posture

from proxy.config import ConfigError, LimitsConfig, ListenerConfig, NginxConfig, load_config
from proxy.demo.upstream import DemoUpstream
from proxy.frontends.activesync.forward import Forwarder
from proxy.net.limits import Limits
from proxy.nginx import app as nginx_app
from proxy.nginx.certs import CertificateCheck
from proxy.nginx.eas import EasAuth
from proxy.nginx.mail import MailAuth
from proxy.nginx.protocol import (
    BadAuthRequest,
    MailAnswer,
    MailRequest,
    allowed,
    parse_eas_request,
    parse_mail_request,
    refused,
)
from proxy.policy import Decision
from proxy.posture import App

ALICE, BOB = "alice@corp.example", "bob@corp.example"
PASSWORDS = {ALICE: "alice-secret", BOB: "bob-secret"}
SECRET = "s3cret-nginx-shared-value"
HEADER = "X-Mailward-Secret"
PHONE_IP = "198.51.100.7"
TIKTOK = App("com.zhiliaoapp.musically", "35.1.3", "TikTok")
DEVICES = (("alice-phone", ALICE), ("alice-tiktok", ALICE), ("bob-phone", BOB))
EAS_URI = ("/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice@corp.example&DeviceId={}"
           "&DeviceType=Android")


def printable(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


# ------------------------------------------------------------------ pure


@pytest.mark.pure
def test_mail_request_decodes_nginx_url_encoding() -> None:
    """Auth-User, Auth-Pass and Auth-SSL-Cert arrive URL-encoded and are decoded."""
    req = parse_mail_request({
        "Auth-Method": "plain", "Auth-User": quote("alice@corp.example"),
        "Auth-Pass": quote("p@ss word%é"), "Auth-Protocol": "IMAP",
        "Auth-Login-Attempt": "2", "Client-IP": "2001:db8::1",
        "Auth-SSL-Cert": quote("-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n"),
    })
    assert (req.user, req.password, req.protocol, req.attempt) == (
        "alice@corp.example", "p@ss word%é", "imap", 2)
    assert req.client_ip == "2001:db8::1"
    assert req.cert_pem is not None and req.cert_pem.startswith(b"-----BEGIN CERTIFICATE")
    assert "p@ss" not in repr(req)


@pytest.mark.pure
@pytest.mark.parametrize("headers", [
    {"Auth-Protocol": "nntp", "Auth-User": "a", "Client-IP": "192.0.2.1"},
    {"Auth-Protocol": "imap", "Auth-User": "", "Client-IP": "192.0.2.1"},
    {"Auth-Protocol": "imap", "Auth-User": "a", "Client-IP": "phone.example"},
    {"Auth-Protocol": "imap", "Auth-User": "a%0d%0aX", "Client-IP": "192.0.2.1"},
    {"Auth-Protocol": "imap", "Auth-User": "a%ff", "Client-IP": "192.0.2.1"},
    {"Auth-Protocol": "smtp", "Auth-User": "a", "Client-IP": "192.0.2.1",
     "Auth-Login-Attempt": "x"},
    {"Auth-Protocol": "pop3", "Auth-User": "a", "Client-IP": "192.0.2.1",
     "Auth-SSL-Cert": "not-a-pem"},
])
def test_mail_request_refuses_what_cannot_be_a_login(headers: dict[str, str]) -> None:
    """A missing or malformed field is BadAuthRequest, never a login."""
    with pytest.raises(BadAuthRequest):
        parse_mail_request(headers)


HEADER_NAMES = ("Auth-Method", "Auth-User", "Auth-Pass", "Auth-Protocol",
                "Auth-Login-Attempt", "Client-IP", "Client-Host", "Auth-SSL-Cert",
                "Auth-SMTP-Helo", "X-Original-URI", "X-Original-Method", "X-Real-IP",
                "X-SSL-Client-Cert", "Authorization")
HEADER_VALUES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["imap", "pop3", "smtp", "plain", "login", "192.0.2.1", "::1", "1",
                     "/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=x", "%ff%00"]),
    st.text(alphabet="%0123456789abcdefABCDEF-=/:?&", max_size=60),
)


@pytest.mark.pure
@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(HEADER_NAMES), HEADER_VALUES))
def test_any_headers_parse_or_raise_bad_request(headers: dict[str, str]) -> None:
    """Any header values give a request or BadAuthRequest, for both questions."""
    for parse in (parse_mail_request, parse_eas_request):
        with contextlib.suppress(BadAuthRequest):
            parse(headers)


@pytest.mark.pure
@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["imap", "pop3", "smtp", ""]),
       st.sampled_from(["credentials", "policy", "temporary", "unavailable", "request"]),
       st.text(), st.integers(1, 50), st.one_of(st.none(), st.floats(0, 1e6)))
def test_any_refusal_renders_as_safe_headers(protocol: str, kind: Any, text: str,
                                             attempt: int, delay: float | None) -> None:
    """Whatever the text, the answer is printable ASCII headers and never an OK."""
    answer = refused(protocol, kind, text, attempt=attempt, delay_s=delay)
    headers = answer.headers()
    assert headers["Auth-Status"] != "OK" and "Auth-Server" not in headers
    assert all(printable(v) and v for v in headers.values())
    assert ("Auth-Wait" in headers) == (delay is not None and attempt < 10)
    assert ("Auth-Error-Code" in headers) == (protocol == "smtp")


#: Header values as they can reach the listener (printable), and realistic ones.
WIRE_VALUES = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
    st.sampled_from(["imap", "smtp", "plain", "192.0.2.1", "GET", "OPTIONS",
                     "Basic YWxpY2VAY29ycC5leGFtcGxlOnNlY3JldA==", "Basic !!",
                     "/Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=abc&DeviceType=x",
                     "/Microsoft-Server-ActiveSync?jAkJBAp2MTQwZGV2aWNlaWQ=",
                     "-----BEGIN CERTIFICATE-----%0AAAAA%0A-----END CERTIFICATE-----"]),
)


class _StubMail:
    """Answers every parsed login with OK (the handler's framing is under test)."""

    async def answer(self, req: MailRequest) -> MailAnswer:
        return allowed("127.0.0.1:143")


@pytest.mark.pure
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(HEADER_NAMES), WIRE_VALUES))
def test_auth_http_handler_always_answers_headers(headers: dict[str, str]) -> None:
    """Any header values give 200 with an Auth-Status nginx can read, never a 500."""
    app = web.Application()
    app[nginx_app._MAIL] = _StubMail()  # type: ignore[assignment]
    request = make_mocked_request("GET", "/auth_http", headers=headers, app=app)
    response = asyncio.run(nginx_app.auth_http(request))
    assert response.status == 200
    assert all(printable(v) for v in response.headers.values())
    parsed = True
    try:
        parse_mail_request(request.headers)
    except BadAuthRequest:
        parsed = False
    assert (response.headers["Auth-Status"] == "OK") == parsed


class _StubGate:
    """A gate that allows everyone and records nothing (the handler is under test)."""

    limits = Limits()

    async def decide(self, identity: Any, origin: Any) -> Decision:
        return Decision(True, (), "v", "0" * 64)

    async def record_deny(self, *args: Any, **kwargs: Any) -> None:
        return None

    record_auth_failed = record_deny


class _StubUpstream:
    async def check_credentials(self, request: Any) -> None:
        return None


@pytest.mark.pure
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(HEADER_NAMES), WIRE_VALUES))
def test_auth_request_handler_answers_a_status_nginx_knows(headers: dict[str, str]) -> None:
    """Any header values give 200, 401 or 403 (403 with a printable reason), never a 500."""
    lc = ListenerConfig(name="activesync", protocol="activesync", host="127.0.0.1", port=0,
                        upstream="http://127.0.0.1:1")
    eas = EasAuth(_StubGate(), lc, _StubUpstream(), CertificateCheck(None))  # type: ignore[arg-type]
    app = web.Application()
    app[nginx_app._EAS] = eas
    request = make_mocked_request("GET", "/auth_request", headers=headers, app=app)
    response = asyncio.run(nginx_app.auth_request(request))
    assert response.status in (200, 401, 403)
    assert all(printable(v) for v in response.headers.values())
    if response.status == 403:
        assert response.headers["X-Mailward-Refusal"]


@pytest.mark.pure
def test_allowed_names_nginx_upstream() -> None:
    """OK carries the listener's nginx_upstream as Auth-Server and Auth-Port."""
    assert allowed("10.0.0.5:143").headers() == {
        "Auth-Status": "OK", "Auth-Server": "10.0.0.5", "Auth-Port": "143"}
    assert allowed("[2001:db8::5]:25").headers()["Auth-Server"] == "2001:db8::5"


# ------------------------------------------------------------------ configuration


def _config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    p = tmp_path / "config" / "mailward.toml"
    p.write_text(text)
    return p


LISTENER = """
[[listeners]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:1993"
upstream = "127.0.0.1:993"
"""


@pytest.mark.pure
@pytest.mark.parametrize(("text", "key", "fragment"), [
    ('[nginx]\nlisten = "0.0.0.0:9090"\n', "nginx.listen", "loopback"),
    ('[nginx]\nlisten = "192.0.2.10:9090"\n', "nginx.listen", "loopback"),
    ('[nginx]\nauth_http_header = "X Bad"\n', "nginx.auth_http_header", "header name"),
    (LISTENER + 'nginx_upstream = "127.0.0.1:143"\n', "listeners[0].nginx_upstream",
     "[nginx]"),
    ("[nginx]\n" + LISTENER + 'nginx_upstream = "imap.corp.example:143"\n',
     "listeners[0].nginx_upstream", "IP:port"),
    ("[nginx]\n" + LISTENER + 'nginx_upstream = "127.0.0.1:143"\n'
     + LISTENER.replace("imaps", "imap2") + 'nginx_upstream = "127.0.0.1:144"\n',
     "listeners[1].nginx_upstream", "only one imap"),
])
def test_nginx_config_errors_are_one_line(tmp_path: Path, text: str, key: str,
                                          fragment: str) -> None:
    """A non-loopback [nginx] listen and bad nginx keys are one-line errors naming the key."""
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, text))
    assert err.value.key == key and fragment in err.value.message
    assert "\n" not in str(err.value) and err.value.line is not None


@pytest.mark.pure
def test_nginx_config_defaults(tmp_path: Path) -> None:
    """[nginx] defaults to 127.0.0.1:9090, X-Mailward-Secret and certs/nginx.secret."""
    cfg = load_config(_config(tmp_path, "[nginx]\n" + LISTENER
                              + 'nginx_upstream = "10.0.0.5:143"\n'))
    assert cfg.nginx == NginxConfig("127.0.0.1", 9090, "X-Mailward-Secret",
                                    tmp_path / "certs" / "nginx.secret")
    assert cfg.listeners[0].nginx_upstream == "10.0.0.5:143"
    assert load_config(_config(tmp_path, LISTENER)).nginx is None


@pytest.mark.conversation
@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
async def test_listener_refuses_to_bind_non_loopback(host: str) -> None:
    """bind() refuses any address that is not loopback, before binding anything."""
    with pytest.raises(ValueError, match="loopback"):
        await nginx_app.bind(NginxConfig(host, 0), web.Application(), Limits())


@pytest.mark.pure
@pytest.mark.parametrize("content", ["", "short\n", "two\nlines-long-enough-1234\n"])
def test_unusable_secret_is_refused(tmp_path: Path, content: str) -> None:
    """An empty, short or multi-line secret file stops start-up with the file named."""
    (tmp_path / "s").write_text(content)
    with pytest.raises(ValueError, match="secret_file"):
        nginx_app.read_secret(NginxConfig(secret_file=tmp_path / "s"))


# ------------------------------------------------------------------ conversations


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return enrolled_pki(tmp_path_factory.mktemp("pki"), DEVICES)


def leaf_pem(pki: Pki, device: str) -> str:
    """The device's certificate as nginx passes it: the leaf only, URL-encoded."""
    pem = pki.device(device)[0].read_text()
    end = "-----END CERTIFICATE-----\n"
    return quote(pem[: pem.index(end) + len(end)])


class World(FrontendEnv):
    """The gate, an in-process upstream and the [nginx] app on a test client."""

    client: TestClient[Any, Any]
    upstream: DemoUpstream
    listeners: list[Any]
    eas: EasAuth
    now: float = 1000.0

    def clock(self) -> float:
        """The device-sessions' clock, moved by the tests."""
        return self.now

    async def ask(self, path: str, headers: dict[str, str], *,
                  secret: str | None = SECRET) -> Any:
        if secret is not None:
            headers = {HEADER: secret, **headers}
        return await self.client.get(path, headers=headers)

    async def login(self, device: str | None, user: str = ALICE, password: str | None = None,
                    protocol: str = "imap", attempt: int = 1) -> Any:
        headers = {"Auth-Method": "plain", "Auth-User": quote(user),
                   "Auth-Pass": quote(PASSWORDS[user] if password is None else password),
                   "Auth-Protocol": protocol, "Auth-Login-Attempt": str(attempt),
                   "Client-IP": PHONE_IP, "Client-Host": "[UNAVAILABLE]"}
        if device is not None:
            headers |= {"Auth-SSL": "on", "Auth-SSL-Verify": "SUCCESS",
                        "Auth-SSL-Cert": leaf_pem(self.pki, device)}
        return await self.ask("/auth_http", headers)


@pytest.fixture
async def world(pki: Pki, tmp_path: Path) -> AsyncIterator[World]:
    w = World(pki, tmp_path)
    for device, user in DEVICES:
        await w.put(posture(device, user, (TIKTOK,) if "tiktok" in device else ()))
    w.upstream = await DemoUpstream(PASSWORDS, imap_tls="none", smtp_tls="none",
                                    eas_tls=False).start()
    ports = w.upstream.ports
    common: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "upstream_tls": "none",
                              "upstream_connect_timeout_s": 2, "upstream_timeout_s": 5}
    imap = ListenerConfig(name="imaps", protocol="imap", upstream=f"127.0.0.1:{ports['imap']}",
                          nginx_upstream="127.0.0.1:1143", **common)
    smtp = ListenerConfig(name="submission", protocol="smtp",
                          upstream=f"127.0.0.1:{ports['smtp']}",
                          nginx_upstream="127.0.0.1:1025", **common)
    eas = ListenerConfig(name="activesync", protocol="activesync",
                         upstream=w.upstream.eas_url, nginx_upstream="127.0.0.1:8080", **common)
    certs = CertificateCheck(pki.dir / "device-ca.pem")
    forwarder = Forwarder(eas, None)
    await forwarder.start()
    w.mail = MailAuth(w.gate, {"imap": imap, "smtp": smtp}, {}, certs, "mailward.test")
    w.eas = EasAuth(w.gate, eas, forwarder, certs, clock=w.clock)
    w.eas.start()
    app = nginx_app.make_app(NginxConfig(port=0), SECRET, lambda: w.gate.limits, w.mail,
                             w.eas)
    w.client = TestClient(TestServer(app))
    await w.client.start_server()
    yield w
    await w.client.close()
    await w.eas.close()
    await forwarder.close()
    await w.upstream.close()
    await w.close()


@pytest.mark.conversation
async def test_missing_or_wrong_secret_is_403_and_decides_nothing(world: World) -> None:
    """Without the shared secret nothing is parsed, decided or recorded: 403."""
    for secret in (None, "wrong-secret-of-some-length", SECRET + "x", ""):
        headers = {"Auth-Protocol": "imap", "Auth-User": ALICE, "Auth-Pass": "alice-secret",
                   "Client-IP": PHONE_IP}
        r = await world.ask("/auth_http", headers, secret=secret)
        assert r.status == 403 and "Auth-Status" not in r.headers
        r = await world.ask("/auth_request", {"X-Original-URI": EAS_URI.format("x"),
                                              "X-Real-IP": PHONE_IP}, secret=secret)
        assert r.status == 403
    await asyncio.sleep(0.1)
    assert world.records() == []


@pytest.mark.conversation
async def test_secret_guessing_is_rate_limited(world: World) -> None:
    """A local process guessing the secret runs out of its address's API budget: 429."""
    world.gate.limits = Limits(LimitsConfig(api_rate_per_ip=0.01, api_rate_burst=3))
    statuses = [(await world.ask("/auth_http", {}, secret=f"guess-{i}")).status
                for i in range(5)]
    assert statuses[:3] == [403] * 3 and statuses[3:] == [429, 429]


@pytest.mark.conversation
async def test_compliant_device_gets_ok_with_nginx_upstream(world: World) -> None:
    """A compliant device's right password: Auth-Status OK to nginx_upstream, one allow record."""
    r = await world.login("alice-phone")
    assert (r.headers["Auth-Status"], r.headers["Auth-Server"], r.headers["Auth-Port"]) == (
        "OK", "127.0.0.1", "1143")
    (rec,) = await world.wait_records(1, "decision")
    assert (rec["decision"], rec["protocol"], rec["listener"], rec["client_ip"], rec["user"],
            rec["device_id"], rec["device_source"]) == (
        "allow", "imap", "nginx:imaps", PHONE_IP, ALICE, "alice-phone", "client_cert")


@pytest.mark.conversation
@pytest.mark.parametrize(("protocol", "code"), [("imap", None), ("smtp", "550 5.7.1")])
async def test_tiktok_device_refused_with_the_reason(world: World, protocol: str,
                                                     code: str | None) -> None:
    """A device with TikTok is refused with the remediation text (SMTP: 550 5.7.1)."""
    r = await world.login("alice-tiktok", protocol=protocol)
    status = r.headers["Auth-Status"]
    assert "TikTok" in status and "Auth-Server" not in r.headers and "Auth-Wait" not in r.headers
    assert status.startswith("[ALERT] ") if protocol == "imap" else True
    assert r.headers.get("Auth-Error-Code") == code
    (rec,) = await world.wait_records(1, "decision")
    assert rec["decision"] == "deny" and rec["protocol"] == protocol
    assert "prohibited_app" in [reason["code"] for reason in rec["reasons"]]


@pytest.mark.conversation
async def test_unidentified_client_is_decided_by_the_listener_setting(world: World) -> None:
    """No certificate: unidentified = "deny" refuses after the password was checked."""
    r = await world.login(None)
    assert r.headers["Auth-Status"].startswith("[ALERT] ")
    (rec,) = await world.wait_records(1, "decision")
    assert rec["decision"] == "deny" and rec["device_id"] is None


@pytest.mark.conversation
async def test_wrong_password_refused_with_auth_wait_doubling(world: World) -> None:
    """A wrong password is auth_failed with Auth-Wait; past the throttle the wait grows."""
    waits, codes = [], []
    for attempt in range(1, 8):
        r = await world.login("alice-phone", password="wrong", protocol="smtp",
                              attempt=attempt)
        assert "Auth-Server" not in r.headers
        waits.append(int(r.headers["Auth-Wait"]))
        codes.append(r.headers["Auth-Error-Code"])
    assert waits[:5] == [1] * 5 and waits[5] >= 2 and waits[6] > waits[5]
    assert all(c.startswith("535") for c in codes)
    r = await world.login("alice-phone", password="wrong", attempt=10)
    assert "Auth-Wait" not in r.headers and r.headers["Auth-Status"] != "OK"
    recs = await world.wait_records(8, "decision")
    assert len(recs) == 8 and {r["reasons"][0]["code"] for r in recs} == {"auth_failed"}


@pytest.mark.conversation
async def test_upstream_down_is_temporary_never_ok(world: World) -> None:
    """An unreachable upstream gives a temporary refusal and a temporary deny record."""
    dead = f"127.0.0.1:{free_port()}"
    world.mail.listeners["imap"] = replace(world.mail.listeners["imap"], upstream=dead)
    world.mail.listeners["smtp"] = replace(world.mail.listeners["smtp"], upstream=dead)
    r = await world.login("alice-phone")
    assert r.headers["Auth-Status"].startswith("[UNAVAILABLE] ")
    r = await world.login("alice-phone", protocol="smtp")
    assert r.headers["Auth-Error-Code"] == "451 4.4.1" and "Auth-Server" not in r.headers
    recs = await world.wait_records(2, "decision")
    assert [r["reasons"][0]["code"] for r in recs] == ["upstream_unavailable"] * 2


@pytest.mark.conversation
async def test_untrusted_certificate_refused_without_decision(world: World) -> None:
    """A certificate not from [tls] client_ca is refused like a failed handshake."""
    ca = trustme.CA()
    leaf = ca.issue_cert("alice-phone.example")
    r = await world.ask("/auth_http", {
        "Auth-Method": "plain", "Auth-User": ALICE, "Auth-Pass": "alice-secret",
        "Auth-Protocol": "imap", "Client-IP": PHONE_IP,
        "Auth-SSL-Cert": quote(leaf.cert_chain_pems[0].bytes().decode())})
    assert "not trusted" in r.headers["Auth-Status"]
    await asyncio.sleep(0.1)
    assert world.records("decision") == []


def eas_headers(device: str | None, cert: str | None = None, password: str = "alice-secret",
                **extra: str) -> dict[str, str]:
    import base64

    token = base64.b64encode(f"{ALICE}:{password}".encode()).decode()
    headers = {"X-Original-URI": EAS_URI.format(device), "X-Original-Method": "POST",
               "X-Real-IP": PHONE_IP, "Authorization": f"Basic {token}", **extra}
    if cert is not None:
        headers["X-SSL-Client-Cert"] = cert
    return headers


@pytest.mark.conversation
async def test_auth_request_decides_activesync(world: World) -> None:
    """auth_request: compliant 200, TikTok 403 with the reason header, records written."""
    r = await world.ask("/auth_request", eas_headers("alice-phone"))
    assert r.status == 200
    r = await world.ask("/auth_request", eas_headers("alice-tiktok"))
    assert r.status == 403 and "TikTok" in r.headers["X-Mailward-Refusal"]
    recs = await world.wait_records(2, "decision")
    assert [(r["decision"], r["device_id"], r["device_source"], r["client_ip"],
             r["listener"], r["protocol"]) for r in recs] == [
        ("allow", "alice-phone", "claim", PHONE_IP, "nginx:activesync", "activesync"),
        ("deny", "alice-tiktok", "claim", PHONE_IP, "nginx:activesync", "activesync")]


@pytest.mark.conversation
async def test_auth_request_credentials_and_bad_requests(world: World) -> None:
    """Missing or wrong credentials are 401 (wrong ones recorded); a bad query is 403."""
    no_auth = eas_headers("alice-phone")
    del no_auth["Authorization"]
    r = await world.ask("/auth_request", no_auth)
    assert r.status == 401 and "Basic" in r.headers["WWW-Authenticate"]
    r = await world.ask("/auth_request", eas_headers("alice-phone", password="wrong"))
    assert r.status == 401
    bad = eas_headers("alice-phone", **{"X-Original-URI": "/Microsoft-Server-ActiveSync?Cmd=Sync"})
    assert (await world.ask("/auth_request", bad)).status == 403
    r = await world.ask("/auth_request", eas_headers(
        "alice-phone", cert=leaf_pem(world.pki, "bob-phone")))
    assert r.status == 403 and "X-Mailward-Refusal" in r.headers
    recs = await world.wait_records(2, "decision")
    assert [r["reasons"][0]["code"] for r in recs] == ["auth_failed", "device_mismatch"]


def count_checks(world: World) -> list[str]:
    """The users whose credentials the upstream is asked to check, from now on."""
    checked: list[str] = []
    check = world.eas._verify_credentials

    async def counting(request: Any, req: Any, identity: Any, origin: Any) -> Any:
        checked.append(identity.user)
        return await check(request, req, identity, origin)

    world.eas._verify_credentials = counting  # type: ignore[method-assign]
    return checked


def session_ends(world: World) -> list[str]:
    return [r["detail"] for r in world.records("session_end")]


@pytest.mark.conversation
async def test_auth_request_decides_once_per_device_session(world: World) -> None:
    """A phone's requests through nginx are decided once (one decision record, one
    upstream check; a burst of first requests too); the session's end records how
    many requests that decision covered."""
    checked = count_checks(world)
    first = await asyncio.gather(*(world.ask("/auth_request", eas_headers("alice-phone"))
                                   for _ in range(8)))
    assert [r.status for r in first] == [200] * 8
    for _ in range(4):
        assert (await world.ask("/auth_request", eas_headers("alice-phone"))).status == 200
    assert checked == [ALICE]
    (rec,) = await world.wait_records(1, "decision")
    assert (rec["decision"], rec["device_id"], rec["listener"]) == \
        ("allow", "alice-phone", "nginx:activesync")
    world.now += 3601  # past the decision's age: decided again
    assert (await world.ask("/auth_request", eas_headers("alice-phone"))).status == 200
    assert len(await world.wait_records(2, "decision")) == 2 and len(checked) == 2
    await world.eas.close()
    assert session_ends(world) == ["max_age requests=12", "listener_closed requests=1"]


@pytest.mark.conversation
async def test_auth_request_session_ends_with_a_new_posture(world: World) -> None:
    """TikTok installed on a phone with a cached allow: the gate ends its session
    (session_end names the trigger) and its next request is refused."""
    assert (await world.ask("/auth_request", eas_headers("alice-phone"))).status == 200
    await world.put(posture("alice-phone", ALICE, (TIKTOK,)))
    assert await world.gate.posture_changed("alice-phone") == 1
    r = await world.ask("/auth_request", eas_headers("alice-phone"))
    assert r.status == 403 and "TikTok" in r.headers["X-Mailward-Refusal"]
    assert [r["decision"] for r in await world.wait_records(2, "decision")] == \
        ["allow", "deny"]
    assert [(r["reason"], r["detail"], r["device_id"]) for r in world.records("session_end")] \
        == [("posture_changed", "prohibited_app", "alice-phone"),
            ("eas_session", "terminated requests=1", "alice-phone")]


@pytest.mark.conversation
async def test_auth_request_cache_covers_only_the_same_credentials_and_certificate(
        world: World) -> None:
    """A cached allow is not an oracle: a wrong password on the same device is checked
    upstream (401, a failed login the throttle counts) and so is another certificate;
    the allowed key still works."""
    checked = count_checks(world)
    assert (await world.ask("/auth_request", eas_headers("alice-phone"))).status == 200
    for _ in range(2):
        wrong = await world.ask("/auth_request", eas_headers("alice-phone", password="nope"))
        assert wrong.status == 401
    other = await world.ask("/auth_request", eas_headers(
        "alice-phone", cert=leaf_pem(world.pki, "bob-phone")))
    assert other.status == 403
    assert (await world.ask("/auth_request", eas_headers("alice-phone"))).status == 200
    assert len(checked) == 4
    recs = await world.wait_records(4, "decision")
    assert [r["decision"] if r["decision"] == "allow" else r["reasons"][0]["code"]
            for r in recs] == ["allow", "auth_failed", "auth_failed", "device_mismatch"]


@pytest.mark.conversation
async def test_auth_request_allow_with_a_certificate_is_not_reused_without_it(
        world: World) -> None:
    """The borrowed-DeviceId trick: an allow made with the phone's certificate does not
    answer a request that claims the same DeviceId without it (another phone); that
    one is decided on its own, with its own record."""
    checked = count_checks(world)
    cert = leaf_pem(world.pki, "alice-phone")
    assert (await world.ask("/auth_request", eas_headers("alice-phone", cert=cert))).status == 200
    assert (await world.ask("/auth_request", eas_headers("alice-phone", cert=cert))).status == 200
    await world.ask("/auth_request", eas_headers("alice-phone"))  # the bare claim
    assert len(checked) == 2
    recs = await world.wait_records(2, "decision")
    assert [r["device_source"] for r in recs] == ["client_cert", "claim"]
