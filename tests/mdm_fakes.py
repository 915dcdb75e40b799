"""Local fakes of the three MDM APIs, built from the vendors' documented request and
response shapes, for tests and ``bench/mdm.py``: aiohttp on loopback.

* Microsoft: ``POST /<tenant>/oauth2/v2.0/token`` (client credentials) and Graph
  ``/beta/deviceManagement/managedDevices`` (``$select``, ``$top``, ``$filter=
  lastSyncDateTime gt T``, ``@odata.nextLink`` with ``$skiptoken``; ``udid`` empty
  as in a real listing) and ``.../managedDevices/{id}/detectedApps`` (paged at
  ``app_page``). Only ``/beta``: v1.0 has neither ``managementState`` nor
  ``detectedApps`` on a managed device (see proxy/mdm/intune.py);
* Jamf Pro: ``POST /api/oauth/token`` and ``GET /api/v2/mobile-devices/detail``
  (``page``, ``page-size``, ``sort``, ``section``, the RSQL ``filter``
  ``lastInventoryUpdateDate>="T"``; records with ``general``, ``hardware``,
  ``userAndLocation.emailAddress`` and ``applications``);
* Google: ``POST /token`` (JWT bearer; the assertion's RS256 signature, ``sub`` and
  ``scope`` are checked) and ``GET /admin/directory/v1/customer/{c}/devices/mobile``
  (``projection=FULL``, ``maxResults`` up to 100, ``pageToken``, ``orderBy=lastSync``
  with ``sortOrder``; no ``query``: the connector does not search).

Every fake can answer the next requests with 500s (``fail``), 429 with
``Retry-After`` (``throttle``), garbage (``garbage``), can expire every token
issued so far (``expire_tokens``: the next request gets 401), and can replace
top-level fields of one device's record in every listing (``overrides``: a
malformed record among good ones).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

TIKTOK = ("com.zhiliaoapp.musically", "TikTok", "35.1.3")
OUTLOOK = ("com.microsoft.office.outlook", "Microsoft Outlook", "4.2405.0")
COMMON_APPS = tuple((f"com.example.app{i}", f"Example App {i}", f"{i}.0") for i in range(150))


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")  # Graph: 7 digits


@dataclass
class FakeDevice:
    id: str
    user: str
    platform: str = "android"  # android | ios
    apps: list[tuple[str, str, str]] = field(default_factory=lambda: [OUTLOOK])
    last_sync: float = field(default_factory=time.time)
    eas_id: str = ""
    serial: str = ""
    udid: str = ""
    owner: str = "company"  # company | personal
    compliance: str = "compliant"
    state: str = "managed"  # Intune managementState; retirePending etc.
    model: str = "Pixel 8"

    def touch(self) -> None:
        """The device checked in (its inventory time moves on)."""
        self.last_sync = max(time.time(), self.last_sync + 1)


class FakeMdm:
    """State shared by the vendor fakes; see the module docstring."""

    def __init__(self, secret: str = "s3cret", *, public_key: Any = None) -> None:
        self.secret = secret
        self.public_key = public_key  # Google: the service account's public key
        self.devices: dict[str, FakeDevice] = {}
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.queries: list[tuple[str, dict[str, list[str]]]] = []  # path, query
        self.apps_served: dict[str, float] = {}  # device id -> monotonic time
        self.failures: list[int] = []
        self.throttles = 0
        self.garbage = 0
        self.token_requests = 0
        self.app_page = 1000  # detectedApps per page (Intune pages collections at 1,000)
        self.overrides: dict[str, dict[str, Any]] = {}  # device id -> record fields
        self.base = ""
        self._runner: web.AppRunner | None = None

    def add(self, *devices: FakeDevice) -> None:
        for d in devices:
            self.devices[d.id] = d

    def fail(self, *statuses: int) -> None:
        self.failures.extend(statuses)

    def throttle(self, times: int = 1) -> None:
        self.throttles += times

    def expire_tokens(self) -> None:
        self.tokens.clear()

    # ------------------------------------------------------------------ serving

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._ms_token)
        app.router.add_get("/beta/deviceManagement/managedDevices", self._graph_devices)
        app.router.add_get("/beta/deviceManagement/managedDevices/{id}/detectedApps",
                           self._graph_apps)
        app.router.add_post("/api/oauth/token", self._jamf_token)
        app.router.add_get("/api/v2/mobile-devices/detail", self._jamf_devices)
        app.router.add_post("/token", self._google_token)
        app.router.add_get("/admin/directory/v1/customer/{customer}/devices/mobile",
                           self._google_devices)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"
        return self.base

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        self.queries.append((request.path, {k: request.query.getall(k) for k in request.query}))
        if self.failures:
            return web.json_response({"error": "boom"}, status=self.failures.pop(0))
        if self.throttles:
            self.throttles -= 1
            return web.json_response({"error": "slow down"}, status=429,
                                     headers={"Retry-After": "1"})
        if not request.path.endswith("token") and not request.path.startswith("/_bench/"):
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
                return web.json_response({"error": {"code": "InvalidAuthenticationToken"}},
                                         status=401)
            if self.garbage:
                self.garbage -= 1
                return web.Response(text="<html>proxy error</html>", status=200)
        return await handler(request)  # type: ignore[no-any-return]

    def _issue(self) -> web.Response:
        self.token_requests += 1
        token = secrets.token_urlsafe(16)
        self.tokens.add(token)
        return web.json_response({"token_type": "Bearer", "expires_in": 3599,
                                  "access_token": token})

    # ------------------------------------------------------------------ Microsoft

    async def _ms_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials" or form.get("client_secret") \
                != self.secret or form.get("scope") is None:
            return web.json_response({"error": "invalid_client"}, status=401)
        return self._issue()

    async def _graph_devices(self, request: web.Request) -> web.Response:
        q = request.query
        top = int(q.get("$top", "100"))
        skip = int(q.get("$skiptoken", "0"))
        devices = list(self.devices.values())
        if "$filter" in q:
            field_, op, value = q["$filter"].split(" ", 2)
            assert (field_, op) == ("lastSyncDateTime", "gt"), q["$filter"]  # lt, gt only
            since = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            devices = [d for d in devices if d.last_sync > since]
        chunk = devices[skip:skip + top]
        body: dict[str, Any] = {"@odata.context": "https://graph.microsoft.com/beta/$metadata",
                                "value": _select(q, [self._graph_device(d) for d in chunk])}
        if skip + top < len(devices):
            body["@odata.nextLink"] = _next_link(request, skip + top)
        return web.json_response(body)

    def _record(self, d: FakeDevice, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, **self.overrides.get(d.id, {})}

    def _graph_device(self, d: FakeDevice) -> dict[str, Any]:
        return self._record(d, {
            "id": d.id, "userPrincipalName": d.user, "emailAddress": d.user,
            "operatingSystem": "Android" if d.platform == "android" else "iOS",
            "osVersion": "14", "model": d.model, "easDeviceId": d.eas_id or None,
            "serialNumber": d.serial, "udid": "",  # values only on a GET of one device
            "lastSyncDateTime": iso(d.last_sync), "complianceState": d.compliance,
            "managementState": d.state, "managedDeviceOwnerType": d.owner,
        })

    async def _graph_apps(self, request: web.Request) -> web.Response:
        device = self.devices.get(request.match_info["id"])
        if device is None:
            return web.json_response({"error": {"code": "ResourceNotFound"}}, status=404)
        self.apps_served[device.id] = time.monotonic()
        skip = int(request.query.get("$skiptoken", "0"))
        size = self.app_page
        chunk = device.apps[skip:skip + size]
        body: dict[str, Any] = {"value": _select(request.query, [
            {"id": f"{i:040x}", "displayName": name, "version": version, "sizeInByte": 0,
             "deviceCount": 1, "publisher": "", "platform": "ios" if device.platform == "ios"
             else "androidDedicatedAndFullyManaged"}
            for i, (_, name, version) in enumerate(chunk, skip)])}
        if skip + size < len(device.apps):
            body["@odata.nextLink"] = _next_link(request, skip + size)
        return web.json_response(body)

    # ------------------------------------------------------------------ Jamf

    async def _jamf_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials" or form.get("client_secret") \
                != self.secret:
            return web.json_response({"httpStatus": 401}, status=401)
        return self._issue()

    async def _jamf_devices(self, request: web.Request) -> web.Response:
        q = request.query
        page, size = int(q.get("page", "0")), int(q.get("page-size", "100"))
        assert "APPLICATIONS" in q.getall("section", [])
        assert q.get("sort", "mobileDeviceId:asc") == "mobileDeviceId:asc", q["sort"]
        devices = sorted(self.devices.values(), key=lambda d: d.id)
        if "filter" in q:  # flat field names, not general.lastInventoryUpdateDate
            field_, value = q["filter"].split(">=", 1)
            assert field_ == "lastInventoryUpdateDate", q["filter"]
            since = datetime.fromisoformat(value.strip('"').replace("Z", "+00:00")).timestamp()
            devices = [d for d in devices if d.last_sync >= since]
        chunk = devices[page * size:(page + 1) * size]
        return web.json_response({"totalCount": len(devices), "results": [self._record(d, {
            "mobileDeviceId": d.id, "deviceType": "iOS",
            "hardware": {"serialNumber": d.serial, "model": d.model},
            "userAndLocation": {"emailAddress": d.user, "username": d.user.split("@")[0]},
            "general": {"udid": d.udid, "osVersion": "17.5", "managed": d.state == "managed",
                        "lastInventoryUpdateDate": iso(d.last_sync).replace("0Z", "Z"),
                        "exchangeDeviceId": d.eas_id or None,
                        "deviceOwnershipType": "Institutional" if d.owner == "company"
                        else "UserEnrollment"},
            "applications": [{"identifier": i, "name": n, "version": v} for i, n, v in d.apps],
        }) for d in chunk]})

    # ------------------------------------------------------------------ Google

    async def _google_token(self, request: web.Request) -> web.Response:
        import jwt

        form = await request.post()
        try:
            claims = jwt.decode(str(form.get("assertion")), self.public_key,
                                algorithms=["RS256"], audience=f"{self.base}/token")
        except jwt.PyJWTError:
            return web.json_response({"error": "invalid_grant"}, status=400)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" \
                or not claims.get("sub") or "device.mobile.readonly" not in claims["scope"]:
            return web.json_response({"error": "unauthorized_client"}, status=401)
        return self._issue()

    async def _google_devices(self, request: web.Request) -> web.Response:
        q = request.query
        assert q.get("projection") == "FULL" and "query" not in q
        size, start = int(q.get("maxResults", "100")), int(q.get("pageToken", "0"))
        assert 1 <= size <= 100
        devices = list(self.devices.values())
        if "orderBy" in q:
            assert q["orderBy"] == "lastSync", q["orderBy"]
            devices.sort(key=lambda d: d.last_sync, reverse=q.get("sortOrder") == "DESCENDING")
        chunk = devices[start:start + size]
        body: dict[str, Any] = {"kind": "admin#directory#mobiledevices", "mobiledevices": [
            self._record(d, {
            "kind": "admin#directory#mobiledevice", "resourceId": d.id, "deviceId": d.eas_id,
            "serialNumber": d.serial, "email": [d.user], "model": d.model,
            "os": "Android 14" if d.platform == "android" else "iOS 17.5",
            "type": "ANDROID" if d.platform == "android" else "IOS_SYNC",
            "status": "APPROVED" if d.state == "managed" else "WIPING",
            "lastSync": iso(d.last_sync).replace("0Z", "Z"),
            "managedAccountIsOnOwnerProfile": d.owner == "company",
            "applications": [{"packageName": i, "displayName": n, "versionName": v,
                              "versionCode": 1} for i, n, v in d.apps],
            }) for d in chunk]}
        if start + size < len(devices):
            body["nextPageToken"] = str(start + size)
        return web.json_response(body)


def _select(query: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Graph's ``$select``: only the properties named."""
    if "$select" not in query:
        return records
    keep = set(query["$select"].split(","))
    return [{k: v for k, v in r.items() if k in keep} for r in records]


def _next_link(request: web.Request, skip: int) -> str:
    """An ``@odata.nextLink``: the same query options, the next ``$skiptoken``."""
    params = {k: v for k, v in request.query.items() if k != "$skiptoken"}
    params["$skiptoken"] = str(skip)
    return str(request.url.with_query(params))


class FakeMdmThread:
    """A :class:`FakeMdm` served from its own thread and event loop (for tests that
    drive a ``mailward serve`` subprocess from synchronous code)."""

    def __init__(self, fake: FakeMdm) -> None:
        self.fake = fake
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> FakeMdm:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)
        return self.fake

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the fake's loop (state changes without races)."""
        async def go() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
