"""The motivating case of issue 18, end to end, with the real Dovecot and Postfix: a
TikTok ban with ``enforce_from`` next week is previewed and applied through the live
policy machinery, the user is warned (IMAP ALERT and mail), the date passes on the
gate's injected clock and the user is refused and told why, ``mailward policy rollback``
puts the previous policy back within 2 s (the running listener's pointer watch) and the
same user logs in again, and the auditor's report tells the whole story; the audit
log, signed with the deployment's Ed25519 key as the server signs it, verifies with
``mailward audit verify``."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.tls import Pki, enrolled_pki
from test_notify_peer import AFTER_S, ALICE, POLICY, START, Env, peers

from proxy.audit import report as report_mod
from proxy.audit.command import fingerprint
from proxy.audit.keys import load_verify_key, signing_key_from_config
from proxy.audit.report_html import render_report
from proxy.cli import main
from proxy.cli_ops import init_deployment
from proxy.config import load_config, load_policy
from proxy.policies.live import LivePolicy
from proxy.policies.ops import build_preview, load_candidate
from proxy.server import PolicyHolder

pytestmark = pytest.mark.peer

__all__ = ["peers"]  # the Postfix + Dovecot fixture of test_notify_peer, used here

DEVICE = "tiktok-phone"
#: Before the ban: the same policy, its rule aimed at an app nobody has.
BEFORE = POLICY.replace('"notify-test"', '"before"').replace(
    "com.zhiliaoapp.musically", "com.example.nothing").format(start=START, mode="")
#: The ban: TikTok, enforced from UTC midnight of ``START`` (test_notify_peer's date).
BAN = POLICY.replace('"notify-test"', '"tiktok-ban"').format(start=START, mode="")
#: The rollback must be in force within this (DESIGN "Policy changes").
ROLLBACK_S = 2.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return enrolled_pki(tmp_path_factory.mktemp("pki"), [(DEVICE, ALICE)])


def deployment(root: Path) -> Path:
    """``mailward init`` in ``root`` (its audit signing key included), the pre-ban
    policy in the policy file; the config's path."""
    init_deployment(root)
    (root / "config/policy.toml").write_text(BEFORE)
    return root / "config/mailward.toml"


def assert_verifies_signed(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``mailward audit verify`` passes, checking the signed checkpoints (every record
    sealed) with the deployment's public key."""
    assert main(["audit", "verify", "--config", str(cfg_path)]) == 0
    verified = capsys.readouterr().out
    key_id = fingerprint(load_verify_key(load_config(cfg_path).audit.verify_key))[:16]
    checked = re.search(r"audit\.jsonl: ok, \d+ records, (\d+) checkpoints, 0 after the last "
                        rf"checkpoint; signed by key_id {key_id}$", verified, re.M)
    assert checked is not None and int(checked[1]) >= 2, verified


async def test_tiktok_ban_warned_denied_rolled_back_and_reported(
        pki: Pki, peers: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Preview, warn, deny, one-command rollback and the auditor's report of one TikTok
    ban, for one user's phone through the real IMAP front end, Dovecot and Postfix."""
    began = datetime.now(UTC) - timedelta(minutes=1)
    cfg_path = deployment(tmp_path)
    cfg = load_config(cfg_path)
    holder = PolicyHolder(load_policy(cfg.server.policy))
    assert cfg.audit.path == cfg.server.state_dir / "audit.jsonl"  # Env's log is the server's
    env = Env(pki, peers, cfg.server.state_dir, policy_of=holder.current,
              signing_key=signing_key_from_config(cfg))

    async def audit_write(fields: dict[str, Any]) -> None:
        await env.audit.write(fields)

    live = LivePolicy(cfg, holder, env.gate.observer, asyncio.Lock(), audit_write)
    await live.at_start()
    await env.begin(DEVICE)
    stopped = False
    watcher = asyncio.create_task(live.watch(env.gate, stop=lambda: stopped))
    try:
        # 1. Preview: the ban is judged as it will be on its enforce_from date, so the
        #    TikTok user's phone is the one that will be cut off (exit 3 in the CLI).
        cfg.server.policy.write_text(BAN)
        preview = await live.preview({}, actor="story")
        assert preview["candidate"]["version"] == "tiktok-ban" and preview["newly_denied"]
        assert preview["candidate"]["judged_as_of"][:10] == f"{START}"
        assert preview["devices"]["newly_denied"] == 1 and preview["devices"]["unchanged"] == 0
        candidate, data = load_candidate(cfg.server.policy)
        [cut_off] = build_preview(cfg, candidate, data,
                                  baseline=holder.current()).devices.newly_denied
        assert (cut_off.user, cut_off.device, cut_off.rules) == (ALICE, DEVICE, ("TikTok",))
        assert await live.reload(env.gate, "file_change")  # what the file watcher does
        assert holder.current().version == "tiktok-ban"

        # 2. Before the date the user logs in, sees an ALERT with the date, and is mailed.
        allowed, alerts = await asyncio.to_thread(env.login, DEVICE)
        assert allowed and len(alerts) == 1 and str(START).encode() in alerts[0]
        [warning] = await env.wait_notices(DEVICE, "warning", 1)
        assert str(START) in warning and "Uninstall TikTok" in warning

        # 3. The date passes: the login is refused with the reason, one deny notice mailed.
        env.clock[0] += AFTER_S
        allowed, alerts = await asyncio.to_thread(env.login, DEVICE)
        assert not allowed and b"TikTok" in alerts[0]
        [deny] = await env.wait_notices(DEVICE, "deny", 1)
        assert "TikTok was found reading the clipboard" in deny and DEVICE in deny

        # 4. One command rolls the ban back; the running listener follows within 2 s and
        #    the same user's next login is allowed.
        assert await asyncio.to_thread(main, ["policy", "rollback", "--config",
                                              str(cfg_path)]) == 0
        rolled = time.monotonic()
        while holder.current().version != "before" and time.monotonic() - rolled < 5:
            await asyncio.sleep(0.05)
        assert holder.current().version == "before"
        assert time.monotonic() - rolled < ROLLBACK_S
        assert await asyncio.to_thread(env.login, DEVICE) == (True, [])
    finally:
        stopped = True
        await watcher
        await env.close()

    # 5. The auditor's report: both versions on the policy timeline, the deny in the
    #    deny table, and the notices (ALERT and warning mail, deny mail) counted.
    report = report_mod.build_report(cfg.audit.path, since=began,
                                     until=datetime.now(UTC) + timedelta(minutes=1))
    assert report.chain is not None and report.chain.ok
    timeline = [(e.event, e.version) for e in report.timeline]
    assert timeline == [("policy_preview", "tiktok-ban"), ("policy_reload", "tiktok-ban"),
                        ("policy_rollback", "before")]
    assert [(d.device, d.app, d.policy_version) for d in report.denies] == [
        (DEVICE, "TikTok", "tiktok-ban")]
    assert report.events["notice"] == 3
    html = render_report(report)
    assert all(text in html for text in ("tiktok-ban", "before", DEVICE, "policy_rollback"))
    assert_verifies_signed(cfg_path, capsys)
