"""Notices end to end: the IMAP front end in front of a real Dovecot, notice mail sent
through a real Postfix (submission, STARTTLS, SMTP AUTH) into the user's Maildir, and
read back from Dovecot with imaplib, as the user would.

Postfix delivers into the Maildirs Dovecot serves (a symlink per user), the gate's
clock is injected (before and after the rule's ``enforce_from``), and each test uses
its own device, whose id is in the notices' subject.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import os
import pwd
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.frontend_env import FrontendEnv
from helpers.serve import free_port
from helpers.tls import Pki, enrolled_pki
from peers import peer_missing
from peers import postfix as postfix_peer
from peers.dovecot import Dovecot, require_dovecot
from pki_helpers import fresh_posture

from proxy.config import ListenerConfig, NotifyConfig, load_policy
from proxy.frontends.imap import start
from proxy.gate import Gate
from proxy.notify import Notifier
from proxy.policy import Policy
from proxy.posture import App

pytestmark = pytest.mark.peer

DOMAIN = postfix_peer.DOMAIN
ALICE = f"alice@{DOMAIN}"
SENDER = f"mail-access@{DOMAIN}"
USERS = {ALICE: "alice-secret", SENDER: "notify-secret"}
TIKTOK = App("com.zhiliaoapp.musically", "35.1.3", "TikTok")
DEVICES = ("phone-warned", "phone-denied", "phone-report", "phone-relay-down")
#: The rule starts in two days (UTC midnight); "after" is three days from now.
START = (datetime.now(UTC) + timedelta(days=2)).date()
AFTER_S = 3 * 86400.0
#: How long a test waits before it concludes that no further mail is coming.
QUIET_S = 2.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return enrolled_pki(tmp_path_factory.mktemp("pki"), [(d, ALICE) for d in DEVICES])


@pytest.fixture(scope="module")
def peers(pki: Pki) -> Iterator[tuple[postfix_peer.PostfixSubmission, Dovecot]]:
    """Postfix (relay, delivering to Maildirs) and Dovecot serving those Maildirs."""
    reason = postfix_peer.missing_reason()
    if reason:
        peer_missing(reason)
    require_dovecot()
    with postfix_peer.running(USERS) as pf:
        dv = Dovecot(pki.dir / "server.pem", pki.dir / "server.key", USERS)
        nobody = pwd.getpwnam("nobody")
        for user in USERS:  # Dovecot's Maildir of each user is Postfix's
            maildir = pf.maildir(user)
            for sub in ("cur", "new", "tmp"):
                (maildir / sub).mkdir(parents=True, exist_ok=True)
            for path in (maildir.parent, maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            dv.maildir(user).parent.mkdir(parents=True, exist_ok=True)
            dv.maildir(user).symlink_to(maildir, target_is_directory=True)
        with dv:
            yield pf, dv


POLICY = """\
version = "notify-test"
mode = "enforce"
max_posture_age = "30d"
[[prohibited]]
name = "TikTok"
ids = ["com.zhiliaoapp.musically"]
platforms = ["android", "ios", "ipados"]
reason = "TikTok was found reading the clipboard."
remediation = "Uninstall TikTok from this device to restore company mail."
enforce_from = {start}
{mode}
"""


class Env(FrontendEnv):
    """An IMAP listener before Dovecot, its gate on a clock the test moves, and a
    notifier relaying through Postfix (or, ``relay_down``, to a closed port); the gate
    asks ``policy_of`` for its policy when given (else the test policy, fixed); the
    audit log is signed with ``signing_key`` when given."""

    def __init__(self, pki: Pki, peers: tuple[Any, Dovecot], tmp: Path, *,
                 mode: str = "", relay_down: bool = False,
                 policy_of: Callable[[], Policy] | None = None,
                 signing_key: Any = None) -> None:
        super().__init__(pki, tmp, signing_key)
        self.pf, self.dv = peers
        (tmp / "policy.toml").write_text(POLICY.format(start=START, mode=mode))
        policy = load_policy(tmp / "policy.toml")
        self.clock = [time.time()]
        self.gate = Gate(store=self.store, audit=self.audit,
                         policy=policy_of or (lambda: policy), clock=lambda: self.clock[0])
        (tmp / "relay.secret").write_text(f"{SENDER}:{USERS[SENDER]}\n")
        cfg = NotifyConfig(
            smtp_host="127.0.0.1",
            smtp_port=free_port() if relay_down else self.pf.submission_port,
            starttls=True, smtp_ca=self.pf.ca_pem, credentials_file=tmp / "relay.secret",
            sender=SENDER, retries=1, retry_delay_s=0.05, timeout_s=10)
        self.notifier = Notifier(cfg, record=self.gate.record_notice, state_dir=tmp)
        self.gate.notices = self.notifier
        self.port = 0

    async def begin(self, device: str) -> None:
        await self.notifier.start()
        await self.put(fresh_posture(device, ALICE, (TIKTOK,)))
        self.port = await self.start(ListenerConfig(
            name="imaps", protocol="imap", host="127.0.0.1", port=0,
            upstream=f"127.0.0.1:{self.dv.port_tls}", tls="implicit", client_cert="optional",
            unidentified="deny", upstream_tls="implicit", upstream_ca=self.pki.dir / "ca.pem",
            upstream_connect_timeout_s=3, upstream_timeout_s=5), start)

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close(self.close_grace_s)
        self.listeners.clear()
        await self.notifier.close()
        await super().close()

    def login(self, device: str) -> tuple[bool, list[bytes]]:
        """Log in through the proxy as ``device``: (allowed, the ALERT texts seen)."""
        m = imaplib.IMAP4_SSL("localhost", self.port, ssl_context=self.pki.client_ctx(device),
                              timeout=10)
        try:
            m.login(ALICE, USERS[ALICE])
            allowed = True
        except imaplib.IMAP4.error:
            allowed = False
        # imaplib files "* OK [ALERT] text" under OK with its code (NO for a refusal).
        lines = m.untagged_responses.get("OK", []) + m.untagged_responses.get("NO", [])
        if allowed:
            m.logout()
        return allowed, [x.removeprefix(b"[ALERT] ") for x in lines
                         if x.startswith(b"[ALERT] ")]

    def notices(self, device: str, kind: str) -> list[str]:
        """Notice mail of ``kind`` about ``device`` in Alice's INBOX, read from Dovecot
        (each as its plain-text body, decoded)."""
        m = imaplib.IMAP4_SSL("localhost", self.dv.port_tls, ssl_context=self.pki.client_ctx(),
                              timeout=10)
        try:
            m.login(ALICE, USERS[ALICE])
            m.select("INBOX", readonly=True)
            _, data = m.search(None, "HEADER", "X-Mailward-Notice", kind, "SUBJECT", device)
            found = []
            for num in data[0].split():
                _, parts = m.fetch(num, "(BODY.PEEK[])")
                found += [_plain(p[1]) for p in parts if isinstance(p, tuple)]
            return found
        finally:
            m.logout()

    async def wait_notices(self, device: str, kind: str, count: int,
                           timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = await asyncio.to_thread(self.notices, device, kind)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)

    def notice_records(self, device: str) -> list[dict[str, Any]]:
        return [r for r in self.records("notice") if r["device"] == device]


def _plain(raw: bytes) -> str:
    """The plain-text body of a stored message; it must have an HTML alternative."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    plain, rich = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and rich is not None
    text: str = plain.get_content()
    return text


