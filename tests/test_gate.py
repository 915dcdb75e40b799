"""The gate: one decision and one audit record per call, fail-closed on store/audit
failures, unidentified handling, and ending live sessions on posture/policy change."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from helpers.fakes import FakeSession, ListAudit

from proxy.gate import (
    AUDIT_UNAVAILABLE,
    STORE_UNAVAILABLE,
    Gate,
    Identity,
    NullObserver,
    Origin,
    ReportSource,
    attestation_record,
)
from proxy.policy import Policy, ProhibitedApp
from proxy.posture import App, CommitResult, Posture

TIKTOK = "com.zhiliaoapp.musically"
RULE = ProhibitedApp("TikTok", (TIKTOK,), "reads the clipboard", "Uninstall TikTok.")
POLICY = Policy(version="v1", sha256="a" * 64, prohibited=(RULE,))


def make_posture(device: str, user: str, *apps: str, age_s: float = 10) -> Posture:
    iat = int(time.time() - age_s)
    return Posture(device, user, "android", "14", True, tuple(App(a) for a in apps), iat,
                   iat + 3600, f"j-{device}-{iat}", device, "device")


class FakeStore:
    def __init__(self, *postures: Posture) -> None:
        self.postures = {p.device_id: p for p in postures}
        self.broken = False

    async def get(self, device_id: str) -> Posture | None:
        if self.broken:
            raise OSError("disk gone")
        return self.postures.get(device_id)

    async def devices_for_user(self, user: str) -> list[Posture]:
        return [p for p in self.postures.values() if p.user == user.lower()]

    async def commit_attestation(self, posture: Posture, nonce: str | None,
                                 now: float) -> CommitResult:
        self.postures[posture.device_id] = posture
        return "ok"

    async def issue_nonce(self, nonce: str, expires_at: float) -> None: ...
    async def ping(self) -> bool:
        return True

    async def close(self) -> None: ...


IMAP = Origin("imap", "imaps", "192.0.2.7", "deny")


def gate_with(*postures: Posture, policy: Policy = POLICY) -> tuple[Gate, FakeStore, ListAudit]:
    store, audit = FakeStore(*postures), ListAudit()
    holder = {"p": policy}
    gate = Gate(store=store, audit=audit, policy=lambda: holder["p"])
    gate.holder = holder  # type: ignore[attr-defined]
    return gate, store, audit


async def test_one_record_per_decision_with_design_fields() -> None:
    """An allow writes exactly one decision record with the DESIGN fields."""
    gate, _, audit = gate_with(make_posture("d1", "alice@corp.example", "com.mail"))
    d = await gate.decide(Identity("Alice@Corp.Example", "d1", "client_cert"), IMAP)
    assert d.allow
    assert len(audit.records) == 1
    r = audit.records[0]
    for key in ("event", "decision", "reasons", "protocol", "listener", "client_ip", "user",
                "device_id", "platform", "posture_age_s", "policy_version", "policy_sha256",
                "mode", "latency_us"):
        assert key in r, key
    assert r["event"] == "decision" and r["decision"] == "allow"
    assert r["user"] == "alice@corp.example" and r["client_ip"] == "192.0.2.7"
    assert r["platform"] == "android" and r["policy_version"] == "v1"
    assert 0 <= r["latency_us"] < 1_000_000


async def test_deny_names_app() -> None:
    """A TikTok device is denied and the record names the app."""
    gate, _, audit = gate_with(make_posture("d1", "alice@corp.example", TIKTOK))
    d = await gate.decide(Identity("alice@corp.example", "d1"), IMAP)
    assert not d.allow and "TikTok" in d.user_text()
    assert audit.records[0]["reasons"][0]["app_id"] == TIKTOK


async def test_store_failure_fails_closed() -> None:
    """An unreachable posture store gives a temporary deny, still logged."""
    gate, store, audit = gate_with()
    store.broken = True
    d = await gate.decide(Identity("a@corp.example", "d1"), IMAP)
    assert not d.allow and d.temporary
    assert audit.records[0]["reasons"][0]["code"] == "posture_store_unavailable"


async def test_audit_failure_fails_closed() -> None:
    """If the decision cannot be logged, access is refused (temporary)."""
    gate, _, audit = gate_with(make_posture("d1", "a@corp.example", "com.mail"))
    audit.broken = True
    d = await gate.decide(Identity("a@corp.example", "d1"), IMAP)
    assert not d.allow and d.temporary


async def test_unidentified_modes() -> None:
    """Unidentified clients: deny by default, allow if configured, and
    all-user-devices only when every device of the user is compliant."""
    clean = make_posture("d1", "a@corp.example", "com.mail")
    dirty = make_posture("d2", "a@corp.example", TIKTOK)
    gate, store, _ = gate_with(clean)
    who = Identity("a@corp.example", None)
    assert not (await gate.decide(who, IMAP)).allow
    assert (await gate.decide(who, replace(IMAP, unidentified="allow"))).allow
    all_dev = replace(IMAP, unidentified="all-user-devices")
    assert (await gate.decide(who, all_dev)).allow
    store.postures["d2"] = dirty
    d = await gate.decide(who, all_dev)
    assert not d.allow and "TikTok" in d.user_text()
    d = await gate.decide(Identity("nobody@corp.example", None), all_dev)
    assert not d.allow and d.reasons[0].code == "unknown_device"


async def test_auth_failed_and_session_end_records() -> None:
    """Wrong password: a deny record with auth_failed; early close: session_end."""
    gate, _, audit = gate_with()
    await gate.record_auth_failed(Identity("a@corp.example", "d1"), IMAP)
    await gate.record_session_end(IMAP, "timeout")
    assert audit.records[0]["decision"] == "deny"
    assert audit.records[0]["reasons"][0]["code"] == "auth_failed"
    assert audit.records[1] == {"event": "session_end", "reason": "timeout", "protocol": "imap",
                                "listener": "imaps", "client_ip": "192.0.2.7", "user": None,
                                "device_id": None}


async def test_posture_change_ends_only_that_devices_denied_sessions() -> None:
    """A new non-compliant posture ends the sessions of that device, and only those."""
    p1 = make_posture("d1", "a@corp.example", "com.mail")
    p2 = make_posture("d2", "b@corp.example", "com.mail")
    gate, store, audit = gate_with(p1, p2)
    s1 = FakeSession(Identity("a@corp.example", "d1"), IMAP)
    s2 = FakeSession(Identity("b@corp.example", "d2"), IMAP)
    gate.register(s1)
    gate.register(s2)
    assert await gate.posture_changed("d1") == 0  # still compliant
    store.postures["d1"] = make_posture("d1", "a@corp.example", TIKTOK)
    assert await gate.posture_changed("d1") == 1
    assert s1.ended and "TikTok" in s1.ended[0]
    assert not s2.ended
    assert gate.live_sessions() == [s2]
    end = audit.records[-1]
    assert end["event"] == "session_end" and end["reason"] == "posture_changed"
    assert end["device_id"] == "d1" and end["detail"] == "prohibited_app"


async def test_policy_change_ends_exactly_the_sessions_it_should() -> None:
    """A new rule ends the sessions it denies; others stay."""
    p1 = make_posture("d1", "a@corp.example", "com.chat")
    p2 = make_posture("d2", "b@corp.example", "com.mail")
    gate, _, _ = gate_with(p1, p2)
    s1 = FakeSession(Identity("a@corp.example", "d1"), IMAP)
    s2 = FakeSession(Identity("b@corp.example", "d2"), IMAP)
    gate.register(s1)
    gate.register(s2)
    chat = ProhibitedApp("Chat", ("com.chat",), "r", "Remove Chat.")
    gate.holder["p"] = replace(POLICY, version="v2", prohibited=(RULE, chat))  # type: ignore[attr-defined]
    assert await gate.policy_changed() == 1
    assert s1.ended and not s2.ended


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def decided(self, protocol: str, decision: Any, latency_us: int) -> None:
        self.events.append(("decided", protocol, decision.decision))

    def session_opened(self, protocol: str) -> None:
        self.events.append(("opened", protocol))

    def session_closed(self, protocol: str, *, ended_by_gate: bool) -> None:
        self.events.append(("closed", protocol, str(ended_by_gate)))

    def upstream_failed(self, upstream: str) -> None:
        self.events.append(("upstream_failed", upstream))

    def attestation(self, result: str) -> None:
        self.events.append(("attestation", result))

    def policy_loaded(self, policy: Policy) -> None:
        self.events.append(("policy", policy.version))

    def policy_reload_failed(self) -> None:
        self.events.append(("reload_failed",))

    def expose(self) -> tuple[bytes, str]:
        return b"", "text/plain"


async def test_observer_sees_decisions_and_upstream_failures() -> None:
    """Metrics hooks: each decision, a mail upstream that is down (recorded as a
    temporary deny) and a posture store that fails are reported to the observer."""
    store, audit, obs = FakeStore(), ListAudit(), RecordingObserver()
    gate = Gate(store=store, audit=audit, policy=lambda: POLICY, observer=obs)
    who = Identity("a@corp.example", "d1")
    await gate.record_deny(who, IMAP, "upstream_unavailable", "later", temporary=True)
    store.broken = True
    await gate.decide(who, IMAP)
    assert ("upstream_failed", "imap") in obs.events
    assert ("upstream_failed", "posture_store") in obs.events
    assert [e for e in obs.events if e[0] == "decided"] == [("decided", "imap", "deny")] * 2
    assert audit.records[0]["reasons"][0]["code"] == "upstream_unavailable"


async def test_timed_audit_sink_observes_write_latency() -> None:
    """The server's audit wrapper feeds mailward_audit_write_seconds."""
    from proxy import metrics

    def count() -> float:
        for family in metrics.AUDIT_WRITE_LATENCY.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    return sample.value
        return 0.0

    before = count()
    inner = ListAudit()
    await metrics.TimedAuditSink(inner).write({"event": "explain"})
    assert count() == before + 1 and inner.records == [{"event": "explain"}]


