"""The policy in force when instances share Redis: two ``mailward serve`` processes
(instances ``a`` and ``b``, each with its own state directory and policy file) on a
real ``redis-server``. The pointer and its history live in Redis, so ``mailward
policy rollback`` and ``push`` run with one instance's config move every instance
within 2 s; ``policy preview`` and the policy guard judge the devices in Redis."""

from __future__ import annotations

import getpass
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.serve import free_port, mailward, serve, wait_serving
from peers.redis import RedisServer
from test_policy_ops_server import (
    ALICE,
    BAN,
    BEFORE,
    BOB,
    CAROL,
    PHONES,
    decide,
    enrolled_root,
    wait_for,
)
from test_server import REACT_S, Served, attest

from proxy.audit import query
from proxy.demo.run import Phone
from proxy.policies import confirm_line

pytestmark = pytest.mark.peer

INSTANCE = """\
[server]
state_dir = "state-{name}"
policy = "config/policy-{name}.toml"
instance = "{name}"
shutdown_grace = "1s"

[posture]
store = "{url}"

[audit]
path = "state-{name}/audit.jsonl"

[api]
listen = "127.0.0.1:{port}"
tls = true
"""
#: The ban with its confirm line: the guard lets it through (2 of 4 devices > 10%).
CONFIRMED_BAN = confirm_line(BAN.encode()) + "\n" + BAN


@dataclass
class Fleet:
    root: Path
    redis: RedisServer
    served: dict[str, Served]

    def config(self, name: str) -> Path:
        return self.served[name].config

    def audit(self, name: str, **filters: Any) -> list[dict[str, Any]]:
        return list(query(self.root / f"state-{name}/audit.jsonl", **filters))

    def decide(self, name: str, phone: Phone) -> str:
        return decide(self.served[name], phone)

    def cli(self, name: str, *args: str) -> Any:
        return mailward(*args, config=self.config(name))


def start(root: Path, name: str, url: str) -> Served:
    port = free_port()
    cfg = root / f"config/mailward-{name}.toml"
    cfg.write_text(INSTANCE.format(name=name, url=url, port=port))
    log = root / f"serve-{name}.log"
    s = Served(root, cfg, log, serve(cfg, log), {"api": port})
    wait_serving(s.proc, lambda: s.api("GET", "/readyz")[0] == 200, log, 20)
    return s


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = enrolled_root(tmp_path_factory.mktemp("polredis"))
    for name in ("a", "b"):
        (root / f"config/policy-{name}.toml").write_text(BEFORE)
    redis = RedisServer(root / "redis").start()
    served: dict[str, Served] = {}
    try:
        served["a"] = start(root, "a", redis.url)
        for p in PHONES:  # reported through A: B reads them from Redis
            attest(served["a"], p, p.apps)
        served["b"] = start(root, "b", redis.url)
        yield Fleet(root, redis, served)
    finally:
        for s in served.values():
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
                s.proc.wait(15)
        redis.stop()


def test_preview_on_redis_lists_who_the_ban_cuts_off(fleet: Fleet) -> None:
    """``policy preview`` with a Redis posture store judges every device in Redis
    (was: exit 2) and exits 3 naming the two TikTok phones."""
    ban = fleet.root / "ban.toml"
    ban.write_text(BAN)
    done = fleet.cli("b", "policy", "preview", str(ban), "--format", "json")
    assert done.returncode == 3, done.stderr
    doc = json.loads(done.stdout)
    assert doc["in_force"]["version"] == "before" and doc["devices"]["total"] == len(PHONES)
    assert sorted(c["device"] for c in doc["devices"]["newly_denied_list"]) == sorted(
        [ALICE.device_id, BOB.device_id])
    assert doc["guard"]["blocks"] is True


