"""Abuse limits (DESIGN "Limits"), pure: counters and clocks, no sockets, no I/O.

One :class:`Limits` per server (``gate.limits``); the accept loop, the TLS transport,
the API and the front ends ask it and tell it what happened. The clock is passed in
(monotonic seconds), so every rule is table-tested.

Client addresses are counted by :func:`client_key`: IPv4 as is, IPv6 by its /64 (one
phone or home router gets a whole /64), IPv4-mapped IPv6 as IPv4. Addresses in
``[limits] exempt`` are never limited.

* **Connections per address** (``max_connections_per_ip``, per listener): counted at
  accept, when nobody is verified yet, by a :class:`Ticket`; a connection whose TLS
  handshake verifies a device certificate is released from the count
  (:meth:`Ticket.verified`), so a NAT full of enrolled phones never hits it, while a
  flood of unverified connections does. Over the limit the connection is closed at
  once.
* **Handshakes in progress** (``max_handshakes``, per listener): the accept loop
  closes new connections at once while this many TLS handshakes are running, so a
  burst is refused rather than queued behind slow handshakes.
* **Failed logins** per (user, client address) pair: after ``auth_failures`` within
  ``auth_failures_window`` each further answer to the pair waits ``auth_delay``,
  doubling up to ``auth_delay_max`` (nginx mail's Auth-Wait). There is no lockout:
  the right password still works, only later. A client with a verified device
  certificate is counted per (user, device) instead, so failures from other clients
  behind the same address never delay it.
* **API**: a token bucket per address (``api_rate_per_ip``, ``api_rate_burst``) and
  outstanding challenge nonces (``max_outstanding_nonces`` per address and in total).
* **Abuse**: failed handshakes and unauthenticated garbage are counted per address and
  drained once a minute into ``abuse_summary`` records (:meth:`Limits.abuse_summaries`;
  at most :data:`MAX_SUMMARIES` per minute, the rest folded into one record for
  ``client_ip = "*"``).

Every limit hit calls ``on_hit(limit, listener)`` (``mailward_limit_hits_total``)
and is logged, at most once a minute per (limit, listener, address).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.config import LimitsConfig
from proxy.oplog import get_logger

log = get_logger("mailward.limits")

#: How often abuse counts are summarised (one record per address per interval).
SUMMARY_INTERVAL_S: Final = 60.0
#: ``abuse_summary`` records per interval in all; the rest share one ``"*"`` record.
MAX_SUMMARIES: Final = 1000
#: Bounds on the tables an attacker can grow (oldest entries go first).
MAX_PAIRS: Final = 200_000
MAX_BUCKETS: Final = 100_000
MAX_ABUSERS: Final = 100_000


class Limit(enum.StrEnum):
    """The limits :meth:`Limits.hit` counts: the ``limit`` label of
    ``mailward_limit_hits_total`` and of the ``limit_hit`` log line. Most values are the
    ``[limits]`` key that sets the limit."""

    CONNECTIONS_PER_IP = "max_connections_per_ip"
    HANDSHAKES = "max_handshakes"
    AUTH_DELAY = "auth_delay"
    API_RATE = "api_rate_per_ip"
    NONCES = "max_outstanding_nonces"
    API_BODY = "api_max_body"
    HEADER_TIMEOUT = "header_timeout"
    FILE_DESCRIPTORS = "file_descriptors"
    EAS_BODY = "eas_max_body"  # the ActiveSync front end's request body cap


def client_key(ip: str) -> str:
    """The address limits count by (see the module docstring)."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


class Ticket:
    """One accepted connection counted against its address: :meth:`verified` (a
    device certificate) and :meth:`close` release it, once."""

    __slots__ = ("_key", "_limits", "_listener")

    def __init__(self, limits: Limits | None, listener: str, key: str) -> None:
        self._limits, self._listener, self._key = limits, listener, key

    def verified(self) -> None:
        self.close()

    def close(self) -> None:
        limits, self._limits = self._limits, None
        if limits is not None:
            limits._release(self._listener, self._key)


