"""One SMTP submission connection: the I/O executor around ``smtp_wire.Connection``.

:class:`SmtpSession` is the asyncio protocol of the client's
``proxy.net.socket_transport.SocketTransport`` and runs one task per connection that
takes the wire's events one at a time, answers each (itself, through the gate, or with
the upstream's reply) and writes the reply, which moves the wire's state machine on.
No event is parsed before the previous one is answered, so pipelined commands, and
bytes after the end of a message, wait their turn.

Login (AUTH PLAIN or LOGIN, credentials from the wire's SASL events):
:class:`proxy.frontends.smtp_upstream.UpstreamSession` authenticates upstream with
them, then the gate decides (one ``decision`` record per attempt). AUTH LOGIN is
relayed step by step when the upstream offers LOGIN: the upstream is connected as
the AUTH begins and the client sees its own 334 challenges (if it cannot be reached
then, mailward prompts itself and the attempt is recorded once the user is known).
The upstream connection names the client (XCLIENT/XFORWARD, ``ClientInfo``). Allow: the session
registers with the gate and MAIL, RCPT, RSET and the message are relayed one by one.
Deny: 235, and every MAIL FROM gets ``550 5.7.1 <text>``. BDAT chunks, VRFY and ETRN
are relayed like the rest, only as far as the upstream offers them (the wire knows
its extensions from ``UpstreamCapabilities``). The upstream failing or
timing out gives a 4xx and closes; a message is never acknowledged before the
upstream's own 250.

Times: an idle limit (pre-auth ``preauth_idle``, then ``POST_AUTH_IDLE_TIMEOUT_S``)
and the total pre-auth time run only while the session waits for the client, never
while it waits for the upstream or the gate.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from typing import TYPE_CHECKING, Any

from aiosmtplib import SMTPResponse

from proxy.frontends.smtp_replies import Replies, relayed
from proxy.frontends.smtp_upstream import (
    ClientInfo,
    Relay,
    UpstreamCapabilities,
    UpstreamSession,
    UpstreamUnavailable,
    describe,
)
from proxy.frontends.smtp_wire import (
    PAUSED,
    AuthCancelled,
    AuthResponse,
    AuthStarted,
    ChunkReceived,
    ClientError,
    Connection,
    DataRequested,
    Event,
    Hello,
    LimitExceeded,
    MailFrom,
    MessageReceived,
    PassThrough,
    PrivacyRequired,
    QuitRequested,
    RcptTo,
    ReplyNeeded,
    ResetRequested,
    Sentinel,
    StartTlsRequested,
    State,
    decode_plain,
)
from proxy.gate import UPSTREAM_UNAVAILABLE, Identity, Origin
from proxy.net.tls import device_id_from_ssl
from proxy.oplog import get_logger

if TYPE_CHECKING:
    from proxy.frontends.smtp import SmtpListener
    from proxy.net.socket_transport import SocketTransport

log = get_logger("mailward.smtp")

#: Failed logins per connection; the last one's answer is followed by 421.
MAX_AUTH_FAILURES = 3
#: Idle limit once logged in (RFC 5321 4.5.3.2.7 server timeout).
POST_AUTH_IDLE_TIMEOUT_S = 300.0
#: Stop reading from the client while this many unparsed command bytes are held.
READ_PAUSE_BYTES = 64 * 1024
#: Why a connection broke a limit of the wire, as its session_end reason.
_LIMIT_REASONS = {"commands": "too_many_commands", "line": "line_too_long",
                  "unrecognized": "too_many_unrecognized", "bdat_syntax": "bad_syntax"}


class SmtpSession(asyncio.Protocol):
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
        self._sasl: list[bytes] = []  # SASL responses of the AUTH in progress
        self._mechanism = ""
        self._auth_upstream: UpstreamSession | None = None  # connected for this AUTH
        self._relaying_login = False  # AUTH LOGIN relayed to it step by step
        self._client_port: int | None = None
        self._auth_failures = 0
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

    async def _next_event(self) -> Event | None:
        """The wire's next event, or None when the session should end (client gone
        or half-closed with nothing left, closing, or a time limit passed)."""
        conn = self.conn
        loop = asyncio.get_running_loop()
        while True:
            event = conn.next_event()
            if event is PAUSED or self._closing:
                return None
            if not isinstance(event, Sentinel):
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
        self.device_id = device_id_from_ssl(transport.get_extra_info("ssl_object"))
        return True

    def _tls_failed(self, detail: str) -> None:
        if self._end_reason != "shutdown":
            self._end_reason, self._end_detail = "tls_failed", detail
        self._closing = True

    async def _on_starttls(self, event: StartTlsRequested) -> None:
        self._write(Replies.READY_FOR_TLS)
        if await self._start_tls():
            self.conn.starttls_done()

    # -- commands answered here ----------------------------------------------------------

    async def _on_hello(self, event: Hello) -> None:
        self._write(self.listener.ehlo_reply(self.conn) if event.extended
                    else f"250 {self.listener.hostname}")

    async def _on_reply_needed(self, event: ReplyNeeded) -> None:
        self._write(event.reply)

    async def _on_privacy_required(self, event: PrivacyRequired) -> None:
        self._end_reason = "cleartext_refused"
        self._write(event.reply)

    async def _on_limit(self, event: LimitExceeded) -> None:
        self._end_reason = _LIMIT_REASONS.get(event.limit, event.limit)
        self._goodbye(event.reply)

    async def _on_quit(self, event: QuitRequested) -> None:
        self._goodbye(Replies.BYE)  # the upstream gets its QUIT when the client is gone

    # -- AUTH --------------------------------------------------------------------------

    async def _on_auth_started(self, event: AuthStarted) -> None:
        self._mechanism, self._sasl = event.mechanism, []
        if event.mechanism == "LOGIN":
            await self._start_login(event.initial_response)
        elif event.initial_response is not None:
            await self._on_sasl(event.initial_response)
        else:
            self._write(Replies.PLAIN_CHALLENGE)

    async def _start_login(self, initial: bytes | None) -> None:
        """AUTH LOGIN: connect upstream now and relay its own challenges if it offers
        LOGIN; else (or unreachable) mailward's own prompts, PLAIN upstream later."""
        if initial is not None and not _utf8(initial):
            self._write(Replies.USER_NOT_UTF8)
            return
        upstream = self._new_upstream()
        try:
            self._learn(await upstream.connect())
        except UpstreamUnavailable:  # tried again once the user is known, and recorded
            upstream.abort()
        else:
            self._auth_upstream = upstream
            if upstream.offers("LOGIN"):
                args = [b"AUTH", b"LOGIN"]
                if initial is not None:
                    self._sasl.append(initial)
                    args.append(base64.b64encode(initial) or b"=")
                await self._relay_step(*args)
                return
        if initial is not None:
            await self._on_sasl(initial)
        else:
            self._write(Replies.USERNAME_CHALLENGE)

    async def _on_auth_response(self, event: AuthResponse) -> None:
        await self._on_sasl(event.data)

    async def _on_auth_cancelled(self, event: AuthCancelled) -> None:
        self._sasl = []
        upstream, self._auth_upstream = self._auth_upstream, None
        if upstream is None or upstream.caps is None or not self._relaying_login:
            if upstream is not None:
                await upstream.quit()
            self._write(Replies.AUTH_ABORTED)
            return
        self._relaying_login = False
        try:  # the upstream's own answer to the cancellation
            answer = relayed(await upstream.auth_step(b"*"))
        except UpstreamUnavailable:
            answer = Replies.AUTH_ABORTED
        await upstream.quit()
        self._write(answer if answer[:1] in ("4", "5") else Replies.AUTH_ABORTED)

    async def _on_sasl(self, data: bytes) -> None:
        """One SASL response: PLAIN's only one, or LOGIN's user name or password."""
        self._sasl.append(data)
        if self._relaying_login:
            if len(self._sasl) == 1 and not _utf8(data):
                await self._drop_auth_upstream()
                self._write(Replies.USER_NOT_UTF8)
                return
            await self._relay_step(base64.b64encode(data) or b"=")
            return
        if self._mechanism == "LOGIN" and len(self._sasl) == 1:
            self._write(Replies.PASSWORD_CHALLENGE)
            return
        responses, self._sasl = self._sasl, []
        if self._mechanism == "LOGIN":
            login, password = responses
        else:
            try:
                _, login, password = decode_plain(data)
            except ClientError as exc:
                self._write(exc.reply)
                return
        answer = await self._login(login, password)
        if answer is not None:
            self._write(answer)

    async def _relay_step(self, *args: bytes) -> None:
        """One step of a relayed AUTH LOGIN: a 334 goes to the client as the upstream
        wrote it; the final answer concludes the attempt like any login."""
        upstream = self._auth_upstream
        assert upstream is not None
        self._relaying_login = True
        user = self._sasl[0].decode("utf-8") if self._sasl else None
        identity = None if user is None else self._identity(user)
        try:
            resp = await upstream.auth_step(*args)
        except UpstreamUnavailable as exc:
            self._relaying_login, self._auth_upstream = False, None
            await self._upstream_unavailable(exc, identity)
            return
        except asyncio.CancelledError:  # the client went away meanwhile
            upstream.abort()
            raise
        if resp.code == 334:
            self._write(relayed(resp))  # the upstream's own challenge
            return
        self._relaying_login, self._auth_upstream, self._sasl = False, None, []
        if identity is None:  # answered before a user name: nothing to decide on
            await upstream.quit()
            self._write(relayed(resp))
            return
        answer = await self._concluded(resp, identity, upstream)
        if answer is not None:
            self._write(answer)

    async def _drop_auth_upstream(self) -> None:
        upstream, self._auth_upstream = self._auth_upstream, None
        self._relaying_login, self._sasl = False, []
        if upstream is not None:
            await upstream.quit()

    def _new_upstream(self) -> UpstreamSession:
        client = ClientInfo(self.origin.client_ip, self._client_port, self.conn.helo,
                            self.conn.extended)
        return UpstreamSession(self.cfg, self.listener.upstream_tls, self.listener.hostname,
                               client)

    def _learn(self, caps: UpstreamCapabilities) -> None:
        """What the upstream offers: the next sessions' EHLO, this one's limits."""
        self.listener.caps = caps
        self.conn.message_limit = caps.message_limit
        self.conn.extensions = caps.extensions

    def _identity(self, user: str) -> Identity:
        return Identity(user, self.device_id, "client_cert" if self.device_id else "")

    async def _login(self, login: bytes, password: bytes) -> str | None:
        """Upstream AUTH, then the gate: the reply to AUTH (None: already answered)."""
        if not _utf8(login):  # never a mailbox; and it could not be logged
            await self._drop_auth_upstream()
            return Replies.USER_NOT_UTF8
        identity = self._identity(login.decode("utf-8"))
        # As the client gave it, not verified: what was attempted, named in the
        # session_end record if the attempt is cut off (client gone, shutdown).
        self.identity = identity
        upstream, self._auth_upstream = self._auth_upstream or self._new_upstream(), None
        try:
            return await self._verify(login, password, identity, upstream)
        except asyncio.CancelledError:  # the client went away meanwhile
            upstream.abort()
            raise

    async def _verify(self, login: bytes, password: bytes, identity: Identity,
                      upstream: UpstreamSession) -> str | None:
        """``_decided`` is set *before* each gate call: if the client leaves while the
        record is being written (the task is then cancelled), the attempt must not
        also get a ``session_end`` record."""
        gate = self.listener.gate
        try:
            if upstream.caps is None:
                self._learn(await upstream.connect())
            answer = await upstream.authenticate(login, password)
        except UpstreamUnavailable as exc:
            await self._upstream_unavailable(exc, identity)
            return None
        except LookupError as exc:
            log.error("upstream login impossible", listener=self.origin.listener,
                      error=str(exc))
            await upstream.quit()
            self._decided = True
            await gate.record_deny(
                identity, self.origin, "upstream_auth_unsupported",
                f"The mail server offers no login method mailward can relay ({exc}).")
            return Replies.AUTH_UNSUPPORTED
        return await self._concluded(answer, identity, upstream)

    async def _concluded(self, answer: SMTPResponse, identity: Identity,
                         upstream: UpstreamSession) -> str | None:
        """The upstream's final answer to the credentials: the attempt's one record."""
        if answer.code != 235:
            return await self._upstream_refused(answer, identity, upstream)
        return await self._decide(identity, upstream)

    async def _upstream_unavailable(self, exc: UpstreamUnavailable,
                                    identity: Identity | None) -> None:
        """The upstream failed during the login: 421 and close. The attempt's one
        decision record is a temporary deny for the user as the client gave it
        (unverified: it is what was attempted); before a user name, a session_end."""
        log.warning("upstream unavailable at login", listener=self.origin.listener,
                    error=str(exc))
        if identity is None:
            self._end_reason, self._end_detail = UPSTREAM_UNAVAILABLE, str(exc)
        else:
            self.identity, self._decided = identity, True
            await self.listener.gate.record_deny(
                identity, self.origin, UPSTREAM_UNAVAILABLE,
                f"The mail server could not be reached or did not answer ({exc}).",
                temporary=True)
        self._goodbye(Replies.UPSTREAM_DOWN)

    async def _upstream_refused(self, answer: SMTPResponse, identity: Identity,
                                upstream: UpstreamSession) -> str | None:
        """The upstream did not accept the credentials: its answer goes to the client."""
        await upstream.quit()
        gate = self.listener.gate
        self._decided = True
        if answer.code < 500:  # the server could not check the credentials now
            await gate.record_deny(
                identity, self.origin, "upstream_auth_temporary",
                f"The mail server answered {answer.code} to the login.", temporary=True)
            return relayed(answer)
        await gate.record_auth_failed(identity, self.origin)
        self._auth_failures += 1
        if self._auth_failures < MAX_AUTH_FAILURES:
            return relayed(answer)
        self._write(relayed(answer))
        self._goodbye(Replies.TOO_MANY_AUTH_FAILURES)
        return None

    async def _decide(self, identity: Identity, upstream: UpstreamSession) -> str | None:
        """The upstream said 235: the gate decides what the client is told."""
        self._decided = True
        decision = await self.listener.gate.decide(identity, self.origin)
        if self._gone:  # the client left while we decided: nothing to register
            await upstream.quit()
            return None
        if decision.allow:
            self.identity, self._relay = identity, Relay(upstream)
            self._idle_timeout_s = POST_AUTH_IDLE_TIMEOUT_S
            self.listener.gate.register(self)  # type: ignore[arg-type]
            return Replies.AUTH_OK
        await upstream.quit()
        if decision.temporary:
            return Replies.temporary(decision.user_text())
        # Refused: accept the login, refuse at MAIL FROM where apps show the text.
        self._refusal = Replies.denied(decision.user_text())
        return Replies.AUTH_OK

    # -- the relay ---------------------------------------------------------------------

    async def _on_mail(self, event: MailFrom) -> None:
        if self._refusal is not None or self._relay is None:
            self._write(self._refusal or Replies.UPSTREAM_DOWN)
            return
        self._write(await self._relay.mail(event.path, event.params))

    async def _on_rcpt(self, event: RcptTo) -> None:
        assert self._relay is not None  # the wire asks for MAIL first
        self._write(await self._relay.rcpt(event.path, event.params))

    async def _on_chunk(self, event: ChunkReceived) -> None:
        assert self._relay is not None  # the wire asks for MAIL and RCPT first
        self._write(await self._relay.chunk(event.data, event.last))

    async def _on_pass_through(self, event: PassThrough) -> None:
        """VRFY, ETRN: the upstream's answer (a refused session: the refusal)."""
        if self._refusal is not None or self._relay is None:
            self._write(self._refusal or Replies.UPSTREAM_DOWN)
            return
        self._write(await self._relay.command(event.command.encode(), event.argument))

    async def _on_data(self, event: DataRequested) -> None:
        self._write(Replies.START_MAIL)

    async def _on_message(self, event: MessageReceived) -> None:
        assert self._relay is not None  # the wire asks for MAIL and RCPT first
        self._write(await self._relay.message(event.content))

    async def _on_reset(self, event: ResetRequested) -> None:
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
        if self._auth_upstream is not None:  # the client left in the middle of AUTH
            self._auth_upstream.abort()
            self._auth_upstream = None
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
    Hello: SmtpSession._on_hello,
    StartTlsRequested: SmtpSession._on_starttls,
    AuthStarted: SmtpSession._on_auth_started,
    AuthResponse: SmtpSession._on_auth_response,
    AuthCancelled: SmtpSession._on_auth_cancelled,
    MailFrom: SmtpSession._on_mail,
    RcptTo: SmtpSession._on_rcpt,
    DataRequested: SmtpSession._on_data,
    MessageReceived: SmtpSession._on_message,
    ChunkReceived: SmtpSession._on_chunk,
    PassThrough: SmtpSession._on_pass_through,
    ResetRequested: SmtpSession._on_reset,
    QuitRequested: SmtpSession._on_quit,
    ReplyNeeded: SmtpSession._on_reply_needed,
    PrivacyRequired: SmtpSession._on_privacy_required,
    LimitExceeded: SmtpSession._on_limit,
}

def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


__all__ = ["MAX_AUTH_FAILURES", "POST_AUTH_IDLE_TIMEOUT_S", "SmtpSession"]
