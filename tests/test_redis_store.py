"""The Redis posture store as several instances share it, and when Redis goes away.

A real ``redis-server`` (tests/peers/redis.py) on a free loopback port; each store
object stands for one ``mailward serve`` instance."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from test_posture_store import NOW, make_posture

from proxy.posture import POSTURE_CACHED, open_store
from proxy.posture.redis import RedisPostureStore, StoreUnavailable, parse_sentinel_url

pytestmark = pytest.mark.peer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[object]:
    from peers.redis import RedisServer

    with RedisServer(tmp_path / "redis", password="s3cret") as srv:
        yield srv


@pytest.fixture
async def pair(server: object) -> AsyncIterator[tuple[RedisPostureStore, RedisPostureStore]]:
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    a = RedisPostureStore(server.url, prefix=prefix)  # type: ignore[attr-defined]
    b = RedisPostureStore(server.url, prefix=prefix)  # type: ignore[attr-defined]
    yield a, b
    await a.close()
    await b.close()


def test_sentinel_url_parsing() -> None:
    """redis+sentinel:// names the sentinels, the service, the database and the password."""
    hosts, service, db, kw = parse_sentinel_url(
        "redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380/mymaster/2?ssl_ca_certs=/ca.pem")
    assert hosts == [("10.0.0.1", 26379), ("::1", 26380)]
    assert (service, db) == ("mymaster", 2)
    assert kw == {"password": "pw", "ssl_ca_certs": "/ca.pem"}
    assert parse_sentinel_url("redis+sentinel://h:1/m?ssl=true&sentinel_password=sp")[3] == \
        {"ssl": True, "sentinel_password": "sp"}
    assert parse_sentinel_url("redis+sentinel://h:1/m?ssl=false")[3] == {"ssl": False}
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/x", "redis+sentinel://h:1/a/b/c",
                "redis+sentinel://h:1/m?ssl=1", "redis+sentinel://h:1/m?db=2"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)


def test_open_store_selects_redis(tmp_path: Path) -> None:
    """open_store picks the Redis store for redis://, rediss:// and redis+sentinel://."""
    for url in ("redis://127.0.0.1:1/0", "rediss://:pw@127.0.0.1:1/0?ssl_ca_certs=/x.pem",
                "redis+sentinel://127.0.0.1:1/mymaster"):
        assert isinstance(open_store(url, state_dir=tmp_path), RedisPostureStore)


async def test_replay_on_another_instance_is_refused(pair) -> None:
    """A report accepted on instance A is a replay on instance B; B reads A's posture."""
    a, b = pair
    p = make_posture()
    assert await a.commit_attestation(p, None, NOW) == "ok"
    assert await b.commit_attestation(p, None, NOW + 1) == "replay"
    got = await b.get("DEV-1")
    assert got is not None and got.jti == p.jti
    await b.issue_nonce("n-x", NOW + 60)
    results = await asyncio.gather(
        a.commit_attestation(make_posture(jti="j1"), "n-x", NOW),
        b.commit_attestation(make_posture(jti="j2"), "n-x", NOW))
    assert sorted(results) == ["bad_nonce", "ok"]


async def test_change_feed_between_instances(pair) -> None:
    """Instance B's feed shows A's posture change and revocation, not B's own changes."""
    a, b = pair
    seq, _ = await b.changes_since(0)
    await b.bind("mine")
    await a.commit_attestation(make_posture("Phone-2"), None, NOW)
    await a.revoke("Phone-1", "lost", "ops")
    seq, changes = await b.changes_since(seq)
    assert [(c.device, c.kind) for c in changes] == [("phone-2", "posture"),
                                                      ("phone-1", "revoked")]
    assert await b.changes_since(seq) == (seq, [])
    assert (await b.trust_records()).revoked == {"phone-1": "lost"}


async def test_redis_down_decides_from_cache_then_recovers(server, tmp_path: Path) -> None:
    """With Redis stopped: reads come from the local cache (marked cached) only while
    young enough, reports and nonces fail, a revocation stands locally; after Redis
    restarts empty, the revocation is replayed into it and the others see it."""
    clock = [1000.0]
    a = RedisPostureStore(server.url, state_dir=tmp_path, cache_max_age_s=300,
                          clock=lambda: clock[0])
    b = RedisPostureStore(server.url)
    try:
        assert await a.commit_attestation(make_posture(), None, NOW) == "ok"
        assert await a.get("dev-1") is not None  # read through: now cached
        assert (await a.trust_records()).revoked == {}
        server.stop()  # type: ignore[attr-defined]
        for aof in (Path(server.workdir)).glob("appendonly*"):  # type: ignore[attr-defined]
            import shutil

            shutil.rmtree(aof) if aof.is_dir() else aof.unlink()  # Redis comes back empty

        POSTURE_CACHED.set(False)
        got = await a.get("dev-1")
        assert got is not None and POSTURE_CACHED.get() is True
        assert a.degraded() and not await a.ping()
        with pytest.raises(StoreUnavailable):
            await a.get("dev-never-read")
        with pytest.raises(StoreUnavailable):
            await a.commit_attestation(make_posture(jti="other"), None, NOW)
        with pytest.raises(StoreUnavailable):
            await a.issue_nonce("n", NOW + 60)
        assert await a.revoke("Lost-Phone", "lost on the train", "ops") == ("lost-phone", True)
        saved = json.loads((tmp_path / "revocations.json").read_text())
        assert saved["lost-phone"]["why"] == "lost on the train"
        clock[0] += 301
        with pytest.raises(StoreUnavailable):  # the cache is too old now
            await a.get("dev-1")

        server.start()  # type: ignore[attr-defined]
        _, changes = await a.changes_since(0)
        assert ("lost-phone", "revoked") in [(c.device, c.kind) for c in changes]
        assert a.available and a.degraded() == []
        assert (await b.trust_records()).revoked == {"lost-phone": "lost on the train"}
    finally:
        await a.close()
        await b.close()


async def test_revocations_outlive_a_redis_that_lost_them(server, tmp_path: Path) -> None:
    """An instance whose local copy holds a revocation puts it back when Redis comes
    back empty between two polls (its feed position went backwards), unless Redis
    recorded a later unrevocation."""
    a = RedisPostureStore(server.url, state_dir=tmp_path)
    try:
        await a.revoke("phone-9", "stolen", "ops")
        await a.revoke("phone-8", "stolen", "ops")
        await a.unrevoke("phone-8")
        seq, _ = await a.changes_since(0)
        assert seq > 0
        await a._client.flushall()  # what a restart without persistence does
        _, changes = await a.changes_since(seq)
        assert [(c.device, c.kind) for c in changes] == [("phone-9", "revoked")]
        assert set((await a.trust_records()).revoked) == {"phone-9"}
    finally:
        await a.close()
