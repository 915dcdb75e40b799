"""MDM connectors against local fakes of the vendor APIs (tests/mdm_fakes.py): each
connector's token flow and paging, retries, and a sync pass through a real gate and
SQLite store (attestation and mdm_sync records, aliases, removals)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mdm_fakes import OUTLOOK, TIKTOK, FakeDevice, FakeMdm

from proxy.config.mdm import MdmConfig
from proxy.gate import Gate, Identity, NullObserver, Origin
from proxy.mdm.cursor import CursorFile, SavedCursor, cursor_path, mdm_identity
from proxy.mdm.http import MdmHttp
from proxy.mdm.sync import MdmSync, open_connector
from proxy.policy import Policy, ProhibitedApp
from proxy.posture import App, Posture
from proxy.posture.sqlite import SqlitePostureStore

pytestmark = pytest.mark.conversation  # in-process fakes on loopback

POLICY = Policy(version="t", sha256="0" * 64, prohibited=(
    ProhibitedApp("TikTok", (TIKTOK[0],), "clipboard", "Uninstall TikTok.", names=("tiktok*",)),))


class Sink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def write(self, fields: dict[str, Any]) -> dict[str, Any]:
        self.records.append(fields)
        return fields

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == event]


class Metrics:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.synced: list[int | None] = []

    def mdm_synced(self, connector: str, seconds: float, devices: int | None) -> None:
        self.synced.append(devices)

    def mdm_error(self, connector: str, kind: str) -> None:
        self.errors.append((connector, kind))


class World:
    """A fake MDM, a store, a gate and one connector's sync."""

    def __init__(self, fake: FakeMdm, store: SqlitePostureStore, cfg: MdmConfig) -> None:
        self.fake, self.store, self.cfg = fake, store, cfg
        self.audit, self.metrics = Sink(), Metrics()
        self.sleeps: list[float] = []
        self.gate = Gate(store=store, audit=self.audit, policy=lambda: POLICY,
                         observer=NullObserver())

        async def sleep(s: float) -> None:
            self.sleeps.append(s)

        self.http = MdmHttp(cfg.name, timeout_s=5, sleep=sleep)
        self.sync = MdmSync(cfg, open_connector(cfg, self.http), store=store, gate=self.gate,
                            audit=self.audit, observer=self.metrics)

    async def decide(self, device_id: str, user: str) -> Any:
        return await self.gate.explain(Identity(user=user, device_id=device_id,
                                                device_source="claim"),
                                       Origin("activesync", "eas", "127.0.0.1"))


def mdm_config(tmp: Path, kind: str, base: str, **extra: Any) -> MdmConfig:
    secret = tmp / f"{kind}.secret"
    if not secret.exists():
        secret.write_text("s3cret\n")
    urls: dict[str, Any] = {
        "intune": {"tenant": "corp.example", "client_id": "app", "base_url": f"{base}/v1.0",
                   "token_url": f"{base}/corp.example/oauth2/v2.0/token"},
        "jamf": {"client_id": "app", "base_url": base},
        "google": {"subject": "admin@corp.example", "base_url": base,
                   "token_url": f"{base}/token"},
    }[kind]
    return MdmConfig(name=kind, kind=kind, secret_file=secret,  # type: ignore[arg-type]
                     **{**urls, **extra})


@pytest.fixture
async def fake() -> AsyncIterator[FakeMdm]:
    f = FakeMdm()
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlitePostureStore]:
    s = SqlitePostureStore(tmp_path / "posture.db")
    yield s
    await s.close()


@pytest.fixture
async def intune(fake: FakeMdm, store: SqlitePostureStore, tmp_path: Path) -> AsyncIterator[World]:
    w = World(fake, store, mdm_config(tmp_path, "intune", fake.base, page_size=2))
    yield w
    await w.http.close()


def alice(**kw: Any) -> FakeDevice:
    return FakeDevice(id="11111111-aaaa", user="alice@corp.example", eas_id="EASALICE",
                      serial="SERIALA", **kw)


