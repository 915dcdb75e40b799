"""Several instances, several logs: `audit query` and `audit report` merge the logs by
time (records unchanged, instance kept), in every output format, while each log is
still verified on its own, so a tampered log is named and the other still verifies."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from audit_records import read_records
from hypothesis import given
from hypothesis import strategies as st
from report_logs import bench

from proxy.audit import AuditLog, load_verify_key
from proxy.audit.query import (
    TABLE_SIZING_ROWS,
    format_records,
    merge_by_time,
    merge_key,
    query_logs,
)
from proxy.audit.record import format_ts
from proxy.audit.report import build_report
from proxy.audit.report_html import render_report
from proxy.cli import main

pytestmark = pytest.mark.conversation

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z
INSTANCES = ("mail-a", "mail-b")


class StepClock:
    """A writer's clock: every call two seconds on; instance b runs one second behind
    a, except every third call, when both write in the same microsecond (a tie)."""

    def __init__(self, offset: int) -> None:
        self.calls, self.offset = 0, offset

    def __call__(self) -> float:
        self.calls += 1
        lag = self.offset if self.calls % 3 else 0
        return T0 + 2 * self.calls + lag


def _decision(i: int, instance: str) -> dict[str, Any]:
    deny = i % 4 == 0
    return {"event": "decision", "decision": "deny" if deny else "allow",
            "reasons": [{"code": "prohibited_app", "text": "TikTok is not allowed",
                         "app_id": "com.zhiliaoapp.musically", "app_name": "TikTok"}]
            if deny else [],
            "protocol": ("imap", "activesync")[i % 2], "listener": "imaps",
            "client_ip": f"192.0.2.{i % 50}", "user": f"user{i % 5}@corp.example",
            "device_id": f"dev-{instance[-1]}{i % 3}", "mode": "enforce"}


@pytest.fixture
def two_logs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two signed logs written by the real writer, one per instance, 30 records each
    (checkpoints every 4), times interleaved with ties; and the verify key."""
    key, pub = bench.write_keys(tmp_path)
    logs = []
    for offset, instance in enumerate(INSTANCES):
        path = tmp_path / instance / "audit.jsonl"
        path.parent.mkdir()
        with AuditLog(path, signing_key=key, checkpoint_every=4, clock=StepClock(offset),
                      instance=instance) as log:
            for i in range(30):
                log.append(_decision(i, instance))
        logs.append(path)
    return logs[0], logs[1], pub


