"""``mailward policy diff A B``: rule by rule, not a text diff.

Rules are matched by name (``[[prohibited]]``), platform (``[[approved]]``), group
name, and who an exemption covers (users, devices, apps); each pair is compared
field by field. Top-level settings are compared one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.policy import ApprovedApps, Exemption, Policy, ProhibitedApp

SETTINGS = ("mode", "platforms", "max_posture_age_s", "require_nonce", "unknown_device",
            "stale_posture", "partial_inventory", "mdm_noncompliant", "unknown_device_text",
            "stale_posture_text", "partial_inventory_text", "mdm_noncompliant_text")


@dataclass
class Section:
    """Added, removed and changed items of one kind (changed: name -> field changes)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[tuple[str, Any, Any]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed,
                "changed": {k: [{"field": f, "old": _show(a), "new": _show(b)}
                                for f, a, b in v] for k, v in self.changed.items()}}


@dataclass
class PolicyDiff:
    old: Policy
    new: Policy
    settings: list[tuple[str, Any, Any]]
    sections: dict[str, Section]

    @property
    def identical(self) -> bool:
        return not self.settings and not any(self.sections.values())

    def to_dict(self) -> dict[str, Any]:
        return {"old": {"version": self.old.version, "sha256": self.old.sha256},
                "new": {"version": self.new.version, "sha256": self.new.sha256},
                "settings": [{"field": f, "old": _show(a), "new": _show(b)}
                             for f, a, b in self.settings],
                **{k: v.to_dict() for k, v in self.sections.items()}}

    def lines(self) -> list[str]:
        out = [f"policy {self.old.version} ({self.old.sha256[:12]}) -> "
               f"{self.new.version} ({self.new.sha256[:12]})"]
        if self.identical:
            return [*out, "no rule or setting differs"]
        if self.settings:
            out.append("settings:")
            out += [f"  ~ {f}: {_show(a)} -> {_show(b)}" for f, a, b in self.settings]
        for title, section in self.sections.items():
            if not section:
                continue
            out.append(f"{title}:")
            out += [f"  + {name}" for name in section.added]
            out += [f"  - {name}" for name in section.removed]
            for name, changes in section.changed.items():
                out.append(f"  ~ {name}")
                out += [f"      {f}: {_show(a)} -> {_show(b)}" for f, a, b in changes]
        return out


def _show(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_show(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _rule_fields(r: ProhibitedApp) -> dict[str, Any]:
    return {"ids": r.ids, "names": r.names, "platforms": r.platforms,
            "versions": r.versions.text, "enforce_from": r.enforce_from, "mode": r.mode,
            "groups": r.scope.groups, "reason": r.reason, "remediation": r.remediation}


def _exemption_key(e: Exemption) -> str:
    who = ",".join(e.users + e.devices)
    return f"{who} [{','.join(e.apps) or 'all apps'}]"


def _exemption_fields(e: Exemption) -> dict[str, Any]:
    return {"why": e.why, "until": e.until}


def _approved_fields(a: ApprovedApps) -> dict[str, Any]:
    return {"ids": a.ids, "remediation": a.remediation, "mode": a.mode,
            "groups": a.scope.groups}


def _section(old: Iterable[Any], new: Iterable[Any], key: Callable[[Any], str],
             fields_of: Callable[[Any], dict[str, Any]]) -> Section:
    a = {key(x): fields_of(x) for x in old}
    b = {key(x): fields_of(x) for x in new}
    section = Section(added=[k for k in b if k not in a], removed=[k for k in a if k not in b])
    for name in (k for k in b if k in a):
        changes = [(f, a[name][f], b[name][f]) for f in b[name] if a[name][f] != b[name][f]]
        if changes:
            section.changed[name] = changes
    return section


def diff(old: Policy, new: Policy) -> PolicyDiff:
    settings = [(f, getattr(old, f), getattr(new, f)) for f in SETTINGS
                if getattr(old, f) != getattr(new, f)]
    if old.version != new.version:
        settings.insert(0, ("version", old.version, new.version))
    sections = {
        "rules": _section(old.prohibited, new.prohibited, lambda r: r.name, _rule_fields),
        "exemptions": _section(old.exemptions, new.exemptions, _exemption_key,
                               _exemption_fields),
        "approved": _section(old.approved, new.approved, lambda a: f"approved:{a.platform}",
                             _approved_fields),
        "groups": _section(old.groups.items(), new.groups.items(), lambda g: g[0],
                           lambda g: {"members": g[1]}),
    }
    return PolicyDiff(old, new, settings, sections)
