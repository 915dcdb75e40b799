"""The control-plane HTTP API (aiohttp), on its own listener.

Devices and the MDM push posture reports here; ops staff ask what-if questions and
read health and metrics. :func:`make_app` builds the application from explicit
collaborators (gate, posture store, verifier, policy getter, audit sink), so tests
drive it without a server; :func:`start_api` binds it.

Endpoints
---------
``POST /v1/attestations``   body = one JWS, ``Content-Type: application/jose``.
                            201 ``{"device_id", "device", "compliant", "violations",
                            "source", "posture"}``: the posture now *in force* for the
                            device (the MDM's when there is one; ``source`` is its
                            authority) and its evaluation, not just the report received.
``GET  /v1/challenge``      a single-use nonce for reports, with its expiry.
``GET  /v1/devices/{id}``   latest posture summary, current evaluation (read).
``POST /v1/devices/{id}/revoke``  revoke a device (operate; body ``{"why": TEXT}``
                            optional): refused everywhere, live sessions end; an id
                            never seen is revoked in advance. A ``device_revoked``
                            record with ``actor`` = the token's name.
``POST /v1/policy/preview`` impact of a candidate policy (read; body
                            ``{"policy": TOML, "replay": "7d"}``, both optional).
``POST /v1/explain``        what-if evaluation against the current policy (read);
                            no posture is stored; the question is an ``explain``
                            audit record with ``actor``.
``GET  /v1/report``         the auditor's report, one HTML file (read;
                            :mod:`proxy.api_report`).
``GET  /healthz``           the process is up; its body names the version.
``GET  /readyz``            listeners bound, audit writable, store reachable, policy.
``GET  /metrics``           Prometheus text format.

Every error is JSON ``{"error": <code>, "detail": <one sentence>}``. Attestation
refusals use the stable reason codes of ``proxy.attestation``, mapped to HTTP status:

==================================================================  ======
``too_large`` (report over 256 KiB, or body over the API limit)     413
``replay`` (jti seen before)                                        409
``revoked`` (the device or the signing certificate), and            403
``device_reports_disabled`` (device-signed reports not accepted)
``malformed``, ``alg_not_allowed`` (cannot be processed at all)     400
``bad_signature``, ``untrusted_chain``, ``device_mismatch``,        422
``expired``, ``not_yet_valid``, ``bad_nonce``, ``platform_mismatch``,
``user_mismatch`` (well-formed but refused on its merits)
wrong Content-Type                                                  415
posture store unavailable                                           503
==================================================================  ======

Admin endpoints take ``Authorization: Bearer <token>``, compared in constant time
with every named token (:mod:`proxy.api_tokens`); scope ``read`` or ``operate`` as
marked above (a read token on an operate endpoint: 403); without a configured token
they are disabled (403).

Limits (:mod:`proxy.api_guard`, ``[limits]``): requests without the admin token or
an attester-signed report are rate-limited per address (429 + ``Retry-After``);
``GET /v1/challenge`` answers 429 beyond ``max_outstanding_nonces``; bodies over
``api_max_body`` are 413; a request head must arrive within ``header_timeout`` and a
body within :data:`BODY_TIMEOUT_FACTOR` times that (408). Reports refused before
their signer is known (garbage) go into the per-minute ``abuse_summary``, not one
audit record each. ``/readyz`` reads health kept current in the background and never
waits for the store; an unreachable store is *degraded*, not unready (DESIGN
"Health").

The API evaluates and records nothing itself: attestations, what-if questions and
device summaries go through the gate (``Gate.attest``, ``Gate.explain``,
``Gate.assess``), and metrics through the gate's observer.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from aiohttp import web

from proxy import __version__
from proxy.api_forms import (
    ApiError,
    json_object,
    read_limited,
    what_if_posture,
)
from proxy.api_guard import (
    GARBAGE,
    RateLimited,
    StoreHealth,
    charge,
    penalise_false_claim,
    rate_middleware,
    retry_after,
)
from proxy.api_report import AuditReports as AuditReports
from proxy.api_report import report_response
from proxy.api_tokens import AdminToken, Scope, match, tokens_from
from proxy.api_tokens import load_tokens as load_tokens
from proxy.attestation import AttestationError, Verifier, ingest
from proxy.config import ConfigError
from proxy.gate import (
    AUDIT_UNAVAILABLE,
    AuditSink,
    Gate,
    Identity,
    Origin,
    ReportSource,
)
from proxy.ids import DEVICE_ID_RE
from proxy.net.http_guard import guarded
from proxy.net.limits import Limit, Limits
from proxy.oplog import get_logger
from proxy.policy import Decision, Policy
from proxy.posture import PostureStore

log = get_logger("mailward.api")

JOSE: Final = "application/jose"
#: How long a challenge nonce may be used.
NONCE_TTL_S: Final = 300
#: Default request body limit (``[api] max_body_bytes`` overrides it).
DEFAULT_MAX_BODY_BYTES: Final = 256 * 1024

ATTESTATION_STATUS: Final[dict[str, int]] = {
    "too_large": 413,
    "replay": 409,
    "malformed": 400,
    "alg_not_allowed": 400,
    "bad_signature": 422,
    "untrusted_chain": 422,
    "device_mismatch": 422,
    "expired": 422,
    "not_yet_valid": 422,
    "bad_nonce": 422,
    "platform_mismatch": 422,
    "user_mismatch": 422,
    "revoked": 403,
    "device_reports_disabled": 403,
}

@dataclass(frozen=True, slots=True)
class ApiState:
    gate: Gate
    store: PostureStore
    verifier: Callable[[], Verifier]
    policy: Callable[[], Policy]
    tokens: tuple[AdminToken, ...]
    readiness: Callable[[], dict[str, bool]]
    max_body_bytes: int
    audit: AuditSink
    clock: Callable[[], float]
    degraded: Callable[[], list[str]]
    limits: Limits
    store_health: StoreHealth
    report: AuditReports | None = None


_CFG: Final = web.AppKey("mailward_api", ApiState)


def _json_error(status: int, error: str, detail: str,
                headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status,
                             headers=headers)


# aiohttp's own HTTP errors (404, 405, 413 from client_max_size) -> stable codes.
_HTTP_CODES: Final = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
}


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """JSON errors everywhere, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as e:
        return _json_error(e.status, e.error, e.detail, e.headers)
    except RateLimited as e:
        return _json_error(429, "rate_limited", "Too many requests from this address.",
                           retry_after(e.seconds))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        return _json_error(e.status, code, e.reason, {k: v for k, v in e.headers.items()
                                                      if k.lower() == "allow"})
    except Exception:  # a bug: log it, never leak a traceback
        log.exception("api handler failed", path=request.path)
        return _json_error(500, "internal", "Internal error; see the server log.")