@pytest.fixture
async def make_env(pki: Pki, peers: tuple[Any, Dovecot], tmp_path: Path
                   ) -> AsyncIterator[Any]:
    made: list[Env] = []

    async def make(device: str, **kw: Any) -> Env:
        (tmp_path / device).mkdir()
        env = Env(pki, peers, tmp_path / device, **kw)
        made.append(env)
        await env.begin(device)
        return env

    yield make
    for env in made:
        await env.close()


async def test_warning_alert_once_a_day_and_one_warning_mail(make_env: Any) -> None:
    """Before enforce_from: the first login sees `* OK [ALERT]` with the date, a
    second login the same day does not; one warning mail arrives; both are records."""
    device = "phone-warned"
    env = await make_env(device)
    allowed, alerts = await asyncio.to_thread(env.login, device)
    assert allowed and len(alerts) == 1
    assert str(START).encode() in alerts[0] and b"TikTok" in alerts[0]
    assert await asyncio.to_thread(env.login, device) == (True, [])
    [mail] = await env.wait_notices(device, "warning", 1)
    assert str(START) in mail and "Uninstall TikTok" in mail and device in mail
    await asyncio.sleep(QUIET_S)
    assert len(await asyncio.to_thread(env.notices, device, "warning")) == 1
    records = sorted((r["channel"], r["kind"], r["result"]) for r in env.notice_records(device))
    assert records == [("imap_alert", "warning", "delivered"), ("mail", "warning", "delivered")]


async def test_after_the_date_deny_mails_once(make_env: Any) -> None:
    """After enforce_from (the gate's clock moved): the device is refused, one deny
    notice arrives, a second refusal sends none (rate limit)."""
    device = "phone-denied"
    env = await make_env(device)
    env.clock[0] += AFTER_S
    allowed, alerts = await asyncio.to_thread(env.login, device)
    assert not allowed and b"TikTok" in alerts[0]
    assert (await asyncio.to_thread(env.login, device))[0] is False
    [mail] = await env.wait_notices(device, "deny", 1)
    assert "TikTok was found reading the clipboard" in mail and device in mail
    await asyncio.sleep(QUIET_S)
    assert len(await asyncio.to_thread(env.notices, device, "deny")) == 1
    [record] = env.notice_records(device)
    assert (record["kind"], record["channel"], record["result"], record["reason"]) == (
        "deny", "mail", "delivered", "prohibited_app")


async def test_report_only_rule_sends_nothing(make_env: Any) -> None:
    """A report-only rule, before and after its date: logins pass without ALERT and
    nothing is mailed or recorded as a notice."""
    device = "phone-report"
    env = await make_env(device, mode='mode = "report-only"')
    assert await asyncio.to_thread(env.login, device) == (True, [])
    env.clock[0] += AFTER_S
    assert await asyncio.to_thread(env.login, device) == (True, [])
    await asyncio.sleep(QUIET_S)
    assert await asyncio.to_thread(env.notices, device, "warning") == []
    assert await asyncio.to_thread(env.notices, device, "deny") == []
    assert env.notice_records(device) == []


async def test_relay_down_leaves_logins_alone_and_records_the_failure(make_env: Any) -> None:
    """The relay is unreachable: the login is answered as fast as ever, and the
    notice record says the mail failed."""
    device = "phone-relay-down"
    env = await make_env(device, relay_down=True)
    env.clock[0] += AFTER_S
    started = time.perf_counter()
    allowed, _ = await asyncio.to_thread(env.login, device)
    assert not allowed and time.perf_counter() - started < 2
    [record] = [r for r in await env.wait_records(1, "notice") if r["device"] == device]
    assert (record["result"], record["attempts"]) == ("failed", 2)
    assert record["error"]
