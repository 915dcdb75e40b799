"""Microsoft Intune through Microsoft Graph (the ``beta`` endpoint; see below).

Token: OAuth 2.0 client credentials at the tenant's endpoint
(``https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token``, scope
``https://graph.microsoft.com/.default``); the app registration needs the
application permission ``DeviceManagementManagedDevices.Read.All`` only.

Why ``beta``: in Graph ``v1.0`` a ``managedDevice`` has neither ``managementState``
(retire / wipe pending) nor the ``detectedApps`` relationship, so neither a leaver's
phone nor a device's installed apps can be read there; ``beta`` has both (Graph
reference, "managedDevice resource type", v1.0 and beta; the v1.0 and beta SDK
models agree). ``base_url`` names the Graph service (``https://graph.microsoft.com``,
a national cloud, a test fake), with or without a trailing ``/v1.0`` or ``/beta``;
the connector always calls ``<service>/beta``.

Listing: ``GET /deviceManagement/managedDevices`` with ``$select`` (only the fields
below) and, for an incremental pass, ``$filter=lastSyncDateTime gt <time>`` (the
reference: "Supports $filter operator 'lt' and 'gt'", not ``ge``); pages follow
``@odata.nextLink``. Installed apps: ``GET
/deviceManagement/managedDevices/{id}/detectedApps`` per device (also paged), a few
devices at a time. A ``detectedApp`` carries ``displayName``, ``version``,
``publisher`` and ``platform`` but no package or bundle id, so the display name is
also the app's id (policy rules match it with ``names``, or with ``ids`` where Intune
reports the package name as the display name). ``udid`` is empty in a listing (the
reference: actual values only on a GET of one device), so Intune devices alias by
EAS DeviceId, serial and Intune id.

Intune lists unmanaged apps only on corporate-owned devices
(``managedDeviceOwnerType = company``); a personal device's inventory is
``managed-only``. ``managementState`` retire/wipe/delete pending or issued means the
device is leaving: it loses its posture.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from proxy import mdm
from proxy.config.mdm import MdmConfig
from proxy.mdm import MdmDevice, Page
from proxy.mdm.http import ClientCredentials, MdmError, MdmHttp, same_origin
from proxy.posture import App

SELECT = ("id,userPrincipalName,emailAddress,operatingSystem,osVersion,model,easDeviceId,"
          "serialNumber,udid,lastSyncDateTime,complianceState,managementState,"
          "managedDeviceOwnerType")
PAGE_SIZE = 1000
GONE_STATES = frozenset({"retirepending", "retireissued", "wipepending", "wipeissued",
                         "deletepending"})


class IntuneConnector:
    def __init__(self, cfg: MdmConfig, secret: str, http: MdmHttp) -> None:
        self.name = cfg.name
        self._cfg, self._http = cfg, http
        token_url = cfg.token_url or \
            f"https://login.microsoftonline.com/{cfg.tenant}/oauth2/v2.0/token"
        base = urlsplit_base(cfg.base_url)
        self._token = ClientCredentials(http, token_url, cfg.client_id, secret,
                                        scope=f"{base}/.default")
        self._graph = graph_beta(cfg.base_url)

    async def devices(self, since: float | None) -> AsyncIterator[Page]:
        cfg = self._cfg
        params = {"$select": SELECT, "$top": str(cfg.page_size or PAGE_SIZE)}
        if since is not None:
            params["$filter"] = f"lastSyncDateTime gt {mdm.rfc3339(since)}"
        url: str | None = f"{self._graph}/deviceManagement/managedDevices"
        limit = asyncio.Semaphore(cfg.concurrency)
        while url is not None:
            body = await self._http.get_json(url, token=self._token, params=params)
            records, url = _page(body, cfg.base_url)
            params = {}  # the next link carries them
            yield await self._convert(records, limit)

    async def _convert(self, records: list[Any], limit: asyncio.Semaphore) -> Page:
        """The page's devices, each with its detectedApps (a few requests at a time)."""
        page = mdm.page_of(records, parse_device)

        async def one(d: MdmDevice) -> MdmDevice:
            if d.gone:
                return d
            async with limit:
                return with_apps(d, await self._apps(d.ids["mdm_id"]))

        page.devices = list(await asyncio.gather(*(one(d) for d in page.devices)))
        return page

    async def _apps(self, mdm_id: str) -> list[Any]:
        url: str | None = f"{self._graph}/deviceManagement/managedDevices/{mdm_id}/detectedApps"
        params = {"$select": "id,displayName,version"}
        out: list[Any] = []
        while url is not None:
            body = await self._http.get_json(url, token=self._token, params=params)
            records, url = _page(body, self._cfg.base_url)
            params = {}
            out.extend(records)
        return out


def urlsplit_base(base_url: str) -> str:
    """``https://graph.microsoft.com`` from the configured Graph URL (the scope)."""
    from urllib.parse import urlsplit

    u = urlsplit(base_url)
    return f"{u.scheme}://{u.netloc}"


def graph_beta(base_url: str) -> str:
    """``<service>/beta`` from the configured Graph URL (see the module docstring)."""
    root = base_url.rstrip("/")
    for version in ("/v1.0", "/beta"):
        root = root.removesuffix(version)
    return f"{root}/beta"


def _page(body: Any, base_url: str) -> tuple[list[Any], str | None]:
    """(records, next link) of one Graph collection page; MdmError if it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("value"), list):
        raise MdmError("garbage", "Graph answered something other than a collection")
    link = body.get("@odata.nextLink")
    if link is not None and (not isinstance(link, str) or not same_origin(link, base_url)):
        raise MdmError("garbage", "Graph's @odata.nextLink leads elsewhere")
    return body["value"], link


def parse_device(d: Any) -> MdmDevice | None:
    """One ``managedDevice`` (without apps); None for a device mail cannot come from
    (no user, a platform outside mailward's list). Raises MalformedDevice."""
    if not isinstance(d, dict):
        raise mdm.MalformedDevice("not an object")
    ids = mdm.device_ids(mdm_id=d.get("id"), easDeviceId=d.get("easDeviceId"),
                         serial=d.get("serialNumber"), udid=d.get("udid"))
    last_seen = mdm.synced_at(d.get("lastSyncDateTime"), ids)
    user = mdm.mailbox(d.get("emailAddress"), d.get("userPrincipalName"))
    platform = mdm.platform_of(d.get("operatingSystem"), d.get("model"))
    if user is None or platform is None:
        return None
    owner = str(d.get("managedDeviceOwnerType") or "").lower()
    return MdmDevice(
        ids=ids, user=user, platform=platform, os_version=str(d.get("osVersion") or ""),
        apps=(), last_seen=last_seen, managed=True,
        inventory="full" if owner == "company" else "managed-only",
        compliance=str(d.get("complianceState") or "unknown"),
        gone=str(d.get("managementState") or "").lower() in GONE_STATES,
    )


def with_apps(device: MdmDevice, records: list[Any]) -> MdmDevice:
    """The device with its detectedApps (the display name is also the id). The
    common case is inlined: 150 apps x 10,000 devices per full sync."""
    from dataclasses import replace

    apps = []
    for r in records:
        name, version = (r.get("displayName"), r.get("version")) if isinstance(r, dict) \
            else (None, None)
        if isinstance(name, str) and name and name == name.strip() \
                and isinstance(version, str) and version == version.strip():
            apps.append(App(name, version, name))
        elif (a := mdm.app(None, name, version)) is not None:
            apps.append(a)
    return replace(device, apps=tuple(apps))
