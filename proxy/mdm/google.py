"""Google Workspace through the Admin SDK Directory API (``mobiledevices``).

Token: the OAuth 2.0 JWT bearer flow for a service account with domain-wide
delegation, acting for ``subject`` (an administrator) with the scope
``https://www.googleapis.com/auth/admin.directory.device.mobile.readonly`` only;
``secret_file`` is the service account's JSON key.

Listing: ``GET /admin/directory/v1/customer/{customer}/devices/mobile`` with
``projection=FULL``, ``maxResults`` (at most 100) and ``pageToken`` paging. An
incremental pass does not search (``query=sync:<date>..``): Google's search guide
says data updates "can take up to 36 hours to be reflected in search results", and
the search is day-granular. It lists instead with ``orderBy=lastSync`` and
``sortOrder=DESCENDING`` and stops after the first page that reaches back past the
cursor. Android devices list ``applications`` (``packageName``, ``displayName``,
``versionName``).

The method lists user-owned devices; Google's reference points to the Cloud Identity
Devices API for company-owned ones (not read here).

An Android work profile (``managedAccountIsOnOwnerProfile`` false) and iOS devices
(Google lists no apps for them) are ``managed-only``. ``status`` ``BLOCKED``,
``WIPING`` or ``WIPED`` means the device loses its posture; the compliance state
is ``compliant`` for an approved device, ``noncompliant`` when Google reports it
compromised, else the status in lower case.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from proxy import mdm
from proxy.config.mdm import MdmConfig
from proxy.mdm import MdmDevice, Page
from proxy.mdm.http import MdmError, MdmHttp, ServiceAccountJwt

SCOPE = "https://www.googleapis.com/auth/admin.directory.device.mobile.readonly"
PAGE_SIZE = 100  # the API's maximum
GONE = frozenset({"BLOCKED", "WIPING", "WIPED"})


class GoogleConnector:
    def __init__(self, cfg: MdmConfig, secret: str, http: MdmHttp) -> None:
        self.name = cfg.name
        self._cfg, self._http = cfg, http
        try:
            key = json.loads(secret)
        except ValueError:
            raise MdmError("config", f"{cfg.secret_file}: not a service-account JSON key") \
                from None
        if not isinstance(key, dict):
            raise MdmError("config", f"{cfg.secret_file}: not a service-account JSON key")
        self._token = ServiceAccountJwt(http, key, cfg.subject, SCOPE, cfg.token_url)

    async def devices(self, since: float | None) -> AsyncIterator[Page]:
        cfg = self._cfg
        url = f"{cfg.base_url}/admin/directory/v1/customer/{cfg.customer}/devices/mobile"
        params = {"projection": "FULL", "maxResults": str(min(cfg.page_size or PAGE_SIZE, 100))}
        if since is not None:  # newest first; see the module docstring
            params.update(orderBy="lastSync", sortOrder="DESCENDING")
        while True:
            body = await self._http.get_json(url, token=self._token, params=params)
            if not isinstance(body, dict) or not isinstance(body.get("mobiledevices", []), list):
                raise MdmError("garbage", "Directory API answered something other than a page")
            page = convert(body.get("mobiledevices", []))
            yield page
            next_token = body.get("nextPageToken")
            if not isinstance(next_token, str) or not next_token:
                return
            if since is not None and _reaches_back(page, since):
                return
            params = {**params, "pageToken": next_token}


def _reaches_back(page: Page, since: float) -> bool:
    """Whether a newest-first page lists a device synced before ``since`` (the rest
    are older still). A page of only unusable records does not stop the listing."""
    return any(d.last_seen < since for d in page.devices)


def convert(records: list[Any]) -> Page:
    return mdm.page_of(records, parse_device)


def parse_device(d: Any) -> MdmDevice | None:
    """One ``mobiledevices`` resource; None when mail cannot come from it."""
    if not isinstance(d, dict):
        raise mdm.MalformedDevice("not an object")
    ids = mdm.device_ids(mdm_id=d.get("resourceId"), easDeviceId=d.get("deviceId"),
                         serial=d.get("serialNumber"))
    last_seen = mdm.synced_at(d.get("lastSync"), ids)
    emails = d.get("email")
    user = mdm.mailbox(*(emails if isinstance(emails, list) else []))
    kind = str(d.get("type") or "")
    os_text = str(d.get("os") or "")
    platform = mdm.platform_of("android" if kind == "ANDROID" else os_text, d.get("model"))
    if user is None or platform is None:
        return None
    apps = mdm.apps_of(d.get("applications"), "packageName", "displayName", "versionName")
    full = platform == "android" and d.get("managedAccountIsOnOwnerProfile") is True
    status = str(d.get("status") or "")
    compliance = "compliant" if status == "APPROVED" else status.lower() or "unknown"
    if str(d.get("deviceCompromisedStatus") or "").lower() == "compromised":
        compliance = "noncompliant"
    return MdmDevice(
        ids=ids, user=user, platform=platform,
        os_version=str(d.get("releaseVersion") or os_text.rpartition(" ")[2]),
        apps=apps, last_seen=last_seen, managed=True,
        inventory="full" if full else "managed-only", compliance=compliance,
        gone=status in GONE,
    )
