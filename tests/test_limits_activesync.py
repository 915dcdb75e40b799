"""DESIGN "Limits" on the ActiveSync listener (issue 13): slow request heads cut off on
ActiveSync and Autodiscover, failed logins throttled per (user, address) or per
verified device certificate, streamed bodies up to ``eas_max_body`` and 413 beyond,
unauthenticated garbage summarised, and the hits in ``/metrics``.

Clients are raw TLS and TCP sockets and aiohttp against the fake EAS upstream of
``test_activesync`` (its fixtures, imported); the gate's limits are replaced by small
ones before the first connection (the front end reads them from the gate).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from pki_helpers import TIKTOK, USER
from test_activesync import (
    EAS,
    ROOT,
    Env,
    RecordingAudit,
    Upstream,
    _start_upstream,
    auth,
    autodiscover_request,
    env,
)
from test_activesync_identity import (
    Phones,
    answered_within,
    ca,
    make_env,
    parked_ping,
    tls_client,
)

from proxy.config import LimitsConfig, ListenerConfig, load_policy
from proxy.frontends import FrontendContext
from proxy.frontends.activesync import start
from proxy.gate import Gate
from proxy.metrics import PrometheusObserver
from proxy.net.limits import Limits
from proxy.posture.sqlite import SqlitePostureStore

__all__ = ["ca", "env", "make_env"]  # fixtures, imported

pytestmark = pytest.mark.conversation

SMALL = LimitsConfig(header_timeout_s=0.5, auth_failures=2, auth_delay_s=0.5,
                     auth_delay_max_s=1.0, eas_max_body=2 * 1024 * 1024)
SYNC = f"Cmd=Sync&User={USER}&DeviceId=dev-ok&DeviceType=x"


def small_limits(gate: Gate) -> Limits:
    """Replace the gate's limits by :data:`SMALL`, hits counted in Prometheus."""
    gate.limits = Limits(SMALL, on_hit=PrometheusObserver().limit_hit)
    return gate.limits


@pytest.fixture
async def lenv(env: Env) -> Env:
    small_limits(env.gate)
    return env


# ------------------------------------------------------------------ helpers


def head(target: str, password: str = "wrong", method: str = "POST", body: int = 0) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: {auth(USER, password)}\r\nMS-ASProtocolVersion: 14.1\r\n"
            f"Content-Length: {body}\r\nConnection: close\r\n\r\n").encode()


async def exchange(env: Env, data: bytes, *, local: str = "127.0.0.1",
                   tls: ssl.SSLContext | None = None,
                   head_only: bool = False) -> tuple[int, float]:
    """One request over a fresh TLS connection from ``local``: (status, seconds).
    ``head_only`` reads the answer's head and hangs up, for a request whose declared
    body is never sent (aiohttp would wait up to its 10 s lingering time for it)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.proxy.port, ssl=tls or env.client_ssl, server_hostname="localhost",
        local_addr=(local, 0))
    try:
        writer.write(data)
        answer = await (reader.readuntil(b"\r\n\r\n") if head_only else reader.read())
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), time.monotonic() - started


async def dribbled_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                data: bytes, every: float, bound: float) -> float:
    """Send ``data`` one byte every ``every`` seconds until the server closes the
    connection; the seconds that took (AssertionError after ``bound``)."""
    started = time.monotonic()
    for byte in data:
        writer.write(bytes([byte]))
        try:
            await writer.drain()
            got = await asyncio.wait_for(reader.read(1), every)
        except TimeoutError:
            got = None
        except (ConnectionError, ssl.SSLError):
            got = b""
        if got == b"":
            return time.monotonic() - started
        assert time.monotonic() - started < bound, "the slow head was not cut off"
    raise AssertionError("the whole head went out")


def hits(text: str, limit: str, listener: str = "eas") -> float:
    """The value of ``mailward_limit_hits_total{limit,listener}`` in /metrics text."""
    for line in text.splitlines():
        if line.startswith("mailward_limit_hits_total{") and f'limit="{limit}"' in line \
                and f'listener="{listener}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------- slowloris


@pytest.mark.parametrize("target", [f"{EAS}?{SYNC}", "/autodiscover/autodiscover.xml"],
                         ids=["activesync", "autodiscover"])
async def test_slow_request_head_is_cut_off(lenv: Env, target: str) -> None:
    """A client sending its request head one byte every 0.2 s is disconnected once
    header_timeout (0.5 s) has passed, long before the head is complete; the cut-off
    is counted as a limit hit and as abuse of the address."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lenv.proxy.port, ssl=lenv.client_ssl, server_hostname="localhost")
    try:
        elapsed = await dribbled_until_closed(reader, writer, head(target) * 4, 0.2, 10.0)
    finally:
        writer.close()
    assert elapsed < 10.0
    [summary] = lenv.gate.limits.abuse_summaries()
    assert summary["counts"] == {"slow_request_head": 1} and summary["listeners"] == ["eas"]


