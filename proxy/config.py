"""Configuration files -> frozen dataclasses.

``load_config`` reads ``config/mailward.toml`` (how the proxy runs) and
``load_policy`` reads ``config/policy.toml`` (what it enforces). Both reject unknown
keys, wrong types, bad durations and bad globs with one :class:`ConfigError` that
names the file, the key and its line, so ops staff can fix it at once.

Relative paths resolve against the deployment root: the parent of the ``config/``
directory that holds the file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from proxy.policy import (
    ApprovedApps,
    Exemption,
    Policy,
    ProhibitedApp,
    UserScope,
    VersionRange,
)
from proxy.posture import PLATFORMS

DEFAULT_CONFIG = Path("config/mailward.toml")
T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file is invalid. ``str()`` is one line: file:line: key: problem."""

    def __init__(self, file: Path | str, key: str, message: str, line: int | None = None):
        self.file, self.key, self.line, self.message = str(file), key, line, message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# ------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class ServerConfig:
    state_dir: Path
    policy: Path
    shutdown_grace_s: float = 10.0
    recheck_interval_s: float = 30.0


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None


@dataclass(frozen=True, slots=True)
class TrustConfig:
    device_ca: Path
    attesters: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class PostureConfig:
    store: str  # sqlite://<absolute path> or redis://...


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: Path
    signing_key: Path | None
    verify_key: Path | None
    checkpoint_every: int = 1000
    checkpoint_interval_s: float = 60.0
    rotate_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ApiConfig:
    host: str
    port: int
    tls: bool
    admin_token_file: Path | None
    max_body_bytes: int = 512 * 1024


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    protocol: Literal["imap", "smtp", "activesync"]
    host: str
    port: int
    upstream: str
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    client_cert: Literal["none", "optional", "required"] = "optional"
    unidentified: Literal["deny", "allow", "all-user-devices"] = "deny"
    upstream_tls: Literal["implicit", "starttls", "none"] = "implicit"
    upstream_ca: Path | None = None
    allow_cleartext_auth: bool = False  # only accepted on a loopback listener
    preauth_idle_timeout_s: float = 60.0
    preauth_timeout_s: float = 180.0
    max_preauth_commands: int = 50
    upstream_connect_timeout_s: float = 10.0
    upstream_timeout_s: float = 60.0
    longpoll_timeout_s: float = 3600.0

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


# ------------------------------------------------------------------ TOML reading


class _Locator:
    """Finds the line of a key path such as ``listeners[1].tls`` in TOML text."""

    _TABLE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _ARRAY = re.compile(r"^\s*\[\[\s*([^\[\]]+?)\s*\]\]\s*(#.*)?$")
    _KEY = re.compile(r"""^\s*("[^"]+"|'[^']+'|[A-Za-z0-9_-]+)\s*=""")

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        table, counts = "", dict[str, int]()
        for n, line in enumerate(text.splitlines(), 1):
            if m := self._ARRAY.match(line):
                name = m.group(1)
                idx = counts.get(name, -1) + 1
                counts[name] = idx
                table = f"{name}[{idx}]"
                self.lines.setdefault(table, n)
            elif m := self._TABLE.match(line):
                table = m.group(1)
                self.lines.setdefault(table, n)
            elif m := self._KEY.match(line):
                key = m.group(1).strip("\"'")
                self.lines.setdefault(f"{table}.{key}" if table else key, n)

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return None


