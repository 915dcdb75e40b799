"""Exchange ActiveSync front end: an aiohttp reverse proxy for /Microsoft-Server-ActiveSync.

How a request goes
------------------
1. The query (plain or base64 form, :mod:`proxy.frontends.eas_query`) names the command
   and device; HTTP Basic auth names the user. No device id, or a bad query -> 400. No
   Basic credentials -> 401 (mailward decides per user, so it needs the user name; the
   password is only ever checked by the upstream). A query ``User`` that is not the
   Basic user (ignoring a ``DOMAIN\\`` prefix, and matching an alias to an address
   with the same local part) -> 403.
2. The device-session cache is consulted (see "Decisions per device-session").
3. On a miss, the upstream first verifies the credentials: ``OPTIONS`` with the
   client's ``Authorization`` header. 401 is passed through (recorded as a deny with
   reason ``auth_failed``) and nothing is cached; only then does the gate decide, so
   refusal texts reach authenticated users only.
4. Deny -> HTTP 403 as Exchange answers a blocked device (below). Store or audit
   unavailable, or upstream down -> 503 with ``Retry-After``.
5. Allow -> the request is streamed to the upstream and the response streamed back,
   chunk by chunk in both directions (nothing buffers a whole body). EAS headers
   (``MS-ASProtocolVersion``, ``X-MS-PolicyKey``, ``MS-ASAcceptMultiPart``, ...) pass
   unchanged; hop-by-hop headers are dropped; ``X-Forwarded-For`` / ``-Proto`` /
   ``-Host`` are added. Bodies pass byte for byte (no automatic decompression).
   Requests with a body of known length up to ``CHUNK_BYTES`` (nearly all EAS
   traffic) go over a small pool of keep-alive HTTP/1.1 connections
   (:class:`UpstreamPool`; answers of any size or framing are streamed back); larger
   or chunked request bodies are streamed through one pooled aiohttp
   ``ClientSession``. A long-poll (``Ping``, ``Sync`` with ``Wait``) may wait up to
   ``longpoll_timeout`` for the upstream.

``OPTIONS`` (protocol discovery) carries no device id and returns no mailbox data; it
is passed through without a decision.

Decisions per device-session
----------------------------
A *device-session* is the run of requests of one (device id, user) on one listener
that a single ``decision`` record covers:

* its first request writes the ``decision`` record (``gate.decide``) and registers the
  session with the gate; every later request of that (device id, user) reuses the
  decision and is counted;
* it ends when the gate ends it (a new posture or policy now denies: the gate writes
  ``session_end`` with the trigger, and open requests end with 403 within 2 s), when
  the policy version changes (the next request decides again), when the decision is
  :data:`DECISION_MAX_AGE_S` old, after :data:`IDLE_S` without requests, when the
  upstream answers 401 (credentials changed), or when the listener closes;
* its end writes a ``session_end`` record with ``reason`` = ``eas_session``, the
  cause in ``detail`` and ``requests=N``, the number of requests the decision covered.

So an auditor attributes a request to the latest ``decision`` record of the same
listener, device and user before it, up to the matching ``session_end``. A denied
request is never cached: each gets its own ``decision`` record.

Refusals
--------
Exchange answers a blocked device with HTTP 403 and EAS status 129
(DeviceIsBlockedForThisUser), and names the block reason in ``X-MS-ASThrottle``. For
clients of protocol 14.0 and later, whose command responses carry a global
``Status``, the 403 body is that command's WBXML response with ``Status`` 129, so
native mail apps show their own "device blocked" message. EAS has no field for
server-supplied text in such a response, so the remediation text travels in the
``X-Mailward-Refusal`` header (percent-encoded where not ASCII) and in the audit log;
older clients and commands without a ``Status`` get it as the ``text/plain`` body.
``X-MS-ASThrottle`` says ``ExternalCompliance``: Exchange's reason for a device barred
by an external compliance system, which is what mailward is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.frontends.eas_query import EasQuery, QueryError, parse_query
from proxy.gate import TEMPORARY_TEXT, UPSTREAM_UNAVAILABLE, Identity, Origin
from proxy.net.socket_transport import SocketServer, SocketTransport
from proxy.oplog import get_logger

if TYPE_CHECKING:
    from proxy.frontends import FrontendContext
    from proxy.gate import Gate
    from proxy.policy import Decision

log = get_logger("mailward.activesync")

EAS_PATH: Final = "/Microsoft-Server-ActiveSync"
#: A decision covers a device-session for at most this long, then is made again.
DECISION_MAX_AGE_S: Final = 3600.0
#: A device-session without requests for this long ends (phones Ping far more often).
IDLE_S: Final = 2 * 3600.0
#: How often idle and over-age device-sessions are swept.
SWEEP_INTERVAL_S: Final = 60.0
#: Retry-After on temporary refusals (upstream, posture store or audit unavailable).
RETRY_AFTER_S: Final = 30
#: Cap on a client's TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S: Final = 20.0
#: Read size when streaming bodies. A body of known length up to this size is moved in
#: one piece (most EAS requests and answers are a few hundred bytes); larger or
#: unknown-length bodies are streamed chunk by chunk.
CHUNK_BYTES: Final = 64 * 1024
#: Longest Basic credentials header accepted.
MAX_AUTH_HEADER: Final = 4096
#: Parsed query strings remembered (the cache is emptied when full).
QUERY_CACHE_SIZE: Final = 4096
#: Upstream keep-alive connections kept idle in the pool.
POOL_IDLE_CONNECTIONS: Final = 100

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect",
})
THROTTLE_REASON: Final = "ExternalCompliance"
STATUS_BLOCKED: Final = "129"  # DeviceIsBlockedForThisUser (MS-ASCMD 2.2.2)

# Command -> (WBXML code page, command tag, Status tag) per MS-ASWBXML, for the
# commands whose response carries a global Status in protocol 14.0 and later.
_STATUS_RESPONSE: Final[dict[str, tuple[int, int, int]]] = {
    "Sync": (0, 0x05, 0x0E),
    "MoveItems": (5, 0x05, 0x0B),
    "GetItemEstimate": (6, 0x05, 0x0E),
    "FolderCreate": (7, 0x13, 0x0C),
    "FolderDelete": (7, 0x14, 0x0C),
    "FolderUpdate": (7, 0x15, 0x0C),
    "FolderSync": (7, 0x16, 0x0C),
    "ResolveRecipients": (10, 0x05, 0x07),
    "Ping": (13, 0x05, 0x07),
    "Provision": (14, 0x05, 0x0B),
    "Search": (15, 0x05, 0x0C),
    "Settings": (18, 0x05, 0x06),
    "ItemOperations": (20, 0x05, 0x0D),
    "SendMail": (21, 0x05, 0x12),
    "SmartForward": (21, 0x06, 0x12),
    "SmartReply": (21, 0x07, 0x12),
}


# ------------------------------------------------------------------ pure helpers


def status_wbxml(command: str, status: str) -> bytes | None:
    """A minimal WBXML response ``<Command><Status>status</Status></Command>``, or None
    when the command's response has no global Status."""
    entry = _STATUS_RESPONSE.get(command)
    if entry is None:
        return None
    page, tag, status_tag = entry
    # version 1.3, unknown public id, UTF-8, empty string table
    out = bytearray(b"\x03\x01\x6a\x00")
    if page:
        out += bytes([0x00, page])  # SWITCH_PAGE
    out += bytes([0x40 | tag, 0x40 | status_tag, 0x03]) + status.encode() + b"\x00\x01\x01"
    return bytes(out)


