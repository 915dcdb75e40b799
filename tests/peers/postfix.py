"""A throw-away Postfix submission server with real SMTP AUTH, for tests and benches.

What runs (all under one temporary directory, nothing in /etc or /var is touched):

- a Dovecot instance that serves only its auth socket (passwd-file users, no mail
  protocols), which Postfix uses for SASL (``smtpd_sasl_type = dovecot``);
- a Postfix instance with its own ``config_directory``, ``queue_directory`` and
  ``data_directory``, started with ``postfix -c DIR start`` and stopped at teardown.
  It listens on three loopback ports: submission with STARTTLS (``smtpd_tls_auth_only``),
  submissions with implicit TLS, and a STARTTLS submission port that offers mailward
  XFORWARD instead of XCLIENT (``xforward_port``). 127.0.0.1 may use XCLIENT
  (``smtpd_authorized_xclient_hosts``), as an operator configures it for mailward.
  Authenticated users may send to the local virtual domain only; messages are
  delivered by Postfix's ``virtual`` agent into one Maildir per user, where tests
  read them back.

Postfix and Dovecot start as root and drop privileges themselves (``postfix`` /
``dovecot`` / ``nobody``), so the directory is made world-traversable.

Usage::

    with PostfixSubmission.start() as pf:      # or start()/stop()
        pf.submission_port, pf.smtps_port, pf.xforward_port, pf.ca_pem, pf.users
        pf.wait_for_messages("alice@example.test", 1)
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import trustme
from helpers.serve import free_port

POSTFIX = "/usr/sbin/postfix"
DOVECOT = "/usr/sbin/dovecot"
DOMAIN = "example.test"
DEFAULT_USERS = {
    f"alice@{DOMAIN}": "alice-secret",
    f"bob@{DOMAIN}": "bob-secret",
    f"carol@{DOMAIN}": "carol-secret",
}
MESSAGE_SIZE_LIMIT = 64 * 1024 * 1024  # room for a 20 MB attachment after base64
START_TIMEOUT_S = 20.0
# Headers Postfix's submission + virtual delivery put in front of a submitted message.
# A null reverse path sent as <<>> becomes a bare word, which strict_rfc821_envelopes
# refuses with 501 5.1.7 (as Exchange refuses it).
COMMAND_FILTER = "/^(MAIL FROM:) *<<>>(.*)$/ ${1}doubled-angle-brackets${2}\n"

TRACE_HEADERS = (b"return-path", b"x-original-to", b"delivered-to", b"received")


class PeerUnavailable(RuntimeError):
    """The Postfix/Dovecot binaries are missing or we are not root."""


def missing_reason() -> str | None:
    """Why this peer cannot run here, or None."""
    for binary in (POSTFIX, DOVECOT):
        if not os.path.exists(binary):
            return f"{binary} not installed (apt-get install postfix dovecot-core)"
    if os.geteuid() != 0:
        return "the Postfix peer must be started as root"
    return None


def _wait_port(port: int, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise RuntimeError(f"port {port} did not open; log:\n{tail}")


@dataclass
class PostfixSubmission:
    root: Path
    submission_port: int
    smtps_port: int
    ca_pem: Path
    xforward_port: int = 0
    users: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_USERS))
    _dovecot: subprocess.Popen[bytes] | None = None
    _started: bool = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, users: dict[str, str] | None = None) -> PostfixSubmission:
        reason = missing_reason()
        if reason:
            raise PeerUnavailable(reason)
        root = Path(tempfile.mkdtemp(prefix="mailward-postfix-"))
        # Postfix and Dovecot children run as unprivileged users and must reach it.
        os.chmod(root, 0o755)
        peer = cls(
            root=root,
            submission_port=free_port(),
            smtps_port=free_port(),
            xforward_port=free_port(),
            ca_pem=root / "tls" / "ca.pem",
            users=dict(users or DEFAULT_USERS),
        )
        try:
            peer._write_tls()
            peer._start_dovecot()
            peer._start_postfix()
        except BaseException:
            peer.stop()
            raise
        return peer

    def stop(self) -> None:
        if self._started:
            subprocess.run(
                [POSTFIX, "-c", str(self.config_dir), "stop"],
                capture_output=True, timeout=30, check=False,
            )
            self._wait_master_gone()
            self._started = False
        if self._dovecot is not None:
            self._dovecot.send_signal(signal.SIGTERM)
            try:
                self._dovecot.wait(10)
            except subprocess.TimeoutExpired:
                self._dovecot.kill()
                self._dovecot.wait(5)
            self._dovecot = None
        if os.environ.get("MAILWARD_KEEP_PEERS") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixSubmission:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- inspection

    @property
    def config_dir(self) -> Path:
        return self.root / "postfix"

    @property
    def log_path(self) -> Path:
        return self.root / "postfix.log"

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user.split("@")[1] / user.split("@")[0]

    def messages(self, user: str) -> list[bytes]:
        """Delivered messages of ``user``, oldest first, as stored (LF line ends)."""
        new = self.maildir(user) / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def split_trace(self, stored: bytes) -> tuple[bytes, bytes]:
        """(trace headers Postfix prepended, the message as submitted, LF line ends)."""
        rest, trace = stored, b""
        while True:
            name = rest.split(b":", 1)[0].lower()
            if name not in TRACE_HEADERS:
                return trace, rest
            # A header ends at the first newline not followed by folding whitespace.
            end = 0
            while True:
                end = rest.index(b"\n", end) + 1
                if rest[end : end + 1] not in (b" ", b"\t"):
                    break
            trace, rest = trace + rest[:end], rest[end:]

    def clear_mailbox(self, user: str) -> None:
        new = self.maildir(user) / "new"
        if new.is_dir():
            for p in new.iterdir():
                p.unlink()

    def wait_for_messages(self, user: str, count: int, timeout: float = 20.0) -> list[bytes]:
        """Block until ``user`` has ``count`` messages (delivery is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(user)
            if len(msgs) >= count or time.monotonic() > deadline:
                return msgs
            time.sleep(0.05)

    def queue_is_empty(self) -> bool:
        q = self.root / "queue"
        return not any(
            any(files) for sub in ("incoming", "active", "deferred", "hold")
            for _, _, files in os.walk(q / sub)
        )

    # ---------------------------------------------------------------------- setup

    def _write_tls(self) -> None:
        tls = self.root / "tls"
        tls.mkdir()
        ca = trustme.CA(organization_name="mailward test upstream CA")
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(self.ca_pem))
        cert.private_key_and_cert_chain_pem.write_to_path(str(tls / "server.pem"))
        os.chmod(tls / "server.pem", 0o600)

    def _start_dovecot(self) -> None:
        d = self.root / "dovecot"
        (d / "run").mkdir(parents=True)
        users = d / "users"
        users.write_text(
            "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items())
        )
        os.chmod(users, 0o644)
        conf = d / "dovecot.conf"
        conf.write_text(
            f"""\
# Auth-only Dovecot for Postfix SASL; no mail protocols.
base_dir = {d}/run
state_dir = {d}/run
instance_name = mailward-postfix-auth
log_path = {d}/dovecot.log
protocols = none
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
default_login_user = dovenull
default_internal_user = dovecot
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {self.root}/auth {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
"""
        )
        self._dovecot = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=open(d / "stderr.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.root / "auth").exists():
            if self._dovecot.poll() is not None or time.monotonic() > deadline:
                err = (d / "stderr.log").read_text(errors="replace")
                log = (d / "dovecot.log").read_text(errors="replace") if (
                    d / "dovecot.log").exists() else ""
                raise RuntimeError(f"dovecot auth did not start: {err}{log}")
            time.sleep(0.05)

    def _start_postfix(self) -> None:
        cfg = self.config_dir
        cfg.mkdir()
        for sub in ("queue", "data"):
            (self.root / sub).mkdir()
        nobody = pwd.getpwnam("nobody")
        mail = self.root / "mail"
        mail.mkdir()
        os.chown(mail, nobody.pw_uid, nobody.pw_gid)
        shutil.chown(self.root / "data", "postfix")
        (cfg / "vmailbox").write_text(
            "".join(f"{u} {u.split('@')[1]}/{u.split('@')[0]}/\n" for u in self.users)
        )
        (cfg / "command_filter").write_text(COMMAND_FILTER)
        (cfg / "main.cf").write_text(self._main_cf(nobody.pw_uid, nobody.pw_gid))
        (cfg / "master.cf").write_text(self._master_cf())
        run = subprocess.run(
            [POSTFIX, "-c", str(cfg), "start"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if run.returncode != 0:
            raise RuntimeError(f"postfix start failed: {run.stdout}{run.stderr}")
        self._started = True
        deadline = time.monotonic() + START_TIMEOUT_S
        _wait_port(self.submission_port, deadline, self.log_path)
        _wait_port(self.smtps_port, deadline, self.log_path)
        _wait_port(self.xforward_port, deadline, self.log_path)

    def _main_cf(self, uid: int, gid: int) -> str:
        r = self.root
        return f"""\
compatibility_level = 3.6
config_directory = {self.config_dir}
queue_directory = {r}/queue
data_directory = {r}/data
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.log_path}
maillog_file_prefixes = {r}
syslog_name = mailward-test-postfix
myhostname = upstream.{DOMAIN}
mydomain = {DOMAIN}
myorigin = $mydomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
smtputf8_enable = yes
message_size_limit = {MESSAGE_SIZE_LIMIT}
# Deliver exactly what was submitted: no address or header rewriting for local clients.
local_header_rewrite_clients =
smtpd_peername_lookup = no
# Envelope addresses exactly as RFC 5321 writes them, as strict servers such as
# Exchange expect: no bare addresses, and (command_filter) no doubled <<>> null path,
# which Postfix alone would quietly take for <>.
strict_rfc821_envelopes = yes
smtpd_command_filter = regexp:{self.config_dir}/command_filter
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = texthash:{self.config_dir}/vmailbox
virtual_mailbox_base = {r}/mail
virtual_mailbox_limit = 0
virtual_minimum_uid = 1
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
default_transport = error:5.7.1 no delivery outside the test domain
smtpd_tls_chain_files = {r}/tls/server.pem
smtpd_tls_security_level = may
smtp_tls_security_level = none
smtpd_sasl_type = dovecot
smtpd_sasl_path = {r}/auth
smtpd_sasl_auth_enable = no
# mailward (on loopback) may tell Postfix who its client is (XCLIENT_README).
smtpd_authorized_xclient_hosts = 127.0.0.1
"""

    def _master_cf(self) -> str:
        sub = (
            " -o smtpd_sasl_auth_enable=yes -o smtpd_tls_auth_only=yes"
            " -o smtpd_client_restrictions=permit_sasl_authenticated,reject"
        )
        return f"""\
127.0.0.1:{self.submission_port} inet n - n - - smtpd
 -o syslog_name=mailward-test-postfix/submission -o smtpd_tls_security_level=encrypt{sub}
127.0.0.1:{self.smtps_port} inet n - n - - smtpd
 -o syslog_name=mailward-test-postfix/smtps -o smtpd_tls_wrappermode=yes{sub}
127.0.0.1:{self.xforward_port} inet n - n - - smtpd
 -o syslog_name=mailward-test-postfix/xforward -o smtpd_tls_security_level=encrypt{sub}
 -o smtpd_authorized_xclient_hosts= -o smtpd_authorized_xforward_hosts=127.0.0.1
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def _wait_master_gone(self) -> None:
        pid_file = self.root / "queue" / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


@contextlib.contextmanager
def running(users: dict[str, str] | None = None) -> Iterator[PostfixSubmission]:
    peer = PostfixSubmission.start(users)
    try:
        yield peer
    finally:
        peer.stop()