async def test_intune_tiktok_install_and_uninstall(intune: World) -> None:
    """A TikTok install seen in Intune's detectedApps (by display name) makes the device
    non-compliant under source mdm:intune; uninstalling restores it on the next pass."""
    w = intune
    w.fake.app_page = 1  # detectedApps follow @odata.nextLink too
    w.fake.add(alice(), FakeDevice(id="2222", user="bob@corp.example", eas_id="EASBOB"),
               FakeDevice(id="3333", user="carol@corp.example", eas_id="EASCAROL"))
    first = await w.sync.run_once()
    assert first.ok and first.full and (first.seen, first.changed) == (3, 3)
    assert (await w.decide("EASALICE", "alice@corp.example")).allow
    w.fake.devices["11111111-aaaa"].apps.append(TIKTOK)
    w.fake.devices["11111111-aaaa"].touch()
    second = await w.sync.run_once()
    assert not second.full and second.changed == 1 and second.newly_noncompliant == 1
    denied = await w.decide("EASALICE", "alice@corp.example")
    assert not denied.allow and denied.reasons[0].rule == "TikTok"
    assert (await w.decide("serialA", "alice@corp.example")).allow is False  # an alias
    records = w.audit.events("attestation")
    assert records[-1]["authority"] == "mdm:intune" and records[-1]["compliant"] is False
    assert records[-1]["source"] == "mdm"
    decision = w.audit.events("explain")[-1]
    assert decision["posture_source"] == "mdm:intune"
    w.fake.devices["11111111-aaaa"].apps.remove(TIKTOK)
    w.fake.devices["11111111-aaaa"].touch()
    third = await w.sync.run_once()
    assert third.changed == 1
    assert (await w.decide("EASALICE", "alice@corp.example")).allow
    syncs = w.audit.events("mdm_sync")
    assert [s["changed"] for s in syncs] == [3, 1, 1]
    assert w.metrics.synced[0] == 3


async def test_checkin_refreshes_without_records(intune: World) -> None:
    """A device that only checked in again gets a fresh iat but no attestation record."""
    w = intune
    w.fake.add(alice())
    await w.sync.run_once()
    w.fake.devices["11111111-aaaa"].touch()
    report = await w.sync.run_once()
    assert report.seen == 1 and report.changed == 0
    assert len(w.audit.events("attestation")) == 1
    stored = await w.store.device_postures("EASALICE")
    assert stored[0].iat == int(w.fake.devices["11111111-aaaa"].last_sync)


async def test_retired_and_missing_devices_lose_posture(intune: World) -> None:
    """A retire-pending device loses its posture at once; a device missing from a full
    resync too, and the mdm_sync record lists both; an incremental pass removes none."""
    w = intune
    w.fake.add(alice(), FakeDevice(id="2222", user="bob@corp.example", eas_id="EASBOB"),
               FakeDevice(id="3333", user="carol@corp.example", eas_id="EASCAROL"))
    await w.sync.run_once()
    w.fake.devices["2222"].state = "retirePending"
    w.fake.devices["2222"].touch()
    del w.fake.devices["3333"]
    incremental = await w.sync.run_once()
    assert incremental.removed == ["easbob"]
    assert await w.store.device_postures("EASCAROL")
    full = await w.sync.run_once(full=True)
    assert full.removed == ["eascarol"]
    assert not await w.store.device_postures("EASBOB")
    assert (await w.decide("EASCAROL", "carol@corp.example")).reasons[0].code == "unknown_device"
    assert w.audit.events("mdm_sync")[-1]["removed"] == ["eascarol"]


async def test_throttling_server_errors_and_token_expiry(intune: World) -> None:
    """429 waits for Retry-After, 500s are retried with backoff, an expired token is
    refreshed once on 401; the pass still succeeds."""
    w = intune
    w.fake.add(alice())
    await w.sync.run_once()
    w.fake.expire_tokens()
    w.fake.throttle(1)
    w.fake.fail(500, 502)
    before = w.fake.token_requests
    report = await w.sync.run_once(full=True)
    assert report.ok, report.error
    assert w.fake.token_requests == before + 1
    assert 1.0 in w.sleeps and len(w.sleeps) >= 3


