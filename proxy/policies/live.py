"""What ``mailward serve`` does with the policy in force (:mod:`proxy.policies.store`).

* At start, :meth:`LivePolicy.at_start` reconciles the pointer with the policy file:
  no pointer yet -> the file is put in force (``how = "start"``, no guard: nothing
  was in force); the file unchanged since last looked at -> the pointer's policy
  (a rollback survives a restart); the file changed while the server was down ->
  it is applied like a file change, guard included.
* On a file change or SIGHUP the server calls :meth:`LivePolicy.admit` before it
  swaps: the policy guard (``[policy_guard] max_new_denies``) may refuse the file,
  which keeps the old policy, names it in ``/readyz``'s ``degraded`` list and is
  counted like any refused reload; otherwise the file is stored and the pointer moved.
* :meth:`LivePolicy.watch` polls the pointer every :data:`POLL_S` seconds; when
  another process (``mailward policy rollback`` / ``push``) moved it, the named
  policy is swapped in and every live session re-checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import pwd
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from proxy.oplog import get_logger
from proxy.policies.ops import check_guard
from proxy.policies.store import PolicyStore, PolicyStoreError
from proxy.startup import StartupError

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.gate import Gate
    from proxy.policy import Policy

log = get_logger("mailward.policy")

#: How often the pointer is polled (a CLI rollback is applied within about this).
POLL_S = 0.5


class _Holder(Protocol):  # the part of proxy.server.PolicyHolder used here
    def current(self) -> Policy: ...

    def swap(self, new: Policy) -> Policy: ...


def file_owner(path: Path) -> str:
    """Who edited the policy file, as far as the file says: its owner's name."""
    try:
        uid = path.stat().st_uid
    except OSError:
        return "unknown"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


