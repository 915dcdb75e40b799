"""The prohibited-apps policy and its pure evaluation.

``evaluate(posture, policy, context)`` is a pure function: no I/O, no clock (the time
comes in ``context.now``), so it can be tested by tables and timed in microseconds.

Evaluation order (first match wins for the overall verdict, but every violation is
listed as a reason):

1. no posture -> ``unknown_device`` handling; posture of another user -> deny
   ``user_mismatch``; posture older than ``max_posture_age`` -> ``stale_posture``
   handling;
2. platform out of scope -> allow;
3. each installed app is looked up in the rule index (exact ids in a dict, globs
   compiled once per policy load and memoised per app id; display names likewise,
   case-insensitively, for rules with ``names``), then filtered by the rule's
   platforms, user scope, version range, exemptions and ``enforce_from``;
4. the approved-apps list of the platform, if any, flags every app not on it;
5. MDM posture only: an inventory marked ``managed-only`` (``partial_inventory``) and
   the MDM's own verdict ``noncompliant`` (``mdm_noncompliant``), as the policy says.

A violation in a rule (or policy) in report-only mode, or before its
``enforce_from``, is reported but does not deny.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from proxy.posture import Posture

Mode = Literal["enforce", "report-only"]
DeviceHandling = Literal["deny", "allow"]
PartialInventory = Literal["deny", "allow", "require_device_report"]
MdmVerdict = Literal["deny", "ignore"]

# Reason codes (stable: they appear in the audit log and in metrics).
PROHIBITED_APP = "prohibited_app"
UNAPPROVED_APP = "unapproved_app"
UNKNOWN_DEVICE = "unknown_device"
STALE_POSTURE = "stale_posture"
USER_MISMATCH = "user_mismatch"
PLATFORM_OUT_OF_SCOPE = "platform_out_of_scope"
EXEMPT = "exempt"
PARTIAL_INVENTORY = "partial_inventory"
MDM_NONCOMPLIANT = "mdm_noncompliant"

# Bound on the per-policy memo of glob matches (distinct app ids seen).
MAX_MEMOISED_APP_IDS = 200_000


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class VersionRange:
    """Comparators such as ``>=30, <36.2``; an empty range matches every version."""

    clauses: tuple[tuple[str, tuple[int | str, ...]], ...] = ()
    text: str = ""

    _OPS = ("<=", ">=", "==", "!=", "<", ">")

    @classmethod
    def parse(cls, text: str) -> VersionRange:
        clauses = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            op = next((o for o in cls._OPS if part.startswith(o)), None)
            if op is None:
                raise ValueError(f"version clause {part!r} must start with one of {cls._OPS}")
            ver = part[len(op) :].strip()
            if not ver:
                raise ValueError(f"version clause {part!r} has no version")
            clauses.append((op, version_key(ver)))
        return cls(tuple(clauses), text)

    def contains(self, version: str) -> bool:
        if not self.clauses:
            return True
        if not version:
            # An app that does not report its version is assumed to be in range:
            # a ban must not be dodged by omitting the version.
            return True
        key = version_key(version)
        for op, bound in self.clauses:
            c = _cmp(key, bound)
            ok = {
                "<": c < 0,
                "<=": c <= 0,
                ">": c > 0,
                ">=": c >= 0,
                "==": c == 0,
                "!=": c != 0,
            }[op]
            if not ok:
                return False
        return True


def version_key(version: str) -> tuple[int | str, ...]:
    """``"35.1.3"`` -> ``(35, 1, 3)``; non-numeric parts compare as strings."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\-_+ ]", version) if p)


def _cmp(a: tuple[int | str, ...], b: tuple[int | str, ...]) -> int:
    for x, y in zip(a, b, strict=False):
        if x == y:
            continue
        if isinstance(x, int) and isinstance(y, int):
            return -1 if x < y else 1
        # numbers sort before strings (35.1 > 35.beta is not meaningful, keep it total)
        xs, ys = (0, x) if isinstance(x, int) else (1, x), (0, y) if isinstance(y, int) else (1, y)
        return -1 if xs < ys else 1
    return (len(a) > len(b)) - (len(a) < len(b))


@dataclass(frozen=True, slots=True)
class UserScope:
    """Who a rule applies to: everyone, or members of named groups."""

    groups: tuple[str, ...] = ()  # empty = everyone

    def covers(self, user: str, policy: Policy) -> bool:
        return not self.groups or any(policy.in_group(user, g) for g in self.groups)


