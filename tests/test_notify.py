"""Notices to users without peers: which decisions call for which notice, the IMAP
ALERT in the sans-IO layer, the notifier's rate limit, retries, records and memory
across restarts (with an in-process sender), templates and the ``[notify]`` table."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from helpers.fakes import ListAudit

from proxy.config import ConfigError, NotifyConfig, load_config
from proxy.frontends.imap_preauth import DecisionMade, Preauth, Splice
from proxy.gate import DecisionSeen, Gate, Identity, Origin
from proxy.notify import Notifier, notices_for
from proxy.notify_mail import Templates
from proxy.policy import Decision, Policy, ProhibitedApp
from proxy.posture import App, Posture

pytestmark = pytest.mark.conversation

NOW = time.time()
TIKTOK = App("com.zhiliaoapp.musically", "35.1.3", "TikTok")
ALICE = "alice@corp.example"


def policy(*, days_ahead: float | None = 1, mode: str | None = None) -> Policy:
    start = None if days_ahead is None else (
        datetime.fromtimestamp(NOW, UTC) + timedelta(days=days_ahead))
    rule = ProhibitedApp("TikTok", (TIKTOK.id,), "TikTok reads the clipboard.",
                         "Uninstall TikTok to restore company mail.", enforce_from=start,
                         mode=mode)  # type: ignore[arg-type]
    return Policy(version="t1", sha256="0" * 64, prohibited=(rule,),
                  max_posture_age_s=30 * 86400.0)


def phone(device: str = "alice-phone", user: str = ALICE) -> Posture:
    now = int(NOW)
    return Posture(device_id=device, user=user, platform="android", os_version="14",
                   managed=True, apps=(TIKTOK,), iat=now - 10, exp=now + 86400 * 30,
                   jti=device, issuer="test", attested_by="device")


class Store:
    def __init__(self, *postures: Posture) -> None:
        self.by_id = {p.device_id: p for p in postures}

    async def get(self, device_id: str) -> Posture | None:
        return self.by_id.get(device_id)

    async def devices_for_user(self, user: str) -> list[Posture]:
        return [p for p in self.by_id.values() if p.user == user]


class Outbox:
    """A sender that keeps what it was given; ``fail`` refuses every message."""

    def __init__(self) -> None:
        self.sent: list[tuple[EmailMessage, list[str]]] = []
        self.fail = False
        self.attempts = 0

    async def send(self, msg: EmailMessage, recipients: list[str]) -> None:
        self.attempts += 1
        if self.fail:
            raise OSError("relay down")
        self.sent.append((msg, recipients))


class World:
    """A gate over one phone with TikTok, a notifier with an :class:`Outbox`."""

    def __init__(self, tmp: Path, pol: Policy, **cfg: Any) -> None:
        self.clock = [NOW]
        self.audit = ListAudit()
        self.policy = pol
        self.gate = Gate(store=Store(phone()), audit=self.audit, policy=lambda: self.policy,
                         clock=lambda: self.clock[0])
        self.outbox = Outbox()
        settings = {"smtp_host": "relay.test", "sender": "mail-access@corp.example",
                    "retry_delay_s": 0.01, **cfg}
        self.notifier = Notifier(NotifyConfig(**settings), record=self.gate.record_notice,
                                 state_dir=tmp, sender=self.outbox)
        self.gate.notices = self.notifier

    async def login(self, protocol: str = "imap") -> tuple[Decision, str | None]:
        identity, origin = Identity(ALICE, "alice-phone", "client_cert"), Origin(
            protocol, protocol, "192.0.2.1", "deny")
        decision = await self.gate.decide(identity, origin)
        return decision, await self.gate.warning_alert(identity, origin, decision)

    async def settle(self) -> None:
        await asyncio.wait_for(self.notifier._queue.join(), 5)
        await asyncio.gather(*self.notifier._records)

    def notices(self) -> list[dict[str, Any]]:
        return [r for r in self.audit.records if r["event"] == "notice"]


def seen(pol: Policy, decision: Decision, now: float = NOW) -> DecisionSeen:
    return DecisionSeen(Identity(ALICE, "alice-phone"), Origin("smtp", "smtp", "", "deny"),
                        decision, pol, "alice-phone", now)


# ------------------------------------------------------------------ classification


def test_pending_rule_gives_a_warning_and_an_active_one_a_deny() -> None:
    """Before enforce_from the allow carries a pending warning; after it the deny
    gives one deny notice for the rule."""
    from proxy.policy import Context, evaluate

    pol = policy()
    before = evaluate(phone(), pol, Context(datetime.fromtimestamp(NOW, UTC), ALICE, "d"))
    later = NOW + 2 * 86400
    after = evaluate(phone(), pol, Context(datetime.fromtimestamp(later, UTC), ALICE, "d"))
    [warning] = notices_for(seen(pol, before))
    assert (warning.kind, warning.pending, warning.reason.rule) == ("warning", True, "TikTok")
    assert warning.values("x@y")["date"] == f"{pol.prohibited[0].enforce_from:%Y-%m-%d}"
    [deny] = notices_for(seen(pol, after, later), report_only=True)
    assert (deny.kind, deny.pending) == ("deny", False)


def test_report_only_and_temporary_decisions_give_no_notice_by_default() -> None:
    """A report-only finding is told only with notify_report_only; a temporary deny
    never."""
    from proxy.policy import Context, Reason, evaluate

    pol = policy(days_ahead=None, mode="report-only")
    d = evaluate(phone(), pol, Context(datetime.fromtimestamp(NOW, UTC), ALICE, "d"))
    assert d.allow and d.report_only
    assert notices_for(seen(pol, d)) == []
    [n] = notices_for(seen(pol, d), report_only=True)
    assert (n.kind, n.pending) == ("warning", False)
    temporary = Decision.deny(pol, Reason("posture_store_unavailable", "later"), temporary=True)
    assert notices_for(seen(pol, temporary), report_only=True) == []


def test_alert_follows_the_logins_tagged_answer_in_the_sans_io_layer() -> None:
    """An allowed login with an alert splices `* OK [ALERT] <text>` before the
    upstream's answer; without one the answer is unchanged."""
    from proxy.frontends.imap_preauth import Connected, DataReceived, UpstreamAnswered

    def login(alert: str) -> bytes:
        layer = Preauth(tls_mode="none", cleartext_allowed=True, max_commands=10)
        layer.handle(Connected())
        layer.handle(DataReceived(b"a1 LOGIN alice secret\r\n"))
        layer.handle(UpstreamAnswered(True, b"", b"a1 OK Logged in\r\n"))
        pol = policy()
        [splice] = layer.handle(DecisionMade(Decision.allowed(pol), alert=alert))
        assert isinstance(splice, Splice)
        return splice.answer

    assert login("") == b"a1 OK Logged in\r\n"
    assert login("TikTok is installed. Blocked from 2030-01-02.") == (
        b"* OK [ALERT] TikTok is installed. Blocked from 2030-01-02.\r\na1 OK Logged in\r\n")


