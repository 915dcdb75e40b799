"""The control API: attestation ingest with every refusal code, challenge nonces, admin
endpoints behind the token, what-if explain, health/readiness and Prometheus metrics.

Runs against the real gate, policy file, verifier and SQLite posture store; reports are
signed with ``proxy.pki`` through the shared test PKI helpers.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers.fakes import FakeSession, ListAudit
from pki_helpers import TIKTOK as TIKTOK_ID
from pki_helpers import USER, TestPki, default_header, hand_jws, report
from prometheus_client.parser import text_string_to_metric_families

from proxy.api import make_app, start_api
from proxy.config import ApiConfig, load_policy
from proxy.gate import Gate, Identity, Origin
from proxy.policy import Policy
from proxy.posture.sqlite import SqlitePostureStore

ROOT = Path(__file__).resolve().parent.parent
TOKEN = b"s3cret-admin-token"
JOSE = {"Content-Type": "application/jose"}
ADMIN = {"Authorization": "Bearer " + TOKEN.decode()}


@dataclass
class Env:
    client: TestClient
    pki: TestPki
    audit: ListAudit
    gate: Gate
    store: SqlitePostureStore
    policy: list[Policy]
    ready: dict[str, bool]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    pki = TestPki()
    pki.attester("Example MDM")
    store = SqlitePostureStore(tmp_path / "posture.db")
    audit = ListAudit(tmp_path / "audit.jsonl")
    policy = [load_policy(ROOT / "config" / "policy.toml")]
    gate = Gate(store=store, audit=audit, policy=lambda: policy[0])
    ready = {"listeners_bound": True}
    app = make_app(gate=gate, store=store, verifier=pki.verifier(), policy=lambda: policy[0],
                   audit=audit, admin_token=TOKEN, readiness=lambda: ready,
                   max_body_bytes=300 * 1024)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Env(client, pki, audit, gate, store, policy, ready)
    finally:
        await client.close()
        await store.close()
        await audit.close()


async def post_report(env: Env, token: str | bytes) -> tuple[int, dict[str, Any]]:
    resp = await env.client.post("/v1/attestations", data=token, headers=JOSE)
    return resp.status, await resp.json()


# --------------------------------------------------------------- attestations


async def test_good_report_is_accepted(env: Env) -> None:
    """A clean device report: 201, compliant, and one accepted attestation record."""
    status, body = await post_report(env, report(env.pki.device(), apps=["com.example.mail"]))
    assert status == 201
    assert {k: body[k] for k in ("device_id", "compliant", "violations", "source")} == {
        "device_id": "dev-1", "compliant": True, "violations": [], "source": "device"}
    assert body["posture"]["source"] == "device"  # the posture in force, with its source
    rec = env.audit.records[-1]
    assert (rec["event"], rec["result"], rec["code"], rec["device_id"], rec["user"]) == (
        "attestation", "accepted", None, "dev-1", USER
    )
    assert (await env.store.get("dev-1")) is not None


async def test_report_refused_while_audit_log_is_down(env: Env) -> None:
    """Fail closed: with the audit log unwritable a report is refused (503) and no
    posture changes, since an accepted report changes access."""
    env.audit.healthy = False  # type: ignore[attr-defined]
    status, body = await post_report(env, report(env.pki.device(), apps=["com.example.mail"]))
    assert status == 503 and body["error"] == "audit_unavailable"
    assert (await env.store.get("dev-1")) is None


async def test_tiktok_report_is_noncompliant_and_ends_live_sessions(env: Env) -> None:
    """A report listing TikTok is stored as non-compliant and ends the device's session
    (re-checked after the API answered, off its response path)."""
    session = FakeSession(Identity(USER, "dev-1", "eas"), Origin("activesync", "eas"))
    env.gate.register(session)
    status, body = await post_report(env, report(env.pki.device()))
    assert status == 201 and body["compliant"] is False
    assert body["violations"][0]["code"] == "prohibited_app"
    assert body["violations"][0]["app_name"] == "TikTok"
    await env.gate.settle(timeout=10)
    assert session.ended and "TikTok" in session.ended[0]
    assert any(r["event"] == "session_end" for r in env.audit.records)


def _refusals(pki: TestPki) -> list[tuple[str, str, int]]:
    dev = pki.device()
    now = int(time.time())
    stranger = TestPki("stranger CA").device()
    good = report(dev)
    h, p, _sig = good.split(".")
    forged_sig = base64.urlsafe_b64encode(b"\x00" * 64).rstrip(b"=").decode()
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    return [
        ("not a jws", "malformed", 400),
        (hand_jws(default_header(dev.chain, "HS256"), claims, sign=lambda m: b"x" * 32),
         "alg_not_allowed", 400),
        (f"{h}.{p}.{forged_sig}", "bad_signature", 422),
        (report(stranger), "untrusted_chain", 422),
        (report(dev, device_id="dev-2"), "device_mismatch", 422),
        (report(dev, iat=now - 3 * 86400, exp=now - 2 * 86400), "expired", 422),
        (report(dev, iat=now + 3600, exp=now + 7200), "not_yet_valid", 422),
        (report(dev, nonce="never-issued"), "bad_nonce", 422),
        ("a" * (256 * 1024 + 10), "too_large", 413),
    ]


async def test_each_refusal_has_its_code(env: Env) -> None:
    """Every attestation refusal answers its code and HTTP status; a refusal after the
    signer was verified is an audit record, while garbage (no signer established) is
    counted for the address's abuse_summary instead of one record each."""
    garbage = {"malformed", "alg_not_allowed", "bad_signature", "untrusted_chain",
               "too_large"}
    for token, code, status in _refusals(env.pki):
        before = len(env.audit.records)
        got, body = await post_report(env, token)
        assert (got, body["error"]) == (status, code), body
        assert body["detail"]
        if code in garbage:
            assert len(env.audit.records) == before
            continue
        rec = env.audit.records[-1]
        assert (rec["event"], rec["result"], rec["code"]) == ("attestation", "refused", code)
    (summary,) = env.gate.limits.abuse_summaries()
    assert summary["counts"] == {f"report_{c}": 1 for c in garbage}
    assert (await env.store.get("dev-1")) is None  # nothing refused was stored


