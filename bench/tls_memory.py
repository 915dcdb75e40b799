"""Memory per idle HTTPS keep-alive connection: aiohttp on the event loop's own TLS
transport (``web.TCPSite`` with an SSL context, uvloop's ``SSLProtocol``) against
aiohttp on ``proxy.net.socket_transport`` (how the ActiveSync listener serves HTTPS).

Run by ``make bench``:

    .venv/bin/python bench/tls_memory.py [--connections 1000]

For each server (a child process, uvloop), this process opens a warm-up batch of
keep-alive connections, then ``--connections`` more, each making one small request
and staying open: the server's RSS growth over that batch, per connection, is the idle
figure. Then every connection of the batch fetches a 1 MiB response, streamed in
64 KiB writes as the ActiveSync proxy streams upstream bodies, and stays open: the
further growth per connection is what a connection keeps after a burst (an EAS Sync
with attachments, then a long-poll). ``malloc_trim`` runs before each reading so
freed heap is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import resource
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BURST_BYTES = 1024 * 1024
CHUNK_BYTES = 64 * 1024
CONCURRENCY = 32


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


async def serve(kind: str, certs: Path) -> None:
    """Child: an aiohttp server on ``kind`` ("loop" or "socket_transport"); prints its
    port, then its RSS (after malloc_trim) for each line read on stdin."""
    from aiohttp import web

    from proxy.frontends.activesync import serve_https
    from proxy.net.tls import server_context

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path != "/burst":
            return web.Response(text="ok")
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"x" * CHUNK_BYTES
        for _ in range(BURST_BYTES // CHUNK_BYTES):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    tls = server_context(certs / "server.pem", certs / "server.key", client_ca=None,
                         client_cert="none")
    if kind == "socket_transport":
        port = serve_https(server, tls, "127.0.0.1", 0).port
    else:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(port, flush=True)
    libc = ctypes.CDLL("libc.so.6")
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        gc.collect()
        libc.malloc_trim(0)
        print(_rss_bytes(), flush=True)


async def measure(kind: str, certs: Path, n: int) -> tuple[float, float]:
    """(KiB per idle connection, KiB more per connection after a burst)."""
    import aiohttp

    child = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(certs)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    port = int(child.stdout.readline())

    def rss() -> int:
        child.stdin.write("\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        return int(child.stdout.readline())  # type: ignore[union-attr]

    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    sem = asyncio.Semaphore(CONCURRENCY)
    sessions: list[aiohttp.ClientSession] = []

    async def get(session: aiohttp.ClientSession, path: str) -> None:
        async with sem, session.get(f"https://localhost:{port}{path}") as r:
            await r.read()

    async def open_batch(count: int) -> list[aiohttp.ClientSession]:
        batch = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1))
                 for _ in range(count)]
        sessions.extend(batch)
        await asyncio.gather(*(get(s, "/") for s in batch))
        return batch

    try:
        await open_batch(max(100, n // 5))  # warm-up: first handshakes, caches
        await asyncio.sleep(0.5)
        base = rss()
        batch = await open_batch(n)
        await asyncio.sleep(0.5)
        idle = rss()
        await asyncio.gather(*(get(s, "/burst") for s in batch))
        await asyncio.sleep(0.5)
        after = rss()
        return (idle - base) / n / 1024, (after - idle) / n / 1024
    finally:
        for s in sessions:
            await s.close()
        child.kill()
        child.wait()


async def main(args: argparse.Namespace) -> None:
    from proxy.pki import certs_init

    certs = Path(tempfile.mkdtemp(prefix="mailward-tls-memory-"))
    certs_init(certs)
    results = {kind: await measure(kind, certs, args.connections)
               for kind in ("loop", "socket_transport")}
    print(f"HTTPS keep-alive connections, {args.connections} per server, uvloop:")
    for kind, (idle, burst) in results.items():
        print(f"  aiohttp on {kind + ' TLS transport':<33} {idle:6.1f} KiB idle, "
              f"{burst:+7.1f} KiB kept after a streamed {BURST_BYTES >> 20} MiB response")
    loop_idle, loop_burst = results["loop"]
    ours_idle, ours_burst = results["socket_transport"]
    print(f"ratio socket_transport / loop: idle {ours_idle / loop_idle:.2f}; after a burst "
          f"{(ours_idle + ours_burst) / (loop_idle + loop_burst):.2f}")


if __name__ == "__main__":
    import uvloop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.install()
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        asyncio.run(serve(sys.argv[2], Path(sys.argv[3])))
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--connections", type=int, default=1000)
        asyncio.run(main(ap.parse_args()))
