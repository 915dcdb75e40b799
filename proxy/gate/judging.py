"""The posture part of a decision, pure: :func:`judge` and :func:`judge_postures`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from proxy.gate.identity import Identity, Origin
from proxy.policy import Context, Decision, Policy, Reason, evaluate, evaluate_authorities
from proxy.posture import Posture

UNIDENTIFIED_DEVICE = "unidentified_device"
UNIDENTIFIED_TEXT = (
    "This mail app connected without a device certificate, so the device cannot be "
    "checked. Install the company mail profile from the device management app."
)


def judge(
    identity: Identity,
    origin: Origin,
    policy: Policy,
    now: float,
    posture: Posture | None,
    user_devices: list[Posture] | None = None,
) -> Decision:
    """The posture part of a decision, pure: ``posture`` is the device's (identified
    clients), ``user_devices`` every device of the user (``all-user-devices``)."""
    postures = [] if posture is None else [posture]
    return judge_postures(identity, origin, policy, now, postures, user_devices)[0]


def judge_postures(
    identity: Identity,
    origin: Origin,
    policy: Policy,
    now: float,
    postures: Sequence[Posture],
    user_devices: list[Posture] | None = None,
) -> tuple[Decision, Posture | None]:
    """:func:`judge` from the device's posture per authority; also returns the
    posture in force (for the record)."""
    if identity.device_id is not None:
        context = _context(identity, identity.device_id, origin, now)
        return evaluate_authorities(postures, policy, context)
    if origin.unidentified == "allow":
        return Decision.allowed(policy), None
    if origin.unidentified == "deny" or user_devices is None:
        return Decision.deny(policy, Reason(UNIDENTIFIED_DEVICE, UNIDENTIFIED_TEXT)), None
    # all-user-devices: allow only if every device of this user is compliant.
    if not user_devices:
        return evaluate(None, policy, _context(identity, "", origin, now)), None
    reasons: list[Reason] = []
    allow, report_only = True, False
    for p in user_devices:
        d = evaluate(p, policy, _context(identity, p.device_id, origin, now))
        allow &= d.allow
        report_only |= d.report_only
        reasons.extend(d.reasons)
    return Decision(allow, tuple(reasons), policy.version, policy.sha256,
                    report_only=report_only and allow), None


def _context(identity: Identity, device_id: str, origin: Origin, now: float) -> Context:
    return Context(
        now=datetime.fromtimestamp(now, UTC),
        user=identity.user_key,
        device_id=device_id,
        protocol=origin.protocol,
    )
