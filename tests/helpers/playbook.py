"""Playbooks of the sans-IO pre-auth layers (IMAP, POP3), as mitmproxy tests its
layers: feed an event, state the commands expected back; and the gate's answers the
playbooks hand the layers."""

from __future__ import annotations

from typing import Any, Protocol

from proxy.gate import Identity
from proxy.policy import Decision, Reason

ALICE, PW = "alice@corp.example", "alice-secret"
PHONE = Identity(ALICE, "alice-phone", "client_cert")
ALLOW = Decision(True, (), "v1", "sha")
DENY = Decision(False, (Reason("prohibited_app", "Uninstall TikTok to restore mail."),),
                "v1", "sha")
BUSY = Decision(False, (Reason("store_unavailable", "Try again later."),), "v1", "sha",
                temporary=True)


class Layer(Protocol):
    """A sans-IO conversation: one event in, the commands it gives out."""

    def handle(self, event: Any) -> list[Any]: ...


def play(p: Layer, *steps: tuple[Any, list[Any]]) -> None:
    """Feed each event and check the commands it gives, step by step."""
    for i, (event, expected) in enumerate(steps):
        assert p.handle(event) == expected, f"step {i}: {event!r}"