async def test_overlapping_rechecks_end_a_session_once() -> None:
    """A posture change and a policy change re-checking at the same time end the
    session once, with one session_end record; a session that closed meanwhile is
    left alone."""
    import asyncio

    gate, store, audit = gate_with(make_posture("d1", "a@corp.example", TIKTOK),
                                   make_posture("d2", "b@corp.example", TIKTOK))
    s1 = FakeSession(Identity("a@corp.example", "d1"), IMAP)
    s2 = FakeSession(Identity("b@corp.example", "d2"), IMAP)
    gate.register(s1)
    gate.register(s2)
    slow_get = store.get

    async def get(device_id: str) -> Posture | None:
        await asyncio.sleep(0.01)  # both re-checks are now between lookup and action
        if device_id == "d2":
            gate.unregister(s2)  # closed normally while being re-checked
        return await slow_get(device_id)

    store.get = get  # type: ignore[method-assign]
    ended = await asyncio.gather(gate.posture_changed("d1"), gate.policy_changed())
    assert sum(ended) == 1
    assert len(s1.ended) == 1 and s2.ended == []
    assert [r["device_id"] for r in audit.records if r["event"] == "session_end"] == ["d1"]


# ------------------------------------------------------------------ what-if


async def test_explain_is_one_explain_record_and_no_decision() -> None:
    """explain evaluates like decide but writes an `explain` record and is not
    counted as an access decision."""
    store, audit, obs = FakeStore(make_posture("d1", "a@corp.example", TIKTOK)), ListAudit(), \
        RecordingObserver()
    gate = Gate(store=store, audit=audit, policy=lambda: POLICY, observer=obs)
    d = await gate.explain(Identity("a@corp.example", "d1", "cli"), Origin("imap", "cli"))
    assert not d.allow and d.reasons[0].code == "prohibited_app"
    assert [r["event"] for r in audit.records] == ["explain"]
    assert audit.records[0]["device_id"] == "d1" and audit.records[0]["platform"] == "android"
    assert not [e for e in obs.events if e[0] == "decided"]