@dataclass(frozen=True, slots=True)
class ProhibitedApp:
    """A prohibited-app rule: an installed app it covers (an id in ``ids`` or a
    display-name glob in ``names``, at a version in ``versions``, on one of
    ``platforms``, for a user in ``scope``) is a violation with ``reason`` and
    ``remediation``; ``mode`` and ``enforce_from`` say whether it denies or is reported."""

    name: str
    ids: tuple[str, ...]
    reason: str
    remediation: str
    platforms: tuple[str, ...] = ()  # empty = every platform in the policy's scope
    versions: VersionRange = VersionRange()
    enforce_from: datetime | None = None
    mode: Mode | None = None  # None = the policy's mode
    scope: UserScope = UserScope()
    names: tuple[str, ...] = ()  # display-name globs, matched case-insensitively


@dataclass(frozen=True, slots=True)
class Exemption:
    why: str
    until: datetime | None = None
    users: tuple[str, ...] = ()  # lower-cased addresses or globs; empty = any user
    devices: tuple[str, ...] = ()  # device ids; empty = any device
    apps: tuple[str, ...] = ()  # rule names or app ids/globs; empty = every app

    def covers(self, user: str, device_id: str, rule_name: str, app_id: str, now: datetime) -> bool:
        if self.until is not None and now >= self.until:
            return False
        if self.users and not any(fnmatch.fnmatchcase(user, u) for u in self.users):
            return False
        if self.devices and device_id not in self.devices:
            return False
        return not self.apps or any(
            a == rule_name or fnmatch.fnmatchcase(app_id, a) for a in self.apps
        )


@dataclass(frozen=True, slots=True)
class ApprovedApps:
    """Approved-apps mode for one platform: any app not listed is a violation."""

    platform: str
    ids: tuple[str, ...]
    remediation: str
    mode: Mode | None = None
    scope: UserScope = UserScope()


@dataclass(frozen=True)
class Policy:
    version: str
    sha256: str
    mode: Mode = "enforce"
    platforms: tuple[str, ...] = ("android", "ios", "ipados")
    max_posture_age_s: float = 24 * 3600.0
    require_nonce: bool = False
    unknown_device: DeviceHandling = "deny"
    stale_posture: DeviceHandling = "deny"
    unknown_device_text: str = (
        "This device has no verified posture report. Enrol it with the device management "
        "app (or open it once so it can report), then try again."
    )
    stale_posture_text: str = (
        "This device has not reported its posture recently. Open the device management "
        "app so it can report, then try again."
    )
    partial_inventory: PartialInventory = "allow"
    partial_inventory_text: str = (
        "Company mail needs to see every app on this device, and the device management "
        "app sees only the apps it manages. Enrol the device as company-owned (or install "
        "the company's device app so it can report), then try again."
    )
    mdm_noncompliant: MdmVerdict = "ignore"
    mdm_noncompliant_text: str = (
        "The device management service reports this device as not compliant. Open the "
        "device management app (Company Portal, Self Service) to see what to fix."
    )
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prohibited: tuple[ProhibitedApp, ...] = ()
    exemptions: tuple[Exemption, ...] = ()
    approved: tuple[ApprovedApps, ...] = ()
    source: str = ""
    # Indexes built once per policy load (see __post_init__); not part of equality.
    _ids: _RuleIndex | None = field(init=False, repr=False, compare=False, default=None)
    _approved: dict[str, tuple[frozenset[str], tuple[re.Pattern[str], ...], ApprovedApps]] = (
        field(init=False, repr=False, compare=False, default_factory=dict))
    _platforms: frozenset[str] = field(init=False, repr=False, compare=False,
                                       default=frozenset())
    _names: _RuleIndex | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        approved = {
            a.platform: (
                frozenset(i for i in a.ids if not _is_glob(i)),
                tuple(re.compile(fnmatch.translate(i)) for i in a.ids if _is_glob(i)),
                a,
            )
            for a in self.approved
        }
        object.__setattr__(self, "_ids", _RuleIndex(self.prohibited))
        object.__setattr__(self, "_approved", approved)
        object.__setattr__(self, "_platforms", frozenset(self.platforms))
        if any(rule.names for rule in self.prohibited):
            object.__setattr__(self, "_names", _NameIndex(self.prohibited))

    def rules_for(self, app_id: str) -> tuple[ProhibitedApp, ...]:
        """Rules whose ids match ``app_id`` (exact first, then globs), memoised."""
        return self.rules_by_id(app_id)

    @property
    def rules_by_id(self) -> Callable[[str], tuple[ProhibitedApp, ...]]:
        """:meth:`rules_for` itself, for a loop over a device's apps: one call per app
        (the decision's hot path; ``bench/decide.py``)."""
        assert self._ids is not None  # built by __post_init__
        return self._ids.rules_for

    @property
    def has_name_rules(self) -> bool:
        return self._names is not None

    def rules_for_app(self, app_id: str, name: str) -> tuple[ProhibitedApp, ...]:
        """Rules matching the app by id or, for rules with ``names``, by display
        name (case-insensitive)."""
        by_id = self.rules_for(app_id)
        if self._names is None or not name:
            return by_id
        by_name = self._names.rules_for(name)
        if not by_name:
            return by_id
        return by_id + tuple(r for r in by_name if r not in by_id)

    def app_matters(self, platform: str, app_id: str, name: str) -> bool:
        """Could this app ever change a decision (a rule matches it, or the platform
        has an approved-apps list)? ``keep_apps = "policy"`` keeps only these."""
        return bool(self.rules_for_app(app_id, name)) or platform in self._approved

    def in_group(self, user: str, group: str) -> bool:
        return any(fnmatch.fnmatchcase(user, m) for m in self.groups.get(group, ()))

    def in_scope(self, platform: str) -> bool:
        return platform in self._platforms

    def is_approved(self, platform: str, app_id: str) -> bool | None:
        """None when the platform has no approved-apps list."""
        entry = self._approved.get(platform)
        if entry is None:
            return None
        exact, globs, _ = entry
        return app_id in exact or any(g.match(app_id) for g in globs)

    def approved_list(self, platform: str) -> ApprovedApps | None:
        entry = self._approved.get(platform)
        return entry[2] if entry else None


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


