"""Preview and guard for a configured deployment: the glue between the config, the
policy store, the posture store and the audit log that the CLI, the API and the
server share. Synchronous (file, SQLite and Redis reads; Redis through an event loop
of its own): the server runs it on a thread.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.policies.preview import (
    Devices,
    GuardVerdict,
    Preview,
    compare_devices,
    compare_replay,
    guard,
    load_devices,
    relevant_to,
    replay_keys,
)
from proxy.policies.store import PolicyStoreError

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.policies.pointer import PolicyVersions
    from proxy.policy import Policy


def cli_actor() -> str:
    """The person behind a CLI command: the OS user."""
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (containers)
        return "unknown"


def devices_of(cfg: Config, *policies: Policy | None) -> Devices:
    """Every known device, with the apps that matter to ``policies``."""
    return load_devices(cfg.posture.store, relevant_to(*policies))


def check_guard(cfg: Config, baseline: Policy | None, candidate: Policy, data: bytes,
                devices: Devices | None = None, now: datetime | None = None
                ) -> GuardVerdict | None:
    """``[policy_guard]`` for ``candidate`` against ``baseline`` (None: no guard,
    nothing is in force yet)."""
    if baseline is None:
        return None
    devices = devices if devices is not None else devices_of(cfg, baseline, candidate)
    outcome = compare_devices(devices, baseline, candidate, now or datetime.now(UTC))
    setting = cfg.policy_guard.max_new_denies
    return guard(setting, cfg.policy_guard.limit(len(devices.postures)), outcome, data)


def build_preview(cfg: Config, candidate: Policy, data: bytes, *,
                  baseline: Policy | None, replay_since: datetime | None = None,
                  now: datetime | None = None) -> Preview:
    """Devices (and, with ``replay_since``, the audit log's decisions since then)
    under ``baseline`` versus ``candidate``."""
    now = now or datetime.now(UTC)
    devices = devices_of(cfg, baseline, candidate)
    outcome = compare_devices(devices, baseline, candidate, now)
    replay = since = None
    if replay_since is not None:
        from proxy.audit import query

        keys = replay_keys(query(cfg.audit.path, event="decision", since=replay_since))
        replay = compare_replay(keys, devices, baseline, candidate, now)
        since = replay_since.strftime("%Y-%m-%dT%H:%M:%SZ")
    verdict = None
    if baseline is not None:
        verdict = guard(cfg.policy_guard.max_new_denies,
                        cfg.policy_guard.limit(len(devices.postures)), outcome, data)
    from proxy.policies.preview import enforced_at

    as_of = enforced_at(candidate, now).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Preview(candidate, baseline, outcome, replay, verdict, since, as_of)


def load_candidate(path: Path) -> tuple[Policy, bytes]:
    """A policy file and its bytes (``ConfigError`` names file, key and line)."""
    from proxy.config import load_policy

    data = path.read_bytes()
    return load_policy(path), data


async def resolve_policy(versions: PolicyVersions, ref: str) -> Policy:
    """A file path, a version or a sha256 prefix -> the policy."""
    path = Path(ref)
    if path.is_file():
        return load_candidate(path)[0]
    try:
        return await versions.load(await versions.resolve(ref))
    except PolicyStoreError:
        if "/" in ref or ref.endswith(".toml"):
            raise PolicyStoreError(f"{ref}: no such file") from None
        raise
