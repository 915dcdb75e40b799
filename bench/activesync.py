"""ActiveSync proxy benchmark: requests/s for small Sync requests and memory per idle
long-poll, for five set-ups measured in one run:

  direct        load generator -> upstream
  mailward      load generator -> mailward (activesync front end) -> upstream
  nginx         load generator -> nginx proxy_pass -> upstream
  nginx+auth    load generator -> nginx auth_request (to a minimal aiohttp service
                that does the same posture check per request) -> upstream
  nginx+mailward  load generator -> nginx auth_request (to mailward's ``[nginx]``
                listener: decided once per device-session) -> upstream

Run: ``.venv/bin/python bench/activesync.py [--seconds 3] [--reps 5] [--conns 64]
[--idle 500] [--tree NAME=DIR ...] [--only NAME,...]`` (``make bench``). Everything
runs on loopback without TLS, so the figures are the proxies' own HTTP and decision
costs, not TLS. The upstream is a minimal asyncio/uvloop HTTP responder; the load
generator keeps ``--conns`` keep-alive connections busy (one request in flight per
connection).

Fairness: every proxy set-up runs on the same single CPU (``--proxy-cpu``, default
the last one): mailward's one process; nginx's one worker; for nginx+auth and nginx+mailward the
worker *and* the service it asks. The load generator and upstream share the other CPUs. All
set-ups are started once and measured in interleaved rounds (the order rotates each
round), each run after a warm-up second, and the table shows the median of ``--reps``
rounds. Besides req/s (wall clock, which other load on the machine disturbs) each run
reads the CPU time the proxy set-up's processes used during the measured window, and
reports requests per CPU-second: the "per core" figure, and the one that stays steady
when the machine is shared. nginx talks HTTP/1.1 with pooled keep-alive connections
to both the upstream and the check service (``keepalive`` upstream blocks,
``proxy_http_version 1.1``, empty ``Connection``), and ``keepalive_requests`` is
raised: at its default (1000) nginx closed each load connection after 1000 requests,
and since the load generator did not reconnect, a fast set-up (plain nginx) starved
itself within a run, which is why plain nginx once measured below nginx+auth. The load
generator now also reconnects and counts it. It is Python and shares a CPU with the
upstream: against plain nginx it, not nginx, limits the req/s column (nginx uses well
under its core there; ``wrk`` has measured up to ~69k req/s); req/CPU-s is unaffected.

The check service behind auth_request does per request what mailward does per
device-session: parse the EAS query, look up the posture (SQLite store) and evaluate
the policy. It writes no audit record (mailward writes one per device-session), which
favours the nginx set-up. nginx+mailward is the deployment README describes for sites
that keep nginx: its ``auth_request`` goes to mailward's ``[nginx]`` listener, which
checks a device-session's first request upstream (an ``OPTIONS``), decides it, writes
its record and answers the session's later requests from its cache.

Revisions: each ``--tree NAME=DIR`` adds a set-up ``NAME``, mailward run from another
source tree (``git archive REV | tar -x -C DIR``; its own ``bench/activesync.py``
starts it), measured in the same interleaved rounds as this tree's ``mailward``: the
same-run comparison "no slower than main" asks for. ``--only`` keeps the named set-ups.

Idle long-polls: ``--idle`` clients each park a Ping (the upstream never answers); the
figure is the growth of the proxy's resident memory (nginx: worker plus check
service) divided by the number of parked requests, each from its own device.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

USER = "alice@corp.example"
AUTH = "Basic " + base64.b64encode(f"{USER}:pw".encode()).decode()
EAS = "/Microsoft-Server-ActiveSync"
SYNC_BODY = bytes.fromhex("03016a00455c4f4b033100015203350001010101")  # small Sync
SYNC_RESPONSE = bytes.fromhex("03016a00455c4f4b03320001520335000148033100010101")
DEVICES = 64  # distinct devices in the request mix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proxy_cpu() -> int:
    return int(os.environ.get("BENCH_PROXY_CPU", (os.cpu_count() or 1) - 1))


def _other_cpus() -> set[int]:
    return set(range(os.cpu_count() or 1)) - {_proxy_cpu()} or {_proxy_cpu()}


def _pin_proxy() -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {_proxy_cpu()})


def _pin_rest() -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, _other_cpus())


def _uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def _cpu_s(pids: list[int]) -> float:
    """User plus system CPU seconds used so far by ``pids``."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _request(device: str, command: str = "Sync", body: bytes = SYNC_BODY) -> bytes:
    head = (f"POST {EAS}?Cmd={command}&User=alice%40corp.example&DeviceId={device}"
            f"&DeviceType=iPhone HTTP/1.1\r\nHost: bench\r\nAuthorization: {AUTH}\r\n"
            f"MS-ASProtocolVersion: 14.1\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


# ------------------------------------------------------------------ upstream


class _Upstream(asyncio.Protocol):
    """Minimal HTTP/1.1 responder: Sync and OPTIONS answered at once, Ping parked."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            if "Cmd=Ping" in head.split("\r\n", 1)[0]:
                continue  # a long-poll that never ends
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(SYNC_RESPONSE), SYNC_RESPONSE))


def run_upstream(port: int) -> None:
    _pin_rest()
    _uvloop()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(_Upstream, "127.0.0.1", port, backlog=4096))
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_forever()
    server.close()


# ---------------------------------------------------------------- mailward


async def _seed(store: Any, n: int) -> None:
    from proxy.posture import App, Posture

    now = int(time.time())
    for i in range(n):
        p = Posture(f"dev{i}", USER, "android", "14", True, (App("com.example.mail"),),
                    now, now + 86400, f"jti-{i}", "bench", "device")
        await store.commit_attestation(p, None, now)


def _settle_heap() -> None:
    """What ``mailward serve`` does once its listeners are up (``settle_heap``: the
    start-up heap frozen, a larger young generation), in trees that have it."""
    import proxy.startup

    settle = getattr(proxy.startup, "settle_heap", None)
    if settle is not None:
        settle()


async def _gate(state: str, seed: int) -> Any:
    """mailward's gate over a seeded SQLite store and an audit log in ``state``."""
    from proxy.audit import AuditLog
    from proxy.config import load_policy
    from proxy.gate import Gate
    from proxy.posture.sqlite import SqlitePostureStore

    store = SqlitePostureStore(Path(state) / "posture.db")
    await _seed(store, seed)
    audit = AuditLog(Path(state) / "audit.jsonl", signing_key=None)
    policy = load_policy(ROOT / "config" / "policy.toml")
    return Gate(store=store, audit=audit, policy=lambda: policy)


def _eas_listener(port: int, upstream_port: int) -> Any:
    from proxy.config import ListenerConfig

    return ListenerConfig(name="eas", protocol="activesync", host="127.0.0.1", port=port,
                          upstream=f"http://127.0.0.1:{upstream_port}", tls="none",
                          upstream_tls="none", nginx_upstream=f"127.0.0.1:{upstream_port}")


def run_mailward(port: int, upstream_port: int, state: str, seed: int) -> None:
    _pin_proxy()
    _uvloop()

    async def main() -> None:
        from proxy.frontends import FrontendContext
        from proxy.frontends.activesync import start

        gate = await _gate(state, seed)
        await start(FrontendContext(_eas_listener(port, upstream_port), gate, None, None))
        _settle_heap()
        await asyncio.Event().wait()

    asyncio.run(main())


#: The shared secret nginx sends mailward's ``[nginx]`` listener in this benchmark.
NGINX_SECRET = "bench-secret-0123456789"


def run_mailward_for_nginx(port: int, upstream_port: int, state: str, seed: int) -> None:
    """mailward's ``[nginx]`` listener (``GET /auth_request``) on ``port``."""
    _pin_proxy()
    _uvloop()

    async def main() -> None:
        from proxy.config import NginxConfig
        from proxy.frontends.activesync.forward import Forwarder
        from proxy.nginx.app import bind, make_app
        from proxy.nginx.certs import CertificateCheck
        from proxy.nginx.eas import EasAuth
        from proxy.nginx.mail import MailAuth

        gate = await _gate(state, seed)
        listener = _eas_listener(0, upstream_port)
        forwarder = Forwarder(listener, None)
        await forwarder.start()
        eas = EasAuth(gate, listener, forwarder, CertificateCheck(None))
        eas.start()  # sweeps the device-sessions
        ng = NginxConfig(port=port)
        app = make_app(ng, NGINX_SECRET, lambda: gate.limits,
                       MailAuth(gate, {}, {}, CertificateCheck(None), "bench"), eas)
        await bind(ng, app, gate.limits)
        _settle_heap()
        await asyncio.Event().wait()

    asyncio.run(main())


def run_check(port: int, state: str, seed: int) -> None:
    """The auth_request service: the posture check on every request."""
    _pin_proxy()
    _uvloop()
    from aiohttp import web

    from proxy.frontends.activesync import basic_user, resolve_user
    from proxy.frontends.eas_query import QueryError, parse_query
    from proxy.policy import Context, evaluate
    from proxy.posture.sqlite import SqlitePostureStore

    async def main() -> None:
        from datetime import UTC, datetime

        from proxy.config import load_policy

        store = SqlitePostureStore(Path(state) / "check.db")
        await _seed(store, seed)
        policy = load_policy(ROOT / "config" / "policy.toml")

        async def check(request: web.Request) -> web.Response:
            uri = request.headers.get("X-Original-URI", "")
            try:
                q = parse_query(uri.partition("?")[2])
            except QueryError:
                return web.Response(status=400)
            user = basic_user(request.headers.get("Authorization"))
            user = resolve_user(user, q.user) if user else None
            if user is None:
                return web.Response(status=401)
            posture = await store.get(q.device_id)
            ctx = Context(datetime.now(UTC), user.lower(), q.device_id, "activesync")
            return web.Response(status=204 if evaluate(posture, policy, ctx).allow else 403)

        app = web.Application()
        app.router.add_get("/check", check)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    asyncio.run(main())


NGINX_CONF = """
worker_processes 1;
worker_cpu_affinity {affinity};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  keepalive_requests 10000000; keepalive_timeout 300s;
  upstream eas {{ server 127.0.0.1:{upstream}; keepalive 128; keepalive_requests 10000000; }}
  upstream check {{ server 127.0.0.1:{check}; keepalive 128; keepalive_requests 10000000; }}
  upstream mailward {{ server 127.0.0.1:{mwauth}; keepalive 128; keepalive_requests 10000000; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_read_timeout 3600s;
  proxy_request_buffering off;
  proxy_buffering off;
  server {{
    listen 127.0.0.1:{plain} backlog=4096;
    location {eas} {{ proxy_pass http://eas; }}
  }}
  server {{
    listen 127.0.0.1:{auth} backlog=4096;
    location {eas} {{ auth_request /_check; proxy_pass http://eas; }}
    location = /_check {{
      internal;
      proxy_pass http://check/check;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header Connection "";
    }}
  }}
  server {{
    listen 127.0.0.1:{viamw} backlog=4096;
    location {eas} {{ auth_request /_mailward; proxy_pass http://eas; }}
    location = /_mailward {{
      internal;
      proxy_pass http://mailward/auth_request;
      proxy_method GET;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Mailward-Secret "{secret}";
      proxy_set_header Connection "";
    }}
  }}
}}
"""


# ------------------------------------------------------------ load generator


class _Client(asyncio.Protocol):
    def __init__(self, requests: list[bytes], stats: dict[str, int], stop: list[bool]) -> None:
        self.requests, self.stats, self.stop = requests, stats, stop
        self.i = 0
        self.buf = b""
        self.peer: tuple[str, int] = ("127.0.0.1", 0)
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self._send()

    def _send(self) -> None:
        self.t.write(self.requests[self.i % len(self.requests)])
        self.i += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.stats["ok" if head.startswith(b"HTTP/1.1 200") else "bad"] += 1
            if self.stop[0]:
                self.t.close()
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stop[0]:
            # The server closed a keep-alive connection (nginx does after
            # keepalive_requests): open another, or this slot would stall for good.
            self.stats["reconnects"] += 1
            asyncio.get_running_loop().create_task(self._reconnect())
        elif not self.closed.done():
            self.closed.set_result(None)

    async def _reconnect(self) -> None:
        self.buf = b""
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, *self.peer)
        except OSError:
            self.stats["bad"] += 1
            if not self.closed.done():
                self.closed.set_result(None)


