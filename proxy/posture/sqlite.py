"""SQLite posture store: the default, embedded :class:`~proxy.posture.PostureStore`.

One database file holds the posture per device and authority, the replay memory,
issued nonces and the device trust records (aliases, bindings, revocations, change
feed); :mod:`proxy.posture.sqlite_schema` describes the tables and migrates older
files, :mod:`proxy.posture.sqlite_trust` holds the trust-record statements.

Writes run on one dedicated worker thread (a single-thread executor), so the event
loop never blocks on disk and every write is serialised without extra locks. Reads
(the posture a decision needs, the change feed, ping) run on a second thread with its
own connection: in WAL mode a reader never waits for a writer, so a write stuck
behind another process's lock never stalls a login. A write waits at most
:data:`BUSY_TIMEOUT_MS` for the lock, then fails (the API answers 503).
The executor is not tied to an event loop, so the same store also works from a CLI
that calls ``asyncio.run`` several times. The database uses WAL mode and
``BEGIN IMMEDIATE`` transactions with a busy timeout, so a CLI process
(``mailward posture ingest``, ``mailward device revoke``) and a running server can
share the file; the server polls the change feed (:meth:`SqlitePostureStore.changes_since`)
to learn what the CLI changed. The database file is created 0600 and its directory
0700: posture lists every app on every employee's phone.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.posture import DEVICE_AUTHORITY, Posture, TrustRecords, device_key, in_force
from proxy.posture import sqlite_mdm as mdm
from proxy.posture import sqlite_trust as trust
from proxy.posture.sqlite_schema import SCHEMA_VERSION, migrate

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from proxy.posture import Change, CommitResult  # the store interface's result types

#: Clock skew allowed by the attestation format; a ``jti`` is kept until ``exp`` + this.
JTI_SKEW_S = 300
#: How long another process may hold the write lock before a write fails (a
#: temporary refusal within a second beats a login or report hanging).
BUSY_TIMEOUT_MS = 1_000
#: Expired ``jti`` and ``nonce`` rows are deleted at most this often.
PURGE_INTERVAL_S = 60.0

__all__ = ["JTI_SKEW_S", "SCHEMA_VERSION", "SqlitePostureStore", "StoreClosed",
           "read_posture", "read_trust"]

T = TypeVar("T")


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                           timeout=BUSY_TIMEOUT_MS / 1000)


def read_posture(path: str | Path, device_id: str) -> Posture | None:
    """The device's posture in force, read through a read-only connection: for
    one-shot CLI commands (``mailward explain``), which need neither the worker thread
    nor an event loop and must not write. A store that does not exist yet has no
    devices."""
    found = read_postures(path, device_id)
    return in_force(found)


def read_postures(path: str | Path, device_id: str) -> list[Posture]:
    """The device's posture per authority (read-only, see :func:`read_posture`)."""
    path = Path(path)
    if not path.exists():
        return []
    conn = _read_only(path)
    try:
        device = trust.resolve(conn, device_id)
        rows = conn.execute("SELECT json FROM posture WHERE device = ?", (device,)).fetchall()
    finally:
        conn.close()
    return [Posture.from_json(r[0]) for r in rows]


def read_trust(path: str | Path) -> TrustRecords:
    """The trust records (read-only, see :func:`read_posture`)."""
    path = Path(path)
    if not path.exists():
        return TrustRecords({}, frozenset(), {}, 0)
    conn = _read_only(path)
    try:
        return trust.records(conn)
    finally:
        conn.close()


class StoreClosed(RuntimeError):
    """The store was used after :meth:`SqlitePostureStore.close`."""


