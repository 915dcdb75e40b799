"""RSS of a running ``mailward serve`` before, during and after a burst of idle TLS
connections (issue 13: "RSS went from 68 to 121 MB and stayed there").

    .venv/bin/python bench/burst_memory.py [--connections 2000] [--rounds 2]

The "before" reading follows a warm-up of ``--warmup`` connections, so first-use
allocations (lazy imports, thread pools) are not counted as kept by the burst.
Builds a throw-away deployment (``mailward certs init``, one implicit-TLS IMAP
listener whose upstream is never contacted: the clients never log in), starts
``mailward serve`` and reads its RSS from ``/proc``. Each round opens
``--connections`` TLS connections from this process (at most ``--concurrency``
handshakes at a time), waits for each greeting, holds them all, then closes them and
waits ``--settle`` seconds (the server's upkeep returns freed pages with
``malloc_trim`` once the count has dropped). Prints one line per reading and the
difference between the last "after" and the "before" figure (goal: within 20 MB).
Not a timed test: run by hand or by ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAILWARD = Path(sys.executable).with_name("mailward")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def deployment(root: Path, imap: int, api: int) -> Path:
    (root / "config").mkdir()
    shutil.copy(ROOT / "config" / "policy.toml", root / "config" / "policy.toml")
    subprocess.run([str(MAILWARD), "certs", "init", "--dir", str(root / "certs")],
                   check=True, capture_output=True)
    cfg = root / "config" / "mailward.toml"
    cfg.write_text(f"""\
[server]
state_dir = "state"
policy = "config/policy.toml"
shutdown_grace = "1s"

[api]
listen = "127.0.0.1:{api}"
tls = false

[[listeners]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:{imap}"
tls = "implicit"
upstream = "127.0.0.1:{free_port()}"
upstream_tls = "none"
""")
    return cfg


async def one(port: int, ctx: ssl.SSLContext, gate: asyncio.Semaphore,
              held: list[asyncio.StreamWriter]) -> bool:
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx), 20)
            greeting = await asyncio.wait_for(reader.readline(), 20)
        except (OSError, TimeoutError, ssl.SSLError):
            return False
    held.append(writer)
    return greeting.startswith(b"* OK")


async def burst(port: int, n: int, concurrency: int, pid: int, hold_s: float) -> tuple[int, float]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    gate = asyncio.Semaphore(concurrency)
    held: list[asyncio.StreamWriter] = []
    results = await asyncio.gather(*(one(port, ctx, gate, held) for _ in range(n)))
    await asyncio.sleep(hold_s)
    peak = rss_mb(pid)
    for w in held:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in held), return_exceptions=True)
    return sum(results), peak


def wait_ready(api: int, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("mailward serve exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("mailward serve not ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hold", type=float, default=3.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--warmup", type=int, default=100,
                    help="connections opened and closed before the 'before' reading "
                    "(first-use allocations: lazy imports, thread pools, caches)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        imap, api = free_port(), free_port()
        cfg = deployment(Path(tmp), imap, api)
        with (Path(tmp) / "serve.log").open("wb") as log:
            proc = subprocess.Popen([str(MAILWARD), "serve", "--config", str(cfg)],
                                    stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            wait_ready(api, proc)
            time.sleep(1)
            print(f"started: {rss_mb(proc.pid):.1f} MB")
            if args.warmup:
                asyncio.run(burst(imap, args.warmup, args.concurrency, proc.pid, 0.5))
                time.sleep(args.settle)
            before = rss_mb(proc.pid)
            print(f"before (after {args.warmup} warm-up connections): {before:.1f} MB")
            after = before
            for r in range(1, args.rounds + 1):
                greeted, peak = asyncio.run(burst(imap, args.connections, args.concurrency,
                                                  proc.pid, args.hold))
                time.sleep(args.settle)
                after = rss_mb(proc.pid)
                print(f"round {r}: {greeted}/{args.connections} greeted, "
                      f"peak {peak:.1f} MB, after {after:.1f} MB")
            print(f"after - before: {after - before:+.1f} MB (goal: within 20 MB)")
        finally:
            proc.terminate()
            proc.wait(15)
            if os.environ.get("BENCH_SHOW_LOG"):
                print((Path(tmp) / "serve.log").read_text()[-3000:])
    return 0 if after - before <= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
