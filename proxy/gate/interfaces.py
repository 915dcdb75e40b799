"""What the gate talks to: live sessions, the audit sink, the observer (metrics)
and, for device administration, the store's trust records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.gate.identity import Identity, Origin
from proxy.policy import Decision, Policy
from proxy.posture import Change, Posture, TrustRecords


class LiveSession(Protocol):
    """A session the gate may end. ``terminate`` must not raise."""

    identity: Identity
    origin: Origin

    async def terminate(self, text: str) -> None: ...


@dataclass(frozen=True, slots=True)
class DecisionSeen:
    """One access decision as a notifier sees it, after its record was written:
    who, on which device (``device``: the resolved one), under which policy, when."""

    identity: Identity
    origin: Origin
    decision: Decision
    policy: Policy
    device: str | None
    now: float


class Notices(Protocol):
    """Observes the gate's decisions to tell users (``proxy.notify.Notifier``). Both
    run on the decision path: they must return at once (``alert``: at most one round
    trip to a shared store) and never raise."""

    def decided(self, seen: DecisionSeen) -> None:
        """Queue the notices this decision calls for (mail goes out later)."""

    async def alert(self, seen: DecisionSeen) -> str | None:
        """The warning to show this login now (IMAP ``* OK [ALERT]``), or None."""


class AuditSink(Protocol):
    async def write(self, fields: dict[str, Any]) -> dict[str, Any]: ...


class Observer(Protocol):
    """Receives what the gate, the API and the server do: the one way to metrics.

    A server creates one (``proxy.metrics.PrometheusObserver``) and hands it to the
    gate; everything else reaches it as ``gate.observer``.
    """

    def decided(self, protocol: str, decision: Decision, latency_us: int) -> None: ...
    def session_opened(self, protocol: str) -> None: ...
    def session_closed(self, protocol: str, *, ended_by_gate: bool) -> None: ...
    def upstream_failed(self, upstream: str) -> None: ...
    def attestation(self, result: str) -> None:
        """A posture report was ``accepted`` or refused (``result`` = its code)."""
    def policy_loaded(self, policy: Policy) -> None:
        """``policy`` is in force now."""
    def policy_reload_failed(self) -> None: ...
    def limit_hit(self, limit: str, listener: str) -> None:
        """A limit of ``[limits]`` was hit (``proxy.net.limits``)."""
    def health(self, check: str, ok: bool) -> None:
        """A readiness check changed (``/readyz``)."""
    def cert_expiry(self, file: str, seconds_left: float) -> None:
        """A certificate bundle or CRL ends in ``seconds_left`` (``proxy.expiry``)."""
    def expose(self) -> tuple[bytes, str]:
        """The metrics in the text exposition format, and its content type."""
        ...


class NullObserver:
    """For one-shot CLI use: keeps start-up free of the metrics machinery."""

    def decided(self, protocol: str, decision: Decision, latency_us: int) -> None: ...
    def session_opened(self, protocol: str) -> None: ...
    def session_closed(self, protocol: str, *, ended_by_gate: bool) -> None: ...
    def upstream_failed(self, upstream: str) -> None: ...
    def attestation(self, result: str) -> None: ...
    def policy_loaded(self, policy: Policy) -> None: ...
    def policy_reload_failed(self) -> None: ...
    def limit_hit(self, limit: str, listener: str) -> None: ...
    def health(self, check: str, ok: bool) -> None: ...
    def cert_expiry(self, file: str, seconds_left: float) -> None: ...
    def expose(self) -> tuple[bytes, str]:
        return b"", "text/plain; charset=utf-8"


class TrustAdmin(Protocol):
    """What device administration needs of a store (``SqlitePostureStore``)."""

    async def device_postures(self, device_id: str) -> list[Posture]: ...
    async def trust_records(self) -> TrustRecords: ...
    async def changes_since(self, seq: int) -> tuple[int, list[Change]]: ...
    async def revoke(self, device_id: str, why: str, actor: str) -> tuple[str, bool]: ...
    async def unrevoke(self, device_id: str) -> tuple[str, bool]: ...
    async def unbind(self, device_id: str) -> tuple[str, bool]: ...
    async def bind(self, device: str) -> bool: ...
    async def forget(self, device_id: str) -> tuple[str, bool]: ...
    async def alias(self, device_id: str, other: str) -> str: ...


#: The old name of :class:`Observer`.
GateObserver = Observer
