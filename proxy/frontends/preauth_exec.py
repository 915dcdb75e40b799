"""The I/O executor of a sans-IO pre-auth layer, shared by IMAP and POP3.

``imap_preauth.Preauth`` and ``pop3_preauth.Preauth`` speak the same events and
commands (``Connected``, ``DataReceived``, ``SendToClient``, ``StartTls``,
``RequestDecision``, ``Splice``, ``Close``, ...); only the login differs. One
:class:`PreauthSession` per client connection performs them; every ``await`` of the
pre-auth phase is here. A protocol's session class supplies the upstream login
(:meth:`PreauthSession._login_upstream`), how an unused upstream is dropped
(:meth:`PreauthSession._drop_upstream`) and how a live session ends
(:meth:`PreauthSession.terminate`).

1. Client bytes go to the layer (:meth:`PreauthSession._client_event`, with the idle
   and total pre-auth time limits); its commands are performed in order
   (:meth:`PreauthSession._perform`), and outcomes (TLS up, the upstream's answer, the
   gate's decision) are fed back as events, after the client bytes that came first.
2. Limits (``login_limits``): the upstream's answer to a login waits what the
   failed-login throttle says before the layer sees it; a connection that never
   completed TLS is counted into the abuse summary instead of a ``session_end``.
3. Allow: both transports are spliced (``imap_transport.Pipe`` buffered protocols
   writing straight into each other's transport; no per-byte Python work and no
   coroutine per session) and the session is registered with the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, Self, TypeVar

from proxy.config import ListenerConfig
from proxy.frontends import FrontendContext
from proxy.frontends import events as ev
from proxy.frontends.imap_syntax import RemoteProtocolError
from proxy.frontends.imap_transport import NO_EVENT, Pipe, UpstreamConnection, UpstreamError
from proxy.frontends.login_limits import login_answered, login_refused, pre_tls_end
from proxy.gate import Identity, Origin
from proxy.net.socket_transport import SocketServer, SocketTransport, open_connection
from proxy.net.tls import client_cert_from_ssl
from proxy.oplog import get_logger

#: TLS 1.3 session tickets sent to clients: none. Each one keeps a copy of the
#: session, with the device's client certificate, for as long as the connection lives
#: (about 10 KiB per idle mTLS session, measured), and a phone's connections are
#: long-lived, so resumption would save little.
TLS_SESSION_TICKETS = 0
#: Pause reading from a pre-auth client when this many unparsed bytes are held.
PREAUTH_READ_PAUSE_BYTES = 64 * 1024
#: Cap on the TLS handshake, also bounded by the pre-auth idle timeout.
TLS_HANDSHAKE_TIMEOUT_S = 20.0
#: What a failed upstream conversation raises (the client is told: unavailable).
UPSTREAM_ERRORS = (UpstreamError, RemoteProtocolError, OSError, ssl.SSLError, TimeoutError,
                   ConnectionError)

Answer = TypeVar("Answer", covariant=True)


class UpstreamLoginLayer(Protocol[Answer]):
    """A protocol's sans-IO upstream login (``imap_upstream``, ``pop3_upstream``)."""

    rest: bytes  # what the server sent after the answer (the client's, once spliced)

    @property
    def finished(self) -> bool: ...

    def handle(self, event: ev.UpstreamEvent) -> Sequence[
        ev.SendToUpstream | ev.StartUpstreamTls | ev.ReportCapabilities | Answer]: ...


async def converse_upstream(cfg: ListenerConfig, tls_ctx: ssl.SSLContext | None,
                            up: UpstreamConnection, login: UpstreamLoginLayer[Answer],
                            learn: Callable[[tuple[str, ...]], None]) -> Answer | None:
    """Connect ``up`` to the listener's upstream and run the sans-IO ``login`` to its
    end: its answer (the protocol's ``LoginAnswered``), or None when it finished
    without one (an IMAP probe, which has logged out)."""
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
    queue: deque[ev.SendToUpstream | ev.StartUpstreamTls | ev.ReportCapabilities
                 | Answer] = deque()
    while True:
        if not queue:
            if login.finished:
                return None
            queue.extend(login.handle(ev.UpstreamDataReceived(await up.receive(deadline))))
            continue
        match command := queue.popleft():
            case ev.SendToUpstream(data):
                up.pipe.write(data)
            case ev.StartUpstreamTls():
                assert tls_ctx is not None
                await up.pipe.transport.start_tls(
                    tls_ctx, server_side=False, server_hostname=cfg.upstream_host,
                    timeout=max(0.1, deadline - loop.time()))
                queue.extend(login.handle(ev.UpstreamDataReceived(up.take())))
                queue.extend(login.handle(ev.UpstreamTlsEstablished()))
            case ev.ReportCapabilities(caps):
                learn(caps)
            case _:  # the answer
                up.inbox[:0] = login.rest  # the client's, once spliced
                return command