def run_load(port: int, seconds: float, conns: int, pids: list[int]) -> None:
    _pin_rest()
    _uvloop()

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        stats = {"ok": 0, "bad": 0, "reconnects": 0}
        stop = [False]
        reqs = [_request(f"dev{i}") for i in range(DEVICES)]
        protos = []
        for c in range(conns):
            mine = reqs[c % DEVICES:] + reqs[: c % DEVICES]
            _, p = await loop.create_connection(functools.partial(_Client, mine, stats, stop),
                                                "127.0.0.1", port)
            p.peer = ("127.0.0.1", port)
            protos.append(p)
        await asyncio.sleep(1.0)  # warm-up: first decisions, pools, caches
        start_ok, t0, cpu0 = stats["ok"], time.perf_counter(), _cpu_s(pids)
        await asyncio.sleep(seconds)
        done, elapsed = stats["ok"] - start_ok, time.perf_counter() - t0
        cpu = _cpu_s(pids) - cpu0
        stop[0] = True
        await asyncio.wait([p.closed for p in protos], timeout=5)
        return {"rps": done / elapsed, "bad": stats["bad"], "cpu_s": cpu,
                "reconnects": stats["reconnects"],
                "per_cpu_s": done / cpu if cpu > 0 else 0.0}

    print(json.dumps(asyncio.run(main())))


