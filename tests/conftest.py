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