class PreauthListener:
    """A started IMAP or POP3 listener (``RunningListener``): its accept loop makes one
    session (:meth:`new_session`) per connection."""

    log: ClassVar[Any] = get_logger("mailward.frontends")
    #: Upstream capabilities shown until the upstream tells its own.
    default_capabilities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: FrontendContext) -> None:
        self.ctx = ctx
        self.listener = ctx.listener
        self.name = ctx.listener.name
        self.port = 0
        self.sessions: set[Any] = set()
        self.upstream_capabilities: list[str] = list(self.default_capabilities)
        self._server: SocketServer | None = None
        self.closing = False

    async def start(self) -> Self:
        tls = self.ctx.server_tls
        if tls is not None:
            with contextlib.suppress(ValueError, AttributeError):
                tls.num_tickets = TLS_SESSION_TICKETS
        # Our own accept loop and transports (proxy.net.socket_transport): OpenSSL on the
        # socket keeps an idle TLS session small, where the loop's TLS transport would
        # keep a 256 KiB read buffer and BIO buffers as large as its biggest burst.
        self._server = SocketServer(asyncio.get_running_loop(), self._new_connection,
                                    self.listener.host, self.listener.port, backlog=1024,
                                    limits=self.ctx.gate.limits, listener=self.name)
        self.port = self._server.port
        self.log.info(f"{self.listener.protocol} listener started", listener=self.name,
                      port=self.port, tls=self.listener.tls, upstream=self.listener.upstream)
        return self

    def _new_connection(self, sock: socket.socket) -> None:
        # Implicit TLS: nothing is read until the handshake, which reads it all.
        session = self.new_session()
        SocketTransport(asyncio.get_running_loop(), sock, session.client,
                        start_reading=self.listener.tls != "implicit")

    def new_session(self) -> PreauthSession:
        raise NotImplementedError

    def capabilities(self) -> list[str]:
        """What the pre-auth capability list shows of the upstream's capabilities."""
        return self.upstream_capabilities

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
        self.log.info(f"{self.listener.protocol} listener closed", listener=self.name)


class Owner(Protocol):
    """The listener a session belongs to."""

    ctx: FrontendContext
    listener: ListenerConfig
    sessions: set[Any]
    closing: bool


class Layer(Protocol):
    """A protocol's sans-IO pre-auth layer."""

    finished: bool
    device_id: str | None
    conn: Any  # its wire parser; ``conn.tls`` once TLS is up

    @property
    def buffered(self) -> int: ...

    def handle(self, event: Any) -> Sequence[Any]: ...