async def test_slow_head_cut_off_on_a_plain_http_listener(
        tmp_path: Path, ca: trustme.CA) -> None:
    """The same on a listener without TLS (behind a TLS-terminating balancer)."""
    upstream = Upstream()
    up_runner, up_port = await _start_upstream(ca, upstream)
    store = SqlitePostureStore(tmp_path / "posture.db")
    audit = RecordingAudit(tmp_path / "audit.jsonl", signing_key=None)
    audit.records = []
    policy = load_policy(ROOT / "config" / "policy.toml")
    gate = Gate(store=store, audit=audit, policy=lambda: policy)
    small_limits(gate)
    up_tls = ssl.create_default_context()
    ca.configure_trust(up_tls)
    listener = ListenerConfig(name="eas-plain", protocol="activesync", host="127.0.0.1",
                              port=0, tls="none", upstream=f"https://127.0.0.1:{up_port}")
    proxy = await start(FrontendContext(listener, gate, None, up_tls))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            elapsed = await dribbled_until_closed(reader, writer, head(f"{EAS}?{SYNC}") * 4,
                                                  0.2, 10.0)
        finally:
            writer.close()
        assert elapsed < 10.0
        [summary] = gate.limits.abuse_summaries()
        assert summary["listeners"] == ["eas-plain"]
    finally:
        await proxy.close(0.1)
        await up_runner.cleanup()
        await store.close()
        await audit.close()


async def test_a_slow_body_is_not_a_slow_head(lenv: Env) -> None:
    """The clock stops once the head is complete: a SendMail body that takes longer
    than header_timeout to arrive still goes through."""
    await lenv.attest("dev-ok", [])

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 1000
            await asyncio.sleep(0.3)

    resp = await lenv.post(f"Cmd=SendMail&User={USER}&DeviceId=dev-ok&DeviceType=x",
                           body(), headers={"Content-Type": "message/rfc822"})
    assert resp.status == 200
    assert lenv.upstream.posts("SendMail")[-1].body == b"x" * 4000


# ----------------------------------------------------------- failed logins


