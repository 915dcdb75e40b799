"""``config/mailward.toml`` (how the proxy runs) -> frozen dataclasses.

:func:`load_config` reads one table at a time (a small builder per table) and
resolves relative paths against the deployment root, the parent of the ``config/``
directory that holds the file.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit

from proxy.config.mdm import MdmConfig, read_mdm
from proxy.config.nginx import NginxConfig, read_nginx, read_nginx_upstream
from proxy.config.notify import NotifyConfig, read_notify
from proxy.config.reading import (
    ConfigError,
    Locator,
    Table,
    is_loopback,
    read_toml,
    split_hostport,
)

DEFAULT_CONFIG = Path("config/mailward.toml")
_S = TypeVar("_S")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    state_dir: Path
    policy: Path
    shutdown_grace_s: float = 10.0
    recheck_interval_s: float = 30.0
    instance: str = ""  # names this instance in checkpoints and records [host name]
    #: CIDRs whose PROXY protocol headers listeners with ``proxy_protocol`` believe.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None


@dataclass(frozen=True, slots=True)
class TrustConfig:
    device_ca: Path
    attesters: tuple[Path, ...]
    device_reports: Literal["allow", "deny"] = "allow"
    crl: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class PostureConfig:
    store: str  # sqlite://<absolute path> or redis://...
    #: Redis unreachable: decisions may use posture read at most this long ago.
    cache_max_age_s: float = 300.0
    forget_after_s: float = 90 * 86400.0  # devices not seen for this long are dropped


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: Path
    signing_key: Path | None
    verify_key: Path | None
    checkpoint_every: int = 1000
    checkpoint_interval_s: float = 60.0
    rotate_bytes: int = 64 * 1024 * 1024
    witness_url: str | None = None  # checkpoints are POSTed here


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One named admin token (``[api] tokens``): scope ``read`` may read (report,
    query, explain, device summaries); ``operate`` may also change (revoke, rollback,
    push). Records a token causes carry its name as ``actor``."""

    name: str
    scope: Literal["read", "operate"]
    file: Path