async def test_unreachable_mdm_keeps_posture_and_is_degraded(intune: World) -> None:
    """Persistent 500s or garbage fail the pass: the stored posture stays, readyz's
    degraded text names the connector and its last success, errors are counted."""
    w = intune
    w.fake.add(alice())
    await w.sync.run_once()
    w.fake.fail(*[500] * 10)
    report = await w.sync.run_once(full=True)
    assert not report.ok and report.error_kind == "http"
    assert await w.store.device_postures("EASALICE")
    degraded = w.sync.state.degraded("intune")
    assert degraded is not None and degraded.startswith("mdm:intune failing (http); last success 2")
    w.fake.failures.clear()
    w.fake.garbage = 1
    assert (await w.sync.run_once(full=True)).error_kind == "garbage"
    assert ("intune", "garbage") in w.metrics.errors
    assert w.audit.events("mdm_sync")[-1]["result"] == "failed"
    assert (await w.sync.run_once(full=True)).ok
    assert w.sync.state.degraded("intune") is None


async def test_malformed_record_is_skipped_and_counted(intune: World) -> None:
    """A device with an unreadable sync time is skipped and counted, never fatal, and
    a full pass does not remove it."""
    w = intune
    w.fake.add(alice(), FakeDevice(id="2222", user="bob@corp.example", eas_id="EASBOB"))
    await w.sync.run_once()
    original = w.fake._graph_device

    def broken(d: FakeDevice) -> dict[str, Any]:
        out = original(d)
        if d.id == "2222":
            out["lastSyncDateTime"] = "yesterday"
        return out

    w.fake._graph_device = broken  # type: ignore[method-assign]
    report = await w.sync.run_once(full=True)
    assert report.ok and report.malformed == 1 and report.removed == []
    assert ("intune", "malformed") in w.metrics.errors


async def test_renamed_user_moves_the_posture(intune: World) -> None:
    """A user renamed in the MDM: the device's posture names the new mailbox."""
    w = intune
    w.fake.add(alice())
    await w.sync.run_once()
    w.fake.devices["11111111-aaaa"].user = "alice.smith@corp.example"
    w.fake.devices["11111111-aaaa"].touch()
    assert (await w.sync.run_once()).changed == 1
    assert (await w.decide("EASALICE", "alice.smith@corp.example")).allow
    old = await w.decide("EASALICE", "alice@corp.example")
    assert old.reasons[0].code == "user_mismatch"


async def test_device_self_report_cannot_override_connector(intune: World) -> None:
    """A newer, clean report signed by the device does not lift the connector's
    TikTok finding."""
    w = intune
    w.fake.add(alice(apps=[OUTLOOK, TIKTOK]))
    await w.sync.run_once()
    now = int(time.time()) + 5
    own = Posture(device_id="EASALICE", user="alice@corp.example", platform="android",
                  os_version="14", managed=True, apps=(App(OUTLOOK[0]),), iat=now,
                  exp=now + 3600, jti="j1", issuer="device", attested_by="device",
                  source="device", signer="device-cert")
    assert await w.store.commit_attestation(own, None, time.time()) == "ok"
    decision = await w.decide("EASALICE", "alice@corp.example")
    assert not decision.allow and decision.reasons[0].rule == "TikTok"
    assert w.audit.events("explain")[-1]["posture_source"] == "mdm:intune"


async def test_keep_apps_policy_stores_only_matching_apps(fake: FakeMdm, store: SqlitePostureStore,
                                                           tmp_path: Path) -> None:
    """keep_apps = "policy" keeps only the apps a rule matches."""
    w = World(fake, store, mdm_config(tmp_path, "intune", fake.base, keep_apps="policy"))
    fake.add(alice(apps=[OUTLOOK, TIKTOK]))
    await w.sync.run_once()
    await w.http.close()
    (posture,) = await store.device_postures("EASALICE")
    assert [a.name for a in posture.apps] == ["TikTok"]


async def test_personal_device_is_managed_only(intune: World) -> None:
    """A personally owned device's inventory is marked managed-only."""
    w = intune
    w.fake.add(alice(owner="personal", compliance="noncompliant"))
    await w.sync.run_once()
    (posture,) = await w.store.device_postures("EASALICE")
    assert posture.inventory == "managed-only" and posture.mdm_compliance == "noncompliant"


