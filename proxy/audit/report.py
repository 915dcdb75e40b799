"""The auditor's report, part one: what goes into it, gathered in one streaming pass.

:func:`build_report` verifies each log's chain on its own
(:func:`proxy.audit.verify.verify`, its own pass per log: one summary per log, so a
broken log is named as such and the others still show as verified), then reads the
logs once, oldest first; several logs (one per instance) are merged by time as they
are read (:func:`proxy.audit.query.merge_by_time`, one record per log in memory). It
keeps only counters and bounded collections whatever the logs' size:

* exact totals: records by event, decisions by protocol and outcome;
* allow/deny per protocol in time buckets (at most :data:`MAX_BUCKETS` per series);
* deny reasons, prohibited apps, users and devices denied (counters keyed by value,
  so they grow with the population of users and devices, not with the log);
* the policy timeline (``policy_reload`` / ``policy_rollback`` / ``policy_push`` /
  ``policy_preview``, the newest :data:`MAX_TIMELINE` of them);
* the newest :data:`MAX_DENIES` denies (a deque), each with its instance and hash.

``export_dir`` writes every selected record (checkpoints excepted) as CSV and JSON
lines during the same pass. ``no_client_ip`` leaves the addresses (:data:`IP_FIELDS`)
out of everything: table, exports and counters. :mod:`.report_html` renders the result.
"""

from __future__ import annotations

import collections
import csv
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.audit.files import open_snapshot, read_lines, rotation_number
from proxy.audit.query import CSV_COLUMNS, log_exists, merge_by_time, parse_time, reason_codes
from proxy.audit.record import CHECKPOINT_EVENT, canonical_json, format_ts
from proxy.audit.verify import VerifyResult, verify
from proxy.audit.witness import Witnessed

#: The newest denies listed one by one; everything else is counted exactly.
MAX_DENIES = 5000
#: Policy events kept for the timeline (the newest).
MAX_TIMELINE = 2000
#: Time buckets per chart series at most.
MAX_BUCKETS = 240
#: Bucket widths to choose from (seconds), the narrowest that fits MAX_BUCKETS wins.
BUCKET_WIDTHS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
#: Events drawn on the policy timeline.
POLICY_EVENTS = frozenset({"policy_reload", "policy_rollback", "policy_push", "policy_preview"})
#: Fields holding a client's address: left out everywhere with ``no_client_ip``.
IP_FIELDS = ("client_ip",)
#: Entries in each top list.
TOP = 15


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """What :func:`verify` said about one log when the report was made."""

    log: Path
    ok: bool
    error: str | None
    records: int
    checkpoints: int
    unsealed: int
    signatures_checked: bool
    fingerprints: tuple[str, ...]  # of the keys given (hex SHA-256)
    keys_used: tuple[str, ...]  # key_ids that verified checkpoints
    first_seq: int | None
    last_seq: int | None
    witnessed: int  # heads a witness file named that the log holds
    witness_given: bool
    recovered: tuple[tuple[int, int], ...]  # sealed after a crash, unwitnessed
    instances: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    ts: str
    event: str
    result: str
    version: str
    sha256: str
    previous: str
    actor: str
    detail: str


@dataclass(frozen=True, slots=True)
class DenyRow:
    instance: str
    seq: int
    ts: str
    user: str
    device: str
    protocol: str
    listener: str
    client_ip: str
    reasons: str
    app: str
    mode: str
    policy_version: str
    hash: str


@dataclass
class ReportData:
    """Everything the HTML shows (see the module docstring)."""

    logs: tuple[Path, ...]
    since: datetime
    until: datetime
    generated: datetime
    no_client_ip: bool
    bucket_s: int
    chains: tuple[ChainSummary, ...] = ()  # one per log, in the order given
    selected: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    events: Counter[str] = field(default_factory=Counter)
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    series: dict[tuple[str, str], Counter[int]] = field(default_factory=dict)
    deny_reasons: Counter[str] = field(default_factory=Counter)
    deny_apps: Counter[str] = field(default_factory=Counter)
    deny_users: Counter[str] = field(default_factory=Counter)
    deny_devices: Counter[str] = field(default_factory=Counter)
    users: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    actors: Counter[str] = field(default_factory=Counter)
    timeline: collections.deque[PolicyEvent] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_TIMELINE))
    timeline_total: int = 0
    denies: collections.deque[DenyRow] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_DENIES))
    deny_total: int = 0
    unreadable: int = 0
    exported: tuple[Path, ...] = ()

    @property
    def log(self) -> Path:
        return self.logs[0]

    @property
    def chain(self) -> ChainSummary | None:
        """The first log's summary that does not verify, else the first log's."""
        return next((c for c in self.chains if not c.ok), self.chains[0] if self.chains
                    else None)

    @property
    def protocols(self) -> list[str]:
        return sorted({p for p, _ in self.decisions})

    def bucket_start(self, index: int) -> datetime:
        return datetime.fromtimestamp(self.since.timestamp() + index * self.bucket_s, UTC)


