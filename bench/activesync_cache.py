"""Simulated CPU cost per ActiveSync request of the proxy process alone: instructions,
cache misses and mispredicted branches counted by valgrind (callgrind with its cache
and branch simulation), so two source trees can be compared on a machine whose timings
are too noisy to show a few per cent (``bench/activesync.py`` measures the real thing).

Run: ``.venv/bin/python bench/activesync_cache.py [--tree NAME=DIR ...] [--requests
2560]`` (needs ``valgrind``; about two minutes per tree, the trees one after another).
Each tree's mailward is started by its own ``bench/activesync.py`` (``run_mailward``,
uvloop, the same seeded store) under callgrind beside this tree's upstream; 64
keep-alive connections, each cycling through the 64 devices like ``bench/activesync.py``,
send small Sync requests: a warm-up (decisions, pools), then the counters are zeroed
and ``--requests`` requests counted. The figures do not move with the load on the
machine (two runs of one tree agree within 0.2%).

Columns, per request: ``Ir`` instructions, ``I1mr``/``D1mr`` first-level instruction
and data cache misses, ``Bcm``/``Bim`` mispredicted conditional and indirect branches,
and ``cycles``, a rough weighting (0.4 per instruction, 10 per L1 miss, 15 per
mispredicted branch) that ranked the trees as ``bench/activesync.py`` did when the
machine was quiet. Found with it: a head-planning scheme that saved instructions but
cost more in misses, a timer made per upstream read, and a ``str.format`` inside
httptools' ``get_http_version``; see ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import activesync as bench  # noqa: E402  (this tree's request and upstream)

EVENTS = ("Ir", "I1mr", "D1mr", "Bcm", "Bim")
WEIGHTS = {"Ir": 0.4, "I1mr": 10.0, "D1mr": 10.0, "Bcm": 15.0, "Bim": 15.0}
CONNS = 64


async def _load(port: int, per_connection: int) -> None:
    """``CONNS`` connections, each sending ``per_connection`` requests one at a time."""
    requests = [bench._request(f"dev{i}") for i in range(bench.DEVICES)]

    async def one(c: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for k in range(per_connection):
            writer.write(requests[(c + k) % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"mailward answered {head[:40]!r}")
            length = next(int(line[15:]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(one(c) for c in range(CONNS)))


def _summary(path: Path) -> dict[str, int]:
    events: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            return dict(zip(events, map(int, line.split()[1:]), strict=True))
    raise RuntimeError(f"no summary in {path}")


def measure(tree: Path, requests: int) -> dict[str, float]:
    """Per-request simulated costs of ``tree``'s mailward."""
    tmp = Path(tempfile.mkdtemp(prefix="mailward-cache-"))
    up_port, mw_port = bench._free_port(), bench._free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "activesync.py"),
                                       "upstream", str(up_port)]))
        (tmp / "state").mkdir()
        mailward = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--cache-sim=yes", "--branch-sim=yes",
             f"--callgrind-out-file={tmp}/cg.%p", sys.executable,
             str(tree / "bench" / "activesync.py"), "mailward", str(mw_port), str(up_port),
             str(tmp / "state"), str(bench.DEVICES)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(mailward)
        bench._wait_port(mw_port, 300)
        asyncio.run(_load(mw_port, 20))  # warm-up
        subprocess.run(["callgrind_control", "-z", str(mailward.pid)], check=True,
                       capture_output=True)
        per_connection = max(1, requests // CONNS)
        asyncio.run(_load(mw_port, per_connection))
        subprocess.run(["callgrind_control", "-d", str(mailward.pid)], check=True,
                       capture_output=True)
        counted = _summary(next(tmp.glob("cg.*.1")))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    n = per_connection * CONNS
    out = {e: counted[e] / n for e in EVENTS}
    out["cycles"] = sum(WEIGHTS[e] * out[e] for e in EVENTS)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2560)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    trees = [("mailward", ROOT), *((n, Path(d)) for n, _, d in
                                   (t.partition("=") for t in args.tree))]
    rows = [(name, measure(tree, args.requests)) for name, tree in trees]
    print(f"per small Sync request, proxy process only ({args.requests // CONNS * CONNS} "
          f"requests, {CONNS} connections, callgrind cache and branch simulation, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'tree':<12}" + "".join(f"{e:>10}" for e in (*EVENTS, "cycles")) + "  ratio")
    first = rows[0][1]["cycles"]
    for name, r in rows:
        print(f"{name:<12}" + "".join(f"{r[e]:>10.0f}" for e in (*EVENTS, "cycles"))
              + f"  {r['cycles'] / first:.3f}")


if __name__ == "__main__":
    main()
