"""Named admin tokens with scopes on the API, and ``GET /v1/report``: a read token
gets the report, device summaries and explain but is refused (403) on revoke; an
operate token may revoke; the records carry the token's name as ``actor``; the
old ``admin_token_file`` is the operate token named ``admin``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pki_helpers import TestPki
from report_logs import bench, story
from test_api import ROOT, ListAudit

from proxy.api import AuditReports, make_app
from proxy.api_tokens import AdminToken, load_tokens, match, tokens_from
from proxy.config import ConfigError, load_config, load_policy
from proxy.gate import Gate
from proxy.policies.routes import add_policy_changes
from proxy.posture.sqlite import SqlitePostureStore

pytestmark = pytest.mark.conversation

AUDITOR, OPS, OLD = b"auditor-secret", b"ops-secret", b"old-admin-secret"


def bearer(secret: bytes) -> dict[str, str]:
    return {"Authorization": "Bearer " + secret.decode()}


class RecordingLive:
    """Stands in for LivePolicy behind the policy-change endpoints: records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def rollback(self, gate: Gate, version: str | None, actor: str) -> dict[str, str]:
        self.calls.append(("rollback", actor))
        return {"from_version": "ban", "to_version": "before", "actor": actor}

    async def push(self, gate: Gate, text: str, actor: str) -> dict[str, str]:
        self.calls.append(("push", actor))
        return {"from_version": "before", "to_version": "ban", "actor": actor}


@dataclass
class Env:
    client: TestClient
    audit: ListAudit
    live: RecordingLive


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    key, pub = bench.write_keys(tmp_path)
    bench.write_log(tmp_path / "history.jsonl", key, story(time.time() - 86400),
                checkpoint_every=4)
    store = SqlitePostureStore(tmp_path / "posture.db")
    audit = ListAudit(tmp_path / "audit.jsonl")
    policy = load_policy(ROOT / "config" / "policy.toml")
    gate = Gate(store=store, audit=audit, policy=lambda: policy)
    app = make_app(gate=gate, store=store, verifier=TestPki().verifier(),
                   policy=lambda: policy, audit=audit, admin_token=OLD,
                   tokens=(AdminToken("auditor", "read", AUDITOR),
                           AdminToken("ops-alice", "operate", OPS)),
                   report=AuditReports(tmp_path / "history.jsonl", (pub,)))
    live = RecordingLive()
    add_policy_changes(app, live, gate)  # type: ignore[arg-type]
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Env(client, audit, live)
    finally:
        await client.close()
        await store.close()
        await audit.close()


async def test_read_token_gets_the_report(env: Env) -> None:
    """GET /v1/report with a read token: the self-contained HTML report of the log,
    addresses left out on request; without a token 401."""
    resp = await env.client.get("/v1/report?since=7d", headers=bearer(AUDITOR))
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    assert "Chain verified" in html and "ops-bob" in html and "192.0.2.10" in html
    assert resp.headers["Cache-Control"] == "no-store"
    resp = await env.client.get("/v1/report?since=7d&no_client_ip=1", headers=bearer(AUDITOR))
    assert "192.0.2.10" not in await resp.text()
    assert (await env.client.get("/v1/report")).status == 401
    resp = await env.client.get("/v1/report?since=soon", headers=bearer(AUDITOR))
    assert resp.status == 400 and (await resp.json())["error"] == "malformed"


async def test_read_token_cannot_revoke(env: Env) -> None:
    """A read token on an operate endpoint is 403 and nothing is recorded; an operate
    token revokes and the record names it as actor."""
    resp = await env.client.post("/v1/devices/dev-9/revoke", headers=bearer(AUDITOR))
    assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    assert not [r for r in env.audit.records if r["event"] == "device_revoked"]
    resp = await env.client.post("/v1/devices/dev-9/revoke", headers=bearer(OPS),
                                 json={"why": "lost"})
    assert resp.status == 200
    revoked = [r for r in env.audit.records if r["event"] == "device_revoked"]
    assert [r["actor"] for r in revoked] == ["ops-alice"]


