"""Impact preview: who a candidate policy would newly deny or newly allow.

:func:`load_devices` reads every known device's posture (per authority) from the
posture store: SQLite through a read-only connection (:func:`read_devices`), Redis
page by page (:func:`read_redis_devices`); :func:`replay_keys` reads the
distinct (user, device, protocol) of the audit log's ``decision`` records since a
time. :func:`compare` judges each device (and each replayed key) on its *current*
posture under the policy in force and under the candidate, with the pure
:func:`~proxy.policy.evaluate_authorities` the gate uses, and sorts the results into
newly denied, newly allowed and unchanged. A revoked device is denied whatever the
policy says, so it is always unchanged. :func:`guard` applies ``[policy_guard]``.

Nothing here writes: the ``policy_preview`` audit record is written by the caller
(CLI or API), with counts only.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from proxy.policy import (
    MAX_MEMOISED_APP_IDS,
    Context,
    Decision,
    Policy,
    evaluate_authorities,
)
from proxy.posture import App, Posture, device_key, in_force

NO_GROUP = "(no group)"


@dataclass(frozen=True, slots=True)
class Devices:
    """Every known device's postures (keys are lower-cased device ids), the revoked
    devices and the alias map."""

    postures: dict[str, list[Posture]]
    revoked: frozenset[str] = frozenset()
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, device_id: str) -> str:
        key = device_key(device_id)
        return self.aliases.get(key, key)


def store_path(store_url: str) -> Path:
    """The SQLite file of a ``sqlite://`` store URL (ValueError for other stores)."""
    if not store_url.startswith("sqlite://"):
        raise ValueError(f"not a sqlite posture store: {store_url}")
    return Path(store_url.removeprefix("sqlite://"))


def load_devices(store_url: str, keep: Callable[[str, str, str], bool] | None = None
                 ) -> Devices:
    """Every known device of the posture store at ``store_url`` (SQLite: a read-only
    connection; Redis: :func:`read_redis_devices` on a connection of its own). Call it
    outside a running event loop (the server uses a worker thread)."""
    if store_url.startswith("sqlite://"):
        return read_devices(store_path(store_url), keep)
    import asyncio

    from proxy.posture import open_store

    return asyncio.run(read_redis_devices(open_store(store_url), keep))


#: Devices per Redis round trip when reading every device (a short script each, so
#: the decisions of a live fleet are not held up behind one long one).
REDIS_PAGE = 1000


async def read_redis_devices(store: Any, keep: Callable[[str, str, str], bool] | None = None
                             ) -> Devices:
    """Every device of a Redis posture store (which this closes), page by page
    (:meth:`~proxy.posture.redis.RedisPostureStore.posture_pages`), with the revoked
    devices and aliases."""
    postures: dict[str, list[Posture]] = {}
    try:
        with _no_gc():
            async for page in store.posture_pages(REDIS_PAGE):
                for device, docs in page:  # a device SSCAN returns twice is read twice
                    postures[device] = [_posture(d, keep) for d in docs]
        trust = await store.trust_records()
    finally:
        await store.close()
    return Devices(postures, frozenset(trust.revoked), dict(trust.aliases))


def relevant_to(*policies: Policy | None) -> Callable[[str, str, str], bool]:
    """An app filter for :func:`read_devices`: apps no rule of these policies matches
    (and no approved-apps list sees) cannot change either verdict, so they are not
    loaded (building ~40 ``App`` objects per device dominated the preview's time)."""
    kept = [p for p in policies if p is not None]
    memo: dict[tuple[str, str, str], bool] = {}

    def keep(platform: str, app_id: str, name: str) -> bool:
        key = (platform, app_id, name)
        hit = memo.get(key)
        if hit is None:
            hit = any(p.app_matters(platform, app_id, name) for p in kept)
            if len(memo) < MAX_MEMOISED_APP_IDS:
                memo[key] = hit
        return hit

    return keep


def read_devices(path: Path, keep: Callable[[str, str, str], bool] | None = None) -> Devices:
    """Every device in the store (read-only; a store not created yet has none), with
    only the apps ``keep(platform, id, name)`` accepts (default: all)."""
    if not path.exists():
        return Devices({})
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
    try:
        postures: dict[str, list[Posture]] = {}
        with _no_gc():
            for device, text in conn.execute("SELECT device, json FROM posture"):
                postures.setdefault(device, []).append(
                    Posture.from_json(text) if keep is None else _decode(text, keep))
        revoked = frozenset(r[0] for r in conn.execute("SELECT device FROM revoked"))
        aliases = {a: d for a, d in conn.execute("SELECT alias, device FROM alias")}
    finally:
        conn.close()
    return Devices(postures, revoked, aliases)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic garbage collection while reading every device: the documents are
    short-lived and acyclic, and full collections over the growing device map cost
    more than the read itself (bench/preview.py on Redis: 32 s -> 13 s wall). The
    switch is process-wide: in the server (a worker thread) the event loop also runs
    without cyclic collection for those seconds; reference counting still frees."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _decode(text: str, keep: Callable[[str, str, str], bool]) -> Posture:
    """:meth:`Posture.from_json` keeping only the apps ``keep`` accepts."""
    return _posture(json.loads(text), keep)


