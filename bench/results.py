"""Run every benchmark and write one markdown table of their figures (``make bench``).

    .venv/bin/python bench/results.py [--out bench/RESULTS.md] [--only NAME,...]

Each benchmark runs as a subprocess of this interpreter, its output shown as it comes.
Figures come from its standard output, read by ``bench/compare.py``'s parser (every
number, named by its label and unit), so the benchmarks need no special mode; the
load run prints a ``--json`` summary, from which the figures the issue names are
taken. Figures that restate a target (``target < 50 µs``) are left out; ratios
(``x`` units, ``ratio ...``, ``A / B``) go to the "peer / ratio" column. A benchmark
that fails or is skipped is one row saying so, and the exit status is 1 if any failed.

The header gives the date, the machine (``nproc``, CPU model, load average at the
start) and the Python version: figures from a shared machine are noisy, and the load
average says how shared it was.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@dataclass(frozen=True)
class Bench:
    name: str
    argv: tuple[str, ...] = ()
    json: bool = False  # figures from a JSON summary on stdout
    #: Figures left out (regexes on the name): spreads and counters whose names the
    #: generic parser cannot make meaningful; the medians and totals stay.
    drop: tuple[str, ...] = ()


BENCHES = (
    Bench("decide.py"),
    Bench("startup.py"),
    Bench("imap.py"),
    Bench("smtp.py"),
    Bench("activesync.py", drop=(r" \[\d+\]$", r"\(min-max\)")),
    Bench("tls_memory.py"),
    Bench("burst_memory.py", drop=(r"^round \[", r"^round / greeted")),
    Bench("load.py", ("--json",), json=True),
    Bench("scale.py", drop=(r"^decision = ",)),
)

#: An operational log line a benchmark's in-process listener printed (structlog).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")

#: (figure, JSON key, unit) of the load run's summary, in table order.
LOAD_FIGURES = (
    ("sessions (IMAP / SMTP / ActiveSync = 2:1:1)", "sessions", ""),
    ("devices", "devices", ""),
    ("devices flipped mid-run", "flips", ""),
    ("misclassified", "check:misclassified", ""),
    ("audit records missing", "check:audit records missing", ""),
    ("audit records duplicated", "check:audit records duplicated", ""),
    ("audit verify exit status after SIGTERM", "check:audit verify exit", ""),
    ("sessions of flipped devices", "flipped_sessions", ""),
    ("... of them ended", "flipped_sessions_ended", ""),
    ("time from the API's 201 to session end p50", "end_p50_s", "s"),
    ("time from the API's 201 to session end p99", "end_p99_s", "s"),
    ("time from the API's 201 to session end max (goal <= 2 s)", "end_max_s", "s"),
    ("flip report answered 201 in, max", "flip_api_max_ms", "ms"),
    ("time to decision p50 (latency_us)", "decision_p50_ms", "ms"),
    ("time to decision p99 (latency_us)", "decision_p99_ms", "ms"),
    ("server peak RSS (VmHWM)", "rss_peak_mib", "MiB"),
    ("sessions set up in", "open_s", "s"),
    ("live sessions ended by SIGTERM with their goodbye", "shutdown_goodbyes", ""),
)


def _compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def run_bench(bench: Bench) -> tuple[int, str, float]:
    """Run one benchmark; its stdout (also echoed) and stderr (passed through)."""
    print(f"== bench/{bench.name} {' '.join(bench.argv)}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(BENCH / bench.name), *bench.argv],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if not bench.json:
            print(line, end="", flush=True)
    return proc.wait(), "".join(out), time.monotonic() - started


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.1f}"


def is_ratio(name: str) -> bool:
    return name.startswith("ratio") or name.endswith(" x") or " / " in name


def text_rows(bench: Bench, output: str, parse: Any) -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, value, peer / ratio) from a benchmark's text output."""
    text = "\n".join(line for line in output.splitlines() if not LOG_LINE.match(line))
    drop = [re.compile(rx) for rx in bench.drop]
    rows = []
    name = bench.name
    for figure, value in parse(text).items():
        if ("target" in figure or "goal" in figure or figure[:1] in "#-"
                or any(rx.search(figure) for rx in drop)):
            continue
        if is_ratio(figure):
            rows.append((name, figure, "", _fmt(value)))
        else:
            rows.append((name, figure, _fmt(value), ""))
    return rows


def load_rows(output: str) -> list[tuple[str, str, str, str]]:
    res = json.loads(output[output.index("{"):])
    rows = []
    for figure, key, unit in LOAD_FIGURES:
        value: Any = (res["checks"][key[6:]]["value"] if key.startswith("check:")
                      else res[key])
        shown = f"{_fmt(value)} {unit}".strip() if isinstance(value, int | float) else value
        rows.append(("load.py", figure, shown, ""))
    rows.append(("load.py", "all correctness checks", "passed" if res["ok"] else "FAILED", ""))
    return rows


def machine() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} CPUs (`nproc`), {cpu}, load average at start {load}",
        f"- Python {platform.python_version()} ({sys.executable})",
    ]


def write_table(path: Path, header: list[str], rows: list[tuple[str, str, str, str]]) -> None:
    """Write the table to ``path``; the sections written by hand after it (from the
    file's first ``## `` heading on: same-run comparisons, investigations) are kept."""
    lines = ["# Benchmark results", "", "Written by `make bench` (`bench/results.py`); "
             "each benchmark's own docstring says what it measures and how.", "", *header,
             "", "| benchmark | figure | value | peer / ratio |", "|---|---|---:|---:|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    old = path.read_text() if path.exists() else ""
    by_hand = old[old.index("\n## ") + 1:] if "\n## " in old else ""
    path.write_text("\n".join(lines) + "\n" + ("\n" + by_hand if by_hand else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    ap.add_argument("--only", type=lambda v: set(v.split(",")), default=None,
                    metavar="NAME,...", help="run only these (e.g. load.py,decide.py)")
    ap.add_argument("--note", default="", help="a line for the header (e.g. how busy "
                    "the machine was)")
    args = ap.parse_args(argv)
    parse = _compare().parse_figures
    header = machine() + ([f"- note: {args.note}"] if args.note else [])
    rows: list[tuple[str, str, str, str]] = []
    failed = 0
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        code, output, seconds = run_bench(bench)
        if code != 0:
            failed += 1
            rows.append((bench.name, f"exit status {code} after {seconds:.0f} s: a check "
                         "failed or a goal was missed (see its output)", "", ""))
        if "skipped" in output and not output.strip().count("\n"):
            rows.append((bench.name, output.strip(), "", ""))
            continue
        try:
            rows += load_rows(output) if bench.json else text_rows(bench, output, parse)
        except (ValueError, KeyError) as exc:
            rows.append((bench.name, f"output not understood: {exc}", "", ""))
    write_table(args.out, header, rows)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}"
          f" ({len(rows)} rows){'; ' + str(failed) + ' benchmark(s) failed' if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
