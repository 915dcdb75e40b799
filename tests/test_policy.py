"""Table-driven tests of the pure policy evaluation (every rule kind and their mixes)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from proxy.policy import (
    ApprovedApps,
    Context,
    Exemption,
    Policy,
    ProhibitedApp,
    UserScope,
    VersionRange,
    evaluate,
    version_key,
)
from proxy.posture import App, Posture

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TIKTOK = "com.zhiliaoapp.musically"

TIKTOK_RULE = ProhibitedApp(
    name="TikTok",
    ids=(TIKTOK, "com.ss.android.ugc.trill", "com.zhiliaoapp.musically.go"),
    reason="reads the clipboard",
    remediation="Uninstall TikTok to restore company mail.",
    platforms=("android", "ios", "ipados"),
)


def posture(*apps: str | App, platform: str = "android", user: str = "alice@corp.example",
            age_s: float = 60, device: str = "dev1") -> Posture:
    items = tuple(a if isinstance(a, App) else App(a) for a in apps)
    iat = int(NOW.timestamp() - age_s)
    return Posture(device, user, platform, "14", True, items, iat, iat + 3600, "j",
                   device, "device")


def policy(*rules: ProhibitedApp, **kw: object) -> Policy:
    return Policy(version="t1", sha256="0" * 64, prohibited=rules or (TIKTOK_RULE,), **kw)  # type: ignore[arg-type]


def ctx(user: str = "alice@corp.example", device: str = "dev1", now: datetime = NOW) -> Context:
    return Context(now=now, user=user, device_id=device, protocol="imap")


CASES = [
    # (id, posture, policy, context, allow, codes, report_only)
    ("compliant", posture("com.example.mail"), policy(), ctx(), True, [], False),
    ("tiktok android", posture(TIKTOK), policy(), ctx(), False, ["prohibited_app"], False),
    ("tiktok lite", posture("com.zhiliaoapp.musically.go"), policy(), ctx(), False,
     ["prohibited_app"], False),
    ("tiktok ios", posture(TIKTOK, platform="ios"), policy(), ctx(), False,
     ["prohibited_app"], False),
    ("desktop out of scope", posture(TIKTOK, platform="macos"), policy(), ctx(), True, [], False),
    ("rule platform filter", posture(TIKTOK, platform="ipados"),
     policy(replace(TIKTOK_RULE, platforms=("android",))), ctx(), True, [], False),
    ("unknown device deny", None, policy(), ctx(), False, ["unknown_device"], False),
    ("unknown device allow", None, policy(unknown_device="allow"), ctx(), True,
     ["unknown_device"], True),
    ("stale posture deny", posture("x", age_s=2 * 86400), policy(), ctx(), False,
     ["stale_posture"], False),
    ("stale posture allow", posture(TIKTOK, age_s=2 * 86400), policy(stale_posture="allow"),
     ctx(), True, ["stale_posture"], True),
    ("user mismatch", posture("x", user="bob@corp.example"), policy(), ctx(), False,
     ["user_mismatch"], False),
    ("global report-only", posture(TIKTOK), policy(mode="report-only"), ctx(), True,
     ["prohibited_app"], True),
    ("rule report-only", posture(TIKTOK), policy(replace(TIKTOK_RULE, mode="report-only")),
     ctx(), True, ["prohibited_app"], True),
    ("rule enforce overrides global report-only", posture(TIKTOK),
     policy(replace(TIKTOK_RULE, mode="enforce"), mode="report-only"), ctx(), False,
     ["prohibited_app"], False),
    ("enforce_from future warns", posture(TIKTOK),
     policy(replace(TIKTOK_RULE, enforce_from=NOW + timedelta(days=3))), ctx(), True,
     ["prohibited_app"], True),
    ("enforce_from past denies", posture(TIKTOK),
     policy(replace(TIKTOK_RULE, enforce_from=NOW - timedelta(seconds=1))), ctx(), False,
     ["prohibited_app"], False),
    ("glob", posture("com.ss.android.ugc.aweme"),
     policy(ProhibitedApp("ByteDance", ("com.ss.android.*",), "r", "fix")), ctx(), False,
     ["prohibited_app"], False),
    ("glob no match", posture("com.ssx.android.foo"),
     policy(ProhibitedApp("ByteDance", ("com.ss.android.*",), "r", "fix")), ctx(), True, [],
     False),
    ("version in range", posture(App(TIKTOK, "35.1.3")),
     policy(replace(TIKTOK_RULE, versions=VersionRange.parse(">=30, <36.2"))), ctx(), False,
     ["prohibited_app"], False),
    ("version below range", posture(App(TIKTOK, "29.9")),
     policy(replace(TIKTOK_RULE, versions=VersionRange.parse(">=30, <36.2"))), ctx(), True, [],
     False),
    ("version at exclusive bound", posture(App(TIKTOK, "36.2")),
     policy(replace(TIKTOK_RULE, versions=VersionRange.parse(">=30, <36.2"))), ctx(), True, [],
     False),
    ("version unknown is in range", posture(App(TIKTOK, "")),
     policy(replace(TIKTOK_RULE, versions=VersionRange.parse(">=30"))), ctx(), False,
     ["prohibited_app"], False),
    ("exemption by user", posture(TIKTOK),
     policy(exemptions=(Exemption("social team", users=("alice@corp.example",)),)), ctx(), True,
     [], False),
    ("exemption by user glob + app name", posture(TIKTOK),
     policy(exemptions=(Exemption("t", users=("*@corp.example",), apps=("TikTok",)),)), ctx(),
     True, [], False),
    ("exemption for other app", posture(TIKTOK),
     policy(exemptions=(Exemption("t", users=("alice@corp.example",), apps=("Other",)),)),
     ctx(), False, ["prohibited_app"], False),
    ("exemption by device", posture(TIKTOK),
     policy(exemptions=(Exemption("t", devices=("dev1",)),)), ctx(), True, [], False),
    ("exemption expired", posture(TIKTOK),
     policy(exemptions=(Exemption("t", users=("alice@corp.example",),
                                  until=NOW - timedelta(days=1)),)), ctx(), False,
     ["prohibited_app"], False),
    ("exemption other user", posture(TIKTOK, user="bob@corp.example"),
     policy(exemptions=(Exemption("t", users=("alice@corp.example",)),)),
     ctx(user="bob@corp.example"), False, ["prohibited_app"], False),
    ("group scope member", posture(TIKTOK),
     policy(replace(TIKTOK_RULE, scope=UserScope(("finance",))),
            groups={"finance": ("*@corp.example",)}), ctx(), False, ["prohibited_app"], False),
    ("group scope non-member", posture(TIKTOK, user="eve@other.example"),
     policy(replace(TIKTOK_RULE, scope=UserScope(("finance",))),
            groups={"finance": ("*@corp.example",)}), ctx(user="eve@other.example"), True, [],
     False),
    ("approved apps: unlisted app", posture("com.android.chrome", "com.evil.app"),
     policy(approved=(ApprovedApps("android", ("com.android.*",), "Remove it."),)), ctx(),
     False, ["unapproved_app"], False),
    ("approved apps: all listed", posture("com.android.chrome"),
     policy(approved=(ApprovedApps("android", ("com.android.*",), "Remove it."),)), ctx(),
     True, [], False),
    ("approved apps report-only", posture("com.evil.app"),
     policy(approved=(ApprovedApps("android", ("com.android.*",), "x", mode="report-only"),)),
     ctx(), True, ["unapproved_app"], True),
    ("approved apps other platform", posture("com.evil.app", platform="ios"),
     policy(approved=(ApprovedApps("android", ("com.android.*",), "x"),)), ctx(), True, [],
     False),
    ("enforced and report-only together deny", posture(TIKTOK, "com.ss.android.x"),
     policy(TIKTOK_RULE, ProhibitedApp("BD", ("com.ss.android.*",), "r", "f",
                                       mode="report-only")), ctx(), False,
     ["prohibited_app", "prohibited_app"], False),
]


@pytest.mark.parametrize(
    ("post", "pol", "context", "allow", "codes", "report_only"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_evaluate_table(post: Posture | None, pol: Policy, context: Context, allow: bool,
                        codes: list[str], report_only: bool) -> None:
    """Each row: a posture, a policy and a context give this verdict and these reasons."""
    d = evaluate(post, pol, context)
    assert d.allow is allow
    assert [r.code for r in d.reasons] == codes
    assert d.report_only is report_only
    assert d.policy_version == "t1"


def test_deny_text_names_app_and_remedy() -> None:
    """The refusal text a user sees names the app and says what to do."""
    d = evaluate(posture(App(TIKTOK, "35.1", "TikTok")), policy(), ctx())
    assert not d.allow
    assert "TikTok" in d.user_text() and "Uninstall" in d.user_text()
    assert d.reasons[0].app_id == TIKTOK


def test_user_mismatch_text_does_not_leak_other_user() -> None:
    """A device of another user is refused without naming that user."""
    d = evaluate(posture("x", user="bob@corp.example"), policy(), ctx())
    assert "bob" not in d.user_text()


def test_future_enforcement_warns_with_date() -> None:
    """Before enforce_from the user is allowed and the reason tells the date."""
    rule = replace(TIKTOK_RULE, enforce_from=datetime(2026, 12, 1, tzinfo=UTC))
    d = evaluate(posture(TIKTOK), policy(rule), ctx())
    assert d.allow and d.report_only
    assert "2026-12-01" in d.reasons[0].text and not d.reasons[0].enforced


def test_version_key_orders_numerically() -> None:
    """Versions compare part by part as numbers, not as strings."""
    assert version_key("35.10") > version_key("35.9")
    assert VersionRange.parse(">=35.9").contains("35.10")
    with pytest.raises(ValueError):
        VersionRange.parse("~35")


def test_glob_memo_gives_same_answer() -> None:
    """The per-policy memo of glob matches never changes an answer."""
    pol = policy(ProhibitedApp("BD", ("com.ss.*",), "r", "f"))
    for _ in range(3):
        assert not evaluate(posture("com.ss.a"), pol, ctx()).allow
        assert evaluate(posture("com.sx.a"), pol, ctx()).allow


def test_decision_deny_is_stamped_with_the_policy() -> None:
    """Decision.deny: one reason, the policy's version and digest, temporary on request."""
    from proxy.policy import Decision, Reason

    policy = Policy(version="v7", sha256="b" * 64)
    d = Decision.deny(policy, Reason("upstream_unavailable", "later"), temporary=True)
    assert (d.allow, d.decision, d.policy_version, d.policy_sha256, d.temporary) == (
        False, "deny", "v7", "b" * 64, True)
    assert d.user_text() == "later"
    assert Decision.allowed(policy).allow and Decision.allowed(policy).reasons == ()