def _posture(d: dict[str, Any], keep: Callable[[str, str, str], bool] | None) -> Posture:
    """A posture from its decoded JSON, with only the apps ``keep`` accepts (all when
    None)."""
    platform = d["platform"]
    d["apps"] = tuple(App(a["id"], a.get("version", ""), a.get("name", ""))
                      for a in d["apps"]
                      if keep is None or keep(platform, a["id"], a.get("name", "")))
    return Posture(**d)


def replay_keys(records: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Distinct (user, device id, protocol) of ``decision`` records that named a device
    (unidentified sessions are decided by listener settings, not by the policy)."""
    keys = set()
    for r in records:
        if r.get("event") == "decision" and r.get("device_id") and r.get("user"):
            keys.add((str(r["user"]).lower(), str(r["device_id"]), str(r.get("protocol", ""))))
    return keys


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True, slots=True)
class Change:
    """One device (or replayed user/device/protocol) whose verdict changes."""

    device: str
    user: str
    platform: str
    protocol: str
    rules: tuple[str, ...]  # what denies it (newly denied) or denied it (newly allowed)
    groups: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "user": self.user, "platform": self.platform,
                "protocol": self.protocol, "rules": list(self.rules),
                "groups": list(self.groups)}


@dataclass
class Outcome:
    """Counts and lists for one population (devices, or replayed keys)."""

    total: int = 0
    unchanged: int = 0
    newly_denied: list[Change] = field(default_factory=list)
    newly_allowed: list[Change] = field(default_factory=list)

    def by_rule(self) -> dict[str, int]:
        return dict(Counter(r for c in self.newly_denied for r in c.rules).most_common())

    def by_group(self) -> dict[str, int]:
        return dict(Counter(g for c in self.newly_denied for g in c.groups).most_common())

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "newly_denied": len(self.newly_denied),
                "newly_allowed": len(self.newly_allowed), "unchanged": self.unchanged}

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts(), "by_rule": self.by_rule(), "by_group": self.by_group(),
                "newly_denied_list": [c.to_dict() for c in self.newly_denied],
                "newly_allowed_list": [c.to_dict() for c in self.newly_allowed]}


def _rules(decision: Decision) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.rule or r.code for r in decision.enforced_reasons))


def _groups(policy: Policy, user: str) -> tuple[str, ...]:
    found = tuple(g for g in policy.groups if policy.in_group(user, g))
    return found or (NO_GROUP,)


def enforced_at(policy: Policy, now: datetime) -> datetime:
    """When every rule of ``policy`` is in force: the latest ``enforce_from`` still
    ahead of ``now``, else ``now``."""
    dates = [r.enforce_from for r in policy.prohibited if r.enforce_from is not None]
    return max([now, *dates])


class _Judge:
    """Both verdicts for one posture list; the candidate's groups for the lists."""

    def __init__(self, baseline: Policy | None, candidate: Policy, now: datetime) -> None:
        self.baseline, self.candidate, self.now = baseline, candidate, now
        # The candidate is judged as it will be once every enforce_from it names has
        # passed: a ban announced for next week would otherwise preview as "nobody
        # newly denied" although it will cut those devices off on that date.
        self.enforced_at = enforced_at(candidate, now)

    def add(self, out: Outcome, postures: list[Posture], user: str, device: str,
            protocol: str, revoked: bool) -> None:
        out.total += 1
        if revoked:
            out.unchanged += 1
            return
        ctx = Context(now=self.now, user=user, device_id=device, protocol=protocol)
        later = ctx if self.enforced_at == self.now else Context(
            now=self.enforced_at, user=user, device_id=device, protocol=protocol)
        new, _ = evaluate_authorities(postures, self.candidate, later)
        if self.baseline is None:
            old_allow, old = True, None
        else:
            old, _ = evaluate_authorities(postures, self.baseline, ctx)
            old_allow = old.allow
        if new.allow == old_allow:
            out.unchanged += 1
            return
        platform = postures[0].platform if postures else ""
        if not new.allow:
            out.newly_denied.append(Change(device, user, platform, protocol, _rules(new),
                                           _groups(self.candidate, user)))
        else:
            assert old is not None
            out.newly_allowed.append(Change(device, user, platform, protocol, _rules(old),
                                            _groups(self.candidate, user)))


def compare_devices(devices: Devices, baseline: Policy | None, candidate: Policy,
                    now: datetime) -> Outcome:
    """Every known device, judged for the user its posture names (the lists in device
    order, whichever order the store gave them in)."""
    judge, out = _Judge(baseline, candidate, now), Outcome()
    for device, postures in devices.postures.items():
        speaking = in_force(postures)
        user = speaking.user if speaking is not None else ""
        judge.add(out, postures, user, device, "", device in devices.revoked)
    out.newly_denied.sort(key=lambda c: c.device)
    out.newly_allowed.sort(key=lambda c: c.device)
    return out


def compare_replay(keys: Iterable[tuple[str, str, str]], devices: Devices,
                   baseline: Policy | None, candidate: Policy, now: datetime) -> Outcome:
    """Every (user, device, protocol) seen, judged on the device's current posture."""
    judge, out = _Judge(baseline, candidate, now), Outcome()
    for user, device_id, protocol in sorted(keys):
        key = devices.resolve(device_id)
        judge.add(out, devices.postures.get(key, []), user, device_id, protocol,
                  key in devices.revoked)
    return out


# ------------------------------------------------------------------ guard


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    """What ``[policy_guard]`` says about a candidate."""

    setting: str  # "10%" or "25"
    limit: int  # newly denied devices allowed without the confirm line
    newly_denied: int
    confirmed: bool
    confirm: str  # the line to add

    @property
    def exceeds(self) -> bool:
        return self.newly_denied > self.limit

    @property
    def blocks(self) -> bool:
        return self.exceeds and not self.confirmed

    def reason(self) -> str:
        return (f"policy guard: it would newly deny {self.newly_denied} devices, more than "
                f"max_new_denies = {self.setting} ({self.limit}); preview it with "
                f"`mailward policy preview`, then add the line {self.confirm} to apply it")

    def to_dict(self) -> dict[str, Any]:
        return {"max_new_denies": self.setting, "limit": self.limit,
                "newly_denied": self.newly_denied, "exceeds": self.exceeds,
                "confirmed": self.confirmed, "blocks": self.blocks, "confirm": self.confirm}


@dataclass
class Preview:
    """The whole answer of ``mailward policy preview`` / ``POST /v1/policy/preview``."""

    candidate: Policy
    baseline: Policy | None
    devices: Outcome
    replay: Outcome | None
    guard: GuardVerdict | None
    replay_since: str | None = None
    #: When the candidate was judged as in force (its latest enforce_from, or now).
    judged_as_of: str | None = None

    @property
    def newly_denied(self) -> bool:
        return bool(self.devices.newly_denied or (self.replay and self.replay.newly_denied))

    def to_dict(self) -> dict[str, Any]:
        base = self.baseline
        return {
            "candidate": {"version": self.candidate.version, "sha256": self.candidate.sha256,
                          "source": self.candidate.source,
                          "judged_as_of": self.judged_as_of},
            "in_force": None if base is None else {"version": base.version,
                                                   "sha256": base.sha256},
            "devices": self.devices.to_dict(),
            "replay": None if self.replay is None else
            {"since": self.replay_since, **self.replay.to_dict()},
            "guard": None if self.guard is None else self.guard.to_dict(),
        }

    def record(self) -> dict[str, Any]:
        """The ``policy_preview`` audit record's fields: counts, never lists."""
        base = self.baseline
        fields: dict[str, Any] = {
            "event": "policy_preview",
            "candidate_version": self.candidate.version,
            "candidate_sha256": self.candidate.sha256,
            "in_force_version": None if base is None else base.version,
            "in_force_sha256": None if base is None else base.sha256,
            "devices": self.devices.counts(),
        }
        if self.replay is not None:
            fields["replay"] = {"since": self.replay_since, **self.replay.counts()}
        if self.guard is not None:
            fields["guard_exceeded"] = self.guard.exceeds
        return fields


def guard(setting: str, limit: int, outcome: Outcome, data: bytes) -> GuardVerdict:
    from proxy.policies.store import confirm_line, is_confirmed

    return GuardVerdict(setting, limit, len(outcome.newly_denied), is_confirmed(data),
                        confirm_line(data))


def iter_rows(preview: Preview) -> Iterator[dict[str, str]]:
    """Flat rows for CSV: one per changed device or replayed key."""
    parts = [("devices", preview.devices)]
    if preview.replay is not None:
        parts.append(("replay", preview.replay))
    for scope, out in parts:
        for change, items in (("newly_denied", out.newly_denied),
                              ("newly_allowed", out.newly_allowed)):
            for c in items:
                yield {"scope": scope, "change": change, "user": c.user, "device": c.device,
                       "platform": c.platform, "protocol": c.protocol,
                       "rules": ";".join(c.rules), "groups": ";".join(c.groups)}