def test_cli_rollback_on_a_is_applied_by_b_within_2s(fleet: Fleet) -> None:
    """A's file change reaches B; ``mailward policy rollback`` with A's config moves the
    shared pointer and B allows the device the ban denied within 2 s; both instances'
    history is the same and B's log records the rollback with its actor."""
    assert fleet.decide("b", ALICE) == "allow"
    (fleet.root / "config/policy-a.toml").write_text(CONFIRMED_BAN)
    fleet.served["a"].proc.send_signal(signal.SIGHUP)
    wait_for("B applies A's ban", lambda: fleet.decide("b", ALICE) == "deny", REACT_S + 1)
    assert fleet.decide("b", BOB) == "deny" and fleet.decide("b", CAROL) == "allow"

    rollback = fleet.cli("a", "policy", "rollback")
    moved = time.monotonic()
    assert rollback.returncode == 0, rollback.stderr
    for name in ("b", "a"):  # each instance polls the pointer on its own
        wait_for(f"{name} applies the rollback",
                 lambda name=name: fleet.decide(name, ALICE) == "allow", REACT_S)
    assert time.monotonic() - moved < REACT_S
    assert fleet.decide("b", BOB) == "allow"

    histories = [json.loads(fleet.cli(n, "policy", "history", "--format", "json").stdout)
                 for n in ("a", "b")]
    assert histories[0] == histories[1]
    hows = [(e["version"], e["how"]) for e in histories[0]["history"]]
    assert hows[1] in (("tiktok-ban", "file"), ("tiktok-ban", "sighup"))  # whichever first
    assert hows[::2] == [("before", "start"), ("before", "rollback")] and len(hows) == 3
    assert histories[0]["history"][-1]["actor"] == getpass.getuser()
    table = fleet.cli("b", "policy", "history").stdout.splitlines()
    assert table[-1].split()[-1] == "*" and table[-1].split()[0] == "before"

    (rec,) = fleet.audit("a", event="policy_rollback")
    assert (rec["from_version"], rec["to_version"]) == ("tiktok-ban", "before")
    followed = [(r["new_version"], r["trigger"], r.get("how"), r["actor"])
                for r in fleet.audit("b", event="policy_reload") if r["result"] == "applied"]
    assert followed[-2:] == [("tiktok-ban", "store", hows[1][1], followed[-2][3]),
                             ("before", "store", "rollback", getpass.getuser())]


def test_push_from_b_is_applied_by_a_and_guarded_on_redis_devices(fleet: Fleet) -> None:
    """``mailward policy push`` with B's config: the guard counts Redis's devices and
    refuses the unconfirmed ban; a confirmed one moves A within 2 s."""
    unconfirmed = fleet.root / "ban-unconfirmed.toml"
    unconfirmed.write_text(BAN)
    refused = fleet.cli("b", "policy", "push", str(unconfirmed))
    assert refused.returncode == 1 and "policy guard" in refused.stderr
    assert fleet.decide("a", ALICE) == "allow"
    confirmed = fleet.root / "ban-confirmed.toml"
    confirmed.write_text(CONFIRMED_BAN)
    pushed = fleet.cli("b", "policy", "push", str(confirmed))
    moved = time.monotonic()
    assert pushed.returncode == 0, pushed.stderr
    wait_for("A applies B's push", lambda: fleet.decide("a", ALICE) == "deny", REACT_S)
    assert time.monotonic() - moved < REACT_S
    history = json.loads(fleet.cli("a", "policy", "history", "--format", "json").stdout)
    assert history["history"][-1]["how"] == "push"


def test_api_rollback_on_b_is_applied_by_a(fleet: Fleet) -> None:
    """``POST /v1/policy/rollback`` (an operate token) on B moves the shared pointer: B
    answers with both versions, A allows the device again within 2 s; a bad policy
    pushed through the API is refused (422) and a request without a token is 401."""
    b = fleet.served["b"]
    token = (fleet.root / "certs/admin.token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    assert b.api("POST", "/v1/policy/rollback", b"{}",
                 {"Content-Type": "application/json"})[0] == 401
    assert fleet.decide("a", ALICE) == "deny"  # the ban pushed by the test before
    status, body = b.api("POST", "/v1/policy/rollback", b"{}", auth)
    moved = time.monotonic()
    assert status == 200, body
    answer = json.loads(body)
    assert (answer["from_version"], answer["to_version"], answer["actor"]) == (
        "tiktok-ban", "before", "admin")
    assert fleet.decide("b", ALICE) == "allow"  # applied at once where it was asked
    wait_for("A applies B's API rollback", lambda: fleet.decide("a", ALICE) == "allow",
             REACT_S)
    assert time.monotonic() - moved < REACT_S
    (rec,) = [r for r in fleet.audit("b", event="policy_rollback") if r.get("via") == "api"]
    assert rec["actor"] == "admin" and rec["to_version"] == "before"
    status, body = b.api("POST", "/v1/policy/push",
                         json.dumps({"policy": 'mode = "sometimes"'}).encode(), auth)
    assert status == 422 and json.loads(body)["error"] == "invalid_policy"