async def test_read_token_cannot_roll_back_or_push_policy(env: Env) -> None:
    """An auditor's read token is refused (403) on policy rollback and push and nothing
    is changed; an operate token reaches the change, named as its actor."""
    for path, body in (("/v1/policy/rollback", {}), ("/v1/policy/push", {"policy": "x"})):
        resp = await env.client.post(path, headers=bearer(AUDITOR), json=body)
        assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    assert env.live.calls == []
    resp = await env.client.post("/v1/policy/rollback", headers=bearer(OPS), json={})
    assert resp.status == 200 and (await resp.json())["actor"] == "ops-alice"
    resp = await env.client.post("/v1/policy/push", headers=bearer(OPS), json={"policy": "x"})
    assert resp.status == 200
    assert env.live.calls == [("rollback", "ops-alice"), ("push", "ops-alice")]


async def test_admin_token_file_is_operate_named_admin(env: Env) -> None:
    """The old single admin token still revokes, recorded as actor admin."""
    resp = await env.client.post("/v1/devices/dev-8/revoke", headers=bearer(OLD))
    assert resp.status == 200
    assert env.audit.records[-1]["actor"] == "admin"


async def test_explain_records_the_actor(env: Env) -> None:
    """explain with a read token is allowed and its record carries the token's name."""
    resp = await env.client.post("/v1/explain", headers=bearer(AUDITOR),
                                 json={"user": "ann@corp.example", "device_id": "dev-1"})
    assert resp.status == 200
    assert env.audit.records[-1]["event"] == "explain"
    assert env.audit.records[-1]["actor"] == "auditor"


@pytest.mark.pure
def test_token_matching() -> None:
    """Bearer tokens match by content only (any token, any order); wrong scheme,
    empty and unknown tokens match none; empty secrets never count; names unique."""
    tokens = tokens_from(b"a-secret\n", [AdminToken("reader", "read", b"r-secret")])
    assert [t.name for t in tokens] == ["admin", "reader"]
    assert match(tokens, "Bearer r-secret") == tokens[1]
    assert match(tokens, "bearer a-secret") == tokens[0]
    assert match(tokens, "Basic a-secret") is None
    assert match(tokens, "Bearer ") is None and match(tokens, "Bearer nope") is None
    assert match(tokens_from(b"  \n", []), "Bearer ") is None
    assert tokens[1].allows("read") and not tokens[1].allows("operate")
    assert "r-secret" not in repr(tokens[1])
    with pytest.raises(ValueError, match="two admin tokens"):
        tokens_from(b"x", [AdminToken("admin", "read", b"y")])


@pytest.mark.pure
def test_tokens_config(tmp_path: Path) -> None:
    """[api] tokens: read from mailward.toml with their files; a bad scope, a bad or
    duplicate name is a ConfigError naming the key; a missing file fails loading."""
    (tmp_path / "config").mkdir()
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "auditor.token").write_text("t0ken\n")
    cfg_file = tmp_path / "config" / "mailward.toml"

    def write(tokens: str) -> None:
        cfg_file.write_text(f'[api]\nlisten = "127.0.0.1:0"\ntls = false\n'
                            f'admin_token_file = ""\ntokens = [{tokens}]\n')

    write('{name = "auditor", scope = "read", file = "certs/auditor.token"}')
    cfg = load_config(cfg_file)
    assert [(t.name, t.scope, t.file.name) for t in cfg.api.tokens] == [
        ("auditor", "read", "auditor.token")]
    assert [(t.name, t.scope) for t in load_tokens(cfg.api)] == [("auditor", "read")]
    for bad, words in (('{name = "a", scope = "admin", file = "x"}', "scope"),
                       ('{name = "a b", scope = "read", file = "x"}', "name"),
                       ('{name = "a", scope = "read", file = "x"}, '
                        '{name = "a", scope = "operate", file = "y"}', "duplicate"),
                       ('{name = "a", scope = "read", file = "x", extra = 1}', "unknown")):
        write(bad)
        with pytest.raises(ConfigError, match=words):
            load_config(cfg_file)
    write('{name = "gone", scope = "read", file = "certs/gone.token"}')
    with pytest.raises(ValueError, match="gone"):
        load_tokens(load_config(cfg_file).api)

