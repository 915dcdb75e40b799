"""The post-AUTH relay client (proxy.frontends.smtp_relay) against a scripted server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.frontends.smtp_relay import (
    RelayClient,
    RelayError,
    dot_stuff,
    normalize_line_endings,
    parse_reply,
)


def test_parse_reply_single_multi_partial_and_pipelined() -> None:
    buf = bytearray(b"250-first\r\n250-second\r\n250 last\r\n354 go\r\n550 5.1.1 no")
    r = parse_reply(buf)
    assert r is not None and (r.code, r.message) == (250, "first\nsecond\nlast")
    r = parse_reply(buf)
    assert r is not None and (r.code, r.message) == (354, "go")
    assert parse_reply(buf) is None  # incomplete: stays in the buffer
    buf += b"\r\n"
    r = parse_reply(buf)
    assert r is not None and (r.code, r.message) == (550, "5.1.1 no")
    assert buf == b""
    buf = bytearray(b"250\r\n")  # a bare code is a complete reply
    r = parse_reply(buf)
    assert r is not None and (r.code, r.message) == (250, "")


@pytest.mark.parametrize("raw", [b"hello\r\n", b"25x ok\r\n", b"250xok\r\n"])
def test_parse_reply_refuses_what_is_not_smtp(raw: bytes) -> None:
    with pytest.raises(RelayError):
        parse_reply(bytearray(raw))


def test_line_endings_and_dot_stuffing() -> None:
    assert normalize_line_endings(b"a\r\nb\nc\rd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert normalize_line_endings(b"a\r\nb\r\n") == b"a\r\nb\r\n"
    assert normalize_line_endings(b"") == b"\r\n"
    body = b".lead\r\nmid\r\n..two\r\n.\r\nend\r\n"
    assert dot_stuff(body) == b"..lead\r\nmid\r\n...two\r\n..\r\nend\r\n.\r\n"
    # 8-bit bytes go through untouched
    assert dot_stuff(b"caf\xc3\xa9\r\n\xff\r\n") == b"caf\xc3\xa9\r\n\xff\r\n.\r\n"


class Upstream:
    """Records what the relay client wrote; answers as the test's script says."""

    def __init__(self, chunking_reply: bytes = b"250 2.0.0 queued\r\n") -> None:
        self.received = bytearray()
        self.mode = "ok"
        self.chunking_reply = chunking_reply

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while line := await r.readline():
                self.received += line
                verb = line.split()[0].upper()
                if verb == b"BDAT":
                    size = int(line.split()[1])
                    if self.mode == "close_in_data":
                        await r.read(10)
                        return
                    self.received += await r.readexactly(size)
                    w.write(self.chunking_reply)
                elif verb == b"DATA":
                    w.write(b"354 go\r\n")
                    await w.drain()
                    if self.mode == "close_in_data":
                        await r.read(10)
                        return
                    self.received += await r.readuntil(b"\r\n.\r\n")
                    if self.mode == "slow":
                        await asyncio.sleep(1)
                    w.write(b"250-2.0.0 multi\r\n250 2.0.0 queued\r\n")
                elif verb == b"RCPT" and b"nobody" in line:
                    w.write(b"550 5.1.1 <nobody>: unknown\r\n")
                elif verb == b"QUIT":
                    w.write(b"221 2.0.0 bye\r\n")
                    await w.drain()
                    return
                else:
                    w.write(b"250 2.0.0 ok\r\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    up = Upstream()
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    yield up, server.sockets[0].getsockname()[1]
    server.close()


async def connect(port: int, timeout_s: float = 5.0) -> RelayClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: RelayClient(timeout_s), "127.0.0.1", port)
    return client


async def test_commands_get_their_own_replies(upstream: tuple[Upstream, int]) -> None:
    up, port = upstream
    client = await connect(port)
    assert (await client.command(b"MAIL", b"FROM:<a@x>")).code == 250
    r = await client.command(b"RCPT", b"TO:<nobody@x>")
    assert (r.code, r.message) == (550, "5.1.1 <nobody>: unknown")
    with pytest.raises(RelayError):  # CR/LF in an argument would inject a command
        await client.command(b"RCPT", b"TO:<a@x>\r\nRSET")
    await client.quit()
    assert bytes(up.received) == b"MAIL FROM:<a@x>\r\nRCPT TO:<nobody@x>\r\nQUIT\r\n"


@pytest.mark.parametrize("chunking", [False, True])
async def test_message_is_sent_byte_identical(
    upstream: tuple[Upstream, int], chunking: bool
) -> None:
    up, port = upstream
    client = await connect(port)
    body = b"Subject: x\r\n\r\n.dot first\r\ncaf\xc3\xa9\r\n..\r\n.\r\nend\r\n"
    r = await client.message(body, chunking=chunking)
    assert r.code == 250
    if chunking:
        assert bytes(up.received) == b"BDAT %d LAST\r\n" % len(body) + body
    else:
        assert r.message == "2.0.0 multi\n2.0.0 queued"
        assert bytes(up.received) == b"DATA\r\n" + dot_stuff(body)
    await client.quit()


@pytest.mark.parametrize("chunking", [False, True])
async def test_connection_lost_mid_message_raises(
    upstream: tuple[Upstream, int], chunking: bool
) -> None:
    up, port = upstream
    up.mode = "close_in_data"
    client = await connect(port)
    with pytest.raises(RelayError):
        await client.message(b"x" * 100_000 + b"\r\n", chunking=chunking)
    assert not client.is_connected
    with pytest.raises(RelayError):  # never reused
        await client.command(b"RSET")


async def test_slow_reply_times_out_and_the_client_is_dead(
    upstream: tuple[Upstream, int]
) -> None:
    up, port = upstream
    up.mode = "slow"
    client = await connect(port, timeout_s=0.2)
    with pytest.raises(RelayError, match="did not answer"):
        await client.message(b"hello\r\n", chunking=False)
    assert not client.is_connected


def test_client_identity_commands_list_only_offered_attributes() -> None:
    """XCLIENT/XFORWARD carry only the attributes the server lists, values in xtext
    (RFC 3461: "+", "=", spaces and non-ASCII as +HH), IPv6 with Postfix's prefix."""
    from proxy.frontends.smtp_upstream import ClientInfo, xtext

    client = ClientInfo("2001:db8::1", 50123, "phone+1=x.example", extended=True)
    line = client.command(b"XCLIENT", "NAME ADDR PORT PROTO HELO LOGIN DESTADDR")
    assert line == (b"XCLIENT NAME=[UNAVAILABLE] PROTO=ESMTP ADDR=IPV6:2001:db8::1 "
                    b"PORT=50123 HELO=phone+2B1+3Dx.example")
    assert ClientInfo("10.0.0.1", None, None, extended=False).command(
        b"XFORWARD", "ADDR PROTO SOURCE") == b"XFORWARD PROTO=SMTP ADDR=10.0.0.1"
    assert client.command(b"XCLIENT", "LOGIN DESTADDR") is None
    assert ClientInfo("::ffff:192.0.2.7").command(b"XCLIENT", "ADDR") == (
        b"XCLIENT ADDR=192.0.2.7")
    assert xtext("a b\u00e9") == b"a+20b+C3+A9"
