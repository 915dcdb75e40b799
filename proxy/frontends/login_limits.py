"""The login-level limits of DESIGN "Limits", as the IMAP, POP3 and SMTP executors
apply them (:mod:`proxy.net.limits` has the counters; this module only waits).

* A login the upstream refused (a wrong password): :func:`login_refused` counts it
  for the (user, client address) pair, or the (user, device) pair when a device
  certificate verified, and waits what the throttle says *before* the answer goes
  out, as nginx mail's ``Auth-Wait``.
* Any other answer to the login (the upstream accepted it, or could not check it):
  :func:`login_answered` waits as long as the pair is throttled, so a guesser learns
  nothing sooner from the right password, and an accepted login clears the pair.
  There is no lockout: the right password still works, only later.
* A connection that never completed TLS on a TLS listener is not recorded one by one
  (DESIGN "Sessions, in order", 4): :func:`pre_tls_end` counts it into the per-minute
  ``abuse_summary`` of its address instead (failed handshakes are already counted by
  the transport).

Every delay is a hit of ``auth_delay`` (``mailward_limit_hits_total``, and logged by
:class:`~proxy.net.limits.Limits`).
"""

from __future__ import annotations

import asyncio
from typing import Final

from proxy.net.limits import Limit, Limits

#: Endings before TLS that are not abuse: nothing said, or the server's own doing,
#: or already counted (a failed handshake, by the transport).
NOT_ABUSE: Final = frozenset({"client_closed", "closed_before_auth", "logout", "shutdown",
                              "internal_error", "tls_failed", "upstream", "denied"})


async def login_refused(limits: Limits, user: str, ip: str, listener: str,
                        device: str | None) -> None:
    """The upstream refused the credentials: count it, and wait before the answer."""
    delay = limits.auth_failed(user, ip, listener, device)
    if delay > 0:
        await asyncio.sleep(delay)


async def login_answered(limits: Limits, user: str, ip: str, listener: str,
                         device: str | None, *, accepted: bool) -> None:
    """Any other answer to a login: wait while the pair is throttled; ``accepted``
    (the upstream took the password) clears the pair's failures."""
    delay = limits.auth_wait(user, ip, device)
    if delay > 0:
        limits.hit(Limit.AUTH_DELAY, listener, ip)
        await asyncio.sleep(delay)
    if accepted:
        limits.auth_succeeded(user, ip, device)


def pre_tls_end(limits: Limits, ip: str, reason: str, listener: str) -> None:
    """A connection that ended before TLS: counted (unless :data:`NOT_ABUSE`), not
    recorded."""
    if reason not in NOT_ABUSE:
        limits.abuse(ip, reason, listener)


__all__ = ["NOT_ABUSE", "login_answered", "login_refused", "pre_tls_end"]
