"""IMAP front end against a real Dovecot, driven by real clients (imaplib, imapclient).

The gate is the real Gate with the real SqlitePostureStore and AuditLog; postures are
put into the store directly (attestation over HTTP is tested elsewhere). Device
certificates come from ``proxy.pki``. Blocking clients run in threads so the proxy can
run on the test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import os
import random
import re
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.frontend_env import FrontendEnv
from helpers.tls import Pki, enrolled_pki
from imapclient import IMAPClient
from limits_helpers import wait_abuse
from peers import peer_missing
from peers.dovecot import Dovecot, make_message, require_dovecot
from pki_helpers import fresh_posture as posture

from proxy.config import ListenerConfig
from proxy.frontends.imap import start
from proxy.posture import App

pytestmark = pytest.mark.peer
RUN_ON_BOTH_LOOPS = True  # see conftest.py

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "alice@corp.example", "bob@corp.example"
SYNC = "sync@corp.example"
PASSWORDS = {ALICE: "alice-secret", BOB: "bob-secret", SYNC: "sync-secret"}
SYNC_MESSAGES = 300
TIKTOK = App("com.zhiliaoapp.musically", "35.1.3", "TikTok")
MESSAGES = 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    devices = (("alice-phone", ALICE), ("alice-tiktok", ALICE), ("bob-phone", BOB),
               ("sync-phone", SYNC))
    return enrolled_pki(tmp_path_factory.mktemp("pki"), devices)


@pytest.fixture(scope="module")
def dovecot(pki: Pki) -> Iterator[Dovecot]:
    require_dovecot()
    dv = Dovecot(pki.dir / "server.pem", pki.dir / "server.key", PASSWORDS)
    with dv:
        dv.deliver(ALICE, [make_message(i, 2000) for i in range(MESSAGES)])
        dv.deliver(SYNC, [make_message(i, 500 + 37 * i) for i in range(SYNC_MESSAGES)])
        yield dv


class Env(FrontendEnv):
    """A running IMAP listener with its gate, store and audit log."""

    def __init__(self, pki: Pki, dovecot: Dovecot, tmp: Path) -> None:
        super().__init__(pki, tmp)
        self.dovecot = dovecot

    async def listen(self, **overrides: object) -> int:
        cfg = ListenerConfig(
            name=str(overrides.pop("name", "imaps")), protocol="imap", host="127.0.0.1",
            port=0, upstream=f"127.0.0.1:{self.dovecot.port_tls}", tls="implicit",
            client_cert="optional", unidentified="deny", upstream_tls="implicit",
            upstream_ca=self.pki.dir / "ca.pem", preauth_idle_timeout_s=10,
            preauth_timeout_s=30, upstream_connect_timeout_s=3, upstream_timeout_s=5,
        )
        cfg = replace(cfg, **overrides)  # type: ignore[arg-type]
        return await self.start(cfg, start)


@pytest.fixture
async def env(pki: Pki, dovecot: Dovecot, tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(pki, dovecot, tmp_path)
    await e.put(posture("alice-phone", ALICE))
    await e.put(posture("alice-tiktok", ALICE, (TIKTOK,)))
    await e.put(posture("bob-phone", BOB))
    await e.put(posture("sync-phone", SYNC))
    yield e
    await e.close()


def imaps(pki: Pki, port: int, device: str | None = "alice-phone") -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("localhost", port, ssl_context=pki.client_ctx(device), timeout=10)


def run(fn, *args):
    return asyncio.to_thread(fn, *args)


def fetch_all(m: imaplib.IMAP4) -> list[bytes]:
    m.select("INBOX", readonly=True)
    _, data = m.fetch("1:*", "(BODY.PEEK[])")
    return [part[1] for part in data if isinstance(part, tuple)]


# ------------------------------------------------------------------------------ allow


async def test_compliant_device_logs_in_and_fetches_same_bytes_as_direct(env: Env, pki: Pki):
    """LOGIN over implicit TLS with a device cert is spliced; FETCH equals direct Dovecot."""
    port = await env.listen()

    def through_proxy() -> tuple[list[bytes], tuple]:
        m = imaps(pki, port)
        assert b"IMAP4rev1" in m.welcome and b"IDLE" in m.welcome
        assert m.login(ALICE, PASSWORDS[ALICE])[0] == "OK"
        msgs = fetch_all(m)
        caps = m.capabilities
        m.logout()
        return msgs, caps

    def direct() -> list[bytes]:
        m = imaplib.IMAP4_SSL("localhost", env.dovecot.port_tls, ssl_context=pki.client_ctx())
        m.login(ALICE, PASSWORDS[ALICE])
        msgs = fetch_all(m)
        m.logout()
        return msgs

    proxied, caps = await run(through_proxy)
    assert len(proxied) >= MESSAGES  # the IDLE test may have delivered more
    assert proxied == await run(direct)
    assert "IDLE" in caps  # the upstream's post-login CAPABILITY reached the client
    recs = await env.wait_records(1, "decision")
    assert [(r["decision"], r["user"], r["device_id"], r["client_ip"]) for r in recs] == [
        ("allow", ALICE, "alice-phone", "127.0.0.1")]
    assert recs[0]["device_source"] == "client_cert"
    assert "alice-secret" not in (env.tmp / "audit.jsonl").read_text()


async def test_client_ip_reaches_audit_and_dovecot(env: Env, pki: Pki):
    """A client from 127.0.0.2 is logged with that address by mailward and, through
    ``ID x-originating-ip``, by Dovecot, though the proxy connects from 127.0.0.1."""
    port = await env.listen()

    def go() -> bytes:
        raw = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        s = pki.client_ctx("alice-phone").wrap_socket(raw, server_hostname="localhost")
        f = s.makefile("rb")
        f.readline()
        s.sendall(f'a ID ("name" "test-client")\r\nb LOGIN {ALICE} {PASSWORDS[ALICE]}\r\n'
                  .encode())
        lines = [f.readline() for _ in range(3)]
        s.sendall(b"c LOGOUT\r\n")
        f.readline()
        s.close()
        return lines[2]

    assert (await run(go)).startswith(b"b OK")
    recs = await env.wait_records(1, "decision")
    assert recs[0]["client_ip"] == "127.0.0.2"
    deadline = time.monotonic() + 5
    while "rip=127.0.0.2" not in env.dovecot.log_tail(50000) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "rip=127.0.0.2" in env.dovecot.log_tail(50000)


async def test_authenticate_plain_with_and_without_sasl_ir(env: Env, pki: Pki):
    """AUTHENTICATE PLAIN works with an initial response and with a continuation."""
    port = await env.listen()

    def go() -> None:
        cred = f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()
        m = imaps(pki, port)
        typ, _ = m.authenticate("PLAIN", lambda _: cred)  # imaplib: continuation, no IR
        assert typ == "OK"
        m.select("INBOX")
        m.logout()
        s = pki.client_ctx("alice-phone").wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        s.sendall(b"a AUTHENTICATE PLAIN " + base64.b64encode(cred) + b"\r\n")
        line = f.readline()
        assert line.startswith(b"a OK"), line
        s.sendall(b"b LOGOUT\r\n")
        assert f.readline().startswith(b"* BYE")
        s.close()

    await run(go)
    recs = await env.wait_records(2, "decision")
    assert [r["decision"] for r in recs] == ["allow", "allow"]


async def test_starttls_listener(env: Env, pki: Pki):
    """Before TLS: STARTTLS + LOGINDISABLED advertised, LOGIN refused PRIVACYREQUIRED
    without a decision; after STARTTLS login works (upstream via STARTTLS too)."""
    port = await env.listen(name="imap", tls="starttls", upstream_tls="starttls",
                            upstream=f"127.0.0.1:{env.dovecot.port_plain}")

    def go() -> None:
        m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        assert "STARTTLS" in m.capabilities and "LOGINDISABLED" in m.capabilities
        # imaplib.login would refuse by itself (LOGINDISABLED): send the command anyway.
        typ, data = m._simple_command("LOGIN", ALICE, PASSWORDS[ALICE])
        assert typ == "NO" and b"[PRIVACYREQUIRED]" in data[0], data
        m.starttls(pki.client_ctx("alice-phone"))
        assert "STARTTLS" not in m.capabilities and "AUTH=PLAIN" in m.capabilities
        assert m.login(ALICE, PASSWORDS[ALICE])[0] == "OK"
        m.select("INBOX")
        m.logout()

    await run(go)
    recs = await env.wait_records(1, "decision")
    assert [(r["decision"], r["device_id"]) for r in recs] == [("allow", "alice-phone")]
    assert env.records("session_end") == []


async def test_cleartext_refused_without_touching_upstream_is_not_recorded(env: Env):
    """A client that only tries cleartext LOGIN and leaves never completed TLS: no
    session_end record (DESIGN "Sessions, in order", 4), no decision."""
    port = await env.listen(name="imap", tls="starttls")

    def go() -> bytes:
        s = socket.create_connection(("127.0.0.1", port))
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a LOGIN alice pw\r\nb AUTHENTICATE PLAIN\r\nc LOGOUT\r\n")
        out = f.readline() + f.readline()
        s.close()
        return out

    out = await run(go)
    assert out == (b"a NO [PRIVACYREQUIRED] Use STARTTLS or the TLS port before logging in\r\n"
                   b"b NO [PRIVACYREQUIRED] Use STARTTLS or the TLS port before logging in\r\n")
    for _ in range(250):  # until the session is over
        if not env.listeners[-1].sessions:
            break
        await asyncio.sleep(0.02)
    assert not env.listeners[-1].sessions
    assert env.records("session_end") == []
    assert env.records("decision") == []


async def test_imapclient_and_idle(env: Env, pki: Pki):
    """imapclient logs in and IDLE delivers an EXISTS pushed by a new message."""
    port = await env.listen()

    def go() -> list:
        c = IMAPClient("localhost", port=port, ssl=True, ssl_context=pki.client_ctx("alice-phone"),
                       timeout=10)
        c.login(ALICE, PASSWORDS[ALICE])
        c.select_folder("INBOX")
        c.idle()
        env.dovecot.deliver(ALICE, [make_message(999)])
        responses = c.idle_check(timeout=8)
        c.idle_done()
        c.logout()
        return responses

    responses = await run(go)
    assert any(r[1] == b"EXISTS" for r in responses), responses


async def test_mbsync_syncs_mailbox_with_device_certificate(env: Env, pki: Pki, tmp_path: Path):
    """mbsync (isync) pulls a few hundred messages through the proxy with a client cert;
    the local copies equal what Dovecot stores."""
    if shutil.which("mbsync") is None:
        peer_missing("mbsync missing (Debian package isync)")
    port = await env.listen()
    cert, key = pki.device("sync-phone")
    local = tmp_path / "local"
    local.mkdir()
    conf = tmp_path / "mbsyncrc"
    conf.write_text(f"""IMAPAccount proxy
