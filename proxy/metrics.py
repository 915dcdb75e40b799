"""Prometheus metrics, defined once. ``/metrics`` on the API listener exposes them.

This is the only module that touches Prometheus objects. Everything else reports
through one :class:`PrometheusObserver` (the ``proxy.gate.Observer`` protocol), which
the server creates once and hands to the gate; the API, the server and later the
limits and MDM connectors reach it as ``gate.observer``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from proxy import __version__

if TYPE_CHECKING:
    from proxy.policy import Decision, Policy

DECISIONS = Counter(
    "mailward_decisions_total",
    "Access decisions by protocol, decision and first reason code",
    ["protocol", "decision", "reason"],
)
DECISION_LATENCY = Histogram(
    "mailward_decision_latency_seconds",
    "Time from identity to decision (posture lookup + policy evaluation)",
    buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5),
)
LIVE_SESSIONS = Gauge("mailward_live_sessions", "Live proxied sessions", ["protocol"])
ATTESTATIONS = Counter(
    "mailward_attestations_total", "Posture report ingests by result", ["result"]
)
UPSTREAM_ERRORS = Counter(
    "mailward_upstream_errors_total", "Upstream or backing-store failures", ["upstream"]
)
AUDIT_WRITE_LATENCY = Histogram(
    "mailward_audit_write_seconds", "Audit append including group-commit fsync"
)
POLICY_INFO = Gauge(
    "mailward_policy_info", "Loaded policy (value 1)", ["version", "sha256"]
)
POLICY_RELOAD_FAILURES = Counter(
    "mailward_policy_reload_failures_total", "Policy reloads refused as invalid"
)
AUDIT_WITNESS_PENDING = Gauge(
    "mailward_audit_witness_pending", "Audit checkpoints not yet accepted by [audit] witness_url"
)
SESSIONS_ENDED = Counter(
    "mailward_sessions_ended_total", "Live sessions ended by re-evaluation", ["protocol"]
)
MDM_SYNC_SECONDS = Histogram(
    "mailward_mdm_sync_seconds", "Duration of one MDM connector sync pass", ["connector"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
MDM_DEVICES = Gauge(
    "mailward_mdm_devices", "Devices listed by the connector's last complete full sync",
    ["connector"],
)
MDM_ERRORS = Counter(
    "mailward_mdm_errors_total",
    "MDM connector failures by kind (auth, http, timeout, network, throttled, garbage, "
    "malformed record, store, config)",
    ["connector", "kind"],
)

LIMIT_HITS = Counter(
    "mailward_limit_hits_total", "Limits of [limits] hit, by limit and listener",
    ["limit", "listener"],
)
CERT_EXPIRY = Gauge(
    "mailward_cert_expiry_seconds",
    "Seconds until a configured certificate bundle (earliest notAfter) or CRL "
    "(nextUpdate) runs out; negative once past",
    ["file"],
)
HEALTH = Gauge(
    "mailward_health", "Readiness checks (1 ok, 0 failing), as /readyz reports them",
    ["check"],
)
BUILD_INFO = Gauge("mailward_build_info", "The running mailward release (value 1)", ["version"])
BUILD_INFO.labels(__version__).set(1)


def observe_decision(protocol: str, decision: Decision, latency_us: int) -> None:
    first = decision.reasons[0].code if decision.reasons else "compliant"
    DECISIONS.labels(protocol, decision.decision, first).inc()
    DECISION_LATENCY.observe(latency_us / 1e6)


class PrometheusObserver:
    """The gate's observer in a running server: feeds the metrics above."""

    def decided(self, protocol: str, decision: Decision, latency_us: int) -> None:
        observe_decision(protocol, decision, latency_us)

    def session_opened(self, protocol: str) -> None:
        LIVE_SESSIONS.labels(protocol).inc()

    def session_closed(self, protocol: str, *, ended_by_gate: bool) -> None:
        LIVE_SESSIONS.labels(protocol).dec()
        if ended_by_gate:
            SESSIONS_ENDED.labels(protocol).inc()

    def upstream_failed(self, upstream: str) -> None:
        UPSTREAM_ERRORS.labels(upstream).inc()

    def attestation(self, result: str) -> None:
        ATTESTATIONS.labels(result).inc()

    def policy_loaded(self, policy: Policy) -> None:
        POLICY_INFO.clear()  # exactly one series: the policy in force now
        POLICY_INFO.labels(policy.version, policy.sha256).set(1)

    def policy_reload_failed(self) -> None:
        POLICY_RELOAD_FAILURES.inc()

    def limit_hit(self, limit: str, listener: str) -> None:
        LIMIT_HITS.labels(limit, listener).inc()

    def health(self, check: str, ok: bool) -> None:
        HEALTH.labels(check).set(1 if ok else 0)

    def cert_expiry(self, file: str, seconds_left: float) -> None:
        CERT_EXPIRY.labels(file).set(seconds_left)

    def audit_witness_pending(self, count: int) -> None:
        """Checkpoints queued for the witness URL (``proxy.audit.witness``)."""
        AUDIT_WITNESS_PENDING.set(count)

    def mdm_synced(self, connector: str, seconds: float, devices: int | None) -> None:
        """A sync pass of ``connector`` ended; ``devices`` after a complete full one."""
        MDM_SYNC_SECONDS.labels(connector).observe(seconds)
        if devices is not None:
            MDM_DEVICES.labels(connector).set(devices)

    def mdm_error(self, connector: str, kind: str) -> None:
        MDM_ERRORS.labels(connector, kind).inc()

    def expose(self) -> tuple[bytes, str]:
        body: bytes = generate_latest(REGISTRY)
        return body, str(CONTENT_TYPE_LATEST)


class TimedAuditSink:
    """Wraps the audit log for the gate: times each append, group-commit fsync
    included (``mailward_audit_write_seconds``)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def write(self, fields: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            record: dict[str, Any] = await self._inner.write(fields)
            return record
        finally:
            AUDIT_WRITE_LATENCY.observe(time.perf_counter() - started)
