"""Finding the chain head on disk: when the writer opens the log, after another
process appended or rotated, and after a failure left the head unknown.

Runs under the writer's file lock. A torn last line (a crash mid-write) is moved to
``<path>.torn``; a log cut behind its ``.head`` sidecar, or one whose last record is
unreadable, raises :class:`AuditIntegrityError` and is never extended.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from proxy.audit.files import (
    RECOVERY_SCAN_BYTES,
    append_durably,
    head_path,
    last_record,
    read_head_file,
    rotated_files,
    scan_tail,
    torn_path,
)
from proxy.audit.record import (
    DEFAULT_CHECKPOINT_EVERY,
    ZERO_HASH,
    AuditIntegrityError,
    count_unsealed,
    is_checkpoint,
    parse_sealed,
)
from proxy.oplog import get_logger

log = get_logger("mailward.audit")


class ChainHead(NamedTuple):
    """Where the chain ends: ``size`` bytes of complete records in the live file, the
    last record's ``seq`` and ``hash``, and how many records follow the last checkpoint."""

    size: int
    seq: int
    hash: str
    unsealed: int


class Seal(NamedTuple):
    """The last checkpoint (or, before the first one, the record before the unsealed
    ones): its ``seq`` and ``hash``, and the ``checkpoint_every`` it announced (None:
    no checkpoint seen)."""

    seq: int
    hash: str
    every: int | None


def last_seal(
    window: list[dict[str, Any]], head: ChainHead, known: tuple[int, str] | None
) -> Seal | None:
    """Where the sealed part of the chain ends, from the records :func:`find_head`
    read. ``known``: the seal already known for the records before ``window`` (then
    None is returned when ``window`` holds no checkpoint)."""
    for record in reversed(window):
        if is_checkpoint(record):
            every = record.get("checkpoint_every")
            if type(every) is not int or every < 1:
                every = DEFAULT_CHECKPOINT_EVERY  # written before checkpoints said
            return Seal(record["seq"], record["hash"], every)
    if known is not None:
        return None
    if window:  # every record read is unsealed: the seal is just before them
        return Seal(window[0]["seq"] - 1, window[0].get("prev", ZERO_HASH), None)
    return Seal(head.seq, head.hash, None)


def find_head(
    path: Path, fd: int, file_size: int, known: ChainHead | None
) -> tuple[ChainHead, list[dict[str, Any]]]:
    """The chain head of the live file open as ``fd``, and the records read to find it.
    ``known``: the same file as last seen by this writer; only what another writer
    appended after it is read."""
    if known is not None:
        start, aligned = known.size, True
    else:
        start = max(0, file_size - RECOVERY_SCAN_BYTES)
        aligned = start == 0
    lines, end = scan_tail(fd, start, file_size, aligned=aligned)
    if end < file_size:
        _move_torn(path, fd, end, file_size)
    window = _parse_window(path, lines, known)
    if window:
        seq, head = window[-1]["seq"], window[-1]["hash"]
    elif known is not None:
        seq, head = known.seq, known.hash
    elif end == 0:
        seq, head, window = _head_from_rotated(path)
    else:
        raise AuditIntegrityError(f"cannot find the last record of {path}")
    unsealed = count_unsealed(window, base=known.unsealed if known is not None else 0)
    return ChainHead(end, seq, head, unsealed), window


def _parse_window(
    path: Path, lines: list[bytes], known: ChainHead | None
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for index, raw in enumerate(lines):
        try:
            records.append(parse_sealed(raw))
        except ValueError as exc:
            if index == len(lines) - 1:
                raise AuditIntegrityError(
                    f"last record of {path} is unreadable ({exc}); "
                    "run `mailward audit verify`"
                ) from None
    if (
        known is not None
        and records
        and (records[0]["seq"] != known.seq + 1 or records[0].get("prev") != known.hash)
    ):
        raise AuditIntegrityError(
            f"records appended to {path} by another writer do not continue the chain"
        )
    return records


def _head_from_rotated(path: Path) -> tuple[int, str, list[dict[str, Any]]]:
    """Chain head when the live file is empty: the last rotated file's last record."""
    rotated = rotated_files(path)
    if not rotated:
        return 0, ZERO_HASH, []
    record = last_record(rotated[-1])
    return record["seq"], record["hash"], [record]


def _move_torn(path: Path, fd: int, end: int, size: int) -> None:
    """Move an incomplete last line (a crash mid-write) to ``<path>.torn``."""
    fragment = os.pread(fd, size - end, end)
    torn = torn_path(path)
    append_durably(torn, fragment + b"\n")
    os.ftruncate(fd, end)
    os.fsync(fd)
    log.warning(
        "audit_torn_tail_moved",
        path=str(path),
        torn_file=str(torn),
        offset=end,
        bytes=len(fragment),
    )


def check_head_file(
    path: Path, last_seq: int, window: list[dict[str, Any]]
) -> tuple[int, dict[str, Any] | None]:
    """Refuse a log cut behind its ``.head``. Returns the seq ``.head`` seals (0 if
    none) and the newest checkpoint in ``window`` if it is newer than that (a crash
    left ``.head`` behind, or another writer has not published it yet)."""
    hp = head_path(path)
    try:
        sealed = read_head_file(hp)
    except ValueError as exc:
        raise AuditIntegrityError(str(exc)) from None
    if sealed is not None:
        if sealed["seq"] > last_seq:
            raise AuditIntegrityError(
                f"{hp} seals seq {sealed['seq']} but {path} ends at seq {last_seq}: "
                "records were removed; run `mailward audit verify`"
            )
        for record in window:
            if record["seq"] == sealed["seq"] and record["hash"] != sealed["hash"]:
                raise AuditIntegrityError(
                    f"record seq {sealed['seq']} differs from the checkpoint in {hp}"
                )
    sealed_seq = sealed["seq"] if sealed else 0
    newest = next((r for r in reversed(window) if is_checkpoint(r)), None)
    if newest is not None and newest["seq"] > sealed_seq:
        return sealed_seq, newest
    return sealed_seq, None
