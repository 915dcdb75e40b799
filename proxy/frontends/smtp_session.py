"""One SMTP submission connection: the I/O executor around ``smtp_wire.Connection``.

:class:`SmtpSession` is the asyncio protocol of the client's
``proxy.net.socket_transport.SocketTransport`` and runs one task per connection that
takes the wire's events one at a time, answers each (itself, through the gate, or with
the upstream's reply) and writes the reply, which moves the wire's state machine on.
No event is parsed before the previous one is answered, so pipelined commands, and
bytes after the end of a message, wait their turn.

Login: ``smtp_login.SmtpLogin`` (the AUTH half of this class) has the upstream check
the credentials, then the gate decides (one ``decision`` record per attempt). Allow:
the session registers with the gate and MAIL, RCPT, RSET and the message are relayed
one by one, and BDAT chunks, VRFY and ETRN as far as the upstream offers them (the
wire knows its extensions from ``UpstreamCapabilities``). Deny: 235, and every MAIL
FROM gets ``550 5.7.1 <text>``. The upstream failing or timing out gives a 4xx and
closes; a message is never acknowledged before the upstream's own 250.

Times: an idle limit (pre-auth ``preauth_idle``, then ``POST_AUTH_IDLE_TIMEOUT_S``)
and the total pre-auth time run only while the session waits for the client, never
while it waits for the upstream or the gate.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from proxy.frontends import smtp_events as ev
from proxy.frontends.smtp_login import MAX_AUTH_FAILURES, POST_AUTH_IDLE_TIMEOUT_S, SmtpLogin
from proxy.frontends.smtp_replies import Replies
from proxy.frontends.smtp_upstream import Relay, describe
from proxy.frontends.smtp_wire import Connection, State
from proxy.gate import Identity, Origin
from proxy.ids import ClientCert
from proxy.net.tls import client_cert_from_ssl
from proxy.oplog import get_logger

if TYPE_CHECKING:
    from proxy.frontends.smtp import SmtpListener
    from proxy.net.socket_transport import SocketTransport

log = get_logger("mailward.smtp")

#: Stop reading from the client while this many unparsed command bytes are held.
READ_PAUSE_BYTES = 64 * 1024
#: Why a connection broke a limit of the wire, as its session_end reason.
_LIMIT_REASONS = {"commands": "too_many_commands", "line": "line_too_long",
                  "unrecognized": "too_many_unrecognized", "bdat_syntax": "bad_syntax"}


class SmtpSession(SmtpLogin, asyncio.Protocol):
    """One client connection. Also its :class:`proxy.gate.LiveSession` once allowed."""

    def __init__(self, listener: SmtpListener) -> None:
        cfg = listener.cfg
        self.listener = listener
        self.cfg = cfg
        self.identity: Identity | None = None
        self.origin = Origin("smtp", cfg.name, "", cfg.unidentified)
        self.conn = Connection(
            tls=cfg.tls == "implicit", starttls=cfg.tls == "starttls",
            cleartext_auth=cfg.allow_cleartext_auth and cfg.is_loopback,
            max_commands=cfg.max_preauth_commands, message_limit=listener.caps.message_limit,
            extensions=listener.caps.extensions)
        self.transport: SocketTransport | None = None
        self.device_id: str | None = None
        self.client_cert: ClientCert | None = None
        self.tls_done = False  # the handshake completed (else: counted, not recorded)
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[bool] | None = None  # for the client's bytes
        self._reading_paused = False
        self._eof = False  # the client half-closed: what it sent is still handled
        self._gone = False  # the client's connection is lost
        self._handshaking = False
        self._idle_timeout_s = cfg.preauth_idle_timeout_s
        self._deadline = 0.0  # end of the pre-auth time
        self._relay: Relay | None = None  # once allowed: the upstream session
        self._refusal: str | None = None  # the gate denied: every MAIL FROM's answer
        self._client_port: int | None = None
        self._init_login()
        self._busy = False  # an event is being handled
        self._pending_goodbye: str | None = None  # sent once the current command ends
        self._closing = False
        self._ended = False
        self._decided = False  # a decision record was written for this connection
        self._end_reason = "closed_before_auth"  # session_end reason if no decision
        self._end_detail = ""
        self._ended_by: str | None = None  # after a decision: upstream_lost | shutdown

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else ""
        self._client_port = int(peer[1]) if isinstance(peer, tuple) else None
        self.origin = Origin("smtp", self.cfg.name, ip, self.cfg.unidentified)
        self.listener.sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        if (conn.buffered > READ_PAUSE_BYTES and conn.state not in (State.DATA, State.CHUNK)
                and not self._reading_paused and self.transport is not None):
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake(True)

    def eof_received(self) -> bool:
        self._eof = True  # half-closed: answer what was sent, then close
        self._wake(True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = self._closing = True
        self._wake(False)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # mid-command: the upstream command is aborted
        else:
            self._finish()

    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    # -- the session's task ------------------------------------------------------------

    async def _run(self) -> None:
        try:
            if self.cfg.tls == "implicit" and not await self._start_tls():
                return
            if self.listener.closing:  # accepted just before the listener closed
                self._end_reason = "shutdown"
                self._goodbye(Replies.SHUTDOWN)
                return
            self._deadline = asyncio.get_running_loop().time() + self.cfg.preauth_timeout_s
            self._write(Replies.greeting(self.listener.hostname))
            await self._commands()
        except Exception:  # a bug must not take the listener down
            log.exception("smtp session error", listener=self.origin.listener,
                          client_ip=self.origin.client_ip)
            self._end_reason = "internal_error"
            self._goodbye(Replies.INTERNAL_ERROR)
        finally:
            self._finish()

    async def _commands(self) -> None:
        """Events one by one, each answered before the next is parsed."""
        while not self._closing:
            event = await self._next_event()
            if event is None:
                return
            self._busy = True
            try:
                await _HANDLERS[type(event)](self, event)
            finally:
                self._busy = False
            if self._upstream_gone() or self.conn.state is State.CLOSED:
                self._close()
                return
            if self._pending_goodbye is not None and self.conn.state is State.COMMAND:
                self._goodbye(self._pending_goodbye)
                return

    async def _next_event(self) -> ev.Event | None:
        """The wire's next event, or None when the session should end (client gone
        or half-closed with nothing left, closing, or a time limit passed)."""
        conn = self.conn
        loop = asyncio.get_running_loop()
        while True:
            event = conn.next_event()
            if event is ev.PAUSED or self._closing:
                return None
            if not isinstance(event, ev.Sentinel):
                return event
            if self._gone or self._eof or self._closing:
                return None
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            timeout, total = self._idle_timeout_s, False
            if not conn.authenticated and self._deadline - loop.time() < timeout:
                timeout, total = self._deadline - loop.time(), True
            if timeout <= 0 or not await self._wait(timeout):
                if not (self._gone or self._closing):
                    self._timed_out(total)
                return None

    async def _wait(self, timeout: float) -> bool:
        """True when the client sent something (or left), False after ``timeout``."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._wake, False)
        try:
            return await waiter or self._gone
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, total: bool) -> None:
        if total:
            self._end_reason = "preauth_timeout"
            self._goodbye(Replies.PREAUTH_TIMEOUT)
        else:
            self._end_reason = "idle_timeout"
            self._goodbye(Replies.IDLE_TIMEOUT)

    # -- writing and closing -------------------------------------------------------------

    def _write(self, reply: str) -> None:
        """Send ``reply`` (which answers the wire's last event)."""
        transport = self.transport
        if self._closing or self._handshaking or transport is None:
            return
        transport.write(self.conn.send(reply))

    def _close(self) -> None:
        if self.transport is not None and not self._handshaking:
            self.transport.close()
        elif self.transport is not None:
            self.transport.abort()  # never write into a handshake
        self._closing = True
        self._wake(False)

    def _goodbye(self, reply: str) -> None:
        """Last words (a 421), then close."""
        self._write(reply)
        self._close()

    def _finish(self) -> None:
        """The connection is over: clean up once (records and upstream QUIT follow)."""
        if self._ended:
            return
        self._ended = self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.listener.session_ended(self)

    # -- TLS -------------------------------------------------------------------------

    async def _start_tls(self) -> bool:
        """The server side of the handshake (implicit TLS, or after STARTTLS's 220)."""
        ctx, transport = self.listener.server_tls, self.transport
        assert ctx is not None and transport is not None
        self._handshaking = True
        try:  # aborts the connection if it fails
            await transport.start_tls(ctx, server_side=True,
                                      timeout=self.cfg.preauth_idle_timeout_s)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self._tls_failed(describe(exc))
            return False
        except asyncio.CancelledError:  # aborted (shutdown): still a session_end
            self._tls_failed("cancelled")
            raise
        finally:
            self._handshaking = False
        self.tls_done = True
        self.client_cert = client_cert_from_ssl(transport.get_extra_info("ssl_object"))
        self.device_id = self.client_cert.device_id if self.client_cert else None
        return True

    def _tls_failed(self, detail: str) -> None:
        if self._end_reason != "shutdown":
            self._end_reason, self._end_detail = "tls_failed", detail
        self._closing = True

    async def _on_starttls(self, event: ev.StartTlsRequested) -> None:
        self._write(Replies.READY_FOR_TLS)
        if await self._start_tls():
            self.conn.starttls_done()

    # -- commands answered here ----------------------------------------------------------

    async def _on_hello(self, event: ev.Hello) -> None:
        self._write(self.listener.ehlo_reply(self.conn) if event.extended
                    else f"250 {self.listener.hostname}")

    async def _on_reply_needed(self, event: ev.ReplyNeeded) -> None:
        self._write(event.reply)

    async def _on_privacy_required(self, event: ev.PrivacyRequired) -> None:
        self._end_reason = "cleartext_refused"
        self._write(event.reply)

    async def _on_limit(self, event: ev.LimitExceeded) -> None:
        self._end_reason = _LIMIT_REASONS.get(event.limit, event.limit)
        self._goodbye(event.reply)

    async def _on_quit(self, event: ev.QuitRequested) -> None:
        self._goodbye(Replies.BYE)  # the upstream gets its QUIT when the client is gone

    # -- the relay ---------------------------------------------------------------------

    async def _on_mail(self, event: ev.MailFrom) -> None:
        if self._refusal is not None or self._relay is None:
            self._write(self._refusal or Replies.UPSTREAM_DOWN)
            return
        self._write(await self._relay.mail(event.path, event.params))

    async def _on_rcpt(self, event: ev.RcptTo) -> None:
        assert self._relay is not None  # the wire asks for MAIL first
        self._write(await self._relay.rcpt(event.path, event.params))

    async def _on_chunk(self, event: ev.ChunkReceived) -> None:
        assert self._relay is not None  # the wire asks for MAIL and RCPT first
        self._write(await self._relay.chunk(event.data, event.last))

    async def _on_pass_through(self, event: ev.PassThrough) -> None:
        """VRFY, ETRN: the upstream's answer (a refused session: the refusal)."""
        if self._refusal is not None or self._relay is None:
            self._write(self._refusal or Replies.UPSTREAM_DOWN)
            return
        self._write(await self._relay.command(event.command.encode(), event.argument))

    async def _on_data(self, event: ev.DataRequested) -> None:
        self._write(Replies.START_MAIL)

    async def _on_message(self, event: ev.MessageReceived) -> None:
        assert self._relay is not None  # the wire asks for MAIL and RCPT first
        self._write(await self._relay.message(event.content))

    async def _on_reset(self, event: ev.ResetRequested) -> None:
        self._write(Replies.OK if self._relay is None else await self._relay.reset())

    def _upstream_gone(self) -> bool:
        """The upstream failed or said 421: log it once; the session is to close."""
        relay = self._relay
        if relay is None or relay.ended is None:
            return False
        if self._ended_by is None:
            log.warning("upstream lost", listener=self.origin.listener,
                        client_ip=self.origin.client_ip, error=relay.ended)
            self._ended_by, self._end_detail = "upstream_lost", relay.ended
        return True

    async def quit_upstream(self, timeout_s: float) -> None:
        self.abort_login()
        if self._relay is not None:
            relay, self._relay = self._relay, None
            await relay.upstream.quit(timeout_s)

    # -- LiveSession and the listener's calls ------------------------------------------

    async def terminate(self, text: str) -> None:
        """End the session between transactions with ``421 4.7.0 <text>``; a command
        in progress (a DATA transfer too) completes first."""
        self.listener.gate.unregister(self)  # type: ignore[arg-type]
        reply = Replies.terminated(text)
        if self._busy or self.conn.state is not State.COMMAND:
            self._pending_goodbye = reply
        else:
            self._goodbye(reply)

    def shutdown(self) -> None:
        """Server stopping and the grace is over: ``421 4.3.2``, whatever the session
        is doing, and close. A message in transfer is not acknowledged (its upstream
        connection is aborted, so the upstream does not take it either)."""
        self._end_reason = "shutdown"
        if self._relay is not None:  # a live, allowed session
            self._ended_by = self._ended_by or "shutdown"
        self._pending_goodbye = None
        self._goodbye(Replies.SHUTDOWN)

    def abort(self) -> None:
        """Close hard: drop the connection without waiting for the client (a TLS
        close waits for the client's close_notify), stop the command in progress."""
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def forget(self) -> None:
        """The connection is gone but connection_lost never came: end it here."""
        self.abort()
        self._finish()

    @property
    def end_record(self) -> tuple[str, str] | None:
        """(reason, detail) for a session_end record, or None if none is due: always
        without a decision; after one, only if the upstream failed or we shut down
        (gate terminations are logged by the gate)."""
        if not self._decided:
            return self._end_reason, self._end_detail
        if self._ended_by is not None:
            return self._ended_by, self._end_detail
        return None


_HANDLERS: dict[type[Any], Any] = {
    ev.Hello: SmtpSession._on_hello,
    ev.StartTlsRequested: SmtpSession._on_starttls,
    ev.AuthStarted: SmtpSession._on_auth_started,
    ev.AuthResponse: SmtpSession._on_auth_response,
    ev.AuthCancelled: SmtpSession._on_auth_cancelled,
    ev.MailFrom: SmtpSession._on_mail,
    ev.RcptTo: SmtpSession._on_rcpt,
    ev.DataRequested: SmtpSession._on_data,
    ev.MessageReceived: SmtpSession._on_message,
    ev.ChunkReceived: SmtpSession._on_chunk,
    ev.PassThrough: SmtpSession._on_pass_through,
    ev.ResetRequested: SmtpSession._on_reset,
    ev.QuitRequested: SmtpSession._on_quit,
    ev.ReplyNeeded: SmtpSession._on_reply_needed,
    ev.PrivacyRequired: SmtpSession._on_privacy_required,
    ev.LimitExceeded: SmtpSession._on_limit,
}

__all__ = ["MAX_AUTH_FAILURES", "POST_AUTH_IDLE_TIMEOUT_S", "SmtpSession"]
