"""Property tests of the vendor record mappers (proxy/mdm/intune.py, jamf.py, google.py):
any JSON-like record maps to a device (or None: not a mail device) or raises the
mapper's MalformedDevice, never another exception; a malformed record in a page is
skipped and counted while the rest of the page maps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.ids import DEVICE_ID_RE
from proxy.mdm import MalformedDevice, MdmDevice, page_of
from proxy.mdm import google as google_mod
from proxy.mdm import intune as intune_mod
from proxy.mdm import jamf as jamf_mod

pytestmark = pytest.mark.pure

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PLATFORMS = {"android", "ios", "ipados", "windows", "macos", "linux"}

# ------------------------------------------------------------------ strategies

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=20))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=12)
#: Strings that look like what a vendor sends, so the mappers get past their checks.
plausible = st.one_of(
    st.sampled_from(["2026-12-02T12:00:00Z", "2026-12-02T12:00:00.1234567Z",
                     "2026-12-02T12:00:00+02:00", "2026-12-02", "0001-01-01T00:00:00Z",
                     "9999-12-31T23:59:59-14:00", "alice@corp.example", "A@B", "iOS",
                     "Android", "Android 14", "iPadOS", "Windows", "macOS", "ANDROID",
                     "IOS_SYNC", "iPad Pro", "company", "personal", "retirePending",
                     "wipeIssued", "Institutional", "UserEnrollment", "APPROVED", "WIPING",
                     "Compromised", "dev-1", "EAS1", "", " ", "a b", "\x00"]),
    st.from_regex(DEVICE_ID_RE, fullmatch=True))
values = st.one_of(plausible, json_values)


def record(fields: list[str], value: st.SearchStrategy[Any] = values) -> st.SearchStrategy[Any]:
    """Dicts over the vendor's field names (and some others), any values."""
    return st.dictionaries(st.sampled_from(fields) | st.text(max_size=6), value, max_size=12)


INTUNE_FIELDS = ["id", "userPrincipalName", "emailAddress", "operatingSystem", "osVersion",
                 "model", "easDeviceId", "serialNumber", "udid", "lastSyncDateTime",
                 "complianceState", "managementState", "managedDeviceOwnerType"]
intune_records = record(INTUNE_FIELDS)
detected_apps = st.lists(record(["id", "displayName", "version", "publisher", "platform"])
                         | json_values, max_size=6)

jamf_app = record(["identifier", "name", "version", "shortVersion", "managementStatus"])
jamf_records = st.fixed_dictionaries({}, optional={
    "mobileDeviceId": values, "deviceType": values,
    "general": record(["udid", "lastInventoryUpdateDate", "osVersion", "managed",
                       "deviceOwnershipType", "exchangeDeviceId"]) | values,
    "hardware": record(["serialNumber", "model"]) | values,
    "userAndLocation": record(["emailAddress", "username", "realName"]) | values,
    "applications": st.lists(jamf_app | values, max_size=4) | values,
})

google_app = record(["packageName", "displayName", "versionName", "versionCode"])
google_records = st.fixed_dictionaries({}, optional={
    "resourceId": values, "deviceId": values, "serialNumber": values, "lastSync": values,
    "email": st.lists(values, max_size=3) | values, "type": values, "os": values,
    "model": values, "status": values, "releaseVersion": values,
    "managedAccountIsOnOwnerProfile": values, "deviceCompromisedStatus": values,
    "applications": st.lists(google_app | values, max_size=4) | values,
})

MAPPERS: dict[str, tuple[Callable[[Any], MdmDevice | None], st.SearchStrategy[Any]]] = {
    "intune": (intune_mod.parse_device, intune_records),
    "jamf": (jamf_mod.parse_device, jamf_records),
    "google": (google_mod.parse_device, google_records),
}


def check(device: MdmDevice | None) -> None:
    """What every mapped device promises the sync."""
    if device is None:
        return
    assert all(DEVICE_ID_RE.fullmatch(v) for v in device.ids.values())
    assert "mdm_id" in device.ids and device.device_id("easDeviceId")
    assert device.user == device.user.lower() and "@" in device.user
    assert device.platform in PLATFORMS and device.last_seen >= 0
    assert device.inventory in ("full", "managed-only")
    assert all(a.id for a in device.apps)


def mapped(parse: Callable[[Any], MdmDevice | None], raw: Any) -> MdmDevice | None:
    try:
        device = parse(raw)
    except MalformedDevice as exc:
        assert all(isinstance(i, str) for i in exc.ids)
        return None
    check(device)
    return device


# ------------------------------------------------------------------ properties


@pytest.mark.parametrize("vendor", sorted(MAPPERS))
@FUZZ
@given(data=st.data())
def test_any_record_maps_or_raises_malformed(vendor: str, data: st.DataObject) -> None:
    """Any vendor-shaped record, or any JSON value at all, maps to a device (or None)
    or raises MalformedDevice."""
    parse, records = MAPPERS[vendor]
    mapped(parse, data.draw(records | json_values))


@FUZZ
@given(raw=intune_records, apps=detected_apps)
def test_intune_detected_apps_never_raise(raw: Any, apps: list[Any]) -> None:
    """Any detectedApps collection attaches to a mapped Intune device without error;
    each app has an id (the display name)."""
    device = mapped(intune_mod.parse_device, raw)
    if device is not None:
        check(intune_mod.with_apps(device, apps))


def good(vendor: str, i: int) -> dict[str, Any]:
    """A well-formed record of device ``i`` for ``vendor``."""
    when, user = "2026-12-02T12:00:00Z", f"u{i}@corp.example"
    if vendor == "intune":
        return {"id": f"dev-{i}", "emailAddress": user, "operatingSystem": "Android",
                "lastSyncDateTime": when, "managedDeviceOwnerType": "company"}
    if vendor == "jamf":
        return {"mobileDeviceId": f"dev-{i}", "deviceType": "iOS",
                "general": {"lastInventoryUpdateDate": when, "udid": f"U{i}", "managed": True},
                "userAndLocation": {"emailAddress": user}}
    return {"resourceId": f"dev-{i}", "deviceId": f"g{i}", "email": [user], "type": "ANDROID",
            "lastSync": when, "status": "APPROVED"}


@pytest.mark.parametrize("vendor", sorted(MAPPERS))
@FUZZ
@given(data=st.data())
def test_malformed_record_in_a_page_is_skipped_and_counted(vendor: str,
                                                           data: st.DataObject) -> None:
    """Good records mixed with arbitrary ones: every good one maps, every record is
    counted once (a device, a malformed record, or skipped)."""
    parse, records = MAPPERS[vendor]
    junk = data.draw(st.lists(records | json_values, max_size=6))
    goods = [good(vendor, i) for i in range(data.draw(st.integers(1, 4)))]
    mixed = data.draw(st.permutations([*goods, *junk]))
    page = page_of(mixed, parse)
    assert len(page.devices) + len(page.malformed) + page.skipped == len(mixed)
    ids = {d.ids["mdm_id"] for d in page.devices}
    assert {f"dev-{i}" for i in range(len(goods))} <= ids


def test_bad_times_are_malformed_not_crashes() -> None:
    """Impossible times are MalformedDevice; extreme but valid ones map (clamped at 0)."""
    for when in ("2026-13-01T00:00:00Z", "2026-12-02T25:00:00Z", "yesterday", "2026-12-0"):
        with pytest.raises(MalformedDevice):
            intune_mod.parse_device({**good("intune", 1), "lastSyncDateTime": when})
    for when in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        assert mapped(intune_mod.parse_device, {**good("intune", 1), "lastSyncDateTime": when})
