"""Autodiscover through the ActiveSync listener: the XML form (MS-ASCMD's Autodiscover
command) and the JSON v1.0 form, passed to the project's fake upstream
(``test_activesync.Upstream``) without a decision, with the MobileSync address rewritten
to ``public_url``; and the rewriting and target rules without sockets."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import aiohttp
import pytest
import test_activesync
import trustme
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs
from test_activesync import (
    PUBLIC_URL,
    Env,
    _raw_post,
    _start_proxy,
    auth,
    autodiscover_request,
    autodiscover_response,
    raw_exchange,
)

from proxy.config import ConfigError, load_config
from proxy.frontends.activesync.autodiscover import (
    MAX_BODY_BYTES,
    autodiscover_kind,
    upstream_target,
)
from proxy.frontends.activesync.rewrite import Rewriter, Unchanged

# The fake upstream and mailward in front of it, as test_activesync starts them.
ca = test_activesync.ca
env = test_activesync.env

UP = "https://exchange.corp.example"
EAS_URL = "/Microsoft-Server-ActiveSync"
BOMB = (b'<?xml version="1.0"?>\n<!DOCTYPE Autodiscover [\n <!ENTITY a "aaaaaaaaaa">\n'
        + b"".join(b' <!ENTITY %c "%s">\n' % (98 + i, (b"&%c;" % (97 + i)) * 10)
                   for i in range(9))
        + b"]>\n<Autodiscover><Response><Action><Settings><Server><Type>MobileSync</Type>"
          b"<Url>" + UP.encode() + b"/Microsoft-Server-ActiveSync&j;</Url>"
          b"</Server></Settings></Action></Response></Autodiscover>")
XXE = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b"<Autodiscover><Response><Action><Settings><Server><Type>MobileSync</Type>"
       b"<Url>&x;</Url></Server></Settings></Action></Response></Autodiscover>")


def _changed(before: bytes, after: bytes) -> bytes:
    """``after`` with the expected rewrite undone, to compare with ``before``."""
    return after.replace(PUBLIC_URL.encode(), b"\0")


# ------------------------------------------------------------ rewriting (pure)


@pytest.mark.pure
def test_mobilesync_url_and_name_rewritten_rest_byte_identical() -> None:
    """In MS-ASCMD's example answer only the MobileSync Url and Name change, to
    public_url plus the same path; the CertEnroll entry on the upstream's own host,
    the declaration, whitespace and CRLFs stay byte for byte."""
    doc = autodiscover_response(UP, "chris@woodgrovebank.com")
    out = Rewriter(UP, PUBLIC_URL).xml(doc)
    eas = (UP + EAS_URL).encode()
    assert out.count(PUBLIC_URL.encode() + EAS_URL.encode()) == 2
    assert out.replace(PUBLIC_URL.encode() + EAS_URL.encode(), eas) == doc
    assert (UP + "/CertEnroll").encode() in out


@pytest.mark.pure
@pytest.mark.parametrize("value", [
    "https://exchange.corp.example.evil.example" + EAS_URL,
    "https://other.corp.example" + EAS_URL,
    "http://exchange.corp.example" + EAS_URL,
    "https://exchange.corp.example:8443" + EAS_URL,
    "https://user@exchange.corp.example" + EAS_URL,
    "https://exchange.corp.example@evil.example/",
])
def test_addresses_not_equal_to_the_upstream_are_left_alone(value: str) -> None:
    """A MobileSync address whose origin is not exactly the upstream's (another host,
    a longer host, another scheme or port, userinfo) is not rewritten."""
    doc = autodiscover_response(UP, "a@b").replace((UP + EAS_URL).encode(), value.encode())
    with pytest.raises(Unchanged):
        Rewriter(UP, PUBLIC_URL).xml(doc)


@pytest.mark.pure
def test_explicit_default_port_and_case_still_match() -> None:
    """``https://EXCHANGE.corp.example:443/x`` is the upstream's origin spelt otherwise;
    the path keeps its spelling."""
    r = Rewriter(UP, PUBLIC_URL + "/")
    assert r.url(" https://EXCHANGE.corp.example:443/X?y=1 ") == PUBLIC_URL + "/X?y=1"
    assert r.url(UP) == PUBLIC_URL


@pytest.mark.pure
def test_prefixed_namespace_is_found() -> None:
    """A server writing the mobilesync namespace with a prefix is rewritten as well."""
    doc = (b'<a:Autodiscover xmlns:a="urn:x"><a:Response><a:Action><a:Settings><a:Server>'
           b"<a:Url>" + UP.encode() + b"/eas</a:Url><a:Type>MobileSync</a:Type>"
           b"</a:Server></a:Settings></a:Action></a:Response></a:Autodiscover>")
    assert Rewriter(UP, PUBLIC_URL).xml(doc) == doc.replace(UP.encode(), PUBLIC_URL.encode())


@pytest.mark.pure
@pytest.mark.parametrize(("doc", "reason"), [
    (BOMB, "DTD"),
    (XXE, "DTD"),
    (b"<Autodiscover><Response><Action><Settings><Server><Type>MobileSync</Type><Url>"
     b"<![CDATA[" + UP.encode() + b"]]></Url></Server></Settings></Action></Response>"
     b"</Autodiscover>", "address not plain text"),
    (b"<Autodiscover><Response><Action><Settings><Server><Type>MobileSync</Type><Url>"
     + UP.encode() + b"/a&amp;b</Url></Server></Settings></Action></Response>"
     b"</Autodiscover>", "address not plain text"),
    (b"<Autodiscover><Url>" + UP.encode() + b"</Url></Autodiscover>", "no upstream address"),
    (b"<Autodiscover><Response>", "not well formed: no element found: line 1, column 24"),
])
def test_documents_that_are_not_plain_pass_unchanged(doc: bytes, reason: str) -> None:
    """A DTD (entity bomb, external entity) stops the parse before any entity is
    declared; an address written with CDATA or an entity reference, an address
    outside a server entry, or a broken document is not rewritten."""
    started = time.perf_counter()
    with pytest.raises(Unchanged) as info:
        Rewriter(UP, PUBLIC_URL).xml(doc)
    assert info.value.reason == reason
    assert time.perf_counter() - started < 0.5  # nothing expanded


@pytest.mark.pure
def test_json_url_rewritten_for_served_protocols_only() -> None:
    """The JSON ``Url`` is rewritten for ActiveSync and AutodiscoverV1 (mailward serves
    both), formatting and escaping around it kept; EWS is not mailward's to serve."""
    r = Rewriter(UP, PUBLIC_URL)
    doc = b'{ "Protocol": "ActiveSync",\n  "Url": "https:\\/\\/exchange.corp.example\\/eas" }'
    assert r.json(doc) == b'{ "Protocol": "ActiveSync",\n  "Url": "' + \
        PUBLIC_URL.encode() + b'/eas" }'
    assert r.json(b'{"Protocol":"AutodiscoverV1","Url":"' + UP.encode() + b'/x"}') == \
        b'{"Protocol":"AutodiscoverV1","Url":"' + PUBLIC_URL.encode() + b'/x"}'
    for doc in (b'{"Protocol":"EWS","Url":"' + UP.encode() + b'/EWS"}',
                b'{"Protocol":"ActiveSync","Url":"x","Url":"' + UP.encode() + b'"}',
                b'{"Protocol":"ActiveSync","Url":"' + UP.encode() + b'"} x',
                b'[{"Protocol":"ActiveSync","Url":"' + UP.encode() + b'"}]'):
        with pytest.raises(Unchanged):
            r.json(doc)


