"""Start-up cost of `mailward explain` against `mailward --help`, measured in one run.

Both include interpreter start-up; the ratio shows whether explain does heavy import
work. Needs a deployment with an attested device (see README), or runs the CLI
walk-through itself in a temporary directory.

    .venv/bin/python bench/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("mailward"))


def run(deploy: Path, *args: str) -> None:
    subprocess.run([EXE, *args], cwd=deploy, check=False, capture_output=True,
                   env={**os.environ, "MAILWARD_CONFIG": str(deploy / "config/mailward.toml")})


def timed(deploy: Path, runs: int, *args: str) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(deploy, *args)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    # Measure as deployed: `pip install` writes bytecode; an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would recompile every module on every run.
    import compileall

    compileall.compile_dir(str(ROOT / "proxy"), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config").mkdir()
        for name in ("mailward.toml", "policy.toml"):
            shutil.copy(ROOT / "config" / name, d / "config" / name)
        run(d, "certs", "init", "--dir", "certs")
        run(d, "device", "enroll", "--id", "p1", "--user", "a@corp.example")
        run(d, "device", "attest", "--id", "p1", "--user", "a@corp.example", "--platform",
            "ios", "--apps", "com.example.mail", "--out", "p1.jws")
        run(d, "posture", "ingest", "p1.jws")
        help_s = timed(d, args.runs, "--help")
        explain_s = timed(d, args.runs, "explain", "--user", "a@corp.example", "--device", "p1")
    print(f"mailward --help   median {help_s * 1000:7.1f} ms")
    print(f"mailward explain  median {explain_s * 1000:7.1f} ms")
    print(f"ratio explain/help: {explain_s / help_s:.2f}x")


if __name__ == "__main__":
    main()