class PreauthSession:
    """One client connection: the executor of its pre-auth layer, then a registered
    live session (see the module docstring)."""

    __slots__ = ("_deadline", "_inbox", "_reading_paused", "_spliced", "_task", "_wakeup",
                 "cfg", "client", "client_port", "gate", "identity", "layer", "origin",
                 "owner", "upstream")

    #: The protocol's logger and its goodbye text at shutdown (set by subclasses).
    log: ClassVar[Any] = get_logger("mailward.frontends")
    shutdown_text: ClassVar[str] = ""
    #: What the protocol's upstream login raises when it fails.
    upstream_errors: ClassVar[tuple[type[Exception], ...]] = UPSTREAM_ERRORS
    #: What the proxy says to an upstream it drops before splicing (LOGOUT, QUIT).
    upstream_goodbye: ClassVar[bytes] = b""
    #: When a live session is ended: abort the upstream (no goodbye, nothing flushed:
    #: POP3's DELEs are not applied) rather than close it.
    abort_upstream: ClassVar[bool] = False

    def __init__(self, owner: Owner, layer: Layer) -> None:
        self.owner = owner
        self.cfg = owner.listener
        self.gate = owner.ctx.gate
        self.client = Pipe(self._on_client_data, self._on_client_close, self._on_made)
        self.layer: Layer | None = layer
        self.identity = Identity("")
        self.origin = self._origin("")
        self.upstream: UpstreamConnection | None = None
        self.client_port = 0
        self._inbox = bytearray()  # client bytes not yet fed to the layer
        self._wakeup = asyncio.Event()
        self._reading_paused = False
        self._spliced = False
        self._task: asyncio.Task[None] | None = None  # the loop keeps only weak references
        self._deadline = 0.0

    # ------------------------------------------------------------ protocol's part

    def _origin(self, client_ip: str) -> Origin:
        raise NotImplementedError

    async def _login_upstream(self, command: Any) -> Any:
        """Connect ``self.upstream`` and log in: the layer's UpstreamAnswered event
        (with ``ok``). Raises one of :attr:`upstream_errors` when it cannot."""
        raise NotImplementedError

    def _drop_upstream(self) -> None:
        """End an upstream connection that is not (or no longer) to be spliced."""
        up, self.upstream = self.upstream, None
        if up is not None and not up.pipe.closed:
            up.pipe.write(self.upstream_goodbye)
            up.pipe.close()

    def _last_words(self, text: str) -> bytes:
        """What the client is told when its live session is ended (IMAP's ``* BYE``)."""
        return b""

    async def terminate(self, text: str) -> None:
        """End a live session now (``LiveSession``); never raises."""
        with contextlib.suppress(Exception):
            if last_words := self._last_words(text):
                self.client.write(last_words)
            self.client.close()
            if self.upstream is not None:
                if self.abort_upstream:
                    self.upstream.pipe.abort()
                else:
                    self.upstream.pipe.close()
            if self._spliced:
                self._finish_spliced()

    # ------------------------------------------------------------ callbacks

    def _on_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        self.origin = self._origin(str(peer[0]))
        self.client_port = int(peer[1]) if len(peer) > 1 else 0
        self.owner.sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _on_client_data(self, data: bytes) -> None:
        layer = self.layer
        if layer is None:
            return
        self._inbox += data
        if len(self._inbox) + layer.buffered > PREAUTH_READ_PAUSE_BYTES \
                and not self._reading_paused:
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
            await self._execute(self.layer.handle(ev.Connected()))
            self._deadline = loop.time() + self.cfg.preauth_timeout_s
            while self.layer is not None and not self.layer.finished:
                await self._execute(self.layer.handle(await self._client_event()))
        except Exception as exc:  # a bug must not take the listener down
            self.log.exception(f"{self.origin.protocol} session failed",
                               client_ip=self.origin.client_ip)
            self.client.abort()
            if self.layer is not None:
                await self._execute(self.layer.handle(ev.Crashed(type(exc).__name__)))
        finally:
            if not self._spliced:
                self.client.close()
                self._drop_upstream()
                self.layer = None
                self.owner.sessions.discard(self)
            self._task = None  # a live session keeps no task or coroutine alive

    async def _client_event(self) -> Any:
        """What the client did next: sent bytes, closed, or let a time limit pass."""
        loop = asyncio.get_running_loop()
        while not self._inbox:
            if self.client.closed:
                return ev.ClientClosed()
            if self._reading_paused:
                self._reading_paused = False
                self.client.transport.resume_reading()
            remaining = self._deadline - loop.time()
            self._wakeup.clear()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(min(self.cfg.preauth_idle_timeout_s, remaining)):
                    await self._wakeup.wait()
            except TimeoutError:
                return ev.TimedOut(total=loop.time() >= self._deadline)
        return ev.DataReceived(self._take_inbox())

    def _take_inbox(self) -> bytes:
        data = bytes(self._inbox)
        self._inbox.clear()
        return data

    async def _execute(self, commands: Sequence[Any]) -> None:
        """Perform commands in order; an outcome goes back to the layer, after the
        client bytes that arrived before it (events in the order they happened)."""
        queue = deque(commands)
        while queue:
            outcome = await self._perform(queue.popleft())
            layer = self.layer
            if outcome is not None and layer is not None:
                if self._inbox:
                    queue.extend(layer.handle(ev.DataReceived(self._take_inbox())))
                queue.extend(layer.handle(outcome))

    async def _perform(self, command: Any) -> Any:
        """One command; returns the outcome event of those that have one."""
        match command:
            case ev.SendToClient(data):
                self.client.write(data)
            case ev.StartTls():
                return await self._start_tls()
            case ev.RequestDecision(identity):
                decision = await self.gate.decide(identity, self.origin)
                return ev.DecisionMade(decision, shutting_down=self.owner.closing)
            case ev.RecordAuthFailed(identity):
                await self.gate.record_auth_failed(identity, self.origin)
            case ev.RecordUnavailable(identity, detail):
                await self.gate.record_deny(
                    identity, self.origin, "upstream_unavailable",
                    f"upstream unavailable: {detail}", temporary=True)
            case ev.CloseUpstream():
                self._drop_upstream()
            case ev.Splice(answer, pipelined, identity):
                self._splice(answer, pipelined, identity)
            case ev.Close(record):
                self.client.close()
                self._drop_upstream()
                if record is not None and not self._tls_up():
                    pre_tls_end(self.gate.limits, self.origin.client_ip, record.reason,
                                self.cfg.name)
                elif record is not None:
                    await self.gate.record_session_end(
                        self.origin, record.reason, identity=record.identity,
                        detail=record.detail)
            case _:  # OpenUpstream, the protocol's own
                return await self._open_upstream(command)
        return None

    def _tls_up(self) -> bool:
        """TLS completed (or the listener has none): an ending is recorded."""
        return self.cfg.tls == "none" or (self.layer is not None and bool(self.layer.conn.tls))

    async def _start_tls(self) -> Any:
        ctx = self.owner.ctx.server_tls
        if ctx is None:
            raise RuntimeError("TLS listener without a server TLS context")
        timeout = min(TLS_HANDSHAKE_TIMEOUT_S, self.cfg.preauth_idle_timeout_s)
        transport: SocketTransport = self.client.transport
        try:  # aborts the connection if it fails
            await transport.start_tls(ctx, server_side=True, timeout=timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            return ev.TlsFailed(str(exc)[:200] or type(exc).__name__)
        cert = client_cert_from_ssl(transport.get_extra_info("ssl_object"))
        return ev.TlsEstablished(cert.device_id if cert else None, cert)

    # ------------------------------------------------------------------ upstream

    async def _open_upstream(self, command: Any) -> Any:
        """Log in upstream; the answer waits what the failed-login throttle says."""
        try:
            answer = await self._login_upstream(command)
        except self.upstream_errors as exc:
            detail = str(exc)[:200] or type(exc).__name__
            self.log.warning("upstream unavailable", listener=self.cfg.name, error=detail)
            return ev.UpstreamFailed(detail)
        device = self.layer.device_id if self.layer is not None else None
        limits, ip = self.gate.limits, self.origin.client_ip
        if answer.ok:
            await login_answered(limits, command.user, ip, self.cfg.name, device,
                                 accepted=True)
        else:
            self._drop_upstream()  # not held open while the answer waits
            await login_refused(limits, command.user, ip, self.cfg.name, device)
        return answer

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

    async def shutdown(self) -> None:
        """Listener shutdown: goodbye to pre-auth and live sessions alike."""
        if self._spliced:
            self.gate.unregister(self)
            await self.gate.record_session_end(self.origin, "shutdown", identity=self.identity)
            await self.terminate(self.shutdown_text)
        elif self.layer is not None:
            await self._execute(self.layer.handle(ev.ShutdownRequested()))
        else:
            self.client.close()

__all__ = ["PREAUTH_READ_PAUSE_BYTES", "TLS_HANDSHAKE_TIMEOUT_S", "TLS_SESSION_TICKETS",
           "UPSTREAM_ERRORS", "Layer", "Owner", "PreauthListener", "PreauthSession",
           "UpstreamLoginLayer", "converse_upstream"]
