"""In-process stand-ins for the gate's collaborators: an audit sink that keeps what it
was given, and a live session that remembers how it was ended."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.audit import AuditLog
from proxy.gate import Identity, Origin


class ListAudit:
    """Audit sink that remembers what it wrote: through the real ``AuditLog`` when given
    a path (``records`` then holds what the log returned), else in memory. ``broken``
    makes every write fail like a full disk; ``healthy`` is what ``/readyz`` reads."""

    def __init__(self, path: Path | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.log = AuditLog(path, signing_key=None) if path is not None else None
        self.broken = False
        self._healthy = True

    @property
    def healthy(self) -> bool:
        return self._healthy and (self.log is None or self.log.healthy)

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._healthy = value

    async def write(self, fields: dict[str, Any]) -> dict[str, Any]:
        if self.broken:
            raise OSError("audit disk full")
        rec = await self.log.write(fields) if self.log is not None else fields
        self.records.append(rec)
        return rec

    async def close(self) -> None:
        if self.log is not None:
            await self.log.close()


@dataclass(eq=False)
class FakeSession:
    """A live session registered with the gate: ``ended`` holds each goodbye text and
    ``ended_at`` its ``time.monotonic()``; ``delay_s`` makes the goodbye take a while,
    as a protocol's does."""

    identity: Identity
    origin: Origin
    delay_s: float = 0.0
    ended: list[str] = field(default_factory=list)
    ended_at: list[float] = field(default_factory=list)

    async def terminate(self, text: str) -> None:
        await asyncio.sleep(self.delay_s)
        self.ended.append(text)
        self.ended_at.append(time.monotonic())
