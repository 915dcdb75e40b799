"""The aiohttp side: one handler per request, the listener and its HTTPS accept loop.

:class:`ActiveSyncFrontend` takes a request through the steps the package docstring
lists: query and user (:func:`basic_user`, :func:`resolve_user`), the device-session
cache (:mod:`~proxy.frontends.activesync.sessions`), the credential check and the
gate's decision on a miss, then the refusal
(:mod:`~proxy.frontends.activesync.refusal`) or the forwarding
(:mod:`~proxy.frontends.activesync.forward`). :func:`start` runs it on aiohttp's
low-level server.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import hdrs, web

from proxy.frontends.activesync.autodiscover import Autodiscover, Kind, autodiscover_kind
from proxy.frontends.activesync.forward import (
    RESENDABLE_COMMANDS,
    Forwarder,
    OnAuthFailed,
    Progress,
    too_large,
)
from proxy.frontends.activesync.guard import LoginThrottle, UpstreamUnavailable
from proxy.frontends.activesync.hygiene import EAS_PATH, refusal
from proxy.frontends.activesync.refusal import blocked_response, text_response, unavailable
from proxy.frontends.activesync.sessions import (
    DeviceSession,
    DeviceSessions,
    SessionKey,
    session_key,
)
from proxy.frontends.activesync.upstream import UPSTREAM_ERRORS
from proxy.frontends.eas_query import EasQuery, QueryError, parse_query
from proxy.gate import Identity, Origin, origin_for
from proxy.gate.identity import CERT_REQUIRED_TEXT
from proxy.net.http_guard import guarded
from proxy.net.socket_transport import SocketServer, SocketTransport
from proxy.net.tls import client_cert_from_ssl
from proxy.oplog import get_logger

if TYPE_CHECKING:
    from proxy.frontends import FrontendContext
    from proxy.gate import Gate
    from proxy.ids import ClientCert
    from proxy.net.limits import Limits
    from proxy.policy import Decision

log = get_logger("mailward.activesync")

#: Cap on a client's TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S: Final = 20.0
#: Longest Basic credentials header accepted.
MAX_AUTH_HEADER: Final = 4096
#: Entries each per-listener cache holds before it is emptied: parsed query strings,
#: origins by client address, request identities by (user, DeviceId, query User,
#: certificate).
CACHE_ENTRIES: Final = 4096

#: A connection's identity facts: where it comes from, its verified certificate.
ConnectionFacts = tuple[Origin, "ClientCert | None"]


def basic_user(header: str | None) -> str | None:
    """The user name of HTTP Basic credentials, or None when absent or not Basic."""
    if not header or len(header) > MAX_AUTH_HEADER:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:  # base64.b64decode(validate=True), without its two Python frames
        raw = binascii.a2b_base64(token.strip().encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):  # not Base64, or not ASCII
        return None
    user, sep, _password = raw.partition(b":")
    if not sep or not user:
        return None
    try:
        return user.decode("utf-8")
    except UnicodeDecodeError:
        return user.decode("latin-1")  # RFC 7617's historical default


def resolve_user(auth_user: str, query_user: str | None) -> str | None:
    """The user to decide for, or None when the query names someone else.

    ``DOMAIN\\alias`` counts as ``alias``; an alias matches an address with the same
    local part (``alias`` ~ ``alias@corp.example``), and then the address is used,
    since postures name addresses."""

    def plain(u: str) -> str:
        return u.strip().rpartition("\\")[2]

    a = plain(auth_user)
    if query_user is None:
        return a
    q = plain(query_user)
    if a.lower() == q.lower():
        return a
    if ("@" in a) != ("@" in q) and a.partition("@")[0].lower() == q.partition("@")[0].lower():
        return a if "@" in a else q
    return None


class ActiveSyncFrontend:
    """Request handling for one listener; see the package docstring."""

    def __init__(
        self,
        ctx: FrontendContext,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.cfg = ctx.listener
        self.gate: Gate = ctx.gate
        self.clock = clock
        self.origin_name = self.cfg.name
        self.upstream = Forwarder(self.cfg, ctx.upstream_tls)
        #: Failed logins and garbage, counted in the gate's limits (:mod:`.guard`).
        self.throttle = LoginThrottle(self.gate, self.cfg.name)
        self.autodiscover = Autodiscover(self.cfg, self.upstream, self.autodiscover_auth_failed,
                                         self.throttle)
        #: Autodiscover logins the upstream refused (see :meth:`autodiscover_auth_failed`).
        self.autodiscover_auth_failures = 0
        self.sessions = DeviceSessions(self.gate, clock, self.throttle)
        self._inflight: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._queries: dict[str, EasQuery] = {}  # parsed query strings (see _post)
        self._origins: dict[str, Origin] = {}  # by client address
        # (Identity, session key) by what they are made of; None: the users disagree.
        self._identities: dict[tuple[str, str, str | None, ClientCert | None],
                               tuple[Identity, SessionKey] | None] = {}
        # The facts of each TLS connection, read once (its certificate cannot change:
        # renegotiation is off and post-handshake authentication never requested).
        self._tls_facts: weakref.WeakKeyDictionary[Any, ConnectionFacts] = \
            weakref.WeakKeyDictionary()
        self._plain = ctx.server_tls is None  # no TLS session to ask about

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self.cfg.public_url is None:
            log.warning("public_url not set: Autodiscover answers pass unchanged, naming "
                        "the upstream's address", listener=self.cfg.name)
        await self.upstream.start()
        self.sessions.start()

    async def close(self, grace_s: float) -> None:
        """Give open requests ``grace_s`` seconds, then answer the rest 503."""
        self._closing = True
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace_s)
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=5)
        await self.sessions.close()
        await self.upstream.close()

    # -- request handling -----------------------------------------------------------

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse:
        """The low-level server's handler (no router: two paths are served). Garbage
        (unknown paths and methods, hygiene refusals) is counted as abuse of the
        client's address, not logged one by one; a ``Content-Length`` over
        ``eas_max_body`` is 413 before anything else."""
        autodiscover: Kind | None = None
        if request.path != EAS_PATH:
            autodiscover = autodiscover_kind(request.path)
            if autodiscover is None:
                self.throttle.abuse(request.remote or "", "unknown_path")
                return text_response(404, "Not found.")
        refused = refusal(request.raw_path, request.headers)
        if refused is not None:
            self.throttle.abuse(request.remote or "", refused)
            return text_response(400, "Bad ActiveSync request.")
        length = request.content_length
        if length is not None and length > self.gate.limits.cfg.eas_max_body \
                and autodiscover is None:
            self.throttle.body_too_large(request.remote or "")
            return too_large()
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            if request.method == "OPTIONS" or autodiscover is not None:
                # No decision, but no password check either without the certificate
                # the listener requires (the gate would refuse such a phone anyway).
                if self.cfg.client_cert == "required" and self._connection(request)[1] is None:
                    return text_response(403, CERT_REQUIRED_TEXT)
                if autodiscover is not None:
                    return await self._autodiscover(request, autodiscover)
                return await self._options(request)
            if request.method != "POST":
                self.throttle.abuse(request.remote or "", "bad_method")
                return text_response(405, "ActiveSync requests use POST or OPTIONS.",
                                     {"Allow": "OPTIONS, POST"})
            return await self._post(request, task)
        finally:
            self._inflight.discard(task)

    async def _options(self, request: web.BaseRequest) -> web.StreamResponse:
        """OPTIONS (protocol discovery), forwarded without a decision. With Basic
        credentials the upstream checks them, so it is a login for the throttle."""
        user = basic_user(request.headers.get(hdrs.AUTHORIZATION))
        if user is None:
            return await self._forward(request, None)
        ip = request.remote or ""
        cert = self._connection(request)[1]
        waited = await self.throttle.before(user, ip, cert)

        async def refused(_: web.BaseRequest) -> None:
            await self.throttle.failed(user, ip, cert, waited)

        response = await self._forward(request, None, on_auth_failed=refused)
        if 200 <= response.status < 300:
            self.throttle.succeeded(user, ip, cert)
        return response

    async def _autodiscover(self, request: web.BaseRequest, kind: Kind
                            ) -> web.StreamResponse:
        """Autodiscover, passed without a decision (:mod:`.autodiscover`); closing the
        listener answers it 503."""
        try:
            return await self.autodiscover.serve(
                request, kind, basic_user(request.headers.get(hdrs.AUTHORIZATION)),
                self._connection(request)[1])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._closing or task is None:
                raise  # the client went away
            task.uncancel()
            return unavailable()

    async def autodiscover_auth_failed(self, user: str, client_ip: str,
                                       cert: ClientCert | None = None,
                                       waited: float = 0.0) -> None:
        """The upstream refused the Basic credentials of an Autodiscover request: a
        failed login for (``user``, ``client_ip``), or (``user``, device) with a
        verified device certificate; its answer waits the throttle's delay, less the
        ``waited`` seconds it already waited before it was forwarded."""
        self.autodiscover_auth_failures += 1
        log.info("autodiscover login failed", user=user, client_ip=client_ip)
        await self.throttle.failed(user, client_ip, cert, waited)

    def _query(self, raw_query: str) -> EasQuery:
        """The parsed query (``QueryError`` when bad); a phone repeats the same few
        query strings all day, so they are remembered."""
        query = self._queries.get(raw_query)
        if query is None:
            query = parse_query(raw_query)
            if len(self._queries) >= CACHE_ENTRIES:
                self._queries.clear()
            self._queries[raw_query] = query
        return query

    def _connection(self, request: web.BaseRequest) -> ConnectionFacts:
        """The identity facts of the request's connection: its :class:`Origin` and
        the verified client certificate of its TLS session (None without one), read
        once per TLS connection."""
        remote = request.remote or ""
        transport = request.transport
        tls = None if self._plain or transport is None else \
            transport.get_extra_info("ssl_object")
        if tls is None:
            origin = self._origins.get(remote)
            return (self._origin(remote) if origin is None else origin), None
        facts = self._tls_facts.get(tls)
        if facts is None or facts[0].client_ip != remote:
            facts = (self._origin(remote), client_cert_from_ssl(tls))
            self._tls_facts[tls] = facts
        return facts

    def _origin(self, remote: str) -> Origin:
        origin = self._origins.get(remote)
        if origin is None:
            if len(self._origins) >= CACHE_ENTRIES:
                self._origins.clear()
            origin = self._origins[remote] = origin_for(self.cfg, remote)
        return origin

    async def _post(self, request: web.BaseRequest, task: asyncio.Task[Any]
                    ) -> web.StreamResponse:
        try:
            query = self._query(request.rel_url.raw_query_string)
        except QueryError as e:
            self.throttle.abuse(request.remote or "", "bad_query")
            return text_response(400, f"Bad ActiveSync request: {e.detail}.")
        auth_user = basic_user(request.headers.get(hdrs.AUTHORIZATION))
        if auth_user is None:
            return text_response(401, "Sign in with your mail account.",
                                 {"WWW-Authenticate": 'Basic realm="ActiveSync"'})
        origin, cert = self._connection(request)
        facts = self._identity(auth_user, query, cert)
        if facts is None:
            identity = Identity(auth_user, query.device_id, "claim", cert=cert)
            await self.gate.record_deny(identity, origin, "user_mismatch",
                                        "query User differs from Basic auth")
            return text_response(403, "The account in the request does not match the "
                                      "signed-in account.")
        identity, key = facts

        session = self.sessions.cached(key)  # nearly always: no coroutine to run
        if session is None:
            session = await self.sessions.current(key)
        if session is None:
            admitted = await self._admit(request, query, identity, origin, key)
            if isinstance(admitted, web.StreamResponse):
                return admitted
            session = admitted
        session.begin(task, self.clock())
        try:
            return await self._forward(request, session, query.command)
        finally:
            session.finish(task, self.clock())

    def _identity(self, auth_user: str, query: EasQuery, cert: ClientCert | None
                  ) -> tuple[Identity, SessionKey] | None:
        """The request's :class:`Identity` (DeviceId claimed, certificate facts) and
        its device-session key; None when the query's User is not the Basic user.
        A phone sends the same facts all day, so they are made once."""
        made = (auth_user, query.device_id, query.user, cert)
        try:
            return self._identities[made]
        except KeyError:
            pass
        user = resolve_user(auth_user, query.user)
        facts = None
        if user is not None:
            identity = Identity(user, query.device_id, "claim", cert=cert)
            facts = (identity, session_key(identity))
        if len(self._identities) >= CACHE_ENTRIES:
            self._identities.clear()
        self._identities[made] = facts
        return facts

    async def _admit(self, request: web.BaseRequest, query: EasQuery, identity: Identity,
                     origin: Origin, key: SessionKey) -> DeviceSession | web.StreamResponse:
        """A new device-session: the upstream checks the credentials, then the gate
        decides; refusals are answered and never cached. The session is registered
        with the gate before the decision, so a re-evaluation during it ends it."""
        async with self.sessions.admission(key) as session:
            if session is not None:
                return session
            # Without the certificate a listener requires, the gate refuses whatever
            # the password: the upstream is not asked (no password oracle).
            if identity.cert is not None or origin.client_cert != "required":
                try:
                    refused = await self.throttle.check_credentials(
                        self.upstream, request, identity, origin)
                except UpstreamUnavailable:
                    return unavailable()
                if refused is not None:
                    return refused
            bound = self._new_binding(identity)
            decision, session = await self.sessions.decide(identity, origin, key)
            if session is None:
                return self._refusal(request, query, identity, decision)
            if not await self.sessions.activate(session):
                return self._blocked(request, query, session.ended or "")
            if bound is not None and bound in self.gate.trust.bindings:
                # Claims of this DeviceId now need its certificate: end the bare ones.
                await self.gate.recheck_devices({bound}, "device_bound")
            return session

    def _new_binding(self, identity: Identity) -> str | None:
        """The device this request may bind to its certificate (a DeviceId claimed
        with a certificate naming it, not bound yet), else None."""
        cert = identity.cert
        if cert is None or cert.device_id is None or identity.device_id is None:
            return None
        device = self.gate.trust.resolve(cert.device_id)
        return None if device in self.gate.trust.bindings else device

    def _refusal(self, request: web.BaseRequest, query: EasQuery, identity: Identity,
                 decision: Decision) -> web.Response:
        if decision.temporary:
            return unavailable()
        log.info("device refused", device_id=identity.device_id, user=identity.user_key,
                 reasons=[r.code for r in decision.enforced_reasons])
        return self._blocked(request, query, decision.user_text())

    def _blocked(self, request: web.BaseRequest, query: EasQuery | None, text: str
                 ) -> web.Response:
        """403 as Exchange answers a blocked device, in the client's protocol version."""
        version = (query.protocol_version if query else None) or \
            request.headers.get("MS-ASProtocolVersion")
        return blocked_response(query.command if query else "", version, text)

    async def _forward(self, request: web.BaseRequest, session: DeviceSession | None,
                       command: str = "", on_auth_failed: OnAuthFailed | None = None
                       ) -> web.StreamResponse:
        """Forward to the upstream. A cancellation (the gate ended the session, or the
        listener closes) answers 403/503 if no answer has started, else cuts the
        connection; so does an upstream failure (503). An upstream 401 goes to the
        session (a failed login that ends it), else to ``on_auth_failed``."""
        progress = Progress()
        try:
            return await self.upstream.forward(
                request, progress,
                resendable=request.method != "POST" or command in RESENDABLE_COMMANDS,
                on_auth_failed=session.auth_failed if session is not None else on_auth_failed,
                max_body=self.gate.limits.cfg.eas_max_body)
        except asyncio.CancelledError:
            ended = session.ended if session is not None else None
            if ended is None and not self._closing:
                raise  # the client went away
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if progress.response is not None and progress.response.prepared:
                return _abort(request, progress.response)
            if ended is not None:
                return self._ended(request, ended)
            return unavailable()
        except UPSTREAM_ERRORS as e:
            self.gate.observer.upstream_failed("activesync")
            log.warning("upstream request failed", error=str(e) or type(e).__name__)
            if progress.response is not None and progress.response.prepared:
                return _abort(request, progress.response)
            return unavailable()

    def _ended(self, request: web.BaseRequest, text: str) -> web.Response:
        """403 for a request whose device-session the gate ended."""
        try:
            query: EasQuery | None = self._query(request.rel_url.raw_query_string)
        except QueryError:
            query = None
        return self._blocked(request, query, text)


