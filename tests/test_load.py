"""bench/load.py: the 200-session version of the mixed load runs in CI (counts and
outcomes, not timings), and its checks are shown to catch what they look for."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "load.py"


def _module(name: str) -> ModuleType:
    """A script of bench/ imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


load = _module("load")


@pytest.mark.peer
def test_mixed_load_200_sessions() -> None:
    """200 sessions from 40 devices against ``mailward serve``, 4 flipped mid-run and two
    policy reloads: nothing misclassified, no audit record lost or doubled, the log
    verifies after SIGTERM and every session of a flipped device ended with its goodbye."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sessions", "200", "--devices", "40", "--flips", "4",
         "--end-timeout", "10", "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    checks = {name: c["value"] for name, c in res["checks"].items()}
    assert checks["misclassified"] == 0, res["details"]
    assert checks["audit records missing"] == 0, res["details"]
    assert checks["audit records duplicated"] == 0, res["details"]
    assert checks["audit verify exit"] == 0, res["verify"]
    assert checks["flipped sessions not ended with goodbye"] == 0, res["details"]
    assert checks["client errors"] == 0, res["details"]
    assert checks["sessions open after shutdown"] == 0
    assert checks["server exit after SIGTERM"] == 0
    # 8 TikTok devices (20%) are refused on every protocol; everyone else is let in.
    assert res["outcomes"] == {"activesync allowed": 40, "activesync denied": 10,
                               "imap allowed": 80, "imap denied": 20,
                               "smtp allowed": 40, "smtp denied": 10}
    assert res["flipped_sessions"] == res["flipped_sessions_ended"] == 20
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run() -> object:
    """Two devices: dev-0000 has TikTok, dev-0001 is flipped; 8 IMAP, 4 SMTP and 4
    ActiveSync sessions, two of each per device on ActiveSync."""
    plan = load.Plan.make(16, 2, 1)
    run = load.Run(plan)
    for protocol, device in plan.kinds:
        s = load.Session(protocol, device)
        s.outcome = "denied" if device.tiktok else "allowed"
        if device.flip:
            s.ended_at, s.how = 1.0, {"imap": "bye", "smtp": "421", "activesync": "403"}[protocol]
        run.sessions.append(s)
    run.sigterm_at = 2.0
    return run


@pytest.mark.pure
def test_checks_catch_misclassification() -> None:
    """A TikTok device let in, or a flipped device's Ping answered 200, counts as
    misclassified; a correct run counts none."""
    run = _run()
    assert load.misclassified(run) == []
    tiktok = next(s for s in run.sessions if s.device.tiktok)
    tiktok.outcome = "allowed"
    ping = next(s for s in run.sessions if s.device.flip and s.protocol == "activesync")
    ping.how = "http 200"
    assert len(load.misclassified(run)) == 2


@pytest.mark.pure
def test_expected_records_one_per_login_and_device_session() -> None:
    """IMAP and SMTP expect one decision per login, ActiveSync one per allowed device
    (its connections share a device-session) and one per refused request; a flipped
    device's sessions expect one gate ``session_end`` each (ActiveSync: one); an extra
    or a missing record shows up in the difference."""
    exp = load.expected_records(_run())
    assert exp["decision", "imap", "dev-0000", "deny"] == 4
    assert exp["decision", "imap", "dev-0001", "allow"] == 4
    assert exp["decision", "activesync", "dev-0000", "deny"] == 2
    assert exp["decision", "activesync", "dev-0001", "allow"] == 1
    assert exp["session_end", "smtp", "dev-0001"] == 2
    assert exp["session_end", "activesync", "dev-0001"] == 1
    assert exp["attestation", "dev-0001"] == 2
    assert exp["policy_reload",] == 2
    got = Counter(exp)
    got["decision", "activesync", "dev-0001", "allow"] += 1
    del got["policy_reload",]
    assert load._diff(got, exp) == ["decision activesync dev-0001 allow x1"]
    assert load._diff(exp, got) == ["policy_reload x2"]


@pytest.mark.pure
def test_results_table_rows() -> None:
    """bench/results.py keeps measured figures, puts ratios in the peer / ratio column
    and leaves out numbers that only restate a target and operational log lines."""
    results = _module("results")
    parse = results._compare().parse_figures
    rows = results.text_rows(results.Bench("decide.py"), (
        "2026-12-02 14:03:57 [info     ] listener started port=36467\n"
        "mailward evaluate                  31,635 decisions/s   p50     25.7 µs\n"
        "ratio mailward/naive: 3,474x   p99 target < 50 µs: NOT met\n"), parse)
    assert rows == [("decide.py", "mailward evaluate decisions/s", "31,635", ""),
                    ("decide.py", "mailward evaluate p50 µs", "25.7", ""),
                    ("decide.py", "ratio mailward/naive x", "", "3,474")]


@pytest.mark.pure
def test_results_table_keeps_the_sections_written_by_hand(tmp_path: Path) -> None:
    """``make bench`` rewrites the table of bench/RESULTS.md but keeps what engineers
    wrote below it (same-run comparisons), and writes a new file whole."""
    results = _module("results")
    out = tmp_path / "RESULTS.md"
    row = ("decide.py", "mailward evaluate decisions/s", "31,635", "")
    results.write_table(out, ["- machine: test"], [row])
    first = out.read_text()
    assert "| decide.py | mailward evaluate decisions/s | 31,635 |  |" in first
    assert "## " not in first
    out.write_text(first + "\n## By hand\n\nmailward 0.97x 2ae0984\n")
    results.write_table(out, ["- machine: test"], [(*row[:2], "40,000", "")])
    again = out.read_text()
    assert "| 40,000 |" in again and "31,635" not in again
    assert again.endswith("\n## By hand\n\nmailward 0.97x 2ae0984\n")
    assert again.count("# Benchmark results") == 1