class SqlitePostureStore:
    """Posture store in one SQLite file; see the module docstring.

    The constructor opens (creating the parent directory and schema if needed) and
    raises ``sqlite3.Error`` / ``OSError`` at once if the database is unusable.
    """

    def __init__(self, path: str | Path, *, purge_interval_s: float = PURGE_INTERVAL_S) -> None:
        self.path = Path(path)
        self._purge_interval_s = purge_interval_s
        from concurrent.futures import ThreadPoolExecutor

        self._executor: ThreadPoolExecutor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="posture-sqlite")
        self._reader: ThreadPoolExecutor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="posture-sqlite-read")
        self._conn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._closed = False
        self._next_purge = 0.0
        self._origin = secrets.token_hex(8)  # tells this store's changes from others'
        try:
            self._executor.submit(self._open).result()
            self._reader.submit(self._open_reader).result()
        except BaseException:
            self._executor.submit(self._close_conn)
            self._executor.shutdown(wait=False)
            self._reader.shutdown(wait=False)
            raise

    # -- PostureStore ------------------------------------------------------------

    async def commit_attestation(
        self, posture: Posture, nonce: str | None, now: float
    ) -> CommitResult:
        """Consume ``nonce``, remember ``posture.jti`` and store the posture, in one
        transaction. ``"bad_nonce"`` / ``"replay"`` leave the database unchanged.

        An older report (smaller ``iat``) than the one stored for the device still
        uses up its nonce and ``jti`` but does not replace the stored posture, so a
        captured, still-valid old report cannot roll a device back to a previous state.
        """
        return await self._run(self._commit, posture, nonce, now)

    async def get(self, device_id: str) -> Posture | None:
        return in_force(await self._run_read(_postures, device_id))

    async def devices_for_user(self, user: str) -> list[Posture]:
        """The posture in force of every device whose posture names ``user``
        (compared case-insensitively)."""
        return await self._run_read(_devices_for_user, user)

    async def device_postures(self, device_id: str) -> list[Posture]:
        """The device's newest posture per authority (the id resolved through aliases)."""
        return await self._run_read(_postures, device_id)

    # -- trust records (each change is a row of the change feed) --------------------

    async def trust_records(self) -> TrustRecords:
        return await self._run_read(trust.records)

    async def changes_since(self, seq: int) -> tuple[int, list[Change]]:
        """Changes after ``seq`` made through *other* store objects (the CLI, another
        server), and the feed position to ask from next time. One indexed query."""
        return await self._run_read(trust.changes_since, seq, self._origin)

    async def revoke(self, device_id: str, why: str, actor: str) -> tuple[str, bool]:
        """(resolved device, newly revoked)."""
        return await self._run(self._write, trust.revoke, device_id, why, actor,
                               time.time(), self._origin)

    async def unrevoke(self, device_id: str) -> tuple[str, bool]:
        return await self._run(self._write, trust.unrevoke, device_id, time.time(),
                               self._origin)

    async def unbind(self, device_id: str) -> tuple[str, bool]:
        return await self._run(self._write, trust.unbind, device_id, time.time(),
                               self._origin)

    async def bind(self, device: str) -> bool:
        """Record that ``device`` (a resolved key) was seen with a verified certificate."""
        return await self._run(self._write, trust.bind, device, time.time(), self._origin)

    async def forget(self, device_id: str) -> tuple[str, bool]:
        return await self._run(self._write, trust.forget, device_id, time.time(),
                               self._origin)

    async def alias(self, device_id: str, other: str) -> str:
        return await self._run(self._write, trust.alias, device_id, other, time.time(),
                               self._origin)

    async def list_devices(self, *, revoked_only: bool = False) -> list[dict[str, Any]]:
        return await self._run_read(trust.list_devices, revoked_only)

    # -- MDM connectors (proxy.mdm): a page of devices per transaction -------------

    async def mdm_commit(self, writes: list[mdm.MdmWrite], now: float) -> list[mdm.MdmResult]:
        return await self._run(self._write, mdm.commit, writes, now, self._origin)

    async def mdm_devices(self, authority: str) -> set[str]:
        return await self._run_read(mdm.devices, authority)

    async def mdm_remove(self, devices: list[str], authority: str, now: float) -> list[str]:
        return await self._run(self._write, mdm.remove, devices, authority, now, self._origin)

    async def not_seen_since(self, before: float) -> list[str]:
        return await self._run_read(mdm.not_seen_since, before)

    async def issue_nonce(self, nonce: str, expires_at: float) -> None:
        """Remember a freshly issued challenge. Raises ``ValueError`` if ``nonce`` was
        issued before (re-issuing must never make a used nonce usable again)."""
        await self._run(self._issue_nonce, nonce, expires_at)

    async def ping(self) -> bool:
        """True when the database answers a trivial query."""
        if self._closed:
            return False
        try:
            return await self._run_read(_ping)
        except (sqlite3.Error, OSError):
            return False

    async def close(self) -> None:
        """Close the database and stop the worker thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        import asyncio  # deferred, like every asyncio use here: see get_sync

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._reader, self._close_reader)
            await loop.run_in_executor(self._executor, self._close_conn)
        finally:
            self._executor.shutdown(wait=False)
            self._reader.shutdown(wait=False)

    def close_sync(self) -> None:
        """Blocking :meth:`close`, for code without an event loop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._reader.submit(self._close_reader).result()
            self._executor.submit(self._close_conn).result()
        finally:
            self._executor.shutdown(wait=True)
            self._reader.shutdown(wait=True)

    # -- plumbing ------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        import asyncio

        if self._closed:
            raise StoreClosed("posture store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _run_read(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(read connection, *args)`` on the reader thread."""
        import asyncio

        if self._closed:
            raise StoreClosed("posture store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._read_with, fn, *args)

    # The reader thread only.

    def _open_reader(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None,
                               timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=True)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA query_only = ON")
        self._rconn = conn

    def _read_with(self, fn: Callable[..., T], *args: object) -> T:
        if self._rconn is None:
            raise StoreClosed("posture store is closed")
        return fn(self._rconn, *args)

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    # Everything below runs on the worker thread only.

    def _open(self) -> None:
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o700, parents=True)
        if not self.path.exists():  # 0600 from the start: no window of a readable file
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode on {self.path}")
            # FULL: an accepted attestation (and its used jti) survives power loss.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrate(conn, self.path)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosed("posture store is closed")
        return self._conn

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _purge_expired(self, now: float) -> None:
        """Delete rows expired at ``now`` (the caller's clock), at most once per purge
        interval (measured on the monotonic clock); call inside a write transaction."""
        tick = time.monotonic()
        if tick < self._next_purge:
            return
        self._next_purge = tick + self._purge_interval_s
        db = self._db()
        db.execute("DELETE FROM jti WHERE expires_at <= ?", (now,))
        db.execute("DELETE FROM nonce WHERE expires_at <= ?", (now,))
        db.execute("DELETE FROM changes WHERE at <= ?", (now - trust.CHANGES_KEEP_S,))

    def _write(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(db, *args)`` in one write transaction."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _commit(self, posture: Posture, nonce: str | None, now: float) -> CommitResult:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = self._commit_in_tx(db, posture, nonce, now)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if result == "ok":
            db.execute("COMMIT")
        else:
            db.execute("ROLLBACK")
        return result

    def _commit_in_tx(
        self, db: sqlite3.Connection, posture: Posture, nonce: str | None, now: float
    ) -> CommitResult:
        if nonce is not None:
            row = db.execute("SELECT expires_at, used FROM nonce WHERE nonce = ?", (nonce,))
            found = row.fetchone()
            if found is None or found[1] or found[0] <= now:
                return "bad_nonce"
        device = trust.resolve(db, posture.device_id)
        if trust.is_revoked(db, device, device_key(posture.device_id)):
            return "revoked"
        authority = posture.authority
        stored = {a: Posture.from_json(t) for a, t in db.execute(
            "SELECT authority, json FROM posture WHERE device = ?", (device,))}
        if authority == DEVICE_AUTHORITY:
            # A device may not move itself out of scope: its platform is the one its
            # MDM posture, or else its first report, gave.
            given = in_force(stored.values())
            if given is not None and given.platform != posture.platform:
                return "platform_mismatch"
        seen = db.execute("SELECT expires_at FROM jti WHERE issuer = ? AND jti = ?",
                          (posture.signer, posture.jti)).fetchone()
        if seen is not None and seen[0] > now:
            return "replay"

        self._purge_expired(now)
        db.execute(
            "INSERT OR REPLACE INTO jti (issuer, jti, expires_at) VALUES (?, ?, ?)",
            (posture.signer, posture.jti, float(posture.exp + JTI_SKEW_S)),
        )
        if nonce is not None:
            db.execute("UPDATE nonce SET used = 1 WHERE nonce = ?", (nonce,))

        if not posture.received_at:
            posture = dataclasses.replace(posture, received_at=now)
        mine = stored.get(authority)
        if mine is None or mine.iat <= posture.iat:
            db.execute(
                "INSERT OR REPLACE INTO posture (device, authority, user, json, received_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (device, authority, posture.user.lower(), posture.to_json(),
                 posture.received_at),
            )
            trust.note_change(db, device, "posture", self._origin, now)
        return "ok"

    def _issue_nonce(self, nonce: str, expires_at: float) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO nonce (nonce, expires_at, used) VALUES (?, ?, 0)",
                (nonce, float(expires_at)),
            )
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK")
            raise ValueError("nonce was already issued") from None
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


# Reads, on the reader thread's connection.

def _ping(db: sqlite3.Connection) -> bool:
    return bool(db.execute("SELECT 1").fetchone() == (1,))


def _postures(db: sqlite3.Connection, device_id: str) -> list[Posture]:
    rows = db.execute("SELECT json FROM posture WHERE device = ?",
                      (trust.resolve(db, device_id),))
    return [Posture.from_json(r[0]) for r in rows]


def _devices_for_user(db: sqlite3.Connection, user: str) -> list[Posture]:
    rows = db.execute(
        "SELECT device, json FROM posture WHERE user = ? ORDER BY device", (user.lower(),)
    )
    by_device: dict[str, list[Posture]] = {}
    for device, text in rows:
        by_device.setdefault(device, []).append(Posture.from_json(text))
    return [p for ps in by_device.values() if (p := in_force(ps)) is not None]
