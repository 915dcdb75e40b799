"""IMAP front end: the I/O executor of the sans-IO pre-auth conversation.

The protocol logic has no I/O and lives beside this file: ``imap_wire`` parses what
the client sends before login, ``imap_preauth`` is the conversation (events in,
commands out: greet, answer CAPABILITY/ID/NOOP, STARTTLS, refuse cleartext logins, log
in upstream, ask the gate, refuse or splice), and ``imap_upstream`` is the login to the
upstream server. This module performs their commands; every ``await`` is here.

One :class:`_ImapSession` per client connection:

1. TLS: implicit (the handshake starts at once) or STARTTLS. A verified client
   certificate's SAN names the device (``proxy.net.tls.client_cert_from_ssl``).
2. Pre-auth: client bytes go to the layer (:meth:`_ImapSession._client_event`, with the
   idle and total time limits), its commands are performed in order
   (:meth:`_ImapSession._perform`), and outcomes (TLS up, the upstream's answer, the
   gate's decision) are fed back as events.
3. Login: connect upstream (implicit TLS / STARTTLS / none, certificate verified) and
   run ``imap_upstream.UpstreamLogin`` to the tagged answer. The upstream's capabilities
   (which SASL mechanisms to offer, IDLE, ...) are learnt from a probe when the
   listener starts (:meth:`ImapListener.probe_upstream`) and refreshed by every login.
4. Allow: the upstream's tagged OK goes to the client and both transports are spliced
   (``Pipe`` buffered protocols writing straight into each other's transport, with
   pause/resume_reading driven by the peer's write buffer; no per-byte Python work and
   no coroutine per session). The session is registered with the gate, which may
   :meth:`_ImapSession.terminate` it (``* BYE <reason>``).

Both connections of a session are ``proxy.net.socket_transport.SocketTransport`` objects
(OpenSSL on the socket), not the event loop's transports: an idle session then holds
no receive buffer and no TLS buffers, however much mail it once carried.

Audit: a login attempt gives one ``decision`` record (from the gate; an unreachable
upstream is a temporary deny ``upstream_unavailable``); a connection that ends before
any login attempt gives one ``session_end`` record with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable

from proxy.config import ListenerConfig
from proxy.frontends import FrontendContext
from proxy.frontends.imap_preauth import (
    OWN_MECHANISMS,
    SHUTDOWN_TEXT,
    ClientClosed,
    Close,
    CloseUpstream,
    Connected,
    Crashed,
    DataReceived,
    DecisionMade,
    OpenUpstream,
    Preauth,
    PreauthCommand,
    PreauthEvent,
    RecordAuthFailed,
    RecordUnavailable,
    RequestDecision,
    SendToClient,
    ShutdownRequested,
    Splice,
    StartTls,
    TimedOut,
    TlsEstablished,
    TlsFailed,
    UpstreamAnswered,
    UpstreamFailed,
)
from proxy.frontends.imap_syntax import SUPPORTED_MECHANISMS, RemoteProtocolError, bye_line
from proxy.frontends.imap_transport import NO_EVENT, Pipe, UpstreamConnection, UpstreamError
from proxy.frontends.imap_upstream import (
    LoginAnswered,
    Phase,
    ReportCapabilities,
    SendToUpstream,
    StartUpstreamTls,
    UpstreamCommand,
    UpstreamDataReceived,
    UpstreamLogin,
    UpstreamTlsEstablished,
    logout_command,
)
from proxy.gate import Identity, Origin
from proxy.net.socket_transport import (
    SocketServer,
    SocketTransport,
    open_connection,
)
from proxy.net.tls import client_cert_from_ssl
from proxy.oplog import get_logger

log = get_logger("mailward.imap")

#: Upstream pre-auth capabilities the proxy replaces with its own view.
_OWN_CAPABILITIES = {"IMAP4REV1", "SASL-IR", "LITERAL+", "ID", "STARTTLS", "LOGINDISABLED",
                     "LOGIN-REFERRALS"}
#: Advertised until the first upstream greeting tells what the server supports.
DEFAULT_UPSTREAM_CAPABILITIES = ("IDLE", "ENABLE")
#: Pause reading from a pre-auth client when this many unparsed bytes are held.
PREAUTH_READ_PAUSE_BYTES = 64 * 1024
#: TLS 1.3 session tickets sent to IMAP clients (see ``ImapListener.start``).
TLS_SESSION_TICKETS = 0
#: Cap on the TLS handshake, also bounded by the pre-auth idle timeout.
TLS_HANDSHAKE_TIMEOUT_S = 20.0
#: The upstream's capabilities are asked for at start-up within this time.
PROBE_TIMEOUT_S = 5.0
#: What a failed upstream conversation raises (the client is told: unavailable).
_UPSTREAM_ERRORS = (UpstreamError, RemoteProtocolError, OSError, ssl.SSLError, TimeoutError,
                    ConnectionError)


# -------------------------------------------------------------------------- listener


class ImapListener:
    """A started IMAP listener (``RunningListener``)."""

    def __init__(self, ctx: FrontendContext) -> None:
        self.ctx = ctx
        self.listener = ctx.listener
        self.name = ctx.listener.name
        self.port = 0
        self.sessions: set[_ImapSession] = set()
        self.upstream_capabilities: list[str] = list(DEFAULT_UPSTREAM_CAPABILITIES)
        self.upstream_mechanisms: list[str] = []  # relayable SASL mechanisms it offers
        self._server: SocketServer | None = None
        self.closing = False

    async def start(self) -> ImapListener:
        loop = asyncio.get_running_loop()
        tls = self.ctx.server_tls
        if tls is not None:
            # No TLS 1.3 session tickets: each one keeps a copy of the session, with the
            # device's client certificate, for as long as the connection lives (about
            # 10 KiB per idle mTLS session, measured), and a phone's IMAP connections
            # are long-lived, so resumption would save little.
            with contextlib.suppress(ValueError, AttributeError):
                tls.num_tickets = TLS_SESSION_TICKETS
        # Our own accept loop and transports (proxy.net.socket_transport): OpenSSL on the
        # socket keeps an idle TLS session small, where the loop's TLS transport would
        # keep a 256 KiB read buffer and BIO buffers as large as its biggest burst.
        self._server = SocketServer(loop, self._new_connection, self.listener.host,
                                    self.listener.port, backlog=1024)
        self.port = self._server.port
        log.info("imap listener started", listener=self.name, port=self.port,
                 tls=self.listener.tls, upstream=self.listener.upstream)
        return self

    def _new_connection(self, sock: socket.socket) -> None:
        # Implicit TLS: nothing is read until the handshake, which reads it all.
        SocketTransport(asyncio.get_running_loop(), sock, _ImapSession(self).client,
                        start_reading=self.listener.tls != "implicit")

    def capabilities(self) -> list[str]:
        """What pre-auth CAPABILITY shows of the upstream's capabilities."""
        return self.upstream_capabilities

    def mechanisms(self) -> list[str]:
        """The upstream's SASL mechanisms that the proxy can relay (``imap_sasl``)."""
        return self.upstream_mechanisms

    def learn_capabilities(self, caps: list[str]) -> None:
        """Pre-auth capabilities of the upstream (from its greeting), minus our own."""
        keep = [c for c in caps
                if c.upper() not in _OWN_CAPABILITIES and not c.upper().startswith("AUTH=")]
        offered = {c.upper()[5:] for c in caps if c.upper().startswith("AUTH=")}
        self.upstream_capabilities = keep
        self.upstream_mechanisms = [m for m in SUPPORTED_MECHANISMS
                                    if m in offered and m not in OWN_MECHANISMS]

    async def probe_upstream(self) -> None:
        """Learn the upstream's capabilities before the first client asks (best effort:
        until a login succeeds in telling, only PLAIN is offered)."""
        up = UpstreamConnection()
        login = UpstreamLogin.probe(starttls=self.listener.upstream_tls == "starttls")
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await converse_upstream(self.listener, self.ctx.upstream_tls, up, login,
                                        self.learn_capabilities)
        except _UPSTREAM_ERRORS as exc:
            log.warning("upstream probe failed; offering PLAIN only until a login",
                        listener=self.name, upstream=self.listener.upstream,
                        error=str(exc)[:200] or type(exc).__name__)
        finally:
            up.pipe.close()

    async def close(self, grace_s: float) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        for session in list(self.sessions):
            await session.shutdown()
        deadline = loop.time() + 5
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.01)
        log.info("imap listener closed", listener=self.name)


