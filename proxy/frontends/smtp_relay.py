"""The post-AUTH half of the upstream SMTP client: MAIL/RCPT/RSET/DATA/BDAT/QUIT.

aiosmtplib connects, runs STARTTLS and AUTH; once the upstream has said 235, the
transport is handed to :class:`RelayClient`, a plain :class:`asyncio.Protocol` that
writes one command, parses the (possibly multi-line) reply and wakes the waiter,
with a loop timer for the timeout. That is all the relay needs, at a fraction of
aiosmtplib's per-command cost.

The message goes out in one write: ``BDAT <n> LAST`` and the message when the
upstream offers CHUNKING (RFC 3030: one reply, no dot-stuffing, no 354 round trip),
otherwise DATA, then the dot-stuffed message and ``.``. Either way line endings are
normalised to CRLF first (what aiosmtplib did), so the upstream gets the same
lines. Any failure (connection lost, timeout, malformed reply) raises
:class:`RelayError` and leaves the client unusable: the caller aborts it, and a
message whose final reply did not arrive is never acknowledged or re-sent.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import Any

from aiosmtplib import SMTPResponse

MAX_REPLY_BYTES = 64 * 1024  # a reply longer than this is not SMTP
# Bare CR or LF (each becomes CRLF on the wire, as aiosmtplib sent them).
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # CR/LF/NUL in arguments: command injection


class RelayError(Exception):
    """The upstream connection failed, timed out or spoke something not SMTP."""


def normalize_line_endings(content: bytes) -> bytes:
    """Lone CR and LF become CRLF; the message ends with CRLF."""
    crlf = content.count(b"\r\n")
    if content.count(b"\n") != crlf or content.count(b"\r") != crlf:
        content = _LINE_ENDINGS.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content


def dot_stuff(content: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency for a CRLF-normalised message, plus the end mark."""
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def parse_reply(buf: bytearray) -> SMTPResponse | None:
    """Take one complete reply off the front of ``buf``; None if it is not all there.
    Raises RelayError on something that is not an SMTP reply."""
    start = 0
    texts: list[str] = []
    while True:
        eol = buf.find(b"\n", start)
        if eol < 0:
            if len(buf) > MAX_REPLY_BYTES:
                raise RelayError("upstream reply too long")
            return None
        line = bytes(buf[start:eol]).rstrip(b"\r")
        start = eol + 1
        code = line[:3]
        if len(code) != 3 or not code.isdigit() or line[3:4] not in (b"", b" ", b"-"):
            raise RelayError(f"malformed upstream reply {line[:40]!r}")
        texts.append(line[4:].decode("utf-8", "surrogateescape"))
        if line[3:4] != b"-":
            del buf[:start]
            return SMTPResponse(int(code), "\n".join(texts))


class RelayClient(asyncio.Protocol):
    """One authenticated upstream connection, taken over from aiosmtplib."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._waiters: deque[asyncio.Future[SMTPResponse]] = deque()
        self._error: BaseException | None = None

    @classmethod
    def take_over(cls, transport: asyncio.Transport, timeout_s: float) -> RelayClient:
        """Become the protocol of ``transport`` (idle: every reply read)."""
        client = cls(timeout_s)
        transport.set_protocol(client)
        client.transport = transport
        return client

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            while self._buf:
                reply = parse_reply(self._buf)
                if reply is None:
                    return
                if not self._waiters:  # unsolicited: the upstream is out of step
                    raise RelayError(f"unexpected upstream reply {reply.code}")
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        except RelayError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(RelayError(f"upstream connection lost ({exc})" if exc
                              else "upstream connection lost"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._error)
        if self.transport is not None:
            self.transport.abort()

    # -- commands ------------------------------------------------------------------

    def _send(self, *data: bytes) -> asyncio.Future[SMTPResponse]:
        """Write ``data`` (one write); a future for the reply it expects."""
        if self._error is not None:
            raise RelayError(str(self._error))
        transport = self.transport
        if transport is None or transport.is_closing():
            raise RelayError("upstream connection closed")
        waiter: asyncio.Future[SMTPResponse] = self._loop.create_future()
        self._waiters.append(waiter)
        if len(data) == 1:
            transport.write(data[0])
        else:
            transport.writelines(data)
        return waiter

    async def _wait(self, waiter: asyncio.Future[SMTPResponse]) -> SMTPResponse:
        timer = self._loop.call_later(self.timeout_s, self._expired, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:  # state unknown mid-command: never reuse it
            self.abort()
            raise
        finally:
            timer.cancel()

    def _expired(self, waiter: asyncio.Future[Any]) -> None:
        if not waiter.done():
            self._fail(RelayError(f"upstream did not answer within {self.timeout_s:g} s"))

    async def command(self, *args: bytes) -> SMTPResponse:
        """One command line (``args`` joined by spaces); the upstream's reply."""
        line = b" ".join(args)
        if _CONTROL.search(line):
            raise RelayError("control character in a command argument")
        return await self._wait(self._send(line + b"\r\n"))

    async def message(self, content: bytes, *, chunking: bool) -> SMTPResponse:
        """The message (as the client sent it, unstuffed); the upstream's final reply,
        or its refusal of DATA."""
        content = normalize_line_endings(content)
        if chunking:
            return await self._wait(
                self._send(b"BDAT %d LAST\r\n" % len(content), content))
        start = await self._wait(self._send(b"DATA\r\n"))
        if start.code != 354:
            return start
        return await self._wait(self._send(dot_stuff(content)))

    async def chunk(self, data: bytes, last: bool) -> SMTPResponse:
        """A client's BDAT chunk, byte for byte (RFC 3030: no line ending or dot
        handling), with its BDAT command in the same write; the upstream's reply."""
        head = b"BDAT %d LAST\r\n" % len(data) if last else b"BDAT %d\r\n" % len(data)
        return await self._wait(self._send(head, data) if data else self._send(head))

    async def quit(self) -> None:
        """QUIT and close (raises RelayError if the upstream does not answer)."""
        try:
            await self.command(b"QUIT")
        finally:
            self.close()

    @property
    def is_connected(self) -> bool:
        return self.transport is not None and self._error is None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self._error is None:
            self._error = RelayError("aborted")
        if self.transport is not None:
            self.transport.abort()
