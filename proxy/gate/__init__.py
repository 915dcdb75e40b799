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

* identity: :mod:`proxy.gate.identity` holds the facts front ends supply
  (:class:`Identity`, :class:`Origin`) and the binding rules the gate applies first
  (certificate vs DeviceId, sticky bindings, ``eas_claims``, certificate user,
  revocation, CRLs), from an in-memory :class:`TrustState` kept current from the
  store's change feed (:meth:`Gate.sync_changes`, polled by the server), so a CLI
  ``mailward device revoke`` in another process ends the device's sessions;
* devices: :meth:`Gate.revoke`, :meth:`Gate.unrevoke`, :meth:`Gate.forget`,
  :meth:`Gate.unbind`, :meth:`Gate.alias` change the store's trust records, write
  their audit record with the ``actor`` and re-check the affected sessions.

What the gate does is reported to an :class:`Observer` (Prometheus in a server,
:class:`NullObserver` for one-shot CLI commands); the API and the server report
through the same object (``gate.observer``). Users are told by a :class:`Notices`
observer (``gate.notices``, the server's ``proxy.notify.Notifier``): it sees each
recorded access decision (:class:`DecisionSeen`) and queues notice mail off the
decision path; its ``notice`` records go through :meth:`Gate.record_notice`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from proxy.gate.devices import DeviceAdmin
from proxy.gate.identity import (
    CERTIFICATE_REQUIRED,
    CRL_EXPIRED,
    DEVICE_CLAIM_REFUSED,
    DEVICE_MISMATCH,
    REVOKED,
    Identity,
    Origin,
    TrustState,
    Unidentified,
    Verdict,
    check_identity,
    origin_for,
    session_devices,
)
from proxy.gate.interfaces import (
    AuditSink,
    DecisionSeen,
    GateObserver,
    LiveSession,
    Notices,
    NullObserver,
    Observer,
    TrustAdmin,
)
from proxy.gate.judging import (
    UNIDENTIFIED_DEVICE,
    UNIDENTIFIED_TEXT,
    judge,
    judge_postures,
)
from proxy.gate.records import (
    TEMPORARY_TEXT,
    ReportSource,
    attestation_record,
    decision_record,
    device_record,
    notice_record,
)
from proxy.net.limits import Limits
from proxy.oplog import get_logger
from proxy.policy import (
    UNKNOWN_DEVICE,
    Context,
    Decision,
    Policy,
    Reason,
    evaluate,
    evaluate_authorities,
)
from proxy.posture import POSTURE_CACHED, Posture, PostureReader

if TYPE_CHECKING:
    import asyncio

    from proxy.crl import CrlSet

log = get_logger("mailward.gate")

AUTH_FAILED = "auth_failed"
AUDIT_UNAVAILABLE = "audit_unavailable"
UPSTREAM_UNAVAILABLE = "upstream_unavailable"
STORE_UNAVAILABLE = "posture_store_unavailable"

#: Live sessions re-evaluated at once after a change (each awaits the store).
RECHECK_CONCURRENCY = 256


class Gate(DeviceAdmin):
    def __init__(
        self,
        *,
        store: PostureReader,
        audit: AuditSink,
        policy: Callable[[], Policy],
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
        trust: TrustState | None = None,
        crl: Callable[[], CrlSet | None] | None = None,
        limits: Limits | None = None,
    ) -> None:
        """``store`` is read for posture (``get`` or ``postures``, and
        ``devices_for_user``); device administration and the change feed need a
        :class:`TrustAdmin` store. ``trust`` starts empty (:meth:`load_trust` fills
        it); ``crl`` returns the CRLs in force. Without an ``observer`` the gate
        feeds the process's Prometheus metrics. ``limits`` (default: the DESIGN
        defaults) is where front ends, the accept loop and the API count abuse
        (``gate.limits``)."""
        if observer is None:
            from proxy.metrics import PrometheusObserver

            observer = PrometheusObserver()
        self._observer = observer
        self.limits = limits or Limits(on_hit=getattr(observer, "limit_hit", None))
        self._background: set[asyncio.Task[Any]] = set()
        self._store = store
        self._audit = audit
        self._policy = policy
        self._clock = clock
        self._sessions: set[LiveSession] = set()
        self.trust = trust if trust is not None else TrustState()
        self._crl = crl or (lambda: None)
        self._on_revoked: list[Callable[[str], None]] = []
        #: Told of every recorded access decision (``proxy.notify``); None: nobody.
        self.notices: Notices | None = None

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
        self, identity: Identity, origin: Origin, *, posture: Posture | None = None,
        actor: str | None = None,
    ) -> Decision:
        """What-if: the decision :meth:`decide` would take, recorded as an ``explain``
        record (never counted as an access decision). ``posture`` replaces the stored
        one (a hypothetical device); without it the store is read.

        Like :meth:`decide` it never raises for store or audit failures: the answer
        is then a temporary deny whose reason is :data:`STORE_UNAVAILABLE` or
        :data:`AUDIT_UNAVAILABLE`, which callers report as "cannot answer". ``actor``
        (who asked) goes into the record."""
        decision, _ = await self._decide("explain", identity, origin, posture, actor)
        return decision

    async def _decide(
        self, event: str, identity: Identity, origin: Origin, what_if: Posture | None,
        actor: str | None = None,
    ) -> tuple[Decision, int]:
        started = time.perf_counter()
        policy = self._policy()
        device = None
        POSTURE_CACHED.set(False)
        try:
            decision, posture, device = await self._evaluate(
                identity, origin, policy, what_if, record_binding=event == "decision")
        except Exception as exc:  # the store is unreachable: fail closed
            log.error("posture store unavailable", error=str(exc))
            self._observer.upstream_failed("posture_store")
            decision, posture = _temporary(policy, STORE_UNAVAILABLE), None
        latency_us = int((time.perf_counter() - started) * 1e6)
        now = self._clock()
        fields = decision_record(event, identity, origin, decision, posture, latency_us,
                                 now, device)
        if actor:
            fields["actor"] = actor
        fields["posture_cached"] = POSTURE_CACHED.get()  # Redis down: read from its cache
        try:
            await self._audit.write(fields)
        except Exception as exc:  # AuditUnavailable or anything else: fail closed
            log.error("audit log unavailable; refusing", error=str(exc))
            return _temporary(policy, AUDIT_UNAVAILABLE), latency_us
        if event == "decision" and self.notices is not None:
            self.notices.decided(DecisionSeen(identity, origin, decision, policy, device, now))
        return decision, latency_us

    async def warning_alert(self, identity: Identity, origin: Origin,
                      decision: Decision) -> str | None:
        """The warning an allowed login should show now (IMAP ``* OK [ALERT]``), as
        the notices observer rations it (once per device per day), or None."""
        if self.notices is None or not decision.allow or not decision.reasons:
            return None
        device = self.trust.resolve(identity.device_id) if identity.device_id else None
        seen = DecisionSeen(identity, origin, decision, self._policy(), device, self._clock())
        return await self.notices.alert(seen)

    async def record_notice(self, user: str, device: str | None, reason: str, kind: str,
                            channel: str, result: str, **extra: Any) -> None:
        """A user was told (or telling failed): its ``notice`` record."""
        await self._write_quietly(notice_record(user, device, reason, kind, channel,
                                                result, **extra))

    async def _evaluate(
        self, identity: Identity, origin: Origin, policy: Policy,
        what_if: Posture | None = None, *, record_binding: bool = False,
        cache: dict[str, asyncio.Future[list[Posture]]] | None = None,
    ) -> tuple[Decision, Posture | None, str | None]:
        """The identity rules first (dictionary lookups), then the posture the
        decision needs from the store (read once per device and ``cache``: a
        re-check of many sessions), then :func:`judge_postures`; also returns the
        posture in force and the resolved device."""
        now = self._clock()
        verdict = check_identity(identity, origin, self.trust, self._crl(), now)
        if verdict.reason is not None:
            return (Decision.deny(policy, verdict.reason, temporary=verdict.temporary),
                    None, verdict.device)
        if verdict.bind is not None and record_binding:
            self._bind(verdict.bind)
        postures: list[Posture] = []
        user_devices = None
        if what_if is not None:
            postures = [what_if]
        elif identity.device_id is not None:
            postures = await self._cached_postures(self.trust.store_id(identity.device_id),
                                                   cache)
        elif origin.unidentified == "all-user-devices":
            user_devices = await self._store.devices_for_user(identity.user_key)
        decision, posture = judge_postures(identity, origin, policy, now, postures, user_devices)
        return decision, posture, verdict.device

    async def _postures(self, device_id: str) -> list[Posture]:
        many = getattr(self._store, "device_postures", None)
        if many is not None:
            return cast(list[Posture], await many(device_id))
        one = await self._store.get(device_id)
        return [] if one is None else [one]

    async def _cached_postures(
        self, device: str, cache: dict[str, asyncio.Future[list[Posture]]] | None
    ) -> list[Posture]:
        if cache is None:
            return await self._postures(device)
        import asyncio

        found = cache.get(device)
        if found is None:
            found = cache[device] = asyncio.ensure_future(self._postures(device))
        return list(await asyncio.shield(found))

    def _bind(self, device: str) -> None:
        """A device seen with a verified certificate naming it: from now on its
        claims need that certificate (sticky binding). In memory at once; the store
        write runs off the decision path (a locked store must not stall a login)."""
        if device in self.trust.bindings:
            return
        self.trust.bindings.add(device)
        bind = getattr(self._store, "bind", None)
        if bind is not None:
            self.spawn(self._store_binding(bind, device), "bind")

    async def _store_binding(self, bind: Callable[[str], Any], device: str) -> None:
        try:
            await bind(device)
        except Exception as exc:  # kept in memory; the next certificate session retries
            self.trust.bindings.discard(device)
            log.error("recording a certificate binding failed", device=device, error=str(exc))

    def spawn(self, coro: Any, name: str) -> None:
        """Run ``coro`` off the caller's path (re-checks after a report, binding
        writes); :meth:`settle` waits for what is running."""
        import asyncio

        task = asyncio.get_running_loop().create_task(coro, name=f"gate-{name}")
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gate background task failed", task=task.get_name(),
                      error=str(task.exception()))

    async def settle(self, timeout: float | None = None) -> None:
        """Wait for the background work started so far (tests, shutdown)."""
        import asyncio

        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

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
        device = self.trust.resolve(identity.device_id) if identity.device_id else None
        fields = decision_record("decision", identity, origin, decision, None, 0,
                                 self._clock(), device)
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
        """:meth:`attest_report`, returning only the evaluation."""
        decision, _ = await self.attest_report(source, posture)
        return decision

    async def attest_report(self, source: ReportSource, posture: Posture, *,
                            wait: bool = True) -> tuple[Decision, Posture]:
        """A verified report was stored: evaluate the posture now in force for the
        device (the MDM's, with the device's own report adding violations), write
        the ``attestation`` record and end the device's live sessions it no longer
        allows (continuous access evaluation). Returns that evaluation and the
        posture in force. An audit failure is logged, not raised: the posture is
        committed either way (callers check the log's health before they ingest).

        ``wait=False`` (the API): return once the posture is stored and recorded;
        the device's sessions are re-checked concurrently in the background."""
        try:
            stored = await self._postures(self.trust.store_id(posture.device_id))
        except Exception as exc:
            log.error("reading the posture in force failed", error=str(exc))
            stored = []
        context = Context(now=datetime.fromtimestamp(self._clock(), UTC), user=posture.user,
                          device_id=posture.device_id, protocol=source.via)
        decision, in_force = evaluate_authorities(stored or [posture], self._policy(), context)
        in_force = in_force or posture
        await self._write_quietly(attestation_record(source, posture, decision,
                                                     in_force=in_force))
        self._observer.attestation("accepted")
        recheck = self._posture_rechecked(posture.device_id, posture.user)
        if wait:
            await recheck
        else:
            self.spawn(recheck, "recheck")
        return decision, in_force

    async def _posture_rechecked(self, device_id: str, user: str) -> None:
        try:
            await self.posture_changed(device_id, user)
        except Exception as exc:
            log.error("re-evaluating live sessions failed", error=str(exc))

    def assess(self, posture: Posture, protocol: str) -> Decision:
        """The device's own posture under the policy in force, for its own user: is
        the device compliant? Nothing is recorded (the caller's record carries it)."""
        context = Context(now=datetime.fromtimestamp(self._clock(), UTC), user=posture.user,
                          device_id=posture.device_id, protocol=protocol)
        return evaluate(posture, self._policy(), context)

    async def record_abuse(self, summaries: list[dict[str, Any]]) -> None:
        """``abuse_summary`` records (from :meth:`Limits.abuse_summaries`), written
        together (one group commit)."""
        import asyncio

        await asyncio.gather(*(self._write_quietly(s) for s in summaries))

    def attest_garbage(self, source: ReportSource, code: str, listener: str = "api") -> None:
        """A report refused before its signer was known (unauthenticated garbage:
        malformed, bad signature, untrusted chain, oversized): counted, and summarised
        per address once a minute, never one audit record each."""
        self._observer.attestation(code)
        self.limits.abuse(source.client_ip or "", f"report_{code}", listener)

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
        trust = self.trust
        devices = {device_id.lower(), trust.resolve(device_id)}
        affected = [
            s
            for s in self._sessions
            if not devices.isdisjoint(session_devices(s.identity, trust))
            or (s.identity.device_id is None and user_key and s.identity.user_key == user_key)
        ]
        return await self._recheck(affected, "posture_changed")

    async def recheck_devices(self, devices: set[str], trigger: str) -> int:
        """Re-check the live sessions of these devices (lower-cased keys)."""
        trust = self.trust
        affected = [s for s in self._sessions
                    if not devices.isdisjoint(session_devices(s.identity, trust))]
        return await self._recheck(affected, trigger)

    async def policy_changed(self) -> int:
        """Re-check every live session against the current policy."""
        return await self._recheck(list(self._sessions), "policy_changed")

    async def recheck_all(self, trigger: str = "posture_aged") -> int:
        """Periodic sweep: posture that ages past the limit ends sessions too."""
        return await self._recheck(list(self._sessions), trigger)

    async def _recheck(self, sessions: list[LiveSession], trigger: str) -> int:
        """Re-evaluate ``sessions`` concurrently (at most
        :data:`RECHECK_CONCURRENCY` at a time) and end the ones now denied."""
        if not sessions:
            return 0
        import asyncio  # deferred: one-shot CLI commands never re-check sessions

        policy = self._policy()
        limit = asyncio.Semaphore(RECHECK_CONCURRENCY)
        cache: dict[str, asyncio.Future[list[Posture]]] = {}

        async def one(session: LiveSession) -> int:
            async with limit:
                return await self._recheck_one(session, policy, trigger, cache)

        return sum(await asyncio.gather(*(one(s) for s in sessions)))

    async def recheck_session(self, session: LiveSession, trigger: str = "policy_changed"
                              ) -> bool:
        """Re-evaluate one registered session now (ActiveSync: a request sees the
        policy version changed): ends it through :meth:`LiveSession.terminate` when
        denied. True when it is still live and allowed (refresh its cached version)."""
        if session not in self._sessions:
            return False
        ended = await self._recheck_one(session, self._policy(), trigger, None)
        return not ended and session in self._sessions

    async def _recheck_one(self, session: LiveSession, policy: Policy, trigger: str,
                           cache: dict[str, asyncio.Future[list[Posture]]] | None) -> int:
        try:
            decision, _, _ = await self._evaluate(session.identity, session.origin, policy,
                                                  cache=cache)
        except Exception as exc:
            log.error("re-evaluation failed; keeping session", error=str(exc))
            return 0
        # The session may have closed, or an overlapping re-check ended it, while
        # we awaited the store: end it once only, and only while it is live.
        if decision.allow or session not in self._sessions:
            return 0
        self._unregister(session, ended_by_gate=True)
        # Record first: when the client sees the goodbye, its record is durable (all
        # re-checks of one change share a group commit, so this costs one fsync).
        await self.record_session_end(
            session.origin,
            trigger,
            identity=session.identity,
            detail=",".join(r.code for r in decision.enforced_reasons),
        )
        await _safe_terminate(session, decision.user_text())
        return 1


