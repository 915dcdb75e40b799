"""`mailward audit report` over a large synthetic log: time and peak memory.

    python bench/report.py [--records 1000000] [--instances 1] [--keep DIR]

Writes a hash-chained log of N records (decisions on four protocols from 20,000
users' devices, a deny in eight, a few policy reloads, rollbacks and previews with
actors) sealed by signed checkpoints every 1,000 records, through the audit record
module's own sealing and signing (:func:`proxy.audit.record.seal`,
:func:`proxy.audit.record.checkpoint_body`), so `audit verify` accepts it. Then runs
`mailward audit report` on it in a fresh process and prints the wall time, the
child's peak RSS and the report's size. The targets (issue 18): under 60 s and under
500 MB for 1,000,000 records. ``--instances N`` deals the records round-robin into N
logs (one per instance, each its own signed chain) and reports on them merged.

:func:`write_log` is also what tests/test_report.py uses to make its logs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.audit.files import head_path
from proxy.audit.record import ZERO_HASH, canonical_json, checkpoint_body, key_id, seal

PROTOCOLS = ("imap", "activesync", "smtp", "pop3")
APPS = (("com.zhiliaoapp.musically", "TikTok"), ("com.whatsapp", "WhatsApp"),
        ("com.example.vpn", "FreeVPN"))


def synthetic_records(count: int, *, start: float, span_s: float,
                      seed: int = 18) -> Iterator[tuple[float, dict[str, Any]]]:
    """(time, fields) of ``count`` records spread evenly over ``span_s`` seconds."""
    rnd = random.Random(seed)
    step = span_s / max(1, count)
    version = 1
    for i in range(count):
        at = start + i * step
        if i % 50_000 == 25_000:
            version += 1
            yield at, {"event": "policy_reload", "result": "applied", "trigger": "sighup",
                       "old_version": f"v{version - 1}", "new_version": f"v{version}",
                       "old_sha256": "a" * 64, "new_sha256": f"{version:064x}",
                       "actor": "ops-alice"}
            continue
        if i % 50_000 == 40_000:
            yield at, {"event": "policy_preview", "candidate_version": f"v{version + 1}",
                       "newly_denied": rnd.randint(0, 40), "newly_allowed": 0,
                       "actor": "ops-bob"}
            continue
        yield at, _decision(rnd, i, f"v{version}")


def _decision(rnd: random.Random, i: int, version: str) -> dict[str, Any]:
    user_n = rnd.randrange(20_000)
    deny = rnd.random() < 0.125
    reasons: list[dict[str, Any]] = []
    if deny:
        if rnd.random() < 0.7:
            app_id, name = rnd.choice(APPS)
            reasons = [{"code": "prohibited_app", "text": f"{name} is not allowed",
                        "enforced": True, "app_id": app_id, "app_name": name,
                        "rule": name.lower()}]
        else:
            reasons = [{"code": rnd.choice(("stale_posture", "unknown_device", "revoked")),
                        "text": "refused", "enforced": True}]
    protocol = PROTOCOLS[rnd.randrange(4) if rnd.random() < 0.9 else 0]
    return {
        "event": "decision", "decision": "deny" if deny else "allow", "reasons": reasons,
        "protocol": protocol, "listener": protocol, "client_ip": f"10.{i % 200}.{user_n % 250}.7",
        "user": f"user{user_n}@corp.example", "device_id": f"dev-{user_n:05d}",
        "device": f"dev-{user_n:05d}", "device_source": "client_cert", "platform": "ios",
        "posture_age_s": 120.5, "posture_sha256": "b" * 64, "posture_source": "mdm:intune",
        "posture_cached": False, "policy_version": version, "policy_sha256": "c" * 64,
        "mode": "enforce", "latency_us": 80 + i % 50,
    }


def write_log(path: Path, key: Ed25519PrivateKey,
              records: Iterator[tuple[float, dict[str, Any]]] | list[tuple[float, dict[str, Any]]],
              *, checkpoint_every: int = 1000, instance: str = "bench") -> int:
    """Write ``records`` as a sealed, signed chain at ``path``, each naming ``instance``
    as the writer's do; returns the last seq."""
    kid = key_id(key.public_key())
    meta = {"instance": instance, "checkpoint_every": checkpoint_every}
    seq, prev, unsealed, at = 0, ZERO_HASH, 0, 0.0
    last: dict[str, Any] = {}
    with open(path, "w", encoding="utf-8") as out:
        def put(body: dict[str, Any], when: float) -> None:
            nonlocal seq, prev, last
            seq += 1
            last = seal(body, seq=seq, prev=prev, posix=when)
            prev = last["hash"]
            out.write(canonical_json(last) + "\n")

        for at, fields in records:
            put({"instance": instance, **fields}, at)
            unsealed += 1
            if unsealed == checkpoint_every:
                put(checkpoint_body(seq, prev, key, kid, meta), at)
                unsealed = 0
        if unsealed:
            put(checkpoint_body(seq, prev, key, kid, meta), at)
    # The writer's .head sidecar: a copy of the last checkpoint (see proxy.audit).
    head_path(path).write_text(canonical_json(last) + "\n", encoding="utf-8")
    return seq


def write_keys(directory: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A fresh checkpoint key; its public half as PEM in ``directory``."""
    key = Ed25519PrivateKey.generate()
    pub = directory / "audit-signing.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--instances", type=int, default=1, help="logs to deal records into")
    ap.add_argument("--keep", help="write the log and the report here and keep them")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        key, pub = write_keys(work)
        logs = ([work / "audit.jsonl"] if args.instances == 1 else
                [work / f"audit-{n}.jsonl" for n in range(args.instances)])
        now = time.time()
        started = time.perf_counter()
        last = 0
        for n, log in enumerate(logs):  # the same records afresh for each log: no copy
            records = synthetic_records(args.records, start=now - 29 * 86400,
                                        span_s=28 * 86400)
            last += write_log(log, key, itertools.islice(records, n, None, len(logs)),
                              instance=f"bench-{n}" if len(logs) > 1 else "bench")
        size = sum(log.stat().st_size for log in logs)
        print(f"wrote {last:,} records ({size / 1e6:.0f} MB) in {len(logs)} log(s) in "
              f"{time.perf_counter() - started:.1f} s")
        out = work / "report.html"
        cmd = [sys.executable, "-m", "proxy.cli", "audit", "report",
               *(a for log in logs for a in ("--log", str(log))),
               "--key", str(pub), "--since", "30d", "-o", str(out)]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "MAILWARD_CONFIG": "/nonexistent"})
        elapsed = time.perf_counter() - started
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_mb, cpu_s = child.ru_maxrss / 1024, child.ru_utime + child.ru_stime
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        print(f"audit report: {args.records:,} records in {elapsed:.1f} s "
              f"(target < 60 s; {cpu_s:.1f} CPU-s), peak RSS {peak_mb:.0f} MB (target < 500 MB), "
              f"report {out.stat().st_size / 1e6:.2f} MB" if out.exists() else "no report")
        ok = done.returncode == 0 and elapsed < 60 and peak_mb < 500
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
