"""SQLite posture store: the default, embedded :class:`~proxy.posture.PostureStore`.

One database file holds three tables:

``posture``  the latest verified posture per device (``device_id`` primary key; the
             full :class:`~proxy.posture.Posture` as JSON, the lower-cased user and
             when it was received).
``jti``      the replay memory: every accepted report's ``jti`` until ``exp`` plus the
             clock skew.
``nonce``    challenges issued by ``GET /v1/challenge``, each usable once until it
             expires.

All SQLite work runs on one dedicated worker thread (a single-thread executor), so the
event loop never blocks on disk and every operation is serialised without extra locks.
The executor is not tied to an event loop, so the same store also works from a CLI
that calls ``asyncio.run`` several times. The database uses WAL mode and
``BEGIN IMMEDIATE`` transactions with a busy timeout, so a CLI process
(``mailward posture ingest``) and a running server can share the file.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from proxy.posture import CommitResult, Posture

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

#: Clock skew allowed by the attestation format; a ``jti`` is kept until ``exp`` + this.
JTI_SKEW_S = 300
#: How long another process may hold the write lock before an operation fails.
BUSY_TIMEOUT_MS = 5_000
#: Expired ``jti`` and ``nonce`` rows are deleted at most this often.
PURGE_INTERVAL_S = 60.0

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS posture (
    device_id   TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    json        TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS posture_user ON posture (user);
CREATE TABLE IF NOT EXISTS jti (
    jti        TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nonce (
    nonce      TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    used       INTEGER NOT NULL DEFAULT 0
);
"""

T = TypeVar("T")


def read_posture(path: str | Path, device_id: str) -> Posture | None:
    """The device's posture, read through a read-only connection: for one-shot CLI
    commands (``mailward explain``), which need neither the worker thread nor an
    event loop and must not write. A store that does not exist yet has no devices."""
    path = Path(path)
    if not path.exists():
        return None
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        row = conn.execute("SELECT json FROM posture WHERE device_id = ?",
                           (device_id,)).fetchone()
    finally:
        conn.close()
    return None if row is None else Posture.from_json(row[0])


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
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._next_purge = 0.0
        try:
            self._executor.submit(self._open).result()
        except BaseException:
            self._executor.shutdown(wait=False)
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
        return await self._run(self._get, device_id)

    async def devices_for_user(self, user: str) -> list[Posture]:
        """All devices whose posture names ``user`` (compared case-insensitively)."""
        return await self._run(self._devices_for_user, user)

    async def issue_nonce(self, nonce: str, expires_at: float) -> None:
        """Remember a freshly issued challenge. Raises ``ValueError`` if ``nonce`` was
        issued before (re-issuing must never make a used nonce usable again)."""
        await self._run(self._issue_nonce, nonce, expires_at)

    async def ping(self) -> bool:
        """True when the database answers a trivial query."""
        if self._closed:
            return False
        try:
            return await self._run(self._ping)
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
            await loop.run_in_executor(self._executor, self._close_conn)
        finally:
            self._executor.shutdown(wait=False)

    def close_sync(self) -> None:
        """Blocking :meth:`close`, for code without an event loop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._executor.submit(self._close_conn).result()
        finally:
            self._executor.shutdown(wait=True)

    # -- plumbing ------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        import asyncio

        if self._closed:
            raise StoreClosed("posture store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # Everything below runs on the worker thread only.

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.OperationalError(
                    f"{self.path} has schema version {version}; this build knows {SCHEMA_VERSION}"
                )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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

    def _ping(self) -> bool:
        return bool(self._db().execute("SELECT 1").fetchone() == (1,))

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
        seen = db.execute("SELECT expires_at FROM jti WHERE jti = ?", (posture.jti,)).fetchone()
        if seen is not None and seen[0] > now:
            return "replay"

        self._purge_expired(now)
        db.execute(
            "INSERT OR REPLACE INTO jti (jti, expires_at) VALUES (?, ?)",
            (posture.jti, float(posture.exp + JTI_SKEW_S)),
        )
        if nonce is not None:
            db.execute("UPDATE nonce SET used = 1 WHERE nonce = ?", (nonce,))

        if not posture.received_at:
            posture = dataclasses.replace(posture, received_at=now)
        stored = db.execute(
            "SELECT json FROM posture WHERE device_id = ?", (posture.device_id,)
        ).fetchone()
        if stored is None or Posture.from_json(stored[0]).iat <= posture.iat:
            db.execute(
                "INSERT INTO posture (device_id, user, json, received_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (device_id) DO UPDATE SET user = excluded.user,"
                " json = excluded.json, received_at = excluded.received_at",
                (posture.device_id, posture.user.lower(), posture.to_json(), posture.received_at),
            )
        return "ok"

    def _get(self, device_id: str) -> Posture | None:
        row = self._db().execute("SELECT json FROM posture WHERE device_id = ?", (device_id,))
        found = row.fetchone()
        return None if found is None else Posture.from_json(found[0])

    def _devices_for_user(self, user: str) -> list[Posture]:
        rows = self._db().execute(
            "SELECT json FROM posture WHERE user = ? ORDER BY device_id", (user.lower(),)
        )
        return [Posture.from_json(r[0]) for r in rows]

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