async def start(ctx: FrontendContext) -> ImapListener:
    """Start the IMAP listener described by ``ctx.listener``."""
    listener = ImapListener(ctx)
    await listener.probe_upstream()
    return await listener.start()


async def converse_upstream(cfg: ListenerConfig, tls_ctx: ssl.SSLContext | None,
                            up: UpstreamConnection, login: UpstreamLogin,
                            learn: Callable[[list[str]], None]) -> LoginAnswered | None:
    """Connect ``up`` to the listener's upstream and run the sans-IO ``login`` to its
    end: the login's tagged answer, or None when ``login`` is a probe."""
    loop = asyncio.get_running_loop()
    if cfg.upstream_tls != "none" and tls_ctx is None:
        raise UpstreamError("upstream TLS configured without a TLS context")
    try:
        up.pipe.transport = await open_connection(
            cfg.upstream_host, cfg.upstream_port, up.pipe,
            tls=tls_ctx if cfg.upstream_tls == "implicit" else None,
            timeout=cfg.upstream_connect_timeout_s)
    except TimeoutError:
        raise UpstreamError("connecting to the upstream timed out") from None
    deadline = loop.time() + cfg.upstream_timeout_s
    queue: deque[UpstreamCommand] = deque()
    while True:
        if not queue:
            if login.phase is Phase.DONE:  # a probe, which has logged out
                return None
            queue.extend(login.handle(UpstreamDataReceived(await up.receive(deadline))))
            continue
        match queue.popleft():
            case SendToUpstream(data):
                up.pipe.write(data)
            case StartUpstreamTls():
                assert tls_ctx is not None
                await up.pipe.transport.start_tls(
                    tls_ctx, server_side=False, server_hostname=cfg.upstream_host,
                    timeout=max(0.1, deadline - loop.time()))
                queue.extend(login.handle(UpstreamDataReceived(up.take())))
                queue.extend(login.handle(UpstreamTlsEstablished()))
            case ReportCapabilities(caps):
                learn(list(caps))
            case LoginAnswered() as answer:
                up.inbox[:0] = login.rest  # the client's, once spliced
                return answer