async def _safe_terminate(session: LiveSession, text: str) -> None:
    import asyncio

    try:
        async with asyncio.timeout(5):
            await session.terminate(text)
    except Exception as exc:
        log.warning("terminating session failed", error=str(exc))


def _temporary(policy: Policy, code: str) -> Decision:
    return Decision.deny(policy, Reason(code, TEMPORARY_TEXT), temporary=True)


__all__ = [
    "AUDIT_UNAVAILABLE",
    "AUTH_FAILED",
    "CERTIFICATE_REQUIRED",
    "CRL_EXPIRED",
    "DEVICE_CLAIM_REFUSED",
    "DEVICE_MISMATCH",
    "REVOKED",
    "STORE_UNAVAILABLE",
    "TEMPORARY_TEXT",
    "UNIDENTIFIED_DEVICE",
    "UNIDENTIFIED_TEXT",
    "UNKNOWN_DEVICE",
    "AuditSink",
    "DecisionSeen",
    "Gate",
    "GateObserver",
    "Identity",
    "LiveSession",
    "Notices",
    "NullObserver",
    "Observer",
    "Origin",
    "ReportSource",
    "TrustAdmin",
    "TrustState",
    "Unidentified",
    "Verdict",
    "attestation_record",
    "decision_record",
    "device_record",
    "judge",
    "judge_postures",
    "notice_record",
    "origin_for",
]