class _Table:
    """Typed access to one TOML table; remembers which keys were read."""

    def __init__(self, data: dict[str, Any], prefix: str, file: Path, loc: _Locator) -> None:
        self.data, self.prefix, self.file, self.loc = data, prefix, file, loc
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ConfigError:
        p = self.path(key)
        return ConfigError(self.file, p, message, self.loc.line(p))

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is ...:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; never accept true for a number.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_type_name(k) for k in kinds)
            raise self.error(key, f"must be {names}, not {_type_name(type(value))}")
        return value

    def text(self, key: str, default: Any = ...) -> str:
        return self.get(key, str, default)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value is None and default is None:
            return None
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, list, default)
        if any(not isinstance(v, str) for v in value):
            raise self.error(key, "must be a list of strings")
        return tuple(value)

    def duration(self, key: str, default: float) -> float:
        value = self.get(key, (str, int, float), default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def positive_duration(self, key: str, default: float) -> float:
        value = self.duration(key, default)
        if value <= 0:
            raise self.error(key, "must be longer than zero")
        return value

    def positive_int(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise self.error(key, "must be a positive integer")
        return value

    def table(self, key: str) -> _Table:
        value = self.get(key, dict, {})
        return _Table(value, self.path(key), self.file, self.loc)

    def tables(self, key: str) -> list[_Table]:
        value = self.get(key, list, [])
        out = []
        for i, item in enumerate(value):
            p = f"{self.path(key)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(self.file, p, "must be a table", self.loc.line(p))
            out.append(_Table(item, p, self.file, self.loc))
        return out

    def done(self) -> None:
        for key in self.data:
            if key not in self.seen:
                raise self.error(key, "unknown key")


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list", dict: "a table", datetime: "a date-time", date: "a date"}.get(
        t, t.__name__
    )


def _read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        return tomllib.loads(text), text
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        # "at end of document" carries no line number: that is the last line.
        line = int(m.group(1)) if m else max(1, len(text.splitlines()))
        raise ConfigError(path, "", f"TOML syntax: {exc}", line) from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: str | int | float) -> float:
    """``"90s"``, ``"5m"``, ``"24h"``, ``"7d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"bad duration {value!r} (use e.g. 90s, 5m, 24h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not host:port")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def _split_upstream(upstream: str) -> tuple[str, int]:
    if "://" in upstream:
        u = urlsplit(upstream)
        return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    return split_hostport(upstream)


# ------------------------------------------------------------------ mailward.toml


def load_config(path: Path | str = DEFAULT_CONFIG) -> Config:
    path = Path(path).resolve()
    doc, text = _read_toml(path)
    loc = _Locator(text)
    root = path.parent.parent
    top = _Table(doc, "", path, loc)

    def resolve(t: _Table, key: str, default: Any = ..., *, optional: bool = False) -> Any:
        value = t.text(key, default)
        if value is None or (optional and value == ""):
            return None
        p = Path(value)
        return p if p.is_absolute() else root / p

    s = top.table("server")
    server = ServerConfig(
        state_dir=resolve(s, "state_dir", "state"),
        policy=resolve(s, "policy", "config/policy.toml"),
        shutdown_grace_s=s.duration("shutdown_grace", 10.0),
        recheck_interval_s=s.positive_duration("recheck_interval", 30.0),
    )
    s.done()

    t = top.table("tls")
    tls = TlsConfig(
        cert=resolve(t, "cert", "certs/server.pem"),
        key=resolve(t, "key", "certs/server.key"),
        client_ca=resolve(t, "client_ca", "certs/device-ca.pem", optional=True),
    )
    t.done()

    tr = top.table("trust")
    trust = TrustConfig(
        device_ca=resolve(tr, "device_ca", "certs/device-ca.pem"),
        attesters=tuple(
            Path(p) if Path(p).is_absolute() else root / p
            for p in tr.strings("attesters", ["certs/mdm-attester.pem"])
        ),
    )
    tr.done()

    ps = top.table("posture")
    store_url = ps.text("store", "sqlite:///state/posture.db")
    if store_url.startswith("sqlite:///"):
        rest = store_url.removeprefix("sqlite:///")
        db = Path(rest) if rest.startswith("/") else root / rest
        store_url = f"sqlite://{db}"
    elif store_url.startswith("redis://"):
        # DESIGN.md names a Redis store for scale-out; until it exists, say so here
        # rather than let `serve` fail later.
        raise ps.error("store", "redis:// is not available in this build; use sqlite:///")
    else:
        raise ps.error("store", "must start with sqlite:///")
    posture = PostureConfig(store=store_url)
    ps.done()

    a = top.table("audit")
    audit = AuditConfig(
        path=resolve(a, "path", "state/audit.jsonl"),
        signing_key=resolve(a, "signing_key", "certs/audit-signing.key", optional=True),
        verify_key=resolve(a, "verify_key", "certs/audit-signing.pub", optional=True),
        checkpoint_every=a.positive_int("checkpoint_every", 1000),
        checkpoint_interval_s=a.positive_duration("checkpoint_interval", 60.0),
        rotate_bytes=a.positive_int("rotate_bytes", 64 * 1024 * 1024),
    )
    a.done()

    ap = top.table("api")
    try:
        api_host, api_port = split_hostport(ap.text("listen", "127.0.0.1:8443"))
    except ValueError as exc:
        raise ap.error("listen", str(exc)) from None
    api = ApiConfig(
        host=api_host,
        port=api_port,
        tls=ap.get("tls", bool, True),
        admin_token_file=resolve(ap, "admin_token_file", "certs/admin.token", optional=True),
        max_body_bytes=ap.positive_int("max_body_bytes", 512 * 1024),
    )
    ap.done()

    listeners = tuple(_listener(lt, resolve) for lt in top.tables("listeners"))
    names = [lst.name for lst in listeners]
    for i, name in enumerate(names):
        if names.index(name) != i:
            p = f"listeners[{i}].name"
            raise ConfigError(path, p, f"duplicate listener name {name!r}", loc.line(p))
    top.done()
    return Config(path, root, server, tls, trust, posture, audit, api, listeners)


def _listener(t: _Table, resolve: Callable[..., Any]) -> ListenerConfig:
    protocol = t.choice("protocol", ("imap", "smtp", "activesync"))
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
        preauth_idle_timeout_s=t.positive_duration("preauth_idle_timeout", 60.0),
        preauth_timeout_s=t.positive_duration("preauth_timeout", 180.0),
        max_preauth_commands=t.positive_int("max_preauth_commands", 50),
        upstream_connect_timeout_s=t.positive_duration("upstream_connect_timeout", 10.0),
        upstream_timeout_s=t.positive_duration("upstream_timeout", 60.0),
        longpoll_timeout_s=t.positive_duration("longpoll_timeout", 3600.0),
    )
    t.done()
    return lst


# -------------------------------------------------------------------- policy.toml


def load_policy(path: Path | str) -> Policy:
    path = Path(path)
    doc, text = _read_toml(path)
    loc = _Locator(text)
    top = _Table(doc, "", path, loc)
    sha = hashlib.sha256(text.encode()).hexdigest()

    def scope(t: _Table) -> UserScope:
        groups = t.strings("groups", [])
        for g in groups:
            if g not in group_defs:
                raise t.error("groups", f"unknown group {g!r} (define it under [groups])")
        return UserScope(groups)

    def platforms(t: _Table, key: str, default: Any) -> tuple[str, ...]:
        values = t.strings(key, default)
        for v in values:
            if v not in PLATFORMS:
                raise t.error(key, f"unknown platform {v!r}; use {', '.join(PLATFORMS)}")
        return values

    def globs(t: _Table, key: str, default: Any = ...) -> tuple[str, ...]:
        values = t.strings(key, default)
        for v in values:
            _check_glob(t, key, v)
        return values

    modes = ("enforce", "report-only")
    handling = ("deny", "allow")
    version = top.text("version", "") or sha[:12]
    mode = top.choice("mode", modes, "enforce")
    scope_platforms = platforms(top, "platforms", ["android", "ios", "ipados"])
    max_age = top.positive_duration("max_posture_age", 24 * 3600.0)
    require_nonce = top.get("require_nonce", bool, False)
    unknown = top.choice("unknown_device", handling, "deny")
    stale = top.choice("stale_posture", handling, "deny")

    g = top.table("groups")
    group_defs: dict[str, tuple[str, ...]] = {}
    for name in list(g.data):
        members = g.strings(name)
        for m in members:
            _check_glob(g, name, m)
        group_defs[name] = tuple(m.lower() for m in members)
    g.done()

    msgs = top.table("messages")
    defaults = Policy(version="", sha256="")
    unknown_text = msgs.text("unknown_device", defaults.unknown_device_text)
    stale_text = msgs.text("stale_posture", defaults.stale_posture_text)
    msgs.done()

    rules = []
    for r in top.tables("prohibited"):
        ids = globs(r, "ids")
        if not ids:
            raise r.error("ids", "must list at least one app id")
        try:
            versions = VersionRange.parse(r.text("versions", ""))
        except ValueError as exc:
            raise r.error("versions", str(exc)) from None
        rules.append(
            ProhibitedApp(
                name=r.text("name"),
                ids=ids,
                reason=r.text("reason"),
                remediation=r.text("remediation"),
                platforms=platforms(r, "platforms", []),
                versions=versions,
                enforce_from=_when(r, "enforce_from"),
                mode=r.choice("mode", modes, None),
                scope=scope(r),
            )
        )
        r.done()

    exemptions = []
    for e in top.tables("exemptions"):
        exemptions.append(
            Exemption(
                why=e.text("why"),
                until=_when(e, "until"),
                users=tuple(u.lower() for u in globs(e, "users", [])),
                devices=e.strings("devices", []),
                apps=globs(e, "apps", []),
            )
        )
        if not (exemptions[-1].users or exemptions[-1].devices):
            raise e.error("users", "an exemption must name users or devices")
        e.done()

    approved = []
    for a in top.tables("approved"):
        platform = a.choice("platform", PLATFORMS)
        approved.append(
            ApprovedApps(
                platform=platform,
                ids=globs(a, "ids"),
                remediation=a.text("remediation"),
                mode=a.choice("mode", modes, None),
                scope=scope(a),
            )
        )
        a.done()
    top.done()
    return Policy(
        version=version,
        sha256=sha,
        mode=mode,
        platforms=scope_platforms,
        max_posture_age_s=max_age,
        require_nonce=require_nonce,
        unknown_device=unknown,
        stale_posture=stale,
        unknown_device_text=unknown_text,
        stale_posture_text=stale_text,
        groups=group_defs,
        prohibited=tuple(rules),
        exemptions=tuple(exemptions),
        approved=tuple(approved),
        source=str(path),
    )


_GLOB_OK = re.compile(r"^[A-Za-z0-9._:@*?+\-\[\]!]+$")


def _check_glob(t: _Table, key: str, value: str) -> None:
    if not value or not _GLOB_OK.match(value):
        raise t.error(key, f"bad pattern {value!r}")
    if value.count("[") != value.count("]") or "[]" in value:
        raise t.error(key, f"bad pattern {value!r}: unbalanced [ ]")


def _when(t: _Table, key: str) -> datetime | None:
    """A TOML date/datetime or an RFC 3339 string; naive values are UTC."""
    value = t.get(key, (datetime, date, str), None)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise t.error(key, f"bad date {value!r} (use 2026-12-01 or RFC 3339)") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime.combine(value, time(0, 0))
    if isinstance(value, datetime) and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def check_files(config_path: Path | str) -> tuple[Config, Policy]:
    """Load and cross-check everything ``serve`` would need (for check-config)."""
    cfg = load_config(config_path)
    policy = load_policy(cfg.server.policy)
    return cfg, policy
