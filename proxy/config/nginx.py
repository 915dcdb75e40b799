"""``[nginx]`` of ``mailward.toml``: the listener nginx asks (DESIGN "Scale-out and nginx
integration").

nginx's mail module asks ``auth_http`` over plain HTTP, and its ``http`` module's
``auth_request`` asks a plain-HTTP location too, so this listener is loopback only:
a non-loopback ``listen`` is a configuration error. Requests must carry the shared
secret in ``auth_http_header``; the secret itself is never in this file:
``secret_file`` names the file holding it (read at start-up, like ``[[mdm]]
secret_file``). Each ``[[listeners]]`` table nginx stands in front of names the plain
address nginx proxies that protocol to (``nginx_upstream``, an IP literal and port:
nginx's ``Auth-Server`` must be an address, not a name); at most one listener per
protocol.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.config.reading import Table, is_loopback, split_hostport

#: An HTTP header name (RFC 9110 token), as nginx's ``auth_http_header`` sends it.
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")


@dataclass(frozen=True, slots=True)
class NginxConfig:
    """``[nginx]``: where nginx asks mailward, and the secret header it must send."""

    host: str = "127.0.0.1"
    port: int = 9090
    auth_http_header: str = "X-Mailward-Secret"
    secret_file: Path = Path("certs/nginx.secret")


def read_nginx(t: Table, resolve_path: Callable[[str], Path]) -> NginxConfig:
    """The ``[nginx]`` table (call only when the table is present)."""
    d = NginxConfig()
    try:
        host, port = split_hostport(t.text("listen", f"{d.host}:{d.port}"))
    except ValueError as exc:
        raise t.error("listen", str(exc)) from None
    if not is_loopback(host):
        raise t.error("listen", f"must be a loopback address (nginx asks over plain "
                                f"HTTP), not {host}")
    header = t.text("auth_http_header", d.auth_http_header)
    if not _HEADER_NAME.fullmatch(header):
        raise t.error("auth_http_header", f"{header!r} is not an HTTP header name")
    return NginxConfig(host, port, header,
                       resolve_path(t.text("secret_file", str(d.secret_file))))


def read_nginx_upstream(t: Table) -> str | None:
    """A listener's ``nginx_upstream``: ``IP:port`` (None when unset)."""
    value = t.text("nginx_upstream", "")
    if not value:
        return None
    try:
        host, port = split_hostport(value)
        ipaddress.ip_address(host)
        if port == 0:
            raise ValueError
    except ValueError:
        raise t.error("nginx_upstream", f"{value!r}: use IP:port (nginx's Auth-Server "
                                        "must be an address)") from None
    return value


__all__ = ["NginxConfig", "read_nginx", "read_nginx_upstream"]
