"""Device-sessions: the run of requests of one (device id, user) on one listener that a
single ``decision`` record covers.

* its first request writes the ``decision`` record (``gate.decide``) and registers the
  session with the gate; every later request of that (device id, user) reuses the
  decision and is counted;
* it ends when the gate ends it (a new posture or policy now denies: the gate writes
  ``session_end`` with the trigger, and open requests end with 403 within 2 s), when
  the policy version changes (the next request decides again), when the decision is
  :data:`DECISION_MAX_AGE_S` old, after :data:`IDLE_S` without requests, when the
  upstream answers 401 (credentials changed), or when the listener closes;
* its end writes a ``session_end`` record with ``reason`` = ``eas_session``, the
  cause in ``detail`` and ``requests=N``, the number of requests the decision covered.

So an auditor attributes a request to the latest ``decision`` record of the same
listener, device and user before it, up to the matching ``session_end``. A denied
request is never cached: each gets its own ``decision`` record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from proxy.gate import Identity, Origin

if TYPE_CHECKING:
    from proxy.gate import Gate

#: A decision covers a device-session for at most this long, then is made again.
DECISION_MAX_AGE_S: Final = 3600.0
#: A device-session without requests for this long ends (phones Ping far more often).
IDLE_S: Final = 2 * 3600.0
#: How often idle and over-age device-sessions are swept.
SWEEP_INTERVAL_S: Final = 60.0

SessionKey = tuple[str, str]  # (device id, user key)


@dataclass(eq=False)
class DeviceSession:
    """One cached allow decision: a ``LiveSession`` the gate may end."""

    identity: Identity
    origin: Origin
    policy_version: str
    created: float
    table: DeviceSessions
    last_used: float = 0.0
    requests: int = 0
    ended: str | None = None  # remediation text once the gate ended it
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def key(self) -> SessionKey:
        return (self.identity.device_id or "", self.identity.user_key)

    async def terminate(self, text: str) -> None:
        """The gate ended this session: answer open requests 403, forget the decision."""
        self.ended = text
        for task in list(self.tasks):
            task.cancel()
        await self.table.drop(self, "terminated", unregister=False)


class DeviceSessions:
    """The device-sessions of one listener, by (device id, user key)."""

    def __init__(self, gate: Gate, clock: Callable[[], float]) -> None:
        self.gate = gate
        self.clock = clock
        self.by_key: dict[SessionKey, DeviceSession] = {}
        #: Keys whose first request is being decided, and when that is over.
        self.admitting: dict[SessionKey, asyncio.Future[None]] = {}

    async def current(self, key: SessionKey) -> DeviceSession | None:
        """The cached device-session, if still valid; waits for a concurrent admission
        of the same key so a burst of first requests writes one decision."""
        while (pending := self.admitting.get(key)) is not None:
            await asyncio.shield(pending)
        session = self.by_key.get(key)
        if session is None or session.ended is not None:
            return None
        if session.policy_version != self.gate.policy.version:
            await self.drop(session, "policy_changed")
            return None
        if self.clock() - session.created > DECISION_MAX_AGE_S and not session.tasks:
            await self.drop(session, "max_age")
            return None
        return session

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

    async def open(self, identity: Identity, origin: Origin, policy_version: str
                   ) -> DeviceSession:
        """Cache an allow decision made under ``policy_version`` and register it."""
        now = self.clock()
        session = DeviceSession(identity, origin, policy_version, now, self, last_used=now)
        old = self.by_key.get(session.key)
        if old is not None:
            await self.drop(old, "replaced")
        self.by_key[session.key] = session
        self.gate.register(session)
        return session

    async def drop(self, session: DeviceSession, cause: str, *, unregister: bool = True) -> None:
        """Forget a device-session and record how many requests its decision covered."""
        if self.by_key.get(session.key) is not session:
            return
        del self.by_key[session.key]
        if unregister:
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

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            await self.sweep()

    async def close(self) -> None:
        """The listener closes: end every device-session."""
        for session in list(self.by_key.values()):
            await self.drop(session, "listener_closed")