async def test_replay_is_409(env: Env) -> None:
    """The same report twice: the second is a replay."""
    token = report(env.pki.device(), apps=[])
    assert (await post_report(env, token))[0] == 201
    status, body = await post_report(env, token)
    assert (status, body["error"]) == (409, "replay")


async def test_challenge_nonce_is_single_use(env: Env) -> None:
    """A nonce from /v1/challenge is accepted once; reusing it is bad_nonce."""
    resp = await env.client.get("/v1/challenge")
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    ch = await resp.json()
    assert ch["expires_in"] == 300 and ch["expires_at"] > time.time()
    dev = env.pki.device()
    assert (await post_report(env, report(dev, apps=[], nonce=ch["nonce"])))[0] == 201
    status, body = await post_report(env, report(dev, apps=[], nonce=ch["nonce"]))
    assert (status, body["error"]) == (422, "bad_nonce")


async def test_require_nonce_policy(env: Env) -> None:
    """With require_nonce in the policy, a report without a nonce is bad_nonce."""
    env.policy[0] = replace(env.policy[0], require_nonce=True)
    status, body = await post_report(env, report(env.pki.device(), apps=[]))
    assert (status, body["error"]) == (422, "bad_nonce")


async def test_wrong_content_type_is_415(env: Env) -> None:
    """Reports must be sent as application/jose."""
    resp = await env.client.post("/v1/attestations", data=report(env.pki.device()),
                                 headers={"Content-Type": "application/json"})
    assert resp.status == 415
    assert (await resp.json())["error"] == "unsupported_media_type"


async def test_body_over_limit_is_413(env: Env) -> None:
    """A body over the API limit is refused before it is read completely."""
    resp = await env.client.post("/v1/attestations", data=b"x" * (400 * 1024), headers=JOSE)
    assert resp.status == 413
    assert (await resp.json())["error"] == "too_large"