Host localhost
Port {port}
User {SYNC}
Pass {PASSWORDS[SYNC]}
SSLType IMAPS
CertificateFile {pki.dir / "ca.pem"}
ClientCertificate {cert}
ClientKey {key}

IMAPStore remote
Account proxy

MaildirStore local
Path {local}/
Inbox {local}/INBOX

Channel sync
Far :remote:
Near :local:
Patterns INBOX
Sync Pull
Create Near
SyncState *
""")
    proc = await asyncio.create_subprocess_exec(
        "mbsync", "-c", str(conf), "sync",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode(errors="replace")
    # mbsync stores LF line ends and adds its own X-TUID header while syncing.
    synced = sorted(re.sub(rb"(?m)^X-TUID: .*\n", b"", p.read_bytes().replace(b"\r\n", b"\n"))
                    for p in (local / "INBOX").glob("*/*") if p.is_file())
    stored = sorted(p.read_bytes().replace(b"\r\n", b"\n")
                    for p in env.dovecot.maildir(SYNC).glob("*/*") if p.is_file())
    assert len(synced) == SYNC_MESSAGES
    assert synced == stored
    recs = await env.wait_records(1, "decision")
    assert {(r["decision"], r["device_id"]) for r in recs} == {("allow", "sync-phone")}


# ------------------------------------------------------------------------------- deny


async def test_wrong_password_gets_upstream_no_and_auth_failed_record(env: Env, pki: Pki):
    port = await env.listen()

    def go() -> str:
        m = imaps(pki, port)
        with pytest.raises(imaplib.IMAP4.error) as err:
            m.login(ALICE, "wrong")
        # the connection is still usable: a second attempt succeeds
        assert m.login(ALICE, PASSWORDS[ALICE])[0] == "OK"
        m.logout()
        return str(err.value)

    text = await run(go)
    assert "AUTHENTICATIONFAILED" in text
    recs = await env.wait_records(2, "decision")
    assert [(r["decision"], [x["code"] for x in r["reasons"]]) for r in recs] == [
        ("deny", ["auth_failed"]), ("allow", [])]


async def test_tiktok_device_gets_authorizationfailed_naming_tiktok(env: Env, pki: Pki):
    port = await env.listen()

    def go() -> tuple[bytes, ...]:
        s = pki.client_ctx("alice-tiktok").wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
        f = s.makefile("rb")
        f.readline()
        s.sendall(f"t1 LOGIN {ALICE} {PASSWORDS[ALICE]}\r\n".encode())
        lines = (f.readline(), f.readline(), f.readline(), f.read())
        s.close()
        return lines

    alert, tagged, bye, rest = await run(go)
    assert alert.startswith(b"* NO [ALERT] ") and b"TikTok" in alert
    assert tagged.startswith(b"t1 NO [AUTHORIZATIONFAILED] ") and b"Uninstall TikTok" in tagged
    assert bye.startswith(b"* BYE")
    assert rest == b""
    recs = await env.wait_records(1, "decision")
    assert recs[0]["decision"] == "deny" and recs[0]["device_id"] == "alice-tiktok"
    assert [x["code"] for x in recs[0]["reasons"]] == ["prohibited_app"]


async def test_unidentified_denied_by_default_and_allowed_when_configured(env: Env, pki: Pki):
    port = await env.listen()
    port_allow = await env.listen(name="open", unidentified="allow")

    def go() -> str:
        m = imaps(pki, port, device=None)
        with pytest.raises(imaplib.IMAP4.error) as err:
            m.login(ALICE, PASSWORDS[ALICE])
        m2 = imaps(pki, port_allow, device=None)
        assert m2.login(ALICE, PASSWORDS[ALICE])[0] == "OK"
        m2.logout()
        return str(err.value)

    assert "AUTHORIZATIONFAILED" in await run(go)
    recs = await env.wait_records(2, "decision")
    assert [(r["decision"], r["device_id"]) for r in recs] == [("deny", None), ("allow", None)]
    assert recs[0]["reasons"][0]["code"] == "unidentified_device"


async def test_other_users_device_certificate_denied(env: Env, pki: Pki):
    port = await env.listen()

    def go() -> str:
        m = imaps(pki, port, device="bob-phone")
        with pytest.raises(imaplib.IMAP4.error) as err:
            m.login(ALICE, PASSWORDS[ALICE])
        return str(err.value)

    assert "AUTHORIZATIONFAILED" in await run(go)
    recs = await env.wait_records(1, "decision")
    assert recs[0]["reasons"][0]["code"] == "user_mismatch"


async def test_upstream_down_gives_unavailable(env: Env, pki: Pki):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    port = await env.listen(upstream=f"127.0.0.1:{dead_port}")

    def go() -> str:
        m = imaps(pki, port)
        with pytest.raises(imaplib.IMAP4.error) as err:
            m.login(ALICE, PASSWORDS[ALICE])
        return str(err.value)

    assert "UNAVAILABLE" in await run(go)
    # A login attempt over TLS: exactly one decision record, a temporary deny.
    recs = await env.wait_records(1, "decision")
    assert recs[0]["decision"] == "deny"
    assert recs[0]["reasons"][0]["code"] == "upstream_unavailable"
    assert recs[0]["user"] and recs[0]["client_ip"] == "127.0.0.1"
    assert env.records("session_end") == []


# ------------------------------------------------------------------------ termination


async def test_idle_session_ended_within_2s_of_noncompliant_posture(env: Env, pki: Pki):
    """After a new posture listing TikTok, the gate ends the IDLE session with * BYE."""
    port = await env.listen()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def go() -> tuple[list, float]:
        c = IMAPClient("localhost", port=port, ssl=True, ssl_context=pki.client_ctx("alice-phone"),
                       timeout=10)
        c.login(ALICE, PASSWORDS[ALICE])
        c.select_folder("INBOX")
        c.idle()
        loop.call_soon_threadsafe(started.set)
        t0 = time.monotonic()
        responses = c.idle_check(timeout=10)
        return responses, time.monotonic() - t0

    task = asyncio.ensure_future(run(go))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.2)
    await env.put(posture("alice-phone", ALICE, (TIKTOK,)))
    assert await env.gate.posture_changed("alice-phone") == 1
    responses, elapsed = await asyncio.wait_for(task, 10)
    assert elapsed < 2.5  # includes the 0.2 s head start
    assert any(r[0] == b"BYE" or b"BYE" in repr(r).encode() for r in responses), responses
    ends = await env.wait_records(1, "session_end")
    assert ends[0]["reason"] == "posture_changed" and ends[0]["device_id"] == "alice-phone"
    assert env.gate.live_sessions() == []


async def test_listener_close_says_bye_to_live_sessions(env: Env, pki: Pki):
    port = await env.listen()

    def login() -> imaplib.IMAP4_SSL:
        m = imaps(pki, port)
        m.login(ALICE, PASSWORDS[ALICE])
        return m

    m = await run(login)
    assert len(env.gate.live_sessions()) == 1
    await env.listeners.pop().close(0.1)
    line = await run(m.readline)
    assert line.startswith(b"* BYE Server shutting down")
    assert env.gate.live_sessions() == []


# ------------------------------------------------------------------------ adversarial


def tls_sock(pki: Pki, port: int, device: str | None = "alice-phone") -> ssl.SSLSocket:
    return pki.client_ctx(device).wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionError, ssl.SSLError, TimeoutError):
        pass
    return out


def works(pki: Pki, port: int) -> None:
    """The proxy still serves a normal client."""
    m = imaps(pki, port)
    assert m.login(ALICE, PASSWORDS[ALICE])[0] == "OK"
    m.logout()


async def test_starttls_injection_is_discarded(env: Env, pki: Pki):
    """Commands pipelined with STARTTLS in one packet never run (no LOGIN, no answer)."""
    port = await env.listen(name="imap", tls="starttls")

    def go() -> bytes:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a STARTTLS\r\nb CAPABILITY\r\nc LOGIN alice@corp.example alice-secret\r\n")
        ok = f.readline()
        assert ok.startswith(b"a OK")
        t = pki.client_ctx("alice-phone").wrap_socket(s, server_hostname="localhost")
        t.sendall(b"d NOOP\r\n")
        tf = t.makefile("rb")
        line = tf.readline()
        t.close()
        return line

    assert await run(go) == b"d OK NOOP completed\r\n"
    assert env.records("decision") == []
    await run(works, pki, await env.listen())


async def test_huge_literal_refused_without_continuation(env: Env, pki: Pki):
    port = await env.listen()

    def go() -> bytes:
        s = tls_sock(pki, port)
        s.recv(1000)
        s.sendall(b"a LOGIN {104857600}\r\n")
        return read_all(s)

    out = await run(go)
    assert b"+ " not in out
    assert out.startswith(b"a BAD Literal too large") and b"* BYE" in out
    recs = await env.wait_records(1, "session_end")
    assert recs[0]["reason"] == "limit_literal"
    await run(works, pki, port)


async def test_ten_thousand_preauth_noops(env: Env, pki: Pki):
    port = await env.listen()

    def go() -> bytes:
        s = tls_sock(pki, port)
        s.recv(1000)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            s.sendall(b"".join(b"n%d NOOP\r\n" % i for i in range(10_000)))
        return read_all(s)

    out = await run(go)
    assert out.count(b"OK NOOP") == 50
    assert b"* BYE Too many commands before login" in out
    recs = await env.wait_records(1, "session_end")
    assert recs[0]["reason"] == "limit_commands"
    await run(works, pki, port)


async def test_slowloris_hits_total_preauth_limit(env: Env, pki: Pki):
    """One byte per 0.2 s never trips the idle timeout, but the total pre-auth limit
    closes the connection while other clients are served."""
    port = await env.listen(preauth_idle_timeout_s=1, preauth_timeout_s=2)

    def slow() -> tuple[float, bytes]:
        s = tls_sock(pki, port)
        s.recv(1000)
        t0 = time.monotonic()
        try:
            for b in b"a NOOP" * 100:
                s.sendall(bytes([b]))
                time.sleep(0.2)
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        return time.monotonic() - t0, read_all(s)

    task = asyncio.ensure_future(run(slow))
    await run(works, pki, port)
    elapsed, out = await task
    assert elapsed < 2 + 2 + 1.5  # total limit + close linger + slack
    assert b"* BYE" in out
    recs = await env.wait_records(1, "session_end")
    assert recs[0]["reason"] == "preauth_timeout"


async def test_tls_handshake_garbage(env: Env, pki: Pki):
    port = await env.listen()

    def go() -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"\x16\x03\x01\x02\x00" + b"\xff" * 600 + b"GET / HTTP/1.0\r\n\r\n")
        read_all(s)
        s.close()

    await run(go)
    assert (await wait_abuse(env.gate.limits, "failed_handshake", 1))["failed_handshake"] == 1
    assert env.records("session_end") == []  # counted, not recorded
    await run(works, pki, port)


async def test_upstream_closing_after_greeting(env: Env, pki: Pki):
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK fake ready\r\n")
        await writer.drain()
        writer.close()

    rude_server = await asyncio.start_server(rude, "127.0.0.1", 0)
    rude_port = rude_server.sockets[0].getsockname()[1]
    port = await env.listen(upstream=f"127.0.0.1:{rude_port}", upstream_tls="none")

    def go() -> str:
        m = imaps(pki, port)
        with pytest.raises(imaplib.IMAP4.error) as err:
            m.login(ALICE, PASSWORDS[ALICE])
        return str(err.value)

    assert "UNAVAILABLE" in await run(go)
    recs = await env.wait_records(1, "decision")
    assert [r["code"] for r in recs[0]["reasons"]] == ["upstream_unavailable"]
    rude_server.close()
    await run(works, pki, await env.listen())


def _conversation(pki: Pki, port: int, device: str,
                  sends: list[tuple[bytes, int]]) -> list[bytes]:
    """Send each chunk over TLS with the device certificate and read N lines after it.
    Each conversation comes from its own loopback address: Dovecot's penalty for
    failed logins grows per client address (the proxy forwards it with ID)."""
    source = (f"127.0.{random.randint(1, 254)}.{random.randint(1, 254)}", 0)
    s = pki.client_ctx(device).wrap_socket(
        socket.create_connection(("127.0.0.1", port), source_address=source),
        server_hostname="localhost")
    s.settimeout(8)
    f = s.makefile("rb")
    out = [f.readline()]
    try:
        for data, lines in sends:
            s.sendall(data)
            for _ in range(lines):
                line = f.readline()
                if not line:
                    return out
                out.append(line)
    except (TimeoutError, OSError):
        pass
    finally:
        s.close()
    return out


async def test_client_cannot_use_the_proxys_own_tags(env: Env, pki: Pki) -> None:
    """A client tag equal to the proxy's upstream ID tag must not let the upstream's
    answer to that ID pass for a successful LOGIN (a password bypass): such tags are
    refused, a wrong password stays wrong, and no allow is recorded."""
    port = await env.listen()
    out = await run(_conversation, pki, port, "alice-phone", [
        (f"mw.id LOGIN {ALICE} WRONG\r\n".encode(), 1),
        (f"b LOGIN {ALICE} WRONG\r\n".encode(), 1),
        (b"c SELECT INBOX\r\n", 1),
    ])
    assert out[1].startswith(b"mw.id BAD"), out
    assert out[2].startswith(b"b NO"), out
    assert not out[3].startswith(b"c OK"), out
    await asyncio.sleep(0.3)
    assert [r["decision"] for r in env.records("decision")] == ["deny"]
    assert env.records("decision")[0]["reasons"][0]["code"] == "auth_failed"


async def test_crlf_in_an_id_field_name_is_not_sent_upstream(env: Env, pki: Pki) -> None:
    """An ID field name carrying CR/LF (as a literal) must not inject an upstream
    command whose answer could pass for the LOGIN result."""
    port = await env.listen()
    key = b"\r\nT NOOP\r\n"
    out = await run(_conversation, pki, port, "alice-phone", [
        (b"a ID ({%d}\r\n" % len(key), 1),
        (key + b' "v")\r\n', 2),
        (f"T LOGIN {ALICE} WRONG\r\n".encode(), 1),
    ])
    assert out[-1].startswith(b"T NO"), out
    assert not any(line.startswith(b"T OK") for line in out), out
    await asyncio.sleep(0.3)
    assert [r["decision"] for r in env.records("decision")] == ["deny"]
