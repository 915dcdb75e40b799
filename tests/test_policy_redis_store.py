"""The Redis side of policy changes without a server, on a real ``redis-server``:
preview reads the same devices from Redis as from SQLite and reaches the same
verdicts, the pointer and its history are shared by every store object, a policy an
instance cannot load is not applied (and named), and the notice rate (mail and IMAP
ALERT) holds across instances."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from helpers.fakes import ListAudit
from peers.redis import RedisServer
from test_notify import World, policy
from test_policy_ops import BASE, TELEGRAM_RULE, TIKTOK, TIKTOK_RULE

from proxy.cli_ops import init_deployment
from proxy.config import Config, load_config
from proxy.config.policy_file import load_policy
from proxy.gate import Gate
from proxy.policies.live import LivePolicy
from proxy.policies.pointer import PolicyVersions, RedisPointer
from proxy.policies.preview import (
    REDIS_PAGE,
    compare_devices,
    read_devices,
    read_redis_devices,
    relevant_to,
)
from proxy.policies.store import PolicyStore
from proxy.posture import App, Posture
from proxy.posture.redis import RedisPostureStore
from proxy.posture.sqlite import SqlitePostureStore
from proxy.server import PolicyHolder

pytestmark = pytest.mark.peer

APPS = (TIKTOK, "org.telegram.messenger", "com.example.mail", "com.example.game",
        "com.microsoft.office.outlook")
DOMAINS = ("corp.example", "sales.corp.example")
#: More devices than one page, so paging is exercised.
DEVICES = REDIS_PAGE + 700


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisPostureStore]:
    s = RedisPostureStore(redis_url, prefix=f"t-{uuid.uuid4().hex[:8]}:")
    yield s
    await s.close()


def postures(seed: int, n: int) -> list[Posture]:
    """``n`` phones with random apps, platforms, users and ages."""
    rng, now = random.Random(seed), int(time.time())
    out = []
    for i in range(n):
        apps = tuple(App(a, "1.0", a.rsplit(".", 1)[-1]) for a in APPS if rng.random() < 0.3)
        user = f"u{i % (n // 2 + 1)}@{rng.choice(DOMAINS)}"
        iat = now - rng.choice((60, 3600, 2 * 86400))  # the last one is too old (24h)
        out.append(Posture(f"Dev-{i}", user, rng.choice(("android", "ios", "windows")), "14",
                           rng.random() < 0.8, apps, iat, iat + 30 * 86400, f"j-{seed}-{i}",
                           "device", "device"))
    return out


async def fill(stores: list[Any], items: list[Posture]) -> None:
    now = time.time()
    for s in stores:
        for p in items:
            assert await s.commit_attestation(p, None, now) == "ok"
        for p in items[::97]:
            await s.revoke(p.device_id, "lost", "test")
        for i, p in enumerate(items[5::211]):
            await s.alias(f"old-{i}", p.device_id)


async def test_preview_reads_the_same_devices_and_verdicts_from_redis_and_sqlite(
        store: RedisPostureStore, tmp_path: Path) -> None:
    """The same phones in SQLite and in Redis: the devices read for a preview (apps
    filtered the same way), the revoked ones and the aliases are equal, and so is every
    device's verdict under a ban on TikTok and Telegram with groups."""
    sqlite = SqlitePostureStore(tmp_path / "posture.db")
    items = postures(18, DEVICES)
    try:
        await fill([sqlite, store], items)
    finally:
        await sqlite.close()
    base = load_policy(_write(tmp_path / "base.toml", BASE.format(version="b", rules="")))
    ban = load_policy(_write(tmp_path / "ban.toml", BASE.format(
        version="ban", rules=TIKTOK_RULE + TELEGRAM_RULE)))
    keep = relevant_to(base, ban)
    from_sqlite = read_devices(tmp_path / "posture.db", keep)
    other = RedisPostureStore(store.url, prefix=store.prefix)  # read_redis_devices closes it
    from_redis = await read_redis_devices(other, keep)
    assert len(from_redis.postures) == DEVICES
    assert from_redis.postures == from_sqlite.postures
    assert from_redis.revoked == from_sqlite.revoked and len(from_redis.revoked) > 10
    assert from_redis.aliases == from_sqlite.aliases and len(from_redis.aliases) > 5
    now = datetime.now(UTC)
    a = compare_devices(from_sqlite, base, ban, now).to_dict()
    b = compare_devices(from_redis, base, ban, now).to_dict()
    assert a == b and 0 < a["newly_denied"] < DEVICES