class _RuleIndex:
    """Rules by app id: exact ids in a dict, globs compiled, memoised per id up to
    :data:`MAX_MEMOISED_APP_IDS` ids (``by_name``: by display name, see
    :class:`_NameIndex`)."""

    def __init__(self, rules: Iterable[ProhibitedApp], *, by_name: bool = False) -> None:
        exact: dict[str, list[ProhibitedApp]] = {}
        self._globs: list[tuple[re.Pattern[str], ProhibitedApp]] = []
        flags = re.IGNORECASE if by_name else 0
        for rule in rules:
            for key in rule.names if by_name else rule.ids:
                if _is_glob(key):
                    self._globs.append((re.compile(fnmatch.translate(key), flags), rule))
                else:
                    exact.setdefault(key.lower() if by_name else key, []).append(rule)
        self._exact = {k: tuple(v) for k, v in exact.items()}
        self._memo: dict[str, tuple[ProhibitedApp, ...]] = {}

    def rules_for(self, text: str) -> tuple[ProhibitedApp, ...]:
        """Rules matching ``text`` (exact first, then globs), memoised. Called once per
        app of every decision: a memo hit is the whole call."""
        hit = self._memo.get(text)
        if hit is not None:
            return hit
        rules = list(self._exact.get(text, ()))
        for pattern, rule in self._globs:
            if pattern.match(text) and rule not in rules:
                rules.append(rule)
        found = tuple(rules)
        if len(self._memo) < MAX_MEMOISED_APP_IDS:
            self._memo[text] = found
        return found


class _NameIndex(_RuleIndex):
    """Rules by display name, case-insensitive (keys lower-cased, globs IGNORECASE)."""

    def __init__(self, rules: Iterable[ProhibitedApp]) -> None:
        super().__init__(rules, by_name=True)

    def rules_for(self, text: str) -> tuple[ProhibitedApp, ...]:
        return super().rules_for(text.lower())


# ----------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    text: str
    app_id: str | None = None
    app_name: str | None = None
    rule: str | None = None
    enforced: bool = True  # False: reported only (report-only mode or before enforce_from)

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"code": self.code, "text": self.text, "enforced": self.enforced}
        if self.app_id is not None:
            d["app_id"] = self.app_id
        if self.app_name is not None:
            d["app_name"] = self.app_name
        if self.rule is not None:
            d["rule"] = self.rule
        return d