def _abort(request: web.BaseRequest, response: web.StreamResponse) -> web.StreamResponse:
    """The answer had started: the only honest signal left is a cut connection."""
    if request.transport is not None:
        request.transport.close()
    return response


# --------------------------------------------------------------------- listener


@dataclass
class RunningActiveSync:
    """A started ActiveSync listener (``RunningListener``)."""

    name: str
    port: int
    frontend: ActiveSyncFrontend
    runner: web.BaseRunner
    accept: SocketServer | asyncio.Server  # HTTPS: our own accept loop

    async def close(self, grace_s: float) -> None:
        # Stop accepting first, then let open requests finish or answer them 503.
        self.accept.close()
        await self.frontend.close(grace_s)
        await self.runner.cleanup()


async def start(ctx: FrontendContext) -> RunningActiveSync:
    """Start the ActiveSync listener described by ``ctx.listener``."""
    frontend = ActiveSyncFrontend(ctx)
    await frontend.start()
    # handler_cancellation: a client that hangs up mid long-poll frees its upstream
    # connection at once instead of when the upstream answers.
    # The low-level server: the one path needs no router (a third less CPU per request).
    server = web.Server(frontend.serve, handler_cancellation=True, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    protocol = head_timed(server, frontend)
    name = ctx.listener.name
    if ctx.server_tls is not None:
        _certificate_refusals_answered(ctx.server_tls, ctx.listener.client_cert)
        accept = serve_https(protocol, ctx.server_tls, ctx.listener.host, ctx.listener.port,
                             limits=ctx.gate.limits, listener=name)
        return RunningActiveSync(name, accept.port, frontend, runner, accept)
    plain = await asyncio.get_running_loop().create_server(
        protocol, ctx.listener.host, ctx.listener.port, backlog=1024, reuse_address=True)
    port = int(plain.sockets[0].getsockname()[1]) if plain.sockets else ctx.listener.port
    return RunningActiveSync(name, port, frontend, runner, plain)


def head_timed(server: web.Server, frontend: ActiveSyncFrontend) -> Callable[[], Any]:
    """The listener's protocol factory: aiohttp's request handler with the limits'
    ``header_timeout`` for every request head (slowloris), read when each connection
    starts; a connection cut off counts against its address."""

    def protocol() -> Any:
        timeout = frontend.gate.limits.cfg.header_timeout_s
        return guarded(server, timeout, frontend.throttle.slow_head)()

    return protocol


def _certificate_refusals_answered(tls: ssl.SSLContext, client_cert: str) -> None:
    """``client_cert = "required"``: the handshake still asks for and verifies a
    certificate, but a phone without one gets the gate's answer (403 with
    ``certificate_required``, a text the phone shows, and a decision record) instead
    of a failed handshake that phones report as "cannot connect to server". Every
    request decides through the gate, which refuses it without a certificate."""
    if client_cert == "required" and tls.verify_mode == ssl.CERT_REQUIRED:
        tls.verify_mode = ssl.CERT_OPTIONAL


def serve_https(protocol: Callable[[], Any], tls: ssl.SSLContext, host: str, port: int,
                *, limits: Limits | None = None, listener: str = "") -> SocketServer:
    """HTTPS connections on ``proxy.net.socket_transport`` (OpenSSL on the socket) rather
    than the event loop's TLS transport, which would keep per connection a 256 KiB
    receive buffer and TLS buffers as large as the biggest Sync response or attachment
    it ever carried: phones hold these connections open for long-polls all day.
    ``protocol`` makes each connection's aiohttp handler (a ``web.Server`` will do);
    ``limits`` and ``listener`` go to the accept loop."""
    loop = asyncio.get_running_loop()
    handshakes: set[asyncio.Task[None]] = set()

    async def handshake(transport: SocketTransport) -> None:
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):  # aborted
            await transport.start_tls(tls, server_side=True, timeout=TLS_HANDSHAKE_TIMEOUT_S)

    def accept(sock: Any) -> None:
        # aiohttp's protocol is connected now; it sees bytes once TLS is up.
        transport = SocketTransport(loop, sock, protocol(), start_reading=False)
        task = loop.create_task(handshake(transport))
        handshakes.add(task)
        task.add_done_callback(handshakes.discard)

    return SocketServer(loop, accept, host, port, backlog=1024, limits=limits,
                        listener=listener)
