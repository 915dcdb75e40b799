"""Redis posture store: the :class:`~proxy.posture.PostureStore` several instances share.

``[posture] store = "redis://host:6379/0"`` (also ``rediss://`` with
``?ssl_ca_certs=/path/ca.pem``, a password as ``redis://:secret@host``, and Sentinel
``redis+sentinel://[:secret@]host:26379[,host2:26379]/<service>[/<db>]``; the
sentinels get the same password unless ``?sentinel_password=`` names theirs). Every
operation is one Lua script (:mod:`proxy.posture.redis_scripts`): atomic on the
server and one round trip, so a decision costs one round trip and a report replayed
on instance B after A accepted it is refused by the same script that stored it.

Change feed: every change appends ``(seq, device, kind, origin)`` to a Redis stream;
each server polls it every half second (one round trip when nothing changed), so a
posture change or revocation on any instance ends sessions everywhere within 2 s.

When Redis is unreachable (:attr:`RedisPostureStore.available` false):

* reads fall back to a local read-through cache of what was read at most
  ``cache_max_age`` ago (:data:`~proxy.posture.POSTURE_CACHED` is set, so the
  decision record says ``posture_cached = true``); older or never read: the read
  fails and the gate refuses temporarily (fail closed);
* new attestations and nonces fail (the API answers 503);
* a revocation is kept in ``state/revocations.json`` and applied locally at once;
  that file holds every revocation this instance made or saw, and is replayed into
  Redis when it answers again, and whenever Redis comes back empty (its feed position
  went backwards), so a Redis restart without persistence cannot un-revoke a lost
  phone. An unrevocation recorded in Redis after the local copy's time wins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from proxy.oplog import get_logger
from proxy.posture import (
    POSTURE_CACHED,
    Change,
    CommitResult,
    Posture,
    TrustRecords,
    device_key,
    in_force,
)
from proxy.posture.redis_scripts import SCRIPTS
from proxy.posture.redis_url import parse_sentinel_url
from proxy.posture.sqlite import JTI_SKEW_S  # the same replay window as the SQLite store
from proxy.posture.sqlite_mdm import MdmResult, MdmWrite, content

log = get_logger("mailward.posture")

#: Replay memory and nonces outlive their expiry by this much in Redis (the expiry
#: itself is compared with the caller's clock inside the script).
TTL_MARGIN_S: Final = 3600
#: A Redis command gives up after this long: a login must not hang on a dead Redis.
SOCKET_TIMEOUT_S: Final = 1.0
#: Devices whose posture the read-through cache holds (LRU beyond that).
CACHE_MAX_DEVICES: Final = 200_000
DEFAULT_PREFIX: Final = "mailward:"

__all__ = ["RedisPostureStore", "StoreUnavailable", "connect", "parse_sentinel_url"]


class StoreUnavailable(RuntimeError):
    """Redis did not answer and nothing usable was cached."""


def connect(url: str) -> Any:
    """A ``redis.asyncio.Redis`` client for ``url`` (strings decoded, short timeouts,
    one quick retry)."""
    from redis.asyncio import Redis
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.retry import Retry

    common: dict[str, Any] = {
        "decode_responses": True, "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
    }
    if url.startswith("redis+sentinel://"):
        from redis.asyncio.sentinel import Sentinel

        hosts, service, db, kwargs = parse_sentinel_url(url)
        # Given sentinel_kwargs, redis-py drops the socket timeouts for the sentinels
        # (a sentinel host that stopped answering would hang every login), and its
        # default retries with back-off took 15 s per silent sentinel: one try each,
        # the next sentinel is the retry.
        to_sentinels: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": SOCKET_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 0)}
        password = kwargs.pop("sentinel_password", None) or kwargs.get("password")
        if password:
            to_sentinels["password"] = password
        if kwargs.get("ssl"):  # the sentinels speak TLS as the servers they watch
            to_sentinels.update((k, v) for k, v in kwargs.items() if k.startswith("ssl"))
        sentinel = Sentinel(hosts, sentinel_kwargs=to_sentinels,
                            **common)  # type: ignore[no-untyped-call]
        return sentinel.master_for(service, db=db, **kwargs)
    return Redis.from_url(url, **common)


def _unreachable(exc: BaseException) -> bool:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))


def _credentials_refused(exc: BaseException) -> bool:
    """Redis answered, but not to our password or ACL user (redis-py raises these as
    connection errors): an outage only the operator can end, so it is named apart."""
    from redis.exceptions import AuthenticationError, AuthorizationError

    return isinstance(exc, (AuthenticationError, AuthorizationError))


class RevocationCopy:
    """Every revocation this instance made or saw, in ``state/revocations.json``
    (0600, replaced atomically): ``{device: {"why", "actor", "at"}}``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.items: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text())
                self.items = {str(k): v for k, v in loaded.items() if isinstance(v, dict)}
            except (OSError, ValueError, AttributeError) as exc:
                log.error("cannot read the local copy of revocations", path=str(path),
                          error=str(exc))

    def add(self, device: str, record: dict[str, Any]) -> None:
        if device not in self.items:
            self.items[device] = record
            self._save()

    def remove(self, *devices: str) -> None:
        if any(self.items.pop(d, None) is not None for d in devices):
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.items, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class RedisPostureStore:
    """Posture store on Redis; see the module docstring. The constructor does no
    I/O (connections open on first use); :meth:`ping` tells whether Redis answers."""

    def __init__(self, url: str, *, state_dir: Path | None = None,
                 cache_max_age_s: float = 300.0, prefix: str = DEFAULT_PREFIX,
                 clock: Any = time.monotonic) -> None:
        self.url = url
        self.prefix = prefix
        self.cache_max_age_s = cache_max_age_s
        self._client = connect(url)
        self._scripts = {name: self._client.register_script(text)
                         for name, text in SCRIPTS.items()}
        self._origin = secrets.token_hex(8)
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, list[Posture]]] = OrderedDict()
        self._aliases: dict[str, str] = {}
        self.revocations = RevocationCopy(
            None if state_dir is None else Path(state_dir) / "revocations.json")
        self.available = True
        self.credentials_refused = False  # why not available: the password, not the network
        self.last_error = ""
        self._replay_due = True  # at start: Redis may have lost what we kept
        self._closed = False

    # -- plumbing ---------------------------------------------------------------

    async def _call(self, name: str, *args: object) -> Any:
        """Run one script; note whether Redis answered (replaying the local
        revocations after an outage)."""
        if self._closed:
            raise StoreUnavailable("posture store is closed")
        try:
            result = await self._scripts[name](args=[self.prefix, *args])
        except Exception as exc:
            if _unreachable(exc):
                raise self._went_down(exc) from exc
            raise
        if not self.available:
            self.available = True
            self._replay_due = True
            log.info("redis reachable again", url=_safe(self.url))
        return result

    def _went_down(self, exc: BaseException) -> StoreUnavailable:
        """Note that Redis failed us, log it once, and the error for the caller."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        refused = _credentials_refused(exc)
        news = self.available or refused != self.credentials_refused
        self.available, self.credentials_refused = False, refused
        if news:
            log.error(f"{self._why_down()}; deciding from the local cache",
                      url=_safe(self.url), error=self.last_error,
                      cache_max_age_s=self.cache_max_age_s)
        return StoreUnavailable(f"{self._why_down()}: {exc}")

    def _why_down(self) -> str:
        return ("redis refused the credentials in [posture] store"
                if self.credentials_refused else "redis unreachable")

    # -- reads (the decision path) -----------------------------------------------

    async def device_postures(self, device_id: str) -> list[Posture]:
        """The device's newest posture per authority: one round trip; from the local
        cache (at most ``cache_max_age`` old) when Redis does not answer."""
        key = device_key(device_id)
        try:
            device, flat = await self._call("postures", key)
        except StoreUnavailable:
            return self._cached(key)
        postures = [Posture.from_json(t) for t in flat[1::2]]
        self._remember(key, postures)
        if device != key:
            self._aliases[key] = device
        return postures

    def _remember(self, key: str, postures: list[Posture]) -> None:
        self._cache[key] = (self._clock(), postures)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_MAX_DEVICES:
            self._cache.popitem(last=False)

    def _cached(self, key: str) -> list[Posture]:
        found = self._cache.get(key)
        if found is None or self._clock() - found[0] > self.cache_max_age_s:
            raise StoreUnavailable(f"{self._why_down()} and no posture of {key} read "
                                   f"within {self.cache_max_age_s:.0f} s")
        POSTURE_CACHED.set(True)
        return list(found[1])

    async def get(self, device_id: str) -> Posture | None:
        return in_force(await self.device_postures(device_id))

    async def devices_for_user(self, user: str) -> list[Posture]:
        """The posture in force of every device whose posture names ``user``."""
        user = user.lower()
        flat = await self._call("user_devices", user)
        out: list[tuple[str, Posture]] = []
        for device, fields in zip(flat[::2], flat[1::2], strict=True):
            mine = [p for p in map(Posture.from_json, fields[1::2]) if p.user.lower() == user]
            best = in_force(mine)
            if best is not None:
                out.append((device, best))
        return [p for _, p in sorted(out, key=lambda item: item[0])]

    # -- attestations --------------------------------------------------------------

    async def commit_attestation(self, posture: Posture, nonce: str | None,
                                 now: float) -> CommitResult:
        """Consume ``nonce``, remember ``posture.jti`` per issuer and store the
        posture, atomically (one script). See :class:`~proxy.posture.PostureStore`."""
        if not posture.received_at:
            posture = dataclasses.replace(posture, received_at=now)
        expires = float(posture.exp + JTI_SKEW_S)
        ttl = int(max(expires - now, 0) + TTL_MARGIN_S)
        result = await self._call(
            "commit", nonce or "", repr(float(now)), device_key(posture.device_id),
            posture.authority, posture.platform, posture.iat, posture.signer, posture.jti,
            repr(expires), ttl, posture.user.lower(), posture.to_json(), self._origin)
        self._cache.pop(device_key(posture.device_id), None)
        return str(result)  # type: ignore[return-value]

    async def issue_nonce(self, nonce: str, expires_at: float) -> None:
        """Remember a freshly issued challenge; ``ValueError`` if issued before."""
        if self._closed:
            raise StoreUnavailable("posture store is closed")
        ttl = int(max(expires_at - time.time(), 0) + TTL_MARGIN_S)
        try:
            done = await self._client.set(f"{self.prefix}n:{nonce}", repr(float(expires_at)),
                                          nx=True, ex=ttl)
        except Exception as exc:
            if _unreachable(exc):
                raise self._went_down(exc) from exc
            raise
        if not done:
            raise ValueError("nonce was already issued")

    # -- trust records ---------------------------------------------------------------

    async def trust_records(self) -> TrustRecords:
        if self._replay_due:
            await self._replay_revocations()
        aliases, bound, revoked, seq = await self._call("trust")
        rev = {d: json.loads(r) for d, r in zip(revoked[::2], revoked[1::2], strict=True)}
        for device, record in rev.items():
            self.revocations.add(device, record)
        self._aliases = dict(zip(aliases[::2], aliases[1::2], strict=True))
        return TrustRecords(aliases=dict(self._aliases), bindings=frozenset(bound),
                            revoked={d: str(r.get("why", "")) for d, r in rev.items()},
                            change_seq=int(seq))

    async def changes_since(self, seq: int) -> tuple[int, list[Change]]:
        """Changes after ``seq`` made through other store objects (other instances,
        the CLI), and the position to ask from next time. When Redis came back or
        came back empty, the local revocations are replayed first and reported as
        changes, so the gate reloads its trust records."""
        replayed: list[str] = []
        if self._replay_due:
            replayed = await self._replay_revocations()
        cur, entries = await self._call("changes", seq)
        cur = int(cur)
        if cur < seq:  # Redis restarted without its data: put the revocations back
            replayed += await self._replay_revocations()
            cur, entries = await self._call("changes", 0)
            cur = int(cur)
        changes = [Change(cur, d, "revoked") for d in replayed]
        for entry_id, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            device, kind = fields.get("d", ""), fields.get("k", "")
            self._cache.pop(device, None)
            if kind == "unrevoked":
                self.revocations.remove(device)
            if fields.get("o") != self._origin:
                changes.append(Change(int(entry_id.split("-")[0]), device, kind))
        return cur, changes

    async def _replay_revocations(self) -> list[str]:
        """Put every locally kept revocation Redis lacks back (unless Redis recorded
        a later unrevocation). Returns the devices put back."""
        put_back: list[str] = []
        for device, record in list(self.revocations.items.items()):
            n = await self._call("replay_revoke", device, json.dumps(record, sort_keys=True),
                                 repr(float(record.get("at", 0))), self._origin)
            if int(n) == 1:
                put_back.append(device)
            elif int(n) == -1:  # unrevoked in Redis after we saw it
                self.revocations.remove(device)
        self._replay_due = False
        if put_back:
            log.warning("revocations replayed into redis", devices=len(put_back))
        return put_back

    async def revoke(self, device_id: str, why: str, actor: str) -> tuple[str, bool]:
        """(resolved device, newly revoked). Kept locally first; with Redis down it
        stands locally and is replayed into Redis when it answers."""
        key = device_key(device_id)
        record = {"why": why, "actor": actor, "at": time.time()}
        device = self._aliases.get(key, key)
        self.revocations.add(device, record)
        try:
            device, n = await self._call("revoke", key, json.dumps(record, sort_keys=True),
                                         self._origin)
        except StoreUnavailable:
            self._replay_due = True
            log.warning("revocation kept locally until redis answers", device=device)
            return device, True
        self.revocations.add(device, record)
        return device, bool(n)

    async def unrevoke(self, device_id: str) -> tuple[str, bool]:
        device, n = await self._call("unrevoke", device_key(device_id), repr(time.time()),
                                     self._origin)
        self.revocations.remove(device, device_key(device_id))
        return device, bool(n)

    async def unbind(self, device_id: str) -> tuple[str, bool]:
        device, n = await self._call("unbind", device_key(device_id), self._origin)
        return device, bool(n)

    async def bind(self, device: str) -> bool:
        return bool(await self._call("bind", device, repr(time.time()), self._origin))

    async def forget(self, device_id: str) -> tuple[str, bool]:
        device, n = await self._call("forget", device_key(device_id), self._origin)
        self._cache.clear()
        return device, bool(n)

    async def alias(self, device_id: str, other: str) -> str:
        device, old = await self._call("alias", device_key(device_id), device_key(other),
                                       self._origin)
        self._cache.clear()
        moved = self.revocations.items.get(old)
        if old != device and moved is not None:
            self.revocations.remove(old)
            self.revocations.add(device, moved)
        return str(device)

    # -- MDM connectors (proxy.mdm): a page of devices per script ------------------

    async def mdm_commit(self, writes: list[MdmWrite], now: float) -> list[MdmResult]:
        """Store a page of connector postures, as the SQLite store does
        (:func:`proxy.posture.sqlite_mdm.commit`): one script, one round trip."""
        args: list[object] = [self._origin]
        for w in writes:
            p = w.posture if w.posture.received_at else dataclasses.replace(
                w.posture, received_at=now)
            text = p.to_json()
            args += [device_key(p.device_id), p.authority, p.user.lower(), text,
                     hashlib.sha256(content(text).encode()).hexdigest(), p.iat,
                     json.dumps([device_key(a) for a in w.aliases])]
        rows = await self._call("mdm_commit", *args) if writes else []
        self._cache.clear()
        return [MdmResult(str(device), outcome, Posture.from_json(prev) if prev else None,
                          bool(aliased)) for device, outcome, prev, aliased in rows]

    async def mdm_devices(self, authority: str) -> set[str]:
        return {str(d) for d in await self._call("mdm_devices", authority)}

    async def mdm_remove(self, devices: list[str], authority: str, now: float) -> list[str]:
        """The devices lose ``authority``'s posture and their own reports; returns
        the devices that had any."""
        if not devices:
            return []
        removed = await self._call("mdm_remove", authority, self._origin,
                                   *[device_key(d) for d in devices])
        self._cache.clear()
        return [str(d) for d in removed]

    async def not_seen_since(self, before: float) -> list[str]:
        """Devices whose newest posture was made before ``before`` (``[posture]
        forget_after``)."""
        return [str(d) for d in await self._call("not_seen", repr(float(before)))]

    async def list_devices(self, *, revoked_only: bool = False) -> list[dict[str, Any]]:
        postures, bound, aliases, revoked = await self._call("dump")
        return _device_list(postures, bound, aliases, revoked, revoked_only)

    # -- the policy pointer (proxy.policies.pointer.RedisPointer) ----------------------

    async def policy_pointer(self, instance: str) -> tuple[str, str, list[str]]:
        """(active SHA-256 or "", ``instance``'s file SHA-256 or "", history entries as
        JSON), in one round trip."""
        active, file_sha, history = await self._call("policy_pointer", instance)
        return str(active), str(file_sha), [str(h) for h in history]

    async def move_policy_pointer(self, sha256: str, text: str, entry: str, instance: str,
                                  file_sha256: str) -> int:
        """Store the text, make it active and append ``entry`` (JSON) to the history,
        atomically; ``file_sha256`` "" leaves the instance's file digest alone."""
        return int(await self._call("policy_move", sha256, text, entry, instance,
                                    file_sha256))

    async def policy_stamp(self) -> str:
        """Changes whenever the pointer moves (one round trip)."""
        return str(await self._call("policy_stamp"))

    async def note_policy_file(self, instance: str, file_sha256: str) -> None:
        await self._call("policy_note_file", instance, file_sha256)

    async def policy_text(self, sha256: str) -> str | None:
        text = await self._call("policy_text", sha256)
        return str(text) if text else None

    # -- shared notice rate (proxy.notify_memory) ---------------------------------------

    async def claim_notice(self, key: str, now: float, window_s: float, count: int) -> bool:
        """One notice under ``key`` at ``now`` if fewer than ``count`` went out in the
        ``window_s`` before (by any instance); one round trip. While Redis is known to
        be down this fails at once (a login is not held up by a second timeout; the
        caller's own memory decides), until another call finds it back."""
        if not self.available:
            raise StoreUnavailable(self._why_down())
        return bool(await self._call("notice_claim", key, repr(float(now)),
                                     repr(float(window_s)), count))

    # -- every device (proxy.policies.preview) ------------------------------------------

    async def posture_pages(self, count: int = 1000) -> AsyncIterator[list[Any]]:
        """Every device's postures, a page (about ``count`` devices, one round trip, a
        short script) at a time: ``[[device, [posture as a JSON object, ...]], ...]``
        (decoded once per page; :meth:`Posture.from_json` semantics are the caller's)."""
        cursor, text = await self._call("posture_page", "0", count)
        while True:  # the next page is asked for before this one is decoded
            nxt = None if str(cursor) == "0" else asyncio.ensure_future(
                self._call("posture_page", cursor, count))
            try:
                yield json.loads(text)
            except BaseException:
                if nxt is not None:
                    nxt.cancel()
                raise
            if nxt is None:
                return
            cursor, text = await nxt

    # -- health -------------------------------------------------------------------------

    async def ping(self) -> bool:
        if self._closed:
            return False
        try:
            ok = bool(await self._client.ping())
        except Exception as exc:
            if not _unreachable(exc):
                raise
            self._went_down(exc)
            return False
        if ok and not self.available:
            self.available, self._replay_due = True, True
        return ok

    def degraded(self) -> list[str]:
        """What ``/readyz`` names: Redis unreachable, or refusing our credentials
        (decisions from the cache either way)."""
        if self.available:
            return []
        what = "redis_credentials_refused" if self.credentials_refused else "redis_unreachable"
        return [f"{what}:decisions_from_cache_max_{self.cache_max_age_s:.0f}s"]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.aclose()
        except Exception as exc:
            log.debug("closing redis failed", error=str(exc))


