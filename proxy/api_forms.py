"""Request bodies of the API (:mod:`proxy.api`): the error type every handler raises,
the bounded body reader, and the what-if posture of ``POST /v1/explain``."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp import web

from proxy.net.limits import Limit, Limits
from proxy.posture import App, Posture

#: A request body must arrive within this many ``header_timeout``s.
BODY_TIMEOUT_FACTOR: Final = 4
#: Apps listed in a what-if posture (same bound as a report).
MAX_EXPLAIN_APPS: Final = 5000


class ApiError(Exception):
    """An answer other than success: HTTP ``status`` with a JSON error body."""

    def __init__(self, status: int, error: str, detail: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
        self.headers = headers or {}


async def json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (an empty body is ``{}``); 400 otherwise."""
    try:
        doc = await request.json() if request.can_read_body else {}
    except ValueError:
        raise ApiError(400, "malformed", "The body is not JSON.") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "malformed", "The body is not a JSON object.")
    return doc


async def read_limited(request: web.Request, limit: int, limits: Limits) -> bytes:
    """The body, refusing (413) as soon as it exceeds ``limit`` bytes, and (408) when
    it does not arrive within :data:`BODY_TIMEOUT_FACTOR` header timeouts."""
    too_large = ApiError(413, "too_large", f"The request body is larger than {limit} bytes.")
    if request.content_length is not None and request.content_length > limit:
        limits.hit(Limit.API_BODY, "api", request.remote or "")
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.cfg.header_timeout_s * BODY_TIMEOUT_FACTOR):
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    limits.hit(Limit.API_BODY, "api", request.remote or "")
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        limits.hit(Limit.HEADER_TIMEOUT, "api", request.remote or "")
        raise ApiError(408, "timeout", "The request body arrived too slowly.",
                       {"Connection": "close"}) from None
    return b"".join(chunks)


def what_if_posture(p: object, device_id: str, user: str, now: float) -> Posture:
    if not isinstance(p, dict):
        raise ApiError(400, "malformed", "posture must be an object.")
    platform = p.get("platform")
    apps = p.get("apps", [])
    if not isinstance(platform, str) or not isinstance(apps, list) \
            or len(apps) > MAX_EXPLAIN_APPS:
        raise ApiError(400, "malformed", "posture needs platform (string) and apps (list).")
    parsed = []
    for a in apps:
        if isinstance(a, str):
            parsed.append(App(id=a))
        elif isinstance(a, dict) and isinstance(a.get("id"), str) \
                and isinstance(a.get("version", ""), str) and isinstance(a.get("name", ""), str):
            parsed.append(App(id=a["id"], version=a.get("version", ""), name=a.get("name", "")))
        else:
            raise ApiError(400, "malformed", "each app is an id or {id, version, name}.")
    return Posture(
        device_id=device_id,
        user=str(p.get("user", user)).lower(),
        platform=platform,
        os_version=str(p.get("os_version", "")),
        managed=bool(p.get("managed", False)),
        apps=tuple(parsed),
        iat=int(now),
        exp=int(now) + 3600,
        jti="what-if",
        issuer="what-if",
        attested_by="what-if",
    )