def run_idle(port: int, count: int, hold_s: float, pids: list[int]) -> None:
    """Park ``count`` Pings (one device each) and report the RSS growth of ``pids``."""
    _pin_rest()
    _uvloop()

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.5)
        before = sum(_rss_kib(p) for p in pids)
        transports = []
        for i in range(count):
            t, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            # devices beyond the request mix, seeded compliant like the others
            t.write(_request(f"dev{DEVICES + i}", "Ping", b"\x03\x01\x6a\x00"))
            transports.append(t)
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.sleep(hold_s)
        after = sum(_rss_kib(p) for p in pids)
        for t in transports:
            t.close()
        return {"kib_per_longpoll": (after - before) / count, "before_kib": before,
                "after_kib": after}

    print(json.dumps(asyncio.run(main())))


# ------------------------------------------------------------------ orchestrator


def _spawn(*args: str, script: str = __file__) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, script, *args], stdin=subprocess.DEVNULL)


def _wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _load(args: argparse.Namespace, port: int, pids: list[int]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "load", str(port), str(args.seconds),
                          str(args.conns), *map(str, pids)],
                         capture_output=True, check=True, text=True)
    return dict(json.loads(out.stdout))


def _idle(args: argparse.Namespace, port: int, pids: list[int]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "idle", str(port), str(args.idle),
                          "2", *map(str, pids)], capture_output=True, check=True, text=True)
    return dict(json.loads(out.stdout))


