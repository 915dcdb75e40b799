"""Policy agreement between instances that share a Redis posture store.

The policy in force is content-addressed: its text is stored in Redis under its
SHA-256 with an active-version pointer (:meth:`RedisPostureStore.push_policy`). An
instance that applies a policy (file change, SIGHUP) pushes it; every instance polls
the pointer with the change feed (every half second, one round trip) and applies a
new one within 2 s: the text is written to ``state/policies/<sha256>.toml``, loaded
like the file (same validation) and swapped in by the server's ``apply`` callback
(which records the ``policy_reload`` and re-checks live sessions). A text this
instance cannot load is not applied: the old policy stays and ``/readyz`` names it
(``policy_not_applied:<sha12>``) until a loadable one arrives. With a store that has
no such pointer (SQLite: one instance) this does nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.config import ConfigError, load_policy
from proxy.oplog import get_logger
from proxy.policy import Policy

log = get_logger("mailward.server")


class PolicySync:
    """See the module docstring. ``current`` gives the policy in force; ``apply``
    swaps a loaded one in (returns when sessions were re-checked)."""

    def __init__(self, store: Any, state_dir: Path, current: Callable[[], Policy],
                 apply: Callable[[Policy, str], Awaitable[None]]) -> None:
        self._store = store
        self._dir = Path(state_dir) / "policies"
        self._current = current
        self._apply = apply
        self.refused: str = ""  # sha256 of a pushed policy this instance cannot load

    @property
    def enabled(self) -> bool:
        return hasattr(self._store, "active_policy")

    async def push(self, path: Path) -> None:
        """The policy file at ``path`` was just applied here: make it the fleet's."""
        if not self.enabled:
            return
        text = path.read_bytes().decode()
        sha = hashlib.sha256(text.encode()).hexdigest()
        try:
            if await self._store.push_policy(sha, text):
                log.info("policy pushed to the other instances", policy_sha256=sha)
        except Exception as exc:  # applied here; the others get the next push
            log.error("cannot push the policy to the store", error=str(exc))

    async def start(self, path: Path) -> None:
        """At start: adopt the fleet's policy when there is one, else push ours."""
        if not self.enabled:
            return
        try:
            sha, _ = await self._store.active_policy("")
        except Exception as exc:
            log.error("cannot read the policy in force from the store", error=str(exc))
            return
        if not sha:
            await self.push(path)
        else:
            await self.poll()

    async def poll(self) -> bool:
        """Apply the fleet's policy if it changed; True when one was applied."""
        if not self.enabled:
            return False
        have = self._current().sha256
        sha, text = await self._store.active_policy(have)
        if not sha or sha == have or text is None or sha == self.refused:
            return False
        policy = self._load(sha, text)
        if policy is None:
            return False
        self.refused = ""
        await self._apply(policy, "store")
        return True

    def _load(self, sha: str, text: str) -> Policy | None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._dir / f"{sha}.toml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        try:
            policy = load_policy(path)
        except ConfigError as exc:
            self.refused = sha
            log.error("policy from the store refused; keeping the current policy",
                      policy_sha256=sha, error=str(exc))
            return None
        if policy.sha256 != sha:  # the text does not hash to its name: not ours
            self.refused = sha
            log.error("policy from the store does not match its SHA-256", policy_sha256=sha)
            return None
        return policy

    def degraded(self) -> list[str]:
        return [f"policy_not_applied:{self.refused[:12]}"] if self.refused else []


__all__ = ["PolicySync"]