@pytest.mark.pure
@given(st.binary(max_size=400))
def test_any_answer_is_rewritten_or_unchanged(data: bytes) -> None:
    """Any bytes give a rewritten document or ``Unchanged``, in both forms."""
    r = Rewriter(UP, PUBLIC_URL)
    for rewrite in (r.xml, r.json):
        with contextlib.suppress(Unchanged):
            assert isinstance(rewrite(data), bytes)


@pytest.mark.pure
@given(st.text(alphabet=st.sampled_from('<>/&;"{}[]:, abcUrlTypeServerMobileSync'
                                         + UP), max_size=200))
def test_any_text_is_rewritten_or_unchanged(text: str) -> None:
    """Text near the documents' alphabet gives a rewritten document or ``Unchanged``."""
    r = Rewriter(UP, PUBLIC_URL)
    for rewrite in (r.xml, r.json):
        with contextlib.suppress(Unchanged):
            rewrite(text.encode())


# ------------------------------------------------------------- targets (pure)


@pytest.mark.pure
@pytest.mark.parametrize(("raw", "target"), [
    ("/autodiscover/autodiscover.xml", "/autodiscover/autodiscover.xml"),
    ("/Autodiscover/Autodiscover.xml", "/Autodiscover/Autodiscover.xml"),
    ("/AutoDiscover/AutoDiscover.XML?x=1", "/AutoDiscover/AutoDiscover.XML?x=1"),
    ("/autodiscover/autodiscover.json?Email=a%40b.example&Protocol=ActiveSync",
     "/autodiscover/autodiscover.json?Email=a%40b.example&Protocol=ActiveSync"),
    ("/autodiscover/autodiscover.json/v1.0/alice@corp.example?Protocol=ActiveSync",
     "/autodiscover/autodiscover.json/v1.0/alice@corp.example?Protocol=ActiveSync"),
    ("/autodiscover/autodiscover.json/v1.0/alice%40corp.example?Protocol=ActiveSync",
     "/autodiscover/autodiscover.json/v1.0/alice@corp.example?Protocol=ActiveSync"),
    ("/autodiscover/autodiscover.json/v1.0/%2e%2e?Protocol=ActiveSync", None),
    ("/autodiscover/autodiscover.json/v1.0/a%2fb", None),
    ("/autodiscover/autodiscover.json/v1.0/a/b", None),
    ("/autodiscover/autodiscover.json/v1.0/a%00b", None),
    ("/autodiscover/autodiscover.json/v1.0/%ff", None),
    ("/autodiscover/autodiscover.json/v2.0/a", None),
    ("/autodiscover/autodiscover.json/../../Microsoft-Server-ActiveSync", None),
    ("/autodiscover/autodiscover%2Exml", None),
])
def test_upstream_target_only_for_plain_spellings(raw: str, target: str | None) -> None:
    """Only the served forms, spelt plainly, go upstream (an address segment is
    decoded and re-encoded); dot segments, encoded slashes and the like are None."""
    assert upstream_target(raw) == target


