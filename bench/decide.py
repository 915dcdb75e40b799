"""Benchmark of ``policy.evaluate``: 500 prohibited-app rules, a device with 300 apps.

Prints decisions per second and p50/p99 latency in microseconds, and the same for a
naive reference evaluator (every rule's patterns fnmatch'ed against every app, the
obvious implementation) measured in the same run, with the ratio. Target: p99 < 50 µs.

    .venv/bin/python bench/decide.py [--iterations N]
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import statistics
import time
from datetime import UTC, datetime

from proxy.policy import Context, Policy, ProhibitedApp, evaluate
from proxy.posture import App, Posture

NOW = datetime(2026, 11, 25, tzinfo=UTC)


def build_policy(rules: int = 500, glob_rules: int = 50) -> Policy:
    prohibited = []
    for i in range(rules - glob_rules - 1):
        prohibited.append(ProhibitedApp(f"App {i}", (f"com.banned{i}.app", f"com.banned{i}.lite"),
                                        "reason", "Uninstall it."))
    for i in range(glob_rules):
        prohibited.append(ProhibitedApp(f"Vendor {i}", (f"com.vendor{i}.*",), "reason",
                                        "Uninstall it."))
    prohibited.append(ProhibitedApp("TikTok", ("com.zhiliaoapp.musically",), "reason",
                                    "Uninstall TikTok."))
    return Policy(version="bench", sha256="0" * 64, prohibited=tuple(prohibited))


def build_posture(apps: int = 300, with_tiktok: bool = True) -> Posture:
    items = [App(f"com.example{i}.app{i % 7}", f"{i}.0.1") for i in range(apps - 1)]
    items.append(App("com.zhiliaoapp.musically" if with_tiktok else "com.example.last", "35.1"))
    iat = int(NOW.timestamp()) - 60
    return Posture("dev1", "alice@corp.example", "android", "14", True, tuple(items), iat,
                   iat + 3600, "j", "dev1", "device")


def naive_evaluate(posture: Posture, policy: Policy) -> bool:
    for app in posture.apps:
        for rule in policy.prohibited:
            if any(fnmatch.fnmatchcase(app.id, p) for p in rule.ids):
                return False
    return True


def measure(fn, iterations: int) -> list[float]:
    gc.collect()
    gc.disable()
    try:
        samples = []
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1000)
        return samples
    finally:
        gc.enable()


def report(name: str, samples: list[float]) -> tuple[float, float]:
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99) - 1]
    rate = 1e6 / statistics.fmean(samples)
    print(f"{name:<28} {rate:>12,.0f} decisions/s   p50 {p50:8.1f} µs   p99 {p99:8.1f} µs")
    return rate, p99


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20000)
    args = ap.parse_args()
    policy, posture = build_policy(), build_posture()
    ctx = Context(now=NOW, user="alice@corp.example", device_id="dev1", protocol="imap")
    assert not evaluate(posture, policy, ctx).allow
    assert not naive_evaluate(posture, policy)
    evaluate(posture, policy, ctx)  # warm the per-policy glob memo, as a live proxy would
    print(f"policy: {len(policy.prohibited)} rules; device: {len(posture.apps)} apps")
    rate, p99 = report("mailward evaluate", measure(lambda: evaluate(posture, policy, ctx),
                                                    args.iterations))
    naive_iters = max(20, args.iterations // 200)
    nrate, _ = report("naive fnmatch reference", measure(lambda: naive_evaluate(posture, policy),
                                                         naive_iters))
    print(f"ratio mailward/naive: {rate / nrate:,.0f}x   p99 target < 50 µs: "
          f"{'met' if p99 < 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