def _lines(path: Path) -> set[str]:
    return set(path.read_text(encoding="utf-8").splitlines())


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_query_merges_two_instances_by_time(two_logs: tuple[Path, Path, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """JSON lines of two logs: every non-checkpoint record of both, byte for byte as
    written (instance and hash kept), ordered by ts, ties by instance then seq."""
    a, b, _ = two_logs
    rc, out, _ = _run(capsys, "audit", "query", "--log", str(a), "--log", str(b),
                      "--format", "json")
    assert rc == 0
    lines = out.splitlines()
    records = [json.loads(line) for line in lines]
    want = [r for r in read_records(a) + read_records(b) if r["event"] != "checkpoint"]
    assert len(records) == len(want) == 60
    assert Counter(json.dumps(r, sort_keys=True) for r in records) == \
        Counter(json.dumps(r, sort_keys=True) for r in want)
    assert set(lines) <= _lines(a) | _lines(b)  # the logs' own lines, unchanged
    keys = [(r["ts"], r["instance"], r["seq"]) for r in records]
    assert keys == sorted(keys)
    assert {r["instance"] for r in records} == set(INSTANCES)
    ties = [(x["instance"], y["instance"]) for x, y in itertools.pairwise(records)
            if x["ts"] == y["ts"]]
    assert ties and all(t == INSTANCES for t in ties)
    for instance in INSTANCES:  # each log's own order (its chain) is kept
        seqs = [r["seq"] for r in records if r["instance"] == instance]
        assert seqs == sorted(seqs)


def test_query_filters_and_formats_on_merged_output(
        two_logs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Filters apply to both logs; CSV names each row's instance; the table gains an
    instance column with several logs and lists the rows in time order."""
    a, b, _ = two_logs
    logs = ("--log", str(a), "--log", str(b))
    rc, out, _ = _run(capsys, "audit", "query", *logs, "--decision", "deny", "--user",
                      "USER0@corp.example", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    want = [r for r in read_records(a) + read_records(b)
            if r.get("decision") == "deny" and r.get("user") == "user0@corp.example"]
    assert rc == 0 and len(rows) == len(want) > 0
    assert Counter(r["instance"] for r in rows) == Counter(r["instance"] for r in want)
    assert {r["instance"] for r in rows} == set(INSTANCES)
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)

    rc, out, _ = _run(capsys, "audit", "query", *logs, "--protocol", "imap")
    header, *body = out.splitlines()
    assert rc == 0 and header.split()[:3] == ["ts", "instance", "event"]
    assert len(body) == 30
    assert [line.split()[0] for line in body] == sorted(line.split()[0] for line in body)
    assert {line.split()[1] for line in body} == set(INSTANCES)
    rc, out, _ = _run(capsys, "audit", "query", "--log", str(a), "--protocol", "imap")
    assert "instance" not in out.splitlines()[0]  # one log: the table as before
    assert len(out.splitlines()) == 16


def test_query_refuses_a_missing_or_repeated_log(two_logs: tuple[Path, Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A missing log among several, or one log given twice, is a usage error (exit 2),
    never a merge that silently lacks or doubles an instance."""
    a, b, _ = two_logs
    rc, out, err = _run(capsys, "audit", "query", "--log", str(a), "--log",
                        str(b.parent / "nope.jsonl"))
    assert rc == 2 and "nope.jsonl: no such audit log" in err and out == ""
    rc, _, err = _run(capsys, "audit", "query", "--log", str(a), "--log", str(a))
    assert rc == 2 and "given twice" in err


def test_tampered_log_is_named_while_the_other_verifies(
        two_logs: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One record changed in instance b's log: verify and report both exit 1 naming
    b's file and line, and both still show a's log as verified."""
    a, b, pub = two_logs
    lines = b.read_text().splitlines(keepends=True)
    bad = next(i for i, line in enumerate(lines) if '"decision":"deny"' in line)
    lines[bad] = lines[bad].replace('"decision":"deny"', '"decision":"allow"')
    b.write_text("".join(lines))

    rc, out, err = _run(capsys, "audit", "verify", "--log", str(a), "--log", str(b),
                        "--key", str(pub))
    assert rc == 1
    assert f"{a}: ok, 38 records" in out
    assert f"{b}:{bad + 1}:" in err and str(a) not in err

    html_path = tmp_path / "r.html"
    rc, out, err = _run(capsys, "audit", "report", "--log", str(a), "--log", str(b),
                        "--key", str(pub), "--since", "2025-06-01", "--until", "2025-07-01",
                        "-o", str(html_path))
    assert rc == 1 and f"{b}:{bad + 1}:" in err and str(a) not in err
    assert "merged from 2 logs" in out
    data = build_report([a, b], since=datetime(2025, 6, 1, tzinfo=UTC),
                        until=datetime(2025, 7, 1, tzinfo=UTC), keys=[load_verify_key(pub)])
    assert [c.ok for c in data.chains] == [True, False]
    assert data.chain is data.chains[1]
    html = html_path.read_text()
    assert f"Chain verification FAILED</b> for {b}:" in html
    assert f"Verified on their own: {a} (instance mail-a)." in html


def test_report_merges_two_logs(two_logs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The report of two logs: one chain summary per log (instance, records,
    checkpoints, seq range, key), exact totals over both, the deny table in time order
    naming each row's instance, and exports with the instance column."""
    a, b, pub = two_logs
    data = build_report([a, b], since=datetime(2025, 6, 1, tzinfo=UTC),
                        until=datetime(2025, 7, 1, tzinfo=UTC), keys=[load_verify_key(pub)],
                        export_dir=tmp_path / "out")
    assert [c.instances for c in data.chains] == [("mail-a",), ("mail-b",)]
    for chain, log in zip(data.chains, (a, b), strict=True):
        records = read_records(log)
        assert chain.ok and chain.signatures_checked and chain.log == log
        assert chain.records == len(records) == 38
        assert chain.checkpoints == sum(r["event"] == "checkpoint" for r in records)
        assert (chain.first_seq, chain.last_seq) == (1, records[-1]["seq"])
        assert chain.keys_used and chain.fingerprints[0].startswith(chain.keys_used[0])
    everything = [r for r in read_records(a) + read_records(b) if r["event"] == "decision"]
    assert data.decisions == Counter((r["protocol"], r["decision"]) for r in everything)
    assert data.deny_total == len(data.denies) == sum(r["decision"] == "deny"
                                                      for r in everything)
    assert {d.instance for d in data.denies} == set(INSTANCES)
    assert [(d.ts, d.instance, d.seq) for d in data.denies] == \
        sorted((d.ts, d.instance, d.seq) for d in data.denies)
    rows = list(csv.DictReader(data.exported[0].read_text().splitlines()))
    assert Counter(r["instance"] for r in rows) == Counter({"mail-a": 30, "mail-b": 30})
    html = render_report(data)
    assert "2 logs merged by time" in html and "in each of the 2 logs" in html
    assert html.count(f"<td><code>{a}</code></td>") == 1
    assert "<th>instance</th>" in html and "<td>mail-b</td>" in html


def test_merge_is_streamed() -> None:
    """The merge pulls records as they are asked for: endless logs still give their
    first records in time order (nothing is read whole)."""
    def endless(instance: str, offset: int) -> Iterator[dict[str, Any]]:
        for n in itertools.count(1):
            yield {"ts": format_ts(T0 + 2 * n + offset), "instance": instance, "seq": n}

    first = list(itertools.islice(merge_by_time([endless("b", 1), endless("a", 0)]), 6))
    assert [(r["instance"], r["seq"]) for r in first] == [
        ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]


@pytest.mark.pure
def test_table_keeps_streaming_past_its_sizing_rows() -> None:
    """Rows after the sizing look-ahead are printed too, a longer cell only widening
    its own line."""
    rows = [{"ts": format_ts(T0 + i), "event": "decision", "user": "u"}
            for i in range(TABLE_SIZING_ROWS + 5)]
    rows[-1]["user"] = "a-much-longer-user-name@corp.example"
    out = io.StringIO()
    assert format_records(iter(rows), "table", out) == len(rows)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(rows) + 1 and "a-much-longer-user-name" in lines[-1]


@pytest.mark.pure
def test_merge_key_reads_other_spellings_of_a_time() -> None:
    """A ts written with an offset sorts where its instant is; an unreadable one first."""
    z = {"ts": "2025-06-15T15:06:40.000000Z", "instance": "a", "seq": 1}
    offset = {"ts": "2025-06-15T17:06:39+02:00", "instance": "b", "seq": 1}
    junk = {"ts": "yesterday", "instance": "c", "seq": 1}
    assert [r["instance"] for r in sorted([z, offset, junk], key=merge_key)] == \
        ["c", "b", "a"]


_SORTED_TIMES = st.lists(st.integers(0, 40), max_size=25).map(sorted)


@pytest.mark.pure
@given(st.lists(_SORTED_TIMES, min_size=1, max_size=6))
def test_merge_of_sorted_logs_is_sorted_permutation(times: list[list[int]]) -> None:
    """Merging N logs, each in time order, gives every record of every log exactly
    once, in (ts, instance, seq) order, each log's own order kept."""
    logs = [[{"ts": format_ts(T0 + t), "instance": f"i{n % 3}", "seq": s, "log": n}
             for s, t in enumerate(ts, 1)] for n, ts in enumerate(times)]
    merged = list(merge_by_time([iter(log) for log in logs]))
    keys = [merge_key(r) for r in merged]
    assert keys == sorted(keys)
    assert Counter((r["log"], r["seq"]) for r in merged) == \
        Counter((r["log"], r["seq"]) for log in logs for r in log)
    for n in range(len(logs)):
        assert [r["seq"] for r in merged if r["log"] == n] == \
            [r["seq"] for r in logs[n]]


def test_query_logs_of_one_log_is_that_log(two_logs: tuple[Path, Path, Path]) -> None:
    """With one log, query_logs is plain query: the same records in file order."""
    a, _, _ = two_logs
    since = datetime.fromtimestamp(T0, UTC) + timedelta(seconds=20)
    got = list(query_logs([a], since=since))
    assert got and [r["seq"] for r in got] == sorted(r["seq"] for r in got)
    assert all(r["ts"] >= format_ts(since.timestamp()) for r in got)


def test_one_instance_in_two_logs_is_warned(two_logs: tuple[Path, Path, Path],
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of one log given as a second log verifies, but verify and report warn
    that both name the same instance (its records would count twice)."""
    a, _, pub = two_logs
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(a.read_bytes())
    copy.with_name("copy.jsonl.head").write_bytes(a.with_name("audit.jsonl.head").read_bytes())
    rc, _, err = _run(capsys, "audit", "verify", "--log", str(a), "--log", str(copy),
                      "--key", str(pub))
    assert rc == 0 and f"warning: instance mail-a is named by 2 logs: {a}, {copy}" in err
    rc, _, err = _run(capsys, "audit", "report", "--log", str(a), "--log", str(copy),
                      "--key", str(pub), "--since", "2025-06-01", "--until", "2025-07-01",
                      "-o", str(tmp_path / "r.html"))
    assert rc == 0 and "warning: instance mail-a is named by 2 logs" in err