def make_app(
    *,
    gate: Gate,
    store: PostureStore,
    policy: Callable[[], Policy],
    audit: AuditSink,
    verifier: Verifier | None = None,
    verifier_factory: Callable[[], Verifier] | None = None,
    admin_token: bytes | None = None,
    readiness: Callable[[], dict[str, bool]] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    clock: Callable[[], float] = time.time,
    degraded: Callable[[], list[str]] | None = None,
    limits: Limits | None = None,
    tokens: tuple[AdminToken, ...] = (),
    report: AuditReports | None = None,
) -> web.Application:
    """Build the API application. Pass ``verifier`` or ``verifier_factory`` (the latter
    lets the server swap trust anchors on reload). ``degraded`` names what
    ``/readyz`` reports as degraded without failing (a CRL past nextUpdate).
    ``limits`` defaults to the gate's. ``admin_token`` is the token named ``admin``
    (scope operate), ``tokens`` the named ones; ``report`` serves ``/v1/report``."""
    if verifier_factory is None:
        if verifier is None:
            raise ValueError("make_app needs verifier or verifier_factory")
        fixed = verifier
        verifier_factory = lambda: fixed  # noqa: E731
    health = StoreHealth(store.ping, lambda ok: gate.observer.health("posture_store", ok))
    state = ApiState(gate, store, verifier_factory, policy, tokens_from(admin_token, tokens),
                     readiness or (lambda: {}), max_body_bytes, audit, clock,
                     degraded or (lambda: []), limits or gate.limits, health, report)
    # client_max_size bounds every body read through aiohttp (JSON endpoints).
    app = web.Application(
        middlewares=[_errors, rate_middleware(lambda: state.limits, _is_admin)],
        client_max_size=max_body_bytes)
    app[_CFG] = state
    app.on_startup.append(health.start)
    app.on_cleanup.append(health.stop)
    app.router.add_post("/v1/attestations", _attestations)
    app.router.add_get("/v1/challenge", _challenge)
    app.router.add_get("/v1/devices/{device_id}", _device)
    app.router.add_post("/v1/devices/{device_id}/revoke", _revoke)
    app.router.add_post("/v1/explain", _explain)
    app.router.add_get("/v1/report", _report)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def _state(request: web.Request) -> ApiState:
    return request.app[_CFG]