async def test_pointer_and_history_are_shared_by_every_instance(
        store: RedisPostureStore, tmp_path: Path) -> None:
    """A policy put in force through one instance's store is what another instance
    reads (and can load, from Redis's copy of the text), with the same history; each
    instance keeps its own policy file digest."""
    a = PolicyVersions(PolicyStore(tmp_path / "a"), RedisPointer(store, "a"))
    other = RedisPostureStore(store.url, prefix=store.prefix)
    b = PolicyVersions(PolicyStore(tmp_path / "b"), RedisPointer(other, "b", owned=True))
    try:
        assert await b.read() is None
        path = _write(tmp_path / "p1.toml", BASE.format(version="one", rules=""))
        one = load_policy(path)
        await a.activate(one, path.read_bytes(), how="start", actor="ops", file_sha256="f1")
        stamp = await b.stamp()
        path = _write(tmp_path / "p2.toml", BASE.format(version="two", rules=TIKTOK_RULE))
        two = load_policy(path)
        await a.activate(two, path.read_bytes(), how="push", actor="ops")
        assert await b.stamp() != stamp
        pa, pb = await a.read(), await b.read()
        assert pa is not None and pb is not None
        assert pa.history == pb.history and [e.how for e in pb.history] == ["start", "push"]
        assert (pa.file_sha256, pb.file_sha256) == ("f1", "")
        assert (await b.load(pb.active)).sha256 == two.sha256  # fetched from Redis
        assert (tmp_path / "b/policies" / f"{two.sha256}.toml").exists()
        assert await b.resolve("one") == one.sha256
    finally:
        await b.close()


async def test_notice_rate_is_shared_across_instances(
        store: RedisPostureStore, tmp_path: Path) -> None:
    """Two instances (two notifiers, two store objects on one Redis) see the same
    phone: one IMAP ALERT and one warning mail between them that day; the next day
    one ALERT again."""
    other = RedisPostureStore(store.url, prefix=store.prefix)
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    worlds = [World(tmp_path / n, policy(days_ahead=3)) for n in ("a", "b")]
    try:
        for w, s in zip(worlds, (store, other), strict=True):
            w.notifier.memory.shared = s.claim_notice
            await w.notifier.start()
        alerts = [(await w.login())[1] for w in worlds for _ in range(2)]
        assert sum(a is not None for a in alerts) == 1
        for w in worlds:
            await w.settle()
        assert sum(len(w.outbox.sent) for w in worlds) == 1
        for w in worlds:
            w.clock[0] += 86400 + 1
        alerts = [(await w.login())[1] for w in reversed(worlds)]
        assert [a is not None for a in alerts] == [True, False]
    finally:
        for w in worlds:
            await w.notifier.close()
        await other.close()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@dataclass
class LiveSetup:
    """One instance's policy machinery on the Redis ``store`` (no listeners)."""

    cfg: Config
    holder: PolicyHolder
    audit: ListAudit
    gate: Gate
    live: LivePolicy


async def _live_on(store: RedisPostureStore, tmp_path: Path) -> LiveSetup:
    """A deployment in ``tmp_path`` whose posture store is ``store``, its policy in
    force through the Redis pointer."""
    init_deployment(tmp_path)
    cfg_path = tmp_path / "config/mailward.toml"
    cfg_path.write_text(cfg_path.read_text().replace(
        'store = "sqlite:///state/posture.db"', f'store = "{store.url}"'))
    cfg = load_config(cfg_path)
    holder = PolicyHolder(load_policy(cfg.server.policy))
    audit = ListAudit()
    gate = Gate(store=store, audit=audit, policy=holder.current)
    live = LivePolicy(cfg, holder, gate.observer, asyncio.Lock(), audit.write)
    live.use_pointer(store)
    await live.at_start()
    return LiveSetup(cfg, holder, audit, gate, live)


async def test_a_policy_this_instance_cannot_load_is_not_applied(
        store: RedisPostureStore, tmp_path: Path) -> None:
    """A pointer moved (by another instance) to a text this instance cannot load keeps
    the policy in force and names ``policy_not_applied:<sha12>`` in /readyz's degraded
    list; a loadable move afterwards is applied and clears it."""
    on = await _live_on(store, tmp_path)
    holder, audit, gate, live = on.holder, on.audit, on.gate, on.live
    start = holder.current()
    bad = 'version = "bad"\nmode = "sometimes"\n'
    sha = hashlib.sha256(bad.encode()).hexdigest()
    entry = {"sha256": sha, "version": "bad", "when": "2026-12-02T00:00:00Z", "how": "push",
             "actor": "other"}
    await store.move_policy_pointer(sha, bad, json.dumps(entry), "b", "")
    stopped = False
    watcher = asyncio.create_task(live.watch(gate, stop=lambda: stopped))
    try:
        for _ in range(40):
            if live.degraded():
                break
            await asyncio.sleep(0.05)
        assert live.degraded() == [f"policy_not_applied:{sha[:12]}"]
        assert holder.current().sha256 == start.sha256
        good = _write(tmp_path / "good.toml", BASE.format(version="good", rules=TIKTOK_RULE))
        await PolicyVersions(PolicyStore(tmp_path / "b"), RedisPointer(store, "b")).activate(
            load_policy(good), good.read_bytes(), how="push", actor="other")
        for _ in range(40):
            if holder.current().version == "good":
                break
            await asyncio.sleep(0.05)
        assert holder.current().version == "good" and live.degraded() == []
        [applied] = [r for r in audit.records if r.get("event") == "policy_reload"]
        assert (applied["trigger"], applied["how"], applied["actor"]) == ("store", "push",
                                                                        "other")
    finally:
        stopped = True
        await watcher