async def test_jamf_paging_and_bundle_ids(fake: FakeMdm, store: SqlitePostureStore,
                                          tmp_path: Path) -> None:
    """Jamf Pro: OAuth token, page/page-size paging, bundle identifiers match ids;
    User Enrollment is managed-only; UDID is the primary id."""
    w = World(fake, store, mdm_config(tmp_path, "jamf", fake.base, page_size=2))
    for i in range(5):
        fake.add(FakeDevice(id=str(i + 1), user=f"u{i}@corp.example", platform="ios",
                            udid=f"UDID-{i}", serial=f"SER{i}",
                            apps=[OUTLOOK, TIKTOK] if i == 3 else [OUTLOOK],
                            owner="personal" if i == 4 else "company"))
    report = await w.sync.run_once()
    await w.http.close()
    assert report.ok and report.seen == 5 and report.newly_noncompliant == 1
    assert not (await w.decide("ser3", "u3@corp.example")).allow
    (p4,) = await store.device_postures("UDID-4")
    assert p4.inventory == "managed-only" and p4.source == "mdm:jamf"


def google_world(fake: FakeMdm, store: SqlitePostureStore, tmp_path: Path, **extra: Any) -> World:
    """A Google connector whose service-account key the fake's token endpoint trusts."""
    import json

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake.public_key = key.public_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    (tmp_path / "google.secret").write_text(json.dumps({
        "type": "service_account", "client_email": "sa@proj.iam.gserviceaccount.com",
        "private_key_id": "k1", "private_key": pem, "token_uri": f"{fake.base}/token"}))
    return World(fake, store, mdm_config(tmp_path, "google", fake.base, **extra))


async def test_google_service_account_and_page_tokens(fake: FakeMdm, store: SqlitePostureStore,
                                                      tmp_path: Path) -> None:
    """Google: a signed JWT assertion for the delegated admin, pageToken paging;
    a work profile is managed-only; a wiping device loses its posture."""
    w = google_world(fake, store, tmp_path, page_size=2)
    for i in range(3):
        fake.add(FakeDevice(id=f"res{i}", user=f"g{i}@corp.example", eas_id=f"gdev{i}",
                            apps=[OUTLOOK, TIKTOK] if i == 0 else [OUTLOOK],
                            owner="personal" if i == 1 else "company"))
    report = await w.sync.run_once()
    assert report.ok and report.seen == 3, report.error
    assert not (await w.decide("gdev0", "g0@corp.example")).allow
    (p1,) = await store.device_postures("gdev1")
    assert p1.inventory == "managed-only"
    fake.devices["res2"].state = "wiping"
    fake.devices["res2"].touch()
    assert (await w.sync.run_once()).removed == ["gdev2"]
    await w.http.close()


async def test_ten_thousand_devices(fake: FakeMdm, store: SqlitePostureStore,
                                    tmp_path: Path) -> None:
    """A full pass over 10,000 devices pages through them all and stores each."""
    w = World(fake, store, mdm_config(tmp_path, "intune", fake.base, concurrency=16))
    for i in range(10_000):
        fake.add(FakeDevice(id=f"dev{i}", user=f"u{i}@corp.example", eas_id=f"EAS{i}", apps=[]))
    report = await w.sync.run_once()
    await w.http.close()
    assert report.ok and report.seen == 10_000 and report.changed == 10_000
    assert len(await store.mdm_devices("mdm:intune")) == 10_000


# ------------------------------------------------------------------ vendor request shapes


def listing_queries(fake: FakeMdm, path_end: str) -> list[dict[str, list[str]]]:
    return [q for path, q in fake.queries if path.endswith(path_end)]


async def test_intune_reads_graph_beta_with_gt_filter(intune: World) -> None:
    """Intune is read from Graph beta (v1.0 lacks managementState and detectedApps) even
    when base_url names v1.0, and an incremental pass filters lastSyncDateTime with gt."""
    w = intune
    w.fake.add(alice())
    await w.sync.run_once()
    w.fake.devices["11111111-aaaa"].touch()
    await w.sync.run_once()
    paths = {path for _, path in w.fake.requests if "deviceManagement" in path}
    assert paths and all(p.startswith("/beta/deviceManagement/") for p in paths)
    incremental = listing_queries(w.fake, "/managedDevices")[-1]
    assert incremental["$filter"][0].startswith("lastSyncDateTime gt ")
    assert "managementState" in incremental["$select"][0].split(",")