def protocol_at_least(version: str | None, minimum: tuple[int, int]) -> bool:
    try:
        major, _, minor = (version or "").partition(".")
        return (int(major), int(minor or 0)) >= minimum
    except ValueError:
        return False


def basic_user(header: str | None) -> str | None:
    """The user name of HTTP Basic credentials, or None when absent or not Basic."""
    if not header or len(header) > MAX_AUTH_HEADER:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
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


def _header_safe(text: str) -> str:
    # printable ASCII stays readable; anything else (and %) is percent-encoded
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


# ------------------------------------------------------------- upstream connections


class UpstreamProtocolError(OSError):
    """The upstream's answer is not HTTP/1.1 we can forward."""


#: Longest upstream response head accepted, and read buffer above which reading pauses.
MAX_HEAD_BYTES: Final = 64 * 1024
HIGH_WATER: Final = 4 * CHUNK_BYTES
_HOP_BY_HOP_B: Final = frozenset(h.encode() for h in HOP_BY_HOP)
_REPLACED_B: Final = frozenset({b"host", b"content-length", b"x-forwarded-for",
                                b"x-forwarded-proto", b"x-forwarded-host"})


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the upstream, carrying one request at a
    time: the request goes out in one write, the answer is read with flow control.
    Bodies are framed by Content-Length, chunked coding or the end of the connection
    (RFC 9112 section 6.3)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.got_bytes = False  # something arrived for the current request
        self.reused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        # body framing of the current answer: "length", "chunked", "close" or "done"
        self._mode = "done"
        self._left = 0  # bytes left in the body (length) or in the current chunk
        self._chunk_state = "size"  # size | data | crlf | trailers
        self.keep_alive = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.got_bytes = True
        if len(self.buf) > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _more(self, timeout: float) -> None:
        """Wait for more bytes; ConnectionError at the end of the connection."""
        if self.closed:
            raise ConnectionResetError("upstream closed the connection")
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        timer = loop.call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- one exchange
    def send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.got_bytes = False
        self._mode = "pending"  # not reusable until the answer has been read whole
        self.transport.write(head + body if len(body) <= 16 * 1024 else head)
        if len(body) > 16 * 1024:
            self.transport.write(body)

    async def read_head(self, method: str, timeout: float
                        ) -> tuple[int, str, list[tuple[str, str]]]:
        """Status, reason and headers of the answer (interim 1xx answers skipped)."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            while end < 0:
                if len(self.buf) > MAX_HEAD_BYTES:
                    raise UpstreamProtocolError("upstream response head too long")
                if self.closed and self.buf:
                    raise UpstreamProtocolError("upstream response head cut short")
                await self._more(timeout)
                end = self.buf.find(b"\r\n\r\n")
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            del self.buf[:end + 4]
            version, _, rest = lines[0].partition(" ")
            code, _, reason = rest.partition(" ")
            if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or \
                    not code.isdigit():
                raise UpstreamProtocolError(f"bad upstream status line {lines[0][:80]!r}")
            status = int(code)
            headers: list[tuple[str, str]] = []
            length: str | None = None
            coding: str | None = None
            close = version == "HTTP/1.0"
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name[-1] in " \t" or line[0] in " \t":
                    raise UpstreamProtocolError("bad upstream header line")
                value = value.strip(" \t")
                lname = name.lower()
                if lname == "content-length":
                    if not value.isdigit() or (length is not None and value != length):
                        raise UpstreamProtocolError("bad upstream Content-Length")
                    length = value
                elif lname == "transfer-encoding":
                    coding = value.lower()
                elif lname == "connection":
                    tokens = {t.strip().lower() for t in value.split(",")}
                    close = "close" in tokens or (close and "keep-alive" not in tokens)
                headers.append((name, value))
            if 100 <= status < 200:
                if status == 101:
                    raise UpstreamProtocolError("upstream switched protocols")
                continue  # 100 Continue, 102, 103: the real answer follows
            break
        self.keep_alive = not close
        if method == "HEAD" or status in (204, 304):
            self._mode = "done"
        elif coding is not None:
            if coding.rpartition(",")[2].strip() == "chunked":
                self._mode, self._chunk_state = "chunked", "size"
            else:
                self._mode, self.keep_alive = "close", False
        elif length is not None:
            self._mode, self._left = ("length", int(length)) if int(length) else ("done", 0)
        else:
            self._mode, self.keep_alive = "close", False
        return status, reason, headers

    @property
    def body_done(self) -> bool:
        return self._mode == "done"

    def known_length(self) -> int | None:
        return self._left if self._mode == "length" else (0 if self._mode == "done" else None)

    async def read_body(self, timeout: float) -> bytes:
        """The next piece of the answer's body, at most CHUNK_BYTES; b"" at its end."""
        while True:
            mode = self._mode
            if mode == "done":
                return b""
            buf = self.buf
            if mode == "length":
                if buf:
                    n = min(self._left, len(buf), CHUNK_BYTES)
                    out = bytes(buf[:n])
                    del buf[:n]
                    self._left -= n
                    if not self._left:
                        self._mode = "done"
                    return out
            elif mode == "close":
                if buf:
                    out = bytes(buf[:CHUNK_BYTES])
                    del buf[:CHUNK_BYTES]
                    return out
                if self.closed:
                    self._mode = "done"
                    return b""
            else:
                out = self._dechunk()
                if out is not None:
                    return out
            await self._more(timeout)

    def _dechunk(self) -> bytes | None:
        """Chunked coding: the next data from the buffer, b"" at the end, None when more
        bytes are needed."""
        buf = self.buf
        while True:
            state = self._chunk_state
            if state == "data":
                if not buf:
                    return None
                n = min(self._left, len(buf), CHUNK_BYTES)
                out = bytes(buf[:n])
                del buf[:n]
                self._left -= n
                if not self._left:
                    self._chunk_state = "crlf"
                return out
            if state == "crlf":
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise UpstreamProtocolError("bad chunk end")
                del buf[:2]
                self._chunk_state = "size"
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise UpstreamProtocolError("chunk line too long")
                return None
            line = bytes(buf[:eol])
            del buf[:eol + 2]
            if state == "trailers":
                if not line:
                    self._mode = "done"
                    return b""
                continue
            size = line.partition(b";")[0].strip()
            try:
                self._left = int(size, 16)
            except ValueError:
                raise UpstreamProtocolError("bad chunk size") from None
            if size[:1] in (b"-", b"+") or size[:2].lower() == b"0x":
                raise UpstreamProtocolError("bad chunk size")
            self._chunk_state = "data" if self._left else "trailers"

    @property
    def reusable(self) -> bool:
        return self.keep_alive and self._mode == "done" and not self.closed and not self.buf


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one upstream; LIFO, so the warmest is reused
    and the oldest idle ones age out (after ``idle_s``, or when the upstream closes
    them). Any number may be busy (each long-poll holds one)."""

    def __init__(self, url: URL, ssl: Any, connect_timeout: float,
                 *, idle_s: float = 30.0, max_idle: int = POOL_IDLE_CONNECTIONS) -> None:
        self.host = url.raw_host or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.idle_s = idle_s
        self.max_idle = max_idle
        self.idle: list[UpstreamConnection] = []
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if url.explicit_port is None else f"{host}:{self.port}"
                            ).encode("idna" if not host.isascii() else "ascii")

    def get_idle(self) -> UpstreamConnection | None:
        """A pooled connection still open and young enough, or None."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_s:
                conn.reused = True
                return conn
            conn.abort()
        return None

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(
            UpstreamConnection, self.host, self.port, ssl=self.ssl or None,
            server_hostname=self.host if self.ssl else None), self.connect_timeout)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if conn.reusable and len(self.idle) < self.max_idle:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