@dataclass(frozen=True, slots=True)
class Context:
    now: datetime  # aware, UTC
    user: str  # the login user (lower-cased by the caller)
    device_id: str
    protocol: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    reasons: tuple[Reason, ...]
    policy_version: str
    policy_sha256: str
    report_only: bool = False  # True when violations were found but only reported
    temporary: bool = False  # deny because something is unavailable (retry later)

    @classmethod
    def deny(cls, policy: Policy, reason: Reason, *, temporary: bool = False) -> Decision:
        """A deny for one reason decided outside :func:`evaluate` (protocol grounds,
        an unidentified device, something unavailable), stamped with ``policy``."""
        return cls(False, (reason,), policy.version, policy.sha256, temporary=temporary)

    @classmethod
    def allowed(cls, policy: Policy) -> Decision:
        """An allow with no reasons, stamped with ``policy``."""
        return cls(True, (), policy.version, policy.sha256)

    @property
    def decision(self) -> str:
        return "allow" if self.allow else "deny"

    @property
    def mode(self) -> Mode:
        return "report-only" if self.report_only else "enforce"

    @property
    def enforced_reasons(self) -> tuple[Reason, ...]:
        return tuple(r for r in self.reasons if r.enforced)

    def user_text(self) -> str:
        """The text shown to the user on a refusal: what is wrong and what to do."""
        texts = list(dict.fromkeys(r.text for r in self.enforced_reasons))
        return " ".join(texts) if texts else "Access denied by the mail access policy."


# ----------------------------------------------------------------------- evaluate


def evaluate(posture: Posture | None, policy: Policy, context: Context) -> Decision:
    """Decide whether a device with this posture may reach mail. Pure."""
    reasons = _violations(posture, policy, context)
    enforced = any(r.enforced for r in reasons)
    reported = any(not r.enforced for r in reasons)
    return Decision(
        allow=not enforced,
        reasons=tuple(reasons),
        policy_version=policy.version,
        policy_sha256=policy.sha256,
        report_only=reported and not enforced,
    )


def evaluate_authorities(postures: Sequence[Posture], policy: Policy,
                         context: Context) -> tuple[Decision, Posture | None]:
    """Decide from a device's posture per authority (DESIGN "Posture authority"), and
    return the posture in force. Pure.

    Without MDM posture this is :func:`evaluate` of the device's own report. With
    it, the newest MDM posture decides, fresh or stale (stale: the policy's
    ``stale_posture``; the device's word never takes over), and the device's own
    report can only *add* violations (its prohibited apps, a user mismatch), never
    remove one."""
    if len(postures) == 1:  # one authority: nothing to combine
        only = postures[0]
        return evaluate(only, policy, context), only
    mdm = device = None
    for p in postures:
        if p.is_mdm:
            if mdm is None or p.iat > mdm.iat:
                mdm = p
        elif device is None or p.iat > device.iat:
            device = p
    if mdm is None:
        return evaluate(device, policy, context), device
    decision = evaluate(mdm, policy, context)
    if device is None:
        return decision, mdm
    reasons = decision.reasons
    if _fills_in(mdm, device, policy, context):
        reasons = tuple(r for r in reasons if r.code != PARTIAL_INVENTORY)
    extra = [r for r in _violations(device, policy, context)
             if r.code not in (STALE_POSTURE, UNKNOWN_DEVICE) and r not in reasons]
    if not extra and reasons is decision.reasons:
        return decision, mdm
    reasons = reasons + tuple(extra)
    enforced = any(r.enforced for r in reasons)
    return Decision(not enforced, reasons, policy.version, policy.sha256,
                    report_only=not enforced and any(not r.enforced for r in reasons)), mdm


def _fills_in(mdm: Posture, device: Posture, policy: Policy, ctx: Context) -> bool:
    """``partial_inventory = "require_device_report"``: a fresh report of the device's
    own, for the same user, completes a ``managed-only`` MDM inventory."""
    return (policy.partial_inventory == "require_device_report"
            and mdm.inventory == "managed-only" and device.user == ctx.user
            and ctx.now.timestamp() - device.iat <= policy.max_posture_age_s)


