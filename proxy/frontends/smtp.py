"""SMTP submission front end: aiosmtpd towards the phone, aiosmtplib towards the server.

How a session goes (see DESIGN.md, "Sessions, in order"):

1. TLS first. Implicit TLS listeners run the handshake on the accepted connection
   before the greeting (a failed one is a ``session_end``); STARTTLS
   listeners answer everything but EHLO/NOOP/STARTTLS/QUIT with ``530 5.7.0`` until
   TLS is up (unless ``allow_cleartext_auth`` on a loopback listener). A client
   certificate, when presented, names the device (``urn:mailward:device:<id>``).
2. AUTH PLAIN/LOGIN: aiosmtpd parses the exchange; :class:`UpstreamSession` opens a
   connection to the real submission server and authenticates *there* with the
   client's credentials (PLAIN or LOGIN, whichever the server offers). A refusal is
   passed back as the server's own ``535``; mailward never checks or keeps passwords.
3. Only then does the gate decide (one ``decision`` record per login attempt).
   Deny: AUTH is accepted and every MAIL FROM gets ``550 5.7.1 <what to do>``, because
   mail apps show a MAIL FROM refusal to the user but treat a failed AUTH as a wrong
   password. Allow: the session registers with the gate and MAIL FROM, RCPT TO, RSET
   and DATA are relayed one by one; the client sees the server's real replies, and
   ``250`` for a message only once the server has accepted it.
4. If the server fails or times out mid-session the client gets a 4xx (``451 4.4.1``
   for a message, ``421 4.4.1`` otherwise) and the connection closes: mailward never
   acknowledges or re-sends a message on its own.

The pieces: :class:`SubmissionSession` (one per connection, an aiosmtpd ``SMTP``
subclass holding the session state), :class:`_Hooks` (the aiosmtpd handler: short
hooks that delegate to the session), :class:`UpstreamSession` (the relay client),
:class:`Replies` (every reply mailward makes itself) and :class:`SmtpListener` (the
running listener returned by :func:`start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import ssl
import textwrap
import types
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    syntax,
)
from aiosmtplib import SMTP as SMTPClient
from aiosmtplib import SMTPException, SMTPResponse, SMTPResponseException

from proxy.config import ListenerConfig
from proxy.frontends import FrontendContext, RunningListener
from proxy.frontends.smtp_relay import RelayClient, RelayError
from proxy.gate import UPSTREAM_UNAVAILABLE, Gate, Identity, Origin
from proxy.ids import device_id_from_der
from proxy.net.tls import client_cert_from_ssl, feed_early_tls_bytes
from proxy.oplog import get_logger

log = get_logger("mailward.smtp")

# Limits (units in the names).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # messages are held in memory while relayed
MAX_AUTH_FAILURES = 3  # per connection; then 421
POST_AUTH_IDLE_TIMEOUT_S = 300.0  # RFC 5321 4.5.3.2.7 server timeout
DATA_CHUNK_BYTES = 64 * 1024
MAX_EARLY_TLS_BYTES = 64 * 1024  # implicit TLS: ClientHello bytes read before start_tls
REPLY_TEXT_CHARS = 400  # per reply line; RFC 5321 allows 512 octets with the code
UPSTREAM_QUIT_TIMEOUT_S = 2.0
# Shutdown, after the grace: time for the 421 goodbye to be written (and TLS closed
# politely) before connections are aborted; a shorter upstream QUIT; and the most
# close() spends beyond its grace altogether.
SHUTDOWN_FLUSH_S = 0.3
SHUTDOWN_QUIT_TIMEOUT_S = 0.5
SHUTDOWN_MARGIN_S = 1.0
PROBE_TIMEOUT_S = 5.0

# Extensions advertised to clients only as far as the upstream has them.
RELAYED_EXTENSIONS = ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")


# ------------------------------------------------------------------ replies


def _ascii(text: str) -> str:
    """Reply text is ASCII (RFC 5321); keep it readable rather than dropping words."""
    if text.isascii() and text.isprintable():  # the usual case, cheaply
        return text
    for a, b in (("\u2014", "-"), ("\u2013", "-"), ("\u2018", "'"), ("\u2019", "'"),
                 ("\u201c", '"'), ("\u201d", '"'), ("\u2026", "...")):
        text = text.replace(a, b)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(c if c.isprintable() else " " for c in text)


def reply(code: int, enhanced: str, text: str) -> str:
    """One reply (possibly multi-line) with an enhanced status code on every line."""
    chunks = textwrap.wrap(_ascii(text), REPLY_TEXT_CHARS) or [""]
    last = len(chunks) - 1
    return "\r\n".join(
        f"{code}{' ' if i == last else '-'}{enhanced} {c}" for i, c in enumerate(chunks)
    )


class Relayed(str):
    """A reply that is the upstream's: sent as it is (no enhanced code added)."""

    __slots__ = ()


