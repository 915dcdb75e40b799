"""The decision log: an append-only, hash-chained, checkpoint-signed JSON-lines file.

Records
    One JSON object per line (UTF-8, ``\\n``). Callers pass the fields (``event`` plus
    whatever describes the event); the writer adds ``seq`` (1, 2, 3, ...), ``ts``
    (RFC 3339 UTC with microseconds, ``Z``), ``prev`` (the previous record's ``hash``;
    64 zeros for the first record) and ``hash``: the lowercase hex SHA-256 of the
    record without ``hash``, serialised as ``json.dumps(r, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)`` in UTF-8 (:func:`record_hash`). Each
    line is written in exactly that canonical form plus ``hash``, so *any* changed byte
    either breaks the JSON, changes a hashed value or breaks the canonical form.

    Callers pass only descriptive fields: never passwords, tokens or message bodies.
    This module does not (and cannot) scrub values.

Checkpoints
    The chain alone shows that the records are consistent, not that nobody rewrote
    or cut it. Every ``checkpoint_every`` records, every ``checkpoint_interval_s``
    seconds while running, before rotation and on close, the writer appends a
    ``checkpoint`` record sealing the chain head: ``head`` (hash of the record before
    it), ``head_seq``, ``key_id`` (first 16 hex chars of SHA-256 of the raw Ed25519
    public key) and ``sig``, the base64 Ed25519 signature over
    ``f"mailward-audit-checkpoint\\n{head_seq}\\n{head}"``. Once the checkpoint line is
    on disk, the writer atomically replaces ``<path>.head`` with a copy of it. A tail
    cut after the last checkpoint, including the checkpoint line itself, is then
    detectable because ``.head`` names a record the log no longer has. Records after
    the last checkpoint are *unsealed*: deleting them is not detectable.

Files
    ``<path>``        the live log          ``<path>.1, .2, ...``  rotated logs, oldest first
    ``<path>.head``   latest checkpoint     ``<path>.torn``        torn tails moved aside
    ``<path>.lock``   writers' lock

    When the live file exceeds ``rotate_bytes`` it is sealed with a checkpoint and
    renamed to the next ``<path>.<n>``; the chain continues in a fresh file.

Writing
    :class:`AuditLog` is the only writer. ``append`` (CLI) writes and fsyncs one record.
    ``write`` (server) writes the line at once, so records are in call order, and then
    waits for a group commit: one fsync in a worker thread covers every record written
    since the previous one. Each append holds an ``flock`` on ``<path>.lock`` and
    re-reads the tail if another process appended meanwhile, so a CLI command and the
    server can share one log without forking the chain. Failures are fail-closed:
    :class:`AuditUnavailable` is raised, ``healthy`` turns false, a partly written line
    is cut off again, and the next write retries.

Reading
    :func:`verify` checks every line, link, hash and signature across the rotated files
    and the live file and names the first bad line. :func:`query` filters records and
    :func:`format_records` prints them as a table, JSON lines or CSV.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import csv
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TextIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy.oplog import get_logger

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from proxy.config import AuditConfig

log = get_logger("mailward.audit")

ZERO_HASH = "0" * 64
CHECKPOINT_EVENT = "checkpoint"
SIGNATURE_CONTEXT = "mailward-audit-checkpoint"
#: Fields the writer assigns; callers may not pass them.
WRITER_FIELDS = frozenset({"seq", "ts", "prev", "hash"})

DEFAULT_CHECKPOINT_EVERY = 1000  # records
DEFAULT_CHECKPOINT_INTERVAL_S = 60.0
DEFAULT_ROTATE_BYTES = 64 * 1024 * 1024
#: Largest record line the writer accepts.
MAX_RECORD_BYTES = 1024 * 1024
#: How much of the file end is read to recover the chain head on open.
RECOVERY_SCAN_BYTES = 4 * MAX_RECORD_BYTES
#: How long a writer waits for another process holding the log lock.
LOCK_TIMEOUT_S = 2.0
LOCK_RETRY_S = 0.002
FILE_MODE = 0o640

_ROTATED_SUFFIX = re.compile(r"[0-9]+")
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


class AuditUnavailable(Exception):
    """The audit log cannot be written; refuse the action that needed the record."""


class AuditIntegrityError(AuditUnavailable):
    """The existing log is inconsistent (e.g. cut after a checkpoint); the writer will
    not extend it. Run ``mailward audit verify`` and move the damaged files aside."""


# -- pure helpers ---------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    """The serialisation used for hashing and for every line of the log."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(record: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of ``record`` without its ``hash`` field, serialised
    canonically (see the module docstring)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def format_ts(posix: float) -> str:
    """RFC 3339 UTC with microseconds and ``Z``: ``2025-06-01T12:00:00.000000Z``."""
    return datetime.fromtimestamp(posix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes_raw()
    return hashlib.sha256(raw).hexdigest()[:16]


# DER prefixes of an Ed25519 key in PKCS#8 v1 (private) and SubjectPublicKeyInfo
# (public) form, RFC 8410: the raw 32-byte key follows. Recognising them directly
# spares one-shot CLI commands the import of cryptography's whole serialization
# package; anything else goes through cryptography's PEM loader.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def _pem_body(pem: bytes) -> bytes | None:
    lines = [ln.strip() for ln in pem.strip().splitlines()]
    if len(lines) < 3 or not lines[0].startswith(b"-----BEGIN ") or not lines[-1].startswith(
            b"-----END "):
        return None
    try:
        return base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except binascii.Error:
        return None


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 checkpoint key (PKCS#8 PEM). ValueError if it is not one."""
    pem = path.read_bytes()
    der = _pem_body(pem)
    if der and len(der) == 48 and der.startswith(_ED25519_PKCS8_PREFIX):
        return Ed25519PrivateKey.from_private_bytes(der[16:])
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 checkpoint public key (SubjectPublicKeyInfo PEM)."""
    pem = path.read_bytes()
    der = _pem_body(pem)
    if der and len(der) == 44 and der.startswith(_ED25519_SPKI_PREFIX):
        return Ed25519PublicKey.from_public_bytes(der[12:])
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def checkpoint_message(head_seq: int, head: str) -> bytes:
    """The bytes a checkpoint signature covers."""
    return f"{SIGNATURE_CONTEXT}\n{head_seq}\n{head}".encode()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def torn_path(path: Path) -> Path:
    return path.with_name(path.name + ".torn")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


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


def _rotation_number(path: Path) -> int | None:
    """n if ``path`` looks like a rotated file ``<name>.<n>``, else None."""
    stem, dot, suffix = path.name.rpartition(".")
    return int(suffix) if stem and dot and _ROTATED_SUFFIX.fullmatch(suffix) else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("write made no progress")
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        _write_all(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _flock(fd: int, operation: int, timeout_s: float = LOCK_TIMEOUT_S) -> None:
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


def _parse_line(raw: bytes) -> dict[str, Any]:
    """Parse one line (without ``\\n``) strictly: UTF-8 JSON object in canonical form.
    Raises ``ValueError`` with a short description."""
    try:
        text = raw.decode("utf-8")
        record = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not valid UTF-8 JSON") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    try:
        canonical = canonical_json(record)
    except ValueError:
        raise ValueError("not in canonical form") from None
    if canonical != text:
        raise ValueError("not in canonical form")
    return record


def _parse_sealed(raw: bytes) -> dict[str, Any]:
    """:func:`_parse_line` plus an integer ``seq`` and a matching ``hash``."""
    record = _parse_line(raw)
    if type(record.get("seq")) is not int:
        raise ValueError("no integer seq")
    if record.get("hash") != record_hash(record):
        raise ValueError("hash does not match the record")
    return record


def _scan_tail(fd: int, start: int, size: int, *, aligned: bool) -> tuple[list[bytes], int]:
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


def _read_head_file(path: Path) -> dict[str, Any] | None:
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
        or record.get("event") != CHECKPOINT_EVENT
        or type(record.get("seq")) is not int
        or record.get("hash") != record_hash(record)
    ):
        raise ValueError(f"{path} does not hold a valid checkpoint record")
    return record


def _validated(fields: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(fields, Mapping):
        raise TypeError("audit fields must be a mapping")
    reserved = WRITER_FIELDS.intersection(fields)
    if reserved:
        raise ValueError(f"audit fields {sorted(reserved)} are assigned by the writer")
    event = fields.get("event")
    if not isinstance(event, str) or not event:
        raise ValueError("audit fields need a non-empty 'event'")
    if event == CHECKPOINT_EVENT:
        raise ValueError("checkpoint records are written only by the audit log itself")
    return dict(fields)


# -- the writer -----------------------------------------------------------------------


class AuditLog:
    """The one writer of the decision log (see the module docstring).

    Opening never raises for I/O or integrity problems: they leave ``healthy`` false
    with ``last_error`` set, and every write raises :class:`AuditUnavailable` until
    the cause is fixed (writes retry opening the file).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        signing_key: Ed25519PrivateKey | None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if checkpoint_every < 1 or checkpoint_interval_s <= 0 or rotate_bytes < 1:
            raise ValueError("checkpoint_every, checkpoint_interval_s, rotate_bytes must be > 0")
        self.path = Path(path)
        self._signing_key = signing_key
        self._key_id = key_id(signing_key.public_key()) if signing_key else None
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval_s = checkpoint_interval_s
        self._rotate_bytes = rotate_bytes
        self._clock = clock

        self.healthy = True
        self.last_error: str | None = None

        # Chain state, valid while _needs_recover is false.
        self._fd: int | None = None
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of _fd
        self._size = 0  # bytes of complete records in the live file
        self._seq = 0
        self._head = ZERO_HASH
        self._unsealed = 0  # records since the last checkpoint
        self._needs_recover = True
        self._lock_fd: int | None = None
        self._closed = False

        # Durability: waiters (seq, future) settled by fsyncs, oldest first.
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._sync_task: asyncio.Task[None] | None = None
        self._retired_fds: list[int] = []
        self._executor: ThreadPoolExecutor | None = None
        self._ticker: asyncio.Task[None] | None = None

        # The .head sidecar: checkpoint waiting for its fsync, and the last one written.
        self._head_lock = threading.Lock()
        self._pending_head: dict[str, Any] | None = None
        self._head_written_seq = 0

        try:
            with self._locked():
                self._recover(opening=True)
        except (OSError, AuditUnavailable) as exc:
            self._fail(exc)

    # -- public API -----------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: AuditConfig, *, signing_key: Ed25519PrivateKey | None) -> AuditLog:
        """The log as ``[audit]`` in mailward.toml describes it."""
        return cls(
            cfg.path,
            signing_key=signing_key,
            checkpoint_every=cfg.checkpoint_every,
            checkpoint_interval_s=cfg.checkpoint_interval_s,
            rotate_bytes=cfg.rotate_bytes,
        )

    @property
    def seq(self) -> int:
        """seq of the last record written by or known to this writer."""
        return self._seq

    def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record and fsync it before returning it (for the CLI)."""
        record = self._append(fields)
        self._sync_now()
        return record

    async def write(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record now and return it once a group-commit fsync covers it."""
        record = self._append(fields)
        await self._durable(self._seq)
        return record

    def checkpoint(self) -> dict[str, Any]:
        """Append a signed checkpoint sealing the current head, fsync, update ``.head``."""
        record = self._append(None)
        assert record is not None
        self._sync_now()
        return record

    async def start(self) -> None:
        """Start writing a checkpoint every ``checkpoint_interval_s`` while records
        are unsealed."""
        import asyncio  # deferred: the CLI's sync path never needs it
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(
                self._tick(), name="audit-checkpoints"
            )

    async def close(self) -> None:
        """Stop the ticker, seal the log with a final checkpoint and close. Errors are
        logged, not raised (shutdown must go on)."""
        import asyncio  # deferred: the CLI's sync path never needs it
        if self._closed:
            return
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._sync_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._sync_task)
        self.close_sync()

    def close_sync(self) -> None:
        """Blocking :meth:`close` for code without an event loop (the CLI)."""
        if self._closed:
            return
        try:
            if self._append(None, only_if_unsealed=True) is not None or self._head_behind():
                self._sync_now()
        except AuditUnavailable as exc:
            log.error("audit_final_checkpoint_failed", path=str(self.path), error=str(exc))
        self._closed = True
        with contextlib.suppress(RuntimeError):  # futures of an event loop already closed
            self._settle(self._seq, AuditUnavailable("audit log closed"))
        for fd in [self._fd, self._lock_fd, *self._retired_fds]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = None
        self._retired_fds.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()

    async def __aenter__(self) -> AuditLog:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- appending ------------------------------------------------------------------

    def _append(
        self, fields: Mapping[str, Any] | None, *, only_if_unsealed: bool = False
    ) -> dict[str, Any] | None:
        """Write a record (a checkpoint if ``fields`` is None) under the file lock."""
        if self._closed:
            raise AuditUnavailable("audit log is closed")
        body = None if fields is None else _validated(fields)
        try:
            with self._locked():
                self._catch_up()
                if self._size >= self._rotate_bytes:
                    self._rotate()
                if body is None:
                    if only_if_unsealed and self._unsealed == 0:
                        return None
                    return self._write_record(self._checkpoint_body())
                record = self._write_record(body)
                if self._unsealed >= self._checkpoint_every:
                    # A failure is logged by _write_record and retried after the next record.
                    with contextlib.suppress(AuditUnavailable):
                        self._write_record(self._checkpoint_body())
                return record
        except OSError as exc:
            self._needs_recover = True
            self._fail(exc)
            raise AuditUnavailable(f"audit log {self.path} unavailable: {exc}") from exc
        except AuditUnavailable as exc:
            self._fail(exc)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(
                lock_path(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
            )
        _flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        """Make the chain state match the file (another process may have appended,
        rotated, or an earlier failure may have left it unknown). Holds the lock."""
        if self._needs_recover or self._fd is None:
            self._recover()
            return
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            self._recover()
            return
        if (on_disk.st_dev, on_disk.st_ino) != self._file_id or on_disk.st_size < self._size:
            self._recover()
        elif on_disk.st_size > self._size:
            self._recover(delta=True)

    def _write_record(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self._fd is not None
        seq = self._seq + 1
        record = {"seq": seq, "ts": format_ts(self._clock()), **body, "prev": self._head}
        record["hash"] = record_hash(record)
        data = (canonical_json(record) + "\n").encode("utf-8")
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"audit record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            # Never leave part of a record behind: cut the file back to the last record.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._needs_recover = True  # the next write moves the fragment aside
            self._fail(exc)
            raise AuditUnavailable(f"cannot write audit log {self.path}: {exc}") from exc
        self._seq, self._head = seq, record["hash"]
        self._size += len(data)
        if body.get("event") == CHECKPOINT_EVENT:
            self._unsealed = 0
            self._pending_head = record
        else:
            self._unsealed += 1
        return record

    def _checkpoint_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event": CHECKPOINT_EVENT,
            "head": self._head,
            "head_seq": self._seq,
        }
        if self._signing_key is not None:
            sig = self._signing_key.sign(checkpoint_message(self._seq, self._head))
            body["key_id"] = self._key_id
            body["sig"] = base64.b64encode(sig).decode("ascii")
        return body

    def _rotate(self) -> None:
        """Seal the live file, rename it to the next ``<path>.<n>``, start a new one."""
        assert self._fd is not None
        if self._unsealed:
            self._write_record(self._checkpoint_body())
        os.fsync(self._fd)
        rotated = rotated_files(self.path)
        number = (_rotation_number(rotated[-1]) or 0) + 1 if rotated else 1
        target = self.path.with_name(f"{self.path.name}.{number}")
        os.rename(self.path, target)
        self._retire_fd(self._fd)
        self._fd, self._file_id = None, None
        self._needs_recover = True
        _fsync_dir(self.path.parent)
        fd = os.open(self.path, _OPEN_FLAGS, FILE_MODE)
        st = os.fstat(fd)
        self._fd, self._file_id, self._size = fd, (st.st_dev, st.st_ino), 0
        self._needs_recover = False
        log.info("audit_rotated", path=str(self.path), rotated_to=str(target), seq=self._seq)

    # -- recovery -------------------------------------------------------------------

    def _recover(self, *, delta: bool = False, opening: bool = False) -> None:
        """Re-read the chain head from disk. ``delta``: same file, only read what
        another writer appended after our last record. Holds the lock."""
        if delta:
            assert self._fd is not None
            fd = self._fd
        else:
            if self._fd is not None:
                self._retire_fd(self._fd)
                self._fd = None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, _OPEN_FLAGS, FILE_MODE)
        try:
            st = os.fstat(fd)
            if delta:
                start, aligned = self._size, True
            else:
                start = max(0, st.st_size - RECOVERY_SCAN_BYTES)
                aligned = start == 0
            lines, end = _scan_tail(fd, start, st.st_size, aligned=aligned)
            if end < st.st_size:
                self._move_torn(fd, end, st.st_size)
            window = self._parse_window(lines, delta=delta)
            if window:
                seq, head = window[-1]["seq"], window[-1]["hash"]
            elif delta:
                seq, head = self._seq, self._head
            elif end == 0:
                seq, head, window = self._head_from_rotated()
            else:
                raise AuditIntegrityError(f"cannot find the last record of {self.path}")
            unsealed = self._count_unsealed(window, base=self._unsealed if delta else 0)
            self._reconcile_head_file(seq, window, opening=opening)
        except BaseException:
            if not delta:
                os.close(fd)
            raise
        self._fd, self._file_id, self._size = fd, (st.st_dev, st.st_ino), end
        self._seq, self._head, self._unsealed = seq, head, unsealed
        self._needs_recover = False

    def _parse_window(self, lines: list[bytes], *, delta: bool) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for index, raw in enumerate(lines):
            try:
                records.append(_parse_sealed(raw))
            except ValueError as exc:
                if index == len(lines) - 1:
                    raise AuditIntegrityError(
                        f"last record of {self.path} is unreadable ({exc}); "
                        "run `mailward audit verify`"
                    ) from None
        if (
            delta
            and records
            and (records[0]["seq"] != self._seq + 1 or records[0].get("prev") != self._head)
        ):
            raise AuditIntegrityError(
                f"records appended to {self.path} by another writer do not continue the chain"
            )
        return records

    @staticmethod
    def _count_unsealed(window: list[dict[str, Any]], *, base: int) -> int:
        count = base
        for record in window:
            count = 0 if record.get("event") == CHECKPOINT_EVENT else count + 1
        return count

    def _head_from_rotated(self) -> tuple[int, str, list[dict[str, Any]]]:
        """Chain head when the live file is empty: the last rotated file's last record."""
        rotated = rotated_files(self.path)
        if not rotated:
            return 0, ZERO_HASH, []
        with open(rotated[-1], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - RECOVERY_SCAN_BYTES)
            lines, end = _scan_tail(f.fileno(), start, size, aligned=start == 0)
        if end != size or not lines:
            raise AuditIntegrityError(f"rotated log {rotated[-1]} does not end with a record")
        try:
            window = [_parse_sealed(lines[-1])]
        except ValueError as exc:
            raise AuditIntegrityError(
                f"last record of {rotated[-1]} is unreadable: {exc}"
            ) from None
        return window[-1]["seq"], window[-1]["hash"], window

    def _move_torn(self, fd: int, end: int, size: int) -> None:
        """Move an incomplete last line (a crash mid-write) to ``<path>.torn``."""
        fragment = os.pread(fd, size - end, end)
        torn = torn_path(self.path)
        tfd = os.open(torn, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            _write_all(tfd, fragment + b"\n")
            os.fsync(tfd)
        finally:
            os.close(tfd)
        os.ftruncate(fd, end)
        os.fsync(fd)
        log.warning(
            "audit_torn_tail_moved",
            path=str(self.path),
            torn_file=str(torn),
            offset=end,
            bytes=len(fragment),
        )

    def _reconcile_head_file(
        self, last_seq: int, window: list[dict[str, Any]], *, opening: bool
    ) -> None:
        """Refuse a log cut behind its ``.head``; re-issue ``.head`` if a crash left it
        behind the newest checkpoint in the file. (After opening, a newer checkpoint is
        normal: another writer publishes it after its fsync; publishing twice is safe.)"""
        hp = head_path(self.path)
        try:
            sealed = _read_head_file(hp)
        except ValueError as exc:
            raise AuditIntegrityError(str(exc)) from None
        if sealed is not None:
            if sealed["seq"] > last_seq:
                raise AuditIntegrityError(
                    f"{hp} seals seq {sealed['seq']} but {self.path} ends at seq {last_seq}: "
                    "records were removed; run `mailward audit verify`"
                )
            for record in window:
                if record["seq"] == sealed["seq"] and record["hash"] != sealed["hash"]:
                    raise AuditIntegrityError(
                        f"record seq {sealed['seq']} differs from the checkpoint in {hp}"
                    )
        sealed_seq = sealed["seq"] if sealed else 0
        # No _head_lock here (we hold the file lock; _publish_head takes them the other
        # way round). _publish_head re-checks the file, so a stale value is harmless.
        self._head_written_seq = max(self._head_written_seq, sealed_seq)
        newest = next((r for r in reversed(window) if r.get("event") == CHECKPOINT_EVENT), None)
        if newest is not None and newest["seq"] > sealed_seq:
            if opening:
                log.warning("audit_head_file_behind", path=str(hp), checkpoint=newest["seq"])
            self._pending_head = newest

    # -- durability -----------------------------------------------------------------

    def _fsync_blocking(self, fd: int, upto: int) -> None:
        """fsync the log, then publish a checkpoint it made durable to ``.head``."""
        os.fsync(fd)
        with self._head_lock:
            pending = self._pending_head
            if pending is None or pending["seq"] > upto:
                return
            if pending["seq"] > self._head_written_seq:
                self._publish_head(pending)
                self._head_written_seq = pending["seq"]

    def _publish_head(self, checkpoint: dict[str, Any]) -> None:
        # A fresh descriptor: excludes other processes and this process's appender
        # (flock is per open file description). Never called while holding the lock.
        fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            _flock(fd, fcntl.LOCK_EX)
            hp = head_path(self.path)
            try:
                current = _read_head_file(hp)
            except ValueError:
                current = None
            if current is None or current["seq"] < checkpoint["seq"]:
                _atomic_write(hp, canonical_json(checkpoint) + "\n")
        finally:
            os.close(fd)

    def _head_behind(self) -> bool:
        pending = self._pending_head
        return pending is not None and pending["seq"] > self._head_written_seq

    def _sync_now(self) -> None:
        fd, upto = self._fd, self._seq
        if fd is None:
            raise AuditUnavailable(f"audit log {self.path} is not open")
        try:
            self._fsync_blocking(fd, upto)
        except (OSError, AuditUnavailable) as exc:
            self._fail(exc)
            self._settle(upto, AuditUnavailable(f"fsync of {self.path} failed: {exc}"))
            raise AuditUnavailable(f"fsync of {self.path} failed: {exc}") from exc
        self._ok()
        self._settle(upto, None)

    async def _durable(self, seq: int) -> None:
        import asyncio  # deferred: the CLI's sync path never needs it
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append((seq, waiter))
        if self._sync_task is None:
            self._sync_task = loop.create_task(self._group_commit())
        await waiter

    async def _group_commit(self) -> None:
        """One fsync at a time, each covering everything written before it started."""
        import asyncio  # deferred: the CLI's sync path never needs it
        loop = asyncio.get_running_loop()
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, thread_name_prefix="audit-fsync")
        try:
            while self._waiters:
                fd, upto = self._fd, self._seq
                if fd is None:
                    self._settle(upto, AuditUnavailable(f"audit log {self.path} is not open"))
                    continue
                try:
                    await loop.run_in_executor(self._executor, self._fsync_blocking, fd, upto)
                except (OSError, AuditUnavailable) as exc:
                    self._fail(exc)
                    self._settle(upto, AuditUnavailable(f"fsync of {self.path} failed: {exc}"))
                else:
                    self._ok()
                    self._settle(upto, None)
        finally:
            self._sync_task = None
            while self._retired_fds:
                with contextlib.suppress(OSError):
                    os.close(self._retired_fds.pop())

    def _settle(self, upto: int, error: BaseException | None) -> None:
        while self._waiters and self._waiters[0][0] <= upto:
            _, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _retire_fd(self, fd: int) -> None:
        """Stop using a descriptor; records written through it are fsynced first."""
        try:
            os.fsync(fd)
        except OSError as exc:
            self._fail(exc)
            self._settle(self._seq, AuditUnavailable(f"fsync of {self.path} failed: {exc}"))
        else:
            self._settle(self._seq, None)
        if self._sync_task is None:
            with contextlib.suppress(OSError):
                os.close(fd)
        else:
            self._retired_fds.append(fd)  # an fsync may be running on it

    async def _tick(self) -> None:
        import asyncio  # deferred: the CLI's sync path never needs it
        while True:
            await asyncio.sleep(self._checkpoint_interval_s)
            try:
                if self._append(None, only_if_unsealed=True) is not None:
                    await self._durable(self._seq)
            except AuditUnavailable as exc:
                log.warning("audit_checkpoint_failed", path=str(self.path), error=str(exc))

    # -- health ---------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if self.healthy or message != self.last_error:
            log.error("audit_unavailable", path=str(self.path), error=message)
        self.healthy = False
        self.last_error = message

    def _ok(self) -> None:
        if not self.healthy:
            log.info("audit_recovered", path=str(self.path))
        self.healthy = True
        self.last_error = None


# -- verification ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify`. ``bad_line`` is 1-based within ``bad_file``."""

    ok: bool
    records: int = 0  # lines checked, checkpoints included
    checkpoints: int = 0
    unsealed: int = 0  # records after the last checkpoint
    bad_line: int | None = None
    bad_file: Path | None = None
    error: str | None = None
    signatures_checked: bool = False
    files: tuple[Path, ...] = ()


class _Bad(Exception):
    def __init__(self, file: Path, line: int, message: str) -> None:
        super().__init__(message)
        self.file, self.line, self.message = file, line, message


@dataclass
class _ChainState:
    expected_seq: int | None
    prev: str | None
    records: int = 0
    checkpoints: int = 0
    unsealed: int = 0
    last_seq: int = 0


def verify(path: Path | str, verify_key: Ed25519PublicKey | None) -> VerifyResult:
    """Check the log at ``path`` (see the module docstring) and name the first bad line.

    ``path`` is the live log: its rotated siblings are checked first, oldest first, and
    the ``.head`` sidecar is checked against the end. A rotated file (``<name>.<n>``)
    passed explicitly is checked alone, from whatever seq it starts at. Without
    ``verify_key`` signatures are not checked (``signatures_checked`` is false).
    """
    path = Path(path)
    standalone = _rotation_number(path) is not None
    kid = key_id(verify_key) if verify_key is not None else None
    head_file = head_path(path)
    sealed: dict[str, Any] | None = None
    if not standalone:
        try:
            sealed = _read_head_file(head_file)
        except ValueError as exc:
            return VerifyResult(False, bad_line=1, bad_file=head_file, error=str(exc))

    try:
        handles = _open_snapshot(path, standalone)
    except FileNotFoundError as exc:
        return VerifyResult(False, bad_line=1, bad_file=path, error=f"cannot read log: {exc}")

    files = tuple(p for p, _, _ in handles)
    state = _ChainState(expected_seq=None, prev=None)
    sealed_at: tuple[Path, int, str] | None = None
    last_file, last_lines = path, 0
    try:
        for index, (file, handle, size) in enumerate(handles):
            number = _rotation_number(file) if file != path else None
            if index == 0 and not standalone:
                if number not in (None, 1):  # deleting the oldest files is tampering too
                    raise _Bad(file, 1, f"rotated files {path.name}.1 to .{number - 1} are "
                                        f"missing: the chain must start at seq 1")
                state.expected_seq, state.prev = 1, ZERO_HASH
            if index > 0 and number is not None:
                previous = _rotation_number(files[index - 1])
                if previous is not None and number != previous + 1:
                    missing = f"{path.name}.{previous + 1}"
                    raise _Bad(file, 1, f"rotated file {missing} is missing")
            lineno = 0
            for lineno, raw in enumerate(_read_lines(handle, size), 1):
                record = _check_line(file, lineno, raw, state, verify_key, kid)
                if sealed is not None and record["seq"] == sealed["seq"]:
                    sealed_at = (file, lineno, record["hash"])
            last_file, last_lines = file, lineno
    except _Bad as bad:
        return VerifyResult(
            False,
            records=state.records,
            checkpoints=state.checkpoints,
            unsealed=state.unsealed,
            bad_line=bad.line,
            bad_file=bad.file,
            error=bad.message,
            signatures_checked=verify_key is not None,
            files=files,
        )
    finally:
        for _, handle, _ in handles:
            handle.close()

    error: _Bad | None = None
    if not standalone:
        after_end = (last_file, last_lines + 1)
        if sealed is None:
            if state.checkpoints:
                error = _Bad(
                    *after_end,
                    f"{head_file} is missing, so a cut after the last checkpoint "
                    "cannot be ruled out",
                )
        elif sealed["seq"] > state.last_seq:
            error = _Bad(
                *after_end,
                f"{head_file} seals seq {sealed['seq']} but the log ends at seq "
                f"{state.last_seq}: records after line {last_lines} were removed",
            )
        elif sealed_at is not None and sealed_at[2] != sealed["hash"]:
            error = _Bad(
                sealed_at[0],
                sealed_at[1],
                f"record seq {sealed['seq']} differs from the checkpoint in {head_file}",
            )
    return VerifyResult(
        error is None,
        records=state.records,
        checkpoints=state.checkpoints,
        unsealed=state.unsealed,
        bad_line=error.line if error else None,
        bad_file=error.file if error else None,
        error=error.message if error else None,
        signatures_checked=verify_key is not None,
        files=files,
    )


def _open_snapshot(path: Path, standalone: bool) -> list[tuple[Path, IO[bytes], int]]:
    """Open the files to read and note their sizes. For a live log this happens under
    a shared lock, so each size ends on a record boundary and no rotation is half done."""
    lock_fd: int | None = None
    if not standalone:
        with contextlib.suppress(OSError):
            lock_fd = os.open(lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    handles: list[tuple[Path, IO[bytes], int]] = []
    try:
        if lock_fd is not None:
            with contextlib.suppress(AuditUnavailable):
                _flock(lock_fd, fcntl.LOCK_SH)
        names = [path] if standalone else [*rotated_files(path), path]
        if not standalone and not path.exists() and len(names) > 1:
            names.pop()  # rotated files only (the live file is created on first write)
        for name in names:
            handle = open(name, "rb")  # noqa: SIM115 - closed by verify()
            handles.append((name, handle, os.fstat(handle.fileno()).st_size))
    except BaseException:
        for _, handle, _ in handles:
            handle.close()
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return handles


def _read_lines(handle: IO[bytes], limit: int) -> Iterator[bytes]:
    remaining = limit
    while remaining > 0:
        raw = handle.readline(remaining)
        if not raw:
            return
        remaining -= len(raw)
        yield raw


def _check_line(
    file: Path,
    lineno: int,
    raw: bytes,
    state: _ChainState,
    verify_key: Ed25519PublicKey | None,
    kid: str | None,
) -> dict[str, Any]:
    def bad(message: str) -> _Bad:
        return _Bad(file, lineno, message)

    if not raw.endswith(b"\n"):
        raise bad("incomplete last line (no line break)")
    try:
        record = _parse_line(raw[:-1])
    except ValueError as exc:
        raise bad(str(exc)) from None
    seq = record.get("seq")
    if type(seq) is not int:
        raise bad("no integer seq")
    if state.expected_seq is not None and seq != state.expected_seq:
        raise bad(f"seq {seq}, expected {state.expected_seq}")
    if state.prev is not None and record.get("prev") != state.prev:
        raise bad("prev does not match the previous record's hash")
    if record.get("hash") != record_hash(record):
        raise bad("hash does not match the record")
    if not isinstance(record.get("event"), str):
        raise bad("no event")
    if record["event"] == CHECKPOINT_EVENT:
        _check_checkpoint(record, verify_key, kid, bad)
        state.checkpoints += 1
        state.unsealed = 0
    else:
        state.unsealed += 1
    state.records += 1
    state.expected_seq, state.prev, state.last_seq = seq + 1, record["hash"], seq
    return record


def _check_checkpoint(
    record: dict[str, Any],
    verify_key: Ed25519PublicKey | None,
    kid: str | None,
    bad: Callable[[str], _Bad],
) -> None:
    if record.get("head") != record.get("prev") or record.get("head_seq") != record["seq"] - 1:
        raise bad("checkpoint head does not name the previous record")
    if verify_key is None:
        return
    if record.get("key_id") != kid:
        raise bad(f"checkpoint key_id {record.get('key_id')!r} is not the verify key's {kid}")
    try:
        signature = base64.b64decode(record["sig"], validate=True)
        verify_key.verify(signature, checkpoint_message(record["head_seq"], record["head"]))
    except (KeyError, TypeError, binascii.Error, InvalidSignature):
        raise bad("checkpoint signature is not valid") from None


# -- querying ---------------------------------------------------------------------------


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
    path = Path(path)
    files = [path] if _rotation_number(path) is not None else [*rotated_files(path), path]
    want_user = user.casefold() if user is not None else None
    since_utc, until_utc = _as_utc(since), _as_utc(until)
    for file in files:
        try:
            handle = open(file, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue
        with handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    continue  # a record being written right now
                try:
                    record = _parse_line(raw[:-1])
                except ValueError as exc:
                    log.warning(
                        "audit_query_skipped_line", file=str(file), line=lineno, error=str(exc)
                    )
                    continue
                kind = record.get("event")
                if (event is None and kind == CHECKPOINT_EVENT) or (
                    event is not None and kind != event
                ):
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
                    if (
                        ts is None
                        or (since_utc and ts < since_utc)
                        or (until_utc and ts >= until_utc)
                    ):
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
