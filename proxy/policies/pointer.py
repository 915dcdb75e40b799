"""Where the active-version pointer lives: ``state/policies/active.json`` for one
instance, Redis when instances share a Redis posture store (DESIGN "Policy changes":
"a Redis key when scaled out").

:class:`PolicyVersions` is what the server (:mod:`proxy.policies.live`) and the CLI
(``mailward policy history | rollback | push``) use: the policy texts, kept
content-addressed in ``state/policies/`` (:class:`~proxy.policies.store.PolicyStore`),
plus an :class:`ActivePointer`, picked once by :func:`open_versions` from
``[posture] store``:

* :class:`FilePointer`: the pointer file of :mod:`proxy.policies.store` (flock'd,
  replaced atomically). Only this host's processes move it.
* :class:`RedisPointer`: ``policy:active``, ``policy:history`` and ``policy:files``
  (each instance's policy file digest as last looked at, by ``[server] instance``) in
  Redis, each read or move one script (:mod:`proxy.posture.redis_scripts`). Any
  instance or any instance's CLI moves it; every instance follows within a poll. The
  texts live in Redis too (``policy:<sha256>``), so an instance can load a policy it
  never saw, and keeps a copy in its own ``state/policies/``.

The pointer's :attr:`~ActivePointer.shared` says whether other instances move it: an
instance following a shared pointer writes a ``policy_reload`` record (its own log
says when it applied a change made elsewhere); a single instance's CLI wrote the
``policy_rollback``/``policy_push`` record into the same log already.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from proxy.policies.store import (
    HOW,
    Entry,
    Pointer,
    PolicyStore,
    PolicyStoreError,
    is_shared,
    now_rfc3339,
)

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.policy import Policy

class ActivePointer(Protocol):
    """Which stored policy is in force, since when, how and by whom."""

    shared: bool  # other instances move it too
    where: str  # for messages

    async def read(self) -> Pointer | None:
        """The pointer (``file_sha256``: this instance's), None before the first policy."""

    async def move(self, entry: Entry, data: bytes, file_sha256: str | None) -> None:
        """Point at ``entry`` (its text is ``data``) and append it to the history."""

    async def note_file(self, file_sha256: str) -> None:
        """Remember the policy file's digest as looked at (refused or adopted)."""

    async def stamp(self) -> Hashable:
        """Changes whenever the pointer moves (cheap: it is polled)."""

    async def text(self, sha256: str) -> bytes | None:
        """A policy's text the pointer's side keeps (None: only local copies)."""

    async def close(self) -> None: ...


class FilePointer:
    """``state/policies/active.json`` (see :mod:`proxy.policies.store`)."""

    shared = False

    def __init__(self, store: PolicyStore) -> None:
        self.store = store
        self.where = str(store.pointer_path)

    async def read(self) -> Pointer | None:
        return self.store.read()

    async def move(self, entry: Entry, data: bytes, file_sha256: str | None) -> None:
        await asyncio.to_thread(self.store.move, entry, file_sha256)  # fsyncs

    async def note_file(self, file_sha256: str) -> None:
        await asyncio.to_thread(self.store.note_file, file_sha256)

    async def stamp(self) -> Hashable:
        return self.store.stamp()

    async def text(self, sha256: str) -> bytes | None:
        return None

    async def close(self) -> None:
        return None


class RedisPointer:
    """The pointer in the shared Redis (``store``: a
    :class:`~proxy.posture.redis.RedisPostureStore`); ``instance`` names this
    instance's policy file digest. ``owned``: close the store with the pointer."""

    shared = True

    def __init__(self, store: Any, instance: str, *, owned: bool = False) -> None:
        self.redis = store
        self.instance = instance
        self.owned = owned
        self.where = f"redis {store.prefix}policy:active"

    async def read(self) -> Pointer | None:
        active, file_sha, raw = await self.redis.policy_pointer(self.instance)
        if not active:
            return None
        try:
            history = tuple(Entry(**json.loads(h)) for h in raw)
        except (ValueError, TypeError) as exc:
            raise PolicyStoreError(f"{self.where}: malformed history: {exc}") from None
        return Pointer(active, file_sha, history)

    async def move(self, entry: Entry, data: bytes, file_sha256: str | None) -> None:
        await self.redis.move_policy_pointer(entry.sha256, data.decode(),
                                             json.dumps(entry.to_dict(), sort_keys=True),
                                             self.instance, file_sha256 or "")

    async def note_file(self, file_sha256: str) -> None:
        await self.redis.note_policy_file(self.instance, file_sha256)

    async def stamp(self) -> Hashable:
        return str(await self.redis.policy_stamp())

    async def text(self, sha256: str) -> bytes | None:
        text = await self.redis.policy_text(sha256)
        return None if text is None else text.encode()

    async def close(self) -> None:
        if self.owned:
            await self.redis.close()


@dataclass(frozen=True, slots=True)
class PolicyVersions:
    """Stored policies plus the pointer (see the module docstring)."""

    contents: PolicyStore
    pointer: ActivePointer

    @property
    def shared(self) -> bool:
        return self.pointer.shared

    async def read(self) -> Pointer | None:
        return await self.pointer.read()

    async def stamp(self) -> Hashable:
        return await self.pointer.stamp()

    async def note_file(self, file_sha256: str) -> None:
        await self.pointer.note_file(file_sha256)

    async def activate(self, policy: Policy, data: bytes, *, how: str, actor: str,
                       file_sha256: str | None = None) -> Entry:
        """Keep ``policy`` (loaded from ``data``) and put it in force."""
        if how not in HOW:
            raise ValueError(f"how must be one of {HOW}")
        await asyncio.to_thread(self.contents.save, policy, data)
        entry = Entry(policy.sha256, policy.version, now_rfc3339(), how, actor)
        await self.pointer.move(entry, data, file_sha256)
        return entry

    async def load(self, sha256: str) -> Policy:
        """The policy with this digest: the local copy, else the pointer side's text
        (kept locally, then loaded and validated like the file). ``ConfigError`` when
        it cannot be loaded, ``PolicyStoreError`` when nobody has it."""
        if not self.contents.path_of(sha256).exists():
            text = await self.pointer.text(sha256)
            if text is None:
                raise PolicyStoreError(f"policy {sha256[:12]} is neither in "
                                       f"{self.contents.directory} nor at {self.pointer.where}")
            self.contents.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            await asyncio.to_thread(_keep, self.contents, sha256, text)
        return await asyncio.to_thread(self.contents.load, sha256)

    async def active(self) -> Policy | None:
        """The policy the pointer names, or None when none has been put in force."""
        pointer = await self.read()
        return None if pointer is None else await self.load(pointer.active)

    async def resolve(self, ref: str) -> str:
        """A version or a SHA-256 prefix -> the digest (``PolicyStoreError``)."""
        pointer = await self.read()
        return self.contents.resolve(ref, pointer.history if pointer else ())

    async def close(self) -> None:
        await self.pointer.close()


def _keep(contents: PolicyStore, sha256: str, text: bytes) -> None:
    from proxy.policies.store import _write_atomic

    _write_atomic(contents.path_of(sha256), text)


def open_versions(cfg: Config, store: Any = None) -> PolicyVersions:
    """The policy versions of this deployment: the pointer in Redis when the posture
    store is Redis (``store``: the server's open one, else a connection of its own),
    else in ``state/``."""
    contents = PolicyStore(cfg.server.state_dir)
    if not is_shared(cfg.posture.store):
        return PolicyVersions(contents, FilePointer(contents))
    owned = store is None
    if owned:
        from proxy.posture import open_store

        store = open_store(cfg.posture.store)
    return PolicyVersions(contents, RedisPointer(store, cfg.server.instance, owned=owned))


def shared_in_force(cfg: Config) -> Policy:
    """:func:`proxy.policies.store.in_force` when the pointer is in Redis."""
    from proxy.config import load_policy
    from proxy.policies.store import file_sha256

    async def go() -> Policy | None:
        versions = open_versions(cfg)
        try:
            pointer = await versions.read()
            if pointer is None or pointer.file_sha256 != file_sha256(cfg.server.policy):
                return None
            return await versions.load(pointer.active)
        except Exception:  # Redis unreachable, a damaged copy: the file decides
            return None
        finally:
            await versions.close()

    return asyncio.run(go()) or load_policy(cfg.server.policy)


__all__ = ["ActivePointer", "FilePointer", "PolicyVersions", "RedisPointer", "is_shared",
           "open_versions", "shared_in_force"]
