"""What ``mailward serve`` does with the policy in force (:mod:`proxy.policies.store`),
wherever its pointer lives (:mod:`proxy.policies.pointer`: ``state/``, or Redis when
instances share one).

* At start, :meth:`LivePolicy.at_start` reconciles the pointer with the policy file:
  no pointer yet -> the file is put in force (``how = "start"``, no guard: nothing
  was in force); the file unchanged since last looked at -> the pointer's policy
  (a rollback survives a restart); an instance that never looked at its file joins
  the fleet's policy; the file changed while the server was down -> it is applied
  like a file change, guard included.
* On a file change or SIGHUP the server calls :meth:`LivePolicy.reload`: the policy
  guard (``[policy_guard] max_new_denies``, :meth:`LivePolicy.admit`) may refuse the
  file, which keeps the old policy, names it in ``/readyz``'s ``degraded`` list and
  is counted like any refused reload; otherwise the file is stored, the pointer moved
  and :meth:`LivePolicy.apply` swaps it in, records it and re-checks live sessions.
* :meth:`LivePolicy.watch` polls the pointer every :data:`POLL_S` seconds; when
  another process (``mailward policy rollback`` / ``push``, another instance) moved
  it, the named policy is swapped in and every live session re-checked. Following a
  shared pointer also writes a ``policy_reload`` record (``trigger = "store"``, with
  the move's ``how`` and ``actor``); a policy this instance cannot load is not
  applied and ``/readyz`` names it (``policy_not_applied:<sha12>``).
"""

from __future__ import annotations

