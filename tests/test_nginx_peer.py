"""mailward behind a real nginx: ``mailward serve`` with ``[nginx]``, nginx's ``mail``
proxy (IMAP, POP3, SMTP) asking ``auth_http`` in front of real Dovecot and Postfix, and
nginx's ``http`` proxy asking ``auth_request`` in front of an ActiveSync upstream, each
driven by a real client (imaplib, poplib, smtplib, urllib) as the phone."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import poplib
import shutil
import smtplib
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from audit_records import read_records
from helpers.serve import free_port, serve, wait_serving
from helpers.tls import Pki, enrolled_pki
from peers import peer_missing
from peers.dovecot import Dovecot, make_message, require_dovecot
from peers.nginx_mail import NginxFront, XclientPostfix, require_nginx_mail
from peers.postfix import PeerUnavailable
from pki_helpers import fresh_posture as posture

from proxy.demo.upstream import UpstreamThread
from proxy.posture import App
from proxy.posture.sqlite import SqlitePostureStore

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "alice@example.test", "bob@example.test"
USERS = {ALICE: "alice-secret", BOB: "bob-secret"}
DEVICES = (("alice-phone", ALICE), ("alice-tiktok", ALICE), ("bob-phone", BOB))
TIKTOK = App("com.zhiliaoapp.musically", "35.1.3", "TikTok")
SECRET = "nginx-shared-secret-for-the-test"


@dataclass
class Site:
    root: Path
    pki: Pki
    nginx: NginxFront
    dovecot: Dovecot
    postfix: XclientPostfix

    def decisions(self, count: int, **match: Any) -> list[dict[str, Any]]:
        """The decision records matching ``match`` once ``count`` are there (or at 10 s)."""
        deadline = time.monotonic() + 10
        while True:
            recs = [r for r in read_records(self.root / "state/audit.jsonl", "decision")
                    if all(r.get(k) == v for k, v in match.items())]
            if len(recs) >= count or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)


CONFIG = """\
[server]
state_dir = "state"
policy = "config/policy.toml"
shutdown_grace = "1s"

[api]
listen = "127.0.0.1:{api}"
tls = false

[nginx]
listen = "127.0.0.1:{auth}"
secret_file = "certs/nginx.secret"