async def test_jamf_filter_ownership_and_exchange_id(fake: FakeMdm, store: SqlitePostureStore,
                                                     tmp_path: Path) -> None:
    """Jamf: the incremental RSQL filter names the flat lastInventoryUpdateDate field,
    general.exchangeDeviceId is an alias, account-driven device enrollment is a full
    inventory and account-driven user enrollment is managed-only."""
    w = World(fake, store, mdm_config(tmp_path, "jamf", fake.base, device_id="udid"))
    fake.add(FakeDevice(id="7", user="ann@corp.example", platform="ios", udid="UDID-7",
                        eas_id="EASANN"),
             FakeDevice(id="8", user="ben@corp.example", platform="ios", udid="UDID-8"))
    fake.overrides["7"] = {"general": {
        "udid": "UDID-7", "managed": True, "exchangeDeviceId": "EASANN",
        "lastInventoryUpdateDate": "2026-01-01T00:00:00Z",
        "deviceOwnershipType": "AccountDrivenDeviceEnrollment"}}
    fake.overrides["8"] = {"general": {
        "udid": "UDID-8", "managed": True, "lastInventoryUpdateDate": "2026-01-01T00:00:00Z",
        "deviceOwnershipType": "AccountDrivenUserEnrollment"}}
    assert (await w.sync.run_once()).seen == 2
    (ann,) = await store.device_postures("EASANN")  # the alias resolves
    (ben,) = await store.device_postures("UDID-8")
    assert (ann.device_id, ann.inventory, ben.inventory) == ("UDID-7", "full", "managed-only")
    await w.sync.run_once()
    await w.http.close()
    (rsql,) = listing_queries(fake, "/mobile-devices/detail")[-1]["filter"]
    assert rsql.startswith('lastInventoryUpdateDate>="') and rsql.endswith('Z"')


async def test_google_incremental_lists_newest_first_and_stops(
        fake: FakeMdm, store: SqlitePostureStore, tmp_path: Path) -> None:
    """Google: an incremental pass does not search (the search index lags up to 36 h):
    it lists by lastSync descending and stops at the first page older than the cursor."""
    w = google_world(fake, store, tmp_path, page_size=2)
    start = time.time() - 7200  # check-ins 10 min apart, older than the cursor's overlap
    for i in range(10):
        fake.add(FakeDevice(id=f"res{i}", user=f"g{i}@corp.example", eas_id=f"gdev{i}",
                            last_sync=start + 600 * i))
    assert (await w.sync.run_once()).seen == 10
    fake.queries.clear()
    fake.devices["res3"].apps.append(TIKTOK)
    fake.devices["res3"].touch()
    report = await w.sync.run_once()
    await w.http.close()
    assert report.ok and report.changed == 1 and report.newly_noncompliant == 1
    pages = listing_queries(fake, "/devices/mobile")  # [res3, res9], [res8 (older), res7]
    assert len(pages) == 2 and "query" not in pages[0]
    assert (pages[0]["orderBy"], pages[0]["sortOrder"]) == (["lastSync"], ["DESCENDING"])


@pytest.mark.parametrize("vendor,broken", [
    ("jamf", {"general": "not a section"}),
    ("google", {"lastSync": 20261202}),
])
async def test_malformed_record_in_a_page_skipped_rest_syncs(
        fake: FakeMdm, store: SqlitePostureStore, tmp_path: Path, vendor: str,
        broken: dict[str, Any]) -> None:
    """A malformed record in the middle of a page is skipped and counted; the rest of
    that page and the next one are stored."""
    w = google_world(fake, store, tmp_path, page_size=3) if vendor == "google" else \
        World(fake, store, mdm_config(tmp_path, vendor, fake.base, page_size=3))
    for i in range(5):
        fake.add(FakeDevice(id=f"d{i}", user=f"u{i}@corp.example", platform="ios",
                            udid=f"UDID-{i}", eas_id=f"EAS{i}"))
    fake.overrides["d1"] = broken
    report = await w.sync.run_once()
    await w.http.close()
    assert report.ok and (report.seen, report.malformed) == (4, 1), report.error
    assert ("jamf" if vendor == "jamf" else "google", "malformed") in w.metrics.errors
    stored = await store.mdm_devices(f"mdm:{vendor}")
    assert len(stored) == 4


