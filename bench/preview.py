"""Benchmark of ``mailward policy preview``: a 500-rule candidate policy against the
policy in force (499 rules: the candidate adds a TikTok ban), over 100,000 devices in
a synthetic SQLite posture store (40 apps per device, drawn from 5,000 app ids, about
1 device in 20 with TikTok). Target: under 10 s for reading the store and judging
every device under both policies.

Prints the time to read the store, the time to judge, the total, devices per second
and the newly denied count. ``--store redis`` puts the same devices in a throw-away
``redis-server`` (written with pipelines in the layout the store's commit script
uses) and reads them the way the preview does on Redis: page by page, one short
script per page (``proxy.policies.preview.read_redis_devices``).

    .venv/bin/python bench/preview.py [--devices N] [--apps N] [--store sqlite|redis]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from proxy.policies.preview import compare_devices, load_devices, relevant_to
from proxy.posture.sqlite_schema import SCHEMA

TIKTOK = "com.zhiliaoapp.musically"


def policy_text(rules: int, with_tiktok: bool) -> str:
    out = ['version = "bench"', 'mode = "enforce"']
    for i in range(rules - 51):
        out += ["[[prohibited]]", f'name = "App {i}"',
                f'ids = ["com.banned{i}.app", "com.banned{i}.lite"]',
                'reason = "r"', 'remediation = "Uninstall it."']
    for i in range(50):
        out += ["[[prohibited]]", f'name = "Vendor {i}"', f'ids = ["com.vendor{i}.*"]',
                'reason = "r"', 'remediation = "Uninstall it."']
    if with_tiktok:
        out += ["[[prohibited]]", 'name = "TikTok"', f'ids = ["{TIKTOK}"]',
                'names = ["TikTok*"]', 'reason = "r"', 'remediation = "Uninstall TikTok."']
    return "\n".join(out) + "\n"


def documents(devices: int, apps: int) -> list[tuple[str, str, str]]:
    """(device, user, posture JSON) for each synthetic device."""
    rng = random.Random(7)
    pool = [f"com.example{i}.app" for i in range(5000)]
    now = int(time.time())
    rows = []
    for n in range(devices):
        chosen = [*rng.sample(pool, apps - 1), TIKTOK if n % 20 == 0 else "com.example.mail"]
        device = f"bench-{n:06d}"
        user = f"user{n}@corp.example"
        doc = {"device_id": device, "user": user, "platform": "android" if n % 2 else "ios",
               "os_version": "14", "managed": True, "iat": now - 60, "exp": now + 3600,
               "jti": f"j{n}", "issuer": device, "attested_by": "device",
               "received_at": now, "nonce": None, "source": "device", "signer": "",
               "apps": [{"id": a, "version": "1.0", "name": ""} for a in chosen]}
        rows.append((device, user, json.dumps(doc)))
    return rows


def build_sqlite(path: Path, docs: list[tuple[str, str, str]]) -> str:
    now = int(time.time())
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.executemany("INSERT INTO posture VALUES (?, ?, ?, ?, ?)",
                   [(d, "device", u, doc, now) for d, u, doc in docs])
    db.commit()
    db.close()
    return f"sqlite://{path}"


def build_redis(url: str, docs: list[tuple[str, str, str]]) -> None:
    """The keys ``proxy.posture.redis_scripts.COMMIT`` writes, pipelined."""
    import redis

    client = redis.Redis.from_url(url)
    prefix = "mailward:"
    for i in range(0, len(docs), 5000):
        pipe = client.pipeline(transaction=False)
        for device, user, doc in docs[i:i + 5000]:
            pipe.hset(f"{prefix}p:{device}", "device", doc)
            pipe.sadd(f"{prefix}u:{user}", device)
            pipe.sadd(f"{prefix}devs", device)
        pipe.execute()
    while True:  # an AOF rewrite the writes set off would compete for the 2 cores
        info = client.info("persistence")
        if not (info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled")):
            break
        time.sleep(0.2)
    client.close()


def server_cpu(url: str) -> float:
    """CPU seconds redis-server has used (0 for SQLite)."""
    if not url.startswith("redis://"):
        return 0.0
    import redis

    client = redis.Redis.from_url(url)
    info = client.info("cpu")
    client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--apps", type=int, default=40)
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    args = ap.parse_args()
    from proxy.config import load_policy

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "in-force.toml").write_text(policy_text(500, with_tiktok=False))
        (d / "candidate.toml").write_text(policy_text(500, with_tiktok=True))
        docs = documents(args.devices, args.apps)
        redis_server = None
        if args.store == "redis":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from peers.redis import RedisServer

            redis_server = RedisServer(d / "redis").start()
            url = redis_server.url
            build_redis(url, docs)
        else:
            url = build_sqlite(d / "posture.db", docs)
        del docs
        try:
            started, cpu = time.perf_counter(), time.process_time()
            redis_cpu = server_cpu(url)
            baseline = load_policy(d / "in-force.toml")
            candidate = load_policy(d / "candidate.toml")
            devices = load_devices(url, relevant_to(baseline, candidate))
            read_s = time.perf_counter() - started
            judged = time.perf_counter()
            out = compare_devices(devices, baseline, candidate, datetime.now(UTC))
            done, cpu = time.perf_counter(), time.process_time() - cpu
            redis_cpu = server_cpu(url) - redis_cpu
        finally:
            if redis_server is not None:
                redis_server.stop()
    total = done - started
    print(f"preview ({args.store}): {args.devices} devices x {args.apps} apps, "
          f"{len(candidate.prohibited)}-rule candidate vs {len(baseline.prohibited)} in force")
    print(f"  read store + policies {read_s:6.2f} s")
    print(f"  judge (both policies) {done - judged:6.2f} s")
    print(f"  total                 {total:6.2f} s  ({args.devices / total:,.0f} devices/s; "
          f"target < 10 s: {'ok' if total < 10 else 'MISSED'})")
    print(f"  CPU: this process {cpu:6.2f} s" + (
        f", redis-server {redis_cpu:6.2f} s" if args.store == "redis" else "")
        + "  (the wall times above include waiting for a core on a shared machine)")
    print(f"  newly denied {len(out.newly_denied)}, unchanged {out.unchanged}")


if __name__ == "__main__":
    main()