@pytest.mark.pure
def test_kind_by_path() -> None:
    """The decoded path names the form, in any letter case."""
    assert autodiscover_kind("/AutoDiscover/autodiscover.xml") == "xml"
    assert autodiscover_kind("/autodiscover/autodiscover.json/v1.0/a") == "json"
    assert autodiscover_kind("/autodiscover/autodiscover.jsonx") is None
    assert autodiscover_kind("/autodiscover") is None


# ------------------------------------------------------------------ config


LISTENER = """
[[listeners]]
name = "eas"
protocol = "{protocol}"
listen = "127.0.0.1:8443"
upstream = "{upstream}"
public_url = "{public}"
"""


@pytest.mark.pure
@pytest.mark.parametrize(("protocol", "upstream", "public", "ok"), [
    ("activesync", UP, "https://mail.corp.example/", True),
    ("activesync", UP, "https://mail.corp.example:8443", True),
    ("activesync", UP, "https://mail.corp.example/eas", False),
    ("activesync", UP, "mail.corp.example", False),
    ("activesync", UP, "https://mail.corp.example:99999", False),
    ("imap", "127.0.0.1:993", "https://mail.corp.example", False),
])
def test_public_url_config(tmp_path: Path, protocol: str, upstream: str, public: str,
                           ok: bool) -> None:
    """``public_url`` is an http(s) origin on an ActiveSync listener, stored without
    a trailing slash; anything else is a config error naming the key."""
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "mailward.toml"
    path.write_text(LISTENER.format(protocol=protocol, upstream=upstream, public=public))
    if ok:
        [listener] = load_config(path).listeners
        assert listener.public_url == public.rstrip("/")
    else:
        with pytest.raises(ConfigError, match="public_url"):
            load_config(path)


# --------------------------------------------------------- through mailward


