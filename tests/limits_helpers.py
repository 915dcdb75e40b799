"""Reading a test server's abuse counts (``proxy.net.limits``): what a connection that
never completed TLS left behind instead of an audit record."""

from __future__ import annotations

import asyncio
import time

from proxy.net.limits import Limits


async def wait_abuse(limits: Limits, kind: str, count: int,
                     timeout: float = 5) -> dict[str, int]:
    """The abuse counts of every address, summed by kind, once ``kind`` reaches
    ``count`` (or what there is at ``timeout``). Drains the summaries."""
    totals: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        for summary in limits.abuse_summaries():
            for k, n in summary["counts"].items():
                totals[k] = totals.get(k, 0) + n
        if totals.get(kind, 0) >= count or time.monotonic() > deadline:
            return totals
        await asyncio.sleep(0.02)
