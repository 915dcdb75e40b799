"""SMTP extensions and the client's identity through mailward to a real Postfix: DSN
with msmtp and a raw client, XCLIENT and XFORWARD seen in Postfix's ``Received:``
header, BDAT chunks relayed, the upstream's own AUTH LOGIN challenges, VRFY and ETRN
answered by the upstream.

BDAT comes from a raw socket client: swaks, msmtp and smtplib never send it, and
neither does Postfix's own SMTP client (its ``smtp`` binary has no BDAT), so a second
Postfix relaying through mailward would not exercise it either.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import ssl
from pathlib import Path

import pytest
import test_smtp
from peers import peer_missing
from peers.postfix import PostfixSubmission
from test_smtp import (
    ALICE,
    BOB,
    PASSWORD,
    Env,
    Pki,
    RawClient,
    as_stored,
    message,
    require_swaks,
    swaks,
)

pytestmark = pytest.mark.peer

# The Postfix peer, PKI and listeners of test_smtp, as fixtures of this module too.
pki, postfix, env = test_smtp.pki, test_smtp.postfix, test_smtp.env

PHONE_ADDR = "127.0.0.2"  # the phone's address: mailward itself talks from 127.0.0.1


def received(pf: PostfixSubmission, stored: bytes) -> bytes:
    """The Received: header Postfix put on a delivered message (unfolded)."""
    trace, _ = pf.split_trace(stored)
    unfolded = trace.replace(b"\n ", b" ").replace(b"\n\t", b" ")
    (line,) = [x for x in unfolded.split(b"\n") if x.startswith(b"Received:")]
    return line


class PhoneClient(RawClient):
    """A RawClient connecting from the phone's address (PHONE_ADDR)."""

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(PHONE_ADDR, 0))
        assert (await self.reply()).startswith("220")
        await self.cmd("EHLO phone.example")
        assert (await self.cmd("STARTTLS")).startswith("220")
        assert self.ctx is not None
        await self.writer.start_tls(self.ctx, server_hostname="localhost")
        await self.cmd("EHLO phone.example")


def upstream_client(pf: PostfixSubmission, port: int | None = None) -> RawClient:
    """A raw client straight to Postfix (STARTTLS), to compare its answers with."""
    return RawClient(port or pf.submission_port,
                     ssl.create_default_context(cafile=str(pf.ca_pem)))


async def msmtp(config: Path, *args: str, stdin: bytes) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "msmtp", "-C", str(config), *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode or 0, out.decode(errors="replace")


def msmtp_config(tmp: Path, pki: Pki, port: int, device: str) -> Path:
    if shutil.which("msmtp") is None:
        peer_missing("msmtp not installed (apt-get install msmtp)")
    cert, key = pki.device(device)
    config = tmp / "msmtprc"
    config.write_text(
        "defaults\nlogfile -\n"
        "account phone\nhost 127.0.0.1\n"
        f"port {port}\nfrom {ALICE}\ndomain phone.example\n"
        f"auth plain\nuser {ALICE}\npassword {PASSWORD[ALICE]}\n"
        f"tls on\ntls_starttls on\ntls_trust_file {pki.dir / 'ca.pem'}\n"
        "tls_host_override localhost\n"
        f"tls_cert_file {cert}\ntls_key_file {key}\n")
    config.chmod(0o600)
    return config


async def test_msmtp_dsn_notify_and_return_reach_the_upstream(
    env: Env, pki: Pki, postfix: PostfixSubmission, tmp_path: Path
) -> None:
    """msmtp --dsn-notify=success --dsn-return=hdrs through mailward: DSN is
    advertised, the message is delivered, and Postfix sends the sender the success
    notification with headers only, as RET=HDRS asked."""
    port = await env.listen(postfix.submission_port)
    config = msmtp_config(tmp_path, pki, port, "alice-phone")
    wire = message("dsn please", b"the body that RET=HDRS leaves out\r\n")
    rc, out = await msmtp(config, "-a", "phone", "--dsn-notify=success",
                          "--dsn-return=hdrs", BOB, stdin=wire)
    assert rc == 0, out
    (stored,) = postfix.wait_for_messages(BOB, 1)
    assert postfix.split_trace(stored)[1] == as_stored(wire)
    (dsn,) = postfix.wait_for_messages(ALICE, 1)
    assert b"Action: delivered" in dsn and b"text/rfc822-headers" in dsn
    assert b"Subject: dsn please" in dsn
    assert b"RET=HDRS leaves out" not in dsn


