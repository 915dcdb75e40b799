"""Scale-out benchmark: what the Redis store costs per decision, and what a second
instance behind the load balancer gives, on this machine.

    .venv/bin/python bench/scale.py [--seconds 5] [--devices 40] [--concurrency 16]

A decision is one IMAP login: the client connects with TLS and its device
certificate, sends LOGIN and LOGOUT; nginx ``stream`` passes the connection with the
PROXY protocol to a ``mailward serve`` (a subprocess, started by deploy/scale/scale.py
as operators start it), which decides and logs in to the project's embedded upstream
(:mod:`proxy.demo.upstream`, in its own process, as bench/load.py runs it). Every
device's posture is reported through the API first and every device logs in once
before measuring (bindings written, scripts loaded, caches warm).

Phases, each ``--seconds`` long, ``--concurrency`` clients logging in back to back:

1. one instance on the SQLite store (through nginx, pinned to it);
2. one instance on Redis (the same; the second instance is up and idle);
3. two instances on Redis behind nginx's round-robin upstream;

then, on that Redis site, ActiveSync: the Redis round trips of 50 Sync requests of one
device-session whose first request (FolderSync) made the decision.

Printed: decisions per second; CPU per decision of the mailward process(es) (user +
system from ``/proc/<pid>/stat``), and of ``redis-server``; the Redis/SQLite ratio;
the two/one instance ratio of decisions per second (on 2 cores shared by the clients,
nginx, the upstream, Redis and the instances this shows the overhead of the
balancing, not linear scaling); Redis round trips per decision, counted by Redis
itself (``MONITOR``: commands received from clients, named by script for EVALSHA;
what a script runs inside Redis is not a round trip) in a second window as long
(MONITOR slows Redis, so not while timing); the instances' background (change-feed
and policy polls, health pings) and the set-up commands of new pooled connections
(HELLO, once per connection) are shown apart.

Checks (exit status 1): every login succeeded, and each instance's audit log holds
exactly one allow ``decision`` record per login it served.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import http.client
import importlib.util
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

HOST = "127.0.0.1"
POLICY = """\
version = "bench-scale"
mode = "enforce"
platforms = ["android", "ios"]
max_posture_age = "24h"

[[prohibited]]
name = "TikTok"
ids = ["com.zhiliaoapp.musically"]
reason = "TikTok reads the clipboard."
remediation = "Uninstall TikTok to restore company mail."
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


scale = _load("deploy_scale", ROOT / "deploy/scale/scale.py")


@dataclass
class Device:
    id: str
    user: str
    password: str
    ctx: ssl.SSLContext
    report: bytes


def make_devices(root: Path, n: int) -> list[Device]:
    """``certs init``, one enrolled device certificate and a signed report each."""
    from proxy.pki import (
        certs_init,
        enroll_device,
        load_certs,
        load_private_key,
        make_claims,
        sign_report,
    )

    certs = root / "certs"
    certs_init(certs)
    out = []
    for i in range(n):
        dev, user = f"phone-{i:03d}", f"user{i:03d}@corp.example"
        key, cert = enroll_device(device_ca_cert=certs / "device-ca.pem",
                                  device_ca_key=certs / "offline/device-ca.key",
                                  device_id=dev, user=user, out_dir=certs / "devices" / dev)
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.load_cert_chain(cert, key)
        claims = make_claims(device_id=dev, user=user, platform="android",
                             apps=["com.microsoft.office.outlook"])
        report = sign_report(claims, load_private_key(key), load_certs(cert)).encode()
        out.append(Device(dev, user, f"pw-{i}", ctx, report))
    (root / "users.json").write_text(json.dumps({d.user: d.password for d in out}))
    return out


