"""Verified device posture and where it is kept.

A :class:`Posture` is what ``proxy.attestation`` produces from a signed report: the
device, its user, platform and installed apps, and when it was attested, and by which
*authority* (DESIGN "Posture authority": ``device`` for a report signed by the device's
own certificate, ``attester:<fp8>`` for an MDM attester, ``mdm:<name>`` for a
connector). A :class:`PostureStore` keeps the newest posture per device *per
authority*, the replay memory (used ``jti`` values per issuer, issued nonces) and the
device trust records: aliases, certificate bindings and revocations, with a change
feed that lets a server notice what another process (the CLI) changed.
``sqlite.py`` is the default store; ``redis.py`` is the store several instances
share (scale-out).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol

PLATFORMS = ("android", "ios", "ipados", "windows", "macos", "linux")

CommitResult = Literal["ok", "bad_nonce", "replay", "revoked", "platform_mismatch"]

#: Set (in the reading task's context) when a store answered a read from its local
#: cache because its server was unreachable; the gate resets it before a decision
#: and records it as ``posture_cached``.
POSTURE_CACHED: ContextVar[bool] = ContextVar("posture_cached", default=False)

#: The authority of a report signed by the device's own certificate.
DEVICE_AUTHORITY = "device"


def device_key(device_id: str) -> str:
    """Device ids compare case-insensitively (DESIGN "Revocation", "Device identity")."""
    return device_id.lower()


@dataclass(frozen=True, slots=True)
class App:
    """One installed app as reported by the device."""

    id: str
    version: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class Posture:
    """A verified posture report. Times are POSIX seconds (UTC)."""

    device_id: str
    user: str  # lower-cased mailbox address
    platform: str
    os_version: str
    managed: bool
    apps: tuple[App, ...]
    iat: int
    exp: int
    jti: str
    issuer: str
    attested_by: str  # "device" or "mdm:<attester certificate subject CN>"
    received_at: float = 0.0
    nonce: str | None = None
    #: ``device``, ``attester:<fp8>`` or ``mdm:<name>``; empty in reports stored before
    #: authorities existed (then derived from ``attested_by``, see :attr:`authority`).
    source: str = ""
    #: SHA-256 (hex) of the signing certificate: the issuer of ``jti`` for replay.
    signer: str = ""
    #: ``full``, or ``managed-only`` for an MDM inventory that sees only the apps the
    #: MDM manages (personal phones; the policy's ``partial_inventory`` decides).
    inventory: str = "full"
    #: The MDM's own compliance state (``compliant``, ``noncompliant``, ...); empty
    #: for device reports.
    mdm_compliance: str = ""
    app_ids: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.app_ids:
            object.__setattr__(self, "app_ids", frozenset(a.id for a in self.apps))

    @property
    def authority(self) -> str:
        """Whose word this posture is: ``device``, or an MDM authority."""
        if self.source:
            return self.source
        return DEVICE_AUTHORITY if self.attested_by in ("device", "") else self.attested_by

    @property
    def is_mdm(self) -> bool:
        return self.authority != DEVICE_AUTHORITY

    @property
    def sha256(self) -> str:
        """Stable digest of the report contents (identifies a posture version)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        # Built by hand: dataclasses.asdict deep-copies every App (~3 ms for 150 apps,
        # which an MDM sync of 10,000 devices pays several times per device).
        d = {name: getattr(self, name) for name in _JSON_FIELDS}
        d["apps"] = [{"id": a.id, "version": a.version, "name": a.name} for a in self.apps]
        for key, default in _OPTIONAL_JSON:  # reports from before MDM connectors
            if d[key] == default:
                del d[key]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Posture:
        d = json.loads(text)
        d["apps"] = tuple(App(**a) for a in d["apps"])
        return cls(**d)


_JSON_FIELDS = tuple(f.name for f in fields(Posture) if f.name != "app_ids")
#: Fields left out of :meth:`Posture.to_json` at their default (the digest of a
#: device report stays what it was before MDM connectors).
_OPTIONAL_JSON = (("inventory", "full"), ("mdm_compliance", ""))


def in_force(postures: Iterable[Posture]) -> Posture | None:
    """The posture that speaks for a device: the newest MDM posture when there is
    one (fresh or stale: the device's word never replaces it), else the device's."""
    best: Posture | None = None
    for p in postures:
        if best is None or (p.is_mdm, p.iat) > (best.is_mdm, best.iat):
            best = p
    return best


@dataclass(frozen=True, slots=True)
class TrustRecords:
    """The device trust records, read at once (small: one row per alias, binding and
    revocation). Keys are lower-cased device ids (:func:`device_key`)."""

    aliases: dict[str, str]  # alias -> device
    bindings: frozenset[str]  # devices seen with a verified certificate naming them
    revoked: dict[str, str]  # device -> why
    change_seq: int  # the change feed's position these records reflect


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed: ``device`` (key) changed by ``kind``
    (``posture``, ``revoked``, ``unrevoked``, ``forgotten``, ``unbound``, ``bound``,
    ``alias``)."""

    seq: int
    device: str
    kind: str


class PostureReader(Protocol):
    """What deciding needs from a store: the gate only reads."""

    async def get(self, device_id: str) -> Posture | None: ...

    async def devices_for_user(self, user: str) -> list[Posture]: ...


class PostureStore(PostureReader, Protocol):
    """Latest verified posture per device, and the attestation replay memory.

    Implementations must be safe under concurrent use from one event loop.
    """

    async def commit_attestation(
        self, posture: Posture, nonce: str | None, now: float
    ) -> CommitResult:
        """Atomically: consume ``nonce`` (if given), record ``posture.jti`` and store
        the posture. Returns ``"bad_nonce"`` or ``"replay"`` (and changes nothing)
        when the nonce is unknown/expired/used or the jti was seen before."""
        ...

    async def issue_nonce(self, nonce: str, expires_at: float) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def open_store(url: str, *, state_dir: Path | None = None,
               cache_max_age_s: float = 300.0) -> PostureStore:
    """Open a store from a URL such as ``sqlite:///state/posture.db`` or
    ``redis://host:6379/0`` (``state_dir`` keeps the Redis store's local copy of
    revocations; ``cache_max_age_s`` bounds its read-through cache).

    Relative sqlite paths must already be resolved by ``proxy.config``.
    """
    if url.startswith("sqlite://"):
        from proxy.posture.sqlite import SqlitePostureStore

        return SqlitePostureStore(url.removeprefix("sqlite://"))
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from proxy.posture.redis import RedisPostureStore

        return RedisPostureStore(url, state_dir=state_dir, cache_max_age_s=cache_max_age_s)
    raise ValueError(f"unknown posture store URL {url!r}")
