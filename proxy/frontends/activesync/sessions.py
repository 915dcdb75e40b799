"""Device-sessions: the run of requests of one (device id, user, client certificate) on
one listener that a single ``decision`` record covers.

* its first request registers the session with the gate *before* the gate decides
  (:meth:`DeviceSessions.pending`), so a posture change, revocation or policy reload
  that lands while the decision is being made reaches it too; on allow the decision is
  cached (:meth:`DeviceSessions.activate`), on deny the session is abandoned;
* every later request of that key reuses the decision and is counted. The key holds
  the fingerprint of the connection's verified client certificate (or ``""``): an
  allow made with a certificate is never reused by a request without it or with
  another one, nor the other way round;
* it ends when the gate ends it (a new posture, revocation or policy now denies: the
  gate writes ``session_end`` with the trigger, and open requests end with 403 within
  2 s), when the policy version changes (the next request decides again), when the
  decision is :data:`DECISION_MAX_AGE_S` old, after :data:`IDLE_S` without requests,
  when the upstream answers 401 (credentials changed), or when the listener closes;
* its end writes a ``session_end`` record with ``reason`` = ``eas_session``, the
  cause in ``detail`` and ``requests=N``, the number of requests the decision covered.

A session dropped from the cache while requests are still open on it (a policy
version change, a replacement, a 401) stays registered with the gate until its last
request ends (it is *retired*): every re-evaluation still covers an open Ping or Sync,
whatever happened to its session before.

So an auditor attributes a request to the latest ``decision`` record of the same
listener, device and user before it, up to the matching ``session_end``. A denied
request is never cached: each gets its own ``decision`` record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final

from proxy.gate import Identity, Origin

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.frontends.activesync.guard import LoginThrottle
    from proxy.gate import Gate
    from proxy.policy import Decision

#: A decision covers a device-session for at most this long, then is made again.
DECISION_MAX_AGE_S: Final = 3600.0
#: A device-session without requests for this long ends (phones Ping far more often).
IDLE_S: Final = 2 * 3600.0
#: How often idle and over-age device-sessions are swept.
SWEEP_INTERVAL_S: Final = 60.0

#: (device id as claimed, user key, client certificate fingerprint or "").
SessionKey = tuple[str, str, str]


def session_key(identity: Identity) -> SessionKey:
    """The cache key of a request's identity facts (see module docstring)."""
    cert = identity.cert
    return (identity.device_id or "", identity.user_key,
            cert.fingerprint if cert is not None else "")


class DeviceSession:
    """One cached allow decision: a ``LiveSession`` the gate may end."""

    __slots__ = ("created", "ended", "identity", "key", "last_used", "origin",
                 "policy_version", "requests", "retired", "table", "tasks")

    def __init__(self, identity: Identity, origin: Origin, policy_version: str,
                 created: float, table: DeviceSessions, key: SessionKey | None = None
                 ) -> None:
        self.identity = identity
        self.origin = origin
        self.policy_version = policy_version
        self.created = created
        self.table = table
        self.key: SessionKey = key if key is not None else session_key(identity)
        self.last_used = created
        self.requests = 0
        self.ended: str | None = None  # remediation text once the gate ended it
        self.retired = False  # out of the cache, registered until its requests end
        self.tasks: set[asyncio.Task[Any]] = set()

    def begin(self, task: asyncio.Task[Any], now: float) -> None:
        """A request starts on this session."""
        self.requests += 1
        self.last_used = now
        self.tasks.add(task)

    def covered(self, now: float) -> None:
        """A request with nothing left open on it (nginx's ``auth_request``, whose
        phone request nginx then proxies itself) was covered by this decision."""
        self.requests += 1
        self.last_used = now

    def finish(self, task: asyncio.Task[Any], now: float) -> None:
        """A request on this session ended; a retired session leaves the gate with
        its last request."""
        self.tasks.discard(task)
        self.last_used = now
        if self.retired and not self.tasks:
            self.table.gate.unregister(self)

    async def auth_failed(self, request: web.BaseRequest) -> None:
        """The upstream answered 401 to ``request``: the credentials stopped working,
        so the decision no longer applies, and it is a failed login (its answer waits
        when the pair is throttled)."""
        await self.table.drop(self, "auth_failed")
        throttle = self.table.throttle
        if throttle is not None:
            await throttle.failed(self.identity.user, request.remote or "",
                                  self.identity.cert)

    async def terminate(self, text: str) -> None:
        """The gate ended this session: answer open requests 403, forget the decision."""
        self.ended = text
        for task in list(self.tasks):
            task.cancel()
        await self.table.drop(self, "terminated", unregister=False)