@dataclass(frozen=True, slots=True)
class ApiConfig:
    host: str
    port: int
    tls: bool
    admin_token_file: Path | None  # the token named "admin", scope operate
    max_body_bytes: int = 256 * 1024
    tokens: tuple[ApiToken, ...] = ()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]`` (DESIGN "Limits"): defaults a carrier or office NAT full of phones
    never hits. Counts are per listener unless noted; ``exempt`` CIDRs skip them all."""

    max_connections_per_ip: int = 5000  # clients without a verified device certificate
    max_handshakes: int = 512  # TLS handshakes in progress, per listener
    preauth_idle_s: float = 30.0  # listeners' preauth_idle_timeout unless they set it
    preauth_total_s: float = 120.0  # listeners' preauth_timeout unless they set it
    header_timeout_s: float = 15.0  # HTTP request head (ActiveSync, Autodiscover, API)
    auth_failures: int = 5  # failed logins per (user, client address) ...
    auth_failures_window_s: float = 900.0  # ... within this window, then:
    auth_delay_s: float = 2.0  # each further answer waits, doubling ...
    auth_delay_max_s: float = 30.0  # ... up to this
    api_rate_per_ip: float = 50.0  # API requests per second per client address ...
    api_rate_burst: int = 100  # ... with this burst (admin token, attester reports exempt)
    max_outstanding_nonces: int = 64  # per client address
    max_outstanding_nonces_total: int = 100_000
    api_max_body: int = 256 * 1024
    eas_max_body: int = 100 * 1024 * 1024  # ActiveSync bodies stream; at least upstream's
    exempt: tuple[str, ...] = ()  # CIDRs


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    protocol: Literal["imap", "smtp", "activesync", "pop3"]
    host: str
    port: int
    upstream: str
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    client_cert: Literal["none", "optional", "required"] = "optional"
    unidentified: Literal["deny", "allow", "all-user-devices"] = "deny"
    upstream_tls: Literal["implicit", "starttls", "none"] = "implicit"
    upstream_ca: Path | None = None
    allow_cleartext_auth: bool = False  # only accepted on a loopback listener
    #: Unless the listener sets them: ``[limits] preauth_idle`` and ``preauth_total``.
    preauth_idle_timeout_s: float = 30.0
    preauth_timeout_s: float = 120.0
    max_preauth_commands: int = 50
    upstream_connect_timeout_s: float = 10.0
    upstream_timeout_s: float = 60.0
    longpoll_timeout_s: float = 3600.0
    #: ActiveSync: "deny" refuses a bare DeviceId claim (no device certificate).
    eas_claims: Literal["allow", "deny"] = "allow"
    #: ActiveSync: the https://host[:port] phones reach mailward at; Autodiscover
    #: answers naming the upstream's address are rewritten to it (None: unchanged).
    public_url: str | None = None
    #: A PROXY protocol v1/v2 header precedes each connection (from trusted_proxies).
    proxy_protocol: bool = False
    #: ``IP:port`` nginx proxies this protocol to once ``[nginx]`` allowed a login.
    nginx_upstream: str | None = None

    @property
    def upstream_host(self) -> str:
        return _split_upstream(self.upstream)[0]

    @property
    def upstream_port(self) -> int:
        return _split_upstream(self.upstream)[1]

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


@dataclass(frozen=True, slots=True)
class PolicyGuardConfig:
    """``[policy_guard]``: a policy file that would newly deny more devices than
    ``max_new_denies`` (a count, or a percentage of known devices, rounded up) is
    not applied without its confirm line (:mod:`proxy.policies`)."""

    max_new_denies: str = "10%"

    def limit(self, devices: int) -> int:
        if self.max_new_denies.endswith("%"):
            return math.ceil(float(self.max_new_denies[:-1]) * devices / 100)
        return int(self.max_new_denies)


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    root: Path
    server: ServerConfig
    tls: TlsConfig
    trust: TrustConfig
    posture: PostureConfig
    audit: AuditConfig
    api: ApiConfig
    listeners: tuple[ListenerConfig, ...] = field(default_factory=tuple)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    mdm: tuple[MdmConfig, ...] = ()
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    policy_guard: PolicyGuardConfig = field(default_factory=PolicyGuardConfig)
    nginx: NginxConfig | None = None  # [nginx]: None when the table is absent


def _split_upstream(upstream: str) -> tuple[str, int]:
    if "://" in upstream:
        u = urlsplit(upstream)
        return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    return split_hostport(upstream)


def load_config(path: Path | str = DEFAULT_CONFIG) -> Config:
    """Read ``mailward.toml``; :class:`ConfigError` names file, key and line."""
    path = Path(path).resolve()
    doc, text = read_toml(path)
    loc = Locator(text)
    top = Table(doc, "", path, loc)
    resolve = _Resolver(path.parent.parent)
    server = _section(top, "server", lambda t: _server(t, resolve))
    tls = _section(top, "tls", lambda t: TlsConfig(
        cert=resolve(t, "cert", "certs/server.pem"),
        key=resolve(t, "key", "certs/server.key"),
        client_ca=resolve(t, "client_ca", "certs/device-ca.pem", optional=True),
    ))
    trust = _section(top, "trust", lambda t: TrustConfig(
        device_ca=resolve(t, "device_ca", "certs/device-ca.pem"),
        attesters=tuple(resolve.path(p)
                        for p in t.strings("attesters", ["certs/mdm-attester.pem"])),
        device_reports=t.choice("device_reports", ("allow", "deny"), "allow"),
        crl=tuple(resolve.path(p) for p in t.strings("crl", [])),
    ))
    posture = _section(top, "posture", lambda t: _posture(t, resolve.root))
    audit = _section(top, "audit", lambda t: _audit(t, resolve))
    limits = _section(top, "limits", _limits)
    api = _section(top, "api", lambda t: _api(t, resolve, limits))
    listeners = tuple(_listener(lt, resolve, limits) for lt in top.tables("listeners"))
    for lt, lst in zip(top.tables("listeners"), listeners, strict=True):
        if lst.proxy_protocol and not server.trusted_proxies:
            raise lt.error("proxy_protocol", "needs [server] trusted_proxies (the load "
                                             "balancers' addresses)")
    mdm = read_mdm(top.tables("mdm"), resolve.path)
    notify = _section(top, "notify", lambda t: read_notify(t, resolve.path))
    guard = _section(top, "policy_guard", _policy_guard)
    nginx = _section(top, "nginx", lambda t: read_nginx(t, resolve.path)) \
        if "nginx" in doc else None
    _check_nginx_upstreams(top.tables("listeners"), listeners, nginx)
    names = [lst.name for lst in listeners]
    for i, name in enumerate(names):
        if names.index(name) != i:
            p = f"listeners[{i}].name"
            raise ConfigError(path, p, f"duplicate listener name {name!r}", loc.line(p))
    top.done()
    return Config(path, resolve.root, server, tls, trust, posture, audit, api, listeners,
                  limits, mdm, notify, guard, nginx)


def _check_nginx_upstreams(tables: list[Table], listeners: tuple[ListenerConfig, ...],
                           nginx: NginxConfig | None) -> None:
    """``nginx_upstream`` needs ``[nginx]``; one listener per protocol has it."""
    seen: set[str] = set()
    for t, lst in zip(tables, listeners, strict=True):
        if lst.nginx_upstream is None:
            continue
        if nginx is None:
            raise t.error("nginx_upstream", "needs an [nginx] table")
        if lst.protocol in seen:
            raise t.error("nginx_upstream", f"only one {lst.protocol} listener may have it")
        seen.add(lst.protocol)


class _Resolver:
    """Reads a path setting; relative paths resolve against the deployment root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p

    def __call__(self, t: Table, key: str, default: Any = ..., *,
                 optional: bool = False) -> Any:
        """The path under ``key`` (``None`` when the default is ``None`` or, with
        ``optional``, when the value is empty)."""
        value = t.text(key, default)
        if value is None or (optional and value == ""):
            return None
        return self.path(value)