def bucket_width(since: datetime, until: datetime) -> int:
    """The narrowest of :data:`BUCKET_WIDTHS` that covers ``[since, until)`` in at most
    :data:`MAX_BUCKETS` buckets (the widest if none does)."""
    span = max(1.0, (until - since).total_seconds())
    return next((w for w in BUCKET_WIDTHS if span / w <= MAX_BUCKETS), BUCKET_WIDTHS[-1])


def report_window(since: str | None, until: str | None,
                  now: datetime | None = None) -> tuple[datetime, datetime]:
    """``[since, until)`` from the CLI's or the API's text (default: the last 30 days).
    ValueError with a usage hint for an unreadable time or an empty window."""
    now = now or datetime.now(UTC)
    end = parse_time(until, now=now) if until else now
    start = parse_time(since, now=now) if since else end - timedelta(days=30)
    if start >= end:
        raise ValueError(f"the period is empty: since {start.isoformat()} is not before "
                         f"until {end.isoformat()}")
    return start, end


def build_report(
    path: Path | str | Sequence[Path | str],
    *,
    since: datetime,
    until: datetime,
    keys: Sequence[Ed25519PublicKey] = (),
    witness: Sequence[Witnessed] | None = None,
    no_client_ip: bool = False,
    export_dir: Path | None = None,
    now: datetime | None = None,
) -> ReportData:
    """Verify the log at ``path`` (or each of several, one per instance) and gather
    the report of ``since <= ts < until`` over all of them, merged by time."""
    logs = (Path(path),) if isinstance(path, str | Path) else tuple(Path(p) for p in path)
    if not logs:
        raise ValueError("no audit log to report on")
    for log in logs:
        if not log_exists(log):
            raise ValueError(f"{log}: no such audit log")
    data = ReportData(logs, since, until, now or datetime.now(UTC), no_client_ip,
                      bucket_width(since, until))
    data.chains = tuple(
        summarise_chain(log, verify(log, list(keys) or None, witness=witness or ()), keys,
                        witness is not None) for log in logs)
    with ExitStack() as stack:
        sinks = _open_exports(stack, export_dir, no_client_ip) if export_dir else None
        for record in _merged_window(logs, since, until, data):
            if no_client_ip:
                for name in IP_FIELDS:
                    record.pop(name, None)
            _count(data, record)
            if sinks is not None:
                sinks.write(record)
        if sinks is not None:
            data.exported = sinks.paths
    return data


def summarise_chain(log: Path, result: VerifyResult, keys: Sequence[Ed25519PublicKey],
                    witness_given: bool) -> ChainSummary:
    from proxy.audit.command import fingerprint

    first = last = None
    if result.files:
        first, last = _seq_bounds(result.files)
    return ChainSummary(
        log=log, ok=result.ok,
        error=(f"{result.bad_file or log}:{result.bad_line}: {result.error}" if not result.ok
               else None),
        records=result.records, checkpoints=result.checkpoints, unsealed=result.unsealed,
        signatures_checked=result.signatures_checked,
        fingerprints=tuple(fingerprint(k) for k in keys), keys_used=result.keys_used,
        first_seq=first, last_seq=last, witnessed=result.witnessed,
        witness_given=witness_given, recovered=result.recovered,
        instances=result.instances)


