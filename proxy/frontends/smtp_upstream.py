"""The upstream side of an SMTP submission session: one connection to the real
submission server per client login.

aiosmtplib connects (implicit TLS, STARTTLS or none, the server's certificate
verified) and says EHLO. When the server offers Postfix's ``XCLIENT``, mailward then
tells it who the client is (its address, port, EHLO name: the attributes the server
lists) and says EHLO again with the client's name, so the server's ``Received:``
header, logs, rate limits and anti-abuse see the phone, not mailward; else, when it
offers ``XFORWARD``, the same attributes go before every MAIL (for its logs and
headers). ``LOGIN`` is never sent: it would tell the server a user is authenticated
before the server has checked the password.

The client's credentials are relayed with AUTH LOGIN step by step when the client
uses LOGIN and the server offers it (so the client sees the server's own 334
challenges), otherwise with AUTH PLAIN or LOGIN, whichever the server offers. After
the server's 235 the transport is handed to
:class:`proxy.frontends.smtp_relay.RelayClient`, which relays MAIL, RCPT, RSET and the
message (BDAT when the server offers CHUNKING, else DATA) at a fraction of
aiosmtplib's per-command cost. Every failure is :class:`UpstreamUnavailable`, after
which the connection is aborted: a message whose final reply did not arrive is never
acknowledged or re-sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiosmtplib import SMTP as SMTPClient
from aiosmtplib import SMTPException, SMTPResponse, SMTPResponseException

from proxy.config import ListenerConfig
from proxy.frontends.smtp_relay import RelayClient, RelayError
from proxy.frontends.smtp_replies import Replies, relayed
from proxy.frontends.smtp_wire import MAX_MESSAGE_BYTES, RELAYED_EXTENSIONS
from proxy.oplog import get_logger

log = get_logger("mailward.smtp")

#: A polite QUIT to the upstream gets at most this long.
UPSTREAM_QUIT_TIMEOUT_S = 2.0
#: Client attributes sent with XCLIENT / XFORWARD, as far as the server lists them.
IDENTITY_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO")
_XTEXT_SAFE = re.compile(rb"[\x21-\x2a\x2c-\x3c\x3e-\x7e]")
_HOSTNAME = re.compile(r"[A-Za-z0-9.:\[\]_-]{1,255}")  # a name or address literal


def xtext(value: str) -> bytes:
    """RFC 3461 4 xtext: ``+``, ``=``, spaces and non-ASCII as ``+HH``."""
    return b"".join(bytes([b]) if _XTEXT_SAFE.fullmatch(bytes([b])) else b"+%02X" % b
                    for b in value.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who is on the other side of mailward, for the server's XCLIENT / XFORWARD."""

    addr: str  # the client's IP address
    port: int | None = None
    helo: str | None = None  # the name in the client's EHLO/HELO
    extended: bool = True  # EHLO rather than HELO

    def attributes(self) -> dict[str, str]:
        """XCLIENT_README's attribute values (``[UNAVAILABLE]`` for the name: mailward
        does no DNS lookups, and the server does not when it is told so)."""
        attrs = {"NAME": "[UNAVAILABLE]", "PROTO": "ESMTP" if self.extended else "SMTP"}
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(self.addr)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # a dual-stack listener's IPv4 client
            attrs["ADDR"] = f"IPV6:{ip.compressed}" if ip.version == 6 else ip.compressed
        if self.port is not None:
            attrs["PORT"] = str(self.port)
        if self.helo is not None:
            attrs["HELO"] = self.helo
        return attrs

    def command(self, verb: bytes, offered: str) -> bytes | None:
        """``XCLIENT``/``XFORWARD`` with the attributes ``offered`` (the server's EHLO
        line) lists, or None when it lists none of them."""
        listed = set(offered.upper().split())
        args = [f"{k}=".encode() + xtext(v) for k, v in self.attributes().items()
                if k in listed and k in IDENTITY_ATTRIBUTES]
        return b" ".join([verb, *args]) if args else None


