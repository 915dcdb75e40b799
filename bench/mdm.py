"""Benchmark of an Intune sync pass: 10,000 devices x 150 apps from the fake Graph.

The fake (tests/mdm_fakes.py) runs in a child process, so the figures are the
connector's: listing pages of 1,000 devices, one ``detectedApps`` request per device
(two pages of apps each), 10,000 postures stored a page per transaction in a real
SQLite store and attested through a real gate (its ``attestation`` records go to an
in-memory sink that serialises them). Device check-ins are spread over 8 hours, as
in a fleet whose phones sync a few times a day.

Prints the full sync's time and the process's peak RSS, then the time of an
incremental pass after 100 devices changed (it also re-reads the devices that
checked in within the overlap window). Targets: full < 30 s, peak RSS < 300 MB,
incremental < 1 s.

    .venv/bin/python bench/mdm.py [--devices N] [--apps N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mdm_fakes import FakeDevice, FakeMdm

from proxy.config.mdm import MdmConfig
from proxy.gate import Gate, NullObserver
from proxy.mdm.http import MdmHttp
from proxy.mdm.sync import MdmSync, open_connector
from proxy.policy import Policy, ProhibitedApp
from proxy.posture.sqlite import SqlitePostureStore

CHECKIN_SPREAD_S = 8 * 3600


def serve_fake(devices: int, apps: int, conn: Any) -> None:
    """The child process: the fake Graph with ``devices`` devices, and a control
    route that makes ``n`` devices install an app."""
    from aiohttp import web

    async def main() -> None:
        fake = FakeMdm()
        catalogue = [(f"com.example.app{i}", f"Example App {i}", f"{i}.0") for i in range(apps)]
        start = time.time() - CHECKIN_SPREAD_S - 600
        for i in range(devices):
            fake.add(FakeDevice(id=f"dev-{i:05d}", user=f"user{i}@corp.example",
                                eas_id=f"EAS{i:05d}", serial=f"SN{i:05d}", apps=catalogue,
                                last_sync=start + i * CHECKIN_SPREAD_S / devices))
        app = fake.app()

        async def touch(request: web.Request) -> web.Response:
            n = int(request.query["n"])
            for d in list(fake.devices.values())[:n]:
                d.apps = [*catalogue, ("com.zhiliaoapp.musically", "TikTok", "35.1")]
                d.touch()
            return web.json_response({"touched": n})

        app.router.add_post("/_bench/touch", touch)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


class Sink:
    def __init__(self) -> None:
        self.records = 0

    async def write(self, fields: dict[str, Any]) -> dict[str, Any]:
        json.dumps(fields, sort_keys=True)
        self.records += 1
        return fields


async def run(base: str, state: Path) -> dict[str, float]:
    (state / "intune.secret").write_text("s3cret")
    cfg = MdmConfig(name="intune", kind="intune", secret_file=state / "intune.secret",
                    tenant="corp.example", client_id="bench", base_url=f"{base}/v1.0",
                    token_url=f"{base}/corp.example/oauth2/v2.0/token", concurrency=16)
    policy = Policy(version="bench", sha256="0" * 64, prohibited=(
        ProhibitedApp("TikTok", ("com.zhiliaoapp.musically",), "r", "Uninstall it.",
                      names=("TikTok*",)),))
    store = SqlitePostureStore(state / "posture.db")
    sink = Sink()
    gate = Gate(store=store, audit=sink, policy=lambda: policy, observer=NullObserver())
    http = MdmHttp("intune", timeout_s=60)
    sync = MdmSync(cfg, open_connector(cfg, http), store=store, gate=gate, audit=sink)
    try:
        started = time.perf_counter()
        full = await sync.run_once()
        full_s = time.perf_counter() - started
        assert full.ok, full.error
        usage = resource.getrusage(resource.RUSAGE_SELF)
        rss_mb, cpu_s = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
        await http.request_json("POST", f"{base}/_bench/touch", params={"n": "100"})
        started = time.perf_counter()
        inc = await sync.run_once()
        inc_s = time.perf_counter() - started
        assert inc.ok and inc.changed == 100 and inc.newly_noncompliant == 100, inc
    finally:
        await http.close()
        await store.close()
    return {"devices": full.seen, "full_s": full_s, "rss_mb": rss_mb, "cpu_s": cpu_s,
            "incremental_s": inc_s, "incremental_seen": inc.seen, "records": sink.records}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--apps", type=int, default=150)
    args = ap.parse_args()
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=serve_fake, args=(args.devices, args.apps, child), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        with tempfile.TemporaryDirectory() as tmp:
            r = asyncio.run(run(f"http://127.0.0.1:{port}", Path(tmp)))
    finally:
        proc.terminate()
        proc.join(5)
    ok = r["full_s"] < 30 and r["rss_mb"] < 300 and r["incremental_s"] < 1
    print(f"full sync: {r['devices']:.0f} devices x {args.apps} apps in {r['full_s']:.1f} s "
          f"({r['devices'] / r['full_s']:.0f} devices/s; target < 30 s); CPU of the syncing "
          f"process {r['cpu_s']:.1f} s (the fake Graph runs in another process)")
    print(f"peak RSS: {r['rss_mb']:.0f} MB (target < 300 MB)")
    print(f"incremental sync: 100 changed ({r['incremental_seen']:.0f} listed) in "
          f"{r['incremental_s'] * 1000:.0f} ms (target < 1 s)")
    print("ok" if ok else "MISSED a target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
