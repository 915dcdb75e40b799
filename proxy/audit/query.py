"""Reading the log for people: filters (:func:`query`), several logs (one per
instance) merged by time (:func:`query_logs`, :func:`merge_by_time`), output as an
aligned table, JSON lines or CSV (:func:`format_records`), and the times the CLI
accepts (:func:`parse_time`). Query reads; it never checks the chain (that is
:func:`verify`, which checks each log on its own: a merge never stands in for it).

Merging is a k-way merge (:func:`heapq.merge`) of the logs' own streams, so memory
holds one record per log, whatever their size. The order is :func:`merge_key`:
``ts``, then ``instance``, then ``seq``, then the order the logs were given. Each
log's own order (its chain) is kept as it is: if an instance's clock stepped back,
its records still come out in seq order, next to the nearest times of the others.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

from proxy.audit.files import log_files, rotated_files
from proxy.audit.record import CHECKPOINT_EVENT, canonical_json, format_ts, parse_line
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


def query_logs(paths: Sequence[Path | str], **filters: Any) -> Iterator[dict[str, Any]]:
    """:func:`query` of each log in ``paths`` (same ``filters``), merged by time
    (:func:`merge_by_time`); the records are the logs' own, ``instance`` included."""
    if len(paths) == 1:
        return query(paths[0], **filters)
    return merge_by_time([query(p, **filters) for p in paths])


def log_exists(path: Path) -> bool:
    """Whether a log is at ``path``: its live file or rotated files."""
    return path.exists() or bool(rotated_files(path))


def merge_by_time(streams: Sequence[Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """One stream of the records of ``streams`` (each in its own log order), in
    :func:`merge_key` order; one record per stream is held at a time."""
    return heapq.merge(*streams, key=merge_key)


_FIXED_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


def merge_key(record: Mapping[str, Any]) -> tuple[str, str, int]:
    """(time, instance, seq): the time as the writer formats it (RFC 3339 UTC with
    microseconds and ``Z``, so the strings compare as the times do; another
    spelling of a time is converted, an unreadable one sorts first)."""
    ts = record.get("ts")
    if not (isinstance(ts, str) and _FIXED_TS.fullmatch(ts)):
        moment = _record_time(record)
        ts = format_ts(moment.timestamp()) if moment is not None else ""
    seq = record.get("seq")
    return ts, str(record.get("instance") or ""), seq if type(seq) is int else 0


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
#: With several logs the table also names each record's instance (after ``ts``).
TABLE_COLUMNS_MERGED = ("ts", "instance", *TABLE_COLUMNS[1:])
#: Rows the table reads ahead to size its columns; later rows keep those widths
#: (a longer cell only pushes its own line), so a table of any length is streamed.
TABLE_SIZING_ROWS = 1000
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
    "instance",
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
    *,
    instance: bool = False,
) -> int:
    """Print records as an aligned table, JSON lines or CSV, as they come; returns how
    many. ``instance`` adds that column to the table (CSV always has it)."""
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
        count = _table(records, TABLE_COLUMNS_MERGED if instance else TABLE_COLUMNS, out)
    else:
        raise ValueError(f"unknown format {fmt!r}; use table, json or csv")
    return count


def _table(records: Iterable[Mapping[str, Any]], columns: Sequence[str], out: TextIO) -> int:
    """An aligned table, its widths taken from the first :data:`TABLE_SIZING_ROWS`."""
    rows = ([_cell(r, c, ",") or "-" for c in columns] for r in records)
    ahead = list(itertools.islice(rows, TABLE_SIZING_ROWS))
    widths = [len(c) for c in columns]
    for row in ahead:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    count = 0
    for row in itertools.chain([list(columns)], ahead, rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
        count += 1
    return count - 1


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
