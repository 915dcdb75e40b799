"""``config/policy.toml`` (what the proxy enforces) -> :class:`~proxy.policy.Policy`.

Rules, exemptions and approved-app lists are read table by table; globs, platforms,
groups and dates are checked here, so a policy that loads can be evaluated without
further validation. The policy's ``sha256`` is the digest of the file's text.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from proxy.config.reading import Locator, Table, read_toml
from proxy.policy import (
    ApprovedApps,
    Exemption,
    Policy,
    ProhibitedApp,
    UserScope,
    VersionRange,
)
from proxy.posture import PLATFORMS

MODES = ("enforce", "report-only")
HANDLING = ("deny", "allow")
PARTIAL = ("deny", "allow", "require_device_report")


def load_policy(path: Path | str) -> Policy:
    """Read ``policy.toml``; :class:`~proxy.config.ConfigError` names file, key and line."""
    path = Path(path)
    doc, text = read_toml(path)
    top = Table(doc, "", path, Locator(text))
    sha = hashlib.sha256(text.encode()).hexdigest()
    version = top.text("version", "") or sha[:12]
    mode = top.choice("mode", MODES, "enforce")
    scope_platforms = _platforms(top, "platforms", ["android", "ios", "ipados"])
    max_age = top.positive_duration("max_posture_age", 24 * 3600.0)
    require_nonce = top.get("require_nonce", bool, False)
    unknown = top.choice("unknown_device", HANDLING, "deny")
    stale = top.choice("stale_posture", HANDLING, "deny")
    partial = top.choice("partial_inventory", PARTIAL, "allow")
    mdm_noncompliant = top.choice("mdm_noncompliant", ("deny", "ignore"), "ignore")
    groups = _groups(top.table("groups"))
    msgs = top.table("messages")
    defaults = Policy(version="", sha256="")
    unknown_text = msgs.text("unknown_device", defaults.unknown_device_text)
    stale_text = msgs.text("stale_posture", defaults.stale_posture_text)
    partial_text = msgs.text("partial_inventory", defaults.partial_inventory_text)
    mdm_text = msgs.text("mdm_noncompliant", defaults.mdm_noncompliant_text)
    msgs.done()
    rules = tuple(_rule(r, groups) for r in top.tables("prohibited"))
    exemptions = tuple(_exemption(e) for e in top.tables("exemptions"))
    approved = tuple(_approved(a, groups) for a in top.tables("approved"))
    top.text("confirm", "")  # the policy guard's confirm line (proxy.policies.store)
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
        partial_inventory=partial,
        partial_inventory_text=partial_text,
        mdm_noncompliant=mdm_noncompliant,
        mdm_noncompliant_text=mdm_text,
        groups=groups,
        prohibited=rules,
        exemptions=exemptions,
        approved=approved,
        source=str(path),
    )


def _groups(g: Table) -> dict[str, tuple[str, ...]]:
    """``[groups]``: name = [lower-cased address globs]."""
    groups: dict[str, tuple[str, ...]] = {}
    for name in list(g.data):
        members = g.strings(name)
        for m in members:
            _check_glob(g, name, m)
        groups[name] = tuple(m.lower() for m in members)
    g.done()
    return groups


def _rule(r: Table, groups: dict[str, tuple[str, ...]]) -> ProhibitedApp:
    """One ``[[prohibited]]`` table."""
    ids = _globs(r, "ids", [])
    names = _names(r)
    if not ids and not names:
        raise r.error("ids", "must list at least one app id (or display name in names)")
    try:
        versions = VersionRange.parse(r.text("versions", ""))
    except ValueError as exc:
        raise r.error("versions", str(exc)) from None
    rule = ProhibitedApp(
        name=r.text("name"),
        ids=ids,
        reason=r.text("reason"),
        remediation=r.text("remediation"),
        platforms=_platforms(r, "platforms", []),
        versions=versions,
        enforce_from=_when(r, "enforce_from"),
        mode=r.choice("mode", MODES, None),
        scope=_scope(r, groups),
        names=names,
    )
    r.done()
    return rule


def _names(r: Table) -> tuple[str, ...]:
    """``names``: display-name globs (any printable text; matched case-insensitively)."""
    names = r.strings("names", [])
    for n in names:
        if not n.strip() or not n.isprintable():
            raise r.error("names", f"bad name pattern {n!r}")
        if n.count("[") != n.count("]"):
            raise r.error("names", f"bad name pattern {n!r}: unbalanced [ ]")
    return names


def _exemption(e: Table) -> Exemption:
    """One ``[[exemptions]]`` table: it must name users or devices."""
    exemption = Exemption(
        why=e.text("why"),
        until=_when(e, "until"),
        users=tuple(u.lower() for u in _globs(e, "users", [])),
        devices=e.strings("devices", []),
        apps=_globs(e, "apps", []),
    )
    if not (exemption.users or exemption.devices):
        raise e.error("users", "an exemption must name users or devices")
    e.done()
    return exemption


def _approved(a: Table, groups: dict[str, tuple[str, ...]]) -> ApprovedApps:
    """One ``[[approved]]`` table (approved-apps mode for a platform)."""
    approved = ApprovedApps(
        platform=a.choice("platform", PLATFORMS),
        ids=_globs(a, "ids"),
        remediation=a.text("remediation"),
        mode=a.choice("mode", MODES, None),
        scope=_scope(a, groups),
    )
    a.done()
    return approved


def _scope(t: Table, groups: dict[str, tuple[str, ...]]) -> UserScope:
    names = t.strings("groups", [])
    for g in names:
        if g not in groups:
            raise t.error("groups", f"unknown group {g!r} (define it under [groups])")
    return UserScope(names)


def _platforms(t: Table, key: str, default: Any) -> tuple[str, ...]:
    values = t.strings(key, default)
    for v in values:
        if v not in PLATFORMS:
            raise t.error(key, f"unknown platform {v!r}; use {', '.join(PLATFORMS)}")
    return values


def _globs(t: Table, key: str, default: Any = ...) -> tuple[str, ...]:
    values = t.strings(key, default)
    for v in values:
        _check_glob(t, key, v)
    return values


_GLOB_OK = re.compile(r"^[A-Za-z0-9._:@*?+\-\[\]!]+$")


def _check_glob(t: Table, key: str, value: str) -> None:
    if not value or not _GLOB_OK.match(value):
        raise t.error(key, f"bad pattern {value!r}")
    if value.count("[") != value.count("]") or "[]" in value:
        raise t.error(key, f"bad pattern {value!r}: unbalanced [ ]")


def _when(t: Table, key: str) -> datetime | None:
    """A TOML date/datetime or an RFC 3339 string; naive values are UTC."""
    value = t.get(key, (datetime, date, str), None)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise t.error(key, f"bad date {value!r} (use 2026-12-01 or RFC 3339)") from None
    when: datetime = value if isinstance(value, datetime) \
        else datetime.combine(value, time(0, 0))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
