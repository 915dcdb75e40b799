"""The API's limits and health, apart from its endpoints (:mod:`proxy.api`).

* Rate limit per client address (``[limits] api_rate_per_ip``, burst
  ``api_rate_burst``): 429 with ``Retry-After``. Exempt: ``/healthz`` and ``/readyz``
  (load balancers), requests carrying the admin token, and posture reports whose x5c
  leaf is a configured MDM attester (an MDM pushing 100,000 reports). The attester
  check is a look at the report's header (:meth:`Verifier.claims_attester`), not a
  second verification: the one verification follows, and a report that claimed an
  attester but fails it costs its address the whole burst (:data:`FALSE_CLAIM_COST`).
* Unauthenticated garbage (reports refused before their signer is known:
  :data:`GARBAGE`) is counted per address into the per-minute ``abuse_summary``,
  never one audit record each.
* :class:`StoreHealth`: the posture store is pinged in the background every
  :data:`HEALTH_INTERVAL_S` (at most :data:`HEALTH_TIMEOUT_S` each), so ``/readyz``
  only reads memory and answers at once whatever the store does.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from proxy.net.limits import Limits
from proxy.oplog import get_logger

log = get_logger("mailward.api")

#: Refusal codes of reports whose signer was never established.
GARBAGE: Final = frozenset({"too_large", "malformed", "alg_not_allowed", "bad_signature",
                            "untrusted_chain", "unsupported_media_type"})
#: Paths never rate-limited.
UNLIMITED_PATHS: Final = frozenset({"/healthz", "/readyz"})
HEALTH_INTERVAL_S: Final = 1.0
HEALTH_TIMEOUT_S: Final = 1.0


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class RateLimited(Exception):
    """Over the address's API rate: answer 429 with ``Retry-After``."""

    def __init__(self, seconds: float) -> None:
        super().__init__("rate limited")
        self.seconds = seconds


def charge(limits: Limits, request: web.Request) -> None:
    """Take one request from the address's budget; :class:`RateLimited` if empty."""
    wait = limits.api_request(request.remote or "")
    if wait > 0:
        raise RateLimited(wait)


def penalise_false_claim(limits: Limits, request: web.Request) -> None:
    """A report claimed an MDM attester and failed verification."""
    limits.api_drain(request.remote or "")


def rate_middleware(limits: Callable[[], Limits], is_admin: Callable[[web.Request], bool]
                    ) -> Any:
    """Charge every request but the exempt ones (see the module docstring);
    ``POST /v1/attestations`` charges itself once it has seen the report's header."""

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.path not in UNLIMITED_PATHS and request.path != "/v1/attestations" \
                and not is_admin(request):
            charge(limits(), request)
        return await handler(request)

    return middleware


#: How long stopping waits for a health check in flight.
STOP_TIMEOUT_S: Final = 1.0


class StoreHealth:
    """The posture store's reachability, refreshed in the background."""

    def __init__(self, ping: Callable[[], Awaitable[bool]],
                 on_change: Callable[[bool], None] | None = None) -> None:
        self._ping = ping
        self._on_change = on_change
        self.ok = True
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that arrives as the ping completes, and this loop would
            # then never stop (a hang at shutdown, seen 1 run in 10).
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                ok = bool(await self._ping())
        except Exception:
            ok = False
        if ok != self.ok:
            log.warning("posture store health changed", reachable=ok)
            if self._on_change is not None:
                self._on_change(ok)
        self.ok = ok
        return ok

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def start(self, _app: web.Application | None = None) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, _app: web.Application | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded all the same: a ping stuck in the store's thread must not hold
            # up shutdown.
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)
            self._task = None


__all__ = ["GARBAGE", "RateLimited", "StoreHealth", "charge", "penalise_false_claim",
           "rate_middleware", "retry_after"]
