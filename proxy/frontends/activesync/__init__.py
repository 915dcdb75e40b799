"""Exchange ActiveSync front end: an aiohttp reverse proxy for /Microsoft-Server-ActiveSync
and Autodiscover.

How a request goes
------------------
0. A request that could mean something else upstream than to mailward is refused with
   400 (:mod:`.hygiene`): two ``Authorization`` headers, an absolute-form target or a
   ``#fragment``, a ``Connection`` header naming ``Authorization``, ``Host`` or another
   header mailward reads.
1. The query (plain or base64 form, :mod:`proxy.frontends.eas_query`) names the command
   and device; HTTP Basic auth names the user. No device id, or a bad query -> 400. No
   Basic credentials -> 401 (mailward decides per user, so it needs the user name; the
   password is only ever checked by the upstream). A query ``User`` that is not the
   Basic user (ignoring a ``DOMAIN\\`` prefix, and matching an alias to an address
   with the same local part) -> 403.
   The connection's identity facts (its origin and the verified TLS client
   certificate, read once per connection) go into the gate's ``Identity`` with the
   DeviceId as a claim; the gate applies every identity rule (``device_mismatch``,
   ``certificate_required``, ``device_claim_refused``, ``user_mismatch``, ``revoked``).
   With ``client_cert = "required"`` a phone without a certificate gets the gate's
   403 rather than a failed handshake, and its password is never sent upstream.
2. The device-session cache is consulted (one ``decision`` record covers a run of
   requests of one device, user and certificate: :mod:`.sessions`).
3. On a miss, the upstream first verifies the credentials: ``OPTIONS`` with the
   client's ``Authorization`` header. 401 is passed through (recorded as a deny with
   reason ``auth_failed``) and nothing is cached; only then does the gate decide, so
   refusal texts reach authenticated users only.
4. Deny -> HTTP 403 as Exchange answers a blocked device (:mod:`.refusal`). Store or
   audit unavailable, or upstream down -> 503 with ``Retry-After``.
5. Allow -> the request is streamed to the upstream and the answer streamed back,
   chunk by chunk in both directions (nothing buffers a whole body; :mod:`.forward`).
   EAS headers (``MS-ASProtocolVersion``, ``X-MS-PolicyKey``, ``MS-ASAcceptMultiPart``,
   ...) pass unchanged; hop-by-hop headers and method overrides
   (``X-HTTP-Method-Override`` and the like) are dropped; ``X-Forwarded-For`` /
   ``-Proto`` / ``-Host`` are set by mailward (a client's own values are dropped:
   there is no trusted-proxy setting yet). The target is rebuilt from the path and
   query. A long-poll (``Ping``, ``Sync`` with ``Wait``)
   may wait up to ``longpoll_timeout`` for the upstream.

``OPTIONS`` (protocol discovery) carries no device id and returns no mailbox data; it
is passed through without a decision, and without a body.

Autodiscover (``/autodiscover/autodiscover.xml`` and ``/autodiscover/autodiscover.json``,
any letter case; :mod:`.autodiscover`) is passed without a decision too, after the same
hygiene (step 0), with a capped body and a target rebuilt from a strict form; an
upstream 401 to Basic credentials is a failed login
(:meth:`ActiveSyncFrontend.autodiscover_auth_failed`). In the answer, the MobileSync
address equal to the upstream's becomes the listener's ``public_url``
(:mod:`.rewrite`), never anything taken from the request. Other paths answer 404.

Limits (DESIGN "Limits", :mod:`.guard`): a request head must arrive within
``header_timeout`` (slowloris; on ActiveSync and Autodiscover, over TLS or not);
failed logins (an upstream 401 to Basic credentials, on the credential check, a
cached device-session, ``OPTIONS`` or Autodiscover) are throttled per (user, client
address), or per device with a verified certificate; bodies stream up to
``eas_max_body`` (413 beyond); unauthenticated garbage is counted per address into
the per-minute ``abuse_summary``.

The modules
-----------
* :mod:`.handler` -- the aiohttp handler (steps 1-5), the listener, :func:`start` and
  the HTTPS accept loop on ``proxy.net.socket_transport``.
* :mod:`.hygiene` -- what a request must not carry (400) and the upstream target.
* :mod:`.guard` -- the listener's use of the limits: the failed-login throttle, the
  streamed body cap, abuse counting.
* :mod:`.autodiscover` -- the Autodiscover paths, passed to the upstream;
  :mod:`.rewrite` -- the upstream's address in their answers replaced, byte for byte
  elsewhere (expat, DTDs refused).
* :mod:`.sessions` -- device-sessions: the decision cache, registered with the gate
  so it can end them.
* :mod:`.refusal` -- the answers mailward gives itself: 403 with EAS status 129 in
  WBXML, 503 with ``Retry-After``, plain-text errors.
* :mod:`.forward` -- forwarding an admitted request and streaming the answer back:
  small bodies over the keep-alive pool, large or chunked ones through aiohttp's
  client, which also runs the credential check.
* :mod:`.upstream` -- the keep-alive pool and its connections (``asyncio.Protocol``
  with flow control around the wire below).
* :mod:`.wire` -- HTTP/1.1 on the upstream leg without I/O, on httptools (llhttp):
  any bytes from the upstream give an answer or :class:`UpstreamProtocolError`;
  request heads that carry no injected line; and the one hop-by-hop header filter.

Dependencies run one way: handler -> hygiene, sessions, refusal, forward, autodiscover;
autodiscover -> forward, rewrite; forward -> hygiene, upstream -> wire.
"""

from proxy.frontends.activesync.autodiscover import Autodiscover, autodiscover_kind
from proxy.frontends.activesync.forward import RESENDABLE_COMMANDS, Forwarder
from proxy.frontends.activesync.handler import (
    ActiveSyncFrontend,
    RunningActiveSync,
    basic_user,
    resolve_user,
    serve_https,
    start,
)
from proxy.frontends.activesync.hygiene import EAS_PATH
from proxy.frontends.activesync.refusal import blocked_response, status_wbxml
from proxy.frontends.activesync.rewrite import Rewriter
from proxy.frontends.activesync.sessions import (
    DECISION_MAX_AGE_S,
    IDLE_S,
    DeviceSession,
    DeviceSessions,
)
from proxy.frontends.activesync.upstream import UpstreamConnection, UpstreamPool
from proxy.frontends.activesync.wire import (
    CHUNK_BYTES,
    HOP_BY_HOP,
    ResponseHead,
    UnsendableRequest,
    UpstreamClosedEarly,
    UpstreamProtocolError,
    UpstreamWire,
    end_to_end,
)

__all__ = [
    "CHUNK_BYTES",
    "DECISION_MAX_AGE_S",
    "EAS_PATH",
    "HOP_BY_HOP",
    "IDLE_S",
    "RESENDABLE_COMMANDS",
    "ActiveSyncFrontend",
    "Autodiscover",
    "DeviceSession",
    "DeviceSessions",
    "Forwarder",
    "ResponseHead",
    "Rewriter",
    "RunningActiveSync",
    "UnsendableRequest",
    "UpstreamClosedEarly",
    "UpstreamConnection",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamWire",
    "autodiscover_kind",
    "basic_user",
    "blocked_response",
    "end_to_end",
    "resolve_user",
    "serve_https",
    "start",
    "status_wbxml",
]
