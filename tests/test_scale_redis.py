"""The Redis store over TLS (``rediss://`` with a CA file and a password) and through
Sentinel (``redis+sentinel://``: master discovery and a real failover), against real
``redis-server`` processes (tests/peers/redis.py). Each store object stands for one
``mailward serve`` instance."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers.redis import RedisSentinel, RedisServer, TlsFiles
from test_posture_store import NOW, make_posture

from proxy.pki import certs_init
from proxy.posture import Posture
from proxy.posture.redis import SOCKET_TIMEOUT_S, RedisPostureStore, StoreUnavailable

pytestmark = pytest.mark.peer

PASSWORD = "s3cret-pw"


def tls_files(tmp_path: Path) -> TlsFiles:
    """Certificates from ``mailward certs init`` (the server certificate names
    127.0.0.1)."""
    certs = tmp_path / "certs"
    certs_init(certs)
    return TlsFiles(certs / "server.pem", certs / "server.key", certs / "ca.pem")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A TLS-only Redis (no plain port) with a password."""
    with RedisServer(tmp_path / "redis", password=PASSWORD, tls=tls_files(tmp_path)) as srv:
        yield srv


async def test_rediss_with_ca_file_and_password(tls_redis: RedisServer, tmp_path: Path) -> None:
    """Over rediss:// (CA file and password in the URL, as README says) instance B reads
    A's report and refuses its replay; the CLI reaches the same Redis through the
    config; a plain connection, another CA or no password do not get in."""
    assert tls_redis.url.startswith(f"rediss://:{PASSWORD}@127.0.0.1:")
    a, b = RedisPostureStore(tls_redis.url), RedisPostureStore(tls_redis.url)
    others = [RedisPostureStore(u) for u in (
        f"redis://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0",  # no TLS
        f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0",  # system CAs only
        tls_redis.url.replace(f":{PASSWORD}@", ""),  # no password
        tls_redis.url.replace(f":{PASSWORD}@", ":not-the-password@"))]
    try:
        p = make_posture("tls-dev")
        assert await a.commit_attestation(p, None, NOW) == "ok"
        assert await b.commit_attestation(p, None, NOW + 1) == "replay"
        got = await b.get("tls-dev")
        assert got is not None and got.jti == p.jti
        assert not any([await s.ping() for s in others])
        assert "CERTIFICATE_VERIFY_FAILED" in others[1].last_error
        assert "AuthenticationError" in others[2].last_error
        assert "AuthenticationError" in others[3].last_error
        # /readyz tells a password problem (the operator must act) from an outage
        assert others[0].degraded()[0].startswith("redis_unreachable:")
        for refused in others[2:]:
            assert refused.degraded()[0].startswith("redis_credentials_refused:")
        with pytest.raises(StoreUnavailable, match="refused the credentials"):
            await others[3].get("tls-dev")  # nothing cached: refused (temporarily)
        wrong = others[3].url
        failed = _cli(tmp_path / "wrong", wrong, "device", "revoke", "tls-dev", "--why", "x",
                      status=2)
        assert failed.count("\n") == 1 and "refused the credentials" in failed, failed
        assert "internal error" not in failed and PASSWORD not in failed
        _cli(tmp_path / "site", tls_redis.url, "device", "revoke", "tls-dev", "--why", "lost")
        revoked = (await b.trust_records()).revoked
        assert revoked == {"tls-dev": "lost"}
    finally:
        for s in (a, b, *others):
            await s.close()