def _violations(posture: Posture | None, policy: Policy, ctx: Context) -> list[Reason]:
    global_enforce = policy.mode == "enforce"
    if posture is None:
        return [
            Reason(
                UNKNOWN_DEVICE,
                policy.unknown_device_text,
                enforced=policy.unknown_device == "deny" and global_enforce,
            )
        ]
    if posture.user != ctx.user:
        # Never report the other user's address back: the text is shown to the client.
        return [
            Reason(
                USER_MISMATCH,
                "This device is registered to a different mailbox. Use the device "
                "enrolled for your account, or enrol this one.",
            )
        ]
    age = ctx.now.timestamp() - posture.iat
    if age > policy.max_posture_age_s:
        return [
            Reason(
                STALE_POSTURE,
                policy.stale_posture_text,
                enforced=policy.stale_posture == "deny" and global_enforce,
            )
        ]
    if not policy.in_scope(posture.platform):
        return []
    reasons = _prohibited(posture, policy, ctx) + _unapproved(posture, policy, ctx)
    if posture.is_mdm:
        reasons += _mdm_verdicts(posture, policy)
    return reasons


def _mdm_verdicts(posture: Posture, policy: Policy) -> list[Reason]:
    """Step 5: what the MDM's posture itself says (partial inventory, its own
    compliance verdict), as far as the policy cares."""
    enforce = policy.mode == "enforce"
    reasons = []
    if posture.inventory == "managed-only" and policy.partial_inventory != "allow":
        reasons.append(Reason(PARTIAL_INVENTORY, policy.partial_inventory_text,
                              enforced=enforce))
    if policy.mdm_noncompliant == "deny" and posture.mdm_compliance == "noncompliant":
        reasons.append(Reason(MDM_NONCOMPLIANT, policy.mdm_noncompliant_text,
                              enforced=enforce))
    return reasons


def _prohibited(posture: Posture, policy: Policy, ctx: Context) -> list[Reason]:
    """Step 3: installed apps that a prohibited-app rule covers."""
    reasons: list[Reason] = []
    by_name = policy.has_name_rules  # else one lookup per app, as before names existed
    rules_by_id = policy.rules_by_id
    for app in posture.apps:
        found = policy.rules_for_app(app.id, app.name) if by_name and app.name \
            else rules_by_id(app.id)
        for rule in found:
            if rule.platforms and posture.platform not in rule.platforms:
                continue
            if not rule.scope.covers(ctx.user, policy):
                continue
            if not rule.versions.contains(app.version):
                continue
            if _exempt(policy.exemptions, ctx, rule.name, app.id):
                continue
            active = rule.enforce_from is None or ctx.now >= rule.enforce_from
            mode = rule.mode or policy.mode
            text = f"{rule.name} is installed on this device. {rule.remediation}".strip()
            if not active and rule.enforce_from is not None:
                text += f" Mail access will be blocked from {rule.enforce_from:%Y-%m-%d}."
            reasons.append(
                Reason(
                    PROHIBITED_APP,
                    text,
                    app_id=app.id,
                    app_name=app.name or rule.name,
                    rule=rule.name,
                    enforced=active and mode == "enforce",
                )
            )
    return reasons


def _unapproved(posture: Posture, policy: Policy, ctx: Context) -> list[Reason]:
    """Step 4: with an approved-apps list for the platform, every app not on it."""
    reasons: list[Reason] = []
    approved = policy.approved_list(posture.platform)
    if approved is not None and approved.scope.covers(ctx.user, policy):
        mode = approved.mode or policy.mode
        for app in posture.apps:
            if policy.is_approved(posture.platform, app.id):
                continue
            if _exempt(policy.exemptions, ctx, f"approved:{posture.platform}", app.id):
                continue
            label = app.name or app.id
            reasons.append(
                Reason(
                    UNAPPROVED_APP,
                    f"{label} is not an approved app on {posture.platform}. "
                    f"{approved.remediation}".strip(),
                    app_id=app.id,
                    app_name=app.name or None,
                    rule=f"approved:{posture.platform}",
                    enforced=mode == "enforce",
                )
            )
    return reasons


def _exempt(exemptions: Iterable[Exemption], ctx: Context, rule: str, app_id: str) -> bool:
    now = ctx.now
    return any(e.covers(ctx.user, ctx.device_id, rule, app_id, now) for e in exemptions)
