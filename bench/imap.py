"""IMAP benchmark: direct Dovecot vs mailward vs nginx mail proxy + auth_http.

Run by ``make bench`` (needs root for Dovecot, and nginx with libnginx-mod-mail):

    .venv/bin/python bench/imap.py [--seconds 5] [--sessions 2000] [--mailbox-mb 50] [--fetches 3]

One run prints, for each target: logins per second (connect, TLS, LOGIN, LOGOUT;
concurrent clients) and FETCH throughput of a 50 MB mailbox over TLS; then the CPU
seconds per GB spliced and mailward's memory per idle IDLE session over TLS; then the
ratios against the targets in the issue.

What is measured:
- CPU-s per GB: user + system CPU of the proxy process only (mailward's, or nginx's
  worker), read just before each FETCH command and after its tagged answer (not the
  connect, handshakes and login), divided by the bytes the client received. On
  loopback the proxy's CPU includes the kernel's TCP work for both ends of each socket
  it writes to. ``mailward-cleartext`` (no TLS on either side) shows that floor without
  OpenSSL; nginx's worker, measured the same way, is the yardstick for a TLS-to-client,
  plain-to-upstream proxy.
- Memory per idle session: mailward's RSS growth while a second batch of sessions is
  opened (after a warm-up batch and a first batch), divided by that batch's size; each
  session is logged in and in IDLE (its ``+`` continuation read). The upstream's memory
  is not counted, mailward's connection to it is. Reported with a plain upstream (the
  issue's figure) and with a TLS upstream (two TLS connections per session); then the
  growth once each session of the plain-upstream batch has left IDLE, fetched a 1 MiB
  message and idled again (a phone that synced an attachment; a TLS transport whose
  buffers keep their high-water mark would keep about a MiB per session).

Processes: this one (clients, uvloop), a mailward listener process (uvloop, real Gate
with SqlitePostureStore and AuditLog), an aiohttp ``auth_http`` process doing the same
posture check through the same Gate for nginx, nginx (1 worker, like mailward's one
process), Dovecot (performance login mode), and a tiny fake IMAP upstream (plain and
TLS) for the idle sessions (so Dovecot's per-session processes do not limit it).

nginx's mail proxy cannot use TLS to the upstream, so it talks to Dovecot's plain port;
mailward is measured both with its verified TLS upstream (``mailward``) and with a plain
upstream (``mailward-plain``, the like-for-like comparison with nginx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

USER, PASSWORD, DEVICE = "bench@corp.example", "bench-secret", "bench-phone"
NGINX_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"
CONCURRENCY = 8
#: Size of the message each "after a burst" idle session fetches before it idles.
BURST_BYTES = 1024 * 1024
MESSAGE_BYTES = 100 * 1024


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _quiet_logs() -> None:
    """Children report their port on stdout, so logs go to stderr."""
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        print("uvloop missing: running on stdlib asyncio", file=sys.stderr)


# ------------------------------------------------------------------ helper processes


def _gate(workdir: Path) -> Any:
    from proxy.audit import AuditLog
    from proxy.config import load_policy
    from proxy.gate import Gate
    from proxy.posture.sqlite import SqlitePostureStore

    policy = load_policy(ROOT / "config" / "policy.toml")
    store = SqlitePostureStore(workdir / "posture.db")
    audit = AuditLog(workdir / f"audit-{os.getpid()}.jsonl", signing_key=None)
    return Gate(store=store, audit=audit, policy=lambda: policy)


async def serve_mailward(workdir: Path, upstreams: dict[str, str]) -> None:
    """Child: one mailward listener per upstream entry; prints {name: port}."""
    from dataclasses import replace

    from proxy.config import ListenerConfig
    from proxy.frontends import FrontendContext
    from proxy.frontends.imap import start
    from proxy.net.tls import server_context, upstream_context

    gate = _gate(workdir)
    certs = workdir / "certs"
    server_tls = server_context(certs / "server.pem", certs / "server.key",
                                client_ca=certs / "device-ca.pem", client_cert="optional")
    ports = {}
    for name, spec in upstreams.items():
        # "<upstream tls>=host:port", "+cleartext" after the kind: no TLS to the client
        kind, addr = spec.split("=", 1)
        kind, _, extra = kind.partition("+")
        cfg = ListenerConfig(name=name, protocol="imap", host="127.0.0.1", port=0,
                             upstream=addr, upstream_ca=certs / "ca.pem",
                             max_preauth_commands=50)
        cfg = replace(cfg, upstream_tls=kind)  # type: ignore[arg-type]
        if extra == "cleartext":
            cfg = replace(cfg, tls="none", allow_cleartext_auth=True, unidentified="allow")
        up_tls = upstream_context(certs / "ca.pem") if kind != "none" else None
        lst = await start(FrontendContext(cfg, gate, server_tls, up_tls))
        ports[name] = lst.port
    print(json.dumps(ports), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def serve_auth_http(workdir: Path, backend_port: int) -> None:
    """Child: nginx auth_http service doing the posture check through the Gate."""
    from urllib.parse import unquote

    from aiohttp import web
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from proxy.gate import Identity, Origin
    from proxy.ids import device_id_from_der

    gate = _gate(workdir)

    async def auth(request: web.Request) -> web.Response:
        h = request.headers
        device = None
        pem = h.get("Auth-SSL-Cert")
        if pem and h.get("Auth-SSL-Verify") == "SUCCESS":
            cert = x509.load_pem_x509_certificate(unquote(pem).encode())
            device = device_id_from_der(cert.public_bytes(Encoding.DER))
        identity = Identity(h.get("Auth-User", ""), device, "client_cert" if device else "")
        origin = Origin("imap", "nginx", h.get("Client-IP", ""), "deny")
        decision = await gate.decide(identity, origin)
        if not decision.allow:
            return web.Response(headers={"Auth-Status": decision.user_text()[:200],
                                         "Auth-Wait": "0"})
        return web.Response(headers={"Auth-Status": "OK", "Auth-Server": "127.0.0.1",
                                     "Auth-Port": str(backend_port)})

    app = web.Application()
    app.router.add_get("/auth", auth)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({"port": port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def serve_fake_upstream(certs: Path | None = None) -> None:
    """Child: a minimal IMAP server that accepts any LOGIN and holds IDLE forever
    (implicit TLS with ``certs``)."""

    class Fake(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t, self.buf = transport, b""
            transport.write(b"* OK [CAPABILITY IMAP4rev1 ID IDLE LITERAL+] fake ready\r\n")

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                parts = line.split(b" ", 2)
                if len(parts) < 2:
                    continue
                tag, cmd = parts[0], parts[1].upper().strip()
                if cmd == b"IDLE":
                    self.t.write(b"+ idling\r\n")
                elif cmd == b"FETCH":  # one message of BURST_BYTES, whatever was asked
                    body = (b"x" * 1022 + b"\r\n") * (BURST_BYTES // 1024)
                    self.t.write(b"* 1 FETCH (BODY[] {%d}\r\n" % len(body)
                                 + body + b")\r\n" + tag + b" OK done\r\n")
                elif cmd == b"LOGIN":
                    self.t.write(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
                elif cmd == b"ID":
                    self.t.write(b"* ID NIL\r\n" + tag + b" OK ID completed\r\n")
                else:
                    self.t.write(tag + b" OK done\r\n")

    tls = None
    if certs is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(certs / "server.pem", certs / "server.key")
    server = await asyncio.get_running_loop().create_server(Fake, "127.0.0.1", 0, backlog=4096,
                                                            ssl=tls)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def serve_loop_tls_splice(certs: Path, upstream_port: int) -> None:
    """Child: the event loop's own TLS transport (uvloop's ``SSLProtocol``) in front of
    the plain fake upstream, bytes spliced both ways with no IMAP logic. The reference
    for what that transport keeps per idle connection, which mailward's IMAP front end
    does not use (see ``proxy/net/socket_transport.py``)."""
    from proxy.net.tls import server_context

    loop = asyncio.get_running_loop()

    class Half(asyncio.Protocol):
        def __init__(self, peer: Half | None = None) -> None:
            self.peer, self.t, self.early = peer, None, bytearray()

        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            if self.peer is not None and self.peer.t is not None:
                self.peer.t.write(data)
            else:
                self.early += data

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None and self.peer.t is not None:
                self.peer.t.close()

    class Client(Half):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            up = self.peer = Half(self)

            async def connect() -> None:
                await loop.create_connection(lambda: up, "127.0.0.1", upstream_port)
                if self.early:
                    up.t.write(bytes(self.early))  # type: ignore[attr-defined]

            self.connecting = loop.create_task(connect())

    tls = server_context(certs / "server.pem", certs / "server.key",
                         client_ca=certs / "device-ca.pem", client_cert="optional")
    tls.num_tickets = 0  # as mailward's IMAP listener
    server = await loop.create_server(Client, "127.0.0.1", 0, backlog=4096, ssl=tls)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)


def _spawn(*args: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{args[0]} did not start")
    return proc, json.loads(line)


def _start_nginx(workdir: Path, auth_port: int) -> tuple[subprocess.Popen[bytes], int]:
    from peers.dovecot import free_port

    port = free_port()
    certs = workdir / "certs"
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
load_module {NGINX_MODULE};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
error_log {workdir}/nginx-error.log warn;
pid {workdir}/nginx.pid;
events {{ worker_connections 10000; }}
mail {{
    server_name localhost;
    auth_http 127.0.0.1:{auth_port}/auth;
    auth_http_pass_client_cert on;
    proxy_pass_error_message on;
    imap_capabilities IMAP4rev1 IDLE LITERAL+ SASL-IR ID;
    imap_auth plain login;
    ssl_certificate {certs}/server.pem;
    ssl_certificate_key {certs}/server.key;
    ssl_verify_client optional;
    ssl_client_certificate {certs}/device-ca.pem;
    server {{
        listen 127.0.0.1:{port} ssl;
        protocol imap;
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)],
                            stderr=subprocess.DEVNULL)
    import socket

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not start: " + (workdir / "nginx-error.log").read_text())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """nginx workers: the master's children (the master itself does no proxying)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------- clients


