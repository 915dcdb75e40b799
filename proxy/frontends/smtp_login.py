"""The AUTH half of an SMTP submission session (:class:`SmtpLogin`, a mixin of
``smtp_session.SmtpSession``, whose state it shares).

A login goes: the client's credentials (SASL events of ``smtp_wire``) -> the upstream
checks them (:class:`proxy.frontends.smtp_upstream.UpstreamSession`; mailward never
keeps a password) -> only after its 235 the gate decides. Every attempt with a user
name is exactly one ``decision`` record: allow, deny, ``auth_failed`` (a wrong
password: the upstream's own answer goes to the client), or a temporary deny when
the upstream cannot check it now.

AUTH LOGIN is relayed step by step when the upstream offers LOGIN: the upstream is
connected as AUTH begins and the client sees the upstream's own 334 challenges. If
it offers only PLAIN, or cannot be reached then, mailward prompts itself
("Username:", "Password:") and logs in upstream once it has both (an unreachable
upstream is then recorded for the user, like any login). AUTH PLAIN goes upstream
as PLAIN, or as LOGIN if that is all the upstream offers.
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING

from aiosmtplib import SMTPResponse

from proxy.frontends.login_limits import login_answered, login_refused
from proxy.frontends.smtp_replies import Replies, relayed
from proxy.frontends.smtp_upstream import (
    ClientInfo,
    Relay,
    UpstreamCapabilities,
    UpstreamSession,
    UpstreamUnavailable,
)
from proxy.frontends.smtp_wire import (
    AuthCancelled,
    AuthResponse,
    AuthStarted,
    ClientError,
    Connection,
    decode_plain,
)
from proxy.gate import UPSTREAM_UNAVAILABLE, Identity, Origin
from proxy.ids import ClientCert
from proxy.oplog import get_logger

if TYPE_CHECKING:
    from proxy.config import ListenerConfig
    from proxy.frontends.smtp import SmtpListener

log = get_logger("mailward.smtp")

#: Failed logins per connection; the last one's answer is followed by 421.
MAX_AUTH_FAILURES = 3
#: Idle limit once logged in (RFC 5321 4.5.3.2.7 server timeout).
POST_AUTH_IDLE_TIMEOUT_S = 300.0


class SmtpLogin:
    """AUTH for :class:`proxy.frontends.smtp_session.SmtpSession`: the handlers of the
    wire's AuthStarted, AuthResponse and AuthCancelled events."""

    # The session's state this half reads and sets (the session defines them).
    listener: SmtpListener
    cfg: ListenerConfig
    conn: Connection
    origin: Origin
    identity: Identity | None
    device_id: str | None
    client_cert: ClientCert | None
    _decided: bool
    _end_reason: str
    _end_detail: str
    _gone: bool
    _relay: Relay | None
    _refusal: str | None
    _idle_timeout_s: float
    _client_port: int | None

    def _init_login(self) -> None:
        self._sasl: list[bytes] = []  # SASL responses of the AUTH in progress
        self._mechanism = ""
        self._auth_upstream: UpstreamSession | None = None  # connected for this AUTH
        self._relaying_login = False  # AUTH LOGIN relayed to it step by step
        self._auth_failures = 0
        self._early_connects = 0  # upstream connections opened as an AUTH LOGIN began

    def _write(self, reply: str) -> None:
        raise NotImplementedError  # the session's

    def _goodbye(self, reply: str) -> None:
        raise NotImplementedError  # the session's

    def abort_login(self) -> None:
        """The client left in the middle of AUTH: drop the upstream connection."""
        if self._auth_upstream is not None:
            self._auth_upstream.abort()
            self._auth_upstream = None

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
        LOGIN; else (or unreachable) mailward's own prompts, PLAIN upstream later.
        A client that keeps starting AUTH LOGIN without finishing it gets mailward's
        prompts after MAX_AUTH_FAILURES tries: no upstream connection per bare AUTH."""
        if initial is not None and not _utf8(initial):
            self._write(Replies.USER_NOT_UTF8)
            return
        self._early_connects += 1
        if self._early_connects <= MAX_AUTH_FAILURES:
            upstream = self._new_upstream()
            try:
                self._learn(await upstream.connect())
            except UpstreamUnavailable:  # tried again once the user is known, recorded
                upstream.abort()
            else:
                self._auth_upstream = upstream
        if self._auth_upstream is not None and self._auth_upstream.offers("LOGIN"):
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
        if upstream is None or not self._relaying_login:
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
        if identity is not None:  # as attempted: named if the attempt is cut off
            self.identity = identity
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
        return Identity(user, self.device_id, "client_cert" if self.device_id else "",
                        cert=self.client_cert)

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
        await login_answered(self.listener.gate.limits, identity.user, self.origin.client_ip,
                             self.cfg.name, self.device_id, accepted=True)
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
        limits, ip = gate.limits, self.origin.client_ip
        if answer.code < 500:  # the server could not check the credentials now
            await gate.record_deny(
                identity, self.origin, "upstream_auth_temporary",
                f"The mail server answered {answer.code} to the login.", temporary=True)
            await login_answered(limits, identity.user, ip, self.cfg.name, self.device_id,
                                 accepted=False)
            return relayed(answer)
        await gate.record_auth_failed(identity, self.origin)
        # The record first: a client that leaves while the answer waits is recorded.
        await login_refused(limits, identity.user, ip, self.cfg.name, self.device_id)
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


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


__all__ = ["MAX_AUTH_FAILURES", "POST_AUTH_IDLE_TIMEOUT_S", "SmtpLogin"]