def _section(top: Table, key: str, build: Callable[[Table], _S]) -> _S:
    """Build one table's dataclass, then refuse keys the builder did not read."""
    table = top.table(key)
    built = build(table)
    table.done()
    return built


def _server(s: Table, resolve: _Resolver) -> ServerConfig:
    return ServerConfig(
        state_dir=resolve(s, "state_dir", "state"),
        policy=resolve(s, "policy", "config/policy.toml"),
        shutdown_grace_s=s.duration("shutdown_grace", 10.0),
        recheck_interval_s=s.positive_duration("recheck_interval", 30.0),
        instance=s.text("instance", "") or socket.gethostname(),
        trusted_proxies=_cidrs(s, "trusted_proxies"),
    )


def _policy_guard(t: Table) -> PolicyGuardConfig:
    value = t.get("max_new_denies", (int, str), "10%")
    text = str(value).strip()
    number = text[:-1] if text.endswith("%") else text
    try:
        ok = not isinstance(value, bool) and float(number) >= 0 and (
            text.endswith("%") or float(number).is_integer()) and float(number) < 1e12
    except ValueError:
        ok = False
    if not ok:
        raise t.error("max_new_denies", f"{value!r}: use a count (25) or a percentage "
                      '("10%")')
    return PolicyGuardConfig(text)


def _cidrs(t: Table, key: str) -> tuple[str, ...]:
    found = t.strings(key, [])
    for i, cidr in enumerate(found):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise t.error(key, f"entry {i + 1} ({cidr!r}) is not a CIDR") from None
    return tuple(found)


REDIS_SCHEMES = ("redis://", "rediss://", "redis+sentinel://")
#: Query parameters of a Redis URL that name files: a relative one is resolved against
#: the deployment root like every other path in mailward.toml.
REDIS_FILE_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _redis_url(url: str, root: Path) -> str:
    base, sep, query = url.partition("?")
    if not sep:
        return url
    params = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if name in REDIS_FILE_PARAMS and value and not unquote(value).startswith("/"):
            value = quote(str(root / unquote(value)), safe="/")
        params.append(f"{name}{eq}{value}")
    return f"{base}?{'&'.join(params)}"