def relayed(resp: SMTPResponse) -> Relayed:
    """The upstream's reply, as the upstream gave it (code and text, every line)."""
    lines = [_ascii(line) for line in resp.message.split("\n")] or [""]
    last = len(lines) - 1
    return Relayed("\r\n".join(
        f"{resp.code}{' ' if i == last else '-'}{line}".rstrip() for i, line in enumerate(lines)
    ))


# RFC 3463 / RFC 5248 codes for the 4xx/5xx replies aiosmtpd makes without one
# (ENHANCEDSTATUSCODES is advertised, so every one of ours must carry one).
_ENHANCED_BY_TEXT = (
    ("size exceeds", "5.3.4"), ("too much mail data", "5.3.4"),  # message too big
    ("too long", "5.5.2"),  # command line too long
    ("strict ascii", "5.6.7"),  # non-ASCII in a command without SMTPUTF8
    ("parameters not recognized", "5.5.4"),
)
_ENHANCED_BY_CODE = {
    421: "4.3.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 534: "5.7.9", 535: "5.7.8", 538: "5.7.11", 550: "5.0.0",
    552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}
_REPLY_LINE = re.compile(r"([45])(\d\d)([ -]?)(.*)\Z", re.S)
_HAS_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |\Z)")


def with_enhanced_code(status: str) -> str:
    """A 4xx/5xx reply of mailward's own (aiosmtpd's) with an enhanced status code on
    every line; replies that have one, and other replies, are returned unchanged."""
    out = []
    for line in status.split("\r\n"):
        m = _REPLY_LINE.match(line)
        if m is None or _HAS_ENHANCED.match(m.group(4)):
            out.append(line)
            continue
        code, text = int(m.group(1) + m.group(2)), m.group(4)
        lowered = text.lower()
        enhanced = next((e for key, e in _ENHANCED_BY_TEXT if key in lowered), None)
        if enhanced is None or enhanced[0] != m.group(1):
            enhanced = _ENHANCED_BY_CODE.get(code, f"{m.group(1)}.0.0")
        out.append(f"{code}{m.group(3) or ' '}{enhanced} {text}".rstrip())
    return "\r\n".join(out)


class Replies:
    """Every reply mailward makes itself (the upstream's replies are relayed as is)."""

    AUTH_OK = "235 2.7.0 Authentication successful"
    OK = "250 2.0.0 OK"
    BYE = "221 2.0.0 Bye"
    STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
    TLS_ACTIVE = "503 5.5.1 TLS already active"
    BAD_ARGUMENT = "501 5.5.4 Invalid command argument"
    TOO_MANY_COMMANDS = "421 4.7.0 Too many commands before authentication, closing"
    TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many failed authentication attempts, closing"
    PREAUTH_TIMEOUT = "421 4.4.2 Authentication not completed in time, closing"
    IDLE_TIMEOUT = "421 4.4.2 Idle too long, closing"
    SHUTDOWN = "421 4.3.2 Service shutting down, please reconnect"
    INTERNAL_ERROR = "421 4.3.0 Internal error, closing"
    UPSTREAM_DOWN = reply(
        421, "4.4.1", "The mail server cannot be reached. Please try again in a few minutes."
    )
    AUTH_UNSUPPORTED = reply(
        454, "4.7.0", "The mail server offers no supported login method. Contact IT support."
    )
    MESSAGE_NOT_SENT = reply(
        451, "4.4.1",
        "The mail server did not confirm this message, so it was not sent. Please try again.",
    )

    @staticmethod
    def denied(text: str) -> str:
        return reply(550, "5.7.1", text)

    @staticmethod
    def temporary(text: str) -> str:
        return reply(454, "4.7.0", text)

    @staticmethod
    def terminated(text: str) -> str:
        return reply(421, "4.7.0", text)


# ------------------------------------------------------------------ upstream


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
            raise UpstreamUnavailable(_describe(exc)) from exc
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
            raise UpstreamUnavailable(_describe(exc)) from exc
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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ------------------------------------------------------------------ the session

# ``<local@domain>`` with a dot-atom local part (RFC 5322 atext) and a plain domain,
# then the rest: what the email header parser returns unchanged for such a path.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<(({_ATEXT}(?:\.{_ATEXT})*)@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*((?:[^(\s].*)?)\Z",
    re.S)


_TLS_UP = object()  # stands in for aiosmtpd's SSLProtocol once TLS is up


class _Session(Session):
    # aiosmtpd's deprecated login_data property logs a warning on every login.
    login_data: Any = None