def orchestrate(args: argparse.Namespace) -> None:
    os.environ["BENCH_PROXY_CPU"] = str(args.proxy_cpu)
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="mailward-bench-"))
    ports = {k: _free_port() for k in ("up", "mw", "check", "plain", "auth", "mwauth",
                                       "viamw")}
    seed = DEVICES + args.idle
    setups: dict[str, tuple[int, list[int]]] = {}  # name -> (port, pids of the set-up)
    try:
        up = _spawn("upstream", str(ports["up"]))
        procs.append(up)
        _wait_port(ports["up"])
        setups["direct"] = (ports["up"], [up.pid])

        (tmp / "mw").mkdir()
        mw = _spawn("mailward", str(ports["mw"]), str(ports["up"]), str(tmp / "mw"), str(seed))
        procs.append(mw)
        _wait_port(ports["mw"], 60)
        setups["mailward"] = (ports["mw"], [mw.pid])
        for name, tree in args.tree:
            port = _free_port()
            (tmp / name).mkdir()
            other = _spawn("mailward", str(port), str(ports["up"]), str(tmp / name), str(seed),
                           script=str(Path(tree) / "bench" / "activesync.py"))
            procs.append(other)
            _wait_port(port, 60)
            setups[name] = (port, [other.pid])

        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if Path(nginx).exists():
            check = _spawn("check", str(ports["check"]), str(tmp), str(seed))
            procs.append(check)
            (tmp / "mwauth").mkdir()
            mwauth = _spawn("mailward-nginx", str(ports["mwauth"]), str(ports["up"]),
                            str(tmp / "mwauth"), str(seed))
            procs.append(mwauth)
            conf = tmp / "nginx.conf"
            affinity = "1" + "0" * args.proxy_cpu  # worker_cpu_affinity bit mask
            conf.write_text(NGINX_CONF.format(dir=tmp, upstream=ports["up"],
                                              check=ports["check"], plain=ports["plain"],
                                              auth=ports["auth"], mwauth=ports["mwauth"],
                                              viamw=ports["viamw"], secret=NGINX_SECRET,
                                              eas=EAS, affinity=affinity))
            ng = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)],
                                  stdin=subprocess.DEVNULL)
            procs.append(ng)
            _wait_port(ports["plain"])
            _wait_port(ports["check"], 60)
            _wait_port(ports["mwauth"], 60)
            time.sleep(0.3)
            workers = [int(p) for p in subprocess.run(
                ["pgrep", "-P", str(ng.pid)], capture_output=True, text=True
            ).stdout.split()]
            setups["nginx"] = (ports["plain"], workers)
            setups["nginx+auth"] = (ports["auth"], [*workers, check.pid])
            setups["nginx+mailward"] = (ports["viamw"], [*workers, mwauth.pid])
        else:
            print("nginx not found: skipping the nginx set-ups", file=sys.stderr)

        if args.only:
            setups = {k: v for k, v in setups.items() if k in args.only}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        names = list(setups)
        for r in range(args.reps):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                res = _load(args, *setups[name])
                runs[name].append(res)
                print(f"round {r + 1}/{args.reps} {name:<14} {res['rps']:>9.0f} req/s "
                      f"{res['per_cpu_s']:>9.0f} req/CPU-s  errors {int(res['bad'])}  "
                      f"reconnects {res['reconnects']}",
                      file=sys.stderr)
        results = {name: {
            "rps": statistics.median(x["rps"] for x in rs),
            "rps_min": min(x["rps"] for x in rs), "rps_max": max(x["rps"] for x in rs),
            "per_cpu_s": statistics.median(x["per_cpu_s"] for x in rs),
            "cpu_min": min(x["per_cpu_s"] for x in rs), "cpu_max": max(x["per_cpu_s"] for x in rs),
            "bad": sum(x["bad"] for x in rs),
        } for name, rs in runs.items()}
        for name in setups:
            results[name].update(_idle(args, *setups[name]))
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    _report(results, args)