def start_upstream(root: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """The embedded upstream in its own process (bench/load.py's upstream role)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench/load.py"), "--role-upstream",
                             str(root)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the upstream did not start")
    return proc, dict(json.loads(line))


@dataclass
class Site:
    """Instances (``a``, maybe ``b``) of one store behind one nginx."""

    root: Path
    layout: Any
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nginx: subprocess.Popen[bytes] | None = None

    def api(self, name: str, path: str, body: bytes | None = None) -> int:
        req = urllib.request.Request(
            f"https://{HOST}:{self.layout.ports[name + '_api']}{path}", data=body,
            headers={"Content-Type": "application/jose"} if body else {})
        ctx = ssl.create_default_context(cafile=str(self.root / "certs/ca.pem"))
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def decisions(self, name: str) -> int:
        """Allow decision records of IMAP logins in the instance's audit log."""
        n = 0
        with open(self.root / f"state-{name}/audit.jsonl", "rb") as f:
            for line in f:
                if b'"event":"decision"' in line.replace(b" ", b""):
                    r = json.loads(line)
                    n += r.get("decision") == "allow" and r.get("protocol") == "imap"
        return n

    def stop(self) -> None:
        for proc in [self.nginx, *self.procs.values()]:
            if proc is not None:
                scale.stop(proc)


def start_site(root: Path, store: str, up: dict[str, int], names: tuple[str, ...],
               eas: bool = False) -> Site:
    root.mkdir(parents=True)
    (root / "certs").symlink_to(root.parent / "certs")
    layout = scale.write_configs(root, store, f"{HOST}:{up['imap']}", "certs/ca.pem", POLICY,
                                 f"https://{HOST}:{up['eas']}" if eas else "")
    if store.startswith("sqlite:"):  # the same config, minus the Redis cache's setting
        for n in names:
            cfg = layout.config(n)
            cfg.write_text(cfg.read_text().replace('cache_max_age = "5m"\n', ""))
    site = Site(root, layout)
    site.procs = {n: scale.start_instance(layout, n) for n in names}
    deadline = time.monotonic() + 60
    for n in names:
        while site.api(n, "/readyz") != 200:
            if time.monotonic() > deadline or site.procs[n].poll() is not None:
                site.stop()
                log = (root / f"serve-{n}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"instance {n} did not get ready:\n{log}")
            time.sleep(0.1)
    site.nginx = scale.start_nginx(layout)  # once the instances listen (max_fails)
    return site


async def login(port: int, d: Device) -> bool:
    r, w = await asyncio.open_connection(HOST, port, ssl=d.ctx)
    try:
        await r.readline()
        w.write(f"a1 LOGIN {d.user} {d.password}\r\na2 LOGOUT\r\n".encode())
        ok = False
        while line := await r.readline():
            ok = ok or line.startswith(b"a1 OK")
            if line.startswith(b"a2 "):
                break
        return ok
    finally:
        w.close()


async def hammer(port: int, devices: list[Device], seconds: float,
                 concurrency: int) -> tuple[int, int, float]:
    """Logins back to back from ``concurrency`` clients for ``seconds``: (ok, failed,
    elapsed)."""
    counts = [0, 0]
    started = time.monotonic()
    stop_at = started + seconds

    async def client(k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            try:
                counts[0 if await login(port, devices[i % len(devices)]) else 1] += 1
            except (OSError, ssl.SSLError):
                counts[1] += 1
            i += concurrency

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return counts[0], counts[1], time.monotonic() - started


def cpu_s(proc: subprocess.Popen[bytes] | int) -> float:
    pid = proc if isinstance(proc, int) else proc.pid
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


#: Commands the instances send whatever the load (not per decision): change-feed
#: and policy-pointer polls, health pings.
BACKGROUND = ("changes", "policy_stamp", "PING")
#: A new pooled connection's first commands (once per connection, not per decision).
CONNECTION_SETUP = ("HELLO", "AUTH", "SELECT", "CLIENT")


class RoundTrips(threading.Thread):
    """Every command Redis receives from a client while running (``MONITOR``; a
    script's own commands inside Redis are not round trips and are not counted),
    named by script for EVALSHA."""

    STOP = "mailward-bench-stop"

    def __init__(self, redis: Any) -> None:
        super().__init__(daemon=True)
        from proxy.posture.redis_scripts import SCRIPTS

        self.redis = redis
        self.names = {hashlib.sha1(t.encode()).hexdigest(): n for n, t in SCRIPTS.items()}
        self.seen: collections.Counter[str] = collections.Counter()
        self._ready = threading.Event()
        self._stopper = redis.client()
        self._stopper.ping()  # connected before MONITOR starts: its set-up is not counted

    def run(self) -> None:
        with self.redis.client() as c, c.monitor() as m:
            self._ready.set()
            for cmd in m.listen():
                words = cmd["command"].split()
                if cmd["client_type"] == "lua" or not words:
                    continue
                if words[0] == "ECHO" and words[1:] == [self.STOP]:
                    return
                name = words[0].upper()
                self.seen[self.names.get(words[1], "?") if name == "EVALSHA" else name] += 1

    def __enter__(self) -> RoundTrips:
        self.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopper.echo(self.STOP)
        self._stopper.close()
        self.join(10)

    def per_decision(self, decisions: int) -> dict[str, float]:
        return {k: v / max(decisions, 1) for k, v in sorted(self.seen.items())
                if k not in BACKGROUND + CONNECTION_SETUP}


@dataclass
class Phase:
    name: str
    ok: int
    failed: int
    elapsed: float
    cpu_ms: float  # mailward, per decision
    redis_cpu_ms: float = 0.0
    #: Redis round trips per decision by script or command (the background left out),
    #: and the background per second.
    round_trips: dict[str, float] = field(default_factory=dict)
    background_per_s: float = 0.0
    counted: int = 0  # logins in the round-trip counting window
    new_connections: int = 0  # set-up commands of connections opened meanwhile

    @property
    def logins(self) -> int:
        return self.ok + self.counted

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed


def run_phase(name: str, site: Site, port_key: str, devices: list[Device],
              args: argparse.Namespace, redis: Any = None) -> Phase:
    """Time one phase; with Redis, then count its round trips in a second window as
    long (MONITOR slows Redis down, so not while timing)."""
    port = site.layout.ports[port_key]
    rcpu0 = cpu_s(redis.proc) if redis is not None else 0.0
    cpu0 = sum(cpu_s(p) for p in site.procs.values())
    ok, failed, elapsed = asyncio.run(hammer(port, devices, args.seconds, args.concurrency))
    cpu = sum(cpu_s(p) for p in site.procs.values()) - cpu0
    phase = Phase(name, ok, failed, elapsed, cpu * 1000 / max(ok, 1))
    if redis is None:
        return phase
    phase.redis_cpu_ms = (cpu_s(redis.proc) - rcpu0) * 1000 / max(ok, 1)
    with RoundTrips(redis) as seen:
        counted, more_failed, counted_s = asyncio.run(
            hammer(port, devices, args.seconds, args.concurrency))
    phase.failed, phase.counted = phase.failed + more_failed, counted
    phase.round_trips = seen.per_decision(counted)
    phase.background_per_s = sum(seen.seen[k] for k in BACKGROUND) / counted_s
    phase.new_connections = sum(seen.seen[k] for k in CONNECTION_SETUP)
    return phase


def warm(site: Site, devices: list[Device], port_key: str, rounds: int = 1) -> None:
    """Report every device's posture (instance a), then log each in ``rounds`` times."""
    for d in devices:
        status = site.api("a", "/v1/attestations", d.report)
        if status != 201:
            raise RuntimeError(f"report of {d.id} answered {status}")

    async def all_once() -> None:
        for _ in range(rounds):
            results = await asyncio.gather(*(login(site.layout.ports[port_key], d)
                                             for d in devices))
            if not all(results):
                raise RuntimeError("a warm-up login was refused")

    asyncio.run(all_once())


def sqlite_phase(work: Path, up: dict[str, int], devices: list[Device], args: argparse.Namespace,
                 served: dict[str, int]) -> Phase:
    site = start_site(work / "sqlite", "sqlite:///state-a/posture.db", up, ("a",))
    try:
        warm(site, devices, "pin_a")
        phase = run_phase("one instance, SQLite", site, "pin_a", devices, args)
        served["sqlite a"] = phase.logins + len(devices)
        served["sqlite a audit"] = site.decisions("a")
        return phase
    finally:
        site.stop()


def redis_phases(work: Path, up: dict[str, int], devices: list[Device],
                 args: argparse.Namespace, served: dict[str, int]) -> tuple[Phase, Phase, float]:
    from peers.redis import RedisServer

    redis = RedisServer(work / "redis").start()
    site = None
    try:
        site = start_site(work / "redis-site", redis.url, up, scale.INSTANCES, eas=True)
        warm(site, devices, "lb", rounds=2)  # round-robin: each instance sees each device
        one = run_phase("one instance, Redis", site, "pin_a", devices, args, redis)
        two = run_phase("two instances, Redis", site, "lb", devices, args, redis)
        served["redis a+b"] = one.logins + two.logins + 2 * len(devices)
        served["redis a+b audit"] = site.decisions("a") + site.decisions("b")
        return one, two, eas_round_trips(site, redis, devices[0], EAS_REQUESTS)
    finally:
        if site is not None:
            site.stop()
        redis.stop()


#: ActiveSync requests counted in one device-session after the one that decided.
EAS_REQUESTS = 50


def eas_round_trips(site: Site, redis: Any, d: Device, requests: int) -> float:
    """Redis round trips per ActiveSync request of a device-session that is already
    decided (its first request decided), through nginx to instance a."""
    ctx = ssl.create_default_context(cafile=str(site.root / "certs/ca.pem"))
    conn = http.client.HTTPSConnection(HOST, site.layout.ports["pin_a_eas"], context=ctx,
                                       timeout=10)
    auth = base64.b64encode(f"{d.user}:{d.password}".encode()).decode()

    def post(cmd: str) -> None:
        conn.request("POST", f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User={d.user}"
                     f"&DeviceId={d.id}&DeviceType=Phone", body=b"\x03\x01\x6a\x00",
                     headers={"Authorization": f"Basic {auth}", "MS-ASProtocolVersion": "14.1",
                              "Content-Type": "application/vnd.ms-sync.wbxml"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"ActiveSync {cmd} answered {resp.status}")

    try:
        post("FolderSync")  # the device-session's decision
        with RoundTrips(redis) as seen:
            for _ in range(requests):
                post("Sync")
    finally:
        conn.close()
    return sum(seen.per_decision(requests).values())


def report(sq: Phase, one: Phase, two: Phase, eas: float, args: argparse.Namespace) -> None:
    print(f"decision = one IMAP login (TLS with a device certificate, LOGIN, LOGOUT) through "
          f"nginx stream + PROXY protocol; {args.devices} devices, {args.concurrency} "
          f"clients, {args.seconds:g} s per phase; {os.cpu_count()} CPUs")
    for p in (sq, one, two):
        print(f"{p.name + ':':<24} {p.rate:8,.0f} decisions/s   CPU per decision "
              f"{p.cpu_ms:.3f} ms (mailward)")
        if p.round_trips:
            print(f"{p.name + ':':<24} redis-server CPU per decision {p.redis_cpu_ms:.3f} ms")
    print(f"ratio CPU per decision Redis/SQLite, one instance: {one.cpu_ms / sq.cpu_ms:.2f}x")
    print(f"ratio decisions/s two/one instances: {two.rate / one.rate:.2f}x")
    print("  (the clients, nginx, the upstream, Redis and the instances share this machine's "
          "CPUs: this shows the cost of balancing, not linear scaling)")
    for p in (one, two):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in p.round_trips.items())
        print(f"Redis round trips per decision, {p.name}: {sum(p.round_trips.values()):.2f}")
        print(f"Redis round trips per decision by script, {p.name}: {parts}")
        print(f"Redis connection set-up commands (HELLO) per decision, {p.name}: "
              f"{p.new_connections / max(p.counted, 1):.3f}")
    print(f"Redis commands per second of the instances' polls and pings, left out above: "
          f"{two.background_per_s:.1f}")
    print(f"ActiveSync, Redis round trips per request of a live device-session: {eas:.2f} "
          f"(Sync requests counted: {EAS_REQUESTS})")
    print("  (goal: at most 1 round trip on the hot path, the script reading the posture, "
          "once per device-session)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--devices", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--keep", type=Path, help="work in this (new) directory and keep it")
    args = ap.parse_args(argv)
    from peers.redis import require_redis

    require_redis()
    with tempfile.TemporaryDirectory(prefix="mw-bench-scale-") as tmp:
        work = Path(tmp)
        if args.keep:
            work = args.keep.resolve()
            work.mkdir(parents=True)
        devices = make_devices(work, args.devices)
        upstream, up = start_upstream(work)
        served: dict[str, int] = {}
        try:
            sq = sqlite_phase(work, up, devices, args, served)
            one, two, eas = redis_phases(work, up, devices, args, served)
        finally:
            upstream.kill()
            upstream.wait()
    report(sq, one, two, eas, args)
    failed = sq.failed + one.failed + two.failed
    audit_ok = (served["sqlite a"] == served["sqlite a audit"]
                and served["redis a+b"] == served["redis a+b audit"])
    print(f"failed logins: {failed}; audit decision records match the logins: "
          f"{'yes' if audit_ok else 'NO ' + json.dumps(served)}")
    return 0 if failed == 0 and audit_ok else 1


if __name__ == "__main__":
    sys.exit(main())