# ------------------------------------------------------------------ attestations


async def _report_body(st: ApiState, request: web.Request,
                       source: ReportSource) -> tuple[bytes, bool]:
    """The report's bytes and whether it claims an attester's signature; a wrong media
    type or an oversized body is charged to the address and summarised, not recorded."""
    if request.content_type != JOSE:
        charge(st.limits, request)
        st.gate.attest_garbage(source, "unsupported_media_type")
        raise ApiError(415, "unsupported_media_type",
                       f"Send the report with Content-Type: {JOSE}.")
    try:
        body = await read_limited(request, st.max_body_bytes, st.limits)
    except ApiError as e:
        charge(st.limits, request)
        st.gate.attest_garbage(source, e.error)
        raise
    # An MDM's reports are not rate-limited; a false claim is charged below.
    attester = st.verifier().claims_attester(body)
    if not attester:
        charge(st.limits, request)
    return body, attester


async def _attestations(request: web.Request) -> web.Response:
    st = _state(request)
    source = ReportSource("api", request.remote or "")
    body, attester = await _report_body(st, request, source)
    if not getattr(st.audit, "healthy", True):
        # An accepted report changes access: never without its audit record.
        raise ApiError(503, "audit_unavailable",
                       "The audit log cannot be written; retry later.", {"Retry-After": "30"})
    pol = st.policy()
    try:
        posture = await ingest(st.verifier(), st.store, body, now=st.clock(),
                               max_age_s=pol.max_posture_age_s,
                               require_nonce=pol.require_nonce)
    except AttestationError as e:
        if e.code in GARBAGE:  # no signer established: summarised, not recorded
            st.gate.attest_garbage(source, e.code)
            if attester:
                penalise_false_claim(st.limits, request)
        else:
            await st.gate.attest_refused(source, e.code)
        raise ApiError(ATTESTATION_STATUS.get(e.code, 400), e.code, e.detail) from None
    except Exception as e:  # the store failed: nothing was committed
        log.error("posture store unavailable during ingest", error=str(e))
        st.gate.observer.upstream_failed("posture_store")
        await st.gate.attest_refused(source, "unavailable")
        raise ApiError(503, "unavailable", "The posture store is unavailable; retry later.",
                       {"Retry-After": "30"}) from None
    if posture.nonce:
        st.limits.nonce_used(posture.nonce)
    # Records it; the device's live sessions are re-checked off the response path.
    decision, in_force = await st.gate.attest_report(source, posture, wait=False)
    return web.json_response(
        {
            "device_id": posture.device_id,
            "device": st.gate.trust.resolve(posture.device_id),
            "compliant": decision.allow,
            "violations": [r.to_dict() for r in decision.reasons],
            "source": in_force.authority,
            "posture": {
                "source": in_force.authority,
                "attested_by": in_force.attested_by,
                "platform": in_force.platform,
                "iat": in_force.iat,
                "posture_sha256": in_force.sha256,
            },
            "received": {"source": posture.authority, "posture_sha256": posture.sha256},
        },
        status=201,
    )


# --------------------------------------------------------------------- challenge


async def _challenge(request: web.Request) -> web.Response:
    st = _state(request)
    ip = request.remote or ""
    if not st.limits.nonce_allowed(ip):
        raise ApiError(429, "too_many_nonces",
                       "Too many challenges outstanding; use or let one expire first.",
                       {"Retry-After": "60"})
    nonce = secrets.token_urlsafe(24)
    expires_at = st.clock() + NONCE_TTL_S
    try:
        await st.store.issue_nonce(nonce, expires_at)
    except Exception as e:
        log.error("posture store unavailable for challenge", error=str(e))
        raise ApiError(503, "unavailable", "The posture store is unavailable; retry later.",
                       {"Retry-After": "30"}) from None
    st.limits.nonce_issued(ip, nonce, NONCE_TTL_S)
    return web.json_response(
        {"nonce": nonce, "expires_at": int(expires_at), "expires_in": NONCE_TTL_S},
        headers={"Cache-Control": "no-store"},
    )


# ------------------------------------------------------------------------ admin


def _is_admin(request: web.Request) -> bool:
    return match(_state(request).tokens, request.headers.get("Authorization", "")) is not None