def _capture_credentials(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    """aiosmtpd's (synchronous) authenticator only hands the parsed credentials on;
    SubmissionSession checks them with the upstream. Failure by default, so a
    mechanism that bypassed that check could never succeed."""
    return AuthResult(success=False, handled=False, auth_data=auth_data)


class SubmissionSession(SMTP):
    """One client connection. Also the :class:`proxy.gate.LiveSession` of it."""

    def __init__(self, listener: SmtpListener) -> None:
        cfg = listener.cfg
        self.listener = listener
        self.identity: Identity | None = None
        self.origin = Origin("smtp", cfg.name, "", cfg.unidentified)
        self._cleartext_ok = cfg.allow_cleartext_auth and cfg.is_loopback
        self._implicit_tls = cfg.tls == "implicit"
        # Implicit TLS: bytes read before the handshake starts (they are the TLS
        # protocol's), None once it has.
        self._early: bytearray | None = None
        self._handshaking = False
        self._upstream: UpstreamSession | None = None
        self._refusal: str | None = None  # set when the gate denied: MAIL FROM answer
        self._decided = False  # a decision record was written for this connection
        self._end_reason = "closed_before_auth"  # session_end reason if no decision
        self._end_detail = ""
        self._ended_by: str | None = None  # after a decision: upstream_lost | shutdown
        self._preauth_commands = 0
        self._auth_failures = 0
        self._txn_open = False  # a MAIL FROM was accepted upstream and not finished
        self._busy = False  # a command (incl. a DATA transfer) is being handled
        self._waiting = False  # for the upstream or the gate (the client is not idle)
        self._pending_goodbye: str | None = None  # sent once the current command ends
        self._close_after_reply = False  # the upstream is gone: close after this reply
        self._closing = False
        self._ended = False
        self._preauth_timer: asyncio.TimerHandle | None = None
        self._smtp_init(listener, asyncio.get_running_loop())

    def _smtp_init(self, listener: SmtpListener, loop: asyncio.AbstractEventLoop) -> None:
        """What ``SMTP.__init__`` sets, with mailward's arguments, without its
        per-connection introspection (``inspect.getmembers`` of the session and the
        handler, ``dir()``, a signature check, an INFO log): the method tables come
        from :func:`_class_tables` and the listener, built once. Kept in step with
        aiosmtpd by ``test_session_init_matches_aiosmtpd``."""
        cfg = listener.cfg
        tls_context = listener.server_tls if cfg.tls == "starttls" else None
        self.__ident__ = "mailward"
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = listener.hooks
        self.data_size_limit = listener.caps.message_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        # aiosmtpd keeps command_size_limits on the class; keep ours per connection.
        self.command_size_limits = type(SMTP.command_size_limits)(
            lambda: SMTP.command_size_limit)
        self.hostname = listener.hostname
        self.tls_context = tls_context
        self.require_starttls = tls_context and False  # enforced by _guard instead
        self._timeout_duration = cfg.preauth_idle_timeout_s
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = not self._cleartext_ok
        self._proxy_timeout = None
        self._authenticator = _capture_credentials
        self._auth_callback = None
        self._auth_required = True
        smtp_names, auth_names = _class_tables(type(self))
        self._auth_methods = {
            mech: _AuthMechAttr(types.MethodType(func, self), True)
            for mech, func in auth_names
        }
        self._handle_hooks = listener.hook_table
        self._ehlo_hook_ver = "new"
        self._smtp_methods = {
            name: types.MethodType(guarded, self) for name, guarded in smtp_names
        }
        self._enforce_call_limit = False

    def _create_session(self) -> Session:
        return _Session(self.loop)

    async def push(self, status: Any) -> None:
        """Every reply: mailward's own 4xx/5xx get an enhanced status code (aiosmtpd's
        own lack one); the upstream's (:class:`Relayed`) go out untouched."""
        if (isinstance(status, str) and status[:1] in ("4", "5")
                and not isinstance(status, Relayed)):
            status = with_enhanced_code(status)
        await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path parser (email's header parser, about 40 us a call, and a
        new class each call), with a fast path for the usual ``<dot-atom@domain>``,
        for which it gives the same answer."""
        m = _SIMPLE_PATH.match(arg)
        if m is None:
            return super()._getaddr(arg)
        local = m.group(2)
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return m.group(1), m.group(3)

    # -- connection lifecycle ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first and self._implicit_tls:
            # The handshake runs in _handle_client, on this plain connection, so that a
            # failed one is this session's. The ClientHello is for start_tls: stdlib
            # asyncio honours this pause, uvloop reads anyway (kept in _early).
            self._early = bytearray()
            transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else ""
            self.origin = Origin("smtp", self.listener.cfg.name, ip, self.listener.cfg.unidentified)
            self.listener.sessions.add(self)
            self._preauth_timer = self.loop.call_later(
                self.listener.cfg.preauth_timeout_s, self._preauth_expired
            )
            if self.listener.closing:  # accepted just before the listener closed
                self._end_reason = "shutdown"
                self._write_and_close(Replies.SHUTDOWN)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._ended:
            self._ended = True
            self._closing = True
            if self._preauth_timer is not None:
                self._preauth_timer.cancel()
            self.listener.session_ended(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            self._early += data
            if len(self._early) > MAX_EARLY_TLS_BYTES and self.transport is not None:
                self.transport.abort()
            return
        # A long DATA transfer is activity: keep the idle timer from firing mid-message.
        if self.session is not None and self.session.authenticated:
            self._reset_timeout()
        super().data_received(data)

    def _timeout_cb(self) -> None:
        if self._handshaking:  # start_tls has its own timeout (the same length)
            return
        if self._waiting:  # for the upstream or the gate, not for the client
            self._reset_timeout()
            return
        self._end_reason = "idle_timeout"
        self._write_and_close(Replies.IDLE_TIMEOUT)

    def _preauth_expired(self) -> None:
        if self.session is not None and not self.session.authenticated:
            self._end_reason = "preauth_timeout"
            self._write_and_close(Replies.PREAUTH_TIMEOUT)

    def _write_and_close(self, status: str) -> None:
        """Last words without waiting (from a timer callback or at shutdown)."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        if not self._handshaking and self._early is None:  # never into a handshake
            with contextlib.suppress(Exception):
                self._writer.write(status.encode("ascii") + b"\r\n")
        self.transport.close()

    async def _goodbye(self, status: str) -> None:
        if self._closing or self.transport is None:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await self.push(status)
        if self.transport is not None:
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            self._end_reason = "tls_failed"
            self._end_detail = _describe(error.__cause__ or error)
            return Replies.INTERNAL_ERROR  # not sent: aiosmtpd closes the transport
        log.exception("smtp session error", listener=self.origin.listener,
                      client_ip=self.origin.client_ip)
        self._end_reason = "internal_error"
        self._pending_goodbye = None
        self._closing = True
        self.loop.call_soon(self._close_transport)
        return Replies.INTERNAL_ERROR

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- every command passes here -------------------------------------------------

    async def _guarded(self, name: str, method: Callable[..., Awaitable[None]],
                       arg: str | None) -> None:
        if self._closing:
            return
        assert self.session is not None
        if not self.session.authenticated:
            self._preauth_commands += 1
            if self._preauth_commands > self.listener.cfg.max_preauth_commands:
                self._end_reason = "too_many_commands"
                await self._goodbye(Replies.TOO_MANY_COMMANDS)
                return
        if self.tls_required and name not in ALLOWED_BEFORE_STARTTLS:
            self._end_reason = "cleartext_refused"
            await self.push(Replies.STARTTLS_FIRST)
            return
        if name == "STARTTLS" and self.is_tls:
            await self.push(Replies.TLS_ACTIVE)
            return
        self._busy = True
        try:
            await method(self, arg)
        finally:
            self._busy = False
        if self._close_after_reply:
            self._closing = True
            self._close_transport()
        elif self._pending_goodbye is not None:
            await self._goodbye(self._pending_goodbye)

    @property
    def is_tls(self) -> bool:
        return self._tls_protocol is not None

    @property
    def tls_required(self) -> bool:
        """STARTTLS listener, TLS not up yet, and cleartext not allowed."""
        return self.tls_context is not None and not self.is_tls and not self._cleartext_ok

    # -- STARTTLS and DATA (aiosmtpd's, made faster) ----------------------------------

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """STARTTLS with the event loop's own TLS (uvloop's native one in production)
        instead of aiosmtpd's pure-Python SSLProtocol: about half the CPU per byte."""
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls_context is None or self.transport is None:
            await self.push("454 4.7.0 TLS not available")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        # Plaintext pipelined after STARTTLS is discarded (RFC 3207 4.2); what arrives
        # from here on goes to the TLS layer. (Not after the handshake: by then the
        # buffer may hold the client's first encrypted command.)
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        plain = self.transport
        try:
            tls = await self._start_tls(plain, self.tls_context)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            raise TLSSetupException() from exc
        if tls is None:
            raise TLSSetupException()
        # What aiosmtpd's connection_made does after its own upgrade: session state
        # forgotten (the client must EHLO again), new transport everywhere.
        peer = self.session.peer if self.session else None
        self._set_rset_state()
        self.session = self._create_session()
        self.session.peer = peer
        self._use_tls(plain, tls)

    async def _start_tls(
        self, plain: asyncio.BaseTransport, ctx: ssl.SSLContext, early: bytes = b""
    ) -> asyncio.Transport | None:
        """The server side of a TLS handshake on ``plain`` (bytes already read from it
        first); the TLS transport, or None if the client left."""
        if early:
            # start_tls queues the TLS protocol's connection_made and resume_reading;
            # this nested call_soon runs after both and before any further read.
            self.loop.call_soon(self.loop.call_soon, feed_early_tls_bytes, plain, early)
        self._handshaking = True
        try:
            return await self.loop.start_tls(
                plain, self, ctx, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=self.listener.cfg.preauth_idle_timeout_s)
        finally:
            self._handshaking = False

    def _use_tls(self, plain: asyncio.BaseTransport, tls: asyncio.Transport) -> None:
        """TLS is up: the TLS transport everywhere, and aiosmtpd told (a set
        _tls_protocol means "TLS is up" to it: AUTH offered and allowed)."""
        self.transport = tls
        self._original_transport = plain
        self._reader._transport = tls  # type: ignore[attr-defined]
        self._writer._transport = tls  # type: ignore[attr-defined]
        self._tls_protocol = _TLS_UP  # type: ignore[assignment]
        self._reset_timeout()
        assert self.session is not None
        self.session.ssl = {"ssl_object": tls.get_extra_info("ssl_object"),
                            "peercert": tls.get_extra_info("peercert"),
                            "cipher": tls.get_extra_info("cipher")}

    async def _handle_client(self) -> None:
        """aiosmtpd's session loop; on an implicit TLS listener, after the handshake."""
        if self._early is not None:
            if self._closing:  # refused at connection_made (listener closing)
                return
            if not await self._implicit_handshake():
                return
        await super()._handle_client()

    async def _implicit_handshake(self) -> bool:
        plain, early = self.transport, bytes(self._early or b"")
        self._early = None
        assert plain is not None and self.listener.server_tls is not None
        error: BaseException | None = None
        try:
            tls = await self._start_tls(plain, self.listener.server_tls, early)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            tls, error = None, exc
        except asyncio.CancelledError:  # aborted (shutdown): still a session_end
            self._tls_failed(plain, "cancelled", None)
            raise
        if tls is None:
            self._tls_failed(plain, _describe(error) if error else "client left", error)
            return False
        self._use_tls(plain, tls)
        return True

    def _tls_failed(
        self, plain: asyncio.BaseTransport, detail: str, error: BaseException | None
    ) -> None:
        """The TLS layer never reached us, so neither will connection_lost: end here."""
        if self._end_reason != "shutdown":
            self._end_reason, self._end_detail = "tls_failed", detail
        self._closing = True
        with contextlib.suppress(Exception):
            plain.abort()  # type: ignore[attr-defined]
        if not self._ended:
            self.connection_lost(error if isinstance(error, Exception) else None)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA, reading the message in chunks instead of line by line."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_message(self.data_size_limit or MAX_MESSAGE_BYTES)
        if content is None:
            self._set_post_data_state()
            await self.push("552 5.3.4 Error: message too big")
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_message(self, limit: int) -> bytes | None:
        """Bytes up to the first CRLF.CRLF (only that ends the message, so a bare-LF
        dot cannot smuggle commands), dot-unstuffed; None if over ``limit`` (the rest
        is still read and dropped, RFC 5321 4.2.5)."""
        buf = bytearray(b"\r\n")  # so a leading ".\r\n" is found as CRLF.CRLF too
        scanned = 0
        too_big = False
        while True:
            end = buf.find(b"\r\n.\r\n", max(scanned - 4, 0))
            if end >= 0:
                break
            if len(buf) > limit + 2:  # drop what we cannot accept, keep the tail
                too_big = True
                del buf[: len(buf) - 4]
            scanned = len(buf)
            chunk = await self._reader.read(DATA_CHUNK_BYTES)
            if not chunk:  # the client went away mid-message
                raise ConnectionResetError("connection lost during DATA")
            buf += chunk
        if len(buf) > end + 5:  # pipelined commands after the message: keep for later
            self._reader._buffer[:0] = buf[end + 5 :]  # type: ignore[attr-defined]
        if too_big or end > limit:
            return None
        body = bytes(buf[2 : end + 2]).replace(b"\r\n.", b"\r\n")
        return body[1:] if body.startswith(b".") else body

    # -- AUTH ----------------------------------------------------------------------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._login(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._login(await super().auth_LOGIN(_, args))

    async def _login(self, parsed: AuthResult) -> AuthResult:
        """Credentials parsed by aiosmtpd -> upstream AUTH -> gate -> AuthResult."""
        creds = parsed.auth_data
        if not isinstance(creds, LoginPassword):
            return parsed  # malformed or aborted exchange: aiosmtpd already answered
        try:
            user = creds.login.decode("utf-8")
        except UnicodeDecodeError:  # never a mailbox; and it could not be logged
            return AuthResult(success=False, handled=False,
                              message="501 5.5.2 The user name is not valid UTF-8")
        device_id = self._device_id()
        identity = Identity(user, device_id, "client_cert" if device_id else "",
                            cert=client_cert_from_ssl(self._ssl_object()))
        # As the client gave it, not verified: what was attempted, named in the
        # session_end record if the attempt is cut off (client gone, shutdown).
        self.identity = identity
        upstream = UpstreamSession(self.listener.cfg, self.listener.upstream_tls,
                                   self.listener.hostname)
        self._waiting = True
        try:
            return await self._verify(creds, identity, upstream)
        except asyncio.CancelledError:  # the client went away meanwhile
            upstream.abort()
            raise
        finally:
            self._waiting = False

    async def _verify(
        self, creds: LoginPassword, identity: Identity, upstream: UpstreamSession
    ) -> AuthResult:
        """Upstream AUTH, then the gate. ``_decided`` is set *before* each gate call:
        if the client leaves while the record is being written (the handler is then
        cancelled), the attempt must not also get a ``session_end`` record."""
        try:
            caps = await upstream.connect()
            self.listener.caps = caps  # what the next sessions advertise
            answer = await upstream.authenticate(creds.login, creds.password)
        except UpstreamUnavailable as exc:
            log.warning("upstream unavailable at login", listener=self.origin.listener,
                        error=str(exc))
            # The login attempt's one decision record: a temporary deny, for the user
            # as the client gave it (unverified: it is what was attempted).
            self._decided = True
            await self.listener.gate.record_deny(
                identity, self.origin, UPSTREAM_UNAVAILABLE,
                f"The mail server could not be reached or did not answer ({exc}).",
                temporary=True)
            await self._goodbye(Replies.UPSTREAM_DOWN)
            return AuthResult(success=False, handled=True)
        except LookupError as exc:
            log.error("upstream login impossible", listener=self.origin.listener,
                      error=str(exc))
            await upstream.quit()
            self._decided = True
            await self.listener.gate.record_deny(
                identity, self.origin, "upstream_auth_unsupported",
                f"The mail server offers no login method mailward can relay ({exc}).")
            return AuthResult(success=False, handled=False, message=Replies.AUTH_UNSUPPORTED)

        if answer.code != 235:
            await upstream.quit()
            if answer.code >= 500:
                self._decided = True
                await self.listener.gate.record_auth_failed(identity, self.origin)
                self._auth_failures += 1
                if self._auth_failures >= MAX_AUTH_FAILURES:
                    await self.push(relayed(answer))
                    await self._goodbye(Replies.TOO_MANY_AUTH_FAILURES)
                    return AuthResult(success=False, handled=True)
            else:  # the server could not check the credentials now: try later
                self._decided = True
                await self.listener.gate.record_deny(
                    identity, self.origin, "upstream_auth_temporary",
                    f"The mail server answered {answer.code} to the login.", temporary=True)
            return AuthResult(success=False, handled=False, message=relayed(answer))

        self._decided = True
        decision = await self.listener.gate.decide(identity, self.origin)
        if self._ended:  # the client left while we decided: nothing to register
            await upstream.quit()
            return AuthResult(success=False, handled=True)
        if decision.allow:
            self.identity, self._upstream = identity, upstream
            self._timeout_duration = POST_AUTH_IDLE_TIMEOUT_S
            self.listener.gate.register(self)
            return AuthResult(success=True, auth_data=identity.user, message=Replies.AUTH_OK)
        await upstream.quit()
        if decision.temporary:
            return AuthResult(success=False, handled=False,
                              message=Replies.temporary(decision.user_text()))
        # Refused: accept the login, refuse at MAIL FROM where apps show the text.
        self.identity = identity
        self._refusal = Replies.denied(decision.user_text())
        return AuthResult(success=True, auth_data=identity.user, message=Replies.AUTH_OK)

    def _ssl_object(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("ssl_object")

    def _device_id(self) -> str | None:
        """The device id in the client's (verified) certificate, if any."""
        obj = self._ssl_object()
        if obj is None:
            return None
        try:
            der = obj.getpeercert(binary_form=True)
        except (ValueError, ssl.SSLError):
            return None
        return _device_id_from_der(der) if der else None

    # -- the relay (called by the hooks) -------------------------------------------

    async def relay_mail(self, address: str, options: list[str]) -> str:
        if self._refusal is not None:
            return self._refusal
        if self._txn_open:  # aiosmtpd reset the envelope (EHLO, size limit): sync up
            status = await self._relay_reset()
            if not status.startswith("250"):
                return status
        args = [b"FROM:" + _path(address), *(_wire(o) for o in options)]
        resp = await self._relay(b"MAIL", *args)
        if resp is None:
            return Replies.UPSTREAM_DOWN
        if resp.code == 250:
            assert self.envelope is not None
            self.envelope.mail_from = address
            self.envelope.mail_options.extend(options)
            self._txn_open = True
        return relayed(resp)

    async def relay_rcpt(self, address: str, options: list[str]) -> str:
        args = [b"TO:" + _path(address), *(_wire(o) for o in options)]
        resp = await self._relay(b"RCPT", *args)
        if resp is None:
            return Replies.UPSTREAM_DOWN
        if resp.code in (250, 251):
            assert self.envelope is not None
            self.envelope.rcpt_tos.append(address)
            self.envelope.rcpt_options.extend(options)
        return relayed(resp)

    async def relay_data(self, content: bytes) -> str:
        upstream = self._upstream
        if upstream is None:
            return self._lost("no upstream session", message=True)
        self._waiting = True
        try:
            resp = await upstream.data(content)
        except UpstreamUnavailable as exc:
            return self._lost(str(exc), message=True)
        finally:
            self._waiting = False
        self._txn_open = False
        if resp.code == 421:
            return self._closing_upstream(resp)
        if resp.code != 250:  # refused: make sure no half transaction stays open
            with contextlib.suppress(UpstreamUnavailable):
                await upstream.command(b"RSET")
        return relayed(resp)

    async def relay_rset(self) -> str:
        if not self._txn_open:
            return Replies.OK
        return await self._relay_reset()

    async def _relay_reset(self) -> str:
        resp = await self._relay(b"RSET")
        if resp is None:
            return Replies.UPSTREAM_DOWN
        self._txn_open = False
        return relayed(resp)

    async def _relay(self, *args: bytes) -> SMTPResponse | None:
        """One command upstream; None when the upstream is gone (session ends)."""
        if self._upstream is None:
            self._lost("no upstream session")
            return None
        self._waiting = True
        try:
            resp = await self._upstream.command(*args)
        except UpstreamUnavailable as exc:
            self._lost(str(exc))
            return None
        finally:
            self._waiting = False
        if resp.code == 421:
            self._closing_upstream(resp)
        return resp

    def _closing_upstream(self, resp: SMTPResponse) -> str:
        """The upstream said 421 (it is closing): relay that, then end this session."""
        self._txn_open = False
        self._ended_by, self._end_detail = "upstream_lost", f"upstream {resp.code}"
        self._close_after_reply = True
        return relayed(resp)

    def _lost(self, detail: str, *, message: bool = False) -> str:
        """The upstream is gone: a 4xx reply (sent by aiosmtpd), then close."""
        log.warning("upstream lost", listener=self.origin.listener,
                    client_ip=self.origin.client_ip, error=detail)
        self._txn_open = False
        self._ended_by, self._end_detail = "upstream_lost", detail
        self._close_after_reply = True
        return Replies.MESSAGE_NOT_SENT if message else Replies.UPSTREAM_DOWN

    async def quit_upstream(self, timeout_s: float = UPSTREAM_QUIT_TIMEOUT_S) -> None:
        if self._upstream is not None:
            upstream, self._upstream = self._upstream, None
            await upstream.quit(timeout_s)

    # -- LiveSession -----------------------------------------------------------------

    async def terminate(self, text: str) -> None:
        """End the session between transactions with ``421 4.7.0 <text>``; a DATA
        transfer in progress completes first (its reply is the upstream's)."""
        self.listener.gate.unregister(self)
        status = Replies.terminated(text)
        if self._busy:
            self._pending_goodbye = status
        else:
            await self._goodbye(status)

    def shutdown(self) -> None:
        """Server stopping and the grace is over: ``421 4.3.2``, whatever the session
        is doing, and close. A message in transfer is not acknowledged (its upstream
        connection is aborted, so the upstream does not take it either)."""
        self._end_reason = "shutdown"
        if self._upstream is not None:  # a live, allowed session
            self._ended_by = self._ended_by or "shutdown"
        self._pending_goodbye = None
        self._write_and_close(Replies.SHUTDOWN)

    def abort(self) -> None:
        """Close hard: drop the connection without waiting for the client (a TLS
        close waits for the client's close_notify), stop the command in progress."""
        self._closing = True
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.abort()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def forget(self) -> None:
        """The connection is gone but connection_lost never came: end it here."""
        self.abort()
        if not self._ended:
            self._ended = True
            if self._preauth_timer is not None:
                self._preauth_timer.cancel()
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self.listener.session_ended(self)

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


@functools.lru_cache(maxsize=4096)
def _device_id_from_der(der: bytes) -> str | None:
    """:func:`proxy.ids.device_id_from_der`, remembered by the certificate's bytes: a
    phone presents the same certificate on every connection."""
    return device_id_from_der(der)


@functools.cache
def _class_tables(
    cls: type[SubmissionSession],
) -> tuple[tuple[tuple[str, Callable[..., Any]], ...], tuple[tuple[str, Any], ...]]:
    """Per session class, once: (command name, guarded method) for every ``smtp_*``
    method and (mechanism, method) for every ``auth_*`` one, named as aiosmtpd names
    them. The guarded methods keep the originals' ``@syntax`` attributes (HELP)."""
    smtp: list[tuple[str, Callable[..., Any]]] = []
    for attr in dir(cls):
        if attr.startswith("smtp_"):
            smtp.append((attr.replace("smtp_", ""), _guarded_method(attr, getattr(cls, attr))))
    auth = [
        (getattr(func, "__auth_mechanism_name__",
                 attr.replace("auth_", "").replace("__", "-")), func)
        for attr in dir(cls) if attr.startswith("auth_")
        for func in (getattr(cls, attr),)
    ]
    return tuple(smtp), tuple(auth)


def _guarded_method(attr: str, method: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
    name = attr.replace("smtp_", "")

    @functools.wraps(method)
    async def guarded(self: SubmissionSession, arg: str | None) -> None:
        await self._guarded(name, method, arg)

    return guarded


def _wire(text: str) -> bytes:
    """aiosmtpd decodes arguments as UTF-8 with surrogateescape; give the bytes back."""
    return text.encode("utf-8", "surrogateescape")


# What aiosmtpd's parser (email's AngleAddr.addr_spec) makes of the null path ``<>``;
# no real address can read so (angle brackets only occur quoted in one).
NULL_PATH = "<>"


def _path(address: str) -> bytes:
    """An address as a path on the wire: ``<addr>``, and ``<>`` for the null path
    (not ``<<>>``, which strict servers refuse). The upstream decides whether the null
    path is acceptable where it appears."""
    return b"<>" if address == NULL_PATH else b"<" + _wire(address) + b">"


# ------------------------------------------------------------------ hooks


class _Hooks:
    """The aiosmtpd handler. aiosmtpd finds hooks by name (a misspelt one is silently
    ignored; tests check these names); each one only delegates to the session."""

    def __init__(self, listener: SmtpListener) -> None:
        self._listener = listener

    async def handle_EHLO(
        self, server: SubmissionSession, session: Session, envelope: Envelope,
        hostname: str, responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must set it itself
        return self._listener.ehlo_lines(responses)

    async def handle_MAIL(
        self, server: SubmissionSession, session: Session, envelope: Envelope,
        address: str, mail_options: list[str],
    ) -> str:
        return await server.relay_mail(address, mail_options)

    async def handle_RCPT(
        self, server: SubmissionSession, session: Session, envelope: Envelope,
        address: str, rcpt_options: list[str],
    ) -> str:
        return await server.relay_rcpt(address, rcpt_options)

    async def handle_DATA(
        self, server: SubmissionSession, session: Session, envelope: Envelope
    ) -> str:
        assert envelope.original_content is not None
        return await server.relay_data(envelope.original_content)

    async def handle_RSET(
        self, server: SubmissionSession, session: Session, envelope: Envelope
    ) -> str:
        return await server.relay_rset()

    async def handle_QUIT(
        self, server: SubmissionSession, session: Session, envelope: Envelope
    ) -> str:
        return Replies.BYE  # the upstream gets its QUIT when the connection is gone


HOOK_NAMES = ("handle_EHLO", "handle_MAIL", "handle_RCPT", "handle_DATA", "handle_RSET",
              "handle_QUIT")


# ------------------------------------------------------------------ the listener


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
        self.hooks = _Hooks(self)
        # aiosmtpd's hook table for the handler (built per connection by SMTP.__init__).
        self.hook_table: dict[str, Callable[..., Any]] = {
            attr.replace("handle_", ""): getattr(self.hooks, attr)
            for attr in dir(self.hooks) if attr.startswith("handle_")
        }
        self.caps = UpstreamCapabilities()  # refreshed by the probe and every login
        self.sessions: set[SubmissionSession] = set()
        self.closing = False  # close() has begun: new connections get 421 4.3.2
        self._quit_timeout_s = UPSTREAM_QUIT_TIMEOUT_S
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        if self.cfg.tls != "none" and self.server_tls is None:
            raise ValueError(f"listener {self.name}: tls = {self.cfg.tls} needs a server context")
        # Implicit TLS too accepts plain TCP: the session runs the handshake itself,
        # so a failed one is seen (and logged as a session_end).
        self._server = await loop.create_server(
            lambda: SubmissionSession(self), self.cfg.host, self.cfg.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

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

    def ehlo_lines(self, responses: list[str]) -> list[str]:
        """aiosmtpd's EHLO lines, with only the extensions the upstream also has."""
        caps = self.caps
        lines = [responses[0]]
        if caps.size is not None:
            lines.append(f"250-SIZE {caps.message_limit}")
        lines += [f"250-{e}" for e in RELAYED_EXTENSIONS if e in caps.extensions]
        lines += [r for r in responses[1:] if r[4:].split(" ")[0] in ("STARTTLS", "AUTH")]
        return [line[:3] + "-" + line[4:] for line in lines[:-1]] + [
            lines[-1][:3] + " " + lines[-1][4:]
        ]

    def session_ended(self, session: SubmissionSession) -> None:
        """Connection gone: unregister, close the upstream, log a session_end if due."""
        self.sessions.discard(session)
        self.gate.unregister(session)
        task = asyncio.get_running_loop().create_task(self._after_session(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_session(self, session: SubmissionSession) -> None:
        record = session.end_record
        if record is not None:  # first: a slow upstream QUIT must not lose it
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

        async def until(deadline: float) -> None:
            while self.sessions and loop.time() < deadline:
                await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))

        await until(grace_end)
        self._quit_timeout_s = SHUTDOWN_QUIT_TIMEOUT_S
        for session in list(self.sessions):
            session.shutdown()
        await until(min(loop.time() + SHUTDOWN_FLUSH_S, hard_end))
        for session in list(self.sessions):
            session.abort()
        await until(min(loop.time() + 0.1, hard_end))
        for session in list(self.sessions):
            session.forget()
        # session_end records and upstream QUITs (each bounded by the QUIT timeout).
        if self._tasks:
            _, late = await asyncio.wait(
                list(self._tasks), timeout=max(0.0, hard_end - loop.time()))
            for task in late:
                task.cancel()
            if late:
                log.warning("session clean-up cut short at shutdown",
                            listener=self.name, tasks=len(late))
                await asyncio.wait(late, timeout=0.1)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(),
                                       max(0.01, hard_end - loop.time()))


async def start(ctx: FrontendContext) -> RunningListener:
    """Start one submission listener (see the module docstring)."""
    hostname = socket.gethostname() or "mailward"  # no DNS lookup on the loop
    listener = SmtpListener(ctx, hostname)
    await listener.probe_upstream()
    await listener.listen()
    return listener
