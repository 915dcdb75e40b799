"""IMAP front end: the I/O executor around the sans-IO parser in ``imap_wire``.

One :class:`_ImapSession` per client connection:

1. TLS: implicit (the handshake starts at once) or STARTTLS (bytes pipelined after the
   command are discarded by the parser). A verified client certificate's SAN names the
   device (``proxy.net.tls.device_id_from_ssl``).
2. Pre-auth: CAPABILITY, NOOP, ID, LOGOUT are answered here; LOGIN / AUTHENTICATE PLAIN
   before TLS get ``NO [PRIVACYREQUIRED]`` without touching the upstream or the gate.
3. Login: connect upstream (implicit TLS / STARTTLS / none, certificate verified), send
   ``ID ("x-originating-ip" ...)`` where advertised, then LOGIN with the client's tag
   and credentials. A NO is passed back and recorded as ``auth_failed``; an OK goes to
   ``Gate.decide``. Deny: ``* NO [ALERT]``, ``NO [AUTHORIZATIONFAILED]``, ``* BYE``.
   Temporary deny or an unreachable upstream: ``NO [UNAVAILABLE]``.
4. Allow: the upstream's tagged OK goes to the client and both transports are spliced
   (``_Pipe`` buffered protocols writing straight into each other's transport, with
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
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any

from proxy.frontends import FrontendContext
from proxy.frontends.imap_wire import (
    NEED_DATA,
    PAUSED,
    AuthenticateCancelled,
    AuthenticateData,
    AuthenticateStarted,
    BadCommand,
    CommandReceived,
    Connection,
    ContinuationNeeded,
    IdReceived,
    ImapProtocolError,
    LimitExceeded,
    LoginAttempted,
    PrivacyRequired,
    StartTlsRequested,
    decode_plain,
    quote,
)
from proxy.gate import Identity, Origin
from proxy.net.socket_transport import (
    SocketServer,
    SocketTransport,
    open_connection,
    shared_read_buffer,
)
from proxy.net.tls import client_cert_from_ssl, device_id_from_ssl
from proxy.oplog import get_logger

log = get_logger("mailward.imap")

#: Capabilities the proxy itself implements before login.
PROXY_CAPABILITIES = ("IMAP4rev1", "SASL-IR", "LITERAL+", "ID")
#: Upstream pre-auth capabilities the proxy replaces with its own view.
_OWN_CAPABILITIES = {"IMAP4REV1", "SASL-IR", "LITERAL+", "ID", "STARTTLS", "LOGINDISABLED",
                     "LOGIN-REFERRALS"}
#: Advertised until the first upstream greeting tells what the server supports.
DEFAULT_UPSTREAM_CAPABILITIES = ("IDLE", "ENABLE")
#: Pause reading from a pre-auth client when this many unparsed bytes are held.
PREAUTH_READ_PAUSE_BYTES = 64 * 1024
#: Longest upstream response (with literals) read before login; more is an error.
MAX_UPSTREAM_RESPONSE_BYTES = 64 * 1024
#: Write-buffer limits of each spliced transport: above HIGH the other side stops
#: reading until the buffer drains to LOW (flow control, bounded memory per session).
SPLICE_WRITE_HIGH, SPLICE_WRITE_LOW = 1024 * 1024, 256 * 1024
#: How long a closing connection may take to flush and finish TLS shutdown.
CLOSE_LINGER_S = 2.0
#: The same after a splice, where up to a write buffer of mail may still be in flight.
SPLICE_CLOSE_LINGER_S = 30.0
#: TLS 1.3 session tickets sent to IMAP clients (see ``ImapListener.start``).
TLS_SESSION_TICKETS = 0
#: Cap on the TLS handshake, also bounded by the pre-auth idle timeout.
TLS_HANDSHAKE_TIMEOUT_S = 20.0
#: Tags of the proxy's own upstream commands (never sent to the client).
_TAG_ID, _TAG_TLS, _TAG_CAP, _TAG_BYE = "mw.id", "mw.tls", "mw.cap", "mw.bye"

UNAVAILABLE_TEXT = "The mail server is temporarily unavailable. Please try again later."
SHUTDOWN_TEXT = "Server shutting down"

_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})\+?\}\r?\n\Z")
_CAPS_IN_CODE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


class _NoEvent:
    """Stands in for an asyncio.Event once a session no longer waits for anything."""

    def set(self) -> None:
        pass


_NO_EVENT: Any = _NoEvent()


class UpstreamError(Exception):
    """The upstream is unreachable, timed out or answered nonsense."""


# ------------------------------------------------------------------------ transports


class _Pipe(asyncio.BufferedProtocol):
    """One side of a proxied connection.

    Reads land in the per-thread receive buffer (``shared_read_buffer``). Before
    the splice, the bytes go to ``on_data``; after it, a slice of the buffer goes
    straight to the peer's transport, with no per-chunk work beyond that write. When
    our transport's write buffer passes its high-water mark (``pause_writing``), the
    peer, which produces what we write, stops reading until it drains to the low one.
    """

    __slots__ = ("closed", "closing", "on_close", "on_data", "on_made", "peer", "transport")

    def __init__(
        self,
        on_data: Callable[[bytes], None] | None,
        on_close: Callable[[], None] | None = None,
        on_made: Callable[[asyncio.BaseTransport], None] | None = None,
    ) -> None:
        self.on_data = on_data
        self.on_close = on_close
        self.on_made = on_made
        self.peer: _Pipe | None = None
        self.transport: Any = None
        self.closed = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.on_made is not None:
            self.on_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return shared_read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        view = shared_read_buffer()[:nbytes]
        peer = self.peer
        if peer is not None:
            peer.transport.write(view)  # what it cannot send now, it copies
        elif self.on_data is not None:
            self.on_data(bytes(view))

    def start_splice(self, peer: _Pipe) -> None:
        """From now on, what we read goes to ``peer``'s transport."""
        self.peer = peer
        self.on_data = None
        with contextlib.suppress(Exception):  # a closing transport may refuse
            self.transport.set_write_buffer_limits(SPLICE_WRITE_HIGH, SPLICE_WRITE_LOW)

    def eof_received(self) -> bool:
        return False  # IMAP has no half-close: close both ways

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.close(SPLICE_CLOSE_LINGER_S)  # flushes what is buffered first
        if self.on_close is not None:
            self.on_close()

    def pause_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, linger_s: float | None = None) -> None:
        """Close after flushing; abort if still open after ``linger_s`` (a TLS peer
        that never answers close_notify would otherwise hold it for 30 s)."""
        if self.transport is not None and not self.closed and not self.closing:
            self.closing = True
            self.transport.close()
            asyncio.get_running_loop().call_later(
                CLOSE_LINGER_S if linger_s is None else linger_s, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class _Upstream:
    """Pre-auth conversation with the upstream server: read response lines."""

    __slots__ = ("_wakeup", "buf", "capabilities", "pipe")

    def __init__(self) -> None:
        self.pipe = _Pipe(self._on_data, self._on_close)
        self.buf = bytearray()
        self._wakeup = asyncio.Event()
        self.capabilities: list[str] = []

    def _on_data(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > MAX_UPSTREAM_RESPONSE_BYTES:
            self.pipe.transport.pause_reading()
        self._wakeup.set()

    def _on_close(self) -> None:
        self._wakeup.set()

    async def _fill(self, deadline: float) -> None:
        if self.pipe.closed:
            raise UpstreamError("upstream closed the connection")
        self._wakeup.clear()
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            raise UpstreamError("upstream timed out")
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            raise UpstreamError("upstream timed out") from None

    async def read_response(self, deadline: float) -> bytes:
        """One response line, literals inlined; CRLF included."""
        pos = 0
        while True:
            nl = self.buf.find(b"\n", pos)
            if nl < 0:
                if len(self.buf) > MAX_UPSTREAM_RESPONSE_BYTES:
                    raise UpstreamError("upstream response too long")
                await self._fill(deadline)
                continue
            m = _LITERAL_AT_END.search(self.buf, pos, nl + 1)
            if m is None:
                line = bytes(self.buf[: nl + 1])
                del self.buf[: nl + 1]
                return line
            end = nl + 1 + int(m.group(1))
            while len(self.buf) < end:
                if len(self.buf) > MAX_UPSTREAM_RESPONSE_BYTES:
                    raise UpstreamError("upstream response too long")
                await self._fill(deadline)
            pos = end

    async def read_tagged(self, tag: str, deadline: float) -> tuple[list[bytes], bytes]:
        """Lines up to and including the response tagged ``tag``."""
        untagged: list[bytes] = []
        prefix = tag.encode() + b" "
        while True:
            line = await self.read_response(deadline)
            if line.startswith(prefix):
                return untagged, line
            if line.startswith(b"* BYE"):
                raise UpstreamError(f"upstream said {line[:200]!r}")
            untagged.append(line)

    def write(self, data: bytes) -> None:
        self.pipe.write(data)


def _status(line: bytes, tag: str) -> str:
    rest = line[len(tag) + 1 :]
    return rest.split(b" ", 1)[0].upper().decode("ascii", "replace")


def _capabilities(text: bytes) -> list[str]:
    return [c.decode("ascii", "replace") for c in text.split() if c]


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

    def learn_capabilities(self, caps: list[str]) -> None:
        """Pre-auth capabilities of the upstream (from its greeting), minus our own."""
        keep = [c for c in caps
                if c.upper() not in _OWN_CAPABILITIES and not c.upper().startswith("AUTH=")]
        self.upstream_capabilities = keep

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
    return await ImapListener(ctx).start()


# --------------------------------------------------------------------------- session


class _ImapSession:
    """One client connection: pre-auth conversation, then a registered live session."""

    __slots__ = (
        "_deadline",
        "_decided",
        "_end_detail",
        "_end_reason",
        "_reading_paused",
        "_spliced",
        "_task",
        "_wakeup",
        "cfg",
        "client",
        "client_id",
        "client_port",
        "conn",
        "device_id",
        "gate",
        "identity",
        "origin",
        "owner",
        "upstream",
    )

    def __init__(self, owner: ImapListener) -> None:
        self.owner = owner
        self.cfg = owner.listener
        self.gate = owner.ctx.gate
        self.client = _Pipe(self._on_client_data, self._on_client_close, self._on_made)
        self.conn: Connection | None = Connection(
            max_commands=self.cfg.max_preauth_commands,
            tls=False,
            starttls=self.cfg.tls == "starttls",
            cleartext_login=self.cfg.allow_cleartext_auth and self.cfg.is_loopback,
        )
        self.identity = Identity("")
        self.origin = Origin("imap", self.cfg.name, "", self.cfg.unidentified)
        self.device_id: str | None = None
        self.upstream: _Upstream | None = None
        self.client_id: tuple[tuple[str, str | None], ...] | None = None
        self.client_port = 0
        self._wakeup = asyncio.Event()
        self._reading_paused = False
        self._decided = False
        self._spliced = False
        self._end_reason = "client_closed"
        self._end_detail = ""
        self._task: asyncio.Task[None] | None = None
        self._deadline = 0.0

    # ------------------------------------------------------------ callbacks

    def _on_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        self.origin = Origin("imap", self.cfg.name, str(peer[0]), self.cfg.unidentified)
        self.client_port = int(peer[1]) if len(peer) > 1 else 0
        self.owner.sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _on_client_data(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.receive_data(data)
        if conn.buffered > PREAUTH_READ_PAUSE_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.client.transport.pause_reading()
        self._wakeup.set()

    def _on_client_close(self) -> None:
        self._wakeup.set()
        if self._spliced:
            self._finish_spliced()

    # ---------------------------------------------------------------- run

    async def _run(self) -> None:
        try:
            if self.cfg.tls == "implicit" and not await self._start_tls():
                return
            self._send(Connection.send_greeting(self._capabilities(), "mailward ready"))
            await self._preauth()
        except Exception as exc:  # a bug must not take the listener down
            log.exception("imap session failed", client_ip=self.origin.client_ip)
            self._end_reason, self._end_detail = "internal_error", type(exc).__name__
            self.client.abort()
        finally:
            if not self._spliced:
                await self._finish_preauth()
            self._task = None  # a live session keeps no task or coroutine alive

    async def _finish_preauth(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self._logout_upstream()
        if not self._decided:
            await self.gate.record_session_end(
                self.origin, self._end_reason,
                identity=self.identity if self.identity.user else None,
                detail=self._end_detail,
            )
        self.conn = None
        self.owner.sessions.discard(self)

    async def _start_tls(self) -> bool:
        ctx = self.owner.ctx.server_tls
        if ctx is None:
            raise RuntimeError("TLS listener without a server TLS context")
        timeout = min(TLS_HANDSHAKE_TIMEOUT_S, self.cfg.preauth_idle_timeout_s)
        transport: SocketTransport = self.client.transport
        try:  # aborts the connection if it fails
            await transport.start_tls(ctx, server_side=True, timeout=timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self._end_reason = "tls_failed"
            self._end_detail = str(exc)[:200] or type(exc).__name__
            return False
        self.device_id = device_id_from_ssl(transport.get_extra_info("ssl_object"))
        assert self.conn is not None
        if self.conn.state.value == "starttls":
            self.conn.starttls_done()
        else:
            self.conn.tls = True
        return True

    def _send(self, data: bytes) -> None:
        self.client.write(data)

    def _cleartext_ok(self) -> bool:
        assert self.conn is not None
        return self.conn.tls or (self.cfg.allow_cleartext_auth and self.cfg.is_loopback)

    def _capabilities(self) -> list[str]:
        caps = list(PROXY_CAPABILITIES)
        assert self.conn is not None
        if not self.conn.tls and self.cfg.tls == "starttls":
            caps.append("STARTTLS")
        if self._cleartext_ok():
            caps.append("AUTH=PLAIN")
        else:
            caps.append("LOGINDISABLED")
        return caps + self.owner.upstream_capabilities

    async def _next_event(self) -> Any:
        """The next parser event, or None when the connection should end."""
        conn = self.conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        deadline = self._deadline
        while True:
            ev = conn.next_event()
            if ev is not NEED_DATA:
                return ev
            if self.client.closed:
                return None
            if self._reading_paused:
                self._reading_paused = False
                self.client.transport.resume_reading()
            remaining = deadline - loop.time()
            self._wakeup.clear()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(
                    self._wakeup.wait(), min(self.cfg.preauth_idle_timeout_s, remaining)
                )
            except TimeoutError:
                total = loop.time() >= deadline
                self._end_reason = "preauth_timeout" if total else "idle_timeout"
                self._send(Connection.send_bye("Autologout; too slow before login"))
                return None

    async def _preauth(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.cfg.preauth_timeout_s
        conn = self.conn
        assert conn is not None
        while True:
            ev = await self._next_event()
            if ev is None or ev is PAUSED:
                return
            if isinstance(ev, CommandReceived):
                if ev.name == "CAPABILITY":
                    self._send(Connection.send_capability(self._capabilities())
                               + Connection.send_tagged(ev.tag, "OK", "CAPABILITY completed"))
                elif ev.name == "NOOP":
                    self._send(Connection.send_tagged(ev.tag, "OK", "NOOP completed"))
                else:  # LOGOUT
                    self._end_reason = "logout"
                    self._send(Connection.send_bye("Logging out")
                               + Connection.send_tagged(ev.tag, "OK", "LOGOUT completed"))
                    return
            elif isinstance(ev, IdReceived):
                self.client_id = ev.fields
                self._send(Connection.send_id({"name": "mailward"})
                           + Connection.send_tagged(ev.tag, "OK", "ID completed"))
            elif isinstance(ev, StartTlsRequested):
                self._send(Connection.send_tagged(ev.tag, "OK", "Begin TLS negotiation now"))
                if not await self._start_tls():
                    return
            elif isinstance(ev, ContinuationNeeded):
                self._send(Connection.send_continuation("Ready"))
            elif isinstance(ev, PrivacyRequired):  # dropped by the parser: no LOGIN state
                self._send_privacy_required(ev.tag)
            elif isinstance(ev, LoginAttempted):
                if await self._login(ev.tag, ev.user, ev.password):
                    return
            elif isinstance(ev, AuthenticateStarted):
                if not self._cleartext_ok():
                    self._refuse_cleartext(ev.tag)
                elif ev.initial_response is None:
                    self._send(Connection.send_continuation())
                elif await self._authenticate(ev.tag, ev.initial_response):
                    return
            elif isinstance(ev, AuthenticateData):
                if await self._authenticate(ev.tag, ev.data):
                    return
            elif isinstance(ev, AuthenticateCancelled):
                self._send(Connection.send_tagged(ev.tag, "BAD", "AUTHENTICATE cancelled"))
            elif isinstance(ev, BadCommand):
                self._end_reason = "bad_syntax"
                self._send(Connection.send_tagged(ev.tag, "BAD", ev.text))
            elif isinstance(ev, LimitExceeded):
                self._end_reason = f"limit_{ev.limit}"
                if ev.tag:
                    self._send(Connection.send_tagged(ev.tag, "BAD", ev.text))
                self._send(Connection.send_bye(ev.text))
                return

    def _refuse_cleartext(self, tag: str) -> None:
        assert self.conn is not None
        self._send_privacy_required(tag)
        self.conn.login_refused()

    def _send_privacy_required(self, tag: str) -> None:
        self._end_reason = "cleartext_refused"
        self._send(Connection.send_tagged(
            tag, "NO", "Use STARTTLS or the TLS port before logging in", "PRIVACYREQUIRED"))

    async def _authenticate(self, tag: str, message: bytes) -> bool:
        assert self.conn is not None
        try:
            authzid, user, password = decode_plain(message)
        except ImapProtocolError as exc:
            self._end_reason = "bad_syntax"
            self._send(Connection.send_tagged(tag, "BAD", str(exc)))
            self.conn.login_refused()
            return False
        if authzid and authzid != user:
            # Logging in as someone else would bypass the per-user device check.
            self._end_reason = "authzid_refused"
            self._send(Connection.send_tagged(
                tag, "NO", "Authorization identity not supported", "CANNOT"))
            self.conn.login_refused()
            return False
        return await self._login(tag, user, password)

    # ------------------------------------------------------------------ login

    async def _login(self, tag: str, user: str, password: str) -> bool:
        """Returns True when the connection is over (refused for good or spliced)."""
        conn = self.conn
        assert conn is not None
        if not self._cleartext_ok():
            self._refuse_cleartext(tag)
            return False
        self.identity = Identity(user, self.device_id, "client_cert" if self.device_id else "",
                                 cert=client_cert_from_ssl(
                                     self.client.transport.get_extra_info("ssl_object")))
        try:
            untagged, tagged = await self._upstream_login(tag, user, password)
        except (UpstreamError, OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            detail = str(exc)[:200] or type(exc).__name__
            log.warning("upstream unavailable", listener=self.cfg.name, error=detail)
            self._send(Connection.send_tagged(tag, "NO", UNAVAILABLE_TEXT, "UNAVAILABLE")
                       + Connection.send_bye(UNAVAILABLE_TEXT))
            # A login attempt over TLS: its one decision record is a temporary deny.
            self._decided = True
            await self.gate.record_deny(
                self.identity, self.origin, "upstream_unavailable",
                f"upstream unavailable: {detail}", temporary=True)
            return True
        if _status(tagged, tag) != "OK":
            self._send(tagged)  # the upstream's own answer, e.g. NO [AUTHENTICATIONFAILED]
            self._logout_upstream()
            self._decided = True
            await self.gate.record_auth_failed(self.identity, self.origin)
            conn.login_refused()
            return False
        decision = await self.gate.decide(self.identity, self.origin)
        self._decided = True
        if not decision.allow:
            self._logout_upstream()
            text = decision.user_text()
            if decision.temporary:
                self._send(Connection.send_tagged(tag, "NO", text, "UNAVAILABLE"))
                conn.login_refused()
                return False
            self._send(Connection.send_untagged("NO", text, "ALERT")
                       + Connection.send_tagged(tag, "NO", text, "AUTHORIZATIONFAILED")
                       + Connection.send_bye("Access denied by policy"))
            return True
        if self.owner.closing:  # the listener is shutting down: do not start a session
            self._logout_upstream()
            self._send(Connection.send_tagged(tag, "NO", UNAVAILABLE_TEXT, "UNAVAILABLE")
                       + Connection.send_bye(SHUTDOWN_TEXT))
            return True
        if self.client.closed or self.upstream is None or self.upstream.pipe.closed:
            return True
        self._send(b"".join(untagged) + tagged)
        self._splice(conn.login_accepted())
        return True

    async def _upstream_login(
        self, tag: str, user: str, password: str
    ) -> tuple[list[bytes], bytes]:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        up = _Upstream()
        self.upstream = up
        host, port = cfg.upstream_host, cfg.upstream_port
        tls_ctx = self.owner.ctx.upstream_tls
        implicit = cfg.upstream_tls == "implicit"
        if cfg.upstream_tls != "none" and tls_ctx is None:
            raise UpstreamError("upstream TLS configured without a TLS context")
        try:
            up.pipe.transport = await open_connection(
                host, port, up.pipe, tls=tls_ctx if implicit else None,
                timeout=cfg.upstream_connect_timeout_s)
        except TimeoutError:
            raise UpstreamError("connecting to the upstream timed out") from None
        deadline = loop.time() + cfg.upstream_timeout_s
        greeting = await up.read_response(deadline)
        if not greeting.upper().startswith(b"* OK"):
            raise UpstreamError(f"upstream greeting {greeting[:100]!r}")
        caps_m = _CAPS_IN_CODE.search(greeting)
        if cfg.upstream_tls == "starttls":
            up.write(f"{_TAG_TLS} STARTTLS\r\n".encode())
            _, line = await up.read_tagged(_TAG_TLS, deadline)
            if _status(line, _TAG_TLS) != "OK":
                raise UpstreamError("upstream refused STARTTLS")
            assert tls_ctx is not None
            await up.pipe.transport.start_tls(tls_ctx, server_side=False, server_hostname=host,
                                              timeout=max(0.1, deadline - loop.time()))
            caps_m = None  # capabilities before TLS are not to be trusted
        if caps_m is not None:
            caps = _capabilities(caps_m.group(1))
        else:
            up.write(f"{_TAG_CAP} CAPABILITY\r\n".encode())
            untagged, _ = await up.read_tagged(_TAG_CAP, deadline)
            caps = next((_capabilities(u[len(b"* CAPABILITY "):].strip()) for u in untagged
                         if u.upper().startswith(b"* CAPABILITY ")), [])
        self.owner.learn_capabilities(caps)
        upper = {c.upper() for c in caps}
        literal_plus = "LITERAL+" in upper
        out = b""
        sent_id = "ID" in upper
        if sent_id:
            out += self._id_command()
        head, parts = f"{tag} LOGIN ".encode(), [user, password]
        # Pipelined: ID and LOGIN go out together, saving a round trip.
        out += head
        for i, value in enumerate(parts):
            raw = value.encode("utf-8")
            sep = b" " if i == 0 else b"\r\n"
            if _quotable(raw):
                out += quote(value).encode() + sep
            elif literal_plus:
                out += b"{%d+}\r\n" % len(raw) + raw + sep
            else:
                up.write(out + b"{%d}\r\n" % len(raw))
                out = b""
                if sent_id:  # the ID command's answers come first, under its own tag
                    await up.read_tagged(_TAG_ID, deadline)
                    sent_id = False
                while True:  # until the continuation request for the literal
                    line = await up.read_response(deadline)
                    if line.startswith(b"+"):
                        break
                    if line.startswith(tag.encode() + b" "):
                        return [], line
                out += raw + sep
        up.write(out)
        if sent_id:  # drop the ID command's answers; what follows belongs to LOGIN
            await up.read_tagged(_TAG_ID, deadline)
        return await up.read_tagged(tag, deadline)

    def _id_command(self) -> bytes:
        fields: list[tuple[str, str]] = []
        for k, v in self.client_id or ():
            # Names as well as values: a CR/LF in either would inject upstream commands.
            if (v is not None and not k.lower().startswith("x-") and _quotable(k.encode())
                    and _quotable(v.encode())):
                fields.append((k, v))
        fields.append(("x-originating-ip", self.origin.client_ip))
        fields.append(("x-originating-port", str(self.client_port)))
        body = " ".join(f"{quote(k)} {quote(v)}" for k, v in fields[-30:])
        return f"{_TAG_ID} ID ({body})\r\n".encode()

    def _logout_upstream(self) -> None:
        up, self.upstream = self.upstream, None
        if up is not None and not up.pipe.closed:
            up.write(f"{_TAG_BYE} LOGOUT\r\n".encode())
            up.pipe.close()

    # ------------------------------------------------------------------ splice

    def _splice(self, pipelined: bytes) -> None:
        """Join client and upstream; from here on bytes flow without Python parsing."""
        up = self.upstream
        assert up is not None
        client, upipe = self.client, up.pipe
        self._spliced = True
        self.conn = None  # the parser and its buffers are no longer needed
        client.start_splice(upipe)
        upipe.start_splice(client)
        upipe.on_close = self._finish_spliced
        if up.buf:
            client.write(bytes(up.buf))
        # Drop pre-auth state: phones hold sessions for hours, memory per session counts.
        up.buf = bytearray()
        up.capabilities = []
        self.client_id = None
        self._wakeup = _NO_EVENT
        up._wakeup = _NO_EVENT
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
            self._send(Connection.send_bye(text))
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
        else:
            self._end_reason = "shutdown"
            self._send(Connection.send_bye(SHUTDOWN_TEXT))
            self.client.close()


def _quotable(raw: bytes) -> bool:
    """Safe as an IMAP4rev1 quoted string: 7-bit, no CR/LF/NUL, not too long."""
    return len(raw) < 1000 and all(0x20 <= b < 0x7F for b in raw)


__all__ = ["ImapListener", "start"]
