"""SMTP smuggling through the submission front end, end to end: every line ending
around a dot other than <CRLF>.<CRLF> leaves one message upstream with those bytes
inside it (Postfix relayed with BDAT; a scripted upstream with DATA and dot-stuffing),
commands pipelined after the end of data are commands of the next transaction, and
nothing pipelined before TLS survives STARTTLS."""

from __future__ import annotations

import asyncio
import base64

import pytest
import test_smtp
from peers.postfix import PostfixSubmission
from test_smtp import ALICE, BOB, CAROL, PASSWORD, Env, Pki, RawClient, ScriptedUpstream, message

# The fixtures of the SMTP end-to-end tests (Postfix, device PKI, listeners).
pki, postfix, env, scripted = test_smtp.pki, test_smtp.postfix, test_smtp.env, test_smtp.scripted

pytestmark = pytest.mark.peer

#: Line endings around a dot that are not <CRLF>.<CRLF> (the 2023 smuggling variants,
#: bare CR and LF, and NUL next to the dot).
ENDINGS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r",
           b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


def smuggling_message(ending: bytes) -> tuple[bytes, bytes]:
    """A message whose body holds ``ending`` and a whole forged transaction after it
    (a second message from alice to carol); and the forged part's marker."""
    forged = (f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{CAROL}>\r\nDATA\r\n"
              "Subject: smuggled\r\n\r\nforged body\r\n").encode()
    return message("carrier", b"first part" + ending + forged), b"Subject: smuggled"


async def send_one(port: int, pki: Pki, password: str, wire: bytes) -> tuple[str, str]:
    """MAIL, RCPT bob, DATA, ``wire`` and the end; the reply to it and to QUIT."""
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, password)
        assert (await client.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250")
        assert (await client.cmd(f"RCPT TO:<{BOB}>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        client.write(wire + b"\r\n.\r\n")
        done = await client.reply()
        return done, await client.cmd("QUIT")
    finally:
        client.close()


@pytest.mark.parametrize("ending", ENDINGS, ids=repr)
async def test_smuggled_end_of_data_stays_in_one_message_postfix(
    env: Env, pki: Pki, postfix: PostfixSubmission, ending: bytes
) -> None:
    """Postfix (BDAT) gets one message with the forged transaction inside it, or the
    message is refused; carol never gets the forged message."""
    port = await env.listen(postfix.submission_port)
    wire, marker = smuggling_message(ending)
    done, bye = await send_one(port, pki, PASSWORD[ALICE], wire)
    assert bye.startswith("221"), bye
    if done.startswith("250"):
        (stored,) = postfix.wait_for_messages(BOB, 1)
        assert marker in stored and b"forged body" in stored
    else:
        assert done[:1] in ("4", "5"), done
    await asyncio.sleep(0.5)  # a smuggled second message would be delivered by now
    assert len(postfix.messages(BOB)) <= 1
    assert postfix.messages(CAROL) == []


@pytest.mark.parametrize("ending", ENDINGS, ids=repr)
async def test_smuggled_end_of_data_stays_in_one_message_data(
    env: Env, pki: Pki, scripted: ScriptedUpstream, ending: bytes
) -> None:
    """An upstream without CHUNKING gets DATA: one message, the forged transaction
    inside it dot-stuffed, ending at the one <CRLF>.<CRLF> mailward wrote."""
    port = await env.listen(scripted.port, upstream_tls="none")
    wire, marker = smuggling_message(ending)
    done, _ = await send_one(port, pki, "secret", wire)
    assert done.startswith("250 2.0.0 queued"), done
    (received,) = scripted.messages
    assert marker in received and received.count(b"\r\n.\r\n") == 1
    assert received.endswith(b"forged body\r\n\r\n.\r\n")


async def test_commands_pipelined_after_end_of_data_are_the_next_transaction(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """MAIL/RCPT/DATA written with the end of a message are answered after the
    message's 250, in order, as a second transaction: bob's message does not contain
    them and carol gets the second message."""
    port = await env.listen(postfix.submission_port)
    first, second = message("first", b"one\r\n"), message("second", b"two\r\n", to=CAROL)
    client = RawClient(port, pki.client_ctx("alice-phone"))
    await client.open()
    try:
        await client.login(ALICE, PASSWORD[ALICE])
        client.write(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode())
        replies = [await client.reply() for _ in range(3)]
        client.write(first + f".\r\nMAIL FROM:<{ALICE}>\r\nRCPT TO:<{CAROL}>\r\nDATA\r\n"
                     .encode())
        replies += [await client.reply() for _ in range(4)]
        client.write(second + b".\r\n")
        replies.append(await client.reply())
    finally:
        client.close()
    assert [r[:3] for r in replies] == ["250", "250", "354", "250", "250", "250", "354",
                                        "250"], replies
    assert "queued as" in replies[3]
    (to_bob,) = postfix.wait_for_messages(BOB, 1)
    (to_carol,) = postfix.wait_for_messages(CAROL, 1)
    assert b"Subject: first" in to_bob and CAROL.encode() not in postfix.split_trace(to_bob)[1]
    assert b"Subject: second" in to_carol


async def test_a_whole_transaction_pipelined_before_starttls_is_discarded(
    env: Env, pki: Pki, postfix: PostfixSubmission
) -> None:
    """AUTH, MAIL, RCPT, DATA and a message written in one piece with STARTTLS never
    run: no login attempt, nothing delivered, and the first reply inside TLS answers
    the client's EHLO."""
    port = await env.listen(postfix.submission_port)
    token = base64.b64encode(f"\0{ALICE}\0{PASSWORD[ALICE]}".encode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        writer.write(b"EHLO phone.example\r\nSTARTTLS\r\nAUTH PLAIN " + token + b"\r\n"
                     + f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode()
                     + message("injected", b"x\r\n") + b".\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        assert (await reader.readline()).startswith(b"220")
        await writer.start_tls(pki.client_ctx("alice-phone"), server_hostname="localhost")
        writer.write(b"EHLO phone.example\r\n")
        first = line = await asyncio.wait_for(reader.readline(), 10)
        while line.startswith(b"250-"):
            line = await asyncio.wait_for(reader.readline(), 10)
        writer.write(f"MAIL FROM:<{ALICE}>\r\n".encode())
        mail = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert first.startswith(b"250-"), first
    assert mail.startswith(b"530 5.7.0 Authentication required"), mail
    await asyncio.sleep(0.3)
    assert env.records("decision") == []
    assert postfix.messages(BOB) == []