def _posture(ps: Table, root: Path) -> PostureConfig:
    store_url = ps.text("store", "sqlite:///state/posture.db")
    forget_after = ps.positive_duration("forget_after", 90 * 86400.0)
    if store_url.startswith("sqlite:///"):
        rest = store_url.removeprefix("sqlite:///")
        db = Path(rest) if rest.startswith("/") else root / rest
        return PostureConfig(store=f"sqlite://{db}", forget_after_s=forget_after)
    if store_url.startswith(REDIS_SCHEMES):
        if store_url.startswith("redis+sentinel://"):
            from proxy.posture.redis_url import parse_sentinel_url

            try:
                parse_sentinel_url(store_url)
            except ValueError as exc:
                raise ps.error("store", str(exc)) from None
        return PostureConfig(store=_redis_url(store_url, root),
                             cache_max_age_s=ps.duration("cache_max_age", 300.0),
                             forget_after_s=forget_after)
    raise ps.error("store", "must start with sqlite:///, redis://, rediss:// or "
                            "redis+sentinel://")


def _audit(a: Table, resolve: _Resolver) -> AuditConfig:
    return AuditConfig(
        path=resolve(a, "path", "state/audit.jsonl"),
        signing_key=resolve(a, "signing_key", "certs/audit-signing.key", optional=True),
        verify_key=resolve(a, "verify_key", "certs/audit-signing.pub", optional=True),
        checkpoint_every=a.positive_int("checkpoint_every", 1000),
        checkpoint_interval_s=a.positive_duration("checkpoint_interval", 60.0),
        rotate_bytes=a.positive_int("rotate_bytes", 64 * 1024 * 1024),
        witness_url=_witness_url(a),
    )


def _witness_url(a: Table) -> str | None:
    url = a.text("witness_url", "")
    if url and urlsplit(url).scheme not in ("http", "https"):
        raise a.error("witness_url", "must be an http:// or https:// URL")
    return url or None


def _limits(t: Table) -> LimitsConfig:
    """``[limits]``: a key per :class:`LimitsConfig` field, read by the field's kind
    (see :func:`_limit`), the field's default where the key is absent."""
    exempt = t.strings("exempt", [])
    for i, cidr in enumerate(exempt):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise t.error("exempt", f"entry {i + 1} ({cidr!r}) is not a CIDR") from None
    values = {f.name: _limit(t, f.name, f.default)
              for f in fields(LimitsConfig) if f.name != "exempt"}
    return LimitsConfig(**values, exempt=exempt)


def _limit(t: Table, name: str, default: Any) -> Any:
    """One ``[limits]`` value: a field ending in ``_s`` is a duration whose key has no
    ``_s`` (``preauth_idle = "30s"``), ``*_max_body`` a byte size, a float a positive
    number (a rate), anything else a positive count."""
    if name.endswith("_s"):
        return t.positive_duration(name.removesuffix("_s"), default)
    if name.endswith("_max_body"):
        return t.size(name, default)
    if isinstance(default, float):
        return t.positive_number(name, default)
    return t.positive_int(name, default)


def _api(ap: Table, resolve: _Resolver, limits: LimitsConfig) -> ApiConfig:
    try:
        host, port = split_hostport(ap.text("listen", "127.0.0.1:8443"))
    except ValueError as exc:
        raise ap.error("listen", str(exc)) from None
    tls = ap.get("tls", bool, True)
    if not tls and not is_loopback(host):
        # Admin tokens and posture reports would cross the network in cleartext.
        raise ap.error("tls", f"false is only allowed on a loopback address, not {host}")
    return ApiConfig(
        host=host,
        port=port,
        tls=tls,
        admin_token_file=resolve(ap, "admin_token_file", "certs/admin.token", optional=True),
        # The older key still works and wins when set; else [limits] api_max_body.
        max_body_bytes=ap.positive_int("max_body_bytes", limits.api_max_body),
        tokens=_api_tokens(ap, resolve),
    )


