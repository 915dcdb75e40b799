"""What an ActiveSync request must not carry before mailward judges it, and the target
it goes upstream with. Pure functions on the request line and raw headers.

mailward decides on what it reads (the Basic user from ``Authorization``, the query,
``Host``, the body's length, ``MS-ASProtocolVersion``), so the upstream must act on the
same request. A request is refused with 400 when it could mean something else to the
upstream (:func:`refusal`):

* more than one ``Authorization`` header (mailward judges one user, an upstream that
  takes the last one serves another);
* an absolute-form target (``POST https://other/...``) or a ``#fragment``: the
  upstream target is rebuilt from the path and query only (:func:`upstream_target`);
* a ``Connection`` header naming a header mailward relies on (the hop-by-hop filter
  would drop it, so the upstream would not see what mailward saw).

Headers that would let a client speak for mailward are dropped rather than refused
(:data:`NOT_FORWARDED`, given to :func:`~proxy.frontends.activesync.wire.
forwarded_headers`, which also replaces the client's ``X-Forwarded-*`` with what
mailward saw): method overrides (an upstream honouring one would run another method
than the one judged) and RFC 7239 ``Forwarded`` (mailward trusts no proxy in front of
it: the config has no ``trusted_proxies`` yet).
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs
from multidict import MultiMapping

from proxy.frontends.activesync.wire import connection_names

EAS_PATH: Final = "/Microsoft-Server-ActiveSync"

#: End-to-end request headers mailward reads itself (lower case).
RELIED_ON: Final = frozenset({b"authorization", b"host", b"content-length",
                              b"ms-asprotocolversion"})
#: Headers asking a server to run another method than the request line's.
METHOD_OVERRIDES: Final = frozenset({b"x-http-method-override", b"x-http-method",
                                     b"x-method-override"})
#: Client request headers never forwarded, besides the hop-by-hop ones and those
#: ``forwarded_headers`` replaces.
NOT_FORWARDED: Final = METHOD_OVERRIDES | {b"forwarded"}


def refusal(raw_target: str, headers: MultiMapping[str]) -> str | None:
    """Why the request must be refused with 400 (a short reason code), or None.

    ``raw_target`` is the request target as received (aiohttp's ``raw_path``),
    ``headers`` the request's (case-insensitive, as aiohttp's ``request.headers``)."""
    if not raw_target.startswith("/"):
        return "absolute_form"
    if "#" in raw_target:
        return "fragment"
    if len(headers.getall(hdrs.AUTHORIZATION, ())) > 1:
        return "duplicate_authorization"
    for value in headers.getall(hdrs.CONNECTION, ()):
        if not connection_names(value.encode("utf-8", "surrogateescape")).isdisjoint(RELIED_ON):
            return "connection_names_end_to_end"
    return None


def upstream_target(raw_target: str) -> str:
    """The target the upstream gets: the one path mailward serves and the query exactly
    as the client sent it (for a request :func:`refusal` let through)."""
    _, sep, query = raw_target.partition("?")
    return EAS_PATH + sep + query
