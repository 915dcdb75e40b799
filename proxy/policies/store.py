"""The policy *in force*: content-addressed copies plus an active-version pointer.

Every policy that has been in force is kept as ``state/policies/<sha256>.toml`` (the
file's exact bytes; the name is :attr:`proxy.policy.Policy.sha256`, the digest every
decision record carries). ``state/policies/active.json`` says which one is in force::

    {"active": "<sha256>", "file_sha256": "<sha256 of the policy file last looked at>",
     "history": [{"sha256": ..., "version": ..., "when": RFC 3339, "how": ..., "actor": ...}]}

``how`` is ``start``, ``file`` (the file changed), ``sighup``, ``rollback`` or
``push``. The server moves the pointer when it applies the policy file; ``mailward
policy rollback`` and ``push`` move it from another process (config may be mounted
read-only), and the running server notices within a poll (:mod:`proxy.policies.live`).
``file_sha256`` is how "the file's next change wins again": as long as the file still
has the bytes the server last looked at, the pointer decides.

Read-modify-write of the pointer happens under an exclusive ``flock`` on
``state/policy-active.lock``; the pointer is replaced atomically (write, fsync,
rename), so a reader sees the old or the new pointer, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config import ConfigError, load_policy
from proxy.policy import Policy

if TYPE_CHECKING:
    from proxy.config import Config

POINTER = "active.json"  # in state/policies/, so `mailward backup` copies it
LOCK = "policy-active.lock"
DIRECTORY = "policies"
HOW = ("start", "file", "sighup", "rollback", "push")
#: ``[posture] store`` URLs whose deployments keep the pointer in Redis.
SHARED_SCHEMES = ("redis://", "rediss://", "redis+sentinel://")

_CONFIRM_LINE = re.compile(rb"confirm\s*=")
_SHA_PREFIX = re.compile(r"^[0-9a-f]{4,64}$")


class PolicyStoreError(Exception):
    """A reference that names no stored policy, or an unreadable pointer."""


def confirm_token(data: bytes) -> str:
    """The policy guard's confirm value: the first 12 hex of the SHA-256 of the
    file's bytes with every line matching ``^confirm\\s*=`` removed."""
    kept = b"".join(line for line in data.splitlines(keepends=True)
                    if not _CONFIRM_LINE.match(line))
    return hashlib.sha256(kept).hexdigest()[:12]


def confirm_line(data: bytes) -> str:
    """The line to add to a policy file so the guard lets it through."""
    return f'confirm = "{confirm_token(data)}"'


def is_confirmed(data: bytes) -> bool:
    """True when the file carries the confirm line for its own content."""
    want = confirm_token(data)
    for line in data.splitlines():
        if _CONFIRM_LINE.match(line):
            value = line.split(b"=", 1)[1].split(b"#", 1)[0].strip().strip(b"\"'")
            if value.decode("ascii", "replace") == want:
                return True
    return False


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Entry:
    """One activation: which policy, when, how and by whom."""

    sha256: str
    version: str
    when: str
    how: str
    actor: str

    def to_dict(self) -> dict[str, str]:
        return {"sha256": self.sha256, "version": self.version, "when": self.when,
                "how": self.how, "actor": self.actor}


@dataclass(frozen=True, slots=True)
class Pointer:
    active: str
    file_sha256: str = ""
    history: tuple[Entry, ...] = field(default=())

    def previous(self) -> Entry | None:
        """The newest activation of a policy other than the active one."""
        return next((e for e in reversed(self.history) if e.sha256 != self.active), None)

    def entry_for(self, sha: str) -> Entry | None:
        return next((e for e in reversed(self.history) if e.sha256 == sha), None)