async def test_wrong_passwords_are_delayed_per_user_and_address(lenv: Env) -> None:
    """After auth_failures (2) wrong passwords, whether on ActiveSync, OPTIONS or
    Autodiscover, each further answer to that (user, address) pair waits a delay that
    doubles up to its maximum; the right password still works (after the wait), and
    clears the pair; another address is not delayed."""
    await lenv.attest("dev-ok", [])
    sync = head(f"{EAS}?{SYNC}")
    xml = autodiscover_request(USER)
    discover = head("/autodiscover/autodiscover.xml", body=len(xml)) + xml
    options = head(EAS, method="OPTIONS")
    answers = [await exchange(lenv, data) for data in (sync, options, discover, sync, sync)]
    assert [status for status, _ in answers] == [401] * 5
    delays = [elapsed for _, elapsed in answers]
    assert delays[2] >= 0.5 and delays[3] >= 1.0 and delays[4] >= 1.0  # capped at 1 s
    lim = lenv.gate.limits
    assert lim.auth_failures(USER, "127.0.0.1") == 5
    # Another address, same user: its own count, no delay yet.
    status, elapsed = await exchange(lenv, sync, local="127.0.0.2")
    assert status == 401 and elapsed < 0.5
    assert lim.auth_failures(USER, "127.0.0.2") == 1
    # The right password from the throttled address: answered after the wait, then
    # the pair starts afresh.
    status, elapsed = await exchange(lenv, head(f"{EAS}?{SYNC}", "correct horse"))
    assert status == 200 and elapsed >= 1.0
    assert lim.auth_failures(USER, "127.0.0.1") == 0
    assert [r for r in lenv.records if r.get("event") == "decision"
            and r["reasons"] and r["reasons"][0]["code"] == "auth_failed"]


async def test_wrong_password_on_a_cached_session_counts_too(lenv: Env) -> None:
    """A request on an admitted device-session whose password the upstream now refuses
    is a failed login as well: past the threshold its 401 waits."""
    await lenv.attest("dev-ok", [])
    assert (await lenv.post(SYNC)).status == 200  # admitted and cached
    other = head(f"{EAS}?{SYNC.replace('dev-ok', 'dev-other')}")
    assert [(await exchange(lenv, other))[0] for _ in range(2)] == [401, 401]
    status, elapsed = await exchange(lenv, head(f"{EAS}?{SYNC}"))  # on the cached session
    assert status == 401 and elapsed >= 0.5
    assert lenv.gate.limits.auth_failures(USER, "127.0.0.1") == 3
    ends = [r["detail"] for r in lenv.records if r.get("reason") == "eas_session"]
    assert ends == ["auth_failed requests=2"]


async def test_a_verified_device_certificate_is_not_delayed_by_others(
        make_env: Callable[..., Awaitable[tuple[Env, Phones]]]) -> None:
    """Failures of the same user from other clients behind the phone's address do not
    delay the phone that presents its verified device certificate."""
    env, phones = await make_env()
    small_limits(env.gate)
    await env.attest("PHONE1", [])
    bare = head(f"{EAS}?Cmd=Sync&User={USER}&DeviceId=OTHER&DeviceType=x")
    for _ in range(4):
        assert (await exchange(env, bare, tls=tls_client(env, None)))[0] == 401
    assert env.gate.limits.auth_wait(USER, "127.0.0.1") >= 0.5
    phone = tls_client(env, phones.cert("PHONE1"))
    status, elapsed = await exchange(
        env, head(f"{EAS}?Cmd=Sync&User={USER}&DeviceId=PHONE1&DeviceType=x",
                  "correct horse"), tls=phone)
    assert status == 200 and elapsed < 0.5


async def test_open_ping_of_a_session_dropped_by_a_401_still_ends_on_tiktok(
        lenv: Env) -> None:
    """A wrong password on a device-session drops it from the cache while its Ping is
    open; the Ping stays covered: a TikTok report ends it with 403 (within 10 s)."""
    await lenv.attest("PHONE9", [])
    ping = await parked_ping(lenv, "PHONE9", None)
    wrong = head(f"{EAS}?Cmd=Sync&User={USER}&DeviceId=PHONE9&DeviceType=iPhone")
    assert (await exchange(lenv, wrong))[0] == 401
    assert not lenv.proxy.frontend.sessions.by_key
    status, elapsed = await answered_within(ping, lenv.attest("PHONE9", [TIKTOK]))
    assert status == 403 and elapsed < 10.0


# ------------------------------------------------------------------- bodies