[[listeners]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:{imaps}"
upstream = "127.0.0.1:{dovecot_tls}"
upstream_ca = "certs/ca.pem"
nginx_upstream = "127.0.0.1:{dovecot_plain}"

[[listeners]]
name = "pop3s"
protocol = "pop3"
listen = "127.0.0.1:{pop3s}"
upstream = "127.0.0.1:{dovecot_pop3_tls}"
upstream_ca = "certs/ca.pem"
nginx_upstream = "127.0.0.1:{dovecot_pop3_plain}"

[[listeners]]
name = "submission"
protocol = "smtp"
listen = "127.0.0.1:{submission}"
tls = "starttls"
upstream = "127.0.0.1:{postfix_submission}"
upstream_tls = "starttls"
upstream_ca = "{postfix_ca}"
nginx_upstream = "127.0.0.1:{postfix_plain}"

[[listeners]]
name = "activesync"
protocol = "activesync"
listen = "127.0.0.1:{activesync}"
upstream = "{eas_url}"
upstream_tls = "none"
nginx_upstream = "127.0.0.1:{eas_port}"
"""


async def _postures(db: Path) -> None:
    store = SqlitePostureStore(db)
    for device, user in DEVICES:
        p = posture(device, user, (TIKTOK,) if "tiktok" in device else ())
        assert await store.commit_attestation(p, None, time.time()) == "ok"
    await store.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_dovecot()
    require_nginx_mail()
    root = tmp_path_factory.mktemp("nginx-site")
    pki = enrolled_pki(root / "certs", DEVICES)
    (root / "certs/nginx.secret").write_text(SECRET + "\n")
    (root / "config").mkdir()
    shutil.copy(ROOT / "config/policy.toml", root / "config/policy.toml")
    (root / "state").mkdir(mode=0o700)
    asyncio.run(_postures(root / "state/posture.db"))
    try:
        postfix = XclientPostfix.start(USERS)
    except PeerUnavailable as exc:
        peer_missing(f"Postfix peer unavailable: {exc}")
    eas = UpstreamThread(users=USERS, imap_tls="none", smtp_tls="none", eas_tls=False)
    dovecot = Dovecot(pki.dir / "server.pem", pki.dir / "server.key", USERS, pop3=True)
    with postfix, dovecot:
        dovecot.deliver(ALICE, [make_message(i) for i in range(3)])
        up = eas.start()
        ports = {n: free_port() for n in ("api", "auth", "imaps", "pop3s", "submission",
                                       "activesync")}
        config = root / "config/mailward.toml"
        config.write_text(CONFIG.format(
            **ports, dovecot_tls=dovecot.port_tls, dovecot_plain=dovecot.port_plain,
            dovecot_pop3_tls=dovecot.pop3_port_tls, dovecot_pop3_plain=dovecot.pop3_port_plain,
            postfix_submission=postfix.submission_port, postfix_ca=postfix.ca_pem,
            postfix_plain=postfix.plain_port, eas_url=up.eas_url, eas_port=up.ports["eas"]))
        log = root / "serve.log"
        proc = serve(config, log)
        nginx = NginxFront(root / "nginx", {
            "auth_port": ports["auth"], "secret": SECRET, "cert": pki.dir / "server.pem",
            "key": pki.dir / "server.key", "device_ca": pki.dir / "device-ca.pem",
            "eas_upstream": up.eas_url})
        try:
            wait_serving(proc, lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{ports['api']}/readyz", timeout=2).status == 200, log)
            nginx.start()
            yield Site(root, pki, nginx, dovecot, postfix)
        finally:
            nginx.stop()
            proc.terminate()
            proc.wait(20)
            eas.stop()


def imap_client(site: Site, device: str | None) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("localhost", site.nginx.ports["imap"],
                             ssl_context=site.pki.client_ctx(device), timeout=20)


def smtp_client(site: Site, device: str | None) -> smtplib.SMTP_SSL:
    s = smtplib.SMTP_SSL("localhost", site.nginx.ports["smtp"],
                         context=site.pki.client_ctx(device), timeout=20)
    s.ehlo("phone.example")
    return s


def test_imap_compliant_device_reads_its_mail_through_nginx(site: Site) -> None:
    """imaplib through nginx with a compliant device: logged in, the mail is there, recorded."""
    m = imap_client(site, "alice-phone")
    assert m.login(ALICE, USERS[ALICE])[0] == "OK"
    assert m.select("INBOX", readonly=True)[0] == "OK"
    _, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = [part[1] for part in data if isinstance(part, tuple)]
    assert subjects and all(b"message" in s for s in subjects)
    m.logout()
    (rec,) = site.decisions(1, device_id="alice-phone", protocol="imap")
    assert (rec["decision"], rec["listener"], rec["user"], rec["client_ip"],
            rec["device_source"]) == ("allow", "nginx:imaps", ALICE, "127.0.0.1",
                                      "client_cert")


def test_imap_tiktok_device_is_shown_the_reason(site: Site) -> None:
    """The TikTok device's login fails with the remediation text the client shows."""
    m = imap_client(site, "alice-tiktok")
    with pytest.raises(imaplib.IMAP4.error) as err:
        m.login(ALICE, USERS[ALICE])
    assert "TikTok" in str(err.value) and "[ALERT]" in str(err.value)
    (rec,) = site.decisions(1, device_id="alice-tiktok", protocol="imap")
    assert rec["decision"] == "deny"
    assert "prohibited_app" in [r["code"] for r in rec["reasons"]]


def test_imap_wrong_password_waits_and_the_connection_may_retry(site: Site) -> None:
    """A wrong password is refused after Auth-Wait; the same connection then logs in."""
    m = imap_client(site, "bob-phone")
    started = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error) as err:
        m.login(BOB, "wrong-password")
    assert time.monotonic() - started >= 0.9  # nginx waited Auth-Wait before answering
    assert "AUTHENTICATIONFAILED" in str(err.value) or "failed" in str(err.value).lower()
    assert m.login(BOB, USERS[BOB])[0] == "OK"
    m.logout()
    recs = site.decisions(2, device_id="bob-phone", protocol="imap")
    assert [r["reasons"][0]["code"] if r["reasons"] else r["decision"] for r in recs] == [
        "auth_failed", "allow"]


