"""Posture read from the MDM a company already runs (DESIGN "MDM connectors").

How the parts fit:

* one small interface, :class:`Connector`: list the devices changed since a time
  (or all of them) as pages of :class:`MdmDevice` — ids, user, platform, OS
  version, installed apps, the MDM's last inventory time, whether the inventory is
  ``full`` or ``managed-only``, the MDM's own compliance state, and whether the
  device is retired or being wiped;
* one connector per vendor, each a thin mapping from the vendor's documented JSON:
  :mod:`proxy.mdm.intune` (Microsoft Graph), :mod:`proxy.mdm.jamf` (Jamf Pro API),
  :mod:`proxy.mdm.google` (Admin SDK Directory);
* :mod:`proxy.mdm.http`: the HTTP client they share (aiohttp; timeouts, retries on
  5xx, ``Retry-After`` on 429, one token refresh on 401; secrets never logged) and
  the token flows (OAuth client credentials, Google's service-account JWT bearer);
* :mod:`proxy.mdm.sync`: one pass of one connector — each device becomes MDM posture
  with ``source = "mdm:<name>"``, stored a page per transaction, and every new or
  changed device goes through :meth:`proxy.gate.Gate.attest_report` like a signed
  report (an ``attestation`` record, live sessions re-checked); retired devices and,
  on a full resync, devices the MDM no longer lists lose their posture at once; one
  ``mdm_sync`` record per pass. The loop in ``mailward serve`` and ``mailward mdm
  sync`` both run it.

A connector never decides: it only supplies posture. A malformed device record is
skipped and counted; an MDM that cannot be reached or answers garbage leaves the last
good posture in place (it goes stale after the policy's ``max_posture_age``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from proxy.ids import DEVICE_ID_RE, USER_RE
from proxy.posture import App

Inventory = Literal["full", "managed-only"]


class MalformedDevice(ValueError):
    """A device record the connector cannot use; ``ids`` are whatever ids it could
    read (the device still counts as listed, so it keeps its posture)."""

    def __init__(self, reason: str, ids: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.ids = ids


@dataclass(frozen=True, slots=True)
class MdmDevice:
    """One device as an MDM lists it. ``ids`` maps ``mdm_id``, ``easDeviceId``,
    ``serial`` and ``udid`` to the values the MDM knows; ``last_seen`` is the MDM's
    last inventory time (POSIX seconds)."""

    ids: Mapping[str, str]
    user: str
    platform: str
    os_version: str
    apps: tuple[App, ...]
    last_seen: float
    managed: bool = True
    inventory: Inventory = "full"
    compliance: str = "unknown"
    gone: bool = False  # retired, wipe pending or removed from management

    def device_id(self, kind: str) -> str:
        """The primary id: the configured kind when the MDM knows it, else its own id."""
        return self.ids.get(kind) or self.ids["mdm_id"]

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.ids.values()))


@dataclass(slots=True)
class Page:
    """One page of a listing: usable devices and the records skipped."""

    devices: list[MdmDevice] = field(default_factory=list)
    malformed: list[MalformedDevice] = field(default_factory=list)
    skipped: int = 0  # usable records of devices mail cannot come from (no user, a TV)


class Connector(Protocol):
    """An MDM, read-only."""

    name: str

    def devices(self, since: float | None) -> AsyncIterator[Page]:
        """Devices whose inventory changed at or after ``since`` (POSIX seconds), or
        every device when ``since`` is None. Raises :class:`~proxy.mdm.http.MdmError`
        when the listing cannot be completed."""
        ...


# ------------------------------------------------------------------ shared mapping


def page_of(records: list[object], parse: Callable[[object], MdmDevice | None]) -> Page:
    """A :class:`Page` from vendor records; ``parse`` maps one record to a device
    (None: not a mail device) or raises :class:`MalformedDevice`."""
    page = Page()
    for r in records:
        try:
            device = parse(r)
        except MalformedDevice as exc:
            page.malformed.append(exc)
            continue
        if device is None:
            page.skipped += 1
        else:
            page.devices.append(device)
    return page


def device_ids(**candidates: object) -> dict[str, str]:
    """The ids among ``candidates`` that are usable device ids (DESIGN "Device
    identity" syntax); ``mdm_id`` must be one. Raises :class:`MalformedDevice`."""
    ids = {k: v for k, v in candidates.items()
           if isinstance(v, str) and DEVICE_ID_RE.fullmatch(v)}
    if "mdm_id" not in ids:
        raise MalformedDevice("no usable device id",
                              tuple(v for v in ids.values()))
    return ids


def mailbox(*candidates: object) -> str | None:
    """The first candidate that is a mailbox address, lower-cased."""
    for c in candidates:
        if isinstance(c, str) and USER_RE.fullmatch(c.strip()):
            return c.strip().lower()
    return None


def platform_of(os_name: object, model: object = "") -> str | None:
    """``android``, ``ios``, ``ipados``, ``windows``, ``macos`` or ``linux`` from an
    MDM's operating-system name (an iPad on "iOS" is ``ipados``); None if none."""
    text = str(os_name or "").strip().lower()
    ipad = "ipad" in str(model or "").lower()
    if text.startswith("android"):
        return "android"
    if text.startswith("ipados") or (text.startswith("ios") and ipad):
        return "ipados"
    if text.startswith("ios"):
        return "ios"
    if text.startswith("windows"):
        return "windows"
    if text.startswith(("macos", "mac os", "osx")):
        return "macos"
    if text.startswith("linux"):
        return "linux"
    return None


def parse_time(value: object) -> float:
    """An RFC 3339 time (any number of fractional digits, ``Z``) -> POSIX seconds.
    Raises :class:`MalformedDevice`."""
    if not isinstance(value, str) or len(value) < 10:
        raise MalformedDevice(f"bad time {value!r}")
    text = value.strip().replace("z", "Z")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    head, dot, rest = text.partition(".")
    if dot:  # Graph sends 7 fractional digits; fromisoformat takes at most 6
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp())
    except (ValueError, OverflowError):  # OverflowError: year 1 with a + offset
        raise MalformedDevice(f"bad time {value!r}") from None


