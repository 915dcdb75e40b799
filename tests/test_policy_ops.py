"""Policy changes without a server: the guard's confirm hash, rule-by-rule diff,
impact preview (counts, table, JSON, CSV, exit codes, its audit record), the policy
store's pointer and history, rollback/push with a read-only config directory, and
check-config's guard warning."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.audit import query
from proxy.cli import main
from proxy.cli_ops import init_deployment
from proxy.config import ConfigError, load_config
from proxy.config.policy_file import load_policy
from proxy.policies import PolicyStore, PolicyStoreError, confirm_line, confirm_token
from proxy.policies.diff import diff
from proxy.policies.preview import Devices, compare_devices, compare_replay
from proxy.posture import App, Posture
from proxy.posture.sqlite import SqlitePostureStore

pytestmark = pytest.mark.conversation

TIKTOK = "com.zhiliaoapp.musically"
BASE = """\
version = "{version}"
mode = "enforce"
platforms = ["android", "ios", "ipados"]
max_posture_age = "24h"

[groups]
sales = ["*@sales.corp.example"]
{rules}"""
TELEGRAM_RULE = """
[[prohibited]]
name = "Telegram"
ids = ["org.telegram.messenger"]
reason = "Backs up chats outside the company."
remediation = "Uninstall Telegram."
"""
TIKTOK_RULE = f"""
[[prohibited]]
name = "TikTok"
ids = ["{TIKTOK}"]
reason = "Reads the clipboard."
remediation = "Uninstall TikTok to restore company mail."
"""
#: device, user, apps: three TikTok phones (one in sales), two clean ones.
PHONES = [
    ("p-alice", "alice@corp.example", (TIKTOK,)),
    ("p-bob", "bob@sales.corp.example", (TIKTOK, "com.example.mail")),
    ("p-carol", "carol@corp.example", (TIKTOK,)),
    ("p-dave", "dave@corp.example", ("com.example.mail",)),
    ("p-erin", "erin@corp.example", ()),
]


def text(version: str, *rules: str) -> str:
    return BASE.format(version=version, rules="".join(rules))


def posture(device: str, user: str, apps: tuple[str, ...], platform: str = "android"
            ) -> Posture:
    iat = int(time.time()) - 60
    return Posture(device, user, platform, "14", True, tuple(App(a) for a in apps), iat,
                   iat + 3600, f"jti-{device}", device, "device")


def write(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    """A deployment (mailward init) with five phones in the posture store and the
    base policy in force."""
    init_deployment(tmp_path)
    write(tmp_path / "config/policy.toml", text("base"))

    async def fill() -> None:
        store = SqlitePostureStore(tmp_path / "state/posture.db")
        try:
            for device, user, apps in PHONES:
                await store.commit_attestation(posture(device, user, apps), None, time.time())
        finally:
            await store.close()

    asyncio.run(fill())
    cfg = load_config(tmp_path / "config/mailward.toml")
    data = (tmp_path / "config/policy.toml").read_bytes()
    PolicyStore(cfg.server.state_dir).activate(
        load_policy(tmp_path / "config/policy.toml"), data, how="start", actor="test",
        file_sha256=hashlib.sha256(data).hexdigest())
    return tmp_path


def run(deploy: Path, *args: str) -> int:
    return main([*args, "--config", str(deploy / "config/mailward.toml")])


# ------------------------------------------------------------------ guard hash


def test_confirm_token_ignores_confirm_lines_only() -> None:
    """The confirm value is the SHA-256 of the file without its confirm lines, so
    adding the printed line makes the file confirmed; any other edit changes it."""
    data = text("v2", TIKTOK_RULE).encode()
    line = confirm_line(data)
    assert line == f'confirm = "{hashlib.sha256(data).hexdigest()[:12]}"'
    confirmed = line.encode() + b"\n" + data
    assert confirm_token(confirmed) == confirm_token(data)
    from proxy.policies import is_confirmed

    assert is_confirmed(confirmed) and not is_confirmed(data)
    assert not is_confirmed(confirmed.replace(b"v2", b"v3"))
    assert load_policy(write_tmp(confirmed)).version == "v2"  # the key is accepted


def write_tmp(data: bytes) -> Path:
    import tempfile

    fd, name = tempfile.mkstemp(suffix=".toml")
    os.write(fd, data)
    os.close(fd)
    return Path(name)


@given(st.lists(st.text(alphabet="abc =\"#x", max_size=12), max_size=8),
       st.integers(min_value=0, max_value=8))
def test_confirm_token_is_stable_wherever_the_line_goes(lines: list[str], at: int) -> None:
    """Inserting a confirm line at any line boundary never changes the token."""
    body = "".join(f"{x}\n" for x in lines if not x.startswith("confirm"))
    data = body.encode()
    parts = data.splitlines(keepends=True)
    at = min(at, len(parts))
    with_line = b"".join(parts[:at]) + b'confirm = "0123456789ab"\n' + b"".join(parts[at:])
    assert confirm_token(with_line) == confirm_token(data)


def test_guard_setting_accepts_counts_and_percentages(tmp_path: Path) -> None:
    """[policy_guard] max_new_denies takes "10%" or a count; percentages round up."""
    init_deployment(tmp_path)
    cfg_path = tmp_path / "config/mailward.toml"
    cfg = load_config(cfg_path)
    assert cfg.policy_guard.max_new_denies == "10%"
    assert cfg.policy_guard.limit(4) == 1 and cfg.policy_guard.limit(100) == 10
    original = cfg_path.read_text()
    write(cfg_path, original.replace('max_new_denies = "10%"', "max_new_denies = 25"))
    assert load_config(cfg_path).policy_guard.limit(1000) == 25
    write(cfg_path, original.replace('max_new_denies = "10%"', 'max_new_denies = "lots"'))
    with pytest.raises(ConfigError, match="max_new_denies"):
        load_config(cfg_path)


# ------------------------------------------------------------------ diff


def test_diff_is_rule_by_rule() -> None:
    """diff names added, removed and changed rules field by field, and settings."""
    old = load_policy(write_tmp(text("a", TELEGRAM_RULE, TIKTOK_RULE).encode()))
    changed_tiktok = TIKTOK_RULE.replace('ids = ["', 'enforce_from = 2026-12-01\nids = ["')
    new_text = text("b", changed_tiktok).replace('mode = "enforce"', 'mode = "report-only"')
    new_text += '\n[[prohibited]]\nname = "Signal"\nids = ["org.thoughtcrime.securesms"]\n' \
                'reason = "r"\nremediation = "x"\n'
    new = load_policy(write_tmp(new_text.encode()))
    d = diff(old, new)
    assert d.sections["rules"].added == ["Signal"]
    assert d.sections["rules"].removed == ["Telegram"]
    assert [f for f, _, _ in d.sections["rules"].changed["TikTok"]] == ["enforce_from"]
    assert ("mode", "enforce", "report-only") in d.settings
    text_out = "\n".join(d.lines())
    assert "+ Signal" in text_out and "- Telegram" in text_out and "~ TikTok" in text_out
    assert json.loads(json.dumps(d.to_dict()))["rules"]["changed"]["TikTok"][0]["new"] \
        .startswith("2026-12-01")
    assert diff(old, old).identical


# ------------------------------------------------------------------ preview (pure)


def test_preview_counts_by_rule_and_group() -> None:
    """Newly denied / allowed / unchanged per device, by rule and by group; a revoked
    device is denied either way, so unchanged."""
    base = load_policy(write_tmp(text("base", TELEGRAM_RULE).encode()))
    ban = load_policy(write_tmp(text("ban", TIKTOK_RULE).encode()))
    devs = {d: [posture(d, u, a)] for d, u, a in PHONES}
    devs["p-frank"] = [posture("p-frank", "frank@corp.example", ("org.telegram.messenger",))]
    devs["p-gone"] = [posture("p-gone", "gone@corp.example", (TIKTOK,))]
    devices = Devices(devs, revoked=frozenset({"p-gone"}))
    out = compare_devices(devices, base, ban, datetime.now(UTC))
    assert out.counts() == {"total": 7, "newly_denied": 3, "newly_allowed": 1,
                            "unchanged": 3}
    assert {c.device for c in out.newly_denied} == {"p-alice", "p-bob", "p-carol"}
    assert out.by_rule() == {"TikTok": 3}
    assert out.by_group() == {"(no group)": 2, "sales": 1}
    assert [(c.device, c.rules) for c in out.newly_allowed] == [("p-frank", ("Telegram",))]
    keys = {("alice@corp.example", "P-ALICE", "imap"), ("alice@corp.example", "p-alice",
                                                        "smtp"),
            ("zed@corp.example", "never-seen", "imap")}
    replay = compare_replay(keys, devices, base, ban, datetime.now(UTC))
    assert replay.counts() == {"total": 3, "newly_denied": 2, "newly_allowed": 0,
                               "unchanged": 1}


# ------------------------------------------------------------------ CLI


def test_preview_cli_table_json_csv_exit_codes_and_record(
        deploy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """preview exits 3 with newly denied devices (0 when none), prints the confirm
    line, and writes one policy_preview record with counts, not lists."""
    ban = write(deploy / "ban.toml", text("ban", TIKTOK_RULE))
    assert run(deploy, "policy", "preview", str(ban)) == 3
    out = capsys.readouterr().out
    assert "3 newly denied" in out and "TikTok 3" in out and "sales 1" in out
    assert confirm_line(ban.read_bytes()) in out
    assert run(deploy, "policy", "preview", str(ban), "--format", "json") == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["devices"]["newly_denied"] == 3 and doc["guard"]["blocks"] is True
    assert doc["in_force"]["version"] == "base"
    assert run(deploy, "policy", "preview", str(ban), "--format", "csv") == 3
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert sorted(r["device"] for r in rows) == ["p-alice", "p-bob", "p-carol"]
    assert {r["change"] for r in rows} == {"newly_denied"} and rows[0]["rules"] == "TikTok"
    assert confirm_line(ban.read_bytes()) in captured.err
    assert run(deploy, "policy", "preview") == 0  # the file on disk is what is in force
    records = list(query(deploy / "state/audit.jsonl", event="policy_preview"))
    assert len(records) == 4
    assert records[0]["devices"] == {"total": 5, "newly_denied": 3, "newly_allowed": 0,
                                     "unchanged": 2}
    assert records[0]["actor"] and "newly_denied_list" not in json.dumps(records[0])


def test_preview_replay_judges_seen_sessions(deploy: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--replay 7d judges every (user, device, protocol) of recent decisions."""
    assert run(deploy, "explain", "--user", "alice@corp.example", "--device", "p-alice") == 0
    from proxy.audit import open_audit_log

    with open_audit_log(load_config(deploy / "config/mailward.toml"), witnessed=False) as log:
        for proto in ("imap", "smtp"):
            log.append({"event": "decision", "decision": "allow", "user": "alice@corp.example",
                        "device_id": "p-alice", "protocol": proto})
    ban = write(deploy / "ban.toml", text("ban", TIKTOK_RULE))
    capsys.readouterr()
    assert run(deploy, "policy", "preview", str(ban), "--replay", "7d", "--format",
               "json") == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["replay"]["total"] == 2 and doc["replay"]["newly_denied"] == 2
    assert {c["protocol"] for c in doc["replay"]["newly_denied_list"]} == {"imap", "smtp"}