class UpstreamUnavailable(Exception):
    """The upstream could not be reached, timed out, or dropped the connection."""


@dataclass(frozen=True, slots=True)
class UpstreamCapabilities:
    """What the upstream's EHLO offers that matters to what clients are told."""

    size: int | None = None  # None: no SIZE; 0: SIZE without a limit
    extensions: frozenset[str] = frozenset()  # of RELAYED_EXTENSIONS (SIZE included)
    auth: frozenset[str] = frozenset()

    @classmethod
    def from_ehlo(cls, esmtp: dict[str, str], auth: list[str]) -> UpstreamCapabilities:
        size: int | None = None
        if "size" in esmtp:
            text = esmtp["size"].strip()
            size = int(text) if text.isdigit() else 0
        exts = frozenset(e for e in RELAYED_EXTENSIONS if e.lower() in esmtp)
        return cls(size, exts, frozenset(m.upper() for m in auth))

    @property
    def message_limit(self) -> int:
        """What mailward accepts from the client (and advertises when SIZE is on)."""
        if self.size:
            return min(self.size, MAX_MESSAGE_BYTES)
        return MAX_MESSAGE_BYTES


_UPSTREAM_ERRORS = (SMTPException, OSError, ssl.SSLError, TimeoutError, ValueError)


class UpstreamSession:
    """One connection to the real submission server: aiosmtplib for connect, STARTTLS
    and AUTH; after a 235, :class:`RelayClient` on the same transport."""

    def __init__(
        self, cfg: ListenerConfig, tls: ssl.SSLContext | None, local_hostname: str,
        client: ClientInfo | None = None,
    ) -> None:
        mode = cfg.upstream_tls
        self._cfg = cfg
        self._client = SMTPClient(
            hostname=cfg.upstream_host,
            port=cfg.upstream_port,
            local_hostname=local_hostname,
            timeout=cfg.upstream_timeout_s,
            use_tls=mode == "implicit",
            start_tls=mode == "starttls",
            tls_context=tls if mode != "none" else None,
        )
        self._relay: RelayClient | None = None
        self._chunking = False
        self._client_info = client
        self.xforward: bytes | None = None  # the XFORWARD line to send before each MAIL
        self.caps: UpstreamCapabilities | None = None  # once connected

    async def connect(self) -> UpstreamCapabilities:
        """Connect (TLS as configured), EHLO, and name the client (XCLIENT, or
        XFORWARD later); raises UpstreamUnavailable."""
        c = self._client
        try:
            async with asyncio.timeout(self._cfg.upstream_connect_timeout_s):
                await c.connect()
                if c.is_ehlo_or_helo_needed:
                    await c.ehlo()
                if self._client_info is not None:
                    await self._identify(self._client_info)
        except _UPSTREAM_ERRORS as exc:
            self.abort()
            raise UpstreamUnavailable(describe(exc)) from exc
        self._chunking = "chunking" in c.esmtp_extensions
        self.caps = UpstreamCapabilities.from_ehlo(c.esmtp_extensions, c.server_auth_methods)
        return self.caps

    async def _identify(self, client: ClientInfo) -> None:
        """XCLIENT, else remember the XFORWARD line. A refusal is logged; the login
        goes on without it. After XCLIENT the server starts a new session (its 220):
        with HELO and PROTO=ESMTP among the attributes it is in the state the client's
        EHLO gives (Postfix accepts AUTH at once; the tests check it), else mailward
        says EHLO again with the client's name. The extensions are those of the first
        EHLO either way."""
        c = self._client
        offered = c.esmtp_extensions
        line = client.command(b"XCLIENT", offered.get("xclient", ""))
        if line is None:
            self.xforward = client.command(b"XFORWARD", offered.get("xforward", ""))
            return
        resp = await c.execute_command(*line.split(b" "))
        if resp.code != 220:
            log.warning("upstream refused XCLIENT", upstream=self._cfg.upstream,
                        code=resp.code, reply=resp.message[:200])
            return
        if b" HELO=" in line and b" PROTO=ESMTP" in line:
            return  # the server holds the client's EHLO already: no round trip more
        helo = client.helo if client.helo and _HOSTNAME.fullmatch(client.helo) else None
        await c.ehlo(hostname=helo)

    def offers(self, mechanism: str) -> bool:
        """The server offers this SASL mechanism (after connect)."""
        return mechanism.lower() in {m.lower() for m in self._client.server_auth_methods}

    async def auth_step(self, *args: bytes) -> SMTPResponse:
        """One line of a SASL exchange relayed as the client gave it (``AUTH LOGIN
        [response]``, then one base64 response per 334); the server's reply. After a
        235 the relay client owns the connection. Raises UpstreamUnavailable."""
        return await self._auth(self._client.execute_command(*args))

    async def _auth(self, step: Awaitable[SMTPResponse]) -> SMTPResponse:
        """The server's answer to an AUTH step (its refusals too); after a 235 the
        relay client takes the connection over. Raises UpstreamUnavailable."""
        try:
            resp = await step
        except SMTPResponseException as exc:
            return SMTPResponse(exc.code, exc.message)
        except _UPSTREAM_ERRORS as exc:
            self.abort()
            raise UpstreamUnavailable(describe(exc)) from exc
        transport = self._client.transport
        if resp.code == 235 and transport is not None and not transport.is_closing():
            self._relay = RelayClient.take_over(
                transport,  # type: ignore[arg-type]
                self._cfg.upstream_timeout_s)
        return resp

    async def authenticate(self, login: bytes, password: bytes) -> SMTPResponse:
        """The upstream's answer to the client's credentials (235 or its refusal).
        Raises UpstreamUnavailable, or LookupError when the upstream offers neither
        PLAIN nor LOGIN. After a 235 the relay client owns the connection."""
        c = self._client
        if self.offers("PLAIN"):
            return await self._auth(c.auth_plain(login, password))
        if self.offers("LOGIN"):
            return await self._auth(c.auth_login(login, password))
        raise LookupError(
            f"upstream offers no PLAIN or LOGIN (offers {sorted(c.server_auth_methods)})")

    def _relay_client(self) -> RelayClient:
        if self._relay is None:
            raise RelayError("not authenticated upstream")
        return self._relay

    async def _relayed(
        self, step: Callable[[RelayClient], Awaitable[SMTPResponse]]
    ) -> SMTPResponse:
        """One exchange on the relay client. Any failure, or the task cancelled mid-
        command, aborts the connection: its state is unknown, so it is never reused,
        and a message cut off is never taken upstream."""
        try:
            return await step(self._relay_client())
        except RelayError as exc:
            self.abort()
            raise UpstreamUnavailable(str(exc)) from exc
        except asyncio.CancelledError:
            self.abort()
            raise

    async def command(self, *args: bytes) -> SMTPResponse:
        return await self._relayed(lambda relay: relay.command(*args))

    async def chunk(self, data: bytes, last: bool) -> SMTPResponse:
        """One BDAT chunk of the client's, relayed as BDAT byte for byte."""
        return await self._relayed(lambda relay: relay.chunk(data, last))

    async def data(self, content: bytes) -> SMTPResponse:
        """The message (BDAT when the upstream offers CHUNKING, else DATA); the
        upstream's final reply (or its refusal of DATA)."""
        return await self._relayed(
            lambda relay: relay.message(content, chunking=self._chunking))

    async def quit(self, timeout_s: float = UPSTREAM_QUIT_TIMEOUT_S) -> None:
        """Polite QUIT (aborts any open transaction upstream), best effort within
        ``timeout_s``; never raises."""
        relay = self._relay
        if relay is None and not self._client.is_connected:
            return
        try:
            with contextlib.suppress(Exception):  # closing anyway
                async with asyncio.timeout(timeout_s):
                    if relay is not None:
                        if relay.is_connected:
                            await relay.quit()
                    else:
                        await self._client.quit()
        finally:
            self.abort()

    def abort(self) -> None:
        if self._relay is not None:
            self._relay.abort()
        else:
            self._client.close()


