"""The audit fields the gate writes: one builder per event (DESIGN "Audit log")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from proxy.gate.identity import Identity, Origin
from proxy.policy import Decision
from proxy.posture import Posture

TEMPORARY_TEXT = "Mail access is temporarily unavailable. Please try again in a few minutes."


@dataclass(frozen=True, slots=True)
class ReportSource:
    """Where a posture report came in: the API (with the client's address), a
    file given to ``mailward posture ingest``, or an MDM connector (``mdm``)."""

    via: Literal["api", "cli", "mdm"]
    client_ip: str = ""
    file: str | None = None


def decision_record(
    event: str,
    identity: Identity,
    origin: Origin,
    decision: Decision,
    posture: Posture | None,
    latency_us: int,
    now: float,
    device: str | None = None,
) -> dict[str, Any]:
    """The audit fields of one decision (``event`` = ``decision`` or ``explain``).
    ``device_id`` is the id presented, ``device`` the device it resolved to;
    ``posture_source`` the authority of the posture in force."""
    source = identity.device_source or None
    if identity.cert is not None and identity.cert.device_id:
        source = "client_cert"
    return {
        "event": event,
        "decision": decision.decision,
        "reasons": [r.to_dict() for r in decision.reasons],
        "protocol": origin.protocol,
        "listener": origin.listener,
        "client_ip": origin.client_ip,
        "user": identity.user_key,
        "device_id": identity.device_id,
        "device": device,
        "device_source": source,
        "platform": posture.platform if posture else None,
        "posture_age_s": round(now - posture.iat, 3) if posture else None,
        "posture_sha256": posture.sha256 if posture else None,
        "posture_source": posture.authority if posture else None,
        "posture_cached": False,
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
    in_force: Posture | None = None,
) -> dict[str, Any]:
    """The audit fields of one posture report, accepted (``posture`` and the
    evaluation of the posture now in force) or refused (``code``): the same keys
    either way, from either path."""
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
        "authority": posture.authority if posture else None,
        "jti": posture.jti if posture else None,
        "posture_sha256": posture.sha256 if posture else None,
        "posture_source": (in_force or posture).authority if posture else None,
        "compliant": decision.allow if decision else None,
        "violations": [r.code for r in decision.reasons] if decision else None,
    }


def device_record(event: str, device_id: str, device: str, actor: str,
                  via: str, **extra: Any) -> dict[str, Any]:
    """``device_revoked`` / ``device_unrevoked`` / ``device_forgotten`` /
    ``device_unbound`` / ``device_alias``: who did what to which device."""
    fields: dict[str, Any] = {"event": event, "device_id": device_id, "device": device,
                              "actor": actor, "via": via}
    fields.update(extra)
    return fields


def notice_record(user: str, device: str | None, reason: str, kind: str, channel: str,
                  result: str, **extra: Any) -> dict[str, Any]:
    """``notice``: a user was told (``kind`` warning | deny) through ``channel``
    (``mail`` | ``imap_alert``), ``result`` delivered | failed (with ``error``).
    Never the message itself."""
    fields: dict[str, Any] = {"event": "notice", "user": user, "device": device,
                              "reason": reason, "kind": kind, "channel": channel,
                              "result": result}
    fields.update(extra)
    return fields
