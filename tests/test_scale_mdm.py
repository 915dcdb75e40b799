"""The MDM connectors on the Redis store: every scenario of tests/test_mdm.py (fake
Intune, Jamf and Google servers, a gate, a sync) run again with the posture in a
real ``redis-server`` instead of SQLite, so connectors work the same on a scaled-out
site."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from peers.redis import RedisServer

# The scenarios and their fixtures, collected here again; ``store`` below replaces
# test_mdm's SQLite store for them.
from test_mdm import *  # noqa: F403

from proxy.posture.redis import RedisPostureStore

pytestmark = pytest.mark.peer


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RedisPostureStore]:
    with RedisServer(tmp_path / "redis") as srv:
        s = RedisPostureStore(srv.url, state_dir=tmp_path)
        yield s
        await s.close()
