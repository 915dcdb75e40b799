"""What notices were sent when: the rate limit of :mod:`proxy.notify`, kept across
restarts in ``state/notices.db`` (SQLite).

Reads are dictionary lookups (the IMAP ALERT check runs on the login path); writes
go to the dictionary at once and to SQLite shortly after, in a worker thread
(:meth:`NoticeMemory.flush`), so a restart forgets at most the last moment's
marks. Keys are ``<channel or kind>|<device>|<reason>``; each holds the times of
its recent notices, older ones are dropped as they age out.

Several instances (a Redis posture store) share the rate: :meth:`NoticeMemory.claim`
asks the local memory first (no round trip when this instance already knows the
rate is used up), then claims the notice in Redis in one round trip
(:meth:`~proxy.posture.redis.RedisPostureStore.claim_notice`, a sorted set of times
per key with a TTL), so one device gets one notice per reason per day whichever
instances it reaches. A claim another instance made is remembered locally too. When
Redis does not answer, the local memory decides (a notice may go out twice rather
than not at all).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path

from proxy.oplog import get_logger

log = get_logger("mailward.notify")

#: Marks older than this are dropped at load, whatever a key's window.
KEEP_S = 7 * 86400.0
_SCHEMA = "CREATE TABLE IF NOT EXISTS sent (key TEXT PRIMARY KEY, times TEXT NOT NULL)"

#: ``claim_notice(key, now, window_s, count) -> claimed`` of a shared store.
SharedClaim = Callable[[str, float, float, int], Awaitable[bool]]


class NoticeMemory:
    """Recent notice times per key; ``path`` None keeps them in memory only;
    ``shared`` claims notices in the store several instances share."""

    def __init__(self, path: Path | None, shared: SharedClaim | None = None) -> None:
        self.path = path
        self.shared = shared
        self._shared_error = ""
        self._times: dict[str, list[float]] = {}
        self._dirty: set[str] = set()
        self._flushing: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def load(self, now: float) -> None:
        """Read what earlier runs remembered (marks older than :data:`KEEP_S` are
        dropped). A missing database is an empty memory."""
        if self.path is None:
            return
        with closing(self._connect()) as db, db:
            rows = db.execute("SELECT key, times FROM sent").fetchall()
            stale = []
            for key, times in rows:
                kept = [t for t in json.loads(times) if now - t < KEEP_S]
                if kept:
                    self._times[key] = kept
                else:
                    stale.append((key,))
            db.executemany("DELETE FROM sent WHERE key = ?", stale)

    def _connect(self) -> sqlite3.Connection:
        assert self.path is not None
        db = sqlite3.connect(self.path, timeout=5)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
        return db

    def allows(self, key: str, now: float, count: int, window_s: float) -> bool:
        """Fewer than ``count`` notices under ``key`` in the ``window_s`` before ``now``."""
        times = self._times.get(key)
        return times is None or sum(1 for t in times if now - t < window_s) < count

    async def claim(self, key: str, now: float, count: int, window_s: float) -> bool:
        """Take one notice under ``key`` at ``now`` if the rate allows it, here and
        (when shared) on every instance; True when this caller may send it."""
        if not self.allows(key, now, count, window_s):
            return False
        if self.shared is not None:
            try:
                claimed = await self.shared(key, now, window_s, count)
                self._shared_error = ""
            except Exception as exc:  # Redis down: this instance's memory decides
                claimed = True
                if not self._shared_error:
                    log.warning("shared notice rate unavailable; deciding locally",
                                error=f"{type(exc).__name__}: {exc}")
                self._shared_error = str(exc) or type(exc).__name__
            if not claimed:  # another instance sent it: remember, do not ask again
                self.remember(key, now)
                return False
        self.remember(key, now)
        return True

    def remember(self, key: str, now: float) -> None:
        """A notice under ``key`` at ``now``; persisted shortly (:meth:`flush`)."""
        times = [t for t in self._times.get(key, ()) if now - t < KEEP_S]
        times.append(now)
        self._times[key] = times
        self._dirty.add(key)
        if self.path is not None and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Write the marks not yet on disk (in a worker thread)."""
        async with self._lock:
            if not self._dirty or self.path is None:
                return
            batch = [(k, json.dumps(self._times.get(k, []))) for k in self._dirty]
            self._dirty.clear()
            try:
                await asyncio.to_thread(self._write, batch)
            except (OSError, sqlite3.Error) as exc:  # kept in memory; retried next time
                self._dirty.update(k for k, _ in batch)
                log.error("remembering sent notices failed", path=str(self.path),
                          error=str(exc))

    def _write(self, batch: list[tuple[str, str]]) -> None:
        with closing(self._connect()) as db, db:
            db.executemany("INSERT INTO sent (key, times) VALUES (?, ?) "
                           "ON CONFLICT(key) DO UPDATE SET times = excluded.times", batch)

    async def close(self) -> None:
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await self.flush()


__all__ = ["KEEP_S", "NoticeMemory"]