def _cli(site: Path, store_url: str, *args: str, status: int = 0) -> str:
    """Run ``mailward`` with a config made by ``mailward init`` whose store is
    ``store_url``; its standard output (exit ``status`` asserted), or its standard
    error when ``status`` is not 0."""
    mailward = str(Path(sys.executable).with_name("mailward"))
    cfg = site / "config/mailward.toml"
    if not cfg.exists():
        subprocess.run([mailward, "init", str(site)], check=True, capture_output=True)
        text = cfg.read_text()
        cfg.write_text(text.replace('store = "sqlite:///state/posture.db"',
                                    f"store = {json.dumps(store_url)}", 1))
    done = subprocess.run([mailward, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MAILWARD_CONFIG": str(cfg)}, cwd=site)
    assert done.returncode == status, done.stdout + done.stderr
    return done.stdout if status == 0 else done.stderr


@pytest.fixture(params=["plain", "tls"])
def sentinel_set(request: pytest.FixtureRequest, tmp_path: Path
                 ) -> Iterator[tuple[RedisServer, RedisServer, RedisSentinel]]:
    """A master and its replica (both with a password) and one Sentinel watching
    them, started once the replica is in sync so Sentinel's first look finds it; all
    three TLS-only in the ``tls`` run (``?ssl=true&ssl_ca_certs=`` in the URL)."""
    tls = tls_files(tmp_path) if request.param == "tls" else None
    master = RedisServer(tmp_path / "master", password=PASSWORD, tls=tls).start()
    replica = sentinel = None
    try:
        replica = RedisServer(tmp_path / "replica", password=PASSWORD, tls=tls,
                              replica_of=master.port).start()
        _until(lambda: _link_up(replica), 15, "replica in sync")
        sentinel = RedisSentinel(tmp_path / "sentinel", master).start()
        _until(lambda: sentinel.good_replicas() >= 1, 20, "Sentinel found the replica")
        yield master, replica, sentinel
    finally:
        for srv in (sentinel, replica, master):
            if srv is not None:
                srv.stop()


def _link_up(replica: RedisServer) -> bool:
    with replica.client() as c:
        return bool(c.info("replication").get("master_link_status") == "up")


def _until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.1)


async def test_sentinel_master_discovery_and_failover(sentinel_set: Any) -> None:
    """Through redis+sentinel:// (only Sentinel's address in the URL) A's report lands
    on the master and B reads it; when the master dies, Sentinel promotes the replica
    and both instances carry on there: the posture and the replay memory survived,
    and a new report is written to the new master. A sentinel that never answers,
    listed first, is skipped after a socket timeout. The same over TLS (sentinels,
    master and replica), where a client without it gets nowhere."""
    master, replica, sentinel = sentinel_set
    assert str(master.port) not in sentinel.url and sentinel.master_port() == master.port
    a, b = RedisPostureStore(sentinel.url), RedisPostureStore(sentinel.url)
    try:
        first = make_posture("s-dev")
        assert await a.commit_attestation(first, None, NOW) == "ok"
        assert _stored(master, "s-dev") and await _read(b, "s-dev") == first.jti
        _until(lambda: _stored(replica, "s-dev"), 10, "replicated")
        await _silent_sentinel_is_skipped(sentinel.url, first.jti)
        if sentinel.tls is not None:  # TLS to the sentinels too: plain gets nowhere
            plain = RedisPostureStore(sentinel.url.partition("?")[0])
            try:
                assert not await plain.ping()
            finally:
                await plain.close()

        assert master.proc is not None
        master.proc.kill()  # a crash, not a shutdown
        master.proc.wait()
        master.proc = None
        down = time.monotonic()
        _until(lambda: sentinel.master_port() == replica.port, 30, "failover")
        # Until Sentinel is done, the stores find no master (reads come from the cache).
        replayed = await _settled(lambda: a.commit_attestation(first, None, NOW + 2), down)
        assert replayed == "replay"
        mine = await _settled(lambda: b.devices_for_user(first.user), down)  # never cached
        assert [p.jti for p in mine] == [first.jti]
        second = make_posture("s-dev", jti="after-failover", iat=int(NOW))
        assert await a.commit_attestation(second, None, NOW + 3) == "ok"
        assert await _read(b, "s-dev") == "after-failover"
        with replica.client() as c:
            assert c.info("replication")["role"] == "master"
    finally:
        await a.close()
        await b.close()


async def _silent_sentinel_is_skipped(url: str, jti: str) -> None:
    """A sentinel address that accepts connections and never answers, listed first,
    costs one socket timeout, not a hung login."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        store = RedisPostureStore(url.replace("@127.0.0.1:", f"@127.0.0.1:{port},127.0.0.1:"))
        try:
            started = time.monotonic()
            assert await asyncio.wait_for(_read(store, "s-dev"), 10) == jti
            assert time.monotonic() - started < SOCKET_TIMEOUT_S * 3
        finally:
            await store.close()


async def _settled(op: Any, since: float, timeout_s: float = 30) -> Any:
    """``op()`` once the store reaches a master again."""
    while True:
        try:
            return await op()
        except StoreUnavailable:
            if time.monotonic() - since > timeout_s:
                raise
            await asyncio.sleep(0.2)


def _stored(srv: RedisServer, device: str) -> bool:
    with srv.client() as c:
        return bool(c.hgetall(f"mailward:p:{device}"))


async def _read(store: RedisPostureStore, device: str) -> str | None:
    got: Posture | None = await store.get(device)
    return None if got is None else got.jti


async def test_not_seen_since_for_forget_after(tmp_path: Path) -> None:
    """The forget_after sweep's question on Redis: devices whose newest posture (any
    report) is older than the cut-off, as every instance sees it; forgetting one or
    folding it into an alias takes it off the list."""
    with RedisServer(tmp_path / "redis") as srv:
        a, b = RedisPostureStore(srv.url), RedisPostureStore(srv.url)
        try:
            for dev, age in (("old-1", 1000), ("old-2", 900), ("new-1", 10)):
                p = make_posture(dev, iat=int(NOW) - age, jti=f"j-{dev}")
                assert await a.commit_attestation(p, None, NOW) == "ok"
            newer = make_posture("old-2", iat=int(NOW) - 5, jti="j-old-2-again")
            assert await a.commit_attestation(newer, None, NOW) == "ok"
            assert sorted(await b.not_seen_since(NOW - 100)) == ["old-1"]
            assert sorted(await b.not_seen_since(NOW)) == ["new-1", "old-1", "old-2"]
            await a.alias("new-1", "old-1")  # old-1's posture moves to new-1
            assert await b.not_seen_since(NOW - 100) == []
            await a.forget("new-1")
            assert sorted(await b.not_seen_since(NOW)) == ["old-2"]
        finally:
            await a.close()
            await b.close()


async def test_alias_index_built_for_data_from_before_it(tmp_path: Path) -> None:
    """Aliases stored before the reverse index existed are found by the next alias
    (repointed to the surviving device) and by a forget (removed)."""
    with RedisServer(tmp_path / "redis") as srv:
        a = RedisPostureStore(srv.url)
        try:
            await a.alias("dev-a", "old-1")
            await a.alias("dev-a", "old-2")
            with srv.client() as c:  # as a Redis written before this index
                c.delete(*c.keys("mailward:ra:*"))
            await a.alias("dev-b", "dev-a")
            assert (await a.trust_records()).aliases == {
                "old-1": "dev-b", "old-2": "dev-b", "dev-a": "dev-b"}
            await a.forget("dev-b")
            assert (await a.trust_records()).aliases == {}
            with srv.client() as c:
                assert c.hlen("mailward:alias") == 0 and not c.keys("mailward:ra:dev*")
        finally:
            await a.close()