async def test_explain_what_if_posture_is_not_read_from_the_store() -> None:
    """A what-if posture is judged as given; the store (here broken) is not read."""
    gate, store, audit = gate_with()
    store.broken = True
    what_if = make_posture("d9", "a@corp.example", "com.mail")
    d = await gate.explain(Identity("a@corp.example", "d9"), IMAP, posture=what_if)
    assert d.allow and audit.records[0]["posture_sha256"] == what_if.sha256


async def test_explain_says_what_is_unavailable() -> None:
    """With the store or the audit log down, explain answers a temporary deny naming
    which one, so callers can say they cannot answer."""
    gate, store, audit = gate_with(make_posture("d1", "a@corp.example"))
    store.broken = True
    d = await gate.explain(Identity("a@corp.example", "d1"), IMAP)
    assert d.temporary and d.reasons[0].code == STORE_UNAVAILABLE
    store.broken, audit.broken = False, True
    d = await gate.explain(Identity("a@corp.example", "d1"), IMAP)
    assert d.temporary and d.reasons[0].code == AUDIT_UNAVAILABLE


# ------------------------------------------------------------------ attestations


async def test_attestation_records_have_one_schema() -> None:
    """Accepted and refused reports, from the API or the CLI, give records with the
    same keys; the accepted one carries the evaluation."""
    gate, _, audit = gate_with()
    posture = make_posture("d1", "a@corp.example", TIKTOK)
    d = await gate.attest(ReportSource("api", "192.0.2.9"), posture)
    await gate.attest_refused(ReportSource("cli", file="x.jws"), "replay")
    accepted, refused = audit.records
    assert set(accepted) == set(refused) == set(
        attestation_record(ReportSource("api"), None, None, code="x"))
    assert (accepted["result"], accepted["source"], accepted["client_ip"]) == (
        "accepted", "api", "192.0.2.9")
    assert accepted["compliant"] is False and accepted["violations"] == ["prohibited_app"]
    assert not d.allow
    assert (refused["result"], refused["code"], refused["source"], refused["file"]) == (
        "refused", "replay", "cli", "x.jws")