def test_pointer_history_and_references_persist(deploy: Path) -> None:
    """Every activation is kept content-addressed with its history; a new store
    object (another process) reads the same pointer; versions and sha prefixes
    resolve, ambiguous or unknown ones are refused."""
    cfg = load_config(deploy / "config/mailward.toml")
    store = PolicyStore(cfg.server.state_dir)
    ban_path = write(deploy / "ban.toml", text("ban", TIKTOK_RULE))
    ban = load_policy(ban_path)
    store.activate(ban, ban_path.read_bytes(), how="push", actor="ops")
    again = PolicyStore(cfg.server.state_dir).read()
    assert again is not None and again.active == ban.sha256
    assert [(e.version, e.how, e.actor) for e in again.history] == [
        ("base", "start", "test"), ("ban", "push", "ops")]
    assert again.previous() is not None and again.previous().version == "base"  # type: ignore[union-attr]
    assert store.path_of(ban.sha256).read_bytes() == ban_path.read_bytes()
    assert store.resolve("ban") == ban.sha256 == store.resolve(ban.sha256[:8])
    assert oct(store.path_of(ban.sha256).stat().st_mode & 0o777) == "0o600"
    with pytest.raises(PolicyStoreError, match="no stored policy"):
        store.resolve("nope")


def test_rollback_and_push_leave_a_read_only_config_alone(
        deploy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """push and rollback move the pointer in state/ only (the config directory may be
    mounted read-only), record policy_push / policy_rollback naming both versions with
    actor, and history marks the active version."""
    ban = write(deploy / "ban.toml", text("ban", TIKTOK_RULE) + "\n")
    config = deploy / "config"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in config.iterdir()}
    os.chmod(config, 0o555)
    try:
        assert run(deploy, "policy", "push", str(ban)) == 1  # the guard: 3 > 10% of 5
        assert "not pushed" in capsys.readouterr().err
        write(ban, confirm_line(ban.read_bytes()) + "\n" + ban.read_text())
        assert run(deploy, "policy", "push", str(ban)) == 0
        assert run(deploy, "policy", "rollback") == 0
        assert run(deploy, "policy", "rollback", "ban") == 0
        assert run(deploy, "policy", "rollback", "base") == 0
        assert run(deploy, "policy", "rollback", "base") == 2  # already in force
    finally:
        os.chmod(config, 0o755)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in config.iterdir()} == before
    capsys.readouterr()
    assert run(deploy, "policy", "history") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["VERSION", "SHA256", "WHEN", "HOW", "ACTOR", "ACTIVE"]
    assert [ln.split()[3] for ln in lines[1:]] == ["start", "push", "rollback", "rollback",
                                                   "rollback"]
    assert lines[-1].rstrip().endswith("*") and lines[-1].startswith("base")
    log = deploy / "state/audit.jsonl"
    pushes = list(query(log, event="policy_push"))
    rollbacks = list(query(log, event="policy_rollback"))
    assert [(r["from_version"], r["to_version"]) for r in pushes] == [("base", "ban")]
    assert [(r["from_version"], r["to_version"]) for r in rollbacks] == [
        ("ban", "base"), ("base", "ban"), ("ban", "base")]
    assert all(r["actor"] and r["from_sha256"] and r["to_sha256"] for r in rollbacks)


