"""Python and C calls per ActiveSync request, counted with ``sys.setprofile``: a
deterministic companion to ``bench/activesync.py`` (whose req/CPU-s moves with the load
on the machine; these counts do not).

Run: ``.venv/bin/python bench/activesync_calls.py [--requests 2000] [--conns 1]
[--rounds 1] [--top 0] [--tree NAME=DIR ...]``. Each source tree (this one as
``mailward``, and every ``--tree``: ``git archive REV | tar -x -C DIR``) is measured in
its own process, in which mailward is started by that tree's own
``bench/activesync.py`` (its ``run_mailward``, on uvloop, as the benchmark runs it)
beside an in-process upstream answering every request at once and ``--conns`` clients,
each one device on its own keep-alive connection, sending one identical small Sync
request at a time. After a warm-up (the credential check and the gate's decision of
each device-session happen there) ``--requests`` requests are counted: every Python
function call or coroutine resumption (``call`` events) and every call of a C function
from Python (``c_call``), except those of this file's own clients and upstream.
``--top N`` also lists the N functions called most per request.

The CPU column is the process's CPU time per request over the same number of requests
without the profiler (best of three), client and upstream included, so only its
differences between trees mean something; ``--rounds`` runs the trees in interleaved
rounds (the order rotating) and shows its median and spread. ``CALLS_CPROFILE=N`` in
the environment prints cProfile's N most expensive functions (stderr);
``CALLS_CPU_ONLY=1`` skips the counting (for ``perf record`` of the ``count`` role).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

HERE = str(Path(__file__).resolve())
ROOT = Path(__file__).resolve().parent.parent
RESPONSE_BODY = bytes.fromhex("03016a00455c4f4b03320001520335000148033100010101")
WARMUP = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Peer(asyncio.Protocol):
    """One end of a keep-alive connection: each whole message (head and
    Content-Length body) that arrives goes to ``message``."""

    def __init__(self) -> None:
        self.buf = b""
        self.done: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = sum(int(line[15:]) for line in self.buf[:end].split(b"\r\n")
                         if line[:15].lower() == b"content-length:")
            if len(self.buf) < end + 4 + length:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 + length:]
            self.message(head)

    def message(self, head: bytes) -> None:
        raise NotImplementedError


class _Upstream(_Peer):
    """Answers each request at once."""

    def message(self, head: bytes) -> None:
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(RESPONSE_BODY), RESPONSE_BODY))


class _Client(_Peer):
    """``exchange`` sends a request and waits for the answer's head."""

    def message(self, head: bytes) -> None:
        if self.done is not None:
            self.done.set_result(head)

    async def exchange(self, request: bytes) -> bytes:
        self.done = asyncio.get_running_loop().create_future()
        self.t.write(request)
        return await self.done


class _Counter:
    def __init__(self) -> None:
        self.python = 0
        self.c = 0
        self.by_name: collections.Counter[str] = collections.Counter()
        self.detail = False

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            if code.co_filename != HERE:
                self.python += 1
                if self.detail:
                    self.by_name[f"{_short(code.co_filename)}:{code.co_qualname}"] += 1
        elif event == "c_call" and frame.f_code.co_filename != HERE:
            self.c += 1
            if self.detail:
                self.by_name[f"C {getattr(arg, '__qualname__', arg)}"] += 1


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/proxy/", "/lib/python"):
        i = path.find(marker)
        if i >= 0:
            return path[i + 1:]
    return path