async def test_envid_and_orcpt_reach_the_upstream_and_bad_values_do_not(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """ENVID and ORCPT go upstream as the client wrote them (Postfix echoes them in
    the DSN, the xtext decoded); malformed DSN values and unknown parameters get mailward's 501/555
    and never reach the upstream."""
    port = await env.listen(postfix.submission_port)
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, PASSWORD[ALICE])
        refused = [await client.cmd(line) for line in (
            f"MAIL FROM:<{ALICE}> RET=BODY",
            f"MAIL FROM:<{ALICE}> ENVID=has=equals",
            f"MAIL FROM:<{ALICE}> X-UNKNOWN=1",
            f"MAIL FROM:<{ALICE}> RET=HDRS RET=FULL",
        )]
        mail = await client.cmd(f"MAIL FROM:<{ALICE}> RET=HDRS ENVID=mw+2Benvid-42")
        bad_notify = await client.cmd(f"RCPT TO:<{BOB}> NOTIFY=NEVER,SUCCESS")
        rcpt = await client.cmd(f"RCPT TO:<{BOB}> NOTIFY=SUCCESS ORCPT=rfc822;Bob@Example.test")
        assert (await client.cmd("DATA")).startswith("354")
        client.write(message("envid", b"hi\r\n") + b".\r\n")
        done = await client.reply()
    finally:
        client.close()
    assert [r[:3] for r in refused] == ["501", "501", "555", "501"], refused
    assert mail.startswith("250"), mail
    assert bad_notify.startswith("501 5.5.4 Error: NOTIFY"), bad_notify
    assert rcpt.startswith("250"), rcpt
    assert done.startswith("250"), done
    (dsn,) = postfix.wait_for_messages(ALICE, 1)
    assert b"Original-Envelope-Id: mw+envid-42" in dsn  # xtext, decoded by Postfix
    assert b"Original-Recipient: rfc822;Bob@Example.test" in dsn


async def test_swaks_through_mailward_xclient_names_the_phone_in_received(
    env: Env, pki: Pki, postfix: PostfixSubmission, tmp_path: Path
) -> None:
    """swaks from the phone's address through mailward: Postfix's Received: header
    names the phone's EHLO name and address (XCLIENT), not mailward's host."""
    require_swaks()
    port = await env.listen(postfix.submission_port)
    cert, key = pki.device("alice-phone")
    rc, out = await swaks(
        "--server", "127.0.0.1", "--port", str(port), "--local-interface", PHONE_ADDR,
        "--tls", "--tls-cert", str(cert), "--tls-key", str(key),
        "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", PASSWORD[ALICE],
        "--from", ALICE, "--to", BOB, "--ehlo", "phone.example")
    assert rc == 0, out
    (stored,) = postfix.wait_for_messages(BOB, 1)
    header = received(postfix, stored)
    assert header.startswith(b"Received: from phone.example (unknown [127.0.0.2])"), header
    assert socket.gethostname().encode() not in header.split(b" by ")[0]
    assert f"client=unknown[{PHONE_ADDR}]" in postfix.log_path.read_text()


