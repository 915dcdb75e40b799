"""SMTP submission front end against a real Postfix (Dovecot SASL), driven by real
clients (smtplib, swaks), plus fault tests against a scripted upstream.

The gate is the real Gate with the real SqlitePostureStore and AuditLog; postures are
put into the store directly. Device certificates come from ``proxy.pki``. Blocking
clients run in threads so the proxy can run on the test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import pytest
from helpers.frontend_env import FrontendEnv
from helpers.tls import Pki, enrolled_pki
from limits_helpers import wait_abuse
from peers import peer_missing
from peers.postfix import PeerUnavailable, PostfixSubmission
from pki_helpers import fresh_posture as posture

from proxy.config import ListenerConfig
from proxy.frontends import smtp as smtp_frontend
from proxy.posture import App, Posture
from proxy.posture.sqlite import SqlitePostureStore

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
PASSWORD = {ALICE: "alice-secret", BOB: "bob-secret", CAROL: "carol-secret"}
TIKTOK = App("com.zhiliaoapp.musically", "35.1.3", "TikTok")
DEVICES = (("alice-phone", ALICE), ("alice-tiktok", ALICE), ("bob-phone", BOB))


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return enrolled_pki(tmp_path_factory.mktemp("pki"), DEVICES)


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixSubmission]:
    try:
        peer = PostfixSubmission.start()
    except PeerUnavailable as exc:
        peer_missing(f"Postfix peer unavailable: {exc}")
    with peer:
        yield peer


class Env(FrontendEnv):
    """Running SMTP listeners with their gate, store and audit log."""

    close_grace_s = 1.0

    def __init__(self, pki: Pki, tmp: Path, upstream_ca: Path | None) -> None:
        super().__init__(pki, tmp)
        self.upstream_ca = upstream_ca

    async def listen(self, upstream_port: int, **overrides: Any) -> int:
        cfg = ListenerConfig(
            name="submission", protocol="smtp", host="127.0.0.1", port=0,
            upstream=f"127.0.0.1:{upstream_port}", tls="starttls", client_cert="optional",
            unidentified="deny", upstream_tls="starttls", upstream_ca=self.upstream_ca,
            preauth_idle_timeout_s=10, preauth_timeout_s=30,
            upstream_connect_timeout_s=3, upstream_timeout_s=10,
        )
        cfg = replace(cfg, **overrides)
        return await self.start(cfg, smtp_frontend.start, server_tls=cfg.tls != "none")

    async def wait_records(  # type: ignore[override]  # (event, count), as the tests ask
        self, event: str, count: int, timeout: float = 5
    ) -> list[dict[str, Any]]:
        return await super().wait_records(count, event, timeout)


@pytest.fixture
async def env(pki: Pki, postfix: PostfixSubmission, tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(pki, tmp_path, postfix.ca_pem)
    await e.put(posture("alice-phone", ALICE))
    await e.put(posture("alice-tiktok", ALICE, (TIKTOK,)))
    await e.put(posture("bob-phone", BOB))
    for user in PASSWORD:
        postfix.clear_mailbox(user)
    yield e
    await e.close()


# ------------------------------------------------------------------ helpers


def message(subject: str, body: bytes, *, sender: str = ALICE, to: str = BOB) -> bytes:
    """A submitted message in wire form (CRLF), as a phone would build it."""
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@phone.example>\r\n"
            "Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode()
    return head + body


def starttls_client(port: int, pki: Pki, device: str | None) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("phone.example")
    s.starttls(context=pki.client_ctx(device))
    s.ehlo("phone.example")
    return s


def as_stored(wire: bytes) -> bytes:
    """Maildir keeps LF line ends; everything else must be byte-identical."""
    return wire.replace(b"\r\n", b"\n")


def assert_delivered_identical(pf: PostfixSubmission, stored: bytes, wire: bytes) -> None:
    trace, submitted = pf.split_trace(stored)
    assert b"Received:" in trace
    assert submitted == as_stored(wire)


def swaks_available() -> bool:
    return shutil.which("swaks") is not None


def require_swaks() -> None:
    """swaks, with TLS: without Net::SSLeay (``--no-install-recommends``) it says
    ``*** TLS not available`` and the TLS tests would fail confusingly."""
    if not swaks_available():
        peer_missing("swaks not installed (apt-get install swaks)")
    support = subprocess.run(["swaks", "--support"], capture_output=True, text=True,
                             timeout=30)
    if "=== TLS supported" not in support.stdout + support.stderr:
        peer_missing("swaks has no TLS support (apt-get install libnet-ssleay-perl)")


async def swaks(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(errors="replace")


# ------------------------------------------------------------------ contract


def test_reply_catalogue_is_well_formed() -> None:
    """Replies are ASCII, carry an enhanced code on every line and wrap long texts."""
    long = "TikTok is installed on this device \u2014 " + "uninstall it. " * 60
    text = smtp_frontend.Replies.denied(long)
    lines = text.split("\r\n")
    assert len(lines) > 1
    assert all(line.startswith("550-5.7.1 ") for line in lines[:-1])
    assert lines[-1].startswith("550 5.7.1 ")
    assert text.isascii() and all(len(line) <= 512 for line in lines)


# ------------------------------------------------------------------ allow / deny


async def test_compliant_device_message_arrives_byte_identical(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """A compliant device sends over STARTTLS: the upstream's own replies come back and
    the delivered message is byte-identical (8-bit, dot-leading lines, long header)."""
    port = await env.listen(postfix.submission_port)
    body = ("Grüße aus Köln — 8-bit body ✓\r\n.leading dot\r\n..two dots\r\n.\r\n"
            "end\r\n").encode()
    wire = message("Quarterly numbers \u00e9t\u00e9", body)

    def send() -> tuple[Any, ...]:
        with starttls_client(port, pki, "alice-phone") as s:
            ehlo = s.ehlo_resp or b""
            s.login(ALICE, PASSWORD[ALICE])
            refused = s.sendmail(ALICE, [BOB], wire, mail_options=["BODY=8BITMIME"])
            return ehlo, refused, s.noop()

    ehlo, refused, noop = await asyncio.to_thread(send)
    assert refused == {}
    assert noop[0] == 250
    assert b"AUTH" in ehlo and b"STARTTLS" not in ehlo
    stored = postfix.wait_for_messages(BOB, 1)
    assert len(stored) == 1
    assert_delivered_identical(postfix, stored[0], wire)
    decisions = env.records("decision")
    assert len(decisions) == 1
    assert decisions[0]["decision"] == "allow"
    assert decisions[0]["device_id"] == "alice-phone"
    assert decisions[0]["device_source"] == "client_cert"


async def test_ehlo_advertises_only_what_the_upstream_supports(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Postfix's SIZE, PIPELINING, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, DSN,
    CHUNKING, VRFY and ETRN show (mailward relays them all); its XCLIENT and XFORWARD
    (offered to mailward's address only) and its STARTTLS inside TLS do not."""
    port = await env.listen(postfix.submission_port)

    def ehlo() -> tuple[dict[str, str], dict[str, str]]:
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        s.ehlo("phone.example")
        before = dict(s.esmtp_features)
        s.starttls(context=pki.client_ctx())
        s.ehlo("phone.example")
        after = dict(s.esmtp_features)
        s.quit()
        return before, after

    before, after = await asyncio.to_thread(ehlo)
    assert "starttls" in before and "auth" not in before
    assert after["size"] == str(min(postfix_size(), smtp_frontend.MAX_MESSAGE_BYTES))
    for ext in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "dsn",
                "chunking", "vrfy", "etrn"):
        assert ext in after, ext
    for ext in ("starttls", "xclient", "xforward"):
        assert ext not in after, ext
    assert set(after["auth"].split()) == {"PLAIN", "LOGIN"}


