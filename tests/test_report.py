"""The auditor's report (``mailward audit report``): exact totals from one streamed
pass, the bounded list of denies, the policy timeline with actors, exports, leaving
client addresses out, a broken chain reported as such, and one self-contained HTML
file that can fetch nothing."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from report_logs import bench, story

from proxy.audit import load_verify_key
from proxy.audit import report as report_mod
from proxy.audit.report import bucket_width, build_report, report_window
from proxy.audit.report_charts import slim_svg
from proxy.audit.report_html import render_report
from proxy.cli import main

pytestmark = pytest.mark.conversation

START = time.time() - 3 * 86400
IPS = ("192.0.2.10", "198.51.100.7", "203.0.113.9")


@pytest.fixture
def story_log(tmp_path: Path) -> tuple[Path, Path]:
    key, pub = bench.write_keys(tmp_path)
    log = tmp_path / "audit.jsonl"
    bench.write_log(log, key, story(START), checkpoint_every=4)
    return log, pub


def _report(log: Path, pub: Path, **kw: Any) -> Any:
    return build_report(log, since=datetime.fromtimestamp(START - 60, UTC),
                        until=datetime.now(UTC), keys=[load_verify_key(pub)], **kw)


def test_totals_timeline_and_denies_of_the_story(story_log: tuple[Path, Path]) -> None:
    """The report counts every decision exactly, lists the three denies newest first
    with their hashes, and puts preview, ban and rollback on the timeline with actors."""
    log, pub = story_log
    data = _report(log, pub)
    assert data.chain.ok and data.chain.signatures_checked
    assert data.chain.checkpoints == 3 and data.chain.first_seq == 1
    assert data.chain.last_seq == 12  # 9 records + 3 checkpoints
    assert data.decisions == Counter({("imap", "allow"): 3, ("imap", "deny"): 3})
    assert data.events["decision"] == 6 and data.events["policy_rollback"] == 1
    assert [(e.event, e.version, e.actor) for e in data.timeline] == [
        ("policy_preview", "v2", "ops-alice"), ("policy_reload", "v2", "ops-alice"),
        ("policy_rollback", "v1", "ops-bob")]
    assert data.deny_apps == Counter({"TikTok": 3})
    assert data.deny_reasons == Counter({"prohibited_app": 3})
    assert len(data.deny_users) == 3 and data.actors["ops-alice"] == 2
    hashes = {r["seq"]: r["hash"] for r in map(json.loads, log.read_text().splitlines())}
    assert all(hashes[d.seq] == d.hash for d in data.denies)
    html = render_report(data)
    for text in ("Chain verified", "ops-bob", "policy_rollback", "TikTok", hashes[4]):
        assert text in html
    assert html.count("<tr><td>") >= 3


def test_html_is_self_contained_and_escaped(story_log: tuple[Path, Path]) -> None:
    """The HTML loads nothing: no src/href to anywhere, a CSP of default-src 'none'
    whose script hash matches the one inline script; record text is escaped."""
    log, pub = story_log
    html = render_report(_report(log, pub))
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"""\b(src|href|action)\s*=\s*(?!["']?#)""", html, re.I)
    assert "@import" not in html and "url(http" not in html
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp and "default-src 'none'" in csp.group(1)
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp.group(1)
    assert "<metadata>" not in html and "<?xml" not in html


def test_no_client_ip_leaves_addresses_out_everywhere(story_log: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """With no_client_ip no address appears in the HTML, the CSV or the JSON lines,
    and the exports still hold every record of the period."""
    log, pub = story_log
    data = _report(log, pub, no_client_ip=True, export_dir=tmp_path / "out")
    html = render_report(data)
    files = [p.read_text() for p in data.exported]
    for text in [html, *files]:
        assert not any(ip in text for ip in IPS)
    assert ">client ip<" not in html and '"client_ip"' not in files[1]
    rows = list(csv.DictReader(files[0].splitlines()))
    assert "client_ip" not in rows[0]
    assert len(rows) == 9 == len(files[1].splitlines())
    with_ip = _report(log, pub, export_dir=tmp_path / "with")
    assert all(ip in with_ip.exported[0].read_text() for ip in IPS)
    assert all(ip in render_report(with_ip) for ip in IPS)


def test_denies_are_bounded_and_totals_stay_exact(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the newest MAX_DENIES denies are kept, in order, while every count is exact."""
    monkeypatch.setattr(report_mod, "MAX_DENIES", 50)
    key, pub = bench.write_keys(tmp_path)
    records = list(bench.synthetic_records(3000, start=START, span_s=86400))
    bench.write_log(tmp_path / "audit.jsonl", key, records)
    data = _report(tmp_path / "audit.jsonl", pub)
    denies = [(t, f) for t, f in records if f.get("decision") == "deny"]
    assert data.deny_total == len(denies) > 50 and len(data.denies) == 50
    last_seqs = [d.seq for d in data.denies]
    assert last_seqs == sorted(last_seqs)
    assert data.denies[-1].user == denies[-1][1]["user"]
    want = Counter((f["protocol"], f["decision"]) for _, f in records
                   if f["event"] == "decision")
    assert data.decisions == want
    assert sum(sum(c.values()) for c in data.series.values()) == sum(want.values())
    html = render_report(data)
    assert f"the newest 50 of {len(denies):,}" in html


def test_period_selects_records(story_log: tuple[Path, Path]) -> None:
    """since/until select [since, until): a window around the ban holds its denies
    and the reload only."""
    log, pub = story_log
    data = build_report(log, since=datetime.fromtimestamp(START + 3600, UTC),
                        until=datetime.fromtimestamp(START + 7200, UTC),
                        keys=[load_verify_key(pub)])
    assert data.decisions == Counter({("imap", "deny"): 3})
    assert [e.event for e in data.timeline] == ["policy_reload"]
    assert data.first_seq == 3  # the reload


def test_broken_chain_is_reported(story_log: tuple[Path, Path], tmp_path: Path) -> None:
    """A changed record: the report still renders, says verification FAILED naming
    the line, and the CLI exits 1."""
    log, pub = story_log
    text = log.read_text().replace("bob@corp.example", "eve@corp.example", 1)
    log.write_text(text)
    data = _report(log, pub)
    assert not data.chain.ok and "audit.jsonl:" in (data.chain.error or "")
    assert "Chain verification FAILED" in render_report(data)
    out = tmp_path / "r.html"
    assert main(["audit", "report", "--log", str(log), "--key", str(pub), "--since", "7d",
                 "-o", str(out)]) == 1
    assert out.exists()


def test_cli_writes_report_and_exports(story_log: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`mailward audit report` writes the file and the exports (exit 0); without a key
    it still writes it, marks the signatures unchecked and warns."""
    log, pub = story_log
    out, exports = tmp_path / "report.html", tmp_path / "exports"
    assert main(["audit", "report", "--log", str(log), "--key", str(pub), "--since", "7d",
                 "--export-dir", str(exports), "-o", str(out)]) == 0
    assert "<h1>mailward audit report</h1>" in out.read_text()
    assert sorted(p.name for p in exports.iterdir()) == ["audit-report.csv",
                                                        "audit-report.jsonl"]
    capsys.readouterr()
    monkeypatch.setenv("MAILWARD_CONFIG", str(tmp_path / "none.toml"))
    assert main(["audit", "report", "--log", str(log), "--since", "7d", "-o", str(out)]) == 0
    assert "warning: checkpoint signatures not checked" in capsys.readouterr().err
    assert "signatures were NOT checked" in out.read_text()
    assert main(["audit", "report", "--log", str(log), "--since", "nonsense",
                 "-o", str(out)]) == 2


def test_report_of_many_records_stays_small(tmp_path: Path) -> None:
    """20,000 records over 30 days: the chart has at most MAX_BUCKETS steps per series
    and the file stays well under a megabyte and a half (e-mailable)."""
    key, pub = bench.write_keys(tmp_path)
    bench.write_log(tmp_path / "audit.jsonl", key,
                    bench.synthetic_records(20_000, start=time.time() - 29 * 86400,
                                            span_s=28 * 86400))
    data = build_report(tmp_path / "audit.jsonl", since=datetime.now(UTC) - timedelta(days=30),
                        until=datetime.now(UTC), keys=[load_verify_key(pub)])
    assert max(max(c) for c in data.series.values()) < report_mod.MAX_BUCKETS
    html = render_report(data)
    assert len(html.encode()) < 1_500_000
    svg = re.search(r"<svg.*?</svg>", html, re.S)
    assert svg and len(svg.group(0)) < 300_000


@pytest.mark.pure
def test_bucket_width_and_window() -> None:
    """Buckets: the narrowest width that keeps a series within MAX_BUCKETS; the
    period defaults to the 30 days before until, and an empty one is refused."""
    now = datetime(2025, 6, 30, tzinfo=UTC)
    assert bucket_width(now - timedelta(hours=2), now) == 60
    assert bucket_width(now - timedelta(days=30), now) == 3 * 3600
    assert bucket_width(now - timedelta(days=3650), now) == 7 * 86400
    assert report_window(None, None, now) == (now - timedelta(days=30), now)
    assert report_window("7d", "2025-06-30", now)[0] == now - timedelta(days=7)
    with pytest.raises(ValueError, match="empty"):
        report_window("2025-07-01", "2025-06-01", now)


@pytest.mark.pure
def test_slim_svg_prefixes_ids_and_drops_metadata() -> None:
    """slim_svg removes the prolog, DOCTYPE, comments and metadata and prefixes ids
    together with their references."""
    svg = ('<?xml version="1.0"?>\n<!DOCTYPE svg>\n<svg width="10pt" height="5pt" '
           'viewBox="0 0 10 5"><metadata>x</metadata><!-- c --><defs><clipPath id="p1">'
           '</clipPath></defs><g clip-path="url(#p1)"><use xlink:href="#p1"/></g></svg>')
    out = slim_svg(svg, prefix="a")
    assert out.startswith("<svg") and "width=" not in out.split(">")[0]
    assert 'id="a-p1"' in out and "url(#a-p1)" in out and 'href="#a-p1"' in out
    assert "metadata" not in out and "<!--" not in out