# ------------------------------------------------------------------ the notifier


async def test_warning_alert_once_a_day_and_one_mail_per_device_and_reason(tmp_path: Path) -> None:
    """Before the date: the first login gets the ALERT with the date and one warning
    mail; a second login the same day neither; the next day the ALERT again."""
    w = World(tmp_path, policy(days_ahead=3))
    await w.notifier.start()
    decision, alert = await w.login()
    assert decision.allow and alert is not None
    assert f"{w.policy.prohibited[0].enforce_from:%Y-%m-%d}" in alert
    assert (await w.login())[1] is None
    await w.settle()
    [(msg, rcpt)] = w.outbox.sent
    assert rcpt == [ALICE] and msg["X-Mailward-Notice"] == "warning"
    assert "TikTok" in msg["Subject"] and msg["Auto-Submitted"] == "auto-generated"
    body = msg.get_body(("plain",))
    assert body is not None and "Uninstall TikTok" in body.get_content()
    w.clock[0] += 86400 + 1
    assert (await w.login())[1] is not None
    await w.settle()
    kinds = sorted((r["channel"], r["kind"], r["result"]) for r in w.notices())
    assert kinds == [("imap_alert", "warning", "delivered")] * 2 + [
        ("mail", "warning", "delivered")] * 2
    assert all("body" not in r and r["reason"] == "prohibited_app" for r in w.notices())
    await w.notifier.close()


async def test_deny_mails_once_and_the_memory_survives_a_restart(tmp_path: Path) -> None:
    """After the date the first deny mails the user (and the admin copy); a second
    deny does not, nor does a new notifier over the same state directory."""
    w = World(tmp_path, policy(days_ahead=-1), admin_copy="it@corp.example")
    await w.notifier.start()
    assert not (await w.login("activesync"))[0].allow
    assert not (await w.login("activesync"))[0].allow
    await w.settle()
    [(msg, rcpt)] = w.outbox.sent
    assert rcpt == [ALICE, "it@corp.example"] and msg["X-Mailward-Notice"] == "deny"
    html = msg.get_body(("html",))
    assert html is not None and "alice-phone" in html.get_content()
    await w.notifier.close()

    again = World(tmp_path, w.policy)
    await again.notifier.start()
    assert not (await again.login("activesync"))[0].allow
    await again.notifier.close()
    assert again.outbox.sent == []
    [record] = w.notices()
    assert (record["kind"], record["result"], record["admin_copy"]) == ("deny", "delivered", True)


