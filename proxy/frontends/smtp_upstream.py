"""The upstream side of an SMTP submission session: one connection to the real
submission server per client login.

aiosmtplib connects (implicit TLS, STARTTLS or none, the server's certificate
verified), says EHLO and relays the client's credentials with AUTH PLAIN or LOGIN,
whichever the server offers. After the server's 235 the transport is handed to
:class:`proxy.frontends.smtp_relay.RelayClient`, which relays MAIL, RCPT, RSET and the
message (BDAT when the server offers CHUNKING, else DATA) at a fraction of
aiosmtplib's per-command cost. Every failure is :class:`UpstreamUnavailable`, after
which the connection is aborted: a message whose final reply did not arrive is never
acknowledged or re-sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

from aiosmtplib import SMTP as SMTPClient
from aiosmtplib import SMTPException, SMTPResponse, SMTPResponseException

from proxy.config import ListenerConfig
from proxy.frontends.smtp_relay import RelayClient, RelayError
from proxy.frontends.smtp_replies import Replies, relayed
from proxy.frontends.smtp_wire import MAX_MESSAGE_BYTES

#: Extensions advertised to clients only as far as the upstream has them.
RELAYED_EXTENSIONS = ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")
#: A polite QUIT to the upstream gets at most this long.
UPSTREAM_QUIT_TIMEOUT_S = 2.0


class UpstreamUnavailable(Exception):
    """The upstream could not be reached, timed out, or dropped the connection."""


@dataclass(frozen=True, slots=True)
class UpstreamCapabilities:
    """What the upstream's EHLO offers that matters to what clients are told."""

    size: int | None = None  # None: no SIZE; 0: SIZE without a limit
    extensions: frozenset[str] = frozenset()  # of RELAYED_EXTENSIONS
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
        self, cfg: ListenerConfig, tls: ssl.SSLContext | None, local_hostname: str
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

    async def connect(self) -> UpstreamCapabilities:
        """Connect (TLS as configured) and EHLO; raises UpstreamUnavailable."""
        c = self._client
        try:
            async with asyncio.timeout(self._cfg.upstream_connect_timeout_s):
                await c.connect()
                if c.is_ehlo_or_helo_needed:
                    await c.ehlo()
        except _UPSTREAM_ERRORS as exc:
            self.abort()
            raise UpstreamUnavailable(describe(exc)) from exc
        self._chunking = "chunking" in c.esmtp_extensions
        return UpstreamCapabilities.from_ehlo(c.esmtp_extensions, c.server_auth_methods)

    async def authenticate(self, login: bytes, password: bytes) -> SMTPResponse:
        """The upstream's answer to the client's credentials (235 or its refusal).
        Raises UpstreamUnavailable, or LookupError when the upstream offers neither
        PLAIN nor LOGIN. After a 235 the relay client owns the connection."""
        c = self._client
        methods = {m.lower() for m in c.server_auth_methods}
        try:
            if "plain" in methods:
                resp = await c.auth_plain(login, password)
            elif "login" in methods:
                resp = await c.auth_login(login, password)
            else:
                raise LookupError(
                    f"upstream offers no PLAIN or LOGIN (offers {sorted(methods)})")
        except SMTPResponseException as exc:
            return SMTPResponse(exc.code, exc.message)
        except _UPSTREAM_ERRORS as exc:
            self.abort()
            raise UpstreamUnavailable(describe(exc)) from exc
        transport = c.transport
        if resp.code == 235 and transport is not None and not transport.is_closing():
            self._relay = RelayClient.take_over(
                transport,  # type: ignore[arg-type]
                self._cfg.upstream_timeout_s)
        return resp

    def _relay_client(self) -> RelayClient:
        if self._relay is None:
            raise RelayError("not authenticated upstream")
        return self._relay

    async def command(self, *args: bytes) -> SMTPResponse:
        try:
            return await self._relay_client().command(*args)
        except RelayError as exc:
            self.abort()
            raise UpstreamUnavailable(str(exc)) from exc
        except asyncio.CancelledError:  # state unknown mid-command: never reuse it
            self.abort()
            raise

    async def data(self, content: bytes) -> SMTPResponse:
        """The message (BDAT when the upstream offers CHUNKING, else DATA); the
        upstream's final reply (or its refusal of DATA)."""
        try:
            return await self._relay_client().message(content, chunking=self._chunking)
        except RelayError as exc:
            self.abort()
            raise UpstreamUnavailable(str(exc)) from exc
        except asyncio.CancelledError:  # cut mid-message: the upstream must not take it
            self.abort()
            raise

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
        resp = await self._command(b"MAIL", b"FROM:" + path, *params)
        if resp is None:
            return Replies.UPSTREAM_DOWN
        self.txn_open = resp.code == 250
        return relayed(resp)

    async def rcpt(self, path: bytes) -> str:
        resp = await self._command(b"RCPT", b"TO:" + path)
        return Replies.UPSTREAM_DOWN if resp is None else relayed(resp)

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
    "RELAYED_EXTENSIONS",
    "UPSTREAM_QUIT_TIMEOUT_S",
    "Relay",
    "UpstreamCapabilities",
    "UpstreamSession",
    "UpstreamUnavailable",
    "describe",
]