async def test_json_body_over_limit_is_413(env: Env) -> None:
    """The limit holds on JSON endpoints too, and the error is JSON."""
    resp = await env.client.post("/v1/explain", data=b"{" + b" " * (400 * 1024) + b"}",
                                 headers={**ADMIN, "Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"] == "too_large"


# ----------------------------------------------------------------------- admin


async def test_admin_token_required(env: Env) -> None:
    """Admin endpoints refuse a missing or wrong token with 401 and JSON."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
        resp = await env.client.get("/v1/devices/dev-1", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = await env.client.post("/v1/explain", json={"user": USER}, headers=headers)
        assert resp.status == 401


async def test_admin_disabled_without_token(tmp_path: Path) -> None:
    """No admin token configured: admin endpoints are off (403), not open."""
    pki = TestPki()
    store = SqlitePostureStore(tmp_path / "p.db")
    audit = ListAudit()
    pol = load_policy(ROOT / "config" / "policy.toml")
    gate = Gate(store=store, audit=audit, policy=lambda: pol)
    app = make_app(gate=gate, store=store, verifier=pki.verifier(), policy=lambda: pol,
                   audit=audit, admin_token=b"  \n")
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/v1/devices/x", headers={"Authorization": "Bearer "})
        assert resp.status == 403 and (await resp.json())["error"] == "admin_disabled"
    await store.close()


async def test_device_summary(env: Env) -> None:
    """The device view shows the stored posture and the current evaluation."""
    await post_report(env, report(env.pki.device()))
    resp = await env.client.get("/v1/devices/dev-1", headers=ADMIN)
    assert resp.status == 200
    body = await resp.json()
    assert (body["user"], body["platform"], body["apps"]) == (USER, "android", 1)
    assert body["current_evaluation"]["decision"] == "deny"
    assert "TikTok" in body["current_evaluation"]["user_text"]
    resp = await env.client.get("/v1/devices/nope", headers=ADMIN)
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"


async def test_explain_what_if_stores_nothing(env: Env) -> None:
    """What-if: a TikTok posture is denied with the remediation; no posture is stored,
    and each question is an `explain` audit record (never a `decision`)."""
    before = len(env.audit.records)
    resp = await env.client.post(
        "/v1/explain", headers=ADMIN,
        json={"user": USER, "device_id": "phone-9", "protocol": "activesync",
              "posture": {"platform": "ios", "apps": ["com.zhiliaoapp.musically"]}},
    )
    body = await resp.json()
    assert resp.status == 200 and body["decision"] == "deny"
    assert "TikTok" in body["user_text"]
    resp = await env.client.post(
        "/v1/explain", headers=ADMIN,
        json={"user": USER, "posture": {"platform": "macos",
                                        "apps": ["com.zhiliaoapp.musically"]}},
    )
    assert (await resp.json())["decision"] == "allow"  # desktops are out of scope
    resp = await env.client.post("/v1/explain", headers=ADMIN, json={"user": USER,
                                                                    "device_id": "nope"})
    assert (await resp.json())["reasons"][0]["code"] == "unknown_device"
    explains = env.audit.records[before:]
    assert [r["event"] for r in explains] == ["explain"] * 3
    assert [r["decision"] for r in explains] == ["deny", "allow", "deny"]
    assert explains[0]["listener"] == "api"
    assert (await env.store.get("phone-9")) is None
    resp = await env.client.post("/v1/explain", headers=ADMIN, json=[1])
    assert resp.status == 400 and (await resp.json())["error"] == "malformed"


# ------------------------------------------------------------ health, metrics


async def test_health_and_readiness(env: Env) -> None:
    """healthz is always ok; readyz is 503 with the failing check named."""
    assert (await env.client.get("/healthz")).status == 200
    resp = await env.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["ready"] is True
    assert body["checks"]["posture_store"] and body["checks"]["audit_writable"]
    env.audit.healthy = False
    resp = await env.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["checks"]["audit_writable"] is False


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_parse_and_move(env: Env) -> None:
    """/metrics parses with the Prometheus parser; ingest and decision counters move."""
    before = _samples(await (await env.client.get("/metrics")).text())
    await post_report(env, report(env.pki.device(), apps=[]))
    await post_report(env, "garbage")
    await env.gate.decide(Identity(USER, "dev-1", "eas"), Origin("activesync", "eas"))
    resp = await env.client.get("/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain")
    after = _samples(await resp.text())

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("mailward_attestations_total", result="accepted") == 1
    assert delta("mailward_attestations_total", result="malformed") == 1
    assert delta("mailward_decisions_total", protocol="activesync", decision="allow",
                 reason="compliant") == 1
    assert delta("mailward_decision_latency_seconds_count") == 1
    pol = env.policy[0]
    assert after[("mailward_policy_info", (("sha256", pol.sha256),
                                           ("version", pol.version)))] == 1


async def test_unknown_path_and_method_are_json(env: Env) -> None:
    """aiohttp's own 404/405 come back as JSON errors."""
    resp = await env.client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    resp = await env.client.delete("/v1/attestations")
    assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"


async def test_start_api_binds_and_closes(env: Env) -> None:
    """start_api binds an ephemeral port and serves healthz."""
    app = make_app(gate=env.gate, store=env.store, verifier=env.pki.verifier(),
                   policy=lambda: env.policy[0], audit=env.audit)
    running = await start_api(ApiConfig("127.0.0.1", 0, False, None), app, None)
    try:
        assert running.port > 0
        import aiohttp

        async with aiohttp.ClientSession() as s, \
                s.get(f"http://127.0.0.1:{running.port}/healthz") as r:
            assert r.status == 200
    finally:
        await running.close(1)


# ------------------------------------------------------- issue 12: posture authority


async def test_future_iat_device_report_cannot_outvote_the_mdm(env: Env) -> None:
    """A phone's clean report with iat in the future does not displace the MDM's
    later TikTok report: the MDM answer's 201 body reports the MDM posture in force,
    noncompliant, and the phone's next clean report still leaves it noncompliant."""
    phone, mdm = env.pki.device(), env.pki.attesters[0]
    status, body = await post_report(env, report(phone, apps=[], now=time.time() + 55))
    assert status == 201 and body["compliant"] and body["source"] == "device"
    status, body = await post_report(env, report(mdm))  # TikTok, iat = now
    assert status == 201 and not body["compliant"]
    assert body["source"].startswith("attester:")
    assert body["violations"][0]["code"] == "prohibited_app"
    status, body = await post_report(env, report(phone, apps=[], now=time.time() + 58))
    assert status == 201 and not body["compliant"] and body["source"].startswith("attester:")
    d = await env.gate.decide(Identity(USER, "dev-1", "claim"), Origin("activesync", "eas"))
    assert not d.allow and d.reasons[0].code == "prohibited_app"
    rec = env.audit.records[-1]
    assert rec["posture_source"].startswith("attester:") and rec["device"] == "dev-1"
    assert rec["posture_cached"] is False and rec["device_source"] == "claim"


async def test_report_sixty_one_seconds_ahead_is_not_yet_valid(env: Env) -> None:
    """iat more than 60 s in the future is refused not_yet_valid."""
    status, body = await post_report(env, report(env.pki.device(), now=time.time() + 90))
    assert (status, body["error"]) == (422, "not_yet_valid")


async def test_device_cannot_burn_the_mdms_jti(env: Env) -> None:
    """jti memory is per issuer: a device using the jti the MDM will send does not
    make the MDM's report a replay."""
    phone, mdm = env.pki.device(), env.pki.attesters[0]
    assert (await post_report(env, report(phone, apps=[], jti="mdm-42")))[0] == 201
    status, body = await post_report(env, report(mdm, jti="mdm-42"))
    assert status == 201 and not body["compliant"]
    assert (await post_report(env, report(mdm, jti="mdm-42")))[1]["error"] == "replay"


async def test_platform_change_by_the_device_is_refused(env: Env) -> None:
    """A phone cannot report itself as windows to fall out of scope
    (platform_mismatch, recorded); the MDM may change the platform."""
    phone, mdm = env.pki.device(), env.pki.attesters[0]
    assert (await post_report(env, report(phone, apps=[TIKTOK_ID])))[0] == 201
    status, body = await post_report(env, report(phone, apps=[TIKTOK_ID], platform="windows"))
    assert (status, body["error"]) == (422, "platform_mismatch")
    assert env.audit.records[-1]["code"] == "platform_mismatch"
    assert (await post_report(env, report(mdm, platform="ios")))[0] == 201


async def test_user_claim_mismatch_is_refused(env: Env) -> None:
    """A device certificate issued to bob cannot attest alice's mailbox."""
    bobs = env.pki.device("bob-phone", "bob@corp.example")
    status, body = await post_report(env, report(bobs, device_id="bob-phone", apps=[]))
    assert (status, body["error"]) == (422, "user_mismatch")


async def test_device_reports_disabled(env: Env, tmp_path: Path) -> None:
    """With device_reports = deny the API refuses device-signed reports (403)."""
    # the same gate and store; a verifier that refuses device reports
    app = make_app(gate=env.gate, store=env.store, verifier=env.pki.verifier(
        device_reports=False), policy=lambda: env.policy[0], audit=env.audit)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        resp = await client.post("/v1/attestations", data=report(env.pki.device()),
                                 headers=JOSE)
        assert resp.status == 403
        assert (await resp.json())["error"] == "device_reports_disabled"
    finally:
        await client.close()


# ------------------------------------------------------------- issue 12: revocation


async def test_revoke_endpoint(env: Env) -> None:
    """POST /v1/devices/{id}/revoke needs the admin token; the device is then denied
    (revoked), its reports are refused, its live sessions end, and a device_revoked
    record names the actor. Ids match case-insensitively; unseen ids can be revoked."""
    phone = env.pki.device()
    assert (await post_report(env, report(phone, apps=[])))[0] == 201
    session = FakeSession(Identity(USER, "DEV-1", "claim"), Origin("activesync", "eas"))
    env.gate.register(session)
    bad = await env.client.post("/v1/devices/dev-1/revoke",
                                headers={"Authorization": "Bearer wrong"})
    assert bad.status == 401
    resp = await env.client.post("/v1/devices/Dev-1/revoke", json={"why": "lost"},
                                 headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["device"] == "dev-1"
    assert session.ended
    rec = [r for r in env.audit.records if r["event"] == "device_revoked"][-1]
    assert (rec["actor"], rec["why"], rec["device"]) == ("admin", "lost", "dev-1")
    status, body = await post_report(env, report(phone, apps=[]))
    assert (status, body["error"]) == (403, "revoked")
    d = await env.gate.decide(Identity(USER, "dev-1", "claim"), Origin("activesync", "eas"))
    assert [r.code for r in d.reasons] == ["revoked"]
    resp = await env.client.post("/v1/devices/never-seen/revoke", headers=ADMIN)
    assert resp.status == 200
    d = await env.gate.decide(Identity(USER, "NEVER-SEEN", "claim"), Origin("activesync", "e"))
    assert [r.code for r in d.reasons] == ["revoked"]


async def test_readyz_names_degraded_without_failing(env: Env) -> None:
    """A degraded state (a CRL past nextUpdate) is named in /readyz's body; 200."""
    app = make_app(gate=env.gate, store=env.store, verifier=env.pki.verifier(),
                   policy=lambda: env.policy[0], audit=env.audit,
                   degraded=lambda: ["crl_past_next_update:certs/device-ca.crl"])
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        resp = await client.get("/readyz")
        assert resp.status == 200
        assert (await resp.json())["degraded"] == ["crl_past_next_update:certs/device-ca.crl"]
    finally:
        await client.close()