_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def _api_tokens(ap: Table, resolve: _Resolver) -> tuple[ApiToken, ...]:
    """``tokens = [{name, scope, file}, ...]``: names unique, scope read or operate."""
    tokens: list[ApiToken] = []
    for t in ap.tables("tokens"):
        name = t.text("name")
        if not _TOKEN_NAME.fullmatch(name):
            raise t.error("name", "must be 1 to 64 letters, digits or . _ @ - (it is "
                          "recorded as the actor)")
        if any(other.name == name for other in tokens):
            raise t.error("name", f"duplicate token name {name!r}")
        tokens.append(ApiToken(name, t.choice("scope", ("read", "operate")),
                               resolve(t, "file")))
        t.done()
    return tuple(tokens)


def _public_url(t: Table, protocol: str) -> str | None:
    """``public_url``: an http(s)://host[:port] origin, ActiveSync listeners only."""
    url = t.text("public_url", "")
    if not url:
        return None
    if protocol != "activesync":
        raise t.error("public_url", "applies to activesync listeners only")
    u = urlsplit(url)
    try:
        u.port  # noqa: B018 (raises ValueError on a bad port)
        if u.scheme not in ("https", "http") or not u.hostname or u.username or \
                u.path not in ("", "/") or u.query or u.fragment:
            raise ValueError
    except ValueError:
        raise t.error("public_url", "must be an https://host[:port] URL without a path"
                      ) from None
    return url.rstrip("/")


def _listener(t: Table, resolve: _Resolver, limits: LimitsConfig) -> ListenerConfig:
    protocol = t.choice("protocol", ("imap", "smtp", "activesync", "pop3"))
    try:
        host, port = split_hostport(t.text("listen"))
    except ValueError as exc:
        raise t.error("listen", str(exc)) from None
    tls = t.choice("tls", ("implicit", "starttls", "none"), "implicit")
    if tls == "none" and not is_loopback(host):
        raise t.error("tls", '"none" is only allowed on a loopback address')
    if protocol == "activesync" and tls == "starttls":
        raise t.error("tls", "ActiveSync is HTTPS: use implicit or none")
    upstream = t.text("upstream")
    try:
        if protocol == "activesync":
            u = urlsplit(upstream)
            if u.scheme not in ("https", "http") or not u.hostname:
                raise ValueError("must be an https://host[:port] URL")
        else:
            split_hostport(upstream)
    except ValueError as exc:
        raise t.error("upstream", str(exc)) from None
    cleartext = t.get("allow_cleartext_auth", bool, False)
    if cleartext and not is_loopback(host):
        raise t.error("allow_cleartext_auth", "is only allowed on a loopback listener")
    lst = ListenerConfig(
        name=t.text("name"),
        protocol=protocol,
        host=host,
        port=port,
        upstream=upstream,
        tls=tls,
        client_cert=t.choice("client_cert", ("none", "optional", "required"), "optional"),
        unidentified=t.choice("unidentified", ("deny", "allow", "all-user-devices"), "deny"),
        upstream_tls=t.choice("upstream_tls", ("implicit", "starttls", "none"), "implicit"),
        upstream_ca=resolve(t, "upstream_ca", "", optional=True),
        allow_cleartext_auth=cleartext,
        preauth_idle_timeout_s=t.positive_duration("preauth_idle_timeout",
                                                    limits.preauth_idle_s),
        preauth_timeout_s=t.positive_duration("preauth_timeout", limits.preauth_total_s),
        max_preauth_commands=t.positive_int("max_preauth_commands", 50),
        upstream_connect_timeout_s=t.positive_duration("upstream_connect_timeout", 10.0),
        upstream_timeout_s=t.positive_duration("upstream_timeout", 60.0),
        longpoll_timeout_s=t.positive_duration("longpoll_timeout", 3600.0),
        eas_claims=t.choice("eas_claims", ("allow", "deny"), "allow"),
        public_url=_public_url(t, protocol),
        proxy_protocol=t.get("proxy_protocol", bool, False),
        nginx_upstream=read_nginx_upstream(t),
    )
    if lst.eas_claims == "deny" and protocol != "activesync":
        raise t.error("eas_claims", "applies to activesync listeners only")
    t.done()
    return lst


