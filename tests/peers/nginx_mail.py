"""A throw-away nginx with ``mail { }`` (IMAP, POP3 and SMTP) and ``http { }`` blocks that ask
mailward's ``[nginx]`` listener, and the Postfix port nginx's SMTP proxy needs.

:class:`NginxFront` writes ``nginx.conf`` under its own directory and runs ``nginx -p
DIR -c nginx.conf`` in the foreground (``daemon off``), loading the Debian dynamic mail
module (libnginx-mod-mail) as ``deploy/scale`` loads the stream module. Its mail servers
take implicit TLS with optional device certificates (verified against the device CA,
passed to mailward with ``auth_http_pass_client_cert on``); its http server proxies
``/Microsoft-Server-ActiveSync`` to the ActiveSync upstream after an ``auth_request`` to
mailward, passing mailward's refusal text back in ``X-Mailward-Refusal``. The text of
:data:`MAIL_CONF` and :data:`HTTP_CONF` is the configuration README "nginx" shows.

nginx's mail proxy speaks to its backends without TLS and, for SMTP, names the
authenticated user with ``XCLIENT LOGIN=``: :class:`XclientPostfix` is the Postfix peer
with one more, plain, port that believes XCLIENT from 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers.serve import free_port

from peers import peer_missing
from peers.postfix import START_TIMEOUT_S, PostfixSubmission, _wait_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"

MAIL_CONF = """\
mail {{
    server_name mail.corp.example;
    auth_http 127.0.0.1:{auth_port}/auth_http;
    auth_http_header X-Mailward-Secret "{secret}";
    auth_http_pass_client_cert on;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {device_ca};
    ssl_verify_client optional;
    server {{ listen 127.0.0.1:{imap_port} ssl; protocol imap; imap_auth plain login; }}
    server {{ listen 127.0.0.1:{pop3_port} ssl; protocol pop3; pop3_auth plain; }}
    server {{ listen 127.0.0.1:{smtp_port} ssl; protocol smtp; smtp_auth plain login;
             xclient on; }}
}}
"""

HTTP_CONF = """\
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{eas_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {device_ca};
        ssl_verify_client optional;
        location /Microsoft-Server-ActiveSync {{
            auth_request /mailward-auth;
            auth_request_set $mailward_refusal $upstream_http_x_mailward_refusal;
            add_header X-Mailward-Refusal $mailward_refusal always;
            proxy_pass {eas_upstream};
            proxy_http_version 1.1;
            proxy_read_timeout 3600s;
        }}
        location = /mailward-auth {{
            internal;
            proxy_pass http://127.0.0.1:{auth_port}/auth_request;
            proxy_method GET;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
            proxy_set_header X-Mailward-Secret "{secret}";
        }}
    }}
}}
"""

_MAIN = """\
load_module {mail_module};
daemon off;
user root;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
"""

_TEMP_PATHS = """\
    client_body_temp_path {root}/tmp-body;
    proxy_temp_path {root}/tmp-proxy;
    fastcgi_temp_path {root}/tmp-fastcgi;
    uwsgi_temp_path {root}/tmp-uwsgi;
    scgi_temp_path {root}/tmp-scgi;
"""


def require_nginx_mail() -> None:
    if not os.access(NGINX, os.X_OK):
        peer_missing("nginx is not installed (Debian package nginx; `make peers`)")
    if not os.path.exists(MAIL_MODULE):
        peer_missing("the nginx mail module is not installed (libnginx-mod-mail)")
    if os.geteuid() != 0:
        peer_missing("the test nginx must be started as root (CI runs as root)")


@dataclass
class NginxFront:
    """nginx in front of mailward: ``ports`` holds ``imap``, ``pop3``, ``smtp``, ``eas``."""

    root: Path
    values: dict[str, object]
    ports: dict[str, int] = field(default_factory=lambda: {
        "imap": free_port(), "pop3": free_port(), "smtp": free_port(), "eas": free_port()})
    proc: subprocess.Popen[bytes] | None = None

    def conf(self) -> str:
        v = {**self.values, "root": self.root, "mail_module": MAIL_MODULE,
             "imap_port": self.ports["imap"], "pop3_port": self.ports["pop3"],
             "smtp_port": self.ports["smtp"],
             "eas_port": self.ports["eas"]}
        http = HTTP_CONF.format(**v).replace("    access_log off;\n",
                                            "    access_log off;\n" + _TEMP_PATHS.format(**v))
        return _MAIN.format(**v) + MAIL_CONF.format(**v) + http

    def start(self) -> NginxFront:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "nginx.conf").write_text(self.conf())
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.root), "-e", str(self.root / "error.log"),
             "-c", str(self.root / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        for port in self.ports.values():
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("nginx exited: " + self.error_log())
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("nginx did not listen: " + self.error_log()) \
                            from None
                    time.sleep(0.05)
        return self

    def error_log(self) -> str:
        log = self.root / "error.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class XclientPostfix(PostfixSubmission):
    """The Postfix peer plus ``plain_port``: no TLS, XCLIENT from 127.0.0.1 (main.cf),
    SASL on so that ``XCLIENT LOGIN=`` counts as authenticated."""

    plain_port: int = 0

    def _master_cf(self) -> str:
        return super()._master_cf() + (
            f"127.0.0.1:{self.plain_port} inet n - n - - smtpd\n"
            " -o syslog_name=mailward-test-postfix/nginx -o smtpd_tls_security_level=none"
            " -o smtpd_sasl_auth_enable=yes\n")

    def _start_postfix(self) -> None:
        self.plain_port = free_port()
        super()._start_postfix()
        _wait_port(self.plain_port, time.monotonic() + START_TIMEOUT_S, self.log_path)


__all__ = ["HTTP_CONF", "MAIL_CONF", "NginxFront", "XclientPostfix", "require_nginx_mail"]