async def _autodiscover(env: Env, path: str = "/autodiscover/autodiscover.xml", *,
                        method: str = "POST", body: bytes | None = None,
                        headers: dict[str, str] | None = None
                        ) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=env.client_ssl)
                                     ) as s:
        h = {"Authorization": auth(), "Content-Type": "text/xml", **(headers or {})}
        if body is None and method == "POST":
            body = autodiscover_request("alice@corp.example")
        async with s.request(method, f"https://127.0.0.1:{env.proxy.port}{path}",
                             data=body, headers=h) as resp:
            return resp, await resp.read()


@pytest.mark.conversation
@pytest.mark.parametrize("path", ["/autodiscover/autodiscover.xml",
                                  "/Autodiscover/Autodiscover.xml"])
async def test_autodiscover_post_answered_with_mobilesync_url_rewritten(
        env: Env, path: str) -> None:
    """An Autodiscover POST reaches the upstream byte for byte (one Authorization,
    mailward's X-Forwarded-For) and comes back as the upstream's answer with only the
    MobileSync Url and Name set to public_url; no decision is recorded."""
    request = autodiscover_request("alice@corp.example")
    resp, body = await _autodiscover(env, path, body=request)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/xml")
    expected = autodiscover_response(env.upstream.base, "alice@corp.example")
    assert body == expected.replace((env.upstream.base + EAS_URL).encode(),
                                    (PUBLIC_URL + EAS_URL).encode())
    assert (env.upstream.base + "/CertEnroll").encode() in body
    [seen] = env.upstream.seen
    assert (seen.method, seen.raw_path, seen.body) == ("POST", path, request)
    assert seen.headers.getall("Authorization") == [auth()]
    assert seen.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert [r for r in env.records if r.get("event") == "decision"] == []


@pytest.mark.conversation
async def test_hostile_host_header_does_not_change_the_rewritten_url(env: Env) -> None:
    """A client's Host header (and X-Forwarded-Host) never reaches the rewritten
    address: it is public_url whatever the client claims."""
    resp, body = await _autodiscover(env, headers={"Host": "evil.example",
                                                   "X-Forwarded-Host": "evil.example"})
    assert resp.status == 200
    assert f"<Url>{PUBLIC_URL}{EAS_URL}</Url>".encode() in body
    assert b"evil" not in body


@pytest.mark.conversation
async def test_url_not_equal_to_the_upstream_address_is_left_alone(env: Env) -> None:
    """An upstream naming another host for MobileSync is passed as it answered."""
    answer = autodiscover_response(env.upstream.base, "alice@corp.example",
                                   mobilesync="https://eas.other.example")
    env.upstream.autodiscover_answer = answer
    resp, body = await _autodiscover(env)
    assert resp.status == 200 and body == answer


@pytest.mark.conversation
async def test_entity_bomb_from_the_upstream_is_not_expanded(env: Env) -> None:
    """An upstream answer with a DTD (entity bomb, external entity) passes unchanged:
    byte for byte, nothing expanded, nothing rewritten, logged."""
    for answer in (BOMB.replace(UP.encode(), env.upstream.base.encode()), XXE):
        env.upstream.autodiscover_answer = answer
        with capture_logs() as logs:
            resp, body = await _autodiscover(env)
        assert resp.status == 200 and body == answer
        assert any(e.get("reason") == "DTD" for e in logs), logs


@pytest.mark.conversation
async def test_json_form_url_rewritten(env: Env) -> None:
    """``GET .../autodiscover.json/v1.0/<address>?Protocol=ActiveSync`` (Outlook
    mobile) gets the upstream's JSON with Url set to public_url; EWS is left alone;
    the upstream's 400 for a bad protocol passes."""
    path = "/autodiscover/autodiscover.json/v1.0/alice%40corp.example?Protocol=ActiveSync"
    resp, body = await _autodiscover(env, path, method="GET", headers={"Authorization": ""})
    assert resp.status == 200
    assert body == b'{"Protocol": "ActiveSync", "Url": "' + \
        (PUBLIC_URL + EAS_URL).encode() + b'"}'
    assert env.upstream.seen[-1].raw_path == path.replace("%40", "@")
    resp, body = await _autodiscover(env, path.replace("ActiveSync", "EWS"), method="GET")
    assert resp.status == 200 and env.upstream.base.encode() + b"/EWS" in body
    resp, body = await _autodiscover(env, path.replace("ActiveSync", "Nope"), method="GET")
    assert resp.status == 400 and b"InvalidProtocol" in body


