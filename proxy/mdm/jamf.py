"""Jamf Pro through the Jamf Pro API.

Token: OAuth client credentials at ``<base_url>/api/oauth/token`` (an API client
whose role grants "Read Mobile Devices" only; Jamf Pro 10.49 or later).

Listing: ``GET /api/v2/mobile-devices/detail`` with the sections ``GENERAL``,
``HARDWARE``, ``USER_AND_LOCATION`` and ``APPLICATIONS``, ``page``/``page-size``
paging sorted by ``mobileDeviceId:asc`` until ``totalCount``; an incremental pass
adds the RSQL ``filter`` ``lastInventoryUpdateDate>="<time>"``. The filter and sort
fields are the endpoint's flat names, not section paths (Jamf Pro API reference,
"Return paginated Mobile Device Inventory records": "Fields allowed in the query:
... lastInventoryUpdateDate ..."; supported since 11.4.0). A record is
``mobileDeviceId``, ``deviceType`` (``iOS``, ``tvOS``, ``watchOS``...) and one
object per section: ``general`` (``udid``, ``lastInventoryUpdateDate``,
``osVersion``, ``managed``, ``deviceOwnershipType``, and for iOS
``exchangeDeviceId``), ``hardware`` (``serialNumber``, ``model``),
``userAndLocation`` (``emailAddress``, ``username``) and ``applications``
(``identifier``, ``name``, ``version``).

``deviceOwnershipType`` is ``Institutional``, ``UserEnrollment``,
``AccountDrivenUserEnrollment`` or ``AccountDrivenDeviceEnrollment`` (and
``PersonalDeviceProfile`` before 11.25). User Enrollment of either kind lets the MDM
see only the apps it manages: ``managed-only``; institutional and account-driven
*device* enrollment are ``full``; a record without the field is ``managed-only``
(nothing says the inventory is whole). A device no longer managed
(``general.managed`` false) loses its posture. Jamf has no compliance verdict of its
own for mobile devices: ``unknown``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from proxy import mdm
from proxy.config.mdm import MdmConfig
from proxy.mdm import MdmDevice, Page
from proxy.mdm.http import ClientCredentials, MdmError, MdmHttp

PAGE_SIZE = 100
SECTIONS = ("GENERAL", "HARDWARE", "USER_AND_LOCATION", "APPLICATIONS")
#: ``deviceOwnershipType`` values whose inventory lists every app.
FULL_INVENTORY = frozenset({"Institutional", "AccountDrivenDeviceEnrollment"})


class JamfConnector:
    def __init__(self, cfg: MdmConfig, secret: str, http: MdmHttp) -> None:
        self.name = cfg.name
        self._cfg, self._http = cfg, http
        self._token = ClientCredentials(http, cfg.token_url or f"{cfg.base_url}/api/oauth/token",
                                        cfg.client_id, secret)

    async def devices(self, since: float | None) -> AsyncIterator[Page]:
        size = self._cfg.page_size or PAGE_SIZE
        base: list[tuple[str, str]] = [("section", s) for s in SECTIONS]
        base += [("page-size", str(size)), ("sort", "mobileDeviceId:asc")]
        if since is not None:
            base.append(("filter", f'lastInventoryUpdateDate>="{mdm.rfc3339(since)}"'))
        url = f"{self._cfg.base_url}/api/v2/mobile-devices/detail"
        number = done = 0
        while True:
            body = await self._http.get_json(url, token=self._token,
                                             params=[*base, ("page", str(number))])
            if not isinstance(body, dict) or not isinstance(body.get("results"), list) \
                    or not isinstance(body.get("totalCount"), int):
                raise MdmError("garbage", "Jamf answered something other than a page")
            results: list[Any] = body["results"]
            yield convert(results)
            done += len(results)
            number += 1
            if not results or done >= body["totalCount"]:
                return


def convert(records: list[Any]) -> Page:
    return mdm.page_of(records, parse_device)


def parse_device(d: Any) -> MdmDevice | None:
    """One mobile-device detail record; None when mail cannot come from it."""
    if not isinstance(d, dict):
        raise mdm.MalformedDevice("not an object")
    general, hardware, person = (_section(d, k) for k in ("general", "hardware",
                                                          "userAndLocation"))
    mdm_id = d.get("mobileDeviceId")  # a string in the reference; older servers: a number
    if isinstance(mdm_id, int) and not isinstance(mdm_id, bool):
        mdm_id = str(mdm_id)
    ids = mdm.device_ids(mdm_id=mdm_id,
                         udid=general.get("udid"), serial=hardware.get("serialNumber"),
                         easDeviceId=general.get("exchangeDeviceId"))
    last_seen = mdm.synced_at(general.get("lastInventoryUpdateDate"), ids)
    user = mdm.mailbox(person.get("emailAddress"), person.get("username"))
    platform = mdm.platform_of(d.get("deviceType") or "iOS", hardware.get("model"))
    if user is None or platform not in ("ios", "ipados"):
        return None
    apps = mdm.apps_of(d.get("applications"), "identifier", "name", "version")
    ownership = general.get("deviceOwnershipType")
    return MdmDevice(
        ids=ids, user=user, platform=platform, os_version=str(general.get("osVersion") or ""),
        apps=apps, last_seen=last_seen, managed=general.get("managed") is not False,
        inventory="full" if ownership in FULL_INVENTORY else "managed-only",
        compliance="unknown", gone=general.get("managed") is False,
    )


def _section(d: dict[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key)
    return value if isinstance(value, dict) else {}