async def test_failing_relay_is_retried_then_recorded_as_failed(tmp_path: Path) -> None:
    """A relay that refuses every attempt: the login is not delayed, the notice is
    tried 1 + retries times and its record says failed."""
    w = World(tmp_path, policy(days_ahead=-1), retries=2)
    w.outbox.fail = True
    await w.notifier.start()
    started = time.perf_counter()
    assert not (await w.login("smtp"))[0].allow
    assert time.perf_counter() - started < 0.5
    await w.settle()
    [record] = w.notices()
    assert (record["result"], record["attempts"], w.outbox.attempts) == ("failed", 3, 3)
    assert "relay down" in record["error"]
    await w.notifier.close()


async def test_report_only_rule_sends_nothing_and_shows_no_alert(tmp_path: Path) -> None:
    """A report-only rule: no ALERT, no mail, no notice record."""
    w = World(tmp_path, policy(days_ahead=None, mode="report-only"))
    await w.notifier.start()
    decision, alert = await w.login()
    await w.settle()
    assert decision.allow and decision.report_only and alert is None
    assert w.outbox.sent == [] and w.notices() == []
    await w.notifier.close()


# ------------------------------------------------------------- templates, config


def test_templates_by_domain_language_with_override_and_english_fallback(tmp_path: Path) -> None:
    """A templates directory overrides the shipped text per language (chosen by the
    user's domain); what it lacks comes from the shipped English."""
    (tmp_path / "fr").mkdir()
    (tmp_path / "fr" / "deny.txt").write_text("Subject: Messagerie bloquée: $app\n\n$text\n")
    t = Templates(NotifyConfig(templates=tmp_path, languages={"corp.fr": "fr"}))
    values = {"app": "TikTok", "text": "<b>x</b>"}
    assert t.render("deny", "marie@corp.fr", values)[:2] == (
        "Messagerie bloquée: TikTok", "<b>x</b>\n")
    subject, _, rich = t.render("warning", "marie@corp.fr", values)
    assert "TikTok" in subject and rich is not None and "&lt;b&gt;x&lt;/b&gt;" in rich
    assert t.render("deny", "bob@corp.example", values)[0].startswith("Company mail blocked")


def _config(tmp_path: Path, notify: str) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    path = tmp_path / "config" / "mailward.toml"
    path.write_text(notify)
    return path


def test_notify_table_is_read_and_checked(tmp_path: Path) -> None:
    """[notify] keys become NotifyConfig; a bad rate names its key."""
    cfg = load_config(_config(tmp_path, '[notify]\nsmtp = "relay.corp.example:587"\n'
                              'sender = "mail-access@corp.example"\nrate = "2/12h"\n'
                              'templates = "config/notices"\nlanguages = {"corp.fr" = "fr"}\n'))
    n = cfg.notify
    assert (n.smtp_host, n.smtp_port, n.starttls, n.rate_count, n.rate_window_s) == (
        "relay.corp.example", 587, True, 2, 43200.0)
    assert n.templates == tmp_path / "config" / "notices" and n.languages == {"corp.fr": "fr"}
    assert load_config(_config(tmp_path, "")).notify.mail is False
    with pytest.raises(ConfigError, match=r"notify\.rate"):
        load_config(_config(tmp_path, '[notify]\nrate = "often"\n'))
    with pytest.raises(ConfigError, match=r"notify\.sender"):
        load_config(_config(tmp_path, '[notify]\nsmtp = "relay:25"\n'))


async def test_unreadable_relay_credentials_stop_the_server_starting(tmp_path: Path) -> None:
    """A credentials_file that cannot be read is a start-up error naming [notify]."""
    from proxy.notify import start_notifier
    from proxy.startup import StartupError

    gate = Gate(store=Store(), audit=ListAudit(), policy=policy)
    cfg = NotifyConfig(smtp_host="relay.test", sender="a@b.example",
                       credentials_file=tmp_path / "missing.secret")
    with pytest.raises(StartupError, match=r"notify: .*missing\.secret"):
        await start_notifier(gate, cfg, tmp_path)
    started = await start_notifier(gate, NotifyConfig(), tmp_path)  # no relay: alerts only
    assert gate.notices is started and not started.mails
    await started.close()
