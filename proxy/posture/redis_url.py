"""``redis+sentinel://`` URLs, read without Redis: :mod:`proxy.config` checks them when
it loads ``mailward.toml`` (so ``check-config`` names a bad one), and
:func:`proxy.posture.redis.connect` connects with what they say."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

#: What a ``redis+sentinel://`` URL's query may set: TLS (to the sentinels and the
#: master alike: ``ssl=true`` and the certificate files) and the sentinels' own password.
SENTINEL_PARAMS: Final = frozenset({"ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                                    "sentinel_password"})


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, dict[str, Any]]:
    """``redis+sentinel://[:pw@]h1:p1[,h2:p2]/service[/db][?k=v]`` -> (sentinels,
    service, db, connection keyword arguments; ``k`` one of :data:`SENTINEL_PARAMS`).
    ``ValueError`` when malformed."""
    parts = urlsplit(url)
    if parts.scheme != "redis+sentinel":
        raise ValueError("not a redis+sentinel:// URL")
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[-1]) or None
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("the path must be /<service>[/<db>]")
    kwargs: dict[str, Any] = dict(parse_qsl(parts.query))
    unknown = sorted(set(kwargs) - SENTINEL_PARAMS)
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} (known: "
                         f"{', '.join(sorted(SENTINEL_PARAMS))})")
    if "ssl" in kwargs:
        if kwargs["ssl"] not in ("true", "false"):
            raise ValueError("ssl must be true or false")
        kwargs["ssl"] = kwargs["ssl"] == "true"
    if password:
        kwargs["password"] = password
    return hosts, path[0], int(path[1]) if len(path) == 2 else 0, kwargs


__all__ = ["SENTINEL_PARAMS", "parse_sentinel_url"]