async def test_xforward_names_the_client_when_xclient_is_not_offered(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Where Postfix offers mailward XFORWARD only (which it uses for its logs, not
    for Received:), each transaction of a session is preceded by XFORWARD: Postfix
    logs the phone's address as the original client of every message."""
    port = await env.listen(postfix.xforward_port)
    client = PhoneClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, PASSWORD[ALICE])
        for i in range(2):
            assert (await client.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250")
            assert (await client.cmd(f"RCPT TO:<{BOB}>")).startswith("250")
            assert (await client.cmd("DATA")).startswith("354")
            client.write(message(f"xforward {i}", b"hi\r\n") + b".\r\n")
            assert (await client.reply()).startswith("250")
    finally:
        client.close()
    assert len(postfix.wait_for_messages(BOB, 2)) == 2
    log = postfix.log_path.read_text()
    assert log.count(f"orig_client=unknown[{PHONE_ADDR}]") == 2, log[-2000:]


async def test_bdat_chunks_are_relayed_byte_for_byte(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """A client's BDAT chunks (one pipelined with the next, dot lines and a bare LF
    inside) reach Postfix as BDAT: each chunk gets Postfix's own reply and the
    message is stored byte for byte, with no dot handling."""
    port = await env.listen(postfix.submission_port)
    wire = message("chunked", b"line one\r\n.\r\n..two dots\r\nbare\nLF\r\nend\r\n")
    a, b, c = wire[:50], wire[50:120], wire[120:]
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, PASSWORD[ALICE])
        assert (await client.cmd(f"MAIL FROM:<{ALICE}> BODY=8BITMIME")).startswith("250")
        assert (await client.cmd(f"RCPT TO:<{BOB}>")).startswith("250")
        client.write(b"BDAT %d\r\n" % len(a) + a + b"BDAT %d\r\n" % len(b) + b)
        first, second = await client.reply(), await client.reply()
        client.write(b"BDAT %d LAST\r\n" % len(c) + c)
        last = await client.reply()
        after = await client.cmd("NOOP")
    finally:
        client.close()
    assert first.startswith("250") and second.startswith("250"), (first, second)
    assert last.startswith("250") and "queued as" in last, last
    assert after.startswith("250"), after
    (stored,) = postfix.wait_for_messages(BOB, 1)
    assert postfix.split_trace(stored)[1] == wire.replace(b"\r\n", b"\n")


async def login_steps(client: RawClient, first: str, *responses: bytes) -> list[str]:
    replies = [await client.cmd(first)]
    for response in responses:
        replies.append(await client.cmd(base64.b64encode(response).decode()))
    return replies


async def test_auth_login_prompts_are_the_upstreams_own(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """AUTH LOGIN through mailward gets exactly Postfix's challenges and answers,
    with and without an initial response; a wrong password gets Postfix's own 535;
    each attempt is one decision record."""
    port = await env.listen(postfix.submission_port)
    user, password = ALICE.encode(), PASSWORD[ALICE].encode()
    initial = "AUTH LOGIN " + base64.b64encode(user).decode()
    seen = []
    for client in (upstream_client(postfix), RawClient(port, pki.client_ctx("alice-phone"))):
        await client.open()
        try:
            seen.append(await login_steps(client, "AUTH LOGIN", user, b"wrong")
                        + await login_steps(client, initial, password))
        finally:
            client.close()
    direct, proxied = seen
    assert direct[0].startswith("334 ") and direct[1].startswith("334 "), direct
    assert proxied[:2] == direct[:2]  # the upstream's own prompts
    assert proxied[2] == direct[2] and proxied[2].startswith("535"), proxied
    assert proxied[3] == direct[3], proxied  # after an initial response: the password
    assert proxied[4].startswith("235") and direct[4].startswith("235")
    decisions = env.records("decision")
    assert [d["decision"] for d in decisions] == ["deny", "allow"], decisions
    assert decisions[0]["reasons"][0]["code"] == "auth_failed"
    assert PASSWORD[ALICE] not in (env.tmp / "audit.jsonl").read_text()


async def test_auth_login_cancelled_is_answered_and_not_a_decision(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """``*`` in the middle of a relayed AUTH LOGIN gets the upstream's answer, no
    decision is recorded, and the next AUTH on the same connection works."""
    port = await env.listen(postfix.submission_port)
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        assert (await client.cmd("AUTH LOGIN")).startswith("334")
        cancelled = await client.cmd("*")
        await client.login(ALICE, PASSWORD[ALICE])
    finally:
        client.close()
    assert cancelled.startswith("501"), cancelled
    assert [d["decision"] for d in env.records("decision")] == ["allow"]


async def test_vrfy_and_etrn_are_answered_by_the_upstream(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """Once logged in, VRFY and ETRN get exactly the answers Postfix gives directly."""
    port = await env.listen(postfix.submission_port)
    answers = []
    for client in (upstream_client(postfix), RawClient(port, pki.client_ctx("alice-phone"))):
        await client.open()
        try:
            await client.login(ALICE, PASSWORD[ALICE])
            answers.append([await client.cmd(f"VRFY <{BOB}>"),
                            await client.cmd("ETRN example.test")])
        finally:
            client.close()
    direct, proxied = answers
    assert proxied == direct, (proxied, direct)


async def test_auth_login_with_the_upstream_down_prompts_itself_and_records_once(
    env: Env, pki: Pki
) -> None:
    """The upstream cannot be reached when AUTH LOGIN begins: mailward prompts itself
    ("Username:", "Password:"), tries again once it has the user, and then answers
    421 4.4.1 with one temporary deny record for that user."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    port = await env.listen(dead_port, upstream_tls="none", upstream_connect_timeout_s=1)
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        replies = await login_steps(client, "AUTH LOGIN", ALICE.encode(), b"secret")
    finally:
        client.close()
    assert replies[:2] == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"], replies
    assert replies[2].startswith("421 4.4.1 "), replies
    await asyncio.sleep(0.2)
    (decision,) = env.records("decision")
    assert decision["user"] == ALICE
    assert decision["reasons"][0]["code"] == "upstream_unavailable"
    assert env.records("session_end") == []
