"""A small in-process mail server for ``mailward demo`` and the server tests.

It stands in for the company's mail server when Dovecot is not installed: an IMAP
server (LOGIN, AUTHENTICATE PLAIN, CAPABILITY, ID, SELECT, FETCH, SEARCH, IDLE,
LOGOUT; implicit TLS, STARTTLS or plain), an SMTP submission server (aiosmtpd: EHLO,
STARTTLS, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, QUIT) that delivers to the IMAP
mailboxes, and an Exchange ActiveSync endpoint (aiohttp: OPTIONS, Basic auth, a Ping
held open like a real long poll). It is a test double, not a mail server: one
mailbox per user, in memory, no persistence.

:class:`DemoUpstream` runs on the caller's event loop; :class:`UpstreamThread` runs
it on a private loop in a daemon thread for synchronous callers (the demo, tests that
drive stdlib clients). ``python -m proxy.demo.upstream`` runs one in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import ssl
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Literal

from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

# aiosmtpd warns about its own internal use of Session.login_data on every AUTH, as a
# warning and as a log line; neither is news to anyone watching the demo.
warnings.filterwarnings("ignore", message="Session.login_data is deprecated")


class _NoLoginDataNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Session.login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_NoLoginDataNoise())

TlsMode = Literal["implicit", "starttls", "none"]

MAX_LINE_BYTES = 64 * 1024
MAX_LITERAL_BYTES = 10 * 1024 * 1024
IMAP_CAPS = "IMAP4rev1 LITERAL+ SASL-IR ID IDLE ENABLE NAMESPACE"
EAS_PATH = "/Microsoft-Server-ActiveSync"
# A WBXML Ping response with Status 1 ("heartbeat expired, nothing changed"):
# header (version 1.3, public id 1, UTF-8, no string table), SWITCH_PAGE 13 (Ping),
# <Ping><Status>1</Status></Ping>.
EAS_PING_OK = bytes([0x03, 0x01, 0x6A, 0x00, 0x00, 0x0D, 0x45, 0x47, 0x03, 0x31, 0x00, 0x01,
                     0x01])


def sample_message(to: str, subject: str, body: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "it-security@corp.example"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class Mailboxes:
    """INBOX per user, shared by IMAP (reads) and SMTP (delivers)."""

    users: dict[str, str]  # address (lower case) -> password
    inbox: dict[str, list[bytes]] = field(default_factory=dict)
    idlers: dict[str, set[Callable[[int], None]]] = field(default_factory=dict)
    delivered: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.users = {u.lower(): p for u, p in self.users.items()}
        for user in self.users:
            self.inbox.setdefault(user, [sample_message(
                user, "Welcome", "Company mail works on this device.\n")])

    def check(self, user: str, password: str) -> bool:
        return self.users.get(user.lower()) == password

    def deliver(self, sender: str, rcpts: list[str], data: bytes) -> None:
        self.delivered.append((sender, rcpts, data))
        for rcpt in rcpts:
            box = self.inbox.get(rcpt.lower())
            if box is None:
                continue
            box.append(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            for notify in list(self.idlers.get(rcpt.lower(), ())):
                notify(len(box))


# ------------------------------------------------------------------ IMAP

_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|\((?:[^()]|\([^()]*\))*\)|(?:[^\s()\[\]"]|\[[^\]]*\])+')


def _tokens(text: bytes) -> list[bytes]:
    out = []
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok.startswith(b'"'):
            tok = re.sub(rb"\\(.)", rb"\1", tok[1:-1])
        out.append(tok)
    return out


def _seqset(text: str, count: int) -> list[int]:
    """``1:*``, ``2,4:5``, ``*`` -> message numbers that exist."""
    nums: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        a = count if lo == "*" else int(lo)
        b = a if not hi else (count if hi == "*" else int(hi))
        nums.update(range(min(a, b), max(a, b) + 1))
    return sorted(n for n in nums if 1 <= n <= count)


class ImapSession:
    def __init__(self, up: DemoUpstream, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, tls: bool) -> None:
        self.up, self.reader, self.writer, self.tls = up, reader, writer, tls
        self.user: str | None = None
        self.selected = False

    def caps(self) -> str:
        caps = IMAP_CAPS
        if not self.tls and self.up.imap_tls == "starttls":
            caps += " STARTTLS LOGINDISABLED"
        elif self.user is None:
            caps += " AUTH=PLAIN"
        return caps

    async def send(self, line: str | bytes) -> None:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        await self.writer.drain()

    async def read_command(self) -> list[bytes] | None:
        tokens: list[bytes] = []
        while True:
            line = await self.reader.readline()
            if not line:
                return None
            if len(line) > MAX_LINE_BYTES:
                raise ValueError("line too long")
            line = line.rstrip(b"\r\n")
            m = re.search(rb"\{(\d+)(\+?)\}$", line)
            tokens.extend(_tokens(line[: m.start()] if m else line))
            if not m:
                return tokens
            size = int(m.group(1))
            if size > MAX_LITERAL_BYTES:
                raise ValueError("literal too large")
            if not m.group(2):
                await self.send("+ go ahead")
            tokens.append(await self.reader.readexactly(size))

    async def run(self) -> None:
        await self.send(f"* OK [CAPABILITY {self.caps()}] demo upstream IMAP ready")
        while True:
            try:
                cmd = await self.read_command()
            except (ValueError, asyncio.IncompleteReadError):
                await self.send("* BYE protocol error")
                return
            if cmd is None:
                return
            if len(cmd) < 2:
                await self.send("* BAD missing command")
                continue
            tag, name, args = cmd[0].decode(), cmd[1].decode().upper(), cmd[2:]
            if name == "UID" and args:
                name, args = "UID " + args[0].decode().upper(), args[1:]
            if not await self.dispatch(tag, name, args):
                return

    async def dispatch(self, tag: str, name: str, args: list[bytes]) -> bool:
        if name == "CAPABILITY":
            await self.send(f"* CAPABILITY {self.caps()}")
        elif name == "NOOP" or name in ("CHECK", "CLOSE", "EXPUNGE", "UNSELECT"):
            pass
        elif name == "ID":
            await self.send('* ID ("name" "mailward-demo-upstream")')
        elif name == "LOGOUT":
            await self.send("* BYE logging out")
            await self.send(f"{tag} OK LOGOUT completed")
            return False
        elif name == "STARTTLS" and not self.tls and self.up.imap_tls == "starttls":
            await self.send(f"{tag} OK begin TLS")
            assert self.up.ssl_context is not None
            await self.writer.start_tls(self.up.ssl_context)
            self.tls = True
            return True
        elif name in ("LOGIN", "AUTHENTICATE") and self.user is None:
            return await self.login(tag, name, args)
        elif self.user is None:
            await self.send(f"{tag} BAD {name} not allowed now")
            return True
        elif name == "ENABLE":
            await self.send("* ENABLED")
        elif name == "NAMESPACE":
            await self.send('* NAMESPACE (("" "/")) NIL NIL')
        elif name in ("LIST", "LSUB"):
            await self.send(f'* {name} () "/" INBOX')
        elif name == "STATUS":
            n = len(self.up.boxes.inbox[self.user])
            await self.send(f"* STATUS INBOX (MESSAGES {n} UIDNEXT {n + 1} UNSEEN 0)")
        elif name in ("SELECT", "EXAMINE"):
            n = len(self.up.boxes.inbox[self.user])
            self.selected = True
            for line in (f"* {n} EXISTS", "* 0 RECENT", r"* FLAGS (\Seen \Answered \Deleted)",
                         "* OK [UIDVALIDITY 1] UIDs valid", f"* OK [UIDNEXT {n + 1}] next"):
                await self.send(line)
            mode = "READ-ONLY" if name == "EXAMINE" else "READ-WRITE"
            await self.send(f"{tag} OK [{mode}] {name} completed")
            return True
        elif name in ("SEARCH", "UID SEARCH"):
            n = len(self.up.boxes.inbox[self.user])
            await self.send("* SEARCH " + " ".join(str(i) for i in range(1, n + 1)))
        elif name in ("FETCH", "UID FETCH") and self.selected and len(args) >= 2:
            await self.fetch(args[0].decode(), args[1].decode().upper(), uid=name != "FETCH")
        elif name == "IDLE":
            return await self.idle(tag)
        else:
            await self.send(f"{tag} BAD unknown command {name}")
            return True
        await self.send(f"{tag} OK {name} completed")
        return True

    async def login(self, tag: str, name: str, args: list[bytes]) -> bool:
        if not self.tls and self.up.imap_tls == "starttls":
            await self.send(f"{tag} NO [PRIVACYREQUIRED] use STARTTLS first")
            return True
        if name == "LOGIN":
            if len(args) != 2:
                await self.send(f"{tag} BAD LOGIN needs user and password")
                return True
            user, password = args[0].decode(), args[1].decode()
        else:
            if not args or args[0].upper() != b"PLAIN":
                await self.send(f"{tag} NO only AUTHENTICATE PLAIN")
                return True
            if len(args) >= 2:
                blob = args[1]
            else:
                await self.send("+ ")
                blob = (await self.reader.readline()).strip()
            try:
                _, user_b, pass_b = base64.b64decode(blob, validate=True).split(b"\0")
                user, password = user_b.decode(), pass_b.decode()
            except (ValueError, binascii.Error):
                await self.send(f"{tag} BAD bad SASL response")
                return True
        if not self.up.boxes.check(user, password):
            await self.send(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials")
            return True
        self.user = user.lower()
        await self.send(f"{tag} OK [CAPABILITY {self.caps()}] logged in")
        return True

    async def fetch(self, seq: str, items: str, *, uid: bool) -> None:
        box = self.up.boxes.inbox[self.user or ""]
        for n in _seqset(seq, len(box)):
            msg = box[n - 1]
            parts = [f"UID {n}", r"FLAGS (\Seen)", f"RFC822.SIZE {len(msg)}"]
            head = " ".join(parts)
            if "HEADER" in items:
                data = msg.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                await self.send(f"* {n} FETCH ({head} BODY[HEADER] {{{len(data)}}}\r\n"
                                .encode() + data + b")\r\n")
            elif "BODY" in items or re.search(r"RFC822(?!\.SIZE)", items):
                label = "RFC822" if "RFC822" in items and "BODY" not in items else "BODY[]"
                await self.send(f"* {n} FETCH ({head} {label} {{{len(msg)}}}\r\n".encode()
                                + msg + b")\r\n")
            else:
                await self.send(f"* {n} FETCH ({head})")

    async def idle(self, tag: str) -> bool:
        assert self.user is not None
        await self.send("+ idling")
        loop = asyncio.get_running_loop()

        def notify(count: int) -> None:
            self.writer.write(f"* {count} EXISTS\r\n".encode())

        def notify_threadsafe(count: int) -> None:
            loop.call_soon_threadsafe(notify, count)

        idlers = self.up.boxes.idlers.setdefault(self.user, set())
        idlers.add(notify_threadsafe)
        try:
            line = await self.reader.readline()
        finally:
            idlers.discard(notify_threadsafe)
        if not line:
            return False
        if line.strip().upper() != b"DONE":
            await self.send(f"{tag} BAD expected DONE")
            return True
        await self.send(f"{tag} OK IDLE terminated")
        return True


# ------------------------------------------------------------------ SMTP


class _SmtpHandler:
    def __init__(self, boxes: Mailboxes) -> None:
        self.boxes = boxes

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        self.boxes.deliver(envelope.mail_from or "", list(envelope.rcpt_tos), data)
        return "250 2.0.0 Ok: queued"


def _authenticator(boxes: Mailboxes) -> Callable[..., AuthResult]:
    def check(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
              auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and boxes.check(
            auth_data.login.decode(), auth_data.password.decode()
        ):
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    return check


# ------------------------------------------------------------------ ActiveSync


def _basic_user(request: web.Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value).decode().partition(":")
    except (ValueError, binascii.Error):
        return None
    return user.rsplit("\\", 1)[-1], password


# ------------------------------------------------------------------ the upstream


class DemoUpstream:
    """IMAP, SMTP and ActiveSync on 127.0.0.1, ports chosen by the OS (or given)."""

    def __init__(
        self,
        users: dict[str, str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        imap_tls: TlsMode = "implicit",
        smtp_tls: TlsMode = "starttls",
        eas_tls: bool = True,
        host: str = "127.0.0.1",
        ping_hold_s: float = 30.0,
        ports: dict[str, int] | None = None,
    ) -> None:
        if ssl_context is None and "none" not in (imap_tls, smtp_tls):
            raise ValueError("TLS modes other than none need an ssl_context")
        self.boxes = Mailboxes(dict(users))
        self.ssl_context = ssl_context
        self.imap_tls, self.smtp_tls, self.eas_tls = imap_tls, smtp_tls, eas_tls
        self.host = host
        self.ping_hold_s = ping_hold_s
        self.ports: dict[str, int] = dict(ports or {})
        self.eas_requests: list[tuple[str, str]] = []  # (Cmd, user)
        self._servers: list[asyncio.base_events.Server] = []
        self._eas_runner: web.AppRunner | None = None

    async def start(self) -> DemoUpstream:
        loop = asyncio.get_running_loop()
        ctx = self.ssl_context
        imap = await asyncio.start_server(
            self._imap_client, self.host, self.ports.get("imap", 0),
            ssl=ctx if self.imap_tls == "implicit" else None,
        )
        smtp_kwargs: dict[str, Any] = {
            "authenticator": _authenticator(self.boxes),
            "auth_require_tls": self.smtp_tls != "none",
            "hostname": "upstream.corp.example",
            "ident": "demo upstream ESMTP",
        }
        if self.smtp_tls == "starttls":
            smtp_kwargs.update(tls_context=ctx, require_starttls=True)
        handler = _SmtpHandler(self.boxes)
        smtp = await loop.create_server(
            lambda: SMTP(handler, **smtp_kwargs), self.host, self.ports.get("smtp", 0),
            ssl=ctx if self.smtp_tls == "implicit" else None,
        )
        self._servers = [imap, smtp]
        self.ports["imap"] = imap.sockets[0].getsockname()[1]
        self.ports["smtp"] = smtp.sockets[0].getsockname()[1]

        app = web.Application()
        app.router.add_route("*", EAS_PATH, self._eas)
        self._eas_runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                         shutdown_timeout=0.5)
        await self._eas_runner.setup()
        site = web.TCPSite(self._eas_runner, self.host, self.ports.get("eas", 0),
                           ssl_context=ctx if self.eas_tls else None)
        await site.start()
        server = site._server  # aiohttp exposes the bound socket only here
        assert server is not None
        self.ports["eas"] = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    @property
    def eas_url(self) -> str:
        return f"{'https' if self.eas_tls else 'http'}://{self.host}:{self.ports['eas']}"

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        if self._eas_runner is not None:
            await self._eas_runner.cleanup()
        for server in self._servers:
            # Python 3.12+ wait_closed waits for open connections: do not hang on them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1)

    async def _imap_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        session = ImapSession(self, reader, writer, tls=self.imap_tls == "implicit")
        try:
            await session.run()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _eas(self, request: web.Request) -> web.StreamResponse:
        headers = {"MS-Server-ActiveSync": "16.1",
                   "MS-ASProtocolVersions": "12.1,14.0,14.1,16.0,16.1",
                   "MS-ASProtocolCommands": "Sync,FolderSync,Ping,Provision,Settings"}
        creds = _basic_user(request)
        if creds is None or not self.boxes.check(*creds):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="eas"'})
        if request.method == "OPTIONS":
            return web.Response(status=200, headers=headers)
        await request.read()
        cmd = request.query.get("Cmd", "")
        self.eas_requests.append((cmd, creds[0].lower()))
        if cmd == "Ping":  # a long poll: held open until the heartbeat ends
            await asyncio.sleep(self.ping_hold_s)
        return web.Response(status=200, body=EAS_PING_OK if cmd == "Ping" else b"",
                            content_type="application/vnd.ms-sync.wbxml", headers=headers)


class UpstreamThread:
    """A :class:`DemoUpstream` on its own event loop in a daemon thread."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.upstream: DemoUpstream | None = None

    def start(self, timeout_s: float = 10.0) -> DemoUpstream:
        ready = threading.Event()
        error: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                self.upstream = loop.run_until_complete(DemoUpstream(**self._kwargs).start())
            except BaseException as exc:
                error.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.upstream.close())
            # Held long-polls are still sleeping: end them before the loop goes.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=main, name="demo-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError("demo upstream did not start")
        if error:
            raise error[0]
        assert self.upstream is not None
        return self.upstream

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> DemoUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run an upstream in the foreground; prints its ports as JSON."""
    p = argparse.ArgumentParser(prog="python -m proxy.demo.upstream")
    p.add_argument("--user", action="append", default=[], metavar="ADDR:PASSWORD")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--plain", action="store_true", help="no TLS anywhere")
    args = p.parse_args(argv)
    users = dict(u.split(":", 1) for u in args.user) or {"alice@corp.example": "secret"}
    ctx = None
    if not args.plain:
        if not (args.cert and args.key):
            p.error("--cert and --key are required unless --plain")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)

    async def go() -> None:
        mode: TlsMode = "none" if args.plain else "implicit"
        up = await DemoUpstream(users, ssl_context=ctx, imap_tls=mode,
                                smtp_tls="none" if args.plain else "starttls",
                                eas_tls=not args.plain).start()
        print(json.dumps(up.ports), flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
