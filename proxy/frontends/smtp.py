"""SMTP submission front end: a sans-IO parser towards the phone, aiosmtplib towards
the server.

How a session goes (see DESIGN.md, "Sessions, in order"):

1. TLS first. Implicit TLS listeners run the handshake on the accepted connection
   before the greeting (a failed one is counted, not recorded: DESIGN "Sessions, in
   order", 4; so is any connection that never completed TLS); STARTTLS listeners answer
   everything but EHLO/NOOP/STARTTLS/QUIT with ``530 5.7.0`` until TLS is up (unless
   ``allow_cleartext_auth`` on a loopback listener), and drop what was pipelined after
   STARTTLS. A client certificate, when presented, names the device.
2. AUTH PLAIN/LOGIN: the upstream checks the client's credentials (PLAIN or LOGIN,
   whichever it offers); a refusal is passed back as the server's own ``535``;
   mailward never checks or keeps passwords. The answer waits what the failed-login
   throttle of ``[limits]`` says (``login_limits``).
3. Only then does the gate decide (one ``decision`` record per login attempt). Deny:
   AUTH is accepted and every MAIL FROM gets ``550 5.7.1 <what to do>``, because mail
   apps show a MAIL FROM refusal to the user but treat a failed AUTH as a wrong
   password. Allow: the session registers with the gate and MAIL FROM, RCPT TO, RSET
   and the message are relayed one by one; the client sees the server's real replies,
   and ``250`` for a message only once the server has accepted it.
4. If the server fails or times out mid-session the client gets a 4xx (``451 4.4.1``
   for a message, ``421 4.4.1`` otherwise) and the connection closes: mailward never
   acknowledges or re-sends a message on its own.

The pieces, one module each: ``smtp_wire`` (the client's side of the protocol, sans
IO: events, states, limits; ``smtp_events`` and ``smtp_syntax`` hold its events and
its pure parsers), ``smtp_replies`` (every reply mailward makes), ``smtp_session``
(one per connection: the executor that drives the wire, calls the gate and relays;
its AUTH half is ``smtp_login``), ``smtp_upstream`` and ``smtp_relay`` (the upstream
client: XCLIENT/XFORWARD, AUTH, then the relay), and here
:class:`SmtpListener`, returned by :func:`start`. Connections run on
``proxy.net.socket_transport`` (OpenSSL on the socket), like IMAP's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from proxy.frontends import FrontendContext, RunningListener
from proxy.frontends.login_limits import pre_tls_end
from proxy.frontends.smtp_replies import Replies, multiline
from proxy.frontends.smtp_session import POST_AUTH_IDLE_TIMEOUT_S, SmtpSession
from proxy.frontends.smtp_upstream import (
    RELAYED_EXTENSIONS,
    UPSTREAM_QUIT_TIMEOUT_S,
    UpstreamCapabilities,
    UpstreamSession,
    UpstreamUnavailable,
)
from proxy.frontends.smtp_wire import MAX_MESSAGE_BYTES, Connection
from proxy.gate import Gate
from proxy.net.socket_transport import SocketServer, SocketTransport
from proxy.oplog import get_logger

log = get_logger("mailward.smtp")

#: Shutdown, after the grace: time for the 421 goodbye to be written (and TLS closed
#: politely) before connections are aborted; a shorter upstream QUIT; and the most
#: close() spends beyond its grace altogether.
SHUTDOWN_FLUSH_S = 0.3
SHUTDOWN_QUIT_TIMEOUT_S = 0.5
SHUTDOWN_MARGIN_S = 1.0
#: The upstream's extensions are asked for at start-up within this time.
PROBE_TIMEOUT_S = 5.0


class SmtpListener:
    """A running submission listener (:class:`proxy.frontends.RunningListener`)."""

    def __init__(self, ctx: FrontendContext, hostname: str) -> None:
        self.cfg = ctx.listener
        self.name = ctx.listener.name
        self.port = 0
        self.gate: Gate = ctx.gate
        self.server_tls = ctx.server_tls
        self.upstream_tls = ctx.upstream_tls
        self.hostname = hostname
        self.caps = UpstreamCapabilities()  # refreshed by the probe and every login
        self.sessions: set[SmtpSession] = set()
        self.closing = False  # close() has begun: new connections get 421 4.3.2
        self._quit_timeout_s = UPSTREAM_QUIT_TIMEOUT_S
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: SocketServer | None = None

    async def listen(self) -> None:
        if self.cfg.tls != "none" and self.server_tls is None:
            raise ValueError(f"listener {self.name}: tls = {self.cfg.tls} needs a server context")
        self._server = SocketServer(asyncio.get_running_loop(), self._accept,
                                    self.cfg.host, self.cfg.port, limits=self.gate.limits,
                                    listener=self.name)
        self.port = self._server.port
        log.info("smtp listener started", listener=self.name, port=self.port,
                 tls=self.cfg.tls, upstream=self.cfg.upstream)

    def _accept(self, sock: socket.socket) -> None:
        # Implicit TLS: nothing is read until the handshake, which reads it all.
        SocketTransport(asyncio.get_running_loop(), sock, SmtpSession(self),
                        start_reading=self.cfg.tls != "implicit")

    async def probe_upstream(self) -> None:
        """Learn the upstream's extensions before the first client asks (best effort)."""
        upstream = UpstreamSession(self.cfg, self.upstream_tls, self.hostname)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                self.caps = await upstream.connect()
        except (UpstreamUnavailable, TimeoutError) as exc:
            log.warning("upstream probe failed; advertising no optional extensions",
                        listener=self.name, upstream=self.cfg.upstream, error=str(exc))
        finally:
            await upstream.quit()

    def ehlo_reply(self, conn: Connection) -> str:
        """The EHLO reply: only the extensions the upstream also has (as the probe at
        start or the latest login found them), STARTTLS until TLS is up, AUTH once it
        is (or where cleartext is allowed). The upstream's XCLIENT, XFORWARD and AUTH
        mechanisms are never passed on."""
        caps = self.caps
        lines = [self.hostname]
        if caps.size is not None:
            lines.append(f"SIZE {caps.message_limit}")
        lines += [e for e in RELAYED_EXTENSIONS if e in caps.extensions and e != "SIZE"]
        if conn.starttls_available and not conn.tls:
            lines.append("STARTTLS")
        if conn.tls or conn.cleartext_auth:
            lines.append("AUTH LOGIN PLAIN")
        return multiline(250, lines)

    def session_ended(self, session: SmtpSession) -> None:
        """Connection gone: unregister, close the upstream, log a session_end if due."""
        self.sessions.discard(session)
        self.gate.unregister(session)  # type: ignore[arg-type]
        task = asyncio.get_running_loop().create_task(self._after_session(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_session(self, session: SmtpSession) -> None:
        record = session.end_record
        if record is not None and not (session.tls_done or self.cfg.tls == "none"):
            # Never completed TLS: counted into the abuse summary, not recorded.
            pre_tls_end(self.gate.limits, session.origin.client_ip, record[0], self.name)
        elif record is not None:  # first: a slow upstream QUIT must not lose it
            reason, detail = record
            await self.gate.record_session_end(
                session.origin, reason, identity=session.identity, detail=detail
            )
        await session.quit_upstream(self._quit_timeout_s)

    async def close(self, grace_s: float) -> None:
        """Stop accepting; sessions get ``grace_s`` to finish and leave; then every
        one gets ``421 4.3.2`` and is closed hard. Returns within ``grace_s`` +
        ``SHUTDOWN_MARGIN_S`` whatever clients and the upstream do."""
        loop = asyncio.get_running_loop()
        self.closing = True
        if self._server is not None:
            self._server.close()
        grace_end = loop.time() + max(grace_s, 0.0)
        hard_end = grace_end + SHUTDOWN_MARGIN_S
        await self._until_gone(grace_end)
        self._quit_timeout_s = SHUTDOWN_QUIT_TIMEOUT_S
        for session in list(self.sessions):
            session.shutdown()
        await self._until_gone(min(loop.time() + SHUTDOWN_FLUSH_S, hard_end))
        for session in list(self.sessions):
            session.abort()
        await self._until_gone(min(loop.time() + 0.1, hard_end))
        for session in list(self.sessions):
            session.forget()
        await self._clean_up(hard_end)
        log.info("smtp listener closed", listener=self.name)

    async def _until_gone(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))

    async def _clean_up(self, deadline: float) -> None:
        """session_end records and upstream QUITs (each bounded by the QUIT timeout)."""
        if not self._tasks:
            return
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        _, late = await asyncio.wait(list(self._tasks), timeout=left)
        for task in late:
            task.cancel()
        if late:
            log.warning("session clean-up cut short at shutdown",
                        listener=self.name, tasks=len(late))
            with contextlib.suppress(Exception):
                await asyncio.wait(late, timeout=0.1)


async def start(ctx: FrontendContext) -> RunningListener:
    """Start one submission listener (see the module docstring)."""
    hostname = socket.gethostname() or "mailward"  # no DNS lookup on the loop
    listener = SmtpListener(ctx, hostname)
    await listener.probe_upstream()
    await listener.listen()
    return listener


__all__ = [
    "MAX_MESSAGE_BYTES",
    "POST_AUTH_IDLE_TIMEOUT_S",
    "PROBE_TIMEOUT_S",
    "SHUTDOWN_MARGIN_S",
    "Replies",
    "SmtpListener",
    "SmtpSession",
    "start",
]
