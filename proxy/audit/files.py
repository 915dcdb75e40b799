"""The files of one log: names, rotation, locking, durable small writes, and reading
the chain across the rotated files and the live file.

``<path>``        the live log          ``<path>.1, .2, ...``  rotated logs, oldest first
``<path>.head``   latest checkpoint     ``<path>.torn``        torn tails moved aside
``<path>.lock``   writers' lock        ``<path>.writers``     held by each open writer
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from proxy.audit.record import (
    MAX_RECORD_BYTES,
    AuditIntegrityError,
    AuditUnavailable,
    is_checkpoint,
    parse_sealed,
    record_hash,
)

#: How much of the file end is read to recover the chain head on open.
RECOVERY_SCAN_BYTES = 4 * MAX_RECORD_BYTES
#: How long a writer waits for another process holding the log lock.
LOCK_TIMEOUT_S = 2.0
LOCK_RETRY_S = 0.002
FILE_MODE = 0o600  # records name users and devices: the service user only (dirs 0700)
#: How the writer opens the live file.
OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)

_ROTATED_SUFFIX = re.compile(r"[0-9]+")


# -- names ----------------------------------------------------------------------------


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def torn_path(path: Path) -> Path:
    return path.with_name(path.name + ".torn")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def writers_path(path: Path) -> Path:
    return path.with_name(path.name + ".writers")


def rotated_files(path: Path) -> list[Path]:
    """``<path>.<n>`` siblings, oldest (lowest n) first."""
    prefix = path.name + "."
    found: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            suffix = entry.name[len(prefix) :]
            if entry.name.startswith(prefix) and _ROTATED_SUFFIX.fullmatch(suffix):
                found.append((int(suffix), entry))
    return [p for _, p in sorted(found)]


def rotation_number(path: Path) -> int | None:
    """n if ``path`` looks like a rotated file ``<name>.<n>``, else None."""
    stem, dot, suffix = path.name.rpartition(".")
    return int(suffix) if stem and dot and _ROTATED_SUFFIX.fullmatch(suffix) else None


def next_rotated(path: Path) -> Path:
    """The name the live file gets when it is rotated now."""
    rotated = rotated_files(path)
    number = (rotation_number(rotated[-1]) or 0) + 1 if rotated else 1
    return path.with_name(f"{path.name}.{number}")


def log_files(path: Path) -> list[Path]:
    """The files holding the chain ``path`` names, oldest first: a rotated file
    (``<name>.<n>``) alone, else the rotated files and then the live file."""
    return [path] if rotation_number(path) is not None else [*rotated_files(path), path]


# -- writing --------------------------------------------------------------------------


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("write made no progress")
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        write_all(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created if need be) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def flock(fd: int, operation: int, timeout_s: float = LOCK_TIMEOUT_S) -> None:
    """``fcntl.flock`` that gives up after ``timeout_s`` with :class:`AuditUnavailable`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise AuditUnavailable(
                    f"audit log lock held by another process for over {timeout_s:g}s"
                ) from None
            time.sleep(LOCK_RETRY_S)


def open_lock(path: Path) -> int:
    """A new descriptor on the log's lock file (``flock`` locks are per descriptor)."""
    return os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)


def open_writers(path: Path) -> tuple[int, bool]:
    """A new descriptor on ``<path>.writers``, which every open writer holds shared,
    and whether no other writer holds it: then it is locked exclusively (until the
    caller takes it shared)."""
    fd = os.open(writers_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd, False
    except OSError:
        os.close(fd)
        raise
    return fd, True


# -- reading --------------------------------------------------------------------------


def scan_tail(fd: int, start: int, size: int, *, aligned: bool) -> tuple[list[bytes], int]:
    """Complete lines (without ``\\n``) in ``[start, size)`` and the offset just after
    the last one. ``aligned``: ``start`` is a line boundary (else the first, partial
    line is dropped)."""
    chunks = []
    offset = start
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    data = b"".join(chunks)
    cut = data.rfind(b"\n")
    if cut < 0:
        if aligned:
            return [], start
        raise AuditIntegrityError(f"no line break in the last {len(data)} bytes of the log")
    lines = data[:cut].split(b"\n")
    if not aligned:
        lines = lines[1:]
    return lines, start + cut + 1


def scan_end(fd: int, size: int) -> tuple[list[bytes], int]:
    """:func:`scan_tail` over the last :data:`RECOVERY_SCAN_BYTES` of a file."""
    start = max(0, size - RECOVERY_SCAN_BYTES)
    return scan_tail(fd, start, size, aligned=start == 0)


def last_record(path: Path) -> dict[str, Any]:
    """The last record of a closed (rotated) file; AuditIntegrityError if it does not
    end with a valid one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        lines, end = scan_end(f.fileno(), size)
    if end != size or not lines:
        raise AuditIntegrityError(f"rotated log {path} does not end with a record")
    try:
        return parse_sealed(lines[-1])
    except ValueError as exc:
        raise AuditIntegrityError(f"last record of {path} is unreadable: {exc}") from None


def read_head_file(path: Path) -> dict[str, Any] | None:
    """The ``.head`` sidecar's checkpoint record, None if absent. Raises ValueError
    if it exists but is not a checkpoint record."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8") from None
    try:
        record = json.loads(text)
    except ValueError:
        raise ValueError(f"{path} is not valid JSON") from None
    if (
        not isinstance(record, dict)
        or not is_checkpoint(record)
        or type(record.get("seq")) is not int
        or record.get("hash") != record_hash(record)
    ):
        raise ValueError(f"{path} does not hold a valid checkpoint record")
    return record


def open_snapshot(path: Path, standalone: bool) -> list[tuple[Path, IO[bytes], int]]:
    """Open the files to read and note their sizes. For a live log this happens under
    a shared lock, so each size ends on a record boundary and no rotation is half done.
    The caller closes the handles."""
    lock_fd: int | None = None
    if not standalone:
        with contextlib.suppress(OSError):
            lock_fd = os.open(lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    handles: list[tuple[Path, IO[bytes], int]] = []
    try:
        if lock_fd is not None:
            with contextlib.suppress(AuditUnavailable):
                flock(lock_fd, fcntl.LOCK_SH)
        names = log_files(path)
        if not standalone and not path.exists() and len(names) > 1:
            names.pop()  # rotated files only (the live file is created on first write)
        for name in names:
            handle = open(name, "rb")  # noqa: SIM115 - closed by the caller
            handles.append((name, handle, os.fstat(handle.fileno()).st_size))
    except BaseException:
        for _, opened, _ in handles:
            opened.close()
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return handles


def read_lines(handle: IO[bytes], limit: int) -> Iterator[bytes]:
    """Lines (with their ``\\n``, if any) in the first ``limit`` bytes of ``handle``."""
    remaining = limit
    while remaining > 0:
        raw = handle.readline(remaining)
        if not raw:
            return
        remaining -= len(raw)
        yield raw
