"""A throw-away Dovecot IMAP server for tests and benchmarks.

``Dovecot(workdir, cert, key, users)`` writes its own config, passwd-file and Maildirs
under ``workdir`` and runs ``dovecot -F -c <conf>`` in the foreground, listening on
127.0.0.1 with implicit TLS (``port_tls``) and plain/STARTTLS (``port_plain``); with
``pop3=True`` also POP3 on ``pop3_port_tls`` (implicit TLS) and ``pop3_port_plain``
(plain/STLS; Debian package dovecot-pop3d). Mail
runs as ``nobody`` (Dovecot refuses root). 127.0.0.0/8 is in
``login_trusted_networks`` so the proxy's ``ID x-originating-ip`` is believed.

``oauth2_introspection_url`` adds the XOAUTH2 and OAUTHBEARER mechanisms with an
``oauth2`` passdb that asks that URL (RFC 7662 introspection, ``POST token=...``) whether
a token is active and for which ``username`` (Dovecot then checks it is the user the
client claimed); passwords keep the passwd-file.

When ``dovecot`` is not installed, :func:`require_dovecot` skips the test, or fails
it under CI (``CI=true``), where ``make test`` installs the peers.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

from helpers.serve import free_port

from peers import peer_missing

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
MAIL_USER = "nobody"  # Dovecot will not run mail processes as root


def require_dovecot() -> None:
    if not (os.path.exists(DOVECOT) and os.access(DOVECOT, os.X_OK)):
        peer_missing("dovecot is not installed (Debian package dovecot-imapd; `make peers`)")
    if os.geteuid() != 0:
        peer_missing("the test Dovecot must be started as root (CI runs as root)")


def make_message(i: int, size: int = 0) -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@corp.example"
    msg["To"] = "alice@corp.example"
    msg["Subject"] = f"message {i}"
    msg["Message-ID"] = f"<m{i}@corp.example>"
    body = f"Hello {i}\n" + ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


class Dovecot:
    def __init__(
        self,
        cert: Path,
        key: Path,
        users: dict[str, str],
        *,
        workdir: Path | None = None,
        performance: bool = False,
        pop3: bool = False,
        oauth2_introspection_url: str | None = None,
    ) -> None:
        # Under /tmp with 0755 so the unprivileged mail and login processes can enter it.
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="mailward-dovecot-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.cert, self.key, self.users = cert, key, users
        self.port_plain, self.port_tls = free_port(), free_port()
        self.performance = performance
        self.pop3 = pop3
        self.pop3_port_plain, self.pop3_port_tls = (free_port(), free_port()) if pop3 else (0, 0)
        self.oauth2_url = oauth2_introspection_url
        self.proc: subprocess.Popen[bytes] | None = None
        pw = pwd.getpwnam(MAIL_USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid

    # ------------------------------------------------------------------ set-up

    def maildir(self, user: str) -> Path:
        return self.dir / "mail" / user / "Maildir"

    def _write_config(self) -> Path:
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(exist_ok=True)
        # Dovecot reads the key as root at start-up; a private copy keeps modes simple.
        shutil.copy(self.cert, d / "cert.pem")
        shutil.copy(self.key, d / "key.pem")
        (d / "key.pem").chmod(0o600)
        (d / "passwd").write_text(
            "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items())
        )
        for user in self.users:
            for sub in ("cur", "new", "tmp"):
                self.maildir(user).joinpath(sub).mkdir(parents=True, exist_ok=True)
        self._chown(d / "mail")
        login = (
            "service_count = 0\n    process_min_avail = 4\n    client_limit = 10000\n"
            if self.performance
            else ""
        )
        dh = "ssl_dh = </usr/share/dovecot/dh.pem\n" if Path(
            "/usr/share/dovecot/dh.pem").exists() else ""
        conf = f"""
base_dir = {d}/run
state_dir = {d}/state
instance_name = mailward-test-{d.name}
log_path = {d}/dovecot.log
protocols = imap{" pop3" if self.pop3 else ""}
listen = 127.0.0.1
ssl = yes
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
{dh}ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login
login_trusted_networks = 127.0.0.0/8 ::1
auth_verbose = yes
first_valid_uid = 1
mail_location = maildir:{d}/mail/%u/Maildir
mail_uid = {self.uid}
mail_gid = {self.gid}
default_vsz_limit = 1G
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={self.uid} gid={self.gid} home={d}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port_plain}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.port_tls}
    ssl = yes
  }}
  {login}
}}
service imap {{
  process_limit = 20000
}}
{self._pop3_config()}default_process_limit = 20000
default_client_limit = 20000
service anvil {{
  client_limit = 40100
}}
service auth {{
  client_limit = 40100
}}
"""
        path = d / "dovecot.conf"
        path.write_text(conf + self._oauth2_config())
        return path

    def _pop3_config(self) -> str:
        if not self.pop3:
            return ""
        return f"""
pop3_uidl_format = %08Xu%08Xv
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port_plain}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.pop3_port_tls}
    ssl = yes
  }}
}}
"""
    def _oauth2_config(self) -> str:
        """Settings appended for token logins (the last ``auth_mechanisms`` wins)."""
        if not self.oauth2_url:
            return ""
        (self.dir / "oauth2.conf.ext").write_text(
            f"introspection_mode = post\nintrospection_url = {self.oauth2_url}\n"
            "force_introspection = yes\nusername_attribute = username\n"
            "active_attribute = active\nactive_value = true\n")
        return ("auth_mechanisms = plain login xoauth2 oauthbearer\n"
                "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                f"  args = {self.dir}/oauth2.conf.ext\n}}\n")

    def _chown(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            os.chown(dirpath, self.uid, self.gid)
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), self.uid, self.gid)

    def deliver(self, user: str, messages: list[bytes]) -> None:
        """Drop messages into the user's Maildir (Dovecot indexes them on access)."""
        new = self.maildir(user) / "new"
        stamp = int(time.time())
        for i, raw in enumerate(messages):
            p = new / f"{stamp}.M{i}P{os.getpid()}R{uuid.uuid4().hex[:12]}.test"
            p.write_bytes(raw)
            os.chown(p, self.uid, self.gid)

    # -------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 15.0) -> Dovecot:
        conf = self._write_config()
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.log_tail()}")
            try:
                ports = (self.port_plain, self.port_tls, self.pop3_port_plain,
                         self.pop3_port_tls) if self.pop3 else (self.port_plain, self.port_tls)
                for port in ports:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dovecot did not start: {self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        out = ""
        for name in ("stderr.log", "dovecot.log"):
            p = self.dir / name
            if p.exists():
                out += p.read_text(errors="replace")[-n:]
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
