"""The one writer of the log: :class:`AuditLog` (see "Writing" in the package
docstring), and :func:`open_audit_log`, the one way to build it from configuration.

The careful parts, in order of a write: ``_append`` takes the file lock and catches
up with other writers (:mod:`.recovery`), writes the whole line or cuts it off again;
``_durable``/``_group_commit`` run one fsync at a time in a worker thread, each
settling every waiter written before it started; ``_fsync_blocking`` then publishes a
checkpoint it made durable to ``.head``. Any failure is fail-closed (``_fail``).

asyncio is imported only inside the async methods: the CLI's synchronous path never
needs it.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.audit.files import (
    FILE_MODE,
    OPEN_FLAGS,
    atomic_write,
    flock,
    fsync_dir,
    head_path,
    next_rotated,
    open_lock,
    open_writers,
    read_head_file,
    write_all,
)
from proxy.audit.keys import signing_key_from_config
from proxy.audit.record import (
    DEFAULT_CHECKPOINT_EVERY,
    MAX_RECORD_BYTES,
    ZERO_HASH,
    AuditUnavailable,
    canonical_json,
    checkpoint_body,
    is_checkpoint,
    key_id,
    seal,
    validated,
)
from proxy.audit.recovery import ChainHead, check_head_file, find_head, last_seal
from proxy.audit.witness import Witness, WitnessObserver
from proxy.oplog import get_logger

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from proxy.config import AuditConfig, Config

log = get_logger("mailward.audit")

DEFAULT_CHECKPOINT_INTERVAL_S = 60.0
DEFAULT_ROTATE_BYTES = 64 * 1024 * 1024


def open_audit_log(cfg: Config, *, witnessed: bool = True) -> AuditLog:
    """The audit log as ``[audit]`` in mailward.toml describes it: the one way the
    server and the CLI build it. ``witnessed``: report checkpoints and heads
    (:mod:`.witness`); one-shot commands pass False (the server's next head chains over
    their records). Raises :class:`proxy.config.ConfigError` (one line) if the signing
    key is missing, unreadable or not Ed25519 (PKCS#8 PEM)."""
    return AuditLog.from_config(
        cfg.audit,
        signing_key=signing_key_from_config(cfg),
        instance=cfg.server.instance,
        witness=Witness(cfg.audit.witness_url) if witnessed else None,
    )


class AuditLog:
    """The one writer of the decision log (see the package docstring).

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
        instance: str | None = None,
        witness: Witness | None = None,
    ) -> None:
        if checkpoint_every < 1 or checkpoint_interval_s <= 0 or rotate_bytes < 1:
            raise ValueError("checkpoint_every, checkpoint_interval_s, rotate_bytes must be > 0")
        self.path = Path(path)
        self.instance = instance or socket.gethostname()
        self.witness = witness
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
        # (seq, hash) of the last checkpoint, and unsealed records allowed after it.
        self._sealed_head: tuple[int, str] = (0, ZERO_HASH)
        self._seal_limit = checkpoint_every
        self._needs_recover = True
        self._lock_fd: int | None = None
        self._live_fd: int | None = None  # <path>.writers, held shared while open
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
            if self._head_behind():  # a recovery checkpoint, or .head left behind
                self._sync_now()
        except (OSError, AuditUnavailable) as exc:
            self._fail(exc)

    # -- public API -----------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        cfg: AuditConfig,
        *,
        signing_key: Ed25519PrivateKey | None,
        instance: str | None = None,
        witness: Witness | None = None,
    ) -> AuditLog:
        """The log as ``[audit]`` in mailward.toml describes it."""
        return cls(
            cfg.path,
            signing_key=signing_key,
            checkpoint_every=cfg.checkpoint_every,
            checkpoint_interval_s=cfg.checkpoint_interval_s,
            rotate_bytes=cfg.rotate_bytes,
            instance=instance,
            witness=witness,
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

    async def start(self, observer: WitnessObserver | None = None) -> None:
        """Start writing a checkpoint every ``checkpoint_interval_s`` while records
        are unsealed, and posting checkpoints to the witness URL (the queue length
        goes to ``observer``)."""
        import asyncio  # deferred: the CLI's sync path never needs it
        if self.witness is not None:
            await self.witness.start(observer)
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
        if self.witness is not None:
            await self.witness.close()

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
        for fd in [self._fd, self._lock_fd, self._live_fd, *self._retired_fds]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = self._live_fd = None
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

    @overload
    def _append(self, fields: Mapping[str, Any]) -> dict[str, Any]: ...
    @overload
    def _append(
        self, fields: None, *, only_if_unsealed: bool = False
    ) -> dict[str, Any] | None: ...

    def _append(
        self, fields: Mapping[str, Any] | None, *, only_if_unsealed: bool = False
    ) -> dict[str, Any] | None:
        """Write a record (a checkpoint if ``fields`` is None) under the file lock."""
        if self._closed:
            raise AuditUnavailable("audit log is closed")
        # DESIGN: ``instance`` in every record (a caller's own value wins).
        body = None if fields is None else {"instance": self.instance, **validated(fields)}
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
                if self._unsealed >= self._seal_limit:
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
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = open_lock(self.path)
        flock(self._lock_fd, fcntl.LOCK_EX)
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
        record = seal(body, seq=seq, prev=self._head, posix=self._clock())
        data = (canonical_json(record) + "\n").encode("utf-8")
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"audit record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
        try:
            write_all(self._fd, data)
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
        if is_checkpoint(body):
            self._unsealed = 0
            self._pending_head = record
            self._sealed_head = (seq, record["hash"])
            self._seal_limit = self._checkpoint_every
            if self.witness is not None:
                self.witness.written(record)
        else:
            self._unsealed += 1
        return record

    def _checkpoint_body(self, recovery: Mapping[str, Any] | None = None) -> dict[str, Any]:
        meta = {"instance": self.instance, "checkpoint_every": self._checkpoint_every}
        if recovery is not None:
            meta.update(recovery, recovery=True)
        return checkpoint_body(self._seq, self._head, self._signing_key, self._key_id, meta)

    def _rotate(self) -> None:
        """Seal the live file, rename it to the next ``<path>.<n>``, start a new one."""
        assert self._fd is not None
        if self._unsealed:
            self._write_record(self._checkpoint_body())
        os.fsync(self._fd)
        target = next_rotated(self.path)
        os.rename(self.path, target)
        self._retire_fd(self._fd)
        self._fd, self._file_id = None, None
        self._needs_recover = True
        fsync_dir(self.path.parent)
        fd = os.open(self.path, OPEN_FLAGS, FILE_MODE)
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
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, OPEN_FLAGS, FILE_MODE)
        try:
            st = os.fstat(fd)
            known = (
                ChainHead(self._size, self._seq, self._head, self._unsealed) if delta else None
            )
            found, window = find_head(self.path, fd, st.st_size, known)
            self._reconcile_head_file(found.seq, window, opening=opening)
        except BaseException:
            if not delta:
                os.close(fd)
            raise
        self._fd, self._file_id, self._size = fd, (st.st_dev, st.st_ino), found.size
        self._seq, self._head, self._unsealed = found.seq, found.hash, found.unsealed
        self._needs_recover = False
        seal = last_seal(window, found, self._sealed_head if delta else None)
        if seal is not None:
            self._sealed_head = (seal.seq, seal.hash)
            self._seal_limit = min(self._checkpoint_every, seal.every or self._checkpoint_every)
        if self._live_fd is None:
            self._claim_writer()

    def _claim_writer(self) -> None:
        """Hold ``<path>.writers`` shared while open. Taking it exclusively first
        succeeds only if no other writer is alive: unsealed records are then the
        tail of a process that died (a crash), sealed here by a recovery checkpoint
        (DESIGN "Audit log"). Holds the lock."""
        fd, alone = open_writers(self.path)
        try:
            if alone and self._unsealed:
                self._seal_after_crash()
            flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._live_fd = fd

    def _seal_after_crash(self) -> None:
        """A checkpoint marked ``recovery`` naming the head before the tail it seals
        and how many records that tail holds; ``verify`` reports the range as sealed
        after a crash, unwitnessed (``--strict`` fails on it)."""
        count, (seq, digest) = self._unsealed, self._sealed_head
        record = self._write_record(self._checkpoint_body(
            {"previous_head": digest, "previous_head_seq": seq, "sealed": count}
        ))
        (log.error if count > self._seal_limit else log.warning)(
            "audit_recovery_checkpoint", path=str(self.path), seq=record["seq"],
            sealed=count, previous_head_seq=seq, checkpoint_every=self._seal_limit)

    def _reconcile_head_file(
        self, last_seq: int, window: list[dict[str, Any]], *, opening: bool
    ) -> None:
        """Refuse a log cut behind its ``.head``; re-issue ``.head`` if a crash left it
        behind the newest checkpoint in the file. (After opening, a newer checkpoint is
        normal: another writer publishes it after its fsync; publishing twice is safe.)"""
        sealed_seq, newer = check_head_file(self.path, last_seq, window)
        # No _head_lock here (we hold the file lock; _publish_head takes them the other
        # way round). _publish_head re-checks the file, so a stale value is harmless.
        self._head_written_seq = max(self._head_written_seq, sealed_seq)
        if newer is not None:
            if opening:
                log.warning(
                    "audit_head_file_behind", path=str(head_path(self.path)),
                    checkpoint=newer["seq"],
                )
            self._pending_head = newer

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
        fd = open_lock(self.path)
        try:
            flock(fd, fcntl.LOCK_EX)
            hp = head_path(self.path)
            try:
                current = read_head_file(hp)
            except ValueError:
                current = None
            if current is None or current["seq"] < checkpoint["seq"]:
                atomic_write(hp, canonical_json(checkpoint) + "\n")
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
        if self.witness is not None:
            self.witness.durable(upto, None, self.instance)
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
                fd, upto, head = self._fd, self._seq, self._head
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
                    if self.witness is not None:
                        self.witness.durable(upto, head, self.instance)
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