def synced_at(value: object, ids: Mapping[str, str]) -> float:
    """:func:`parse_time` of a device's last inventory time; the
    :class:`MalformedDevice` carries the device's ``ids`` (it still counts as listed)."""
    try:
        return parse_time(value)
    except MalformedDevice as exc:
        raise MalformedDevice(str(exc), tuple(ids.values())) from None


def rfc3339(when: float) -> str:
    """POSIX seconds -> ``2026-12-02T15:04:05Z``, for a vendor's "changed since" filter."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def app(app_id: object, name: object, version: object) -> App | None:
    """An :class:`App` from vendor fields; None when it has neither id nor name."""
    i = app_id.strip() if isinstance(app_id, str) else ""
    n = name.strip() if isinstance(name, str) else ""
    if not (i or n):
        return None
    v = version if isinstance(version, str) else "" if version is None else str(version)
    return App(id=i or n, version=v.strip(), name=n)


def apps_of(records: object, id_key: str, name_key: str, version_key: str) -> tuple[App, ...]:
    """The apps of a vendor's app list (objects with the given keys); anything that is
    not a list of objects, and entries with neither id nor name, are left out."""
    entries = records if isinstance(records, list) else []
    return tuple(a for r in entries if isinstance(r, dict)
                 if (a := app(r.get(id_key), r.get(name_key), r.get(version_key))) is not None)


__all__ = [
    "App",
    "Connector",
    "Inventory",
    "MalformedDevice",
    "MdmDevice",
    "Page",
    "app",
    "apps_of",
    "device_ids",
    "mailbox",
    "page_of",
    "parse_time",
    "platform_of",
    "rfc3339",
    "synced_at",
]
