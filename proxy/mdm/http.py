"""The HTTP client the MDM connectors share, and their token flows.

:class:`MdmHttp` wraps one ``aiohttp.ClientSession`` per connector: every request
has a total timeout; a 5xx answer, a timeout or a dropped connection is retried
with exponential backoff (:data:`MAX_ATTEMPTS` in all); a 429 waits for its
``Retry-After`` (capped at :data:`MAX_RETRY_AFTER_S`, at most :data:`MAX_THROTTLED`
times a request); a 401 refreshes the bearer token once and retries. Anything else
becomes an :class:`MdmError` whose ``kind`` (``auth``, ``http``, ``timeout``,
``network``, ``throttled``, ``garbage``) labels ``mailward_mdm_errors_total``.

Secrets (client secrets, private keys, access tokens) never appear in an error, a
log line or a ``repr``: errors name the URL path and the status only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from proxy.oplog import get_logger

log = get_logger("mailward.mdm")

MAX_ATTEMPTS = 4  # for 5xx, timeouts and connection failures
MAX_THROTTLED = 6  # 429 answers honoured per request
BACKOFF_S = 0.5  # first retry delay; doubles each time
MAX_RETRY_AFTER_S = 120.0
MAX_BODY_BYTES = 64 * 1024 * 1024  # one page of a listing
#: A token is refreshed this long before the expiry its issuer gave.
TOKEN_MARGIN_S = 60.0


class MdmError(Exception):
    """The MDM could not be read; ``kind`` is a short label for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class TokenSource(Protocol):
    async def token(self, *, refresh: bool = False) -> str: ...


class MdmHttp:
    """JSON over HTTPS with retries; see the module docstring."""

    def __init__(self, connector: str, *, timeout_s: float = 30.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 backoff_s: float = BACKOFF_S) -> None:
        self.connector = connector
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 10))
        self._session: aiohttp.ClientSession | None = None
        self._sleep = sleep
        self._backoff_s = backoff_s

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers={"User-Agent": "mailward-mdm"},
                connector=aiohttp.TCPConnector(limit=32))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_json(self, url: str, *, token: TokenSource | None = None,
                       params: dict[str, str] | list[tuple[str, str]] | None = None) -> Any:
        return await self.request_json("GET", url, token=token, params=params)

    async def request_json(self, method: str, url: str, *, token: TokenSource | None = None,
                           params: dict[str, str] | list[tuple[str, str]] | None = None,
                           form: dict[str, str] | None = None,
                           headers: dict[str, str] | None = None) -> Any:
        """The decoded JSON body of a 2xx answer (see the module docstring)."""
        what = f"{method} {urlsplit(url).path}"
        failures = throttled = 0
        refreshed = False
        while True:
            hdrs = dict(headers or {})
            hdrs.setdefault("Accept", "application/json")
            if token is not None:
                hdrs["Authorization"] = f"Bearer {await token.token(refresh=refreshed)}"
            try:
                async with self._client().request(method, url, params=params, data=form,
                                                  headers=hdrs) as resp:
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    body = await _read_capped(resp) if status < 300 else b""
            except TimeoutError:
                error = MdmError("timeout", f"{what}: timed out")
            except aiohttp.ClientError as exc:
                error = MdmError("network", f"{what}: {type(exc).__name__}")
            else:
                if status == 401 and token is not None and not refreshed:
                    refreshed = True
                    continue
                if status == 429 and throttled < MAX_THROTTLED:
                    throttled += 1
                    await self._sleep(retry_after_s(retry_after, self._backoff_s))
                    continue
                if status < 300:
                    return _decode(body, what)
                error = _status_error(status, what)
                if status < 500:
                    raise error
            failures += 1
            if failures >= MAX_ATTEMPTS:
                raise error
            await self._sleep(self._backoff_s * 2 ** (failures - 1))


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The body, or its first ``MAX_BODY_BYTES + 1`` bytes."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(256 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            break
    return bytes(body)