async def test_a_file_change_applied_during_an_outage_is_shared_when_redis_returns(
        store: RedisPostureStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy file change applied while the pointer cannot be moved is in force here
    and named ``policy_not_shared``; once the pointer can be moved again the watcher
    puts it in force for every instance (another instance's view of the pointer names
    it) and the degraded state clears."""
    on = await _live_on(store, tmp_path)
    cfg, holder, gate, live = on.cfg, on.holder, on.gate, on.live
    moves = store.move_policy_pointer

    async def unreachable(*args: Any) -> None:
        raise redis.exceptions.ConnectionError("Redis is down")

    monkeypatch.setattr(store, "move_policy_pointer", unreachable)
    _write(cfg.server.policy, BASE.format(version="outage", rules=TIKTOK_RULE))
    assert await live.reload(gate, "sighup")
    assert holder.current().version == "outage" and live.degraded() == ["policy_not_shared"]
    other = PolicyVersions(PolicyStore(tmp_path / "b"), RedisPointer(store, "b"))
    assert (await other.active()).version != "outage"  # type: ignore[union-attr]
    monkeypatch.setattr(store, "move_policy_pointer", moves)
    stopped = False
    watcher = asyncio.create_task(live.watch(gate, stop=lambda: stopped))
    try:
        for _ in range(40):
            if not live.degraded():
                break
            await asyncio.sleep(0.05)
        assert live.degraded() == []
        active = await other.active()
        assert active is not None and active.version == "outage"
        assert (await other.read()).history[-1].how == "file"  # type: ignore[union-attr]
    finally:
        stopped = True
        await watcher


async def test_a_move_asked_of_a_lagging_instance_records_what_was_really_in_force(
        store: RedisPostureStore, tmp_path: Path) -> None:
    """Between its polls an instance's own policy can lag a move made elsewhere. A
    rollback asked of it then still starts from what the shared pointer names: the
    record and the answer say the fleet moved from the other instance's push back to
    the version before it (not from this instance's stale copy)."""
    on = await _live_on(store, tmp_path)  # no watcher: this instance does not follow
    start = on.holder.current()
    ban = _write(tmp_path / "ban.toml", BASE.format(version="ban-elsewhere", rules=TIKTOK_RULE))
    await PolicyVersions(PolicyStore(tmp_path / "b"), RedisPointer(store, "b")).activate(
        load_policy(ban), ban.read_bytes(), how="push", actor="other")
    assert on.holder.current().sha256 == start.sha256  # lagging
    answer = await on.live.rollback(on.gate, None, "admin")
    assert (answer["from_version"], answer["to_version"]) == ("ban-elsewhere", start.version)
    [record] = [r for r in on.audit.records if r.get("event") == "policy_rollback"]
    assert (record["from_version"], record["to_version"]) == ("ban-elsewhere", start.version)
    assert on.holder.current().sha256 == start.sha256


async def test_a_push_fixes_a_pointer_this_instance_cannot_load(
        store: RedisPostureStore, tmp_path: Path) -> None:
    """The pointer names a text this instance cannot load: a push through this
    instance (what an operator does about it) still goes through, starting from the
    policy this instance has in force."""
    on = await _live_on(store, tmp_path)
    start = on.holder.current()
    bad = 'version = "bad"\nmode = "sometimes"\n'
    sha = hashlib.sha256(bad.encode()).hexdigest()
    entry = {"sha256": sha, "version": "bad", "when": "2026-12-02T00:00:00Z", "how": "push",
             "actor": "other"}
    await store.move_policy_pointer(sha, bad, json.dumps(entry), "b", "")
    good = BASE.format(version="fixed", rules=TIKTOK_RULE)
    answer = await on.live.push(on.gate, good, "admin")
    assert (answer["from_version"], answer["to_version"]) == (start.version, "fixed")
    assert on.holder.current().version == "fixed"
