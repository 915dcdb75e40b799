"""Named admin tokens with scopes (DESIGN "Policy changes, notices, auditor report").

``[api] tokens = [{name, scope, file}]`` in mailward.toml, plus ``admin_token_file``,
which stays the token named ``admin`` with scope ``operate``. Scope ``read`` may read
(``GET /v1/report``, ``GET /v1/devices/{id}``, ``POST /v1/explain``); ``operate`` may
also change things (revoke, and policy rollback and push where they exist). A request
is matched against *every* token with :func:`hmac.compare_digest`, so the time taken
depends neither on which token matched nor on how much of one did. Records a request
causes carry the token's name as ``actor``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

Scope = Literal["read", "operate"]
#: What each scope may do, in order: a scope includes every scope before it.
SCOPES: Final[tuple[Scope, ...]] = ("read", "operate")
ADMIN_NAME: Final = "admin"


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    scope: Scope
    secret: bytes = b""

    def __repr__(self) -> str:  # never print the secret
        return f"AdminToken({self.name!r}, {self.scope!r})"

    def allows(self, scope: Scope) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


def tokens_from(admin_token: bytes | None, named: Iterable[AdminToken]) -> tuple[AdminToken, ...]:
    """The tokens a request may present: ``admin_token`` (if not empty) as ``admin``
    with scope operate, then ``named``. Empty secrets are dropped (an empty file must
    never mean "no password"); a name used twice is a ValueError."""
    tokens = [AdminToken(ADMIN_NAME, "operate", admin_token.strip())] if admin_token else []
    tokens += [AdminToken(t.name, t.scope, t.secret.strip()) for t in named]
    tokens = [t for t in tokens if t.secret]
    names = [t.name for t in tokens]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"api: two admin tokens are named {name!r} (admin_token_file "
                             "is the one named admin)")
    return tuple(tokens)


def load_tokens(api: Any) -> tuple[AdminToken, ...]:
    """The tokens of an ``ApiConfig``: ``admin_token_file`` when it exists, and every
    ``tokens`` entry, whose file must exist. OSError or ValueError (one line)."""
    admin = None
    if api.admin_token_file is not None and api.admin_token_file.exists():
        admin = api.admin_token_file.read_bytes()
    named = []
    for t in api.tokens:
        try:
            secret = t.file.read_bytes()
        except OSError as exc:
            raise ValueError(f"api.tokens {t.name!r}: cannot read {t.file}: {exc.strerror}"
                             ) from None
        if not secret.strip():
            raise ValueError(f"api.tokens {t.name!r}: {t.file} is empty")
        named.append(AdminToken(t.name, t.scope, secret))
    return tokens_from(admin, named)


def match(tokens: Iterable[AdminToken], authorization: str) -> AdminToken | None:
    """The token an ``Authorization: Bearer ...`` header presents, or None. Every
    token is compared, whatever matched before."""
    scheme, _, given = authorization.partition(" ")
    # surrogateescape: a header that is not UTF-8 is just a wrong token, not an error.
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    found = None
    for token in tokens:
        if hmac.compare_digest(given_bytes, token.secret) and found is None:
            found = token
    return found if scheme.lower() == "bearer" and given_bytes else None