def _device_list(postures: list[Any], bound: list[str], aliases: list[str],
                 revoked: list[str], revoked_only: bool) -> list[dict[str, Any]]:
    """The ``device list`` rows, as the SQLite store gives them."""
    devices: dict[str, dict[str, Any]] = {}

    def entry(device: str) -> dict[str, Any]:
        return devices.setdefault(device, {
            "device": device, "aliases": [], "user": None, "platform": None,
            "sources": [], "bound": False, "revoked": None})

    for device, fields in zip(postures[::2], postures[1::2], strict=True):
        e = entry(device)
        for authority, text in sorted(zip(fields[::2], fields[1::2], strict=True)):
            p = Posture.from_json(text)
            e["sources"].append(authority)
            if e["user"] is None or p.is_mdm:
                e["user"], e["platform"] = p.user, p.platform
    for device in bound:
        entry(device)["bound"] = True
    for a, device in sorted(zip(aliases[::2], aliases[1::2], strict=True)):
        entry(device)["aliases"].append(a)
    for device, text in zip(revoked[::2], revoked[1::2], strict=True):
        entry(device)["revoked"] = json.loads(text)
    out = sorted(devices.values(), key=lambda e: e["device"])
    return [e for e in out if e["revoked"]] if revoked_only else out


def _safe(url: str) -> str:
    """``url`` without its password (for logs)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()