async def test_attest_ends_the_devices_sessions_and_tells_the_observer() -> None:
    """A stored non-compliant report ends the device's live session (continuous
    access evaluation) and is counted by result."""
    store, audit, obs = FakeStore(), ListAudit(), RecordingObserver()
    gate = Gate(store=store, audit=audit, policy=lambda: POLICY, observer=obs)
    session = FakeSession(Identity("a@corp.example", "d1"), IMAP)
    gate.register(session)
    posture = make_posture("d1", "a@corp.example", TIKTOK)
    store.postures["d1"] = posture  # what ingest committed
    await gate.attest(ReportSource("api"), posture)
    await gate.attest_refused(ReportSource("api"), "bad_signature")
    assert session.ended and "TikTok" in session.ended[0]
    assert ("attestation", "accepted") in obs.events
    assert ("attestation", "bad_signature") in obs.events


async def test_attestation_record_survives_a_broken_audit_log() -> None:
    """The posture is committed either way: a failed attestation record is logged,
    not raised."""
    gate, _, audit = gate_with()
    audit.broken = True
    d = await gate.attest(ReportSource("cli", file="f"), make_posture("d1", "a@corp.example"))
    assert d.allow and audit.records == []


def test_null_observer_exposes_nothing() -> None:
    """The CLI's observer accepts every report and exposes an empty metrics page."""
    obs = NullObserver()
    obs.attestation("accepted")
    obs.policy_loaded(POLICY)
    assert obs.expose()[0] == b""