def _seq_bounds(files: Sequence[Path]) -> tuple[int | None, int | None]:
    """seq of the first record of the oldest file and of the last of the newest (read
    from the ends of the files, not the whole log)."""
    first = last = None
    try:
        with open(files[0], "rb") as handle:
            first = _seq_of(handle.readline())
        with open(files[-1], "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - 2 * 1024 * 1024))
            lines = [ln for ln in handle.read().split(b"\n") if ln.strip()]
            last = _seq_of(lines[-1]) if lines else None
    except OSError:
        pass
    return first, last


def _seq_of(raw: bytes) -> int | None:
    try:
        seq = json.loads(raw).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if type(seq) is int else None


def _merged_window(logs: Sequence[Path], since: datetime, until: datetime,
                   data: ReportData) -> Iterator[dict[str, Any]]:
    """:func:`_window` of each log, merged by time (one log: its window as it is)."""
    if len(logs) == 1:
        return _window(logs[0], since, until, data)
    return merge_by_time([_window(log, since, until, data) for log in logs])


def _window(path: Path, since: datetime, until: datetime,
            data: ReportData) -> Iterator[dict[str, Any]]:
    """Records (checkpoints excepted) with ``since <= ts < until``, oldest first,
    read once from a snapshot of the files. ``ts`` is RFC 3339 UTC in one fixed
    format, so comparing the strings compares the times."""
    low, high = format_ts(since.timestamp()), format_ts(until.timestamp())
    handles = open_snapshot(path, rotation_number(path) is not None)
    try:
        for _, handle, size in handles:
            for raw in read_lines(handle, size):
                try:
                    record = json.loads(raw)
                    ts = record["ts"]
                except (ValueError, KeyError, TypeError):
                    data.unreadable += 1
                    continue
                if not isinstance(ts, str) or not low <= ts < high:
                    continue
                if record.get("event") == CHECKPOINT_EVENT:
                    continue
                yield record
    finally:
        for _, handle, _ in handles:
            handle.close()


def _count(data: ReportData, record: dict[str, Any]) -> None:
    """Add one selected record to the counters (see the module docstring)."""
    data.selected += 1
    seq = record.get("seq")
    if type(seq) is int:
        data.first_seq = seq if data.first_seq is None else data.first_seq
        data.last_seq = seq
    event = str(record.get("event"))
    data.events[event] += 1
    actor = record.get("actor")
    if actor:
        data.actors[str(actor)] += 1
    if event in POLICY_EVENTS:
        data.timeline_total += 1
        data.timeline.append(_policy_event(record))
        return
    if event != "decision":
        return
    protocol, outcome = str(record.get("protocol") or "-"), str(record.get("decision"))
    data.decisions[protocol, outcome] += 1
    try:
        at = datetime.fromisoformat(record["ts"]).timestamp()
    except ValueError:
        at = data.since.timestamp()
    bucket = int((at - data.since.timestamp()) // data.bucket_s)
    data.series.setdefault((protocol, outcome), Counter())[bucket] += 1
    user, device = str(record.get("user") or ""), str(record.get("device_id") or "")
    if user:
        data.users.add(user)
    if device:
        data.devices.add(device)
    if outcome == "deny":
        _count_deny(data, record, user, device, protocol)


def _count_deny(data: ReportData, record: dict[str, Any], user: str, device: str,
                protocol: str) -> None:
    data.deny_total += 1
    codes = reason_codes(record.get("reasons"))
    apps = _apps(record.get("reasons"))
    data.deny_reasons.update(codes or ["(none)"])
    data.deny_apps.update(apps)
    if user:
        data.deny_users[user] += 1
    if device:
        data.deny_devices[device] += 1
    data.denies.append(DenyRow(
        instance=str(record.get("instance") or ""), seq=int(record.get("seq") or 0),
        ts=str(record.get("ts")), user=user, device=device,
        protocol=protocol, listener=str(record.get("listener") or ""),
        client_ip=str(record.get("client_ip") or ""), reasons=", ".join(codes),
        app=", ".join(apps), mode=str(record.get("mode") or ""),
        policy_version=str(record.get("policy_version") or ""),
        hash=str(record.get("hash") or "")))


def _apps(reasons: Any) -> list[str]:
    """Names (else ids) of the apps a record's reasons name, each once."""
    out: list[str] = []
    for reason in reasons if isinstance(reasons, list) else ():
        if isinstance(reason, dict):
            app = reason.get("app_name") or reason.get("app_id")
            if app and str(app) not in out:
                out.append(str(app))
    return out


def _policy_event(record: dict[str, Any]) -> PolicyEvent:
    """One timeline entry: the version it made active (or previewed) and by whom."""
    def text(*names: str) -> str:
        for name in names:
            value = record.get(name)
            if value not in (None, ""):
                return str(value)
        return ""

    version = text("new_version", "to_version", "version", "candidate_version")
    sha = text("new_sha256", "to_sha256", "sha256", "candidate_sha256")
    previous = text("old_version", "from_version", "previous_version")
    detail = text("trigger", "via", "error")
    counts = [f"{k.removeprefix('newly_')} {record[k]}" for k in
              ("newly_denied", "newly_allowed") if isinstance(record.get(k), int)]
    if counts:
        detail = ", ".join(filter(None, [detail, *counts]))
    return PolicyEvent(ts=str(record.get("ts")), event=str(record.get("event")),
                       result=text("result") or "applied", version=version,
                       sha256=sha[:12], previous=previous, actor=text("actor") or "-",
                       detail=detail)


class _Exports:
    """CSV and JSON lines of every selected record, written as the pass goes."""

    def __init__(self, csv_file: TextIO, jsonl: TextIO, paths: tuple[Path, ...],
                 no_client_ip: bool) -> None:
        self.columns = [c for c in (*CSV_COLUMNS, "actor", "hash")
                        if not (no_client_ip and c in IP_FIELDS)]
        self.csv = csv.writer(csv_file, lineterminator="\n")
        self.csv.writerow(self.columns)
        self.jsonl = jsonl
        self.paths = paths

    def write(self, record: dict[str, Any]) -> None:
        self.csv.writerow([_cell(record, c) for c in self.columns])
        self.jsonl.write(canonical_json(record) + "\n")


def _cell(record: dict[str, Any], column: str) -> str:
    if column == "reasons":
        return ";".join(reason_codes(record.get("reasons")))
    value = record.get(column)
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return canonical_json(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _open_exports(stack: ExitStack, directory: Path, no_client_ip: bool) -> _Exports:
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, jsonl_path = directory / "audit-report.csv", directory / "audit-report.jsonl"
    csv_file = stack.enter_context(csv_path.open("w", encoding="utf-8", newline=""))
    jsonl = stack.enter_context(jsonl_path.open("w", encoding="utf-8"))
    return _Exports(csv_file, jsonl, (csv_path, jsonl_path), no_client_ip)
