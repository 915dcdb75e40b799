"""``POST /v1/policy/rollback`` and ``POST /v1/policy/push`` (scope ``operate``): the
API's way to move the active-version pointer, as ``mailward policy rollback`` and
``push`` do (:meth:`proxy.policies.live.LivePolicy.rollback` and ``push``). The
instance that answers applies the change at once; the others (a shared pointer in
Redis) within 2 s. Bodies: ``{"version": "<version or sha256 prefix>"}`` (optional:
default the previous policy) and ``{"policy": "<TOML text>"}``. Answers 200 with
``from_version``, ``to_version``, their digests and ``actor``; 409 when there is
nothing to roll back to, the policy is already in force, or the policy guard refuses
(its reason names the confirm line); 422 for an invalid policy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from proxy.api_forms import ApiError, json_object
from proxy.config import ConfigError
from proxy.policies.store import PolicyStoreError

if TYPE_CHECKING:
    from proxy.gate import Gate
    from proxy.policies.live import LivePolicy

_LIVE: Final = web.AppKey("mailward_policy_live", object)
_GATE: Final = web.AppKey("mailward_policy_gate", object)


def add_policy_changes(app: web.Application, live: LivePolicy, gate: Gate) -> None:
    """Serve the two endpoints on the control-plane ``app``."""
    app[_LIVE], app[_GATE] = live, gate
    app.router.add_post("/v1/policy/rollback", _rollback)
    app.router.add_post("/v1/policy/push", _push)


async def _rollback(request: web.Request) -> web.Response:
    version = (await json_object(request)).get("version")
    if version is not None and not isinstance(version, str):
        raise ApiError(400, "malformed", "version must be a string.")
    return await _change(request, "not_rolled_back",
                         lambda live, gate, actor: live.rollback(gate, version, actor))


async def _push(request: web.Request) -> web.Response:
    text = (await json_object(request)).get("policy")
    if not isinstance(text, str):
        raise ApiError(400, "malformed", "policy must be the TOML text of a policy file.")
    return await _change(request, "not_pushed",
                         lambda live, gate, actor: live.push(gate, text, actor))


async def _change(request: web.Request, refused: str,
                  call: Callable[[Any, Any, str], Awaitable[dict[str, Any]]]) -> web.Response:
    """Check the token's scope, make the change, map its refusals to 409/422."""
    from proxy.api import _require_admin  # the API's token check (named, scoped tokens)

    actor = _require_admin(request, "operate")
    try:
        answer = await call(request.app[_LIVE], request.app[_GATE], actor)
    except ConfigError as exc:
        raise ApiError(422, "invalid_policy", str(exc)) from None
    except (PolicyStoreError, ValueError) as exc:
        raise ApiError(409, refused, str(exc)) from None
    return web.json_response(answer)


__all__ = ["add_policy_changes"]
