"""Shared pytest configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop

#: Modules that set ``RUN_ON_BOTH_LOOPS = True`` run each async test on stdlib asyncio
#: and on uvloop (the production default), whose transports differ in details such as
#: when reading starts; the others on stdlib asyncio.
_BOTH: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
_ASYNCIO: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: Any
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    return _BOTH if getattr(module, "RUN_ON_BOTH_LOOPS", False) else _ASYNCIO


#: The three tiers (DESIGN "Layout": pure / conversation / peer). A module states its
#: tier with ``pytestmark``; modules that do not are listed here. ``pytest -m "not peer"``
#: is the fast loop.
TIERS: Mapping[str, str] = {
    "test_policy": "pure",
    "test_config": "pure",
    "test_eas_query": "pure",
    "test_imap_wire": "pure",
    "test_attestation": "pure",
    "test_pki": "pure",
    "test_gate": "pure",
    "test_posture_store": "conversation",
    "test_api": "conversation",
    "test_activesync": "conversation",
    "test_socket_transport": "conversation",
    "test_smtp_relay": "conversation",
    "test_audit": "conversation",
    "test_cli": "peer",  # the installed console script, as an operator runs it
    "test_server": "peer",  # mailward serve as a subprocess
    "test_demo": "peer",
}
_TIER_NAMES = frozenset({"pure", "conversation", "peer"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test exactly one tier; a module with none is a mistake, not a default."""
    for item in items:
        if any(m.name in _TIER_NAMES for m in item.iter_markers()):
            continue
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        tier = TIERS.get(module)
        if tier is None:
            raise pytest.UsageError(
                f"{item.nodeid}: no tier; add pytestmark = pytest.mark.pure, "
                "conversation or peer (or list the module in tests/conftest.py TIERS)"
            )
        item.add_marker(getattr(pytest.mark, tier))