async def _tagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line.startswith(tag + b" "):
            return line


async def _login(port: int, ctx: ssl.SSLContext | None) -> tuple[Any, Any]:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                         server_hostname="localhost" if ctx else None)
    await r.readline()
    w.write(f"a LOGIN {USER} {PASSWORD}\r\n".encode())
    line = await _tagged(r, b"a")
    if not line.startswith(b"a OK"):
        raise RuntimeError(f"login failed: {line!r}")
    return r, w


async def bench_logins(port: int, ctx: ssl.SSLContext, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            r, w = await _login(port, ctx)
            w.write(b"z LOGOUT\r\n")
            await _tagged(r, b"z")
            w.close()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - t0)


class _Counter(asyncio.Protocol):
    def __init__(self, tag: bytes) -> None:
        self.n, self.tail, self.end = 0, b"", b"\r\n" + tag + b" "
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.n += len(data)
        window = self.tail + data[-256:]
        if self.end in window[-200:] and window.endswith(b"\r\n") and not self.done.done():
            self.done.set_result(None)
        self.tail = window[-256:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed during FETCH"))


async def bench_fetch(
    port: int, ctx: ssl.SSLContext | None, pids: tuple[int, ...] = ()
) -> tuple[float, int, float]:
    """MB/s, bytes and the CPU seconds of ``pids`` for one FETCH of the whole mailbox.

    The CPU is read just before the FETCH command and just after its tagged answer, so
    connect, TLS handshakes, LOGIN and EXAMINE are not counted as splicing."""
    r, w = await _login(port, ctx)
    w.write(b"s EXAMINE INBOX\r\n")
    await _tagged(r, b"s")
    counter = _Counter(b"f")
    w.transport.set_protocol(counter)
    cpu0 = sum(_cpu_seconds(p) for p in pids)
    t0 = time.perf_counter()
    w.write(b"f FETCH 1:* BODY.PEEK[]\r\n")
    await counter.done
    elapsed = time.perf_counter() - t0
    cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
    w.close()
    return counter.n / elapsed / 1e6, counter.n, cpu


def aead_seal_cpu_per_gb(cipher: str) -> float:
    """CPU seconds per GB to seal 16 KiB TLS records with ``cipher``'s AEAD (OpenSSL,
    through ``cryptography``): the least one TLS side of any proxy spends per byte
    (opening costs about the same)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    aead: Any = (ChaCha20Poly1305(os.urandom(32)) if "CHACHA" in cipher
                 else AESGCM(os.urandom(32 if "256" in cipher else 16)))
    record, nonce, total = os.urandom(16384), os.urandom(12), 512 * 1024 * 1024
    start = time.process_time()
    for _ in range(total // len(record)):
        aead.encrypt(nonce, record, None)
    return (time.process_time() - start) / (total / 1e9)


async def open_idle_sessions(port: int, ctx: ssl.SSLContext, n: int) -> list[Any]:
    """``n`` sessions logged in through the proxy, each in IDLE (continuation seen);
    (reader, writer) pairs."""
    sem = asyncio.Semaphore(64)
    out = []

    async def one() -> None:
        async with sem:
            r, w = await _login(port, ctx)
            w.write(b"i IDLE\r\n")
            line = await r.readline()
            if not line.startswith(b"+"):
                raise RuntimeError(f"IDLE not entered: {line!r}")
            out.append((r, w))

    await asyncio.gather(*(one() for _ in range(n)))
    return out


async def fetch_then_idle_again(sessions: list[Any], concurrency: int = 8) -> None:
    """Each idle session leaves IDLE, fetches a ``BURST_BYTES`` message and idles
    again: a phone that synced a large attachment (the fake upstream's FETCH)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async with sem:
            w.write(b"DONE\r\nf FETCH 1 BODY[]\r\n")
            await _tagged(r, b"f")
            w.write(b"j IDLE\r\n")
            if not (await r.readline()).startswith(b"+"):
                raise RuntimeError("IDLE not entered again")

    await asyncio.gather(*(one(r, w) for r, w in sessions))


# ------------------------------------------------------------------------------- main


@dataclass
class Targets:
    """The running helper processes and the ports the measurements use."""

    procs: list[subprocess.Popen[Any]]
    mailward_pid: int
    ports: dict[str, int]  # mailward's listeners by name
    fake_port: int  # the plain fake upstream (the uvloop TLS reference splices to it)
    logins: dict[str, int]  # targets of the login and FETCH benchmarks
    cpu_pids: dict[str, tuple[int, ...]]  # whose CPU counts for each target


async def _prepare(work: Path) -> ssl.SSLContext:
    """Certificates, the bench device and its posture; returns the client context."""
    from proxy.pki import certs_init, enroll_device
    from proxy.posture import App, Posture
    from proxy.posture.sqlite import SqlitePostureStore

    certs = work / "certs"
    certs_init(certs)
    enroll_device(device_ca_cert=certs / "device-ca.pem",
                  device_ca_key=certs / "offline" / "device-ca.key",
                  device_id=DEVICE, user=USER, out_dir=certs / "devices" / DEVICE)
    now = int(time.time())
    store = SqlitePostureStore(work / "posture.db")
    await store.commit_attestation(Posture(
        DEVICE, USER, "android", "14", True, (App("com.example.notes", "1", "Notes"),),
        now, now + 86400, uuid.uuid4().hex, "bench", "device"), None, now)
    await store.close()
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(certs / "devices" / DEVICE / "device.pem",
                        certs / "devices" / DEVICE / "device.key")
    return ctx


def _start_targets(work: Path, dv: Any, procs: list[subprocess.Popen[Any]]) -> Targets:
    """The fake upstreams, mailward's listeners and, when installed, nginx."""
    fake, fake_ports = _spawn("fake-upstream")
    procs.append(fake)
    fake_tls, fake_tls_ports = _spawn("fake-upstream", str(work / "certs"))
    procs.append(fake_tls)
    mw, ports = _spawn("mailward", str(work), json.dumps({
        "mailward": f"implicit=127.0.0.1:{dv.port_tls}",
        "mailward-plain": f"none=127.0.0.1:{dv.port_plain}",
        "mailward-cleartext": f"none+cleartext=127.0.0.1:{dv.port_plain}",
        "idle": f"none=127.0.0.1:{fake_ports['port']}",
        "idle-tls": f"implicit=127.0.0.1:{fake_tls_ports['port']}",
    }))
    procs.append(mw)
    targets = Targets(procs, mw.pid, ports, fake_ports["port"],
                      {"direct": dv.port_tls, "mailward": ports["mailward"],
                       "mailward-plain": ports["mailward-plain"]},
                      {"mailward": (mw.pid,), "mailward-plain": (mw.pid,)})
    if shutil.which("nginx") is not None and Path(NGINX_MODULE).exists():
        auth, auth_port = _spawn("auth-http", str(work), str(dv.port_plain))
        procs.append(auth)
        ngx, ngx_port = _start_nginx(work, auth_port["port"])
        procs.append(ngx)
        targets.logins["nginx+auth_http"] = ngx_port
        targets.cpu_pids["nginx+auth_http"] = tuple(_children(ngx.pid))
    else:
        print("nginx or its mail module missing: skipping the nginx comparison")
    return targets


async def measure_throughput(
    t: Targets, ctx: ssl.SSLContext, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Logins/s and best FETCH MB/s per target, and CPU-s per GB spliced."""
    logins: dict[str, float] = {}
    fetch: dict[str, float] = {}
    print(f"{'target':<18}{'logins/s':>10}{'FETCH MB/s':>12}")
    cpu: dict[str, list[float]] = {}

    async def fetches(name: str, port: int, client: ssl.SSLContext | None) -> float:
        best = 0.0
        for _ in range(args.fetches):
            mbps, n, c = await bench_fetch(port, client, t.cpu_pids.get(name, ()))
            totals = cpu.setdefault(name, [0.0, 0.0])
            totals[0] += c
            totals[1] += n
            best = max(best, mbps)
        return best

    for name, port in t.logins.items():
        logins[name] = await bench_logins(port, ctx, args.seconds)
        fetch[name] = await fetches(name, port, ctx)
        print(f"{name:<18}{logins[name]:>10.0f}{fetch[name]:>12.1f}", flush=True)
    # No TLS on either side: what the kernel (loopback TCP, both socket ends) and
    # Python cost per GB, without OpenSSL. Not a deployment, a floor.
    t.cpu_pids["mailward-cleartext"] = (t.mailward_pid,)
    clear = await fetches("mailward-cleartext", t.ports["mailward-cleartext"], None)
    print(f"{'mailward-cleartext':<18}{'':>10}{clear:>12.1f}  (no TLS either side)")
    cpu_per_gb = {name: c[0] / (c[1] / 1e9) for name, c in cpu.items() if name in t.cpu_pids}
    return logins, fetch, cpu_per_gb


async def measure_memory(
    t: Targets, ctx: ssl.SSLContext, work: Path, sessions: int
) -> dict[str, float]:
    """Bytes per idle session, and kept after a burst, per listener (see the module
    docstring): RSS growth of the serving process between two batches of idle
    sessions, after a warm-up batch that is opened and closed first, so one-off
    allocations (caches, the first TLS contexts, heap growth for handshakes) do not
    count."""
    memory: dict[str, float] = {}
    ref, ref_ports = _spawn("loop-tls-splice", str(work / "certs"), str(t.fake_port))
    t.procs.append(ref)
    half = sessions // 2
    for name, port, pid in (("idle", t.ports["idle"], t.mailward_pid),
                            ("idle-tls", t.ports["idle-tls"], t.mailward_pid),
                            ("loop-tls", ref_ports["port"], ref.pid)):
        warm = await open_idle_sessions(port, ctx, 200)
        for _, w in warm:
            w.close()
        await asyncio.sleep(1)
        first = await open_idle_sessions(port, ctx, half)
        await asyncio.sleep(1)
        base = _rss_bytes(pid)
        second = await open_idle_sessions(port, ctx, sessions - half)
        await asyncio.sleep(1)
        memory[name] = (_rss_bytes(pid) - base) / len(second)
        if name != "idle-tls":
            # What a session keeps after carrying a burst: RSS growth once every
            # session of the second batch has fetched 1 MiB (8 at a time) and is
            # idle again, per session.
            base = _rss_bytes(pid)
            await fetch_then_idle_again(second)
            await asyncio.sleep(1)
            memory[f"{name}-after-burst"] = (_rss_bytes(pid) - base) / len(second)
        for _, w in first + second:
            w.close()
        await asyncio.sleep(2)
    return memory


async def report(t: Targets, ctx: ssl.SSLContext, sessions: int, logins: dict[str, float],
                 fetch: dict[str, float], cpu_per_gb: dict[str, float],
                 memory: dict[str, float]) -> None:
    """Print CPU, memory, the TLS floor measured now, and the ratios to the targets."""
    print()
    for name, v in cpu_per_gb.items():
        print(f"{name} CPU per GB spliced (FETCH only): {v:.2f} CPU-s/GB")
    print(f"mailward memory per idle IDLE TLS session, plain upstream "
          f"({sessions} sessions): {memory['idle'] / 1024:.1f} KiB")
    print(f"mailward memory per idle IDLE TLS session, TLS upstream "
          f"({sessions} sessions): {memory['idle-tls'] / 1024:.1f} KiB")
    print(f"mailward memory kept per idle session after each fetched "
          f"{BURST_BYTES >> 10} KiB, plain upstream ({sessions - sessions // 2} sessions): "
          f"{memory['idle-after-burst'] / 1024:+.1f} KiB")
    print(f"reference, uvloop's own TLS transport spliced to the plain upstream: "
          f"{memory['loop-tls'] / 1024:.1f} KiB per idle session, then "
          f"{memory['loop-tls-after-burst'] / 1024:+.1f} KiB kept after each fetched "
          f"{BURST_BYTES >> 10} KiB")
    # The floor for a TLS proxy on this machine, measured now: the cleartext splice
    # (kernel TCP work on loopback, both socket ends) plus the AEAD of each TLS side.
    _, probe = await _login(t.ports["mailward"], ctx)
    cipher = probe.get_extra_info("cipher")[0]
    probe.close()
    seal = aead_seal_cpu_per_gb(cipher)
    clear_cpu = cpu_per_gb["mailward-cleartext"]
    print(f"{cipher} seal (one TLS side, no I/O): {seal:.2f} CPU-s/GB; floor with TLS "
          f"to the client only: {clear_cpu + seal:.2f}, with TLS both sides: "
          f"{clear_cpu + 2 * seal:.2f} (cleartext splice + AEAD per side)")
    print()
    print("ratios (targets from issue 4):")
    if "nginx+auth_http" in logins:
        for name in ("mailward", "mailward-plain"):
            r = logins[name] / logins["nginx+auth_http"]
            print(f"  logins/s {name} / nginx+auth_http = {r:.2f}  (target >= 1.0)")
    for name in ("mailward", "mailward-plain"):
        print(f"  FETCH {name} / direct = {fetch[name] / fetch['direct']:.2f}  (target >= 0.8)")
    for name, v in cpu_per_gb.items():
        if name.startswith("mailward"):
            print(f"  CPU-s per GB {name} = {v:.2f}  (target <= 0.4)")
    print(f"  KiB per idle TLS session = {memory['idle'] / 1024:.1f}  (target <= 32)")


async def main(args: argparse.Namespace) -> None:
    from peers.dovecot import Dovecot, make_message

    if os.geteuid() != 0 or not shutil.which("dovecot"):
        sys.exit("bench/imap.py needs root and dovecot (Debian dovecot-imapd)")
    work = Path(tempfile.mkdtemp(prefix="mailward-bench-"))
    work.chmod(0o755)
    ctx = await _prepare(work)
    procs: list[subprocess.Popen[Any]] = []
    dv = Dovecot(work / "certs" / "server.pem", work / "certs" / "server.key",
                 {USER: PASSWORD}, workdir=work / "dovecot", performance=True)
    try:
        dv.start()
        count = args.mailbox_mb * 1024 * 1024 // MESSAGE_BYTES
        dv.deliver(USER, [make_message(i, MESSAGE_BYTES) for i in range(count)])
        targets = _start_targets(work, dv, procs)
        await bench_fetch(dv.port_tls, ctx)  # warm Dovecot's index and page cache
        logins, fetch, cpu_per_gb = await measure_throughput(targets, ctx, args)
        memory = await measure_memory(targets, ctx, work, args.sessions)
        await report(targets, ctx, args.sessions, logins, fetch, cpu_per_gb, memory)
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        dv.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    _raise_nofile()
    _install_uvloop()
    _quiet_logs()
    if len(sys.argv) > 1 and sys.argv[1] == "mailward":
        asyncio.run(serve_mailward(Path(sys.argv[2]), json.loads(sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "auth-http":
        asyncio.run(serve_auth_http(Path(sys.argv[2]), int(sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "loop-tls-splice":
        asyncio.run(serve_loop_tls_splice(Path(sys.argv[2]), int(sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "fake-upstream":
        asyncio.run(serve_fake_upstream(Path(sys.argv[2]) if len(sys.argv) > 2 else None))
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--seconds", type=float, default=5.0, help="per login benchmark")
        ap.add_argument("--sessions", type=int, default=2000, help="idle TLS sessions")
        ap.add_argument("--mailbox-mb", type=int, default=50)
        ap.add_argument("--fetches", type=int, default=3, help="FETCHes per target")
        asyncio.run(main(ap.parse_args()))
