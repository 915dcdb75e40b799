"""``mailward policy ...``: ``preview``, ``history``, ``diff``, ``rollback``, ``push``
(DESIGN "Policy changes"), and the policy guard's ``check-config`` warning.

``rollback`` and ``push`` move the active-version pointer (in ``state/``, or in Redis
when the posture store is Redis: :mod:`proxy.policies.pointer`; never the config
directory, which may be read-only); every running server sharing the pointer
applies the move within a poll (:mod:`proxy.policies.live`). Each writes its audit
record (``policy_rollback`` naming both versions, ``policy_push``, ``policy_preview``
with counts) with ``actor`` = the OS user, and refuses to act when the audit log
cannot be written.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.cli import EXIT_DENY, EXIT_FAILED, EXIT_OK, UserError, _Add, _audit_log, _load

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.policies.pointer import PolicyVersions
    from proxy.policies.preview import Outcome, Preview
    from proxy.policy import Policy


def _appending(cfg: Config, what: str) -> Any:
    """The audit log, opened for one record; refuses when it cannot be written."""
    log = _audit_log(cfg)
    if not log.healthy:
        log.close_sync()
        raise UserError(f"not {what}: the audit log cannot be written ({log.last_error})")
    return log


T = TypeVar("T")


def _versions(cfg: Config, fn: Callable[[PolicyVersions], Awaitable[T]]) -> T:
    """``fn`` run against this deployment's policy versions (the pointer in ``state/``
    or in Redis); policy-store errors and an unreachable Redis are user errors (one
    line, exit 2)."""
    import asyncio

    from proxy.policies import PolicyStoreError
    from proxy.policies.pointer import open_versions
    from proxy.posture.redis import StoreUnavailable

    async def go() -> T:
        versions = open_versions(cfg)
        try:
            return await fn(versions)
        finally:
            await versions.close()

    try:
        return asyncio.run(go())
    except (PolicyStoreError, StoreUnavailable) as exc:
        raise UserError(str(exc)) from None


async def _active(versions: PolicyVersions) -> Policy | None:
    return await versions.active()


# ------------------------------------------------------------------ preview


def cmd_policy_preview(args: argparse.Namespace) -> int:
    """Exit 0 when nothing would be newly denied, 3 otherwise (2 on error)."""
    from proxy.audit import parse_time
    from proxy.policies.ops import build_preview, cli_actor, load_candidate

    cfg = _load(args)
    path = Path(args.file) if args.file else cfg.server.policy
    candidate, data = load_candidate(path)
    try:
        since = parse_time(args.replay) if args.replay else None
    except ValueError as exc:
        raise UserError(f"--replay: {exc}") from None
    baseline = _versions(cfg, _active)
    try:
        preview = build_preview(cfg, candidate, data, baseline=baseline, replay_since=since)
    except ValueError as exc:  # a store preview cannot read
        raise UserError(str(exc)) from None
    with _appending(cfg, "previewing") as log:
        log.append({**preview.record(), "actor": cli_actor(), "via": "cli"})
    {"json": _print_json, "csv": _print_csv}.get(args.format, _print_table)(preview)
    return EXIT_DENY if preview.newly_denied else EXIT_OK


def _print_json(preview: Preview) -> None:
    print(json.dumps({**preview.to_dict(), "newly_denied": preview.newly_denied}, indent=2))


def _print_csv(preview: Preview) -> None:
    from proxy.policies.preview import iter_rows

    columns = ["scope", "change", "user", "device", "platform", "protocol", "rules", "groups"]
    writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(iter_rows(preview))
    if preview.guard is not None:  # stdout stays plain CSV
        print(preview.guard.confirm, file=sys.stderr)


def _today() -> str:
    import time

    return time.strftime("%Y-%m-%d", time.gmtime())


def _print_table(preview: Preview) -> None:
    c, b = preview.candidate, preview.baseline
    print(f"candidate  {c.version} ({c.sha256[:12]})  {c.source}")
    print(f"in force   {b.version} ({b.sha256[:12]})" if b else
          "in force   none yet (every current deny counts as new)")
    if preview.judged_as_of and preview.judged_as_of[:10] > _today():
        print(f"judged as  in force on {preview.judged_as_of[:10]} (its enforce_from): "
              "until then those devices are allowed and warned")
    parts: list[tuple[str, Outcome]] = [("devices", preview.devices)]
    if preview.replay is not None:
        parts.append((f"replay since {preview.replay_since}", preview.replay))
    for title, out in parts:
        n = out.counts()
        print(f"\n{title}: {n['total']} judged, {n['newly_denied']} newly denied, "
              f"{n['newly_allowed']} newly allowed, {n['unchanged']} unchanged")
        for label, counts in (("by rule", out.by_rule()), ("by group", out.by_group())):
            if counts:
                print(f"  newly denied {label}: "
                      + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for change, items in (("newly denied", out.newly_denied),
                              ("newly allowed", out.newly_allowed)):
            if items:
                print(f"  {change}:")
                _table([(i.user, i.device, i.platform, i.protocol or "-", ",".join(i.rules),
                         ",".join(i.groups)) for i in items],
                       ("USER", "DEVICE", "PLATFORM", "PROTOCOL", "RULES", "GROUPS"))
    g = preview.guard
    if g is None:
        return
    state = ("exceeds it: not applied without the confirm line" if g.blocks else
             "exceeds it; the file carries its confirm line" if g.exceeds else "within it")
    print(f"\npolicy guard: max_new_denies = {g.setting} ({g.limit} devices); "
          f"{g.newly_denied} newly denied {state}. To apply it anyway, add near the top "
          "of the file (before any [table]):")
    print(g.confirm)


def _table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...], indent: str = "    ") -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print(indent + "  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True))
              .rstrip())


# ------------------------------------------------------------------ history, diff


def cmd_policy_history(args: argparse.Namespace) -> int:
    cfg = _load(args)
    pointer = _versions(cfg, lambda v: v.read())
    if pointer is None:
        print("no policy has been put in force yet (mailward serve does at start)")
        return EXIT_OK
    rows = [(e.version, e.sha256[:12], e.when, e.how, e.actor,
             "*" if e.sha256 == pointer.active and i == _last_index(pointer) else "")
            for i, e in enumerate(pointer.history)]
    if args.format == "json":
        print(json.dumps({"active": pointer.active,
                          "history": [e.to_dict() for e in pointer.history]}, indent=2))
        return EXIT_OK
    _table(rows, ("VERSION", "SHA256", "WHEN", "HOW", "ACTOR", "ACTIVE"), indent="")
    return EXIT_OK


def _last_index(pointer: Any) -> int:
    """The history entry that made the active policy active (the newest for it)."""
    return max(i for i, e in enumerate(pointer.history) if e.sha256 == pointer.active) \
        if any(e.sha256 == pointer.active for e in pointer.history) else -1


def cmd_policy_diff(args: argparse.Namespace) -> int:
    from proxy.policies.diff import diff
    from proxy.policies.ops import resolve_policy

    cfg = _load(args)

    async def both(v: PolicyVersions) -> tuple[Policy, Policy]:
        return await resolve_policy(v, args.a), await resolve_policy(v, args.b)

    result = diff(*_versions(cfg, both))
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print("\n".join(result.lines()))
    return EXIT_OK


# ------------------------------------------------------------------ rollback, push


def cmd_policy_rollback(args: argparse.Namespace) -> int:
    """Move the pointer to VERSION (default: the previous policy in force)."""
    from proxy.policies.ops import cli_actor

    cfg = _load(args)

    async def go(versions: PolicyVersions) -> tuple[Policy, Policy]:
        pointer = await versions.read()
        if pointer is None:
            raise UserError("no policy has been put in force yet; nothing to roll back")
        if args.version:
            target = await versions.resolve(args.version)
        else:
            previous = pointer.previous()
            if previous is None:
                raise UserError("no previous policy in the history (mailward policy history)")
            target = previous.sha256
        if target == pointer.active:
            raise UserError(f"{args.version or target[:12]} is already in force")
        old, new = await versions.load(pointer.active), await versions.load(target)
        data = versions.contents.path_of(target).read_bytes()
        await _move(cfg, versions, old, new, "rollback", data)
        return old, new

    old, new = _versions(cfg, go)
    print(f"rolled back from {old.version} ({old.sha256[:12]}) to {new.version} "
          f"({new.sha256[:12]}) by {cli_actor()}; running servers apply it within 2 s")
    return EXIT_OK


def cmd_policy_push(args: argparse.Namespace) -> int:
    """Put FILE (default: the policy file) in force by moving the pointer; the policy
    guard applies as to a file change."""
    from proxy.policies.ops import check_guard, cli_actor, load_candidate

    cfg = _load(args)
    path = Path(args.file) if args.file else cfg.server.policy
    new, data = load_candidate(path)
    old = _versions(cfg, _active)
    if old is not None and old.sha256 == new.sha256:
        raise UserError(f"{path}: already in force ({new.version})")
    try:
        verdict = check_guard(cfg, old, new, data)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if verdict is not None and verdict.blocks:
        print(f"mailward: {path}: not pushed: {verdict.reason()}", file=sys.stderr)
        return EXIT_FAILED
    _versions(cfg, lambda v: _move(cfg, v, old, new, "push", data, file=str(path)))
    print(f"pushed {new.version} ({new.sha256[:12]}) from {path} by {cli_actor()}; "
          "running servers apply it within 2 s")
    return EXIT_OK


async def _move(cfg: Config, versions: PolicyVersions, old: Policy | None, new: Policy,
                how: str, data: bytes, **extra: str) -> None:
    """Check the audit log can take the record, move the pointer, write the record."""
    from proxy.policies.ops import cli_actor

    actor = cli_actor()
    with _appending(cfg, f"doing the {how}") as log:
        await versions.activate(new, data, how=how, actor=actor)
        log.append({"event": f"policy_{how}", "actor": actor, "via": "cli",
                    "from_version": old.version if old else None,
                    "from_sha256": old.sha256 if old else None,
                    "to_version": new.version, "to_sha256": new.sha256, **extra})


# ------------------------------------------------------------------ check-config


def guard_warnings(cfg: Config, policy: Policy) -> list[str]:
    """``check-config``: a ``warning:`` line when the policy guard would refuse the
    policy file against the policy in force (nothing when that cannot be judged)."""
    from proxy.policies.ops import check_guard

    try:
        baseline = _versions(cfg, _active)
        if baseline is None or baseline.sha256 == policy.sha256:
            return []
        verdict = check_guard(cfg, baseline, policy, Path(cfg.server.policy).read_bytes())
    except Exception:  # no state yet, another store: the server checks at reload
        return []
    if verdict is None or not verdict.blocks:
        return []
    return [f"{policy.source}: {verdict.reason()}"]


# ------------------------------------------------------------------ parser


def policy_commands(add: _Add, group: Any) -> None:
    sp = add("preview", cmd_policy_preview, "who a policy file would newly deny or allow "
             "(exit 0 none newly denied, 3 some)", group)
    sp.add_argument("file", nargs="?", metavar="FILE", help="default: the policy file")
    sp.add_argument("--replay", metavar="AGE", help="also judge every (user, device, "
                    "protocol) of the audit log's decisions since then, e.g. 7d")
    sp.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sp = add("history", cmd_policy_history, "every policy that has been in force", group)
    sp.add_argument("--format", choices=("table", "json"), default="table")
    sp = add("diff", cmd_policy_diff, "rule-by-rule differences of two policies (versions, "
             "sha256 prefixes or files)", group)
    sp.add_argument("a", metavar="A")
    sp.add_argument("b", metavar="B")
    sp.add_argument("--format", choices=("text", "json"), default="text")
    sp = add("rollback", cmd_policy_rollback, "put an earlier policy back in force "
             "(default: the previous one)", group)
    sp.add_argument("version", nargs="?", metavar="VERSION")
    sp = add("push", cmd_policy_push, "put a policy file in force without writing the "
             "config directory", group)
    sp.add_argument("file", nargs="?", metavar="FILE", help="default: the policy file")