@pytest.mark.conversation
async def test_wrong_password_401_passes_and_counts_as_failed_login(env: Env) -> None:
    """The upstream's 401 reaches the client with its challenge, and a request with
    Basic credentials is a failed login for (user, address) at the front end's hook;
    one without credentials is not."""
    with capture_logs() as logs:
        resp, _ = await _autodiscover(env, headers={"Authorization": auth(password="guess")})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="upstream"'
    assert env.proxy.frontend.autodiscover_auth_failures == 1
    [failed] = [e for e in logs if e["event"] == "autodiscover login failed"]
    assert (failed["user"], failed["client_ip"]) == ("alice@corp.example", "127.0.0.1")
    resp, _ = await _autodiscover(env, headers={"Authorization": ""})
    assert resp.status == 401 and env.proxy.frontend.autodiscover_auth_failures == 1
    assert [r for r in env.records if r.get("event") == "decision"] == []


@pytest.mark.conversation
@pytest.mark.parametrize("extra", [
    (b"Authorization: " + auth("bob@corp.example").encode(),),
    (b"Connection: close, Authorization",),
], ids=["two-authorization", "connection-authorization"])
async def test_hygiene_refusals_apply(env: Env, extra: tuple[bytes, ...]) -> None:
    """The ActiveSync request hygiene applies: two Authorization headers or a
    Connection header naming one is 400, and nothing reaches the upstream."""
    for path in (b"/autodiscover/autodiscover.xml", b"/Autodiscover/Autodiscover.xml"):
        status, _ = await raw_exchange(env, _raw_post(path, *extra))
        assert status == 400
    status, _ = await raw_exchange(
        env, _raw_post(b"https://evil.example/autodiscover/autodiscover.xml"))
    assert status == 400
    assert env.upstream.seen == []


@pytest.mark.conversation
async def test_oversized_body_is_413(env: Env) -> None:
    """A body over the cap is 413, declared or chunked, and is not sent upstream."""
    big = b"<x>" + b"a" * MAX_BODY_BYTES + b"</x>"
    resp, _ = await _autodiscover(env, body=big)
    assert resp.status == 413

    async def chunked() -> object:
        for _ in range(4):
            yield b"a" * (MAX_BODY_BYTES // 2)

    resp, _ = await _autodiscover(env, body=chunked())  # type: ignore[arg-type]
    assert resp.status == 413
    assert env.upstream.seen == []


@pytest.mark.conversation
async def test_paths_spelt_otherwise_never_reach_the_upstream(env: Env) -> None:
    """A dot segment or encoded slash in the JSON path, another method, or another
    path is answered by mailward and never forwarded."""
    for target in (b"/autodiscover/autodiscover.json/v1.0/%2e%2e%2fMicrosoft-Server-"
                   b"ActiveSync?Cmd=Sync", b"/autodiscover/autodiscover.json/v1.0/a%2fb",
                   b"/autodiscover/other.xml"):
        status, _ = await raw_exchange(env, _raw_post(target))
        assert status == 404, target
    resp, _ = await _autodiscover(env, method="DELETE")
    assert resp.status == 405
    assert env.upstream.seen == []


@pytest.mark.conversation
async def test_without_public_url_answers_pass_unchanged(env: Env, ca: trustme.CA) -> None:
    """A listener without public_url warns at start and passes the answer as the
    upstream sent it."""
    with capture_logs() as logs:
        proxy = await _start_proxy(ca, env.gate, env.upstream.base, public_url=None)
    try:
        assert any(e["event"].startswith("public_url not set") for e in logs)
        other = Env(**{**env.__dict__, "proxy": proxy})
        resp, body = await _autodiscover(other)
        assert resp.status == 200
        assert body == autodiscover_response(env.upstream.base, "alice@corp.example")
    finally:
        await proxy.close(0.5)
