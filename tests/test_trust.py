"""Device trust at the gate (issue 12), tried as an employee who wants to keep TikTok:
borrowed DeviceIds with and without a certificate, another user's certificate, the
listener's certificate and claim settings, revocation (also in advance, ids in any
case, live sessions ending at once), CRL-revoked certificates, aliases, and the MDM's
word against the device's."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.fakes import FakeSession, ListAudit
from pki_helpers import TestPki, make_crl

from proxy.crl import CrlSet
from proxy.gate import Gate, Identity, NullObserver, Origin
from proxy.ids import ClientCert, client_cert_from_der
from proxy.policy import Policy, ProhibitedApp
from proxy.posture import App, Posture
from proxy.posture.sqlite import SqlitePostureStore

pytestmark = pytest.mark.conversation

TIKTOK = "com.zhiliaoapp.musically"
POLICY = Policy(version="v1", sha256="a" * 64, prohibited=(
    ProhibitedApp("TikTok", (TIKTOK,), "reads the clipboard", "Uninstall TikTok."),))
ALICE, BOB = "alice@corp.example", "bob@corp.example"
EAS = Origin("activesync", "eas", "192.0.2.1")
IMAP = Origin("imap", "imaps", "192.0.2.1")


def posture(device: str, user: str = ALICE, *apps: str, mdm: bool = False,
            age_s: float = 10, platform: str = "android", jti: str = "") -> Posture:
    iat = int(time.time() - age_s)
    return Posture(device, user, platform, "14", True, tuple(App(a) for a in apps), iat,
                   iat + 3600, jti or f"j-{device}-{mdm}-{iat}", device,
                   "mdm:Intune" if mdm else "device",
                   source="attester:0123abcd" if mdm else "device",
                   signer="f" * 64 if mdm else "d" * 64)


@dataclass
class Env:
    gate: Gate
    store: SqlitePostureStore
    audit: ListAudit

    async def decide(self, identity: Identity, origin: Origin = EAS) -> list[str]:
        d = await self.gate.decide(identity, origin)
        return [r.code for r in d.reasons if r.enforced] if not d.allow else []

    async def commit(self, *ps: Posture) -> None:
        for p in ps:
            assert await self.store.commit_attestation(p, None, time.time()) == "ok"


@pytest.fixture
async def env(tmp_path: Path):
    store = SqlitePostureStore(tmp_path / "posture.db")
    audit = ListAudit()
    gate = Gate(store=store, audit=audit, policy=lambda: POLICY, observer=NullObserver())
    await gate.load_trust()
    yield Env(gate, store, audit)
    await store.close()


def cert(device: str | None, user: str | None = ALICE, serial: int = 1) -> ClientCert:
    return ClientCert(device, user, serial, b"issuer")


# ------------------------------------------------------------------ borrowed DeviceId


async def test_borrowed_device_id_without_certificate_after_binding(env: Env) -> None:
    """Once alice's phone was seen on ActiveSync with its certificate, a TikTok phone
    claiming that DeviceId without it is refused certificate_required; unbind lifts it."""
    await env.commit(posture("alice-phone"))
    assert await env.decide(Identity(ALICE, "ALICE-PHONE", "claim", cert("alice-phone"))) == []
    assert env.audit.records[-1]["device_source"] == "client_cert"
    assert await env.decide(Identity(ALICE, "alice-phone", "claim")) == ["certificate_required"]
    rec = env.audit.records[-1]
    assert (rec["device_source"], rec["device_id"], rec["device"]) == (
        "claim", "alice-phone", "alice-phone")
    await env.gate.unbind("alice-phone", actor="ops", via="cli")
    assert env.audit.records[-1]["event"] == "device_unbound"
    assert await env.decide(Identity(ALICE, "alice-phone", "claim")) == []


async def test_borrowed_device_id_with_another_devices_certificate(env: Env) -> None:
    """A certificate issued to the TikTok phone does not go with alice's DeviceId."""
    await env.commit(posture("alice-phone"), posture("tiktok-phone", ALICE, TIKTOK))
    who = Identity(ALICE, "alice-phone", "claim", cert("tiktok-phone"))
    assert await env.decide(who) == ["device_mismatch"]


