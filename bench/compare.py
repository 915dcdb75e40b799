"""Compare one benchmark script on two revisions, in the same run, round by round.

    .venv/bin/python bench/compare.py bench/decide.py --base 1fb88ba --rounds 5
    .venv/bin/python bench/compare.py bench/startup.py --base main -- --runs 9
    make bench-compare BASE=1fb88ba BENCH=bench/startup.py ROUNDS=7

The base revision runs from its own ``git worktree`` checkout (``../base-<sha>`` beside
this one unless ``--checkout-dir`` says otherwise) with its own ``.venv`` (``pip install
-e '.[test]'``), both made on first use and reused after; the new side is this working
tree with its ``.venv``, uncommitted changes included (``--new REV`` checks out a
revision instead). Each round runs the script once per side, each run a fresh
subprocess with its side's interpreter and the checkout as working directory; the
order alternates (base first in odd rounds, new first in even ones) so that a drift
of the machine's load is shared out. By default each side runs its own copy of the
script; ``--script-from new`` runs this tree's copy on both.

Figures are read from the script's ordinary output, so the benchmarks need no special
mode: every number on a line is a figure, named by the text before it on that line,
the text since the previous number and the unit after it (``p99 30.4 µs``), or, in a
table, by the header above its column. For each figure the table gives the median of
each side, new/base, and each side's spread (min-max over the rounds); the last
column says whether the two spreads overlap ("~" : the difference is within the noise
the rounds show) or not ("higher"/"lower": new against base). Arguments after ``--``
(or any the harness does not know) are passed to the benchmark.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: A number not glued to a word before it (``p99`` is a name, not 99); ``39,955``,
#: ``24.6`` and ``+1.5`` are one number each (``3900-4100`` is two).
NUMBER_RE = re.compile(r"(?<![\w.])([+-]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
#: A unit glued to the number (``4,339x``, ``12ms``, ``3%``).
GLUED_UNIT_RE = re.compile(r"[A-Za-zµ%][\w/%]*")
#: A unit as the next word (``39,955 decisions/s``, ``24.6 µs``).
WORD_UNIT_RE = re.compile(r" +([A-Za-zµ%][\w/%-]*)")
#: Words after the unit, one space apart, that say which figure it is (``KiB idle``).
QUALIFIER_RE = re.compile(r"(?: [a-z][\w/-]*)+")


# --------------------------------------------------------------------- parsing


def _clean(text: str) -> str:
    return " ".join(text.strip(" \t:;,|()[]<>=").split())


def _header_name(header: str, end: int) -> str:
    """The column name in ``header`` that ends where a number ends (right-aligned
    tables), or ``""``."""
    if end > len(header) or header[end - 1] == " " or header[end:end + 1].strip():
        return ""
    start = header.rfind("  ", 0, end)
    return header[start + 2 if start >= 0 else 0 : end].strip()


def parse_figures(output: str) -> dict[str, float]:
    """Every number in ``output``, named as the module docstring says. A name met
    again in the same output gets ``#2``, ``#3``…"""
    figures: dict[str, float] = {}
    header = ""
    for line in output.splitlines():
        matches = list(NUMBER_RE.finditer(line))
        if not matches:  # a table's header has columns two or more spaces apart
            header = line if len(re.split(r"\s{2,}", line.strip())) >= 2 else ""
            continue
        label, pos = _clean(line[: matches[0].start()]), 0
        for i, m in enumerate(matches):
            between = _clean(line[pos : m.start()]) if i else ""
            pos = m.end()
            glued = GLUED_UNIT_RE.match(line, pos)
            word = None if glued else WORD_UNIT_RE.match(line, pos)
            unit = glued.group(0) if glued else word.group(1) if word else ""
            consumed = glued or word
            if consumed:
                pos = consumed.end()
                qualifier = QUALIFIER_RE.match(line, pos)
                if qualifier:
                    unit += qualifier.group(0)
                    pos = qualifier.end()
            column = _header_name(header, m.end()) if header and not glued else ""
            parts = (label, column) if column else (label, between, unit)
            name = " ".join(p for p in parts if p) or f"#{i + 1}"
            if not (between or unit or column) and len(matches) > 1:
                name += f" [{i + 1}]"
            figures[_unique(figures, name)] = _value(m)
    return figures