def _report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(f"\nActiveSync, small Sync requests, {args.conns} keep-alive connections, "
          f"{args.seconds:g} s per run after 1 s warm-up, median of {args.reps} interleaved "
          f"rounds, {DEVICES} devices; {args.idle} idle Pings (plain HTTP on loopback; "
          f"{os.cpu_count()} CPUs, each proxy set-up pinned to CPU {args.proxy_cpu})")
    print(f"{'set-up':<15} {'req/s':>9} {'(min-max)':>15} {'req/CPU-s':>10} {'(min-max)':>15} "
          f"{'errors':>7} {'KiB/idle long-poll':>19}")
    for name, r in results.items():
        span = f"{r['rps_min']:.0f}-{r['rps_max']:.0f}"
        cpu_span = f"{r['cpu_min']:.0f}-{r['cpu_max']:.0f}"
        print(f"{name:<15} {r['rps']:>9.0f} {span:>15} {r['per_cpu_s']:>10.0f} {cpu_span:>15} "
              f"{int(r['bad']):>7} {r['kib_per_longpoll']:>19.1f}")
    mw = results.get("mailward")
    if mw:
        print()
        for other in ("direct", "nginx", "nginx+auth", "nginx+mailward"):
            if other in results:
                o = results[other]
                rps_ratio = mw["rps"] / max(o["rps"], 1e-9)
                cpu_ratio = mw["per_cpu_s"] / max(o["per_cpu_s"], 1e-9)
                mem_ratio = mw["kib_per_longpoll"] / max(o["kib_per_longpoll"], 0.01)
                print(f"mailward / {other:<14} req/s {rps_ratio:.2f}x   req/CPU-s "
                      f"{cpu_ratio:.2f}x   memory per idle long-poll {mem_ratio:.2f}x")
        auth = results.get("nginx+auth")
        vs_auth = (f"{mw['rps'] / max(auth['rps'], 1e-9):.2f}x req/s, "
                   f"{mw['per_cpu_s'] / max(auth['per_cpu_s'], 1e-9):.2f}x req/CPU-s"
                   if auth else "n/a")
        print(f"\ntargets: >= 1.0x nginx+auth -> {vs_auth}; >= 5000 req/s per core -> "
              f"{mw['rps']:.0f} req/s, {mw['per_cpu_s']:.0f} req/CPU-s; <= 32 KiB per idle "
              f"long-poll -> {mw['kib_per_longpoll']:.1f} KiB")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("upstream", "mailward", "mailward-nginx",
                                             "check", "load", "idle"):
        role, rest = sys.argv[1], sys.argv[2:]
        if role == "upstream":
            run_upstream(int(rest[0]))
        elif role == "mailward":
            run_mailward(int(rest[0]), int(rest[1]), rest[2], int(rest[3]))
        elif role == "mailward-nginx":
            run_mailward_for_nginx(int(rest[0]), int(rest[1]), rest[2], int(rest[3]))
        elif role == "check":
            run_check(int(rest[0]), rest[1], int(rest[2]))
        elif role == "load":
            run_load(int(rest[0]), float(rest[1]), int(rest[2]), [int(p) for p in rest[3:]])
        else:
            run_idle(int(rest[0]), int(rest[1]), float(rest[2]), [int(p) for p in rest[3:]])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (median shown)")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--proxy-cpu", type=int, default=(os.cpu_count() or 1) - 1,
                    help="the one CPU every proxy set-up runs on")
    ap.add_argument("--idle", type=int, default=500)
    ap.add_argument("--tree", type=_tree, action="append", default=[], metavar="NAME=DIR",
                    help="also measure mailward from another source tree")
    ap.add_argument("--only", type=lambda v: set(v.split(",")), default=None,
                    metavar="NAME,...", help="measure only these set-ups")
    orchestrate(ap.parse_args())


def _tree(value: str) -> tuple[str, str]:
    name, sep, tree = value.partition("=")
    if not sep or not (Path(tree) / "bench" / "activesync.py").is_file():
        raise argparse.ArgumentTypeError("NAME=DIR, DIR a source tree with bench/activesync.py")
    return name, tree


if __name__ == "__main__":
    main()