def count(tree: Path, requests: int, top: int, conns: int) -> dict[str, Any]:
    """Start mailward from ``tree``'s bench script and count calls per request. (One
    function of 70-odd lines: the driver, the ``asyncio.run`` shim and the counting
    share its locals.)"""
    spec = importlib.util.spec_from_file_location("tree_bench", tree / "bench" / "activesync.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # puts ``tree`` first on sys.path
    mw_port, up_port = _free_port(), _free_port()
    state = tempfile.mkdtemp(prefix="mailward-calls-")
    counter = _Counter()
    counter.detail = top > 0
    result: dict[str, Any] = {}

    async def drive(mailward: Any) -> None:
        import proxy

        result["proxy"] = str(Path(proxy.__file__).parent)
        loop = asyncio.get_running_loop()
        upstream = await loop.create_server(_Upstream, "127.0.0.1", up_port)
        task = asyncio.ensure_future(mailward)
        for _ in range(600):
            try:
                _, client = await loop.create_connection(_Client, "127.0.0.1", mw_port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError("mailward did not start")
        clients = [client] + [(await loop.create_connection(_Client, "127.0.0.1", mw_port))[1]
                              for _ in range(conns - 1)]

        async def run(client: _Client, request: bytes, n: int) -> None:
            for _ in range(n):
                assert (await client.exchange(request)).startswith(b"HTTP/1.1 200")

        reqs = [bench._request(f"dev{i % conns}") for i in range(conns)]
        await asyncio.gather(*(run(c, r, WARMUP) for c, r in zip(clients, reqs, strict=True)))
        cpu = []
        for _ in range(3):  # CPU time of the whole process (client and upstream too)
            t0 = time.process_time()
            await asyncio.gather(*(run(c, r, requests // conns)
                                   for c, r in zip(clients, reqs, strict=True)))
            cpu.append(time.process_time() - t0)
        result["cpu_us"] = min(cpu) / (requests // conns * conns) * 1e6
        if os.environ.get("CALLS_CPROFILE"):  # where the time goes, by function
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            await asyncio.gather(*(run(c, r, requests // conns)
                                   for c, r in zip(clients, reqs, strict=True)))
            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(
                int(os.environ["CALLS_CPROFILE"]))
        if not os.environ.get("CALLS_CPU_ONLY"):  # e.g. under perf record
            sys.setprofile(counter)
            await asyncio.gather(*(run(c, r, requests // conns)
                                   for c, r in zip(clients, reqs, strict=True)))
            sys.setprofile(None)
        task.cancel()
        upstream.close()

    def run(main: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(drive(main))

    # The tree's run_mailward calls ``asyncio.run(main())``: run the driver around it.
    shim = types.SimpleNamespace(**{k: getattr(asyncio, k) for k in dir(asyncio)
                                    if not k.startswith("__")})
    shim.run = run
    vars(bench)["asyncio"] = shim
    bench.run_mailward(mw_port, up_port, state, max(conns, 4))
    requests = requests // conns * conns
    result.update(python=counter.python / requests, c=counter.c / requests,
                  total=(counter.python + counter.c) / requests,
                  top=[(name, n / requests) for name, n in counter.by_name.most_common(top)])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "count":
        print(json.dumps(count(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                               int(sys.argv[5]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--top", type=int, default=0, help="list the N most called functions")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    ap.add_argument("--conns", type=int, default=1,
                    help="connections, each one device, sending concurrently")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR")
    args = ap.parse_args()
    trees = [("mailward", str(ROOT)), *(t.split("=", 1) for t in args.tree)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    for i in range(args.rounds):  # interleaved, the order rotating, for the CPU column
        order = trees[i % len(trees):] + trees[:i % len(trees)]
        for name, tree in order:
            out = subprocess.run([sys.executable, HERE, "count", tree, str(args.requests),
                                  str(args.top), str(args.conns)],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"calls per small Sync request (mean of {args.requests}, {args.conns} "
          f"connection(s) and device(s), uvloop); CPU us per request of the whole process "
          f"(mailward, client and upstream), median (min-max) of {args.rounds} rounds")
    print(f"{'tree':<12} {'total':>8} {'Python':>8} {'C':>8} {'CPU us':>8} {'(min-max)':>13}"
          f"  proxy package")
    rows = [(name, rs[0]) for name, rs in runs.items()]
    for name, r in rows:
        cpu = [x["cpu_us"] for x in runs[name]]
        span = f"{min(cpu):.1f}-{max(cpu):.1f}"
        print(f"{name:<12} {r['total']:>8.1f} {r['python']:>8.1f} {r['c']:>8.1f} "
              f"{statistics.median(cpu):>8.1f} {span:>13}  {r['proxy']}")
    for name, r in rows:
        if r["top"]:
            print(f"\n{name}: most called per request")
            for fn, n in r["top"]:
                print(f"  {n:7.2f}  {fn}")


if __name__ == "__main__":
    main()