def postfix_size() -> int:
    from peers.postfix import MESSAGE_SIZE_LIMIT

    return MESSAGE_SIZE_LIMIT


async def test_tiktok_device_refused_at_mail_from_naming_tiktok(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """AUTH is accepted (apps would re-ask the password otherwise); MAIL FROM gets
    550 5.7.1 naming TikTok and the remedy; one deny record; nothing is delivered."""
    port = await env.listen(postfix.submission_port)

    def send() -> tuple[Any, Any, Any]:
        with starttls_client(port, pki, "alice-tiktok") as s:
            auth = s.login(ALICE, PASSWORD[ALICE])
            mail = s.mail(ALICE)
            again = s.mail(ALICE)
            return auth, mail, again

    auth, mail, again = await asyncio.to_thread(send)
    assert auth[0] == 235
    assert mail[0] == 550 and again[0] == 550
    text = mail[1].decode()
    assert text.startswith("5.7.1 ")
    assert "TikTok" in text and "Uninstall" in text
    decisions = env.records("decision")
    assert len(decisions) == 1
    assert decisions[0]["decision"] == "deny"
    assert decisions[0]["reasons"][0]["code"] == "prohibited_app"
    assert decisions[0]["device_id"] == "alice-tiktok"
    assert postfix.messages(BOB) == []


async def test_client_without_certificate_is_unidentified_and_refused(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """No device certificate on an ``unidentified = deny`` listener: 550 5.7.1 telling
    the user to install the mail profile."""
    port = await env.listen(postfix.submission_port)

    def send() -> Any:
        with starttls_client(port, pki, None) as s:
            s.login(BOB, PASSWORD[BOB])
            return s.mail(BOB)

    code, text = await asyncio.to_thread(send)
    assert code == 550 and text.startswith(b"5.7.1 ")
    assert b"device certificate" in text
    (decision,) = env.records("decision")
    assert decision["reasons"][0]["code"] == "unidentified_device"
    assert decision["device_id"] is None


async def test_wrong_password_gets_the_upstreams_535(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """The upstream checks the password; its 535 reaches the client and is logged as
    a deny with auth_failed. A retry with the right password then works."""
    port = await env.listen(postfix.submission_port)

    def send() -> tuple[Any, Any]:
        with starttls_client(port, pki, "alice-phone") as s:
            bad = s.docmd("AUTH", "PLAIN " + base64.b64encode(
                f"\0{ALICE}\0wrong".encode()).decode())
            s.login(ALICE, PASSWORD[ALICE])
            return bad, s.mail(ALICE)

    bad, mail = await asyncio.to_thread(send)
    assert bad[0] == 535
    assert bad[1].startswith(b"5.7.8 ")
    assert mail[0] == 250
    decisions = env.records("decision")
    assert [d["decision"] for d in decisions] == ["deny", "allow"]
    assert decisions[0]["reasons"][0]["code"] == "auth_failed"


async def test_auth_login_mechanism_is_relayed(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """AUTH LOGIN from the client (Outlook-style) works through the upstream."""
    port = await env.listen(postfix.submission_port)

    def send() -> Any:
        with starttls_client(port, pki, "bob-phone") as s:
            s.user, s.password = BOB, PASSWORD[BOB]
            return s.auth("LOGIN", s.auth_login, initial_response_ok=False)

    code, _ = await asyncio.to_thread(send)
    assert code == 235


async def test_rejected_recipient_stays_rejected_with_upstream_code(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Postfix rejects an unknown mailbox (550 5.1.1) and relaying (554 5.7.1); the
    client sees exactly those; the message goes to the valid recipient only."""
    port = await env.listen(postfix.submission_port)
    wire = message("partly deliverable", b"hello\r\n")

    def send() -> tuple[Any, Any, Any, Any]:
        with starttls_client(port, pki, "alice-phone") as s:
            s.login(ALICE, PASSWORD[ALICE])
            assert s.mail(ALICE)[0] == 250
            unknown = s.rcpt("nobody@example.test")
            relay = s.rcpt("someone@elsewhere.example")
            good = s.rcpt(BOB)
            return unknown, relay, good, s.data(wire)

    unknown, relay, good, data = await asyncio.to_thread(send)
    assert unknown[0] == 550 and unknown[1].startswith(b"5.1.1 <nobody@example.test>")
    assert b"User unknown" in unknown[1]
    assert relay[0] == 554 and relay[1].startswith(b"5.7.1 ")
    assert good[0] == 250 and data[0] == 250
    assert b"queued as" in data[1]  # the upstream's own 250
    assert len(postfix.wait_for_messages(BOB, 1)) == 1


async def test_null_reverse_path_is_relayed_to_the_upstream(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """``MAIL FROM:<>`` (a read receipt, a bounce; RFC 5321 4.5.5) goes to the upstream
    like any other sender, parameters included, and the upstream's replies come back:
    Postfix accepts it and delivers the message with ``Return-Path: <>``; RCPT TO:<>
    stays a syntax error; a second MAIL in the transaction is still a nested MAIL."""
    port = await env.listen(postfix.submission_port)
    wire = message("Read: hello", b"Your message was read.\r\n")
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, PASSWORD[ALICE])
        mail = await client.cmd(f"MAIL FROM:<> SIZE={len(wire)} BODY=8BITMIME")
        nested = await client.cmd(f"MAIL FROM:<{ALICE}>")
        null_rcpt = await client.cmd("RCPT TO:<>")
        rcpt = await client.cmd(f"RCPT TO:<{BOB}>")
        data = await client.cmd("DATA")
        client.write(wire + b".\r\n")
        done = await client.reply()
        spaced = await client.cmd("MAIL FROM: <>")
        reset = await client.cmd("RSET")
    finally:
        client.close()
    assert mail.startswith("250 2.1.0"), mail
    assert nested.startswith("503"), nested
    assert null_rcpt.startswith("5"), null_rcpt
    assert rcpt.startswith("250 2.1.5"), rcpt
    assert data.startswith("354"), data
    assert done.startswith("250 2.0.0") and "queued as" in done, done
    assert spaced.startswith("250 2.1.0"), spaced
    assert reset.startswith("250"), reset
    (stored,) = postfix.wait_for_messages(BOB, 1)
    trace, submitted = postfix.split_trace(stored)
    assert b"Return-Path: <>\n" in trace
    assert submitted == as_stored(wire)


async def test_auth_before_starttls_is_refused_without_reaching_upstream(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """530 5.7.0 before TLS; no decision, and no session_end record either (it never
    completed TLS): the refusal is counted into the abuse summary."""
    port = await env.listen(postfix.submission_port)

    def send() -> tuple[Any, Any]:
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        s.ehlo("phone.example")
        auth = s.docmd("AUTH", "PLAIN " + base64.b64encode(
            f"\0{ALICE}\0{PASSWORD[ALICE]}".encode()).decode())
        mail = s.docmd("MAIL", f"FROM:<{ALICE}>")
        s.quit()
        return auth, mail

    auth, mail = await asyncio.to_thread(send)
    assert auth[0] == 530 and auth[1].startswith(b"5.7.0")
    assert mail[0] == 530
    assert (await wait_abuse(env.gate.limits, "cleartext_refused", 1))["cleartext_refused"] == 1
    assert env.records("session_end") == []
    assert env.records("decision") == []


async def test_multiple_messages_and_rset_in_one_session(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Several transactions, an RSET in between: each message once, in order."""
    port = await env.listen(postfix.submission_port)
    wires = [message(f"message {i}", f"body {i}\r\n".encode()) for i in range(3)]

    def send() -> None:
        with starttls_client(port, pki, "alice-phone") as s:
            s.login(ALICE, PASSWORD[ALICE])
            s.mail(ALICE)
            s.rcpt(BOB)
            assert s.rset()[0] == 250
            for w in wires:
                assert s.sendmail(ALICE, [BOB], w) == {}

    await asyncio.to_thread(send)
    stored = postfix.wait_for_messages(BOB, 3)
    assert len(stored) == 3
    assert sorted(postfix.split_trace(m)[1] for m in stored) == sorted(
        as_stored(w) for w in wires)
    assert len(env.records("decision")) == 1


# ------------------------------------------------------------------ implicit TLS, swaks


async def test_implicit_tls_to_implicit_tls_upstream(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Port-465 style on both sides, smtplib.SMTP_SSL with a device certificate."""
    port = await env.listen(postfix.smtps_port, tls="implicit", upstream_tls="implicit")
    wire = message("over implicit TLS", b"caf\xc3\xa9\r\n")

    def send() -> dict[str, Any]:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=pki.client_ctx("alice-phone"),
                              timeout=30) as s:
            s.login(ALICE, PASSWORD[ALICE])
            return s.sendmail(ALICE, [BOB], wire)

    assert await asyncio.to_thread(send) == {}
    (stored,) = postfix.wait_for_messages(BOB, 1)
    assert_delivered_identical(postfix, stored, wire)


async def test_swaks_starttls_with_device_certificate(
    env: Env, pki: Pki, postfix: PostfixSubmission, tmp_path: Path
) -> None:
    """swaks (a real, independent client) over STARTTLS with a client certificate: what
    arrives is byte for byte what the same swaks run delivers directly to Postfix."""
    require_swaks()
    port = await env.listen(postfix.submission_port)
    wire = message("from swaks", "8-bit from swaks: \u00fcber\r\n.dot\r\n".encode())
    (tmp_path / "msg.eml").write_bytes(wire)
    cert, key = pki.device("alice-phone")
    common = ("--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD[ALICE],
              "--from", ALICE, "--to", BOB, "--data", str(tmp_path / "msg.eml"),
              "--ehlo", "phone.example", "--server", "127.0.0.1", "--tls")
    rc, out = await swaks(*common, "--port", str(port),
                          "--tls-cert", str(cert), "--tls-key", str(key))
    assert rc == 0, out
    assert "queued as" in out
    rc, out = await swaks(*common, "--port", str(postfix.submission_port))
    assert rc == 0, out
    via_proxy, direct = postfix.wait_for_messages(BOB, 2)
    assert postfix.split_trace(via_proxy)[1] == postfix.split_trace(direct)[1]
    assert postfix.split_trace(via_proxy)[1].startswith(as_stored(wire))


async def test_swaks_implicit_tls_tiktok_refused(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """swaks over implicit TLS (--tlsc) from the TikTok device: 550 5.7.1 naming TikTok."""
    require_swaks()
    port = await env.listen(postfix.smtps_port, tls="implicit", upstream_tls="implicit")
    cert, key = pki.device("alice-tiktok")
    rc, out = await swaks(
        "--server", "127.0.0.1", "--port", str(port), "--tlsc",
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", PASSWORD[ALICE],
        "--from", ALICE, "--to", BOB, "--ehlo", "phone.example")
    assert rc != 0
    assert "235 2.7.0" in out
    assert "550 5.7.1" in out and "TikTok" in out


async def test_twenty_megabyte_attachment_arrives_byte_identical(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """A 20 MB attachment (27 MB after base64) goes through unchanged."""
    port = await env.listen(postfix.submission_port)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = ALICE, BOB, "big attachment"
    msg.set_content("See attached.\n")
    msg.add_attachment(os.urandom(20 * 1024 * 1024), maintype="application",
                       subtype="octet-stream", filename="big.bin")
    wire = msg.as_bytes(policy=SMTP_POLICY)

    def send() -> dict[str, Any]:
        with starttls_client(port, pki, "alice-phone") as s:
            s.login(ALICE, PASSWORD[ALICE])
            return s.sendmail(ALICE, [BOB], wire)

    assert await asyncio.to_thread(send) == {}
    (stored,) = postfix.wait_for_messages(BOB, 1, timeout=60)
    assert_delivered_identical(postfix, stored, wire)


# ------------------------------------------------------------------ live sessions


async def test_posture_change_terminates_live_session_with_421(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """A live, allowed session ends with 421 4.7.0 naming TikTok once the device
    reports TikTok; the gate logs the session_end."""
    port = await env.listen(postfix.submission_port)
    s = await asyncio.to_thread(starttls_client, port, pki, "alice-phone")
    try:
        await asyncio.to_thread(s.login, ALICE, PASSWORD[ALICE])
        await asyncio.to_thread(s.sendmail, ALICE, [BOB], message("before", b"x\r\n"))
        await env.put(posture("alice-phone", ALICE, (TIKTOK,)))
        assert await env.gate.posture_changed("alice-phone") == 1
        code, text = await asyncio.to_thread(s.noop)
    finally:
        with contextlib.suppress(Exception):
            s.close()
    assert code == 421
    assert text.startswith(b"4.7.0 ") and b"TikTok" in text
    ends = await env.wait_records("session_end", 1)
    assert ends[0]["reason"] == "posture_changed"
    assert len(env.records("decision")) == 1


async def test_termination_waits_for_the_message_in_transfer(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Termination during a DATA transfer: that message completes (the upstream's 250),
    then 421 4.7.0."""
    port = await env.listen(postfix.submission_port)
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, PASSWORD[ALICE])
        assert (await client.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250")
        assert (await client.cmd(f"RCPT TO:<{BOB}>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        client.write(message("in flight", b"first half\r\n"))
        await asyncio.sleep(0.2)
        await env.put(posture("alice-phone", ALICE, (TIKTOK,)))
        assert await env.gate.posture_changed("alice-phone") == 1
        client.write(b"second half\r\n.\r\n")
        done = await client.reply()  # Postfix's own 250 (to BDAT: "Ok: <n> bytes queued")
        assert done.startswith("250 2.0.0 Ok: ") and "queued as" in done, done
        goodbye = await client.reply()
        assert goodbye.startswith("421 4.7.0 ") and "TikTok" in goodbye
    finally:
        client.close()
    assert len(postfix.wait_for_messages(BOB, 1)) == 1


class RawClient:
    """A line-level SMTP client for tests that need control of the timing."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None, *, implicit: bool = False):
        self.port, self.ctx, self.implicit = port, ctx, implicit
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ctx if self.implicit else None)
        assert (await self.reply()).startswith("220")
        await self.cmd("EHLO phone.example")
        if self.ctx is not None and not self.implicit:
            assert (await self.cmd("STARTTLS")).startswith("220")
            await self.writer.start_tls(self.ctx, server_hostname="localhost")
            await self.cmd("EHLO phone.example")

    async def login(self, user: str, password: str) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        answer = await self.cmd(f"AUTH PLAIN {token}")
        assert answer.startswith("235"), answer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def cmd(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def reply(self, timeout: float = 20) -> str:
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                lines.append("<closed>")
                break
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                break
        return "\n".join(lines)

    async def closed(self, timeout: float = 5) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# ------------------------------------------------------------------ faults


@dataclass
class ScriptedUpstream:
    """A tiny plaintext submission server whose failures the test chooses:
    ``mode`` = ok | close_in_data | slow_data_reply | close_after_auth | slow_auth |
    mute_quit
    (QUIT is never answered). The password ``hang`` gets no answer to AUTH."""

    mode: str = "ok"
    delay_s: float = 5.0
    port: int = 0
    messages: list[bytes] = field(default_factory=list)
    connected: int = 0  # connections from the proxy open now
    _server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connected += 1
        try:
            await self._session(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connected -= 1
            w.close()

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 scripted ESMTP\r\n")
        while line := await r.readline():
            verb = line.split()[0].upper() if line.split() else b""
            if verb == b"EHLO":
                w.write(b"250-scripted\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                        b"250 AUTH PLAIN LOGIN\r\n")
            elif verb == b"AUTH":
                password = base64.b64decode(line.split()[2]).split(b"\0")[2]
                if password == b"hang":
                    await r.read()  # until the proxy gives up on us
                    return
                if self.mode == "slow_auth":
                    await asyncio.sleep(self.delay_s)
                if self.mode == "auth_unavailable":
                    w.write(b"454 4.7.0 Temporary authentication failure\r\n")
                    await w.drain()
                    continue
                ok = password == b"secret"
                w.write(b"235 2.7.0 ok\r\n" if ok else b"535 5.7.8 no\r\n")
                if ok and self.mode == "close_after_auth":
                    await w.drain()
                    return
            elif verb == b"RCPT" and b"bare-code" in line:
                w.write(b"550 no such user here\r\n")  # no enhanced code: relayed as is
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                w.write(b"250 2.0.0 ok\r\n")
            elif verb == b"DATA":
                w.write(b"354 go ahead\r\n")
                await w.drain()
                if self.mode == "close_in_data":
                    await r.read(10)  # some of the message, then the line drops
                    return
                data = await r.readuntil(b"\r\n.\r\n")
                if self.mode == "slow_data_reply":
                    await asyncio.sleep(self.delay_s)
                self.messages.append(data)
                w.write(b"250 2.0.0 queued as SCRIPTED\r\n")
            elif verb == b"QUIT" and self.mode == "mute_quit":
                await r.read()
                return
            elif verb == b"QUIT":
                w.write(b"221 bye\r\n")
                await w.drain()
                return
            else:
                w.write(b"502 5.5.1 no\r\n")
            await w.drain()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    await up.start()
    yield up
    await up.stop()


async def send_raw(port: int, pki: Pki, password: str = "secret") -> list[str]:
    """One message through the proxy with a raw client; all replies in order."""
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    replies: list[str] = []
    try:
        token = base64.b64encode(f"\0{ALICE}\0{password}".encode()).decode()
        replies.append(await client.cmd(f"AUTH PLAIN {token}"))
        if not replies[-1].startswith("235"):
            return replies
        replies.append(await client.cmd(f"MAIL FROM:<{ALICE}>"))
        if not replies[-1].startswith("250"):
            return replies
        replies.append(await client.cmd(f"RCPT TO:<{BOB}>"))
        replies.append(await client.cmd("DATA"))
        if not replies[-1].startswith("354"):
            return replies
        client.write(message("scripted", b"hello\r\n" * 100) + b".\r\n")
        replies.append(await client.reply())
        replies.append(await client.cmd("QUIT"))
    finally:
        client.close()
    return replies


async def assert_one_upstream_unavailable_decision(env: Env, password: str) -> None:
    """The login attempt's one decision record: a temporary deny for the user the
    client named (unverified), no session_end, never the password."""
    await asyncio.sleep(0.2)  # a session_end would be written once the line closes
    (decision,) = env.records("decision")
    assert decision["decision"] == "deny"
    assert [r["code"] for r in decision["reasons"]] == ["upstream_unavailable"]
    assert decision["user"] == ALICE
    assert decision["device_id"] == "alice-phone"
    assert env.records("session_end") == []
    assert password not in (env.tmp / "audit.jsonl").read_text()


async def test_upstream_down_gives_421_and_a_logged_decision(
    env: Env, pki: Pki
) -> None:
    """Nothing listens upstream: AUTH gets 421 4.4.1 and the attempt is logged as a
    temporary deny (upstream_unavailable); once the upstream is back the next client
    is served."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    port = await env.listen(dead_port, upstream_tls="none", upstream_connect_timeout_s=1)
    replies = await send_raw(port, pki)
    assert replies[0].startswith("421 4.4.1 "), replies
    await assert_one_upstream_unavailable_decision(env, "secret")

    up = ScriptedUpstream()
    await up.start(dead_port)
    try:
        replies = await send_raw(port, pki)
        assert replies[-2].startswith("250 2.0.0 queued"), replies
        assert len(up.messages) == 1
    finally:
        await up.stop()


async def test_upstream_auth_timeout_gives_421_and_a_logged_decision(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """The upstream does not answer AUTH within upstream_timeout: 421 4.4.1, one
    temporary deny record (upstream_unavailable), and the next client is served."""
    port = await env.listen(scripted.port, upstream_tls="none", upstream_timeout_s=0.5)
    scripted.mode, scripted.delay_s = "slow_auth", 3.0
    started = time.monotonic()
    replies = await send_raw(port, pki)
    assert time.monotonic() - started < 2.5
    assert replies[0].startswith("421 4.4.1 "), replies
    await assert_one_upstream_unavailable_decision(env, "secret")

    scripted.mode = "ok"
    replies = await send_raw(port, pki)
    assert replies[-2].startswith("250 2.0.0 queued"), replies
    assert [d["decision"] for d in env.records("decision")] == ["deny", "allow"]


async def test_slow_upstream_auth_is_not_client_idleness(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """The pre-auth idle timeout is for the client: an upstream AUTH slower than it
    (within upstream_timeout) still completes, the client is not told it was idle."""
    port = await env.listen(scripted.port, upstream_tls="none", preauth_idle_timeout_s=0.3)
    scripted.mode, scripted.delay_s = "slow_auth", 1.0
    replies = await send_raw(port, pki)
    assert replies[0].startswith("235"), replies
    assert replies[-2].startswith("250 2.0.0 queued"), replies


async def test_upstream_closing_during_data_never_gives_250(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """The upstream drops the line mid-DATA: the client gets 451 4.4.1 (never 250),
    the connection closes, nothing is stored or re-sent; the next client is served."""
    port = await env.listen(scripted.port, upstream_tls="none")
    scripted.mode = "close_in_data"
    replies = await send_raw(port, pki)
    assert replies[-2].startswith("451 4.4.1 "), replies
    assert replies[-1] == "<closed>"
    assert not any(r.startswith("250 2.0.0 queued") for r in replies)
    assert scripted.messages == []
    ends = await env.wait_records("session_end", 1)
    assert ends[0]["reason"] == "upstream_lost"

    scripted.mode = "ok"
    replies = await send_raw(port, pki)
    assert replies[-2].startswith("250 2.0.0 queued"), replies
    assert len(scripted.messages) == 1


async def test_slow_upstream_times_out_with_451(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """The upstream does not answer the end of DATA within upstream_timeout: 451, not
    250; the message is not re-sent by mailward; the next client is served."""
    port = await env.listen(scripted.port, upstream_tls="none", upstream_timeout_s=0.5)
    scripted.mode, scripted.delay_s = "slow_data_reply", 3.0
    started = time.monotonic()
    replies = await send_raw(port, pki)
    assert time.monotonic() - started < 2.5
    assert replies[-2].startswith("451 4.4.1 "), replies
    await asyncio.sleep(3.0)
    assert len(scripted.messages) == 1  # received upstream once, never twice

    scripted.mode = "ok"
    replies = await send_raw(port, pki)
    assert replies[-2].startswith("250 2.0.0 queued"), replies
    assert len(scripted.messages) == 2


async def test_upstream_lost_between_commands_gives_421(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """The upstream closes right after AUTH: MAIL FROM gets 421 4.4.1 and the session
    ends; the decision (allow) was logged once."""
    port = await env.listen(scripted.port, upstream_tls="none")
    scripted.mode = "close_after_auth"
    replies = await send_raw(port, pki)
    assert replies[0].startswith("235"), replies
    assert replies[1].startswith("421 4.4.1 "), replies
    assert [d["decision"] for d in env.records("decision")] == ["allow"]
    ends = await env.wait_records("session_end", 1)
    assert ends[0]["reason"] == "upstream_lost"


async def test_user_name_that_is_not_utf8_is_refused_before_the_upstream(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """A login name that is not UTF-8 cannot be a mailbox (nor be written to the audit
    log): 501 without contacting the upstream, and the next client is served."""
    port = await env.listen(scripted.port, upstream_tls="none")
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    token = base64.b64encode(b"\0al\xffice@corp.example\0secret").decode()
    reply = await client.cmd(f"AUTH PLAIN {token}")
    client.close()
    assert reply.startswith("501 5.5.2"), reply
    assert scripted.connected == 0 and env.records("decision") == []
    replies = await send_raw(port, pki)
    assert replies[0].startswith("235"), replies


async def test_upstream_temporary_auth_failure_is_one_decision(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """The upstream cannot check credentials now (454): the client gets that answer,
    and the login attempt is exactly one temporary deny record, no session_end."""
    port = await env.listen(scripted.port, upstream_tls="none")
    scripted.mode = "auth_unavailable"
    replies = await send_raw(port, pki)
    assert replies[0].startswith("454 4.7.0"), replies
    decisions = await env.wait_records("decision", 1)
    assert [d["decision"] for d in decisions] == ["deny"]
    assert decisions[0]["reasons"][0]["code"] == "upstream_auth_temporary"
    await asyncio.sleep(0.3)
    assert env.records("session_end") == []
    assert len(env.records("decision")) == 1


async def test_listener_close_ends_sessions_with_421(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """close(grace) stops accepting and ends idle sessions with 421 after the grace."""
    port = await env.listen(scripted.port, upstream_tls="none")
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    await client.login(ALICE, "secret")
    listener = env.listeners.pop()
    closing = asyncio.create_task(listener.close(0.2))
    goodbye = await client.reply()
    await closing
    client.close()
    assert goodbye.startswith("421 4.3.2"), goodbye
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()
    ends = await env.wait_records("session_end", 1)
    assert ends[0]["reason"] == "shutdown"


def stuck_clients(
    port: int, pki: Pki, *, implicit: bool, password: str = "secret"
) -> list[smtplib.SMTP]:
    """Clients that stop reading (blocking smtplib, as a phone that went to sleep): one
    logged in and idle, one half-way through a message, one waiting for an AUTH the
    upstream never answers (the scripted upstream; Postfix answers it late)."""

    def connect() -> smtplib.SMTP:
        if not implicit:
            return starttls_client(port, pki, "alice-phone")
        c = smtplib.SMTP_SSL("127.0.0.1", port, context=pki.client_ctx("alice-phone"),
                             timeout=10)
        c.ehlo("phone.example")
        return c

    idle = connect()
    idle.login(ALICE, password)
    sending = connect()
    sending.login(ALICE, password)
    sending.mail(ALICE)
    sending.rcpt(BOB)
    sending.putcmd("data")
    assert sending.getreply()[0] == 354
    sending.send(b"Subject: cut off\r\n\r\nthe first half\r\n")
    authing = connect()
    token = base64.b64encode(f"\0{ALICE}\0hang".encode()).decode()
    authing.putcmd("AUTH", f"PLAIN {token}")
    return [idle, sending, authing]


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_listener_close_is_bounded_by_the_grace(
    env: Env, pki: Pki, scripted: ScriptedUpstream, tls: str
) -> None:
    """close(grace) returns within grace + SHUTDOWN_MARGIN_S although no client reads
    (a TLS close would wait for their close_notify), one is mid-message, one waits for
    an upstream AUTH, and the upstream never answers QUIT: every client gets
    421 4.3.2, every session a session_end, the cut message is not taken upstream,
    and no upstream connection is left open."""
    port = await env.listen(scripted.port, tls=tls, upstream_tls="none",
                            upstream_timeout_s=30)
    scripted.mode = "mute_quit"
    clients = await asyncio.to_thread(stuck_clients, port, pki, implicit=tls == "implicit")
    try:
        deadline = time.monotonic() + 5
        while scripted.connected < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert scripted.connected == 3
        listener = env.listeners.pop()
        started = time.monotonic()
        await listener.close(0.5)
        elapsed = time.monotonic() - started
        assert elapsed < 0.5 + smtp_frontend.SHUTDOWN_MARGIN_S + 0.2, elapsed
        for client in clients:
            code, text = await asyncio.to_thread(client.getreply)
            assert (code, text[:6]) == (421, b"4.3.2 "), (code, text)
    finally:
        for client in clients:
            client.close()
    ends = env.records("session_end")
    assert [e["reason"] for e in ends] == ["shutdown"] * 3, ends
    assert {e["user"] for e in ends} == {ALICE}
    assert [d["decision"] for d in env.records("decision")] == ["allow", "allow"]
    await asyncio.sleep(0.2)
    assert scripted.messages == []
    assert scripted.connected == 0


# ------------------------------------------------------------------ protocol details


async def test_pipelined_commands_get_the_upstreams_replies_in_order(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """PIPELINING (RFC 2920): MAIL, RCPTs and DATA in one write; replies in order,
    each the upstream's; the message reaches the accepted recipient."""
    port = await env.listen(postfix.submission_port)
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, PASSWORD[ALICE])
        client.write(f"MAIL FROM:<{ALICE}> BODY=8BITMIME\r\nRCPT TO:<nobody@example.test>\r\n"
                     f"RCPT TO:<{BOB}>\r\nDATA\r\n".encode())
        replies = [await client.reply() for _ in range(4)]
        client.write(message("pipelined", b"hi\r\n") + b".\r\n")
        replies.append(await client.reply())
    finally:
        client.close()
    assert [r[:3] for r in replies] == ["250", "550", "250", "354", "250"], replies
    assert replies[1].startswith("550 5.1.1 ")
    assert len(postfix.wait_for_messages(BOB, 1)) == 1


async def test_own_error_replies_carry_enhanced_codes_relayed_ones_untouched(
    env: Env, pki: Pki, scripted: ScriptedUpstream
) -> None:
    """mailward's own 4xx/5xx replies carry RFC 3463 codes (ENHANCEDSTATUSCODES is
    advertised); the upstream's replies reach the client exactly as it sent them."""
    port = await env.listen(scripted.port, upstream_tls="none")
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, "secret")
        got = [await client.cmd(line) for line in (
            "",
            f"MAIL FROM:<{ALICE}> SIZE=999999999999",
            f"MAIL FROM:<{ALICE}>",
            f"MAIL FROM:<{ALICE}>",
            f"RCPT TO:<{BOB}> FOO=BAR",
            "RCPT",
            "RCPT TO:<bare-code@example.test>",
            "BOGUS",
        )]
    finally:
        client.close()
    assert got[0] == "500 5.5.2 Error: bad syntax"
    assert got[1].startswith("552 5.3.4 Error: message size exceeds"), got[1]
    assert got[2] == "250 2.0.0 ok"
    assert got[3] == "503 5.5.1 Error: nested MAIL command"
    assert got[4].startswith("555 5.5.4 "), got[4]
    assert got[5].startswith("501 5.5.4 Syntax: RCPT"), got[5]
    assert got[6] == "550 no such user here"  # the upstream's, untouched
    assert got[7].startswith("500 5.5.2 Error: command \"BOGUS\" not recognized"), got[7]


async def test_plaintext_pipelined_after_starttls_is_discarded(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """RFC 3207 4.2 / command injection: a command sent in the same packet as STARTTLS
    is never executed; the first reply inside TLS answers the client's EHLO."""
    port = await env.listen(postfix.submission_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        writer.write(b"EHLO phone.example\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(b"STARTTLS\r\nMAIL FROM:<injected@example.test>\r\n")
        assert (await reader.readline()).startswith(b"220")
        await writer.start_tls(pki.client_ctx("alice-phone"), server_hostname="localhost")
        writer.write(b"EHLO phone.example\r\n")
        first = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert first.startswith(b"250-"), first


async def test_smtputf8_addresses_are_relayed(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """An SMTPUTF8 transaction reaches the upstream unchanged: Postfix answers for a
    UTF-8 address it does not know (550 5.1.1), and accepts a known one."""
    port = await env.listen(postfix.submission_port)
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, PASSWORD[ALICE])
        mail = await client.cmd(f"MAIL FROM:<{ALICE}> SMTPUTF8 BODY=8BITMIME")
        client.write("RCPT TO:<jürgen@example.test>\r\n".encode())
        unknown = await client.reply()
        good = await client.cmd(f"RCPT TO:<{BOB}>")
    finally:
        client.close()
    assert mail.startswith("250"), mail
    assert unknown.startswith("550 5.1.1 "), unknown
    assert "example.test" in unknown
    assert good.startswith("250")


async def test_too_many_commands_before_auth_end_the_connection(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """max_preauth_commands: the next command gets 421 4.7.0 and the line closes."""
    port = await env.listen(postfix.submission_port, max_preauth_commands=5)
    client = RawClient(port, pki.client_ctx())
    await client.open()  # EHLO, STARTTLS, EHLO: 3 commands
    try:
        assert (await client.cmd("NOOP")).startswith("250")
        assert (await client.cmd("NOOP")).startswith("250")
        last = await client.cmd("NOOP")
        assert last.startswith("421 4.7.0"), last
        assert await client.closed()
    finally:
        client.close()
    ends = await env.wait_records("session_end", 1)
    assert ends[0]["reason"] == "too_many_commands"


async def test_idle_client_before_auth_gets_421_and_session_end(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Pre-auth idle timeout: 421 4.4.2, connection closed, session_end idle_timeout."""
    port = await env.listen(postfix.submission_port, preauth_idle_timeout_s=0.5)
    client = RawClient(port, pki.client_ctx())
    await client.open()
    try:
        goodbye = await client.reply(timeout=5)
        assert goodbye.startswith("421 4.4.2"), goodbye
        assert await client.closed()
    finally:
        client.close()
    ends = await env.wait_records("session_end", 1)
    assert ends[0]["reason"] == "idle_timeout"


async def test_client_certificate_from_unknown_ca_fails_the_handshake(
    env: Env, pki: Pki, postfix: PostfixSubmission, tmp_path: Path
) -> None:
    """An invalid device certificate fails STARTTLS; nothing reaches the upstream or
    the gate; the failed handshake is counted, not recorded."""
    ctx = rogue_client_ctx(pki)
    port = await env.listen(postfix.submission_port)
    client = RawClient(port, ctx)
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError, asyncio.TimeoutError)):
        await client.open()
        await client.login(ALICE, PASSWORD[ALICE])
    client.close()
    assert (await wait_abuse(env.gate.limits, "failed_handshake", 1))["failed_handshake"] == 1
    assert env.records("session_end") == []
    assert env.records("decision") == []


def rogue_client_ctx(pki: Pki) -> ssl.SSLContext:
    """A client with a device certificate from a CA mailward does not know."""
    import trustme

    ctx = pki.client_ctx()
    trustme.CA().issue_cert("rogue-device").configure_cert(ctx)
    return ctx


async def failed_implicit_handshakes(port: int, pki: Pki) -> None:
    """Three connections to an implicit TLS listener that never get TLS up: a rogue
    client certificate, a client speaking plaintext SMTP, one that sends nothing."""
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError, asyncio.TimeoutError)):
        rogue = RawClient(port, rogue_client_ctx(pki), implicit=True)
        try:
            await rogue.open()
            await rogue.login(ALICE, PASSWORD[ALICE])
        finally:
            rogue.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"EHLO phone.example\r\n")
    assert await read_to_end(reader) == b""  # no plaintext reply
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await read_to_end(reader) == b""  # handshake timeout
    writer.close()


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """What the server sends before it closes; a reset (the server closed with the
    client's unread plaintext still queued) is a close too."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


async def test_failed_implicit_tls_handshakes_are_counted_not_recorded(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Implicit TLS: mailward runs the handshake itself, so a failed one (bad client
    certificate, plaintext, timeout) is counted into the abuse summary, not recorded
    one by one, and nothing reaches the upstream or the gate; the next client is
    served."""
    port = await env.listen(postfix.smtps_port, tls="implicit", upstream_tls="implicit",
                            preauth_idle_timeout_s=0.5)
    await failed_implicit_handshakes(port, pki)
    assert (await wait_abuse(env.gate.limits, "failed_handshake", 3))["failed_handshake"] == 3
    assert env.records("session_end") == []
    assert env.records("decision") == []

    def send() -> Any:
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30,
                              context=pki.client_ctx("alice-phone")) as s:
            s.login(ALICE, PASSWORD[ALICE])
            return s.sendmail(ALICE, [BOB], message("after", b"hi\r\n"))

    assert await asyncio.to_thread(send) == {}
    assert [d["decision"] for d in env.records("decision")] == ["allow"]


async def test_posture_store_down_gives_a_temporary_refusal(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """The gate fails closed (store unreachable): AUTH gets 454 4.7.0 "try again"."""

    class DownStore(SqlitePostureStore):
        async def get(self, device_id: str) -> Posture | None:
            raise OSError("database is gone")

        async def device_postures(self, device_id: str) -> list[Posture]:
            raise OSError("database is gone")

    env.gate._store = DownStore(env.tmp / "down.db")
    port = await env.listen(postfix.submission_port)

    def send() -> Any:
        with starttls_client(port, pki, "alice-phone") as s:
            return s.docmd("AUTH", "PLAIN " + base64.b64encode(
                f"\0{ALICE}\0{PASSWORD[ALICE]}".encode()).decode())

    code, text = await asyncio.to_thread(send)
    assert code == 454 and text.startswith(b"4.7.0 ")
    assert b"try again" in text
    (decision,) = env.records("decision")
    assert decision["reasons"][0]["code"] == "posture_store_unavailable"


def test_runs_on_uvloop(pki: Pki, postfix: PostfixSubmission, tmp_path: Path) -> None:
    """The server runs on uvloop: STARTTLS and implicit TLS (both the socket
    transport's own handshake) work there, failed implicit handshakes are counted,
    and close() is bounded there too."""
    uvloop = pytest.importorskip("uvloop")
    wires = [message("uvloop starttls", b"a\r\n"), message("uvloop implicit", b"b\r\n")]

    async def main() -> None:
        e = Env(pki, tmp_path, postfix.ca_pem)
        await e.put(posture("alice-phone", ALICE))
        postfix.clear_mailbox(BOB)
        try:
            starttls = await e.listen(postfix.submission_port)
            implicit = await e.listen(postfix.smtps_port, tls="implicit",
                                      upstream_tls="implicit", preauth_idle_timeout_s=0.5)

            def send() -> None:
                with starttls_client(starttls, pki, "alice-phone") as s:
                    s.login(ALICE, PASSWORD[ALICE])
                    assert s.sendmail(ALICE, [BOB], wires[0]) == {}
                with smtplib.SMTP_SSL("127.0.0.1", implicit, timeout=30,
                                      context=pki.client_ctx("alice-phone")) as s:
                    s.login(ALICE, PASSWORD[ALICE])
                    assert s.sendmail(ALICE, [BOB], wires[1]) == {}

            await asyncio.to_thread(send)
            await failed_implicit_handshakes(implicit, pki)
            counts = await wait_abuse(e.gate.limits, "failed_handshake", 3)
            assert counts["failed_handshake"] == 3, counts
            assert e.records("session_end") == []
            clients = await asyncio.to_thread(stuck_clients, implicit, pki, implicit=True,
                                              password=PASSWORD[ALICE])
            try:
                started = time.monotonic()
                await e.listeners.pop().close(0.3)
                assert time.monotonic() - started < 0.3 + smtp_frontend.SHUTDOWN_MARGIN_S
            finally:
                for client in clients:
                    client.close()
        finally:
            await e.close()

    uvloop.run(main())
    stored = postfix.wait_for_messages(BOB, 2)
    assert sorted(postfix.split_trace(m)[1] for m in stored) == sorted(
        as_stored(w) for w in wires)
