"""The policy features MDM posture needs (display-name rules, partial inventories, the
MDM's own verdict), the ``[[mdm]]`` configuration, and the vendor record mappings."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, load_config, load_policy
from proxy.mdm import MalformedDevice, parse_time
from proxy.mdm.http import retry_after_s, same_origin
from proxy.mdm.intune import parse_device as intune_device
from proxy.policy import Context, Policy, ProhibitedApp, evaluate, evaluate_authorities
from proxy.posture import App, Posture

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 12, 2, 12, tzinfo=UTC)
CTX = Context(now=NOW, user="a@corp.example", device_id="d1", protocol="imap")


def policy(**kw: Any) -> Policy:
    rule = ProhibitedApp("TikTok", ("com.zhiliaoapp.musically",), "r", "Uninstall TikTok.",
                         names=("TikTok*",))
    return Policy(version="t", sha256="0" * 64, prohibited=(rule,), **kw)


def posture(*apps: App, source: str = "mdm:intune", **kw: Any) -> Posture:
    iat = int(NOW.timestamp()) - 60
    return Posture(device_id="d1", user="a@corp.example", platform="android", os_version="14",
                   managed=True, apps=apps, iat=iat, exp=iat + 3600, jti="j", issuer=source,
                   attested_by=source, source=source, signer=source, **kw)


@pytest.mark.parametrize("name", ["TikTok", "tiktok lite", "TIKTOK - Videos"])
def test_names_match_case_insensitively(name: str) -> None:
    """A rule's names match display names as case-insensitive globs."""
    d = evaluate(posture(App(id=name, name=name)), policy(), CTX)
    assert not d.allow and d.reasons[0].rule == "TikTok"


def test_names_do_not_match_other_apps() -> None:
    """An app whose name matches no rule stays allowed, and ids still match."""
    assert evaluate(posture(App(id="Tik", name="Tik")), policy(), CTX).allow
    assert not evaluate(posture(App(id="com.zhiliaoapp.musically")), policy(), CTX).allow


@pytest.mark.parametrize(("setting", "with_report", "allow"), [
    ("allow", False, True), ("deny", False, False), ("deny", True, False),
    ("require_device_report", False, False), ("require_device_report", True, True)])
def test_partial_inventory(setting: str, with_report: bool, allow: bool) -> None:
    """A managed-only MDM inventory: allowed, denied, or allowed only with a fresh
    report of the device's own."""
    mdm = posture(App("com.microsoft.office.outlook"), inventory="managed-only")
    own = posture(App("com.microsoft.office.outlook"), source="device")
    postures = [mdm, own] if with_report else [mdm]
    d, _ = evaluate_authorities(postures, policy(partial_inventory=setting), CTX)
    assert d.allow is allow
    if not allow:
        assert d.reasons[0].code == "partial_inventory"


def test_device_report_adds_to_partial_inventory() -> None:
    """With require_device_report, the device's own report still adds its violations."""
    mdm = posture(App("com.microsoft.office.outlook"), inventory="managed-only")
    own = posture(App("com.zhiliaoapp.musically"), source="device")
    d, _ = evaluate_authorities([mdm, own], policy(partial_inventory="require_device_report"),
                                CTX)
    assert [r.code for r in d.reasons] == ["prohibited_app"]


@pytest.mark.parametrize(("setting", "allow"), [("ignore", True), ("deny", False)])
def test_mdm_noncompliant(setting: str, allow: bool) -> None:
    """The MDM's own noncompliant verdict denies only with mdm_noncompliant = "deny"."""
    d = evaluate(posture(mdm_compliance="noncompliant"), policy(mdm_noncompliant=setting), CTX)
    assert d.allow is allow
    assert allow or d.reasons[0].code == "mdm_noncompliant"


def test_shipped_policy_has_tiktok_names() -> None:
    """The shipped TikTok rule matches by display name too."""
    p = load_policy(ROOT / "config/policy.toml")
    assert p.prohibited[0].names == ("TikTok*",)
    assert p.partial_inventory == "allow" and p.mdm_noncompliant == "ignore"