# ----------------------------------------------------------------- device-session


@dataclass(eq=False)
class DeviceSession:
    """One cached allow decision: a ``LiveSession`` the gate may end."""

    identity: Identity
    origin: Origin
    policy_version: str
    created: float
    frontend: ActiveSyncFrontend
    last_used: float = 0.0
    requests: int = 0
    ended: str | None = None  # remediation text once the gate ended it
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, str]:
        return (self.identity.device_id or "", self.identity.user_key)

    async def terminate(self, text: str) -> None:
        """The gate ended this session: answer open requests 403, forget the decision."""
        self.ended = text
        for task in list(self.tasks):
            task.cancel()
        await self.frontend.drop(self, "terminated", unregister=False)


# ----------------------------------------------------------------------- frontend


class ActiveSyncFrontend:
    """Request handling for one listener; see the module docstring."""

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
        base = URL(self.cfg.upstream)
        self.upstream = base.with_path("").with_query(None).with_fragment(None)
        self._base = str(self.upstream).rstrip("/")
        self.sessions: dict[tuple[str, str], DeviceSession] = {}
        self._admitting: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._client: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self._queries: dict[str, EasQuery] = {}  # parsed query strings (see _post)
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        ssl: Any = False
        if self.upstream.scheme == "https":
            ssl = self.ctx.upstream_tls if self.ctx.upstream_tls is not None else True
        connector = aiohttp.TCPConnector(
            ssl=ssl, limit=0, limit_per_host=0,  # every long-poll holds a connection
            keepalive_timeout=30, ttl_dns_cache=60,
        )
        self._client = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # pass bodies byte for byte
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),  # never mix clients' cookies
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._pool = UpstreamPool(self.upstream, ssl, self.cfg.upstream_connect_timeout_s)
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def close(self, grace_s: float) -> None:
        """Give open requests ``grace_s`` seconds, then answer the rest 503."""
        self._closing = True
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace_s)
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=5)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for session in list(self.sessions.values()):
            await self.drop(session, "listener_closed")
        if self._client is not None:
            await self._client.close()
        if self._pool is not None:
            self._pool.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            await self.sweep()

    async def sweep(self) -> None:
        """End idle and over-age device-sessions that have no open request."""
        now = self.clock()
        for s in list(self.sessions.values()):
            if s.tasks:
                continue
            if now - s.last_used > IDLE_S:
                await self.drop(s, "idle")
            elif now - s.created > DECISION_MAX_AGE_S:
                await self.drop(s, "max_age")

    async def drop(self, session: DeviceSession, cause: str, *, unregister: bool = True) -> None:
        """Forget a device-session and record how many requests its decision covered."""
        if self.sessions.get(session.key) is not session:
            return
        del self.sessions[session.key]
        if unregister:
            self.gate.unregister(session)
        await self.gate.record_session_end(
            session.origin, "eas_session", identity=session.identity,
            detail=f"{cause} requests={session.requests}",
        )

    def _policy_version(self) -> str:
        return self.gate.policy.version

    # -- request handling -----------------------------------------------------------

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse:
        """The low-level server's handler (no router: one path is served)."""
        if request.path != EAS_PATH:
            return _text(404, "Not found.")
        return await self.handle(request)  # type: ignore[arg-type]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            if request.method == "OPTIONS":
                return await self._forward(request, None)
            if request.method != "POST":
                return _text(405, "ActiveSync requests use POST or OPTIONS.",
                             {"Allow": "OPTIONS, POST"})
            return await self._post(request, task)
        finally:
            self._inflight.discard(task)

    async def _post(self, request: web.Request, task: asyncio.Task[Any]) -> web.StreamResponse:
        raw_query = request.rel_url.raw_query_string
        query = self._queries.get(raw_query)
        if query is None:  # a phone repeats the same few query strings all day
            try:
                query = parse_query(raw_query)
            except QueryError as e:
                return _text(400, f"Bad ActiveSync request: {e.detail}.")
            if len(self._queries) >= QUERY_CACHE_SIZE:
                self._queries.clear()
            self._queries[raw_query] = query
        auth = request.headers.get("Authorization")
        auth_user = basic_user(auth)
        if auth_user is None:
            return _text(401, "Sign in with your mail account.",
                         {"WWW-Authenticate": 'Basic realm="ActiveSync"'})
        origin = Origin("activesync", self.origin_name, request.remote or "")
        user = resolve_user(auth_user, query.user)
        if user is None:
            identity = Identity(auth_user, query.device_id, "eas")
            await self.gate.record_deny(identity, origin, "user_mismatch",
                                        "query User differs from Basic auth")
            return _text(403, "The account in the request does not match the signed-in "
                              "account.")
        identity = Identity(user, query.device_id, "eas")
        key = (query.device_id, identity.user_key)

        session = await self._session_for(key)
        if session is None:
            admitted = await self._admit(request, query, identity, origin, key)
            if isinstance(admitted, web.StreamResponse):
                return admitted
            session = admitted
        session.requests += 1
        session.last_used = self.clock()
        session.tasks.add(task)
        try:
            return await self._forward(request, session, query.command)
        finally:
            session.tasks.discard(task)
            session.last_used = self.clock()

    async def _session_for(self, key: tuple[str, str]) -> DeviceSession | None:
        """The cached device-session, if still valid; waits for a concurrent admission
        of the same key so a burst of first requests writes one decision."""
        while (pending := self._admitting.get(key)) is not None:
            await asyncio.shield(pending)
        session = self.sessions.get(key)
        if session is None:
            return None
        if session.ended is not None:
            return None
        if session.policy_version != self._policy_version():
            await self.drop(session, "policy_changed")
            return None
        if self.clock() - session.created > DECISION_MAX_AGE_S and not session.tasks:
            await self.drop(session, "max_age")
            return None
        return session

    async def _admit(
        self,
        request: web.Request,
        query: EasQuery,
        identity: Identity,
        origin: Origin,
        key: tuple[str, str],
    ) -> DeviceSession | web.StreamResponse:
        # One admission per key at a time: a burst of first requests waits for the
        # one in flight, then reuses its session or (after a refusal, which is never
        # cached) admits on its own. No await between this check and the claim below.
        while (pending := self._admitting.get(key)) is not None:
            await asyncio.shield(pending)
            session = await self._session_for(key)
            if session is not None:
                return session
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._admitting[key] = done
        try:
            refused = await self._verify_credentials(request, identity, origin)
            if refused is not None:
                return refused
            policy_version = self._policy_version()
            decision = await self.gate.decide(identity, origin)
            if not decision.allow:
                return self._refusal(request, query, identity, decision)
            now = self.clock()
            session = DeviceSession(identity, origin, policy_version, now, self,
                                    last_used=now)
            old = self.sessions.get(key)
            if old is not None:
                await self.drop(old, "replaced")
            self.sessions[key] = session
            self.gate.register(session)
            return session
        finally:
            if self._admitting.get(key) is done:
                del self._admitting[key]
            done.set_result(None)

    async def _verify_credentials(
        self, request: web.Request, identity: Identity, origin: Origin
    ) -> web.StreamResponse | None:
        """Ask the upstream to check the credentials (OPTIONS with the same
        Authorization). None when it accepted them; else the response to send."""
        assert self._client is not None
        headers = CIMultiDict(self._upstream_headers(request))
        headers.popall("Content-Length", None)
        headers.popall("Content-Type", None)
        try:
            async with self._client.options(
                self.upstream.with_path(EAS_PATH), headers=headers, allow_redirects=False,
                timeout=self._timeout(self.cfg.upstream_timeout_s),
            ) as up:
                if 200 <= up.status < 300:
                    return None
                if up.status in (401, 403):
                    await self.gate.record_auth_failed(identity, origin)
                    body = await up.content.read(64 * 1024)
                    return web.Response(status=up.status, body=body,
                                        headers=self._downstream_headers(up))
                log.warning("upstream refused credential check", status=up.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.warning("upstream unavailable", error=str(e) or type(e).__name__)
        # The request's one decision record: a temporary deny (the gate counts it).
        await self.gate.record_deny(identity, origin, UPSTREAM_UNAVAILABLE,
                                    "The mail server could not check the credentials.",
                                    temporary=True)
        return _unavailable()

    def _refusal(self, request: web.Request, query: EasQuery, identity: Identity,
                 decision: Decision) -> web.Response:
        if decision.temporary:
            return _unavailable()
        text = decision.user_text()
        version = query.protocol_version or request.headers.get("MS-ASProtocolVersion")
        log.info("device refused", device_id=identity.device_id, user=identity.user_key,
                 reasons=[r.code for r in decision.enforced_reasons])
        return blocked_response(query.command, version, text)

    # -- proxying ---------------------------------------------------------------------

    def _timeout(self, read_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.upstream_connect_timeout_s,
                                     sock_read=read_s)

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        named = {h.strip().lower() for h in request.headers.get("Connection", "").split(",")}
        out: CIMultiDict[str] = CIMultiDict()
        for k, v in request.headers.items():
            lk = k.lower()
            if lk in HOP_BY_HOP or lk in named or lk == "host":
                continue
            out.add(k, v)
        prior = request.headers.get("X-Forwarded-For")
        remote = request.remote or ""
        out.popall("X-Forwarded-For", None)
        out["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
        out["X-Forwarded-Proto"] = request.scheme
        if request.host:
            out["X-Forwarded-Host"] = request.host
        return out

    @staticmethod
    def _downstream_headers(up: aiohttp.ClientResponse) -> CIMultiDict[str]:
        named = {h.strip().lower() for h in up.headers.get("Connection", "").split(",")}
        out: CIMultiDict[str] = CIMultiDict()
        for k, v in up.headers.items():
            lk = k.lower()
            if lk not in HOP_BY_HOP and lk not in named:
                out.add(k, v)
        return out

    async def _forward(self, request: web.Request, session: DeviceSession | None,
                       command: str = "") -> web.StreamResponse:
        """Stream the request to the upstream and the answer back. A cancellation
        (the gate ended the session, or the listener closes) answers 403/503 if no
        answer has started, else cuts the connection.

        A body of known length up to CHUNK_BYTES (nearly every EAS request) is read
        first and the exchange goes over the lean pooled connections
        (:class:`UpstreamPool`); larger or chunked request bodies are streamed through
        aiohttp's client."""
        body: bytes | None = b""
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= CHUNK_BYTES:
                try:
                    body = await request.content.readexactly(length)
                except asyncio.IncompleteReadError:
                    return _text(400, "The request body ended early.")
            else:
                body = None
        progress = _Progress()
        try:
            if body is None:
                return await self._stream(request, session, progress)
            resendable = request.method != "POST" or command in RESENDABLE_COMMANDS
            return await self._exchange(request, session, body, progress, resendable)
        except asyncio.CancelledError:
            ended = session.ended if session is not None else None
            if ended is None and not self._closing:
                raise  # the client went away
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            response = progress.response
            if response is not None and response.prepared:
                _abort(request)
                return response
            if ended is not None:
                q = _query_or_none(request)
                version = (q.protocol_version if q else None) or \
                    request.headers.get("MS-ASProtocolVersion")
                return blocked_response(q.command if q else "", version, ended)
            return _unavailable()
        except (aiohttp.ClientError, TimeoutError, OSError, asyncio.IncompleteReadError) as e:
            self.gate.observer.upstream_failed("activesync")
            log.warning("upstream request failed", error=str(e) or type(e).__name__)
            response = progress.response
            if response is not None and response.prepared:
                _abort(request)
                return response
            return _unavailable()

    def _upstream_head(self, request: web.BaseRequest, body: bytes) -> bytes:
        """The request head for the upstream, from the client's raw headers: hop-by-hop
        headers (and those ``Connection`` names) dropped, ``X-Forwarded-*`` added,
        ``Host`` the upstream's, ``Content-Length`` the body's."""
        assert self._pool is not None
        raw = request.raw_headers
        named: set[bytes] = set()
        prior: bytes | None = None
        host: bytes | None = None
        for k, v in raw:
            lk = k.lower()
            if lk == b"connection":
                named.update(t.strip().lower() for t in v.split(b","))
            elif lk == b"x-forwarded-for":
                if prior is None:
                    prior = v
            elif lk == b"host" and host is None:
                host = v
        parts = [request.method.encode(), b" ",
                 request.raw_path.encode("utf-8", "surrogateescape"),
                 b" HTTP/1.1\r\nHost: ", self._pool.host_header, b"\r\n"]
        for k, v in raw:
            lk = k.lower()
            if lk in _HOP_BY_HOP_B or lk in _REPLACED_B or lk in named:
                continue
            parts += (k, b": ", v, b"\r\n")
        remote = (request.remote or "").encode()
        parts += (b"X-Forwarded-For: ", prior + b", " + remote if prior else remote,
                  b"\r\nX-Forwarded-Proto: ", request.scheme.encode(), b"\r\n")
        if host is not None:
            parts += (b"X-Forwarded-Host: ", host, b"\r\n")
        if body or request.method == "POST":
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _exchange(self, request: web.Request, session: DeviceSession | None,
                        body: bytes, progress: _Progress,
                        resendable: bool) -> web.StreamResponse:
        """One exchange over a pooled upstream connection. When a reused connection
        turns out closed before any answer byte, a ``resendable`` request is sent once
        more on a fresh one; any other request fails (503): the upstream may have acted
        on it, and a message must never be sent twice."""
        pool = self._pool
        assert pool is not None
        head = self._upstream_head(request, body)
        timeout = self.cfg.longpoll_timeout_s
        conn = pool.get_idle()
        try:
            while True:
                if conn is None:
                    conn = await pool.connect()
                conn.send(head, body)
                try:
                    status, reason, headers = await conn.read_head(request.method, timeout)
                    break
                except ConnectionError:
                    if not (resendable and conn.reused) or conn.got_bytes:
                        raise
                    conn.abort()  # a stale keep-alive connection: try a fresh one
                    conn = None
            if status == 401 and session is not None:
                # The credentials stopped working: the decision no longer applies.
                await self.drop(session, "auth_failed")
            out = _filtered(headers)
            known = conn.known_length()
            if known is not None and known <= CHUNK_BYTES:
                data = b""
                while not conn.body_done:
                    data += await conn.read_body(timeout)
                out.popall("Content-Length", None)
                return web.Response(status=status, reason=reason, body=data, headers=out)
            progress.response = response = web.StreamResponse(
                status=status, reason=reason, headers=out)
            await response.prepare(request)
            while chunk := await conn.read_body(timeout):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            if conn is not None:
                pool.release(conn)  # closes it unless its answer was read whole

    async def _stream(self, request: web.Request, session: DeviceSession | None,
                      progress: _Progress) -> web.StreamResponse:
        """A request body of unknown or large size, streamed through aiohttp's client."""
        assert self._client is not None
        # The path and query go upstream exactly as the client sent them.
        url = URL(self._base + request.raw_path, encoded=True)
        headers = self._upstream_headers(request)
        async with self._client.request(
            request.method, url, headers=headers, data=request.content,
            allow_redirects=False, timeout=self._timeout(self.cfg.longpoll_timeout_s),
            compress=False, chunked=None,
        ) as up:
            if up.status == 401 and session is not None:
                await self.drop(session, "auth_failed")
            out_headers = self._downstream_headers(up)
            progress.response = response = web.StreamResponse(
                status=up.status, reason=up.reason, headers=out_headers)
            await response.prepare(request)
            async for chunk in up.content.iter_chunked(CHUNK_BYTES):
                await response.write(chunk)
            await response.write_eof()
            return response


class _Progress:
    """How far an exchange got: the response, once one was started."""

    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: web.StreamResponse | None = None


def _filtered(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream's response headers without hop-by-hop ones."""
    named: set[str] = set()
    for k, v in headers:
        if k.lower() == "connection":
            named.update(t.strip().lower() for t in v.split(","))
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers:
        lk = k.lower()
        if lk not in HOP_BY_HOP and lk not in named:
            out.add(k, v)
    return out


#: Commands that only read, so resending one after a stale keep-alive connection
#: cannot change mailbox state. SendMail, SmartReply, SmartForward, Sync (which may
#: carry client changes), MoveItems and the like are never resent.
RESENDABLE_COMMANDS: Final = frozenset({
    "Ping", "GetItemEstimate", "Search", "ResolveRecipients", "ValidateCert",
    "GetAttachment", "FolderSync", "Settings",
})

def _query_or_none(request: web.Request) -> EasQuery | None:
    try:
        return parse_query(request.rel_url.raw_query_string)
    except QueryError:
        return None


def _abort(request: web.Request) -> None:
    """The answer had started: the only honest signal left is a cut connection."""
    if request.transport is not None:
        request.transport.close()


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers,
                        content_type="text/plain", charset="utf-8")


def _unavailable() -> web.Response:
    return _text(503, TEMPORARY_TEXT, {"Retry-After": str(RETRY_AFTER_S)})


def blocked_response(command: str, protocol_version: str | None, text: str) -> web.Response:
    """HTTP 403 as Exchange answers a blocked device (see the module docstring)."""
    headers = {
        "X-MS-ASThrottle": THROTTLE_REASON,
        "X-Mailward-Refusal": _header_safe(text),
        "Cache-Control": "private, no-store",
    }
    body = status_wbxml(command, STATUS_BLOCKED) if protocol_at_least(
        protocol_version, (14, 0)) else None
    if body is not None:
        headers["Content-Type"] = "application/vnd.ms-sync.wbxml"
        return web.Response(status=403, body=body, headers=headers)
    return _text(403, text, headers)


# --------------------------------------------------------------------- listener


@dataclass
class RunningActiveSync:
    """A started ActiveSync listener (``RunningListener``)."""

    name: str
    port: int
    frontend: ActiveSyncFrontend
    runner: web.BaseRunner
    accept: SocketServer | None = None  # HTTPS: our own accept loop, not a site

    async def close(self, grace_s: float) -> None:
        # Stop accepting first, then let open requests finish or answer them 503.
        if self.accept is not None:
            self.accept.close()
        for site in list(self.runner.sites):
            await site.stop()
        await self.frontend.close(grace_s)
        await self.runner.cleanup()


def make_app(frontend: ActiveSyncFrontend) -> web.Application:
    app = web.Application()  # bodies are streamed from request.content, never read whole
    app.router.add_route("*", EAS_PATH, frontend.handle)
    return app


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
    if ctx.server_tls is not None:
        accept = serve_https(server, ctx.server_tls, ctx.listener.host, ctx.listener.port)
        return RunningActiveSync(ctx.listener.name, accept.port, frontend, runner, accept)
    site = web.TCPSite(runner, ctx.listener.host, ctx.listener.port, backlog=1024)
    await site.start()
    port = ctx.listener.port
    bound = site._server  # the bound sockets are only reachable here
    if bound is not None and getattr(bound, "sockets", None):
        port = bound.sockets[0].getsockname()[1]
    return RunningActiveSync(ctx.listener.name, port, frontend, runner)


def serve_https(server: web.Server, tls: Any, host: str, port: int) -> SocketServer:
    """HTTPS connections on ``proxy.net.socket_transport`` (OpenSSL on the socket) rather
    than the event loop's TLS transport, which would keep per connection a 256 KiB
    receive buffer and TLS buffers as large as the biggest Sync response or attachment
    it ever carried: phones hold these connections open for long-polls all day."""
    loop = asyncio.get_running_loop()
    handshakes: set[asyncio.Task[None]] = set()

    async def handshake(transport: SocketTransport) -> None:
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):  # aborted
            await transport.start_tls(tls, server_side=True, timeout=TLS_HANDSHAKE_TIMEOUT_S)

    def accept(sock: Any) -> None:
        # aiohttp's protocol is connected now; it sees bytes once TLS is up.
        transport = SocketTransport(loop, sock, server(), start_reading=False)
        task = loop.create_task(handshake(transport))
        handshakes.add(task)
        task.add_done_callback(handshakes.discard)

    return SocketServer(loop, accept, host, port, backlog=1024)