# ------------------------------------------------------------------ the saved cursor


def restarted(w: World, path: Path) -> MdmSync:
    """A new MdmSync of the same connector, as after a restart of mailward serve."""
    return MdmSync(w.cfg, open_connector(w.cfg, w.http), store=w.store, gate=w.gate,
                   audit=w.audit, observer=w.metrics,
                   cursor_file=CursorFile(path, mdm_identity(w.cfg)))


async def test_restart_resumes_incrementally_from_saved_cursor(intune: World,
                                                               tmp_path: Path) -> None:
    """The cursor saved in state/ makes the first pass after a restart incremental and
    catch changes made while mailward was down; the file is private."""
    w, path = intune, cursor_path(tmp_path / "state", "intune")
    w.fake.add(alice(), FakeDevice(id="2222", user="bob@corp.example", eas_id="EASBOB",
                                   last_sync=time.time() - 3600))  # before the overlap
    first = await restarted(w, path).run_once()
    assert first.full and path.stat().st_mode & 0o777 == 0o600
    saved = CursorFile(path, mdm_identity(w.cfg)).load(time.time())
    newest = max(d.last_sync for d in w.fake.devices.values())
    assert saved is not None and saved.cursor == pytest.approx(newest, abs=1e-5)
    w.fake.devices["11111111-aaaa"].apps.append(TIKTOK)
    w.fake.devices["11111111-aaaa"].touch()
    w.fake.queries.clear()
    again = await restarted(w, path).run_once()
    assert again.ok and not again.full and (again.seen, again.changed) == (1, 1)
    assert not (await w.decide("EASALICE", "alice@corp.example")).allow
    assert "$filter" in listing_queries(w.fake, "/managedDevices")[0]


async def test_saved_cursor_keeps_full_resync_on_its_interval(intune: World,
                                                              tmp_path: Path) -> None:
    """A saved last full pass older than full_interval makes the first pass after a
    restart a full one (a device gone from the MDM meanwhile loses its posture)."""
    w, path = intune, cursor_path(tmp_path / "state", "intune")
    w.fake.add(alice(), FakeDevice(id="2222", user="bob@corp.example", eas_id="EASBOB"))
    await restarted(w, path).run_once()
    file = CursorFile(path, mdm_identity(w.cfg))
    saved = file.load(time.time())
    assert saved is not None and saved.last_full is not None
    file.save(SavedCursor(saved.cursor, saved.last_full - w.cfg.full_interval_s - 1))
    del w.fake.devices["2222"]
    report = await restarted(w, path).run_once()
    assert report.full and report.removed == ["easbob"]


async def test_saved_cursor_ignored_when_untrustworthy(intune: World, tmp_path: Path) -> None:
    """An empty posture store, another MDM's cursor, a future or garbage cursor: the
    first pass is full; a dry run saves nothing."""
    w, path = intune, cursor_path(tmp_path / "state", "intune")
    file = CursorFile(path, mdm_identity(w.cfg))
    now = time.time()
    file.save(SavedCursor(now - 60, now - 60))  # but the store holds nothing yet
    w.fake.add(alice())
    assert (await restarted(w, path).run_once()).full
    assert not (await restarted(w, path).run_once()).full  # now it is trusted
    for body in ("{not json", json_dumps({"mdm": "jamf https://other", "cursor": now}),
                 json_dumps({"mdm": file.identity, "cursor": now + 86400}),
                 json_dumps({"mdm": file.identity, "cursor": "soon"}),
                 json_dumps({"mdm": file.identity, "cursor": now, "last_full": 1e400})):
        path.write_text(body)
        assert file.load(now) is None, body
    assert (await restarted(w, path).run_once()).full
    before = path.read_bytes()
    dry = MdmSync(w.cfg, open_connector(w.cfg, w.http), store=w.store, gate=w.gate,
                  audit=None, dry_run=True, cursor_file=file)
    assert (await dry.run_once(full=True)).ok and path.read_bytes() == before


def json_dumps(value: Any) -> str:
    import json

    return json.dumps(value)