def test_policy_file_reads_names_and_settings(tmp_path: Path) -> None:
    """names-only rules, partial_inventory and mdm_noncompliant load from the file."""
    f = tmp_path / "policy.toml"
    f.write_text('partial_inventory = "require_device_report"\nmdm_noncompliant = "deny"\n'
                 '[[prohibited]]\nname = "X"\nnames = ["X *"]\nreason = "r"\n'
                 'remediation = "m"\n')
    p = load_policy(f)
    assert p.partial_inventory == "require_device_report" and p.mdm_noncompliant == "deny"
    f.write_text('[[prohibited]]\nname = "X"\nreason = "r"\nremediation = "m"\n')
    with pytest.raises(ConfigError, match="ids"):
        load_policy(f)


def write_cfg(tmp_path: Path, mdm: str) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    cfg = tmp_path / "config/mailward.toml"
    cfg.write_text(f'[posture]\nforget_after = "30d"\n{mdm}')
    return cfg


def test_mdm_config(tmp_path: Path) -> None:
    """[[mdm]] tables load with defaults; secret paths resolve against the root."""
    cfg = load_config(write_cfg(tmp_path, '[[mdm]]\nname = "intune"\nkind = "intune"\n'
                                'tenant = "corp.example"\nclient_id = "x"\n'
                                'secret_file = "certs/intune.secret"\n'))
    (m,) = cfg.mdm
    assert m.source == "mdm:intune" and m.interval_s == 120 and m.full_interval_s == 3600
    assert m.device_id == "easDeviceId" and m.secret_file == tmp_path / "certs/intune.secret"
    assert m.base_url == "https://graph.microsoft.com/v1.0"
    assert cfg.posture.forget_after_s == 30 * 86400


@pytest.mark.parametrize(("body", "key"), [
    ('kind = "intune"\nclient_id = "x"', "tenant"),
    ('kind = "jamf"\nclient_id = "x"', "base_url"),
    ('kind = "jamf"\nclient_id = "x"\nbase_url = "http://jamf.example"', "base_url"),
    ('kind = "google"\nsubject = "a@b.c"\ntenant = "t"', "tenant"),
    ('kind = "google"\nsubject = "a@b.c"\ninterval = "2h"', "full_interval"),
    ('kind = "google"\nsubject = "a@b.c"\nwhat = 1', "what"),
])
def test_mdm_config_errors(tmp_path: Path, body: str, key: str) -> None:
    """A bad [[mdm]] table is one ConfigError naming the key and its line."""
    with pytest.raises(ConfigError, match=key) as err:
        load_config(write_cfg(tmp_path, f'[[mdm]]\nname = "m"\nsecret_file = "s"\n{body}\n'))
    assert err.value.line is not None


def test_graph_times_and_retry_after() -> None:
    """Graph's 7-digit fractions parse; Retry-After takes seconds or a date, capped."""
    assert parse_time("2026-12-02T12:00:00.1234567Z") == NOW.timestamp() + 0.123456
    with pytest.raises(MalformedDevice):
        parse_time("yesterday")
    assert retry_after_s("3", 0.5) == 3.0 and retry_after_s(None, 0.5) == 0.5
    assert retry_after_s("100000", 0.5) == 120.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 0.5) == 0.0
    assert not same_origin("https://evil.example/x", "https://graph.microsoft.com/v1.0")


def test_intune_mapping() -> None:
    """A managedDevice maps ids, platform, owner type and leaving states."""
    d = intune_device({"id": "g-1", "emailAddress": "A@Corp.Example", "operatingSystem": "iOS",
                       "model": "iPad Pro", "easDeviceId": "EAS1", "serialNumber": "S1",
                       "lastSyncDateTime": "2026-12-02T12:00:00Z", "complianceState":
                       "noncompliant", "managementState": "wipePending",
                       "managedDeviceOwnerType": "personal"})
    assert d is not None and d.platform == "ipados" and d.user == "a@corp.example"
    assert d.gone and d.inventory == "managed-only" and d.device_id("easDeviceId") == "EAS1"
    assert d.device_id("udid") == "g-1"
    assert intune_device({"id": "g-2", "lastSyncDateTime": "2026-12-02T12:00:00Z",
                          "operatingSystem": "Android"}) is None  # no user
    with pytest.raises(MalformedDevice):
        intune_device({"id": "bad id with spaces"})