class PolicyStore:
    """``state/policies/`` and the pointer; see the module docstring."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.directory = self.state_dir / DIRECTORY
        self.pointer_path = self.directory / POINTER

    # ---------------------------------------------------------------- contents

    def path_of(self, sha: str) -> Path:
        return self.directory / f"{sha}.toml"

    def save(self, policy: Policy, data: bytes) -> Path:
        """Keep ``data`` (the bytes ``policy`` was loaded from) as ``<sha256>.toml``."""
        path = self.path_of(policy.sha256)
        if not path.exists():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_atomic(path, data)
        return path

    def load(self, sha: str) -> Policy:
        """The stored policy with this digest (``ConfigError`` if missing or damaged)."""
        policy = load_policy(self.path_of(sha))
        if policy.sha256 != sha:
            raise ConfigError(self.path_of(sha), "", "stored policy does not match its name")
        return policy

    def stored(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.toml"))

    # ---------------------------------------------------------------- pointer

    def read(self) -> Pointer | None:
        """The pointer, or None when no policy has been put in force yet."""
        try:
            doc = json.loads(self.pointer_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PolicyStoreError(f"{self.pointer_path}: unreadable: {exc}") from None
        try:
            history = tuple(Entry(**e) for e in doc.get("history", ()))
            return Pointer(str(doc["active"]), str(doc.get("file_sha256", "")), history)
        except (KeyError, TypeError) as exc:
            raise PolicyStoreError(f"{self.pointer_path}: malformed: {exc}") from None

    def stamp(self) -> tuple[int, int, int] | None:
        """Cheap change detector for polling (inode, size, mtime)."""
        try:
            st = self.pointer_path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def activate(self, policy: Policy, data: bytes, *, how: str, actor: str,
                 file_sha256: str | None = None) -> Entry:
        """Store ``policy`` and make it the one in force; returns the history entry."""
        if how not in HOW:
            raise ValueError(f"how must be one of {HOW}")
        self.save(policy, data)
        entry = Entry(policy.sha256, policy.version, now_rfc3339(), how, actor)
        self.move(entry, file_sha256)
        return entry

    def move(self, entry: Entry, file_sha256: str | None = None) -> None:
        """Point at ``entry.sha256`` (already stored) and append ``entry`` to the history;
        ``file_sha256`` None keeps the file's last-looked-at digest."""
        with self._locked():
            old = self.read()
            history = (old.history if old else ()) + (entry,)
            seen = file_sha256 if file_sha256 is not None else (old.file_sha256 if old else "")
            self._write(Pointer(entry.sha256, seen, history))

    def note_file(self, file_sha256: str) -> None:
        """Remember the policy file's bytes as looked at (a refused file stays refused
        until it changes; the pointer keeps deciding)."""
        with self._locked():
            old = self.read()
            if old is not None and old.file_sha256 != file_sha256:
                self._write(Pointer(old.active, file_sha256, old.history))

    def _write(self, pointer: Pointer) -> None:
        doc: dict[str, Any] = {"active": pointer.active, "file_sha256": pointer.file_sha256,
                               "history": [e.to_dict() for e in pointer.history]}
        _write_atomic(self.pointer_path, (json.dumps(doc, indent=1) + "\n").encode())

    # ---------------------------------------------------------------- references

    def resolve(self, ref: str, history: tuple[Entry, ...] | None = None) -> str:
        """A version string or a SHA-256 prefix (at least 4 hex) -> the digest, among
        the stored policies and ``history`` (default: this pointer's)."""
        if history is None:
            pointer = self.read()
            history = pointer.history if pointer else ()
        by_version = {e.sha256 for e in history if e.version == ref}
        if len(by_version) == 1:
            return by_version.pop()
        if len(by_version) > 1:
            raise PolicyStoreError(f"version {ref!r} names {len(by_version)} different "
                                   "policies; give a sha256 prefix (mailward policy history)")
        if _SHA_PREFIX.match(ref.lower()):
            known = set(self.stored()) | {e.sha256 for e in history}
            found = sorted(s for s in known if s.startswith(ref.lower()))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise PolicyStoreError(f"sha256 prefix {ref!r} is ambiguous; give more digits")
        raise PolicyStoreError(f"no stored policy has version or sha256 {ref!r} "
                               "(mailward policy history lists them)")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or "" when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def policy_in_force(state_dir: Path, policy_file: Path) -> Policy:
    """What a one-shot command should judge by: the pointer's policy while the file
    still has the bytes last looked at, else the file (which the server will apply at
    its next look). Without a pointer, the file."""
    store = PolicyStore(state_dir)
    try:
        pointer = store.read()
    except PolicyStoreError:
        pointer = None
    if pointer is not None and pointer.file_sha256 == file_sha256(policy_file):
        with contextlib.suppress(ConfigError):
            return store.load(pointer.active)
    return load_policy(policy_file)


def is_shared(store_url: str) -> bool:
    """True when ``[posture] store`` puts the pointer in Redis (several instances)."""
    return store_url.startswith(SHARED_SCHEMES)


def in_force(cfg: Config) -> Policy:
    """:func:`policy_in_force` wherever the pointer lives (Redis when scaled out:
    :func:`proxy.policies.pointer.shared_in_force`). The single-instance path imports
    no asyncio (one-shot commands such as ``explain`` stay light)."""
    if not is_shared(cfg.posture.store):
        return policy_in_force(cfg.server.state_dir, cfg.server.policy)
    from proxy.policies.pointer import shared_in_force

    return shared_in_force(cfg)