# --------------------------------------------------------------------------- session


class _ImapSession:
    """One client connection: the executor of its pre-auth layer (``imap_preauth``),
    then a registered live session. Every ``await`` of the pre-auth phase is here."""

    __slots__ = (
        "_deadline",
        "_inbox",
        "_reading_paused",
        "_spliced",
        "_task",
        "_wakeup",
        "cfg",
        "client",
        "client_port",
        "gate",
        "identity",
        "layer",
        "local_addr",
        "origin",
        "owner",
        "upstream",
    )

    def __init__(self, owner: ImapListener) -> None:
        self.owner = owner
        self.cfg = owner.listener
        self.gate = owner.ctx.gate
        self.client = Pipe(self._on_client_data, self._on_client_close, self._on_made)
        self.layer: Preauth | None = Preauth(
            tls_mode=self.cfg.tls,
            cleartext_allowed=self.cfg.allow_cleartext_auth and self.cfg.is_loopback,
            max_commands=self.cfg.max_preauth_commands,
            upstream_capabilities=owner.capabilities,
            upstream_mechanisms=owner.mechanisms,
        )
        self.identity = Identity("")
        self.origin = Origin("imap", self.cfg.name, "", self.cfg.unidentified)
        self.upstream: UpstreamConnection | None = None
        self.client_port = 0
        self.local_addr = ("", 0)  # the proxy's address the client connected to
        self._inbox = bytearray()  # client bytes not yet fed to the layer
        self._wakeup = asyncio.Event()
        self._reading_paused = False
        self._spliced = False
        self._task: asyncio.Task[None] | None = None
        self._deadline = 0.0

    # ------------------------------------------------------------ callbacks

    def _on_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        self.origin = Origin("imap", self.cfg.name, str(peer[0]), self.cfg.unidentified)
        self.client_port = int(peer[1]) if len(peer) > 1 else 0
        local = transport.get_extra_info("sockname") or ("", 0)
        self.local_addr = (str(local[0]), int(local[1]) if len(local) > 1 else 0)
        self.owner.sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _on_client_data(self, data: bytes) -> None:
        layer = self.layer
        if layer is None:
            return
        self._inbox += data
        held = len(self._inbox) + layer.buffered
        if held > PREAUTH_READ_PAUSE_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.client.transport.pause_reading()
        self._wakeup.set()

    def _on_client_close(self) -> None:
        self._wakeup.set()
        if self._spliced:
            self._finish_spliced()

    # ------------------------------------------------------------ executor

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            assert self.layer is not None
            await self._execute(self.layer.handle(Connected()))
            self._deadline = loop.time() + self.cfg.preauth_timeout_s
            while self.layer is not None and not self.layer.finished:
                await self._execute(self.layer.handle(await self._client_event()))
        except Exception as exc:  # a bug must not take the listener down
            log.exception("imap session failed", client_ip=self.origin.client_ip)
            self.client.abort()
            if self.layer is not None:
                await self._execute(self.layer.handle(Crashed(type(exc).__name__)))
        finally:
            if not self._spliced:
                self.client.close()
                self._logout_upstream()
                self.layer = None
                self.owner.sessions.discard(self)
            self._task = None  # a live session keeps no task or coroutine alive

    async def _client_event(self) -> PreauthEvent:
        """What the client did next: sent bytes, closed, or let a time limit pass."""
        loop = asyncio.get_running_loop()
        while not self._inbox:
            if self.client.closed:
                return ClientClosed()
            if self._reading_paused:
                self._reading_paused = False
                self.client.transport.resume_reading()
            remaining = self._deadline - loop.time()
            self._wakeup.clear()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(
                    self._wakeup.wait(), min(self.cfg.preauth_idle_timeout_s, remaining))
            except TimeoutError:
                return TimedOut(total=loop.time() >= self._deadline)
        return DataReceived(self._take_inbox())

    def _take_inbox(self) -> bytes:
        data = bytes(self._inbox)
        self._inbox.clear()
        return data

    async def _execute(self, commands: list[PreauthCommand]) -> None:
        """Perform commands in order; an outcome goes back to the layer, after the
        client bytes that arrived before it (events in the order they happened)."""
        queue = deque(commands)
        while queue:
            outcome = await self._perform(queue.popleft())
            layer = self.layer
            if outcome is not None and layer is not None:
                if self._inbox:
                    queue.extend(layer.handle(DataReceived(self._take_inbox())))
                queue.extend(layer.handle(outcome))

    async def _perform(self, command: PreauthCommand) -> PreauthEvent | None:
        """One command; returns the outcome event of those that have one."""
        match command:
            case SendToClient(data):
                self.client.write(data)
            case StartTls():
                return await self._start_tls()
            case OpenUpstream():
                return await self._open_upstream(command)
            case RequestDecision(identity):
                decision = await self.gate.decide(identity, self.origin)
                return DecisionMade(decision, shutting_down=self.owner.closing)
            case RecordAuthFailed(identity):
                await self.gate.record_auth_failed(identity, self.origin)
            case RecordUnavailable(identity, detail):
                await self.gate.record_deny(
                    identity, self.origin, "upstream_unavailable",
                    f"upstream unavailable: {detail}", temporary=True)
            case CloseUpstream():
                self._logout_upstream()
            case Splice(answer, pipelined, identity):
                self._splice(answer, pipelined, identity)
            case Close(record):
                self.client.close()
                self._logout_upstream()
                if record is not None:
                    await self.gate.record_session_end(
                        self.origin, record.reason, identity=record.identity,
                        detail=record.detail)
        return None

    async def _start_tls(self) -> PreauthEvent:
        ctx = self.owner.ctx.server_tls
        if ctx is None:
            raise RuntimeError("TLS listener without a server TLS context")
        timeout = min(TLS_HANDSHAKE_TIMEOUT_S, self.cfg.preauth_idle_timeout_s)
        transport: SocketTransport = self.client.transport
        try:  # aborts the connection if it fails
            await transport.start_tls(ctx, server_side=True, timeout=timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            return TlsFailed(str(exc)[:200] or type(exc).__name__)
        cert = client_cert_from_ssl(transport.get_extra_info("ssl_object"))
        return TlsEstablished(cert.device_id if cert else None, cert)

    # ------------------------------------------------------------------ upstream

    async def _open_upstream(self, command: OpenUpstream) -> PreauthEvent:
        try:
            answer = await self._upstream_login(command)
        except _UPSTREAM_ERRORS as exc:
            detail = str(exc)[:200] or type(exc).__name__
            log.warning("upstream unavailable", listener=self.cfg.name, error=detail)
            return UpstreamFailed(detail)
        return UpstreamAnswered(answer.ok, answer.untagged, answer.tagged)

    async def _upstream_login(self, command: OpenUpstream) -> LoginAnswered:
        """Connect and run the sans-IO ``UpstreamLogin`` to its tagged answer."""
        self.upstream = UpstreamConnection()
        login = UpstreamLogin(
            tag=command.tag, user=command.user, password=command.password,
            starttls=self.cfg.upstream_tls == "starttls", id_fields=command.client_id,
            client_ip=self.origin.client_ip, client_port=self.client_port,
            connected=self.local_addr, mechanism=command.mechanism,
            response=command.response)
        answer = await converse_upstream(self.cfg, self.owner.ctx.upstream_tls,
                                         self.upstream, login, self.owner.learn_capabilities)
        assert answer is not None  # not a probe
        return answer

    def _logout_upstream(self) -> None:
        up, self.upstream = self.upstream, None
        if up is not None and not up.pipe.closed:
            up.pipe.write(logout_command())
            up.pipe.close()

    # ------------------------------------------------------------------ splice

    def _splice(self, answer: bytes, pipelined: bytes, identity: Identity) -> None:
        """Join client and upstream; from here on bytes flow without Python parsing."""
        up, client = self.upstream, self.client
        if client.closed or up is None or up.pipe.closed:
            return  # nothing to join: the executor's cleanup closes what is left
        client.write(answer)
        upipe = up.pipe
        self.identity = identity
        self._spliced = True
        # Drop pre-auth state: phones hold sessions for hours, memory per session counts.
        self.layer = None
        self._inbox = bytearray()
        self._wakeup = NO_EVENT
        client.start_splice(upipe)
        upipe.start_splice(client)
        upipe.on_close = self._finish_spliced
        leftover = up.release()
        if leftover:
            client.write(leftover)
        if pipelined:
            upipe.write(pipelined)
        if self._reading_paused:
            self._reading_paused = False
            client.transport.resume_reading()
        with contextlib.suppress(Exception):
            upipe.transport.resume_reading()
        self.gate.register(self)
        if client.closed or upipe.closed:
            client.close()
            upipe.close()
            self._finish_spliced()

    def _finish_spliced(self) -> None:
        if self in self.owner.sessions:
            self.owner.sessions.discard(self)
            self.gate.unregister(self)
            if self.upstream is not None:
                self.upstream.pipe.close()
            self.client.close()

    # ---------------------------------------------------------------- ending

    async def terminate(self, text: str) -> None:
        """End a live session now (``LiveSession``); never raises."""
        with contextlib.suppress(Exception):
            self.client.write(bye_line(text))
            self.client.close()
            if self.upstream is not None:
                self.upstream.pipe.close()
            if self._spliced:
                self._finish_spliced()

    async def shutdown(self) -> None:
        """Listener shutdown: goodbye to pre-auth and live sessions alike."""
        if self._spliced:
            self.gate.unregister(self)
            await self.gate.record_session_end(self.origin, "shutdown", identity=self.identity)
            await self.terminate(SHUTDOWN_TEXT)
        elif self.layer is not None:
            await self._execute(self.layer.handle(ShutdownRequested()))
        else:
            self.client.close()


__all__ = ["ImapListener", "start"]
