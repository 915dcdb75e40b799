"""The ActiveSync listener's side of DESIGN "Limits" (:mod:`proxy.net.limits` holds the
counters; this module says when ActiveSync and Autodiscover consult them).

* **Failed logins** (:class:`LoginThrottle`): a request with Basic credentials that the
  upstream answers 401 is a failed login of (user, client address), or of (user,
  device) when the connection has a verified device certificate, so failures from
  other clients never delay that phone. Before the upstream checks credentials a
  throttled pair waits (:meth:`LoginThrottle.before`), so a guesser also reaches the
  upstream (and its account lockout) only that slowly; a refusal then waits what is
  still owed (:meth:`LoginThrottle.failed`), an acceptance clears the pair. A request
  on a cached device-session is not held back beforehand (its login succeeded); its
  401 waits the whole delay. There is no lockout: the right password still works.
* **Bodies** stream; one beyond ``eas_max_body`` is refused with 413, at once when its
  ``Content-Length`` says so, else when the streamed bytes pass the limit
  (:class:`CappedBody`; the upstream then sees a chunked body that never ends, so it
  does not act on it).
* **Unauthenticated garbage** (hygiene 400s, bad queries, unknown paths and methods,
  slow request heads) is counted per client address with ``Limits.abuse`` and
  summarised once a minute, never logged or recorded one by one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from proxy.frontends.activesync.upstream import UPSTREAM_ERRORS
from proxy.gate import UPSTREAM_UNAVAILABLE
from proxy.net.limits import Limit
from proxy.oplog import get_logger

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    from proxy.frontends.activesync.forward import Forwarder
    from proxy.gate import Gate, Identity, Origin
    from proxy.ids import ClientCert

log = get_logger("mailward.activesync")


def throttle_user(auth_user: str) -> str:
    """The user a failed login counts against: the Basic name without a ``DOMAIN\\``
    prefix (the limiter lower-cases it)."""
    return auth_user.strip().rpartition("\\")[2]


def device_of(cert: ClientCert | None) -> str | None:
    """What a verified device certificate is counted by (None without one)."""
    if cert is None:
        return None
    return cert.device_id or cert.fingerprint or None


class LoginThrottle:
    """Failed-login delays for one listener (see the module docstring), and the
    credential check the front end and nginx's ``auth_request`` share
    (:meth:`check_credentials`). The limits are read from the gate on each use
    (``gate.limits``, the server's one :class:`~proxy.net.limits.Limits`)."""

    __slots__ = ("gate", "listener")

    def __init__(self, gate: Gate, listener: str) -> None:
        self.gate = gate
        self.listener = listener

    async def check_credentials(self, upstream: Forwarder, request: web.BaseRequest,
                                identity: Identity, origin: Origin) -> web.Response | None:
        """Have the upstream check the request's credentials: None when it accepted
        them, else its refusal (a failed login for the gate; a 401 waits the rest of
        its delay). A throttled pair waits before the upstream is asked. When the
        upstream cannot tell, the request's one decision record is a temporary deny
        and :class:`UpstreamUnavailable` is raised."""
        user, ip, cert = identity.user, origin.client_ip, identity.cert
        waited = await self.before(user, ip, cert)
        try:
            refused = await upstream.check_credentials(request)
        except UPSTREAM_ERRORS as e:
            log.warning("upstream unavailable", error=str(e) or type(e).__name__)
            await self.gate.record_deny(identity, origin, UPSTREAM_UNAVAILABLE,
                                        "The mail server could not check the credentials.",
                                        temporary=True)
            raise UpstreamUnavailable from e
        if refused is None:
            self.succeeded(user, ip, cert)
            return None
        await self.gate.record_auth_failed(identity, origin)
        if refused.status == 401:
            await self.failed(user, ip, cert, waited)
        return refused

    async def before(self, user: str, ip: str, cert: ClientCert | None) -> float:
        """Wait what a throttled pair's answer is owed before the upstream is asked;
        returns the seconds waited."""
        wait = self.gate.limits.auth_wait(throttle_user(user), ip, device_of(cert))
        if wait > 0:
            await asyncio.sleep(wait)
        return wait

    async def failed(self, user: str, ip: str, cert: ClientCert | None,
                     waited: float = 0.0) -> None:
        """Count a failed login and wait its delay (less what was waited before)."""
        delay = self.gate.limits.auth_failed(throttle_user(user), ip, self.listener,
                                        device_of(cert)) - waited
        if delay > 0:
            await asyncio.sleep(delay)

    def succeeded(self, user: str, ip: str, cert: ClientCert | None) -> None:
        self.gate.limits.auth_succeeded(throttle_user(user), ip, device_of(cert))

    def abuse(self, ip: str, kind: str) -> None:
        """Count a piece of unauthenticated garbage from ``ip``."""
        self.gate.limits.abuse(ip, kind, self.listener)

    def slow_head(self, ip: str) -> None:
        """A connection cut off for not sending its request head in time."""
        self.gate.limits.hit(Limit.HEADER_TIMEOUT, self.listener, ip)
        self.gate.limits.abuse(ip, "slow_request_head", self.listener)

    def body_too_large(self, ip: str) -> None:
        self.gate.limits.hit(Limit.EAS_BODY, self.listener, ip)


class UpstreamUnavailable(Exception):
    """The upstream could not check the credentials (the temporary deny is recorded;
    the caller answers 503)."""


class BodyTooLarge(Exception):
    """A streamed request body passed ``eas_max_body``."""


class CappedBody:
    """A request body streamed upstream that stops (:class:`BodyTooLarge`) once more
    than ``cap`` bytes have come; ``over`` tells afterwards, whatever the client
    library made of the exception."""

    __slots__ = ("cap", "over", "stream")

    def __init__(self, stream: aiohttp.StreamReader, cap: int) -> None:
        self.stream = stream
        self.cap = cap
        self.over = False

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.stream.iter_chunked(size):
            seen += len(chunk)
            if seen > self.cap:
                self.over = True
                raise BodyTooLarge
            yield chunk


__all__ = ["BodyTooLarge", "CappedBody", "LoginThrottle", "UpstreamUnavailable",
           "device_of", "throttle_user"]