import asyncio
import hashlib
import pwd
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from proxy.config import ConfigError, load_policy
from proxy.oplog import get_logger
from proxy.policies.ops import check_guard
from proxy.policies.pointer import FilePointer, PolicyVersions, open_versions
from proxy.policies.store import Pointer, PolicyStore, PolicyStoreError
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
        self.versions = PolicyVersions(self.store, FilePointer(self.store))
        self.blocked: str | None = None  # named in /readyz degraded
        self.refused = ""  # sha256 of a policy the pointer names that cannot be loaded here
        self.unshared = False  # a file change applied here the pointer did not take
        self._stamp: Hashable = None
        self._pointer_error = ""
        path = Path(cfg.server.policy)
        # sha256 of the policy file bytes last looked at: a file event whose content
        # did not change (touch, ConfigMap symlink swap, a second event for one edit)
        # is not a reload.
        self._seen_sha = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""

    def use_pointer(self, store: Any) -> None:
        """Keep the pointer where :func:`~proxy.policies.pointer.open_versions` says
        for this deployment (``store``: the server's posture store)."""
        self.versions = open_versions(self.cfg, store)

    def degraded(self) -> list[str]:
        names = [self.blocked] if self.blocked else []
        names += [f"policy_not_applied:{self.refused[:12]}"] if self.refused else []
        return names + (["policy_not_shared"] if self.unshared else [])

    def actor(self) -> str:
        return file_owner(Path(self.cfg.server.policy))

    async def at_start(self) -> None:
        """Reconcile pointer and file (see the module docstring)."""
        path = Path(self.cfg.server.policy)
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        from_file = self.holder.current()
        try:
            pointer = await self.versions.read()
            active = None if pointer is None else await self.versions.load(pointer.active)
        except Exception as exc:  # damaged state: the file decides, and says so
            log.error("policy in force unreadable; starting with the policy file",
                      error=str(exc), pointer=self.versions.pointer.where)
            pointer = active = None
        if pointer is None or active is None:
            try:
                await self.versions.activate(from_file, data, how="start", actor=self.actor(),
                                             file_sha256=sha)
            except OSError as exc:
                raise StartupError(f"server.state_dir: cannot keep the policy in force in "
                                   f"{self.store.directory}: {exc.strerror}") from None
        elif pointer.file_sha256 in (sha, ""):  # "": joining a fleet: adopt its policy
            self._use(active)
            if not pointer.file_sha256:
                await self.versions.note_file(sha)
        else:
            self._use(active)
            refusal = await self.admit(active, from_file, data, "start")
            if refusal is None:
                self._use(from_file)
            else:  # changed while the server was down, and the guard holds it back
                await self._refused("start", refusal, active, from_file.version, sha)
        self._stamp = await self.versions.stamp()

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
            await self.versions.note_file(sha)
            self._stamp = await self.versions.stamp()
            return verdict.reason()
        self.blocked = None
        how = {"file_change": "file", "sighup": "sighup"}.get(trigger, "start")
        try:
            await self.versions.activate(new, data, how=how, actor=self.actor(),
                                         file_sha256=sha)
            self.unshared = False
            self._stamp = await self.versions.stamp()
        except OSError:
            raise
        except Exception as exc:  # Redis down: applied here; the others keep theirs
            self.unshared = True
            log.error("policy applied here but the pointer could not be moved",
                      where=self.versions.pointer.where, error=f"{type(exc).__name__}: {exc}")
        return None

    # ------------------------------------------------------------ reload

    async def reload(self, gate: Gate, trigger: str) -> bool:
        """A policy file change or SIGHUP (``trigger``): load the file, let the guard
        admit it, swap it in, record it and re-check every live session. An invalid or
        refused file keeps the old policy (logged, counted, recorded). True if a new
        policy was applied."""
        async with self.lock:
            path = Path(self.cfg.server.policy)
            try:
                data = path.read_bytes()
            except OSError:
                data = b""  # load_policy below reports the error with the file name
            raw_sha = hashlib.sha256(data).hexdigest() if data else ""
            if raw_sha == self._seen_sha and trigger == "file_change":
                return False
            self._seen_sha = raw_sha
            old = self.holder.current()
            try:
                new = load_policy(path)
            except ConfigError as exc:
                return await self._refused(trigger, str(exc), old, None, raw_sha,
                                           file=exc.file, line=exc.line, key=exc.key)
            if new.sha256 == old.sha256:
                log.info("policy unchanged", trigger=trigger, policy_version=old.version)
                return False
            refusal = await self.admit(old, new, data, trigger)  # the policy guard
            if refusal is not None:
                return await self._refused(trigger, refusal, old, new.version, raw_sha)
            await self.apply(gate, new, trigger)
            return True

    async def apply(self, gate: Gate, new: Policy, trigger: str, **why: Any) -> None:
        """Swap ``new`` in, write its ``policy_reload`` record (``why``: the pointer
        move's ``how`` and ``actor``) and re-check every live session."""
        old = self.holder.current()
        self.holder.swap(new)
        self.observer.policy_loaded(new)
        log.info("policy reloaded", trigger=trigger, old_version=old.version,
                 new_version=new.version, new_sha256=new.sha256)
        await self.audit_write({
            "event": "policy_reload", "result": "applied", "trigger": trigger,
            "old_version": old.version, "old_sha256": old.sha256,
            "new_version": new.version, "new_sha256": new.sha256,
            "actor": self.actor(), **why})
        started = time.perf_counter()
        ended = await gate.policy_changed()
        log.info("live sessions re-checked", ended=ended, live=len(gate.live_sessions()),
                 elapsed_ms=round((time.perf_counter() - started) * 1000, 1))

    async def _refused(self, trigger: str, error: str, old: Policy, version: str | None,
                       raw_sha: str, **where: Any) -> bool:
        """A reload refused (invalid file, or the policy guard): the old policy stays;
        logged, counted and recorded."""
        self.observer.policy_reload_failed()
        log.error("policy reload refused; keeping the current policy", trigger=trigger,
                  error=error, policy_version=old.version, **where)
        await self.audit_write({
            "event": "policy_reload", "result": "refused", "trigger": trigger,
            "error": error, "old_version": old.version, "old_sha256": old.sha256,
            "new_version": version, "new_sha256": raw_sha or None, "actor": self.actor()})
        return False

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

    def _candidate(self, text: str | None) -> tuple[Policy, bytes]:
        """The policy file (``text`` None) or a policy's TOML text, loaded and validated
        like the file (``ConfigError``)."""
        from proxy.policies.ops import load_candidate

        if text is None:
            return load_candidate(Path(self.cfg.server.policy))
        data = text.encode()
        self.store.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.store.directory / f".candidate-{hashlib.sha256(data).hexdigest()}.toml"
        try:
            tmp.write_bytes(data)
            return load_candidate(tmp)[0], data
        finally:
            tmp.unlink(missing_ok=True)

    def _preview(self, text: str | None, since: Any) -> Any:
        from proxy.policies.ops import build_preview

        candidate, data = self._candidate(text)
        return build_preview(self.cfg, candidate, data, baseline=self.holder.current(),
                             replay_since=since)

    async def rollback(self, gate: Gate, ref: str | None, actor: str) -> dict[str, Any]:
        """``POST /v1/policy/rollback``: as ``mailward policy rollback [VERSION]``, by
        ``actor``; applied here at once, by the other instances within a poll.
        ``PolicyStoreError`` when there is nothing (else) to roll back to."""
        async with self.lock:
            pointer = await self.versions.read()
            previous = pointer.previous() if pointer is not None else None
            if ref:
                target = await self.versions.resolve(ref)
            elif previous is not None:
                target = previous.sha256
            else:
                raise PolicyStoreError("no previous policy in the history")
            if pointer is None or target == pointer.active:
                raise PolicyStoreError(f"{ref or target[:12]} is already in force")
            new = await self.versions.load(target)
            return await self._move(gate, await self._in_force(pointer), new,
                                    self.store.path_of(target).read_bytes(), "rollback", actor)

    async def push(self, gate: Gate, text: str, actor: str) -> dict[str, Any]:
        """``POST /v1/policy/push``: put the policy ``text`` in force (the guard as for a
        file change: a refusal is a ``ValueError`` naming the confirm line)."""
        candidate, data = await asyncio.to_thread(self._candidate, text)
        async with self.lock:
            old = await self._in_force(await self.versions.read())
            if candidate.sha256 == old.sha256:
                raise PolicyStoreError(f"{candidate.version} is already in force")
            verdict = await asyncio.to_thread(check_guard, self.cfg, old, candidate, data)
            if verdict is not None and verdict.blocks:
                raise ValueError(verdict.reason())
            return await self._move(gate, old, candidate, data, "push", actor)

    async def _in_force(self, pointer: Pointer | None) -> Policy:
        """The policy the shared pointer names. This instance's own may lag a move
        made elsewhere by up to a poll (:data:`POLL_S`), and a move's record must say
        what it really moved from."""
        if pointer is None or pointer.active == self.holder.current().sha256:
            return self.holder.current()
        try:
            return await self.versions.load(pointer.active)
        except (ConfigError, PolicyStoreError):  # one this instance cannot load (named
            return self.holder.current()  # in /readyz): a push must still fix that

    async def _move(self, gate: Gate, old: Policy, new: Policy, data: bytes, how: str,
                    actor: str) -> dict[str, Any]:
        """Move the pointer from ``old`` to ``new`` (under the lock), write the
        ``policy_<how>`` record and apply it here."""
        await self.versions.activate(new, data, how=how, actor=actor)
        record = {"event": f"policy_{how}", "actor": actor, "via": "api",
                  "from_version": old.version, "from_sha256": old.sha256,
                  "to_version": new.version, "to_sha256": new.sha256}
        await self.audit_write(record)
        self._stamp = await self.versions.stamp()
        await self._follow(gate)
        return {k: v for k, v in record.items() if k != "event"} | {"how": how}

    async def watch(self, gate: Gate, stop: Callable[[], bool] = lambda: False) -> None:
        """Apply pointer moves made by other processes (the CLI, other instances),
        within :data:`POLL_S`."""
        while not stop():
            await asyncio.sleep(POLL_S)
            try:
                stamp = await self.versions.stamp()
                if self.unshared:
                    async with self.lock:
                        await self._share_applied()
                elif stamp != self._stamp:
                    async with self.lock:
                        self._stamp = stamp
                        await self._follow(gate)
                self._pointer_error = ""
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if error != self._pointer_error:  # once, not twice a second
                    log.error("policy pointer unreadable; keeping the current policy",
                              where=self.versions.pointer.where, error=error)
                self._pointer_error = error

    async def _share_applied(self) -> None:
        """The pointer is reachable again after a file change was applied here while it
        was not: put that policy in force for every instance, as the change would have
        been then (the file's change wins; the others follow within :data:`POLL_S`)."""
        policy = self.holder.current()
        data = await asyncio.to_thread(self.versions.contents.path_of(policy.sha256).read_bytes)
        await self.versions.activate(policy, data, how="file", actor=self.actor(),
                                     file_sha256=policy.sha256)
        self.unshared = False
        self._stamp = await self.versions.stamp()
        log.info("policy applied during the outage now shared",
                 where=self.versions.pointer.where, policy_version=policy.version)

    async def _follow(self, gate: Gate) -> None:
        pointer = await self.versions.read()
        old = self.holder.current()
        if pointer is None or pointer.active == old.sha256:
            self.refused = ""
            return
        try:
            new = await self.versions.load(pointer.active)
        except (ConfigError, PolicyStoreError) as exc:
            self.refused = pointer.active
            log.error("policy in force elsewhere cannot be loaded here; keeping the current "
                      "policy", policy_sha256=pointer.active, error=str(exc))
            return
        self.refused = ""
        entry = pointer.entry_for(pointer.active)
        how = {"how": entry.how, "actor": entry.actor} if entry else {}
        if self.versions.shared:  # moved elsewhere: this log says when it applied here
            await self.apply(gate, new, "store", **how)
            return
        self.holder.swap(new)  # the CLI that moved it wrote the record in this log
        self.observer.policy_loaded(new)
        log.info("policy in force changed", **how, old_version=old.version,
                 new_version=new.version, new_sha256=new.sha256)
        ended = await gate.policy_changed()
        log.info("live sessions re-checked", ended=ended, live=len(gate.live_sessions()))


__all__ = ["POLL_S", "LivePolicy", "PolicyStoreError", "file_owner"]