def test_diff_cli_takes_versions_prefixes_and_files(
        deploy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """policy diff A B resolves versions, sha256 prefixes and files."""
    ban = write(deploy / "ban.toml", text("ban", TIKTOK_RULE))
    base_sha = PolicyStore(deploy / "state").read().active  # type: ignore[union-attr]
    assert run(deploy, "policy", "diff", "base", str(ban)) == 0
    assert "+ TikTok" in capsys.readouterr().out
    assert run(deploy, "policy", "diff", base_sha[:10], "base") == 0
    assert "no rule or setting differs" in capsys.readouterr().out
    assert run(deploy, "policy", "diff", "base", "missing.toml") == 2


def test_check_config_warns_when_the_guard_would_refuse(
        deploy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config prints a warning: line (exit 0) for a file the guard would refuse,
    and none once the file carries its confirm line."""
    path = write(deploy / "config/policy.toml", text("ban", TIKTOK_RULE))
    assert run(deploy, "check-config") == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "policy guard" in out
    write(path, confirm_line(path.read_bytes()) + "\n" + path.read_text())
    assert run(deploy, "check-config") == 0
    assert "warning:" not in capsys.readouterr().out


class _Holder:
    def __init__(self, policy: object) -> None:
        self.policy = policy

    def current(self) -> object:
        return self.policy

    def swap(self, new: object) -> object:
        old, self.policy = self.policy, new
        return old


class _Observer:
    def __init__(self) -> None:
        self.failures = 0

    def policy_loaded(self, policy: object) -> None:
        pass

    def policy_reload_failed(self) -> None:
        self.failures += 1


def test_start_keeps_a_rollback_and_guards_a_file_changed_while_down(deploy: Path) -> None:
    """At start the pointer decides while the file is unchanged (a push or rollback
    survives a restart); a file changed while the server was down goes through the
    guard, which keeps the policy in force, counts, records and names the refusal."""
    from proxy.policies.live import LivePolicy

    cfg = load_config(deploy / "config/mailward.toml")
    store = PolicyStore(cfg.server.state_dir)
    base_path = cfg.server.policy
    base = load_policy(base_path)
    ban_path = write(deploy / "ban.toml", text("ban", TIKTOK_RULE))
    store.activate(load_policy(ban_path), ban_path.read_bytes(), how="push", actor="ops")
    records: list[dict[str, object]] = []

    async def audit_write(fields: dict[str, object]) -> None:
        records.append(fields)

    def start() -> tuple[_Holder, _Observer, LivePolicy]:
        holder, observer = _Holder(load_policy(base_path)), _Observer()
        live = LivePolicy(cfg, holder, observer, asyncio.Lock(), audit_write)  # type: ignore[arg-type]
        asyncio.run(live.at_start())
        return holder, observer, live

    holder, observer, live = start()
    assert holder.policy.version == "ban" and not records  # type: ignore[attr-defined]
    store.activate(base, base_path.read_bytes(), how="rollback", actor="ops")
    write(base_path, ban_path.read_text())  # saved while the server was down
    holder, observer, live = start()
    assert holder.policy.version == "base" and observer.failures == 1  # type: ignore[attr-defined]
    assert records[-1]["result"] == "refused" and records[-1]["trigger"] == "start"
    assert live.degraded()[0].startswith("policy_guard_refused:ban:")
    write(base_path, confirm_line(base_path.read_bytes()) + "\n" + base_path.read_text())
    holder, observer, live = start()
    assert holder.policy.version == "ban" and observer.failures == 0  # type: ignore[attr-defined]
    pointer = PolicyStore(cfg.server.state_dir).read()
    assert pointer is not None and pointer.history[-1].how == "start"