def _require_admin(request: web.Request, scope: Scope = "read") -> str:
    """The name of the presented token (the ``actor``), if its scope allows ``scope``."""
    tokens = _state(request).tokens
    if not tokens:
        raise ApiError(403, "admin_disabled", "No admin token is configured.")
    token = match(tokens, request.headers.get("Authorization", ""))
    if token is None:
        raise ApiError(401, "unauthorized", "Send Authorization: Bearer <admin token>.",
                       {"WWW-Authenticate": 'Bearer realm="mailward"'})
    if not token.allows(scope):
        raise ApiError(403, "forbidden", f"The token {token.name!r} has scope "
                       f"{token.scope}; this needs {scope}.")
    return token.name


async def _device(request: web.Request) -> web.Response:
    _require_admin(request)
    st = _state(request)
    device_id = request.match_info["device_id"]
    try:
        posture = await st.store.get(device_id)
    except Exception as e:
        log.error("posture store unavailable", error=str(e))
        raise ApiError(503, "unavailable", "The posture store is unavailable.") from None
    if posture is None:
        raise ApiError(404, "not_found", "No posture is stored for this device.")
    now = st.clock()
    decision = st.gate.assess(posture, "api")
    live = [s for s in st.gate.live_sessions() if s.identity.device_id == device_id]
    last = getattr(st.audit, "last_decision", None)
    last_decision = None
    if callable(last):
        try:
            last_decision = await last(device_id)
        except Exception as e:
            log.warning("audit lookup failed", error=str(e))
    return web.json_response(
        {
            "device_id": posture.device_id,
            "user": posture.user,
            "platform": posture.platform,
            "os_version": posture.os_version,
            "managed": posture.managed,
            "attested_by": posture.attested_by,
            "iat": posture.iat,
            "exp": posture.exp,
            "posture_age_s": round(now - posture.iat, 3),
            "posture_sha256": posture.sha256,
            "apps": len(posture.apps),
            # What the gate would decide now (not recorded), and what it last did.
            "current_evaluation": _decision_json(decision),
            "last_decision": last_decision,
            "live_sessions": [
                {"protocol": s.origin.protocol, "listener": s.origin.listener,
                 "user": s.identity.user_key}
                for s in live
            ],
        }
    )


async def _revoke(request: web.Request) -> web.Response:
    """Revoke a device through the gate (which records ``device_revoked`` and ends
    its live sessions). Ids never seen may be revoked in advance."""
    actor = _require_admin(request, "operate")
    st = _state(request)
    device_id = request.match_info["device_id"]
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise ApiError(400, "malformed", "The device id is not valid.")
    why: object = ""
    if request.can_read_body:
        try:
            doc = await request.json()
        except ValueError:
            raise ApiError(400, "malformed", "The body is not JSON.") from None
        why = doc.get("why", "") if isinstance(doc, dict) else None
        if not isinstance(why, str) or len(why) > 1024:
            raise ApiError(400, "malformed", "why must be a string.")
    try:
        device = await st.gate.revoke(device_id, why=str(why), actor=actor, via="api")
    except Exception as e:
        log.error("posture store unavailable for revoke", error=str(e))
        raise ApiError(503, "unavailable", "The posture store is unavailable; retry later.",
                       {"Retry-After": "30"}) from None
    return web.json_response({"device_id": device_id, "device": device, "revoked": True})


async def _explain(request: web.Request) -> web.Response:
    """What-if: this posture (or the stored one) for this user, against the current
    policy, through the gate's decision core. No posture is stored; the question and
    its answer are an ``explain`` audit record (DESIGN: what-if questions are
    auditable, never mistaken for access decisions)."""
    actor = _require_admin(request)
    st = _state(request)
    try:
        doc = await request.json()
    except ValueError:
        raise ApiError(400, "malformed", "The body is not JSON.") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "malformed", "The body is not a JSON object.")
    user = doc.get("user")
    device_id = doc.get("device_id") or "what-if"
    protocol = doc.get("protocol", "activesync")
    if not isinstance(user, str) or not user or len(user) > 320:
        raise ApiError(400, "malformed", "user must be a non-empty string.")
    if not isinstance(device_id, str) or len(device_id) > 128:
        raise ApiError(400, "malformed", "device_id must be a string.")
    if protocol not in ("imap", "smtp", "activesync"):
        raise ApiError(400, "malformed", "protocol must be imap, smtp or activesync.")
    what_if = None
    if "posture" in doc:
        what_if = what_if_posture(doc["posture"], device_id, user, st.clock())
    decision = await st.gate.explain(Identity(user, device_id, "api"),
                                     Origin(protocol, "api", request.remote or ""),
                                     posture=what_if, actor=actor)
    if decision.temporary:
        code = decision.reasons[0].code
        if code == AUDIT_UNAVAILABLE:
            raise ApiError(503, "audit_unavailable",
                           "The audit log cannot be written; retry later.",
                           {"Retry-After": "30"})
        raise ApiError(503, "unavailable", "The posture store is unavailable.")
    return web.json_response(_decision_json(decision))