def test_pop3_through_nginx_allows_and_refuses_with_the_reason(site: Site) -> None:
    """poplib through nginx: the compliant device lists its mail, TikTok reads the reason."""
    p = poplib.POP3_SSL("localhost", site.nginx.ports["pop3"],
                        context=site.pki.client_ctx("alice-phone"), timeout=20)
    p.user(ALICE)
    assert p.pass_(USERS[ALICE]).startswith(b"+OK")
    assert p.stat()[0] >= 3
    p.quit()
    p = poplib.POP3_SSL("localhost", site.nginx.ports["pop3"],
                        context=site.pki.client_ctx("alice-tiktok"), timeout=20)
    p.user(ALICE)
    with pytest.raises(poplib.error_proto) as err:
        p.pass_(USERS[ALICE])
    assert b"[SYS/PERM]" in err.value.args[0] and b"TikTok" in err.value.args[0]
    recs = site.decisions(2, protocol="pop3")
    assert [(r["decision"], r["device_id"], r["listener"]) for r in recs] == [
        ("allow", "alice-phone", "nginx:pop3s"), ("deny", "alice-tiktok", "nginx:pop3s")]


def test_smtp_compliant_device_sends_mail_through_nginx(site: Site) -> None:
    """smtplib through nginx: AUTH, then Postfix (XCLIENT LOGIN) delivers the message."""
    site.postfix.clear_mailbox(BOB)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = ALICE, BOB, "through nginx"
    msg.set_content("sent by a compliant phone\n")
    s = smtp_client(site, "alice-phone")
    s.login(ALICE, USERS[ALICE])
    assert s.send_message(msg) == {}
    s.quit()
    (stored,) = site.postfix.wait_for_messages(BOB, 1)
    assert b"through nginx" in stored
    (rec,) = site.decisions(1, device_id="alice-phone", protocol="smtp")
    assert (rec["decision"], rec["listener"]) == ("allow", "nginx:submission")


def test_smtp_tiktok_device_refused_with_550_and_the_reason(site: Site) -> None:
    """The TikTok device's AUTH is answered 550 5.7.1 with the remediation text."""
    s = smtp_client(site, "alice-tiktok")
    s.user, s.password = ALICE, USERS[ALICE]
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        # One method: login() would try the next one on the connection nginx closed.
        s.auth("PLAIN", s.auth_plain)
    assert err.value.smtp_code == 550 and b"TikTok" in err.value.smtp_error
    (rec,) = site.decisions(1, device_id="alice-tiktok", protocol="smtp")
    assert rec["decision"] == "deny"


def eas(site: Site, device: str, password: str) -> tuple[int, dict[str, str], bytes]:
    """A phone's ActiveSync FolderSync through nginx (status, headers, body)."""
    url = (f"https://localhost:{site.nginx.ports['eas']}/Microsoft-Server-ActiveSync"
           f"?Cmd=FolderSync&User={ALICE}&DeviceId={device}&DeviceType=Android")
    token = base64.b64encode(f"{ALICE}:{password}".encode()).decode()
    req = urllib.request.Request(url, data=b"", method="POST", headers={
        "Authorization": f"Basic {token}", "MS-ASProtocolVersion": "14.1",
        "Content-Type": "application/vnd.ms-sync.wbxml"})
    try:
        with urllib.request.urlopen(req, context=site.pki.client_ctx(device),
                                    timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_activesync_through_nginx_auth_request(site: Site) -> None:
    """auth_request: compliant 200 from the upstream (a phone's requests decided once:
    one decision record for its device-session), TikTok 403 with the reason, 401."""
    for _ in range(3):
        status, _, _ = eas(site, "alice-phone", USERS[ALICE])
        assert status == 200
    status, headers, _ = eas(site, "alice-tiktok", USERS[ALICE])
    assert status == 403 and "TikTok" in headers.get("X-Mailward-Refusal", "")
    status, headers, _ = eas(site, "alice-phone", "wrong-password")
    assert status == 401
    recs = site.decisions(3, protocol="activesync")
    assert [(r["decision"], r["device_id"], r["device_source"], r["listener"])
            for r in recs] == [
        ("allow", "alice-phone", "client_cert", "nginx:activesync"),
        ("deny", "alice-tiktok", "client_cert", "nginx:activesync"),
        ("deny", "alice-phone", "client_cert", "nginx:activesync")]
    assert recs[2]["reasons"][0]["code"] == "auth_failed"