def _value(m: re.Match[str]) -> float:
    return float(m.group(1) + m.group(2).replace(",", "") + (m.group(3) or ""))


def _unique(figures: dict[str, float], name: str) -> str:
    if name not in figures:
        return name
    n = 2
    while f"{name} #{n}" in figures:
        n += 1
    return f"{name} #{n}"


# ------------------------------------------------------------------- checkouts


@dataclass
class Side:
    """One revision: where it is checked out, its interpreter, its figures."""

    name: str
    label: str
    checkout: Path
    python: Path
    runs: list[dict[str, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def checkout(rev: str, where: Path | None, extras: str, name: str = "base") -> Side:
    """A detached ``git worktree`` of ``rev`` with its own venv, made once, reused."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = where or ROOT.parent / f"{name}-{sha[:7]}"
    if not (path / ".git").exists():
        log(f"git worktree add {path} {sha[:7]}")
        git("worktree", "add", "--detach", str(path), sha)
    elif git("rev-parse", "HEAD", cwd=path) != sha:
        raise SystemExit(f"{path} is a checkout of another revision; pass --checkout-dir")
    venv = path / ".venv"
    stamp = venv / ".compare-installed"
    if not stamp.exists():
        log(f"creating {venv} (pip install -e '.[{extras}]')")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        spec = f".[{extras}]" if extras else "."
        r = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "-e", spec],
                           cwd=path, capture_output=True, text=True, check=False)
        if r.returncode:
            raise SystemExit(f"pip install in {path} failed:\n{r.stdout}{r.stderr}")
        stamp.touch()
    label = f"{rev} = {sha[:10]} {git('log', '-1', '--format=%s', sha)[:72]}"
    return Side(name, label, path, venv / "bin/python")


def working_tree() -> Side:
    sha = git("rev-parse", "--short=10", "HEAD")
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") \
        else ""
    python = ROOT / ".venv/bin/python"
    if not python.exists():
        raise SystemExit(f"{python} missing: run `make venv` first")
    return Side("new", f"working tree at {sha}{dirty}", ROOT, python)


def check_imports(side: Side) -> None:
    """Refuse to measure a side whose interpreter imports ``proxy`` from elsewhere."""
    where = subprocess.run([str(side.python), "-c", "import proxy; print(proxy.__file__)"],
                           cwd=side.checkout, env=_env(side), capture_output=True, text=True,
                           check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(side.checkout.resolve()):
        raise SystemExit(f"{side.name}: {side.python} imports proxy from {where}, "
                         f"not from {side.checkout}")


# --------------------------------------------------------------------- running


def _env(side: Side) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{side.python.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def script_for(side: Side, script: Path, script_from: str) -> Path:
    """The script ``side`` runs: its own copy, or this tree's copied next to it (so
    paths the script takes relative to itself point into ``side``'s checkout)."""
    rel = script.resolve().relative_to(ROOT)
    if side.checkout == ROOT:
        return ROOT / rel
    if script_from == "new":
        copy = side.checkout / rel.parent / f".compare-{rel.name}"
        shutil.copyfile(ROOT / rel, copy)
        return copy
    own = side.checkout / rel
    if not own.exists():
        raise SystemExit(f"{rel} does not exist at the base revision; "
                         "use --script-from new")
    return own


def run_once(side: Side, script: Path, args: list[str], timeout: float,
             echo: bool) -> None:
    t0 = time.monotonic()
    r = subprocess.run([str(side.python), str(script), *args], cwd=side.checkout,
                       env=_env(side), capture_output=True, text=True, timeout=timeout,
                       check=False)
    side.seconds.append(time.monotonic() - t0)
    if echo or r.returncode:
        log(f"--- {side.name} output ---\n{r.stdout}{r.stderr}")
    if r.returncode:
        raise SystemExit(f"{side.name}: {script.name} exited with {r.returncode}")
    side.runs.append(parse_figures(r.stdout))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -------------------------------------------------------------------- reporting


def _fmt(v: float) -> str:
    if v == 0 or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"


def _spread(values: list[float]) -> str:
    return f"{_fmt(min(values))}-{_fmt(max(values))}"


def table(base: Side, new: Side) -> list[tuple[str, ...]]:
    """One row per figure both sides printed in every round."""
    names = [n for n in new.runs[0]
             if all(n in r for r in base.runs) and all(n in r for r in new.runs)]
    rows: list[tuple[str, ...]] = [("figure", "base median", "new median", "new/base",
                                    "base min-max", "new min-max", "spreads")]
    for name in names:
        b = [r[name] for r in base.runs]
        n = [r[name] for r in new.runs]
        mb, mn = statistics.median(b), statistics.median(n)
        ratio = f"{mn / mb:.3f}" if mb else "-"
        if max(b) < min(n):
            verdict = "higher"
        elif max(n) < min(b):
            verdict = "lower"
        else:
            verdict = "~"
        rows.append((name, _fmt(mb), _fmt(mn), ratio, _spread(b), _spread(n), verdict))
    return rows


def report(script: str, base: Side, new: Side, rounds: int, load: tuple[float, float],
           per_round: bool) -> None:
    print(f"{script}: {rounds} alternating rounds, each run a fresh process")
    print(f"  base: {base.label}")
    print(f"  new:  {new.label}")
    print(f"  wall time per run, median: base {statistics.median(base.seconds):.1f} s, "
          f"new {statistics.median(new.seconds):.1f} s; load average {load[0]:.1f} before, "
          f"{load[1]:.1f} after")
    cores = os.cpu_count() or 1
    if max(load) > cores:
        print(f"  note: load average above the {cores} cores: other work shared the CPUs, "
              "so expect wide spreads")
    rows = table(base, new)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                          strict=True)]
        print("  " + "  ".join(cells))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))
    if per_round:
        print("  rounds 1..N (base | new):")
        for name, *_ in rows[1:]:
            b = " ".join(_fmt(r[name]) for r in base.runs)
            n = " ".join(_fmt(r[name]) for r in new.runs)
            print(f"    {name}: {b} | {n}")
    only = sorted(set().union(*base.runs, *new.runs) - {r[0] for r in rows[1:]})
    if only:
        print(f"  not in every run of both sides (left out): {', '.join(only)}")


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        description="Run a benchmark on two revisions in alternating rounds and "
                    "compare the figures it prints.")
    ap.add_argument("script", type=Path, help="benchmark script, e.g. bench/decide.py")
    ap.add_argument("--base", default="main", help="base revision (default: main)")
    ap.add_argument("--new", default=None,
                    help="new revision (default: this working tree, uncommitted included)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, at least 5 (default 5)")
    ap.add_argument("--checkout-dir", type=Path, default=None,
                    help="where the base is checked out (default: ../base-<sha>)")
    ap.add_argument("--script-from", choices=("each", "new"), default="each",
                    help="each side runs its own copy of the script, or this tree's")
    ap.add_argument("--extras", default="test", help="pip extras for the base venv")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--show-output", action="store_true", help="echo each run's output")
    ap.add_argument("--per-round", action="store_true", help="also list every round's value")
    args, rest = ap.parse_known_args(argv)
    if args.rounds < 5:
        ap.error("--rounds: at least 5 rounds, or the spread says little")
    return args, [a for a in rest if a != "--"]


def main(argv: list[str] | None = None) -> None:
    args, bench_args = parse_args(argv)
    base = checkout(args.base, args.checkout_dir, args.extras)
    new = working_tree() if args.new is None else checkout(args.new, None, args.extras, "new")
    for side in (base, new):
        check_imports(side)
    scripts = {s.name: script_for(s, args.script, args.script_from) for s in (base, new)}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        order = (base, new) if r % 2 == 0 else (new, base)
        for side in order:
            log(f"round {r + 1}/{args.rounds}: {side.name}")
            run_once(side, scripts[side.name], bench_args, args.timeout, args.show_output)
    report(str(args.script), base, new, args.rounds, (load_before, os.getloadavg()[0]),
           args.per_round)


if __name__ == "__main__":
    main()
