"""``[[mdm]]`` tables of ``mailward.toml``: the MDM connectors (DESIGN "MDM connectors").

Each table names one connector; ``kind`` picks the vendor and which other keys it
needs (Intune: ``tenant`` and ``client_id``; Jamf Pro: ``base_url`` and
``client_id``; Google Workspace: ``subject``, the administrator the service account
acts for). Secrets are never in this file: ``secret_file`` names the file holding
the client secret (Intune, Jamf) or the service-account JSON key (Google). Vendor
endpoints have defaults; ``base_url`` and ``token_url`` point elsewhere (a national
cloud, a test fake), plain ``http://`` only on a loopback address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from proxy.config.reading import ConfigError, Table, is_loopback

MdmKind = Literal["intune", "jamf", "google"]
KINDS: tuple[MdmKind, ...] = ("intune", "jamf", "google")
DEVICE_IDS = ("easDeviceId", "serial", "udid", "mdm_id")

#: Vendor endpoints used when ``base_url`` / ``token_url`` are not set.
DEFAULT_BASE_URL = {
    "intune": "https://graph.microsoft.com/v1.0",
    "jamf": "",
    "google": "https://admin.googleapis.com",
}
DEFAULT_DEVICE_ID = {"intune": "easDeviceId", "jamf": "udid", "google": "easDeviceId"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True, slots=True)
class MdmConfig:
    """One ``[[mdm]]`` table. ``source`` (``mdm:<name>``) names its posture."""

    name: str
    kind: MdmKind
    secret_file: Path
    client_id: str = ""
    tenant: str = ""  # intune: the tenant (domain or id)
    customer: str = "my_customer"  # google: the Workspace customer
    subject: str = ""  # google: the administrator the service account acts for
    base_url: str = ""
    token_url: str = ""  # empty: the vendor's (Google: the key file's token_uri)
    device_id: str = "easDeviceId"
    interval_s: float = 120.0
    full_interval_s: float = 3600.0
    keep_apps: Literal["all", "policy"] = "all"
    timeout_s: float = 30.0
    page_size: int = 0  # 0: the vendor's usual page
    concurrency: int = 8  # requests in flight for per-device app lists

    @property
    def source(self) -> str:
        return f"mdm:{self.name}"


def read_mdm(tables: list[Table], resolve_path: Any) -> tuple[MdmConfig, ...]:
    """Every ``[[mdm]]`` table; ``resolve_path(str) -> Path`` resolves relative
    paths against the deployment root."""
    out = tuple(_one(t, resolve_path) for t in tables)
    seen: set[str] = set()
    for t, m in zip(tables, out, strict=True):
        if m.name in seen:
            raise t.error("name", f"duplicate mdm name {m.name!r}")
        seen.add(m.name)
    return out


def _one(t: Table, resolve_path: Any) -> MdmConfig:
    name = t.text("name")
    if not _NAME.match(name):
        raise t.error("name", "use 1-32 of a-z, 0-9, _ and - (it is recorded as mdm:<name>)")
    kind: MdmKind = t.choice("kind", KINDS)
    cfg = MdmConfig(
        name=name,
        kind=kind,
        secret_file=resolve_path(t.text("secret_file")),
        client_id=t.text("client_id", ""),
        tenant=t.text("tenant", ""),
        customer=t.text("customer", "my_customer"),
        subject=t.text("subject", ""),
        base_url=_url(t, "base_url", DEFAULT_BASE_URL[kind]).rstrip("/"),
        token_url=_url(t, "token_url", ""),
        device_id=t.choice("device_id", DEVICE_IDS, DEFAULT_DEVICE_ID[kind]),
        interval_s=t.positive_duration("interval", 120.0),
        full_interval_s=t.positive_duration("full_interval", 3600.0),
        keep_apps=t.choice("keep_apps", ("all", "policy"), "all"),
        timeout_s=t.positive_duration("timeout", 30.0),
        page_size=_page_size(t),
        concurrency=t.positive_int("concurrency", 8),
    )
    _check_kind(t, cfg)
    t.done()
    return cfg


def _check_kind(t: Table, cfg: MdmConfig) -> None:
    required = {"intune": ("tenant", "client_id"), "jamf": ("base_url", "client_id"),
                "google": ("subject",)}[cfg.kind]
    for key in required:
        if not getattr(cfg, key):
            raise t.error(key, f"is required for kind = {cfg.kind!r}")
    only = {"tenant": "intune", "customer": "google", "subject": "google"}
    for key, kind in only.items():
        if key in t.data and cfg.kind != kind:
            raise t.error(key, f"applies to kind = {kind!r} only")
    if cfg.full_interval_s < cfg.interval_s:
        raise t.error("full_interval", "must not be shorter than interval")


def _page_size(t: Table) -> int:
    value: int = t.get("page_size", int, 0)
    if not 0 <= value <= 1000:
        raise t.error("page_size", "must be between 1 and 1000 (0: the vendor's default)")
    return value


def _url(t: Table, key: str, default: str) -> str:
    url = t.text(key, default)
    if not url:
        return url
    parts = urlsplit(url)
    if parts.scheme == "http" and is_loopback(parts.hostname or ""):
        return url
    if parts.scheme != "https" or not parts.hostname:
        raise t.error(key, "must be an https:// URL (http:// only on a loopback address)")
    return url


__all__ = ["DEVICE_IDS", "KINDS", "ConfigError", "MdmConfig", "MdmKind", "read_mdm"]