async def _report(request: web.Request) -> web.Response:
    _require_admin(request)
    return await report_response(_state(request).report, request.query)


def _decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "decision": decision.decision,
        "allow": decision.allow,
        "mode": decision.mode,
        "reasons": [r.to_dict() for r in decision.reasons],
        "user_text": None if decision.allow else decision.user_text(),
        "policy_version": decision.policy_version,
        "policy_sha256": decision.policy_sha256,
    }


# ------------------------------------------------------------------ policy preview

_PREVIEW: Final = web.AppKey("mailward_policy_preview", object)
PreviewFn = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]


def add_policy_preview(app: web.Application, preview: PreviewFn) -> None:
    """``POST /v1/policy/preview`` (admin): impact of a candidate policy
    (:meth:`proxy.policies.live.LivePolicy.preview`)."""
    app[_PREVIEW] = preview
    app.router.add_post("/v1/policy/preview", _policy_preview)


async def _policy_preview(request: web.Request) -> web.Response:
    actor = _require_admin(request)  # read: a preview changes nothing
    doc = await json_object(request)
    preview = cast(PreviewFn, request.app[_PREVIEW])
    try:
        result = await preview(doc, actor)
    except (ConfigError, ValueError) as exc:
        raise ApiError(422, "invalid_policy", str(exc)) from None
    return web.json_response(result)


# ----------------------------------------------------------------- health, metrics


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def _readyz(request: web.Request) -> web.Response:
    st = _state(request)
    checks = dict(st.readiness())
    try:
        st.policy()
        checks.setdefault("policy_loaded", True)
    except Exception:
        checks["policy_loaded"] = False
    healthy = getattr(st.audit, "healthy", None)
    if healthy is not None:
        checks.setdefault("audit_writable", bool(healthy() if callable(healthy) else healthy))
    ready = all(checks.values())
    # Degraded is not unready: one external blip must not pull every instance out of
    # the load balancer at once (DESIGN "Health"). The store's health is the last
    # background ping: /readyz never waits for the store.
    checks["posture_store"] = st.store_health.ok
    degraded = st.degraded() + ([] if st.store_health.ok else ["posture_store_unreachable"])
    return web.json_response({"ready": ready, "checks": checks, "degraded": degraded},
                             status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    st = _state(request)
    observer = st.gate.observer
    with contextlib.suppress(Exception):  # a broken policy getter must not hide metrics
        observer.policy_loaded(st.policy())
    body, content_type = observer.expose()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


# ------------------------------------------------------------------------ server


@dataclass
class RunningApi:
    """The bound API listener (a ``RunningListener``)."""

    name: str
    port: int
    runner: web.AppRunner
    server: asyncio.Server | None = None

    async def close(self, grace_s: float = 5.0) -> None:
        if self.server is not None:
            self.server.close()
        await self.runner.shutdown()
        await self.runner.cleanup()


async def start_api(cfg: Any, app: web.Application, ssl_context: Any = None) -> RunningApi:
    """Bind ``app`` on ``cfg.host:cfg.port`` (an ``ApiConfig``); port 0 picks one.
    Connections get the ``header_timeout`` of the app's limits (slowloris)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    limits = app[_CFG].limits
    assert runner.server is not None

    def cut_off(ip: str) -> None:
        limits.hit(Limit.HEADER_TIMEOUT, "api", ip)
        limits.abuse(ip, "slow_request_head", "api")

    factory = guarded(runner.server, limits.cfg.header_timeout_s, cut_off)
    server = await asyncio.get_running_loop().create_server(
        factory, cfg.host, cfg.port, ssl=ssl_context, backlog=1024, reuse_address=True)
    port = int(server.sockets[0].getsockname()[1]) if server.sockets else cfg.port
    return RunningApi("api", port, runner, server)