def _decode(body: bytes, what: str) -> Any:
    import json

    if len(body) > MAX_BODY_BYTES:
        raise MdmError("garbage", f"{what}: answer larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise MdmError("garbage", f"{what}: answer is not JSON") from None


def _status_error(status: int, what: str) -> MdmError:
    if status in (401, 403):
        return MdmError("auth", f"{what}: HTTP {status} (check the credentials and the "
                                "API permissions granted)")
    if status == 429:
        return MdmError("throttled", f"{what}: still throttled (HTTP 429)")
    return MdmError("http", f"{what}: HTTP {status}")


def retry_after_s(value: str | None, default: float) -> float:
    """Seconds to wait for a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def same_origin(url: str, base: str) -> bool:
    """A paging link may only lead back to the MDM (the bearer token goes with it)."""
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


# ------------------------------------------------------------------ tokens


class _CachedToken:
    """A bearer token kept until shortly before its expiry; ``refresh`` fetches a
    new one (a 401 with a token that looked valid)."""

    def __init__(self) -> None:
        self._token = ""
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:  # never show the token
        return f"<{type(self).__name__}>"

    async def token(self, *, refresh: bool = False) -> str:
        async with self._lock:
            if refresh or not self._token or time.monotonic() >= self._expires:
                answer = await self._fetch()
                token = answer.get("access_token") if isinstance(answer, dict) else None
                if not isinstance(token, str) or not token:
                    raise MdmError("auth", "token endpoint answered without an access_token")
                try:
                    lifetime = float(answer.get("expires_in", 3600))
                except (TypeError, ValueError):
                    lifetime = 3600.0
                self._token = token
                self._expires = time.monotonic() + max(lifetime - TOKEN_MARGIN_S, 1.0)
            return self._token

    async def _fetch(self) -> Any:
        raise NotImplementedError


class ClientCredentials(_CachedToken):
    """OAuth 2.0 client credentials (RFC 6749 4.4): Microsoft identity platform
    (with ``scope``) and Jamf Pro's ``/api/oauth/token``."""

    def __init__(self, http: MdmHttp, url: str, client_id: str, secret: str,
                 scope: str = "") -> None:
        super().__init__()
        self._http, self._url = http, url
        self._form = {"grant_type": "client_credentials", "client_id": client_id,
                      "client_secret": secret}
        if scope:
            self._form["scope"] = scope

    async def _fetch(self) -> Any:
        return await self._http.request_json("POST", self._url, form=self._form)


class ServiceAccountJwt(_CachedToken):
    """Google's OAuth 2.0 JWT bearer flow (RFC 7523) for a service account with
    domain-wide delegation: an RS256 assertion signed with the account's key, acting
    for ``subject`` (an administrator), for ``scope``."""

    def __init__(self, http: MdmHttp, key: dict[str, Any], subject: str, scope: str,
                 token_url: str = "") -> None:
        super().__init__()
        for field in ("client_email", "private_key"):
            if not isinstance(key.get(field), str):
                raise MdmError("config", f"service-account key has no {field}")
        self._http = http
        self._email: str = key["client_email"]
        self._key_id: str = str(key.get("private_key_id", ""))
        self._private_key: str = key["private_key"]
        self._url = token_url or str(key.get("token_uri") or "https://oauth2.googleapis.com/token")
        self._subject, self._scope = subject, scope

    def assertion(self, now: float) -> str:
        import jwt

        claims = {"iss": self._email, "sub": self._subject, "scope": self._scope,
                  "aud": self._url, "iat": int(now), "exp": int(now) + 3600}
        headers = {"kid": self._key_id} if self._key_id else None
        try:
            return jwt.encode(claims, self._private_key, algorithm="RS256", headers=headers)
        except (ValueError, TypeError) as exc:
            raise MdmError("config", f"service-account key unusable: {type(exc).__name__}") \
                from None

    async def _fetch(self) -> Any:
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": self.assertion(time.time())}
        return await self._http.request_json("POST", self._url, form=form)


__all__ = ["ClientCredentials", "MdmError", "MdmHttp", "ServiceAccountJwt", "TokenSource",
           "retry_after_s", "same_origin"]
