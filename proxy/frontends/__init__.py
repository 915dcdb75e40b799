"""Protocol front ends: IMAP, POP3, SMTP submission and Exchange ActiveSync.

Front ends know protocols, not policy: they parse the pre-auth conversation, obtain
the user's identity (verified by the upstream) and the device identity, ask
``proxy.gate.Gate.decide`` and then splice or refuse.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.config import ListenerConfig
    from proxy.gate import Gate


@dataclass(frozen=True, slots=True)
class FrontendContext:
    """What every front end gets from ``proxy.server`` when it starts."""

    listener: ListenerConfig
    gate: Gate
    server_tls: ssl.SSLContext | None  # None only for tls = "none" (loopback)
    upstream_tls: ssl.SSLContext | None  # None when upstream_tls = "none"


class RunningListener(Protocol):
    """A started listener. ``port`` is the bound port (tests listen on port 0)."""

    name: str
    port: int

    async def close(self, grace_s: float) -> None:
        """Stop accepting, give live sessions ``grace_s`` seconds, then end them with
        the protocol's goodbye and wait until they are gone."""
        ...