async def test_another_users_certificate(env: Env) -> None:
    """Bob's device certificate (rfc822 SAN bob) cannot log in as alice, on any protocol."""
    await env.commit(posture("bob-phone", BOB))
    assert await env.decide(Identity(ALICE, "bob-phone", "claim",
                                     cert("bob-phone", BOB))) == ["user_mismatch"]
    assert await env.decide(Identity(ALICE, "bob-phone", "client_cert",
                                     cert("bob-phone", BOB)), IMAP) == ["user_mismatch"]


async def test_listener_requires_certificate_and_refuses_bare_claims(env: Env) -> None:
    """client_cert = "required" refuses a request without one (certificate_required);
    eas_claims = "deny" refuses bare claims (device_claim_refused)."""
    await env.commit(posture("alice-phone"))
    required = Origin("activesync", "eas", client_cert="required")
    no_claims = Origin("activesync", "eas", eas_claims="deny")
    who = Identity(ALICE, "alice-phone", "claim")
    assert await env.decide(who, required) == ["certificate_required"]
    assert await env.decide(who, no_claims) == ["device_claim_refused"]
    with_cert = Identity(ALICE, "alice-phone", "claim", cert("alice-phone"))
    assert await env.decide(with_cert, required) == []
    assert await env.decide(with_cert, no_claims) == []


async def test_eas_source_is_recorded_as_claim(env: Env) -> None:
    """Front ends still passing the old "eas" source are recorded as "claim"."""
    assert Identity(ALICE, "x", "eas").device_source == "claim"


# ------------------------------------------------------------------ revocation


async def test_revoked_device_denied_everywhere_and_sessions_end(env: Env) -> None:
    """Revoking ends every live session of the device within 2 s, concurrently (each
    goodbye takes 0.5 s here), and denies it on every protocol; ids in any case."""
    await env.commit(posture("alice-phone"))
    sessions = [FakeSession(Identity(ALICE, "alice-phone", "client_cert"), IMAP, delay_s=0.5)
                for _ in range(10)]
    sessions.append(FakeSession(Identity(ALICE, "ALICE-PHONE", "claim"), EAS, delay_s=0.5))
    other = FakeSession(Identity(BOB, "bob-phone", "claim"), EAS)
    for s in [*sessions, other]:
        env.gate.register(s)
    started = time.monotonic()
    await env.gate.revoke("Alice-Phone", why="lost", actor="ops", via="cli")
    assert all(s.ended for s in sessions) and not other.ended
    assert max(s.ended_at[0] for s in sessions) - started < 2.0
    for who, origin in ((Identity(ALICE, "alice-phone", "client_cert"), IMAP),
                        (Identity(ALICE, "aLiCe-PhOnE", "claim"), EAS)):
        assert await env.decide(who, origin) == ["revoked"]
    rec = next(r for r in env.audit.records if r["event"] == "device_revoked")
    assert (rec["actor"], rec["why"], rec["device"]) == ("ops", "lost", "alice-phone")
    ends = [r for r in env.audit.records if r["event"] == "session_end"]
    assert len(ends) == 11 and {r["detail"] for r in ends} == {"revoked"}
    await env.gate.unrevoke("alice-phone", why="found", actor="ops", via="cli")
    assert await env.decide(Identity(ALICE, "alice-phone", "claim")) == []


async def test_revoked_in_advance(env: Env) -> None:
    """An id never seen can be revoked before the device ever shows up."""
    await env.gate.revoke("lost-phone", why="", actor="ops", via="api")
    assert await env.decide(Identity(ALICE, "LOST-PHONE", "claim")) == ["revoked"]
    assert await env.store.commit_attestation(posture("lost-phone"), None,
                                              time.time()) == "revoked"