@dataclass(slots=True)
class _Failures:
    count: int
    since: float


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class _Abuse:
    counts: dict[str, int] = field(default_factory=dict)
    listeners: set[str] = field(default_factory=set)


class Limits:
    """The limits of one server (see the module docstring)."""

    def __init__(self, cfg: LimitsConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_hit: Callable[[str, str], None] | None = None) -> None:
        self.cfg = cfg or LimitsConfig()
        self._clock = clock
        self._on_hit = on_hit
        self._exempt = [ipaddress.ip_network(c, strict=False) for c in self.cfg.exempt]
        self._exempt_cache: dict[str, bool] = {}
        self._connections: dict[tuple[str, str], int] = {}
        self._handshakes: dict[str, int] = {}
        self._failures: dict[tuple[str, str], _Failures] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._nonces: dict[str, tuple[str, float]] = {}  # nonce -> (key, expires)
        self._nonces_per_key: dict[str, int] = {}
        self._abuse: dict[str, _Abuse] = {}
        self._abuse_overflow = _Abuse()
        self._logged: dict[tuple[str, str, str], float] = {}
        #: Listener names by bound port, for accept loops that were given none.
        self.names: dict[int, str] = {}

    # ----------------------------------------------------------------- common

    def exempt(self, ip: str) -> bool:
        if not self._exempt:
            return False
        found = self._exempt_cache.get(ip)
        if found is None:
            try:
                addr = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            found = any(addr in net for net in self._exempt)
            if len(self._exempt_cache) > 10_000:
                self._exempt_cache.clear()
            self._exempt_cache[ip] = found
        return found

    def hit(self, limit: Limit, listener: str, ip: str = "") -> None:
        """Count one hit of ``limit`` and log it (once a minute per
        address)."""
        if self._on_hit is not None:
            self._on_hit(limit, listener)
        now = self._clock()
        key = (limit, listener, client_key(ip) if ip else "")
        if now < self._logged.get(key, -math.inf):
            return
        if len(self._logged) > 10_000:
            self._logged = {k: t for k, t in self._logged.items() if t > now}
        self._logged[key] = now + SUMMARY_INTERVAL_S
        log.warning("limit_hit", limit=limit, listener=listener, client_ip=key[2])

    # ------------------------------------------------------------ connections

    def connection_opened(self, ip: str, listener: str) -> Ticket | None:
        """Count an accepted connection; None when its address is over
        ``max_connections_per_ip`` (close it). Exempt addresses get a ticket that
        counts nothing."""
        if self.exempt(ip):
            return Ticket(None, listener, "")
        key = client_key(ip)
        slot = (listener, key)
        count = self._connections.get(slot, 0)
        if count >= self.cfg.max_connections_per_ip:
            self.hit(Limit.CONNECTIONS_PER_IP, listener, ip)
            return None
        self._connections[slot] = count + 1
        return Ticket(self, listener, key)

    def connections(self, ip: str, listener: str) -> int:
        return self._connections.get((listener, client_key(ip)), 0)

    def _release(self, listener: str, key: str) -> None:
        slot = (listener, key)
        count = self._connections.get(slot, 0) - 1
        if count > 0:
            self._connections[slot] = count
        else:
            self._connections.pop(slot, None)

    def may_handshake(self, listener: str, ip: str = "") -> bool:
        """False (and a hit) while ``max_handshakes`` are in progress on ``listener``."""
        if self._handshakes.get(listener, 0) < self.cfg.max_handshakes or self.exempt(ip):
            return True
        self.hit(Limit.HANDSHAKES, listener, ip)
        return False

    def handshake_started(self, listener: str) -> None:
        self._handshakes[listener] = self._handshakes.get(listener, 0) + 1

    def handshake_finished(self, listener: str, ip: str, *, ok: bool) -> None:
        """A failed handshake counts as abuse of its address."""
        left = self._handshakes.get(listener, 0) - 1
        if left > 0:
            self._handshakes[listener] = left
        else:
            self._handshakes.pop(listener, None)
        if not ok:
            self.abuse(ip, "failed_handshake", listener)

    def handshakes(self, listener: str) -> int:
        return self._handshakes.get(listener, 0)

    # ------------------------------------------------------------ failed logins

    def _pair(self, user: str, ip: str, device: str | None) -> tuple[str, str]:
        return (user.lower(), f"device:{device.lower()}" if device else client_key(ip))

    def auth_wait(self, user: str, ip: str, device: str | None = None) -> float:
        """Seconds the next answer to this (user, address) pair must wait: 0 until the
        pair has ``auth_failures`` failures in the window."""
        if self.exempt(ip) and not device:
            return 0.0
        state = self._failures.get(self._pair(user, ip, device))
        if state is None or self._clock() - state.since > self.cfg.auth_failures_window_s:
            return 0.0
        return self._delay(state.count + 1)

    def _delay(self, attempt: int) -> float:
        over = attempt - self.cfg.auth_failures - 1
        if over < 0:
            return 0.0
        return float(min(self.cfg.auth_delay_s * 2 ** min(over, 32), self.cfg.auth_delay_max_s))

    def auth_failed(self, user: str, ip: str, listener: str,
                    device: str | None = None) -> float:
        """Count a failed login; returns the seconds to wait before answering it."""
        if self.exempt(ip) and not device:
            return 0.0
        now = self._clock()
        pair = self._pair(user, ip, device)
        state = self._failures.pop(pair, None)  # re-inserted: newest last
        if state is None or now - state.since > self.cfg.auth_failures_window_s:
            state = _Failures(0, now)
        state.count += 1
        self._failures[pair] = state
        if len(self._failures) > MAX_PAIRS:
            del self._failures[next(iter(self._failures))]
        delay = self._delay(state.count)
        if delay:
            self.hit(Limit.AUTH_DELAY, listener, ip)
        return delay

    def auth_succeeded(self, user: str, ip: str, device: str | None = None) -> None:
        self._failures.pop(self._pair(user, ip, device), None)

    def auth_failures(self, user: str, ip: str, device: str | None = None) -> int:
        state = self._failures.get(self._pair(user, ip, device))
        return 0 if state is None else state.count

    def reset(self, *, user: str | None = None, ip: str | None = None) -> int:
        """``mailward limits reset``: forget failed logins of ``user`` (all addresses)
        or of ``ip`` (all users), and the address's API bucket. Returns pairs cleared."""
        u = user.lower() if user else None
        k = client_key(ip) if ip else None
        gone = [p for p in self._failures if p[0] == u or p[1] == k]
        for p in gone:
            del self._failures[p]
        if k is not None:
            self._buckets.pop(k, None)
        return len(gone)

    # -------------------------------------------------------------------- API

    def api_request(self, ip: str, listener: str = "api") -> float:
        """Take one token for an API request without the admin token or an attester
        signature: 0 when allowed, else the seconds until one is available (429)."""
        if self.exempt(ip):
            return 0.0
        now = self._clock()
        key = client_key(ip)
        rate, burst = self.cfg.api_rate_per_ip, float(self.cfg.api_rate_burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune_buckets(now)
            bucket = self._buckets[key] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        self.hit(Limit.API_RATE, listener, ip)
        return (1.0 - bucket.tokens) / rate

    def api_drain(self, ip: str) -> None:
        """Empty the address's bucket (a report that falsely claimed an attester)."""
        if self.exempt(ip):
            return
        now = self._clock()
        self._buckets[client_key(ip)] = _Bucket(0.0, now)

    def _prune_buckets(self, now: float) -> None:
        full = self.cfg.api_rate_burst / self.cfg.api_rate_per_ip
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < full}
        while len(self._buckets) >= MAX_BUCKETS:
            del self._buckets[next(iter(self._buckets))]

    def nonce_allowed(self, ip: str, listener: str = "api") -> bool:
        """May this address have one more challenge nonce outstanding?"""
        self._expire_nonces()
        if self.exempt(ip):
            return len(self._nonces) < self.cfg.max_outstanding_nonces_total
        key = client_key(ip)
        if (self._nonces_per_key.get(key, 0) < self.cfg.max_outstanding_nonces
                and len(self._nonces) < self.cfg.max_outstanding_nonces_total):
            return True
        self.hit(Limit.NONCES, listener, ip)
        return False

    def nonce_issued(self, ip: str, nonce: str, ttl_s: float) -> None:
        key = client_key(ip)
        self._nonces[nonce] = (key, self._clock() + ttl_s)
        self._nonces_per_key[key] = self._nonces_per_key.get(key, 0) + 1

    def nonce_used(self, nonce: str) -> None:
        found = self._nonces.pop(nonce, None)
        if found is not None:
            self._drop_nonce(found[0])

    def outstanding_nonces(self, ip: str | None = None) -> int:
        self._expire_nonces()
        if ip is None:
            return len(self._nonces)
        return self._nonces_per_key.get(client_key(ip), 0)

    def _expire_nonces(self) -> None:
        now = self._clock()
        while self._nonces:  # one TTL: insertion order is expiry order
            nonce, (key, expires) = next(iter(self._nonces.items()))
            if expires > now:
                return
            del self._nonces[nonce]
            self._drop_nonce(key)

    def _drop_nonce(self, key: str) -> None:
        left = self._nonces_per_key.get(key, 0) - 1
        if left > 0:
            self._nonces_per_key[key] = left
        else:
            self._nonces_per_key.pop(key, None)

    # ------------------------------------------------------------------- abuse

    def abuse(self, ip: str, kind: str, listener: str) -> None:
        """Count one failed handshake or piece of unauthenticated garbage."""
        key = client_key(ip) if ip else "-"
        entry = self._abuse.get(key)
        if entry is None:
            entry = self._abuse_overflow if len(self._abuse) >= MAX_ABUSERS else _Abuse()
            if entry is not self._abuse_overflow:
                self._abuse[key] = entry
        entry.counts[kind] = entry.counts.get(kind, 0) + 1
        entry.listeners.add(listener)

    def abuse_summaries(self) -> list[dict[str, Any]]:
        """Drain the counts into ``abuse_summary`` record fields (one per address, at
        most :data:`MAX_SUMMARIES`; the rest in one ``"*"`` record)."""
        entries, self._abuse = self._abuse, {}
        overflow, self._abuse_overflow = self._abuse_overflow, _Abuse()
        records = []
        rest: list[tuple[str, _Abuse]] = []
        for i, (key, entry) in enumerate(entries.items()):
            if i < MAX_SUMMARIES - 1:
                records.append(_summary(key, [entry]))
            else:
                rest.append((key, entry))
        if overflow.counts:
            rest.append(("*", overflow))
        if rest:
            record = _summary("*", [e for _, e in rest])
            record["addresses"] = len(rest)
            records.append(record)
        return records


def _summary(key: str, entries: Iterable[_Abuse]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    listeners: set[str] = set()
    for e in entries:
        for kind, n in e.counts.items():
            counts[kind] = counts.get(kind, 0) + n
        listeners |= e.listeners
    return {"event": "abuse_summary", "client_ip": key, "counts": counts,
            "total": sum(counts.values()), "listeners": sorted(listeners),
            "window_s": int(SUMMARY_INTERVAL_S)}


_installed: Limits | None = None


def install(limits: Limits | None) -> None:
    """The process's limits for accept loops created without explicit ones (the
    server installs its own at start and removes it at shutdown)."""
    global _installed
    _installed = limits


def installed() -> Limits | None:
    return _installed


__all__ = [
    "MAX_SUMMARIES",
    "SUMMARY_INTERVAL_S",
    "Limit",
    "Limits",
    "Ticket",
    "client_key",
    "install",
    "installed",
]
