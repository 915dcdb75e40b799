"""Run a test module on stdlib asyncio and on uvloop: ``from loops import
event_loop_policy`` in the module (pytest picks the imported fixture up)."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test runs on stdlib asyncio and on uvloop (the production default), whose
    transports differ in details such as when reading starts."""
    if request.param == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()