class LivePolicy:
    """The server's side of the policy in force; see the module docstring."""

    def __init__(self, cfg: Config, holder: _Holder, observer: Any, lock: asyncio.Lock,
                 audit_write: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.cfg = cfg
        self.audit_write = audit_write
        self.holder = holder
        self.observer = observer
        self.lock = lock
        self.store = PolicyStore(cfg.server.state_dir)
        self.blocked: str | None = None  # named in /readyz degraded
        self._stamp: tuple[int, int, int] | None = None

    def degraded(self) -> list[str]:
        return [self.blocked] if self.blocked else []

    def actor(self) -> str:
        return file_owner(Path(self.cfg.server.policy))

    async def at_start(self) -> None:
        """Reconcile pointer and file (see the module docstring)."""
        path = Path(self.cfg.server.policy)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        from_file = self.holder.current()
        try:
            pointer = self.store.read()
            active = None if pointer is None else self.store.load(pointer.active)
        except Exception as exc:  # damaged state: the file decides, and says so
            log.error("policy in force unreadable; starting with the policy file",
                      error=str(exc), pointer=str(self.store.pointer_path))
            pointer = active = None
        if pointer is None or active is None:
            try:
                self.store.activate(from_file, data, how="start", actor=self.actor(),
                                    file_sha256=sha)
            except OSError as exc:
                raise StartupError(f"server.state_dir: cannot keep the policy in force in "
                                   f"{self.store.directory}: {exc.strerror}") from None
        elif pointer.file_sha256 == sha:
            self._use(active)
        else:
            self._use(active)
            refusal = await self.admit(active, from_file, data, "start")
            if refusal is None:
                self._use(from_file)
            else:  # changed while the server was down, and the guard holds it back
                self.observer.policy_reload_failed()
                log.error("policy file not applied at start; keeping the policy in force",
                          error=refusal, policy_version=active.version)
                await self.audit_write({
                    "event": "policy_reload", "result": "refused", "trigger": "start",
                    "error": refusal, "old_version": active.version,
                    "old_sha256": active.sha256, "new_version": from_file.version,
                    "new_sha256": sha, "actor": self.actor()})
        self._stamp = self.store.stamp()

    def _use(self, policy: Policy) -> None:
        if self.holder.current().sha256 != policy.sha256:
            self.holder.swap(policy)
        self.observer.policy_loaded(policy)

    async def admit(self, old: Policy, new: Policy, data: bytes, trigger: str) -> str | None:
        """The guard's refusal (a one-line reason), or None after putting ``new`` in
        force (stored, pointer moved). ``trigger``: start, file_change or sighup."""
        sha = hashlib.sha256(data).hexdigest()
        try:
            verdict = await asyncio.to_thread(check_guard, self.cfg, old, new, data)
        except Exception as exc:  # a store the guard cannot count: say so, apply
            log.warning("policy guard could not count devices; not checked",
                        error=f"{type(exc).__name__}: {exc}")
            verdict = None
        if verdict is not None and verdict.blocks:
            self.blocked = f"policy_guard_refused:{new.version}:{new.sha256[:12]}"
            await asyncio.to_thread(self.store.note_file, sha)
            self._stamp = self.store.stamp()
            return verdict.reason()
        self.blocked = None
        how = {"file_change": "file", "sighup": "sighup"}.get(trigger, "start")
        await asyncio.to_thread(self.store.activate, new, data, how=how, actor=self.actor(),
                                file_sha256=sha)
        self._stamp = self.store.stamp()
        return None

    async def preview(self, doc: dict[str, Any], actor: str) -> dict[str, Any]:
        """``POST /v1/policy/preview``: ``{"policy": TOML text}`` (default: the policy
        file on disk) and optional ``"replay": "7d"``, against the policy in force.
        Writes the ``policy_preview`` record; ``ConfigError``/``ValueError`` for bad
        input."""
        from proxy.audit import parse_time

        replay = doc.get("replay")
        since = parse_time(str(replay)) if replay else None
        text = doc.get("policy")
        if text is not None and not isinstance(text, str):
            raise ValueError("policy must be the TOML text of a policy file")
        result = await asyncio.to_thread(self._preview, text, since)
        await self.audit_write({**result.record(), "actor": actor, "via": "api"})
        return {**result.to_dict(), "newly_denied": result.newly_denied}

    def _preview(self, text: str | None, since: Any) -> Any:
        from proxy.policies.ops import build_preview, load_candidate

        if text is None:
            candidate, data = load_candidate(Path(self.cfg.server.policy))
        else:
            data = text.encode()
            self.store.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.store.directory / f".preview-{hashlib.sha256(data).hexdigest()}.toml"
            try:
                tmp.write_bytes(data)
                candidate = load_candidate(tmp)[0]
            finally:
                tmp.unlink(missing_ok=True)
        return build_preview(self.cfg, candidate, data, baseline=self.holder.current(),
                             replay_since=since)

    async def watch(self, gate: Gate, stop: Callable[[], bool] = lambda: False) -> None:
        """Apply pointer moves made by other processes, within :data:`POLL_S`."""
        while not stop():
            await asyncio.sleep(POLL_S)
            stamp = self.store.stamp()
            if stamp == self._stamp:
                continue
            try:
                async with self.lock:
                    self._stamp = stamp
                    await self._follow(gate)
            except Exception as exc:
                log.error("policy pointer unreadable; keeping the current policy",
                          error=f"{type(exc).__name__}: {exc}")

    async def _follow(self, gate: Gate) -> None:
        pointer = self.store.read()
        old = self.holder.current()
        if pointer is None or pointer.active == old.sha256:
            return
        new = self.store.load(pointer.active)
        entry = pointer.entry_for(pointer.active)
        self.holder.swap(new)
        self.observer.policy_loaded(new)
        log.info("policy in force changed", how=entry.how if entry else None,
                 actor=entry.actor if entry else None, old_version=old.version,
                 new_version=new.version, new_sha256=new.sha256)
        ended = await gate.policy_changed()
        log.info("live sessions re-checked", ended=ended, live=len(gate.live_sessions()))


__all__ = ["POLL_S", "LivePolicy", "PolicyStoreError", "file_owner"]
