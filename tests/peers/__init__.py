"""Throw-away real peer servers (Dovecot, ...) that tests drive as upstreams."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def peer_missing(reason: str) -> NoReturn:
    """A real peer the test needs is not there: a failure in CI (``CI=true``, where
    `make test` installs every peer), a skip on a developer's machine."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must have every peer)")
    pytest.skip(reason)