async def _upload(env: Env, query: str, size: int, *, chunked: bool) -> tuple[int, bytes]:
    """Send a ``size``-byte body over a raw TLS connection (chunked or with
    Content-Length), reading the answer while sending: (status, answer)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.proxy.port, ssl=env.client_ssl, server_hostname="localhost")
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    writer.write(f"POST {EAS}?{query} HTTP/1.1\r\nHost: localhost\r\n"
                 f"Authorization: {auth()}\r\nMS-ASProtocolVersion: 14.1\r\n"
                 f"Content-Type: message/rfc822\r\n{framing}\r\nConnection: close\r\n\r\n"
                 .encode())
    piece = os.urandom(64 * 1024)

    async def send() -> None:
        sent = 0
        while sent < size:
            n = min(len(piece), size - sent)
            writer.write(b"%x\r\n%s\r\n" % (n, piece[:n]) if chunked else piece[:n])
            await writer.drain()
            sent += n
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_large_sendmail_streams_up_to_eas_max_body(lenv: Env, chunked: bool) -> None:
    """A 1.5 MiB SendMail (under eas_max_body, 2 MiB here) is streamed to the upstream
    whole; a 3 MiB one is 413 and the upstream never gets a complete request."""
    await lenv.attest("dev-ok", [])
    query = f"Cmd=SendMail&User={USER}&DeviceId=dev-ok&DeviceType=x"
    status, answer = await _upload(lenv, query, 1536 * 1024, chunked=chunked)
    assert status == 200
    [sent] = lenv.upstream.posts("SendMail")
    assert len(sent.body) == 1536 * 1024
    assert hashlib.sha256(sent.body).hexdigest().encode() in answer
    status, _ = await _upload(lenv, query, 3 * 1024 * 1024, chunked=chunked)
    assert status == 413
    assert len(lenv.upstream.posts("SendMail")) == 1


# ------------------------------------------------------------------ garbage


async def test_garbage_is_summarised_not_recorded(lenv: Env) -> None:
    """60 pieces of unauthenticated garbage (bad queries, unknown paths, a refused
    method, hygiene refusals) become one abuse_summary per address with the counts,
    not a record or log line each."""
    from structlog.testing import capture_logs

    lenv.gate.limits.abuse_summaries()
    garbage = [head(f"{EAS}?Cmd=Sync"), head("/owa/"), head(EAS, method="GET"),
               head(f"{EAS}?{SYNC}#x")]
    with capture_logs() as logs:
        for data in garbage * 15:
            status, _ = await exchange(lenv, data)
            assert status in (400, 404, 405)
    assert lenv.records == [] and lenv.upstream.seen == []
    assert len(logs) < 10
    [summary] = lenv.gate.limits.abuse_summaries()
    assert summary["client_ip"] == "127.0.0.1" and summary["total"] == 60
    assert summary["counts"] == {"bad_query": 15, "unknown_path": 15, "bad_method": 15,
                                 "fragment": 15}
    await lenv.gate.record_abuse([summary])
    assert [r["event"] for r in lenv.records] == ["abuse_summary"]


# ------------------------------------------------------------------ metrics


async def test_limit_hits_are_in_metrics_for_the_activesync_listener(lenv: Env) -> None:
    """/metrics shows mailward_limit_hits_total{limit,listener="eas"} for a throttled
    login, a slow head and a body over eas_max_body."""
    before = (await (await lenv.api.get("/metrics")).text())
    for _ in range(3):
        await exchange(lenv, head(f"{EAS}?{SYNC}"))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lenv.proxy.port, ssl=lenv.client_ssl, server_hostname="localhost")
    try:
        await dribbled_until_closed(reader, writer, head(EAS) * 4, 0.2, 10.0)
    finally:
        writer.close()
    status, _ = await exchange(lenv, head(f"{EAS}?{SYNC}", body=3 * 1024 * 1024),
                             head_only=True)
    assert status == 413
    after = (await (await lenv.api.get("/metrics")).text())
    for limit in ("auth_delay", "header_timeout", "eas_max_body"):
        assert hits(after, limit) >= hits(before, limit) + 1, limit
