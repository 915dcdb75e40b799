"""The one decision point: identity -> posture -> policy -> audit.

Front ends call :meth:`Gate.decide` once per login (IMAP, SMTP) or device-session
(ActiveSync) after the upstream has verified the credentials, and act on the returned
:class:`~proxy.policy.Decision`. The gate writes exactly one audit record per call.

Live sessions register with the gate (:meth:`Gate.register`). When a device's posture
changes (new attestation), the policy changes (reload) or posture ages out, the gate
re-evaluates the affected sessions and ends the ones now denied through their own
protocol's goodbye (:meth:`LiveSession.terminate`), logging a ``session_end`` record.

Everything else that evaluates policy or records an outcome goes through the gate
too, so there is one record builder per event:

* :meth:`Gate.explain` answers what-if questions (``mailward explain``,
  ``POST /v1/explain``) with the same evaluation and an ``explain`` record;
* :meth:`Gate.attest` / :meth:`Gate.attest_refused` record posture reports (API and
  ``mailward posture ingest``) with one ``attestation`` schema, and end the live
  sessions a new non-compliant posture no longer allows.

What the gate does is reported to an :class:`Observer` (Prometheus in a server,
:class:`NullObserver` for one-shot CLI commands); the API and the server report
through the same object (``gate.observer``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from proxy.oplog import get_logger
from proxy.policy import (
    UNKNOWN_DEVICE,
    Context,
    Decision,
    Policy,
    Reason,
    evaluate,
)
from proxy.posture import Posture, PostureReader

log = get_logger("mailward.gate")

Unidentified = Literal["deny", "allow", "all-user-devices"]

AUTH_FAILED = "auth_failed"
UNIDENTIFIED_DEVICE = "unidentified_device"
AUDIT_UNAVAILABLE = "audit_unavailable"
UPSTREAM_UNAVAILABLE = "upstream_unavailable"
STORE_UNAVAILABLE = "posture_store_unavailable"

UNIDENTIFIED_TEXT = (
    "This mail app connected without a device certificate, so the device cannot be "
    "checked. Install the company mail profile from the device management app."
)
TEMPORARY_TEXT = "Mail access is temporarily unavailable. Please try again in a few minutes."


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is connecting: the login user and, when known, the device."""

    user: str
    device_id: str | None = None
    device_source: str = ""  # "client_cert" | "eas" | "" (unidentified)

    @property
    def user_key(self) -> str:
        # backslashreplace: a user name smuggled in with undecodable bytes still
        # makes a writable (UTF-8) audit record instead of silently none.
        return self.user.strip().lower().encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a session comes from and how its listener treats unidentified clients."""

    protocol: str  # imap | smtp | activesync | cli
    listener: str
    client_ip: str = ""
    unidentified: Unidentified = "deny"


class LiveSession(Protocol):
    """A session the gate may end. ``terminate`` must not raise."""

    identity: Identity
    origin: Origin

    async def terminate(self, text: str) -> None: ...


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
    def expose(self) -> tuple[bytes, str]:
        """The metrics in the text exposition format, and its content type."""
        ...


#: The old name of :class:`Observer`.
GateObserver = Observer


class NullObserver:
    """For one-shot CLI use: keeps start-up free of the metrics machinery."""

    def decided(self, protocol: str, decision: Decision, latency_us: int) -> None: ...
    def session_opened(self, protocol: str) -> None: ...
    def session_closed(self, protocol: str, *, ended_by_gate: bool) -> None: ...
    def upstream_failed(self, upstream: str) -> None: ...
    def attestation(self, result: str) -> None: ...
    def policy_loaded(self, policy: Policy) -> None: ...
    def policy_reload_failed(self) -> None: ...
    def expose(self) -> tuple[bytes, str]:
        return b"", "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class ReportSource:
    """Where a posture report came in: the API (with the client's address) or a
    file given to ``mailward posture ingest``."""

    via: Literal["api", "cli"]
    client_ip: str = ""
    file: str | None = None


class Gate:
    def __init__(
        self,
        *,
        store: PostureReader,
        audit: AuditSink,
        policy: Callable[[], Policy],
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        """``store`` is only read (``get``, ``devices_for_user``). Without an
        ``observer`` the gate feeds the process's Prometheus metrics."""
        if observer is None:
            from proxy.metrics import PrometheusObserver

            observer = PrometheusObserver()
        self._observer = observer
        self._store = store
        self._audit = audit
        self._policy = policy
        self._clock = clock
        self._sessions: set[LiveSession] = set()

    @property
    def observer(self) -> Observer:
        """Where front ends, the API and the server report what only they see
        (upstream failures, attestations, policy reloads)."""
        return self._observer

    # ------------------------------------------------------------------ deciding

    async def decide(self, identity: Identity, origin: Origin) -> Decision:
        """Decide and log one ``decision`` record.

        Never raises for store or audit failures: those give a temporary deny
        (fail closed), which front ends answer with their "try later" reply.
        """
        decision, latency_us = await self._decide("decision", identity, origin, None)
        self._observer.decided(origin.protocol, decision, latency_us)
        return decision

    async def explain(
        self, identity: Identity, origin: Origin, *, posture: Posture | None = None
    ) -> Decision:
        """What-if: the decision :meth:`decide` would take, recorded as an ``explain``
        record (never counted as an access decision). ``posture`` replaces the stored
        one (a hypothetical device); without it the store is read.

        Like :meth:`decide` it never raises for store or audit failures: the answer
        is then a temporary deny whose reason is :data:`STORE_UNAVAILABLE` or
        :data:`AUDIT_UNAVAILABLE`, which callers report as "cannot answer"."""
        decision, _ = await self._decide("explain", identity, origin, posture)
        return decision

    async def _decide(
        self, event: str, identity: Identity, origin: Origin, what_if: Posture | None
    ) -> tuple[Decision, int]:
        started = time.perf_counter()
        policy = self._policy()
        try:
            if what_if is None:
                decision, posture = await self._evaluate(identity, origin, policy)
            else:
                posture = what_if
                decision = judge(identity, origin, policy, self._clock(), posture)
        except Exception as exc:  # the store is unreachable: fail closed
            log.error("posture store unavailable", error=str(exc))
            self._observer.upstream_failed("posture_store")
            decision, posture = _temporary(policy, STORE_UNAVAILABLE), None
        latency_us = int((time.perf_counter() - started) * 1e6)
        fields = decision_record(event, identity, origin, decision, posture, latency_us,
                                 self._clock())
        try:
            await self._audit.write(fields)
        except Exception as exc:  # AuditUnavailable or anything else: fail closed
            log.error("audit log unavailable; refusing", error=str(exc))
            decision = _temporary(policy, AUDIT_UNAVAILABLE)
        return decision, latency_us

    @property
    def policy(self) -> Policy:
        """The policy in force now (it changes on reload)."""
        return self._policy()

    async def record_auth_failed(self, identity: Identity, origin: Origin) -> None:
        """The upstream refused the credentials: a deny record, no policy involved."""
        await self.record_deny(identity, origin, AUTH_FAILED,
                               "The mail server refused the credentials.")

    async def record_deny(self, identity: Identity, origin: Origin, code: str,
                          text: str, *, temporary: bool = False) -> None:
        """A deny the front end decided on protocol grounds (the identities in one
        request disagree; the upstream is unreachable, ``temporary``): still exactly
        one decision record for the login attempt."""
        if code == UPSTREAM_UNAVAILABLE:
            self._observer.upstream_failed(origin.protocol)
        decision = Decision.deny(self._policy(), Reason(code, text), temporary=temporary)
        fields = decision_record("decision", identity, origin, decision, None, 0,
                                 self._clock())
        self._observer.decided(origin.protocol, decision, 0)
        await self._write_quietly(fields)

    async def record_session_end(
        self,
        origin: Origin,
        reason: str,
        *,
        identity: Identity | None = None,
        detail: str = "",
    ) -> None:
        """A connection ended before a decision, or a live session was ended."""
        fields: dict[str, Any] = {
            "event": "session_end",
            "reason": reason,
            "protocol": origin.protocol,
            "listener": origin.listener,
            "client_ip": origin.client_ip,
            "user": identity.user_key if identity else None,
            "device_id": identity.device_id if identity else None,
        }
        if detail:
            fields["detail"] = detail
        await self._write_quietly(fields)

    # ------------------------------------------------------------ attestations

    async def attest(self, source: ReportSource, posture: Posture) -> Decision:
        """A verified report was stored: evaluate the device's new posture, write
        its ``attestation`` record and end the device's live sessions that it no
        longer allows (continuous access evaluation). Returns the evaluation (its
        reasons are the report's violations). An audit failure is logged, not
        raised: the posture is committed either way (callers check the log's health
        before they ingest)."""
        decision = self.assess(posture, source.via)
        await self._write_quietly(attestation_record(source, posture, decision))
        self._observer.attestation("accepted")
        try:
            await self.posture_changed(posture.device_id, posture.user)
        except Exception as exc:
            log.error("re-evaluating live sessions failed", error=str(exc))
        return decision

    def assess(self, posture: Posture, protocol: str) -> Decision:
        """The device's own posture under the policy in force, for its own user: is
        the device compliant? Nothing is recorded (the caller's record carries it)."""
        context = Context(now=datetime.fromtimestamp(self._clock(), UTC), user=posture.user,
                          device_id=posture.device_id, protocol=protocol)
        return evaluate(posture, self._policy(), context)

    async def attest_refused(self, source: ReportSource, code: str) -> None:
        """A report was refused (``code``: an attestation reason code, ``too_large``
        for an oversized body, ``unavailable`` when the store failed): its
        ``attestation`` record."""
        await self._write_quietly(attestation_record(source, None, None, code=code))
        self._observer.attestation(code)

    async def _write_quietly(self, fields: dict[str, Any]) -> None:
        """Records that follow what already happened (a refusal, a closed session, a
        committed posture): a failed write is logged, not raised; readyz shows it."""
        try:
            await self._audit.write(fields)
        except Exception as exc:
            log.error("audit log unavailable", error=str(exc), audit_event=fields["event"])

    async def _evaluate(
        self, identity: Identity, origin: Origin, policy: Policy
    ) -> tuple[Decision, Posture | None]:
        """Fetch what the decision needs from the store, then :func:`judge`."""
        posture, user_devices = None, None
        if identity.device_id is not None:
            posture = await self._store.get(identity.device_id)
        elif origin.unidentified == "all-user-devices":
            user_devices = await self._store.devices_for_user(identity.user_key)
        return judge(identity, origin, policy, self._clock(), posture, user_devices), posture

    # ---------------------------------------------------------- live sessions

    def register(self, session: LiveSession) -> None:
        self._sessions.add(session)
        self._observer.session_opened(session.origin.protocol)

    def unregister(self, session: LiveSession) -> None:
        self._unregister(session, ended_by_gate=False)

    def _unregister(self, session: LiveSession, *, ended_by_gate: bool) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            self._observer.session_closed(session.origin.protocol, ended_by_gate=ended_by_gate)

    def live_sessions(self) -> list[LiveSession]:
        return list(self._sessions)

    async def posture_changed(self, device_id: str, user: str | None = None) -> int:
        """Re-check live sessions of this device (and, for sessions admitted under
        ``all-user-devices``, of its user). Returns the number of sessions ended."""
        user_key = (user or "").lower()
        affected = [
            s
            for s in self._sessions
            if s.identity.device_id == device_id
            or (s.identity.device_id is None and user_key and s.identity.user_key == user_key)
        ]
        return await self._recheck(affected, "posture_changed")

    async def policy_changed(self) -> int:
        """Re-check every live session against the current policy."""
        return await self._recheck(list(self._sessions), "policy_changed")

    async def recheck_all(self, trigger: str = "posture_aged") -> int:
        """Periodic sweep: posture that ages past the limit ends sessions too."""
        return await self._recheck(list(self._sessions), trigger)

    async def _recheck(self, sessions: list[LiveSession], trigger: str) -> int:
        policy = self._policy()
        ended = 0
        for session in sessions:
            try:
                decision, _ = await self._evaluate(session.identity, session.origin, policy)
            except Exception as exc:
                log.error("re-evaluation failed; keeping session", error=str(exc))
                continue
            # The session may have closed, or an overlapping re-check ended it, while
            # we awaited the store: end it once only, and only while it is live.
            if decision.allow or session not in self._sessions:
                continue
            ended += 1
            self._unregister(session, ended_by_gate=True)
            text = decision.user_text()
            await self.record_session_end(
                session.origin,
                trigger,
                identity=session.identity,
                detail=",".join(r.code for r in decision.enforced_reasons),
            )
            await _safe_terminate(session, text)
        return ended


def judge(
    identity: Identity,
    origin: Origin,
    policy: Policy,
    now: float,
    posture: Posture | None,
    user_devices: list[Posture] | None = None,
) -> Decision:
    """The decision itself, pure: ``posture`` is the device's (identified clients),
    ``user_devices`` every device of the user (``all-user-devices`` listeners)."""
    if identity.device_id is not None:
        return evaluate(posture, policy, _context(identity, identity.device_id, origin, now))
    if origin.unidentified == "allow":
        return Decision.allowed(policy)
    if origin.unidentified == "deny" or user_devices is None:
        return Decision.deny(policy, Reason(UNIDENTIFIED_DEVICE, UNIDENTIFIED_TEXT))
    # all-user-devices: allow only if every device of this user is compliant.
    if not user_devices:
        return evaluate(None, policy, _context(identity, "", origin, now))
    reasons: list[Reason] = []
    allow, report_only = True, False
    for p in user_devices:
        d = evaluate(p, policy, _context(identity, p.device_id, origin, now))
        allow &= d.allow
        report_only |= d.report_only
        reasons.extend(d.reasons)
    return Decision(allow, tuple(reasons), policy.version, policy.sha256,
                    report_only=report_only and allow)


def decision_record(
    event: str,
    identity: Identity,
    origin: Origin,
    decision: Decision,
    posture: Posture | None,
    latency_us: int,
    now: float,
) -> dict[str, Any]:
    """The audit fields of one decision (``event`` = ``decision`` or ``explain``)."""
    return {
        "event": event,
        "decision": decision.decision,
        "reasons": [r.to_dict() for r in decision.reasons],
        "protocol": origin.protocol,
        "listener": origin.listener,
        "client_ip": origin.client_ip,
        "user": identity.user_key,
        "device_id": identity.device_id,
        "device_source": identity.device_source or None,
        "platform": posture.platform if posture else None,
        "posture_age_s": round(now - posture.iat, 3) if posture else None,
        "posture_sha256": posture.sha256 if posture else None,
        "policy_version": decision.policy_version,
        "policy_sha256": decision.policy_sha256,
        "mode": decision.mode,
        "latency_us": latency_us,
    }


def attestation_record(
    source: ReportSource,
    posture: Posture | None,
    decision: Decision | None,
    *,
    code: str | None = None,
) -> dict[str, Any]:
    """The audit fields of one posture report, accepted (``posture`` and its
    evaluation) or refused (``code``): the same keys either way, from either path."""
    accepted = posture is not None and decision is not None
    return {
        "event": "attestation",
        "result": "accepted" if accepted else "refused",
        "code": None if accepted else code,
        "source": source.via,
        "file": source.file,
        "client_ip": source.client_ip,
        "device_id": posture.device_id if posture else None,
        "user": posture.user if posture else None,
        "platform": posture.platform if posture else None,
        "attested_by": posture.attested_by if posture else None,
        "jti": posture.jti if posture else None,
        "posture_sha256": posture.sha256 if posture else None,
        "compliant": decision.allow if decision else None,
        "violations": [r.code for r in decision.reasons] if decision else None,
    }


async def _safe_terminate(session: LiveSession, text: str) -> None:
    import asyncio

    try:
        await asyncio.wait_for(session.terminate(text), timeout=5)
    except Exception as exc:
        log.warning("terminating session failed", error=str(exc))


def _context(identity: Identity, device_id: str, origin: Origin, now: float) -> Context:
    return Context(
        now=datetime.fromtimestamp(now, UTC),
        user=identity.user_key,
        device_id=device_id,
        protocol=origin.protocol,
    )


def _temporary(policy: Policy, code: str) -> Decision:
    return Decision.deny(policy, Reason(code, TEMPORARY_TEXT), temporary=True)


__all__ = [
    "AUDIT_UNAVAILABLE",
    "AUTH_FAILED",
    "STORE_UNAVAILABLE",
    "UNIDENTIFIED_DEVICE",
    "UNKNOWN_DEVICE",
    "Gate",
    "Identity",
    "LiveSession",
    "NullObserver",
    "Observer",
    "Origin",
    "ReportSource",
    "attestation_record",
    "decision_record",
    "judge",
]
