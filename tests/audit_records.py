"""Reading a test's audit log: the records, and waiting for them to be written."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any


def read_records(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The audit records in ``path`` (none if it does not exist yet), optionally only
    those of one ``event``."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if event is None or r.get("event") == event]


async def wait_records(
    path: Path, count: int, event: str | None = None, timeout: float = 5
) -> list[dict[str, Any]]:
    """The records once at least ``count`` are there, or what there is at ``timeout``."""
    deadline = time.monotonic() + timeout
    while len(recs := read_records(path, event)) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return recs