class DeviceSessions:
    """The device-sessions of one listener, by :data:`SessionKey`."""

    def __init__(self, gate: Gate, clock: Callable[[], float],
                 throttle: LoginThrottle | None = None) -> None:
        self.gate = gate
        self.clock = clock
        #: Failed logins on cached sessions (an upstream 401) are counted here.
        self.throttle = throttle
        self.by_key: dict[SessionKey, DeviceSession] = {}
        #: Keys whose first request is being decided, and when that is over.
        self.admitting: dict[SessionKey, asyncio.Future[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def cached(self, key: SessionKey) -> DeviceSession | None:
        """The cached device-session when it stands as it is: no admission of its key
        under way, not ended, decided under the policy in force, not past its age (or
        still busy); else None, and :meth:`current` sorts it out. (Not a coroutine:
        nearly every request takes this path.)"""
        session = self.by_key.get(key)
        if session is None or session.ended is not None or key in self.admitting or \
                session.policy_version != self.gate.policy.version or \
                (self.clock() - session.created > DECISION_MAX_AGE_S and not session.tasks):
            return None
        return session

    async def current(self, key: SessionKey) -> DeviceSession | None:
        """The cached device-session, if still valid; waits for a concurrent admission
        of the same key so a burst of first requests writes one decision."""
        while (pending := self.admitting.get(key)) is not None:
            await asyncio.shield(pending)
        session = self.cached(key)
        if session is not None:
            return session
        session = self.by_key.get(key)
        if session is None or session.ended is not None:
            return None
        # Not cached as it stands (and no admission under way): the policy changed, or
        # the decision is too old.
        changed = session.policy_version != self.gate.policy.version
        await self.drop(session, "policy_changed" if changed else "max_age")
        return None

    @contextlib.asynccontextmanager
    async def admission(self, key: SessionKey) -> AsyncIterator[DeviceSession | None]:
        """One admission per key at a time. Yields the session another request admitted
        meanwhile, or None: then the caller holds the key until the block ends, and a
        burst of first requests waits for it, then reuses its session or (after a
        refusal, which is never cached) admits on its own."""
        while (pending := self.admitting.get(key)) is not None:
            await asyncio.shield(pending)
            session = await self.current(key)
            if session is not None:
                yield session
                return
        # No await between the check above and this claim.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.admitting[key] = done
        try:
            yield None
        finally:
            if self.admitting.get(key) is done:
                del self.admitting[key]
            done.set_result(None)

    def pending(self, identity: Identity, origin: Origin, policy_version: str,
                key: SessionKey) -> DeviceSession:
        """A session about to be decided, registered with the gate already: a
        re-evaluation that runs during the decision ends it (``ended`` is set)."""
        session = DeviceSession(identity, origin, policy_version, self.clock(), self, key)
        self.gate.register(session)
        return session

    def abandon(self, session: DeviceSession) -> None:
        """The decision refused (or failed): the pending session never was."""
        self.gate.unregister(session)

    async def decide(self, identity: Identity, origin: Origin, key: SessionKey
                     ) -> tuple[Decision, DeviceSession | None]:
        """The gate's decision on a new device-session, made with the session
        registered (:meth:`pending`); with it the session on allow (for
        :meth:`activate`), None on a refusal (abandoned, as on an error)."""
        session = self.pending(identity, origin, self.gate.policy.version, key)
        try:
            decision = await self.gate.decide(identity, origin)
        except BaseException:
            self.abandon(session)
            raise
        if not decision.allow:
            self.abandon(session)
            return decision, None
        return decision, session

    async def activate(self, session: DeviceSession) -> bool:
        """Cache an allowed pending session; False when the gate ended it meanwhile."""
        old = self.by_key.get(session.key)
        if old is not None and old is not session:
            await self.drop(old, "replaced")
        if session.ended is not None:
            return False
        session.created = session.last_used = self.clock()
        self.by_key[session.key] = session
        return True

    async def open(self, identity: Identity, origin: Origin, policy_version: str
                   ) -> DeviceSession:
        """Register and cache an allow decision made under ``policy_version``."""
        session = self.pending(identity, origin, policy_version, session_key(identity))
        await self.activate(session)
        return session

    async def drop(self, session: DeviceSession, cause: str, *, unregister: bool = True) -> None:
        """Forget a device-session and record how many requests its decision covered.
        With requests still open it stays registered with the gate (retired) until
        the last one ends, so a re-evaluation can still end them."""
        if self.by_key.get(session.key) is not session:
            return
        del self.by_key[session.key]
        if unregister:
            if session.tasks:
                session.retired = True
            else:
                self.gate.unregister(session)
        await self.gate.record_session_end(
            session.origin, "eas_session", identity=session.identity,
            detail=f"{cause} requests={session.requests}",
        )

    async def sweep(self) -> None:
        """End idle and over-age device-sessions that have no open request."""
        now = self.clock()
        for s in list(self.by_key.values()):
            if s.tasks:
                continue
            if now - s.last_used > IDLE_S:
                await self.drop(s, "idle")
            elif now - s.created > DECISION_MAX_AGE_S:
                await self.drop(s, "max_age")

    def start(self) -> None:
        """Sweep every :data:`SWEEP_INTERVAL_S` (in the running loop) until :meth:`close`."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            await self.sweep()

    async def close(self) -> None:
        """The listener closes: stop sweeping, end every device-session."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for session in list(self.by_key.values()):
            await self.drop(session, "listener_closed")
