"""Reading the log for people: filters (:func:`query`), output as an aligned table,
JSON lines or CSV (:func:`format_records`), and the times the CLI accepts
(:func:`parse_time`). Query reads; it never checks the chain (that is :func:`verify`)."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

from proxy.audit.files import log_files
from proxy.audit.record import CHECKPOINT_EVENT, canonical_json, parse_line
from proxy.oplog import get_logger

log = get_logger("mailward.audit")


def query(
    path: Path | str,
    *,
    user: str | None = None,
    device: str | None = None,
    decision: str | None = None,
    protocol: str | None = None,
    event: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Records matching every given filter, oldest first, across rotated files and the
    live file. ``user`` is compared case-insensitively; ``since <= ts < until`` (naive
    datetimes are UTC). Checkpoints are left out unless ``event="checkpoint"``.
    Unreadable lines are skipped with a warning (use :func:`verify` to find them)."""
    want_user = user.casefold() if user is not None else None
    since_utc, until_utc = _as_utc(since), _as_utc(until)
    for record in _records(Path(path)):
        kind = record.get("event")
        if (event is None and kind == CHECKPOINT_EVENT) or (event is not None and kind != event):
            continue
        if want_user is not None and str(record.get("user") or "").casefold() != want_user:
            continue
        if device is not None and record.get("device_id") != device:
            continue
        if decision is not None and record.get("decision") != decision:
            continue
        if protocol is not None and record.get("protocol") != protocol:
            continue
        if since_utc or until_utc:
            ts = _record_time(record)
            if ts is None or (since_utc and ts < since_utc) or (until_utc and ts >= until_utc):
                continue
        yield record


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete, readable record of the log at ``path``, oldest first."""
    for file in log_files(path):
        try:
            handle = open(file, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue
        with handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    continue  # a record being written right now
                try:
                    record = parse_line(raw[:-1])
                except ValueError as exc:
                    log.warning(
                        "audit_query_skipped_line", file=str(file), line=lineno, error=str(exc)
                    )
                    continue
                yield record


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _record_time(record: Mapping[str, Any]) -> datetime | None:
    try:
        return _as_utc(datetime.fromisoformat(str(record.get("ts"))))
    except ValueError:
        return None


TABLE_COLUMNS = ("ts", "event", "decision", "user", "device_id", "protocol", "reasons")
CSV_COLUMNS = (
    "seq",
    "ts",
    "event",
    "decision",
    "mode",
    "user",
    "device_id",
    "platform",
    "protocol",
    "listener",
    "client_ip",
    "reasons",
    "posture_age_s",
    "policy_version",
    "latency_us",
)


def reason_codes(reasons: Any) -> list[str]:
    """Codes from a record's ``reasons`` (a list of ``{"code": ...}`` or strings)."""
    if not isinstance(reasons, list):
        return []
    codes = []
    for reason in reasons:
        if isinstance(reason, Mapping):
            codes.append(str(reason.get("code", "")))
        else:
            codes.append(str(reason))
    return codes


def _cell(record: Mapping[str, Any], column: str, reasons_sep: str) -> str:
    if column == "reasons":
        return reasons_sep.join(reason_codes(record.get("reasons")))
    value = record.get(column)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return canonical_json(value)
    return str(value)


def format_records(
    records: Iterable[Mapping[str, Any]],
    fmt: Literal["table", "json", "csv"],
    out: TextIO,
) -> int:
    """Print records as an aligned table, JSON lines or CSV; returns how many."""
    count = 0
    if fmt == "json":
        for record in records:
            out.write(canonical_json(record) + "\n")
            count += 1
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for record in records:
            writer.writerow([_cell(record, c, ";") for c in CSV_COLUMNS])
            count += 1
    elif fmt == "table":
        rows = [[_cell(r, c, ",") or "-" for c in TABLE_COLUMNS] for r in records]
        count = len(rows)
        widths = [len(c) for c in TABLE_COLUMNS]
        for row in rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
        for row in [list(TABLE_COLUMNS), *rows]:
            out.write(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
            out.write("\n")
    else:
        raise ValueError(f"unknown format {fmt!r}; use table, json or csv")
    return count


_RELATIVE = re.compile(r"([0-9]+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time from RFC 3339 (``2025-06-01T12:00:00Z``), a date (``2025-06-01``,
    midnight UTC) or an age ago (``30s``, ``30m``, ``24h``, ``7d``, ``2w``). Returns an
    aware UTC datetime; raises ``ValueError`` with a usage hint."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value.lower())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        base = _as_utc(now) or datetime.now(UTC)
        return base - timedelta(**{_UNITS[unit]: amount})
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        iso = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
        parsed = _as_utc(datetime.fromisoformat(iso))
        assert parsed is not None
        return parsed
    except (ValueError, IndexError):
        raise ValueError(
            f"cannot read time {text!r}: use RFC 3339 (2025-06-01T12:00:00Z), "
            "a date (2025-06-01) or an age such as 30m, 24h, 7d"
        ) from None