async def test_another_process_revocation_reaches_the_gate(env: Env, tmp_path: Path) -> None:
    """A revocation written by another store (the CLI) reaches the gate through the
    change feed and ends the session."""
    await env.commit(posture("alice-phone"))
    s = FakeSession(Identity(ALICE, "alice-phone", "client_cert"), IMAP)
    env.gate.register(s)
    cli = SqlitePostureStore(env.store.path)
    try:
        await cli.revoke("ALICE-phone", "stolen", "bob")
    finally:
        await cli.close()
    assert await env.gate.sync_changes() == 1 and s.ended
    assert await env.gate.sync_changes() == 0


async def test_crl_revoked_certificate(env: Env, tmp_path: Path) -> None:
    """A client certificate on the CRL is refused `revoked`; a CRL past nextUpdate
    refuses certificate-identified sessions temporarily (crl_expired)."""
    pki = TestPki()
    phone = pki.device("alice-phone")
    facts = client_cert_from_der(phone.cert.public_bytes(_der()))
    assert facts is not None and facts.device_id == "alice-phone" and facts.user == ALICE
    await env.commit(posture("alice-phone"))
    path = tmp_path / "ca.crl"
    path.write_bytes(make_crl(pki, [phone.cert.serial_number]))
    crls = {"set": CrlSet([path], [pki.ca])}
    gate = Gate(store=env.store, audit=env.audit, policy=lambda: POLICY,
                observer=NullObserver(), crl=lambda: crls["set"])
    who = Identity(ALICE, "alice-phone", "client_cert", facts)
    d = await gate.decide(who, IMAP)
    assert [r.code for r in d.reasons] == ["revoked"] and not d.temporary
    path.write_bytes(make_crl(pki, [], next_update_s=-5))
    crls["set"] = CrlSet([path], [pki.ca])
    d = await gate.decide(who, IMAP)
    assert [r.code for r in d.reasons] == ["crl_expired"] and d.temporary
    assert crls["set"].stale(time.time()) == [path]
    # A bare claim is not certificate-identified: no CRL applies to it.
    assert (await gate.decide(Identity(ALICE, "alice-phone", "claim"), EAS)).allow


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


# ------------------------------------------------------------------ aliases, authority


async def test_alias_resolves_for_posture_binding_and_records(env: Env) -> None:
    """`device alias phone-7 EAS123`: the EAS DeviceId resolves to the device for
    posture, binding and revocation; records keep the id presented and the device."""
    await env.commit(posture("phone-7", ALICE, TIKTOK, mdm=True))
    await env.gate.alias("phone-7", "EAS123", actor="ops", via="cli")
    assert await env.decide(Identity(ALICE, "eas123", "claim")) == ["prohibited_app"]
    rec = env.audit.records[-1]
    assert (rec["device_id"], rec["device"], rec["posture_source"]) == (
        "eas123", "phone-7", "attester:0123abcd")
    assert await env.decide(Identity(ALICE, "EAS123", "claim", cert("phone-7"))) == [
        "prohibited_app"]  # the certificate names the same device: no mismatch
    assert await env.decide(Identity(ALICE, "eas123", "claim")) == ["certificate_required"]


async def test_device_report_adds_violations_never_removes(env: Env) -> None:
    """The MDM saw TikTok; the phone's fresher clean report does not clear it. A clean
    MDM posture with a TikTok device report is still a deny."""
    await env.commit(posture("p1", ALICE, TIKTOK, mdm=True, age_s=100),
                     posture("p1", ALICE, mdm=False, age_s=-50))
    assert await env.decide(Identity(ALICE, "p1", "claim")) == ["prohibited_app"]
    await env.commit(posture("p2", ALICE, mdm=True), posture("p2", ALICE, TIKTOK))
    assert await env.decide(Identity(ALICE, "p2", "claim")) == ["prohibited_app"]


async def test_stale_mdm_posture_is_never_replaced_by_the_device(env: Env) -> None:
    """Stale MDM posture means stale_posture, even with a fresh clean device report."""
    await env.commit(posture("p3", ALICE, mdm=True, age_s=2 * 86400),
                     posture("p3", ALICE))
    assert await env.decide(Identity(ALICE, "p3", "claim")) == ["stale_posture"]
