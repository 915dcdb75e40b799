"""The posture stores: persistence, atomic replay/nonce handling, concurrency.

Tests taking the ``store`` fixture run against both stores, SQLite and Redis (a real
``redis-server``, tests/peers/redis.py); the rest are about the SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.posture import App, Posture, PostureStore, open_store
from proxy.posture.sqlite import JTI_SKEW_S, SqlitePostureStore

NOW = 1_750_000_000.0


def make_posture(device_id: str = "dev-1", user: str = "alice@corp.example", **kw) -> Posture:
    fields = dict(
        device_id=device_id,
        user=user,
        platform="android",
        os_version="14",
        managed=True,
        apps=(App("com.example.mail", "1.0", "Mail"),),
        iat=int(NOW) - 10,
        exp=int(NOW) + 3600,
        jti=f"jti-{device_id}",
        issuer="device",
        attested_by="device",
    )
    fields.update(kw)
    return Posture(**fields)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    from peers.redis import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.peer)])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        s: SqlitePostureStore = SqlitePostureStore(tmp_path / "state" / "posture.db")
    else:
        import uuid

        from proxy.posture.redis import RedisPostureStore

        url = request.getfixturevalue("redis_url")
        s = RedisPostureStore(url, prefix=f"t-{uuid.uuid4().hex[:8]}:")  # type: ignore[assignment]
    yield s
    await s.close()


def test_implements_protocol_and_open_store(tmp_path: Path) -> None:
    """open_store('sqlite://...') gives a SqlitePostureStore that satisfies the protocol."""
    s = open_store(f"sqlite://{tmp_path / 'p.db'}")
    assert isinstance(s, SqlitePostureStore)
    _: PostureStore = s
    s.close_sync()


async def test_wal_mode_and_parent_dir_created(tmp_path: Path) -> None:
    """The parent directory is created and the database runs in WAL mode."""
    path = tmp_path / "a" / "b" / "posture.db"
    s = SqlitePostureStore(path)
    assert await s.ping()
    await s.close()
    assert not await s.ping()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_posture_survives_reopen(tmp_path: Path) -> None:
    """A committed posture is still there after the store is closed and reopened."""
    path = tmp_path / "posture.db"
    s = SqlitePostureStore(path)
    p = make_posture()
    assert await s.commit_attestation(p, None, NOW) == "ok"
    await s.close()

    s2 = SqlitePostureStore(path)
    got = await s2.get("dev-1")
    assert got is not None
    assert got == replace(p, received_at=NOW)  # received_at filled in from `now`
    assert got.app_ids == {"com.example.mail"}
    # The jti memory survived too.
    assert await s2.commit_attestation(p, None, NOW + 1) == "replay"
    await s2.close()


async def test_get_unknown_device(store: SqlitePostureStore) -> None:
    """An unknown device has no posture."""
    assert await store.get("nope") is None


async def test_replay_is_refused_and_changes_nothing(store: SqlitePostureStore) -> None:
    """A second report with the same jti is a replay and does not replace the posture."""
    first = make_posture(os_version="14")
    assert await store.commit_attestation(first, None, NOW) == "ok"
    # same jti, different content (the platform stays: a change would be refused
    # platform_mismatch before replay is checked)
    again = make_posture(os_version="15", iat=int(NOW))
    assert await store.commit_attestation(again, None, NOW + 5) == "replay"
    got = await store.get("dev-1")
    assert got is not None and got.os_version == "14"


async def test_jti_forgotten_after_exp_plus_skew(store: SqlitePostureStore) -> None:
    """A jti is remembered until exp + skew and may be reused only after that."""
    p = make_posture(exp=int(NOW) + 60)
    assert await store.commit_attestation(p, None, NOW) == "ok"
    assert await store.commit_attestation(p, None, NOW + 60 + JTI_SKEW_S - 1) == "replay"
    assert await store.commit_attestation(p, None, NOW + 60 + JTI_SKEW_S + 1) == "ok"


async def test_concurrent_same_jti_exactly_one_ok(store: SqlitePostureStore) -> None:
    """Many tasks committing the same jti at once: exactly one wins."""
    p = make_posture()
    results = await asyncio.gather(*(store.commit_attestation(p, None, NOW) for _ in range(50)))
    assert results.count("ok") == 1
    assert results.count("replay") == 49


async def test_concurrent_same_nonce_exactly_one_ok(store: SqlitePostureStore) -> None:
    """Many reports racing for one nonce: exactly one consumes it."""
    await store.issue_nonce("n-1", NOW + 60)
    reports = [make_posture(jti=f"j{i}") for i in range(30)]
    results = await asyncio.gather(*(store.commit_attestation(r, "n-1", NOW) for r in reports))
    assert results.count("ok") == 1
    assert results.count("bad_nonce") == 29


async def test_nonce_single_use(store: SqlitePostureStore) -> None:
    """A nonce works once; the second use is bad_nonce."""
    await store.issue_nonce("n-1", NOW + 60)
    assert await store.commit_attestation(make_posture(jti="a"), "n-1", NOW) == "ok"
    assert await store.commit_attestation(make_posture(jti="b"), "n-1", NOW) == "bad_nonce"


async def test_nonce_unknown_or_expired(store: SqlitePostureStore) -> None:
    """Unknown and expired nonces are refused."""
    assert await store.commit_attestation(make_posture(jti="a"), "never", NOW) == "bad_nonce"
    await store.issue_nonce("n-old", NOW + 10)
    assert await store.commit_attestation(make_posture(jti="b"), "n-old", NOW + 10) == "bad_nonce"


async def test_failure_changes_nothing(store: SqlitePostureStore) -> None:
    """A bad nonce neither stores the posture nor uses up the jti; a replay keeps the nonce."""
    p = make_posture(jti="fresh")
    assert await store.commit_attestation(p, "missing", NOW) == "bad_nonce"
    assert await store.get("dev-1") is None
    assert await store.commit_attestation(p, None, NOW) == "ok"  # jti was not consumed

    await store.issue_nonce("n-2", NOW + 60)
    assert await store.commit_attestation(p, "n-2", NOW) == "replay"
    # The replay did not use up the nonce.
    assert await store.commit_attestation(make_posture(jti="other"), "n-2", NOW) == "ok"


async def test_issue_nonce_twice_refused(store: SqlitePostureStore) -> None:
    """Re-issuing a nonce cannot make a used one usable again."""
    await store.issue_nonce("n-1", NOW + 60)
    assert await store.commit_attestation(make_posture(), "n-1", NOW) == "ok"
    with pytest.raises(ValueError):
        await store.issue_nonce("n-1", NOW + 120)
    assert await store.commit_attestation(make_posture(jti="x"), "n-1", NOW) == "bad_nonce"


async def test_newer_posture_replaces_older_never_the_reverse(store: SqlitePostureStore) -> None:
    """Posture is replaced by newer reports; an older (still valid) report cannot roll back."""
    old = make_posture(jti="old", iat=int(NOW) - 100, apps=())
    new = make_posture(jti="new", iat=int(NOW) - 10, apps=(App("com.zhiliaoapp.musically"),))
    assert await store.commit_attestation(new, None, NOW) == "ok"
    assert await store.commit_attestation(old, None, NOW) == "ok"
    got = await store.get("dev-1")
    assert got is not None and got.jti == "new"
    # And the old jti is still used up.
    assert await store.commit_attestation(old, None, NOW) == "replay"
    newer = make_posture(jti="newer", iat=int(NOW), apps=())
    assert await store.commit_attestation(newer, None, NOW) == "ok"
    got = await store.get("dev-1")
    assert got is not None and got.jti == "newer"


async def test_devices_for_user_case_insensitive(store: SqlitePostureStore) -> None:
    """devices_for_user finds every device of the user, whatever the case."""
    await store.commit_attestation(make_posture("d2", "Alice@Corp.Example", jti="1"), None, NOW)
    await store.commit_attestation(make_posture("d1", "alice@corp.example", jti="2"), None, NOW)
    await store.commit_attestation(make_posture("d3", "bob@corp.example", jti="3"), None, NOW)
    devices = await store.devices_for_user("ALICE@corp.EXAMPLE")
    assert [d.device_id for d in devices] == ["d1", "d2"]
    assert await store.devices_for_user("carol@corp.example") == []


async def test_expired_rows_are_purged(tmp_path: Path) -> None:
    """Expired jti and nonce rows are deleted opportunistically."""
    path = tmp_path / "p.db"
    s = SqlitePostureStore(path, purge_interval_s=0)
    await s.issue_nonce("n-old", NOW - 1)
    await s.commit_attestation(make_posture(jti="j-old", exp=int(NOW) - 1000), None, NOW - 2000)
    await s.commit_attestation(make_posture(jti="j-new"), None, NOW)
    await s.close()
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT jti FROM jti")] == ["j-new"]
        assert conn.execute("SELECT count(*) FROM nonce").fetchone()[0] == 0


def test_usable_from_several_asyncio_run_calls(tmp_path: Path) -> None:
    """The CLI can use one store across separate asyncio.run() calls."""
    s = SqlitePostureStore(tmp_path / "p.db")
    assert asyncio.run(s.commit_attestation(make_posture(), None, NOW)) == "ok"
    assert asyncio.run(s.get("dev-1")) is not None
    asyncio.run(s.close())


async def test_two_stores_one_file(tmp_path: Path) -> None:
    """Two store objects on one file (server + CLI) share the replay memory."""
    a = SqlitePostureStore(tmp_path / "p.db")
    b = SqlitePostureStore(tmp_path / "p.db")
    p = make_posture()
    results = await asyncio.gather(
        *(s.commit_attestation(p, None, NOW) for s in (a, b) for _ in range(10))
    )
    assert results.count("ok") == 1
    await a.close()
    await b.close()


async def test_use_after_close_raises(tmp_path: Path) -> None:
    """Using a closed store is an error, not a hang."""
    s = SqlitePostureStore(tmp_path / "p.db")
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(RuntimeError):
        await s.get("dev-1")


async def test_read_posture_is_read_only_and_matches_get(tmp_path: Path) -> None:
    """The CLI's read-only lookup sees what the store holds, writes nothing, and a
    store that does not exist yet has no devices."""
    from proxy.posture.sqlite import read_posture

    path = tmp_path / "posture.db"
    assert read_posture(path, "dev-1") is None
    assert not path.exists()
    store = SqlitePostureStore(path)
    p = make_posture()
    assert await store.commit_attestation(p, None, p.iat) == "ok"
    stored = await store.get("dev-1")
    await store.close()
    assert stored is not None and read_posture(path, "dev-1") == stored
    assert read_posture(path, "dev-2") is None


# ----------------------------------------------------------- issue 12: trust records


def mdm(device_id: str = "dev-1", **kw) -> Posture:
    """A report signed by an MDM attester (its own authority and jti issuer)."""
    kw.setdefault("jti", f"mdm-{device_id}")
    return make_posture(device_id, attested_by="mdm:Intune", source="attester:0123abcd",
                        signer="f" * 64, **kw)


async def test_newest_per_authority_and_mdm_in_force(store: SqlitePostureStore) -> None:
    """A future-iat device report does not displace the MDM's report: the store keeps
    one per authority and the MDM posture is the one in force."""
    phone = make_posture(iat=int(NOW) + 50, jti="phone", signer="d" * 64)
    assert await store.commit_attestation(phone, None, NOW) == "ok"
    tiktok = mdm(apps=(App("com.zhiliaoapp.musically"),))
    assert await store.commit_attestation(tiktok, None, NOW) == "ok"
    both = await store.device_postures("DEV-1")
    assert {p.authority for p in both} == {"device", "attester:0123abcd"}
    got = await store.get("dev-1")
    assert got is not None and got.is_mdm and got.apps[0].id == "com.zhiliaoapp.musically"


async def test_jti_memory_is_per_issuer(store: SqlitePostureStore) -> None:
    """A device cannot burn a jti the MDM will send: replay memory is per issuer."""
    phone = make_posture(jti="shared", signer="d" * 64)
    assert await store.commit_attestation(phone, None, NOW) == "ok"
    assert await store.commit_attestation(mdm(jti="shared"), None, NOW) == "ok"
    assert await store.commit_attestation(mdm(jti="shared"), None, NOW) == "replay"


async def test_device_report_cannot_change_platform(store: SqlitePostureStore) -> None:
    """A device's own report may not change the platform the MDM (or its first report)
    gave; the MDM may."""
    assert await store.commit_attestation(make_posture(jti="a"), None, NOW) == "ok"
    windows = make_posture(jti="b", platform="windows", iat=int(NOW))
    assert await store.commit_attestation(windows, None, NOW) == "platform_mismatch"
    assert await store.commit_attestation(mdm(platform="ios"), None, NOW) == "ok"
    android = make_posture(jti="c", iat=int(NOW))
    assert await store.commit_attestation(android, None, NOW) == "platform_mismatch"
    assert await store.commit_attestation(make_posture(jti="d", platform="ios"), None,
                                          NOW) == "ok"


async def test_revoked_in_advance_refuses_reports_without_using_jti(
        store: SqlitePostureStore) -> None:
    """An id never seen can be revoked; its reports are refused and use up nothing;
    ids match case-insensitively."""
    device, new = await store.revoke("Lost-Phone", "lost on the train", "ops")
    assert (device, new) == ("lost-phone", True)
    p = make_posture("LOST-PHONE", jti="x")
    assert await store.commit_attestation(p, None, NOW) == "revoked"
    assert (await store.unrevoke("lost-PHONE")) == ("lost-phone", True)
    assert await store.commit_attestation(p, None, NOW) == "ok"


async def test_alias_moves_posture_binding_and_revocation(store: SqlitePostureStore) -> None:
    """`device alias ID OTHER`: OTHER's posture, binding and revocation move to ID's
    device, and OTHER resolves to it from then on."""
    await store.commit_attestation(make_posture("EAS-77", jti="a"), None, NOW)
    await store.bind("eas-77")
    await store.revoke("eas-77", "lost", "ops")
    assert await store.alias("phone-7", "EAS-77") == "phone-7"
    records = await store.trust_records()
    assert records.aliases == {"eas-77": "phone-7"}
    assert records.bindings == frozenset({"phone-7"})
    assert set(records.revoked) == {"phone-7"}
    got = await store.get("Eas-77")
    assert got is not None and got.device_id == "EAS-77"
    listed = await store.list_devices(revoked_only=True)
    assert [d["device"] for d in listed] == ["phone-7"] and listed[0]["aliases"] == ["eas-77"]
    device, _ = await store.forget("eas-77")
    assert device == "phone-7" and await store.get("phone-7") is None
    assert (await store.trust_records()).aliases == {}


async def test_change_feed_reports_other_stores_changes(tmp_path: Path) -> None:
    """A server's store sees the CLI's changes in the change feed, not its own."""
    path = tmp_path / "posture.db"
    server, cli = SqlitePostureStore(path), SqlitePostureStore(path)
    try:
        seq, _ = await server.changes_since(0)
        await server.bind("mine")
        await cli.revoke("Phone-1", "lost", "alice")
        seq, changes = await server.changes_since(seq)
        assert [(c.device, c.kind) for c in changes] == [("phone-1", "revoked")]
        assert await server.changes_since(seq) == (seq, [])
    finally:
        await server.close()
        await cli.close()


async def test_files_created_private(tmp_path: Path) -> None:
    """The state directory is created 0700 and the database 0600."""
    s = SqlitePostureStore(tmp_path / "state" / "posture.db")
    await s.commit_attestation(make_posture(), None, NOW)
    await s.close()
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / "posture.db").stat().st_mode & 0o777 == 0o600


def test_migrates_a_version_1_database(tmp_path: Path) -> None:
    """An existing state dir from before authorities (schema 1) opens: each posture
    is kept under the authority that signed it, and old jti values stay remembered."""
    path = tmp_path / "posture.db"
    old = make_posture("Dev-1", jti="old-jti")
    with sqlite3.connect(path) as conn:
        conn.executescript("""
            CREATE TABLE posture (device_id TEXT PRIMARY KEY, user TEXT NOT NULL,
                                  json TEXT NOT NULL, received_at REAL NOT NULL);
            CREATE INDEX posture_user ON posture (user);
            CREATE TABLE jti (jti TEXT PRIMARY KEY, expires_at REAL NOT NULL);
            CREATE TABLE nonce (nonce TEXT PRIMARY KEY, expires_at REAL NOT NULL,
                                used INTEGER NOT NULL DEFAULT 0);
            PRAGMA user_version = 1;
        """)
        text = old.to_json().replace(',"signer":""', "").replace(',"source":""', "")
        conn.execute("INSERT INTO posture VALUES (?, ?, ?, ?)",
                     ("Dev-1", old.user, text, NOW))
        conn.execute("INSERT INTO jti VALUES (?, ?)", ("old-jti", NOW + 9999))
    s = SqlitePostureStore(path)
    try:
        assert asyncio.run(s.get("dev-1")) == old
        assert asyncio.run(s.commit_attestation(old, None, NOW)) == "replay"
        assert asyncio.run(s.devices_for_user("alice@corp.example")) == [old]
    finally:
        s.close_sync()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