class Relay:
    """An allowed client's transactions on its upstream session, one command at a
    time; each method returns the reply for the client. When the upstream fails or
    says 421, ``ended`` says why (the session closes after that reply)."""

    def __init__(self, upstream: UpstreamSession) -> None:
        self.upstream = upstream
        self.txn_open = False  # a MAIL FROM was accepted upstream and not finished
        self.ended: str | None = None  # why the upstream is gone

    async def mail(self, path: bytes, params: tuple[bytes, ...]) -> str:
        if self.txn_open:  # the client reset (EHLO, a refused message): sync up
            status = await self.reset()
            if not status.startswith("250"):
                return status
        if self.upstream.xforward is not None:  # for this transaction's logs and headers
            forwarded = await self._command(self.upstream.xforward)
            if forwarded is None or forwarded.code == 421:
                return Replies.UPSTREAM_DOWN if forwarded is None else relayed(forwarded)
        resp = await self._command(b"MAIL", b"FROM:" + path, *params)
        if resp is None:
            return Replies.UPSTREAM_DOWN
        self.txn_open = resp.code == 250
        return relayed(resp)

    async def rcpt(self, path: bytes, params: tuple[bytes, ...] = ()) -> str:
        resp = await self._command(b"RCPT", b"TO:" + path, *params)
        return Replies.UPSTREAM_DOWN if resp is None else relayed(resp)

    async def command(self, *args: bytes) -> str:
        """A command the upstream answers as is (VRFY, ETRN)."""
        resp = await self._command(*args)
        return Replies.UPSTREAM_DOWN if resp is None else relayed(resp)

    async def chunk(self, data: bytes, last: bool) -> str:
        """A BDAT chunk; after ``LAST`` the upstream's final reply, never mailward's."""
        try:
            resp = await self.upstream.chunk(data, last)
        except UpstreamUnavailable as exc:
            return self._lost(str(exc), Replies.MESSAGE_NOT_SENT)
        if resp.code == 421:
            return self._lost(f"upstream {resp.code}", relayed(resp))
        if last and resp.code == 250:
            self.txn_open = False
        return relayed(resp)

    async def reset(self) -> str:
        if not self.txn_open:
            return Replies.OK
        resp = await self._command(b"RSET")
        if resp is None:
            return Replies.UPSTREAM_DOWN
        self.txn_open = False
        return relayed(resp)

    async def message(self, content: bytes) -> str:
        """The message; the upstream's final reply, never a 250 of mailward's own."""
        try:
            resp = await self.upstream.data(content)
        except UpstreamUnavailable as exc:
            return self._lost(str(exc), Replies.MESSAGE_NOT_SENT)
        self.txn_open = False
        if resp.code == 421:
            return self._lost(f"upstream {resp.code}", relayed(resp))
        if resp.code != 250:  # refused: make sure no half transaction stays open
            with contextlib.suppress(UpstreamUnavailable):
                await self.upstream.command(b"RSET")
        return relayed(resp)

    async def _command(self, *args: bytes) -> SMTPResponse | None:
        """One command upstream; None when the upstream is gone."""
        try:
            resp = await self.upstream.command(*args)
        except UpstreamUnavailable as exc:
            self._lost(str(exc), "")
            return None
        if resp.code == 421:  # the upstream is closing: relay that, then end
            self._lost(f"upstream {resp.code}", "")
        return resp

    def _lost(self, detail: str, reply: str) -> str:
        self.txn_open = False
        self.ended = detail
        return reply


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = [
    "IDENTITY_ATTRIBUTES",
    "RELAYED_EXTENSIONS",
    "UPSTREAM_QUIT_TIMEOUT_S",
    "ClientInfo",
    "Relay",
    "UpstreamCapabilities",
    "UpstreamSession",
    "UpstreamUnavailable",
    "describe",
    "xtext",
]
