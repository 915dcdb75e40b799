"""The server's small periodic chores around limits and health (:class:`Upkeep`).

* every :data:`ABUSE_FLUSH_S`: the per-address abuse counts become ``abuse_summary``
  records (through the gate, at most 1,000 a minute);
* every :data:`TICK_S`: ``mailward limits reset`` requests from the CLI are applied
  (:mod:`proxy.net.limits_reset`); while the audit log is unhealthy a checkpoint is
  tried, so ``/readyz`` turns green within seconds of the disk becoming writable
  again instead of at the next checkpoint timer; and after a burst of connections
  has gone, freed heap pages go back to the system (:mod:`proxy.net.memory`).

:func:`raise_fd_limit` lifts the soft limit on open files to the hard one at start: a
burst of 2,300 connections must not run into a soft limit of 1,024.
"""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path
from typing import Any, Final

from proxy.gate import Gate
from proxy.net import memory
from proxy.net.limits import SUMMARY_INTERVAL_S
from proxy.net.limits_reset import ResetFeed
from proxy.oplog import get_logger

log = get_logger("mailward.server")

ABUSE_FLUSH_S: Final = SUMMARY_INTERVAL_S
TICK_S: Final = 0.5


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit", soft=soft, hard=hard,
                        error=str(exc))
    return int(soft)


class Upkeep:
    """See the module docstring."""

    def __init__(self, gate: Gate, audit: Any, state_dir: Path) -> None:
        self.gate = gate
        self.audit = audit
        self.resets = ResetFeed(state_dir)
        self.trimmer = memory.Trimmer()
        self._audit_ok = True

    async def run(self) -> None:
        next_flush = time.monotonic() + ABUSE_FLUSH_S
        while True:
            await asyncio.sleep(TICK_S)
            self.tick()
            if time.monotonic() >= next_flush:
                next_flush += ABUSE_FLUSH_S
                await self.flush_abuse()

    def tick(self) -> None:
        for chore in (self.apply_resets, self.probe_audit, self.trim):
            try:
                chore()
            except Exception as exc:  # one failing chore must not stop the others
                log.error("upkeep failed", chore=chore.__name__, error=str(exc))

    async def flush_abuse(self) -> int:
        summaries = self.gate.limits.abuse_summaries()
        if summaries:
            await self.gate.record_abuse(summaries)
        return len(summaries)

    def apply_resets(self) -> int:
        done = 0
        for item in self.resets.poll():
            user, ip = item.get("user"), item.get("ip")
            cleared = self.gate.limits.reset(user=user if isinstance(user, str) else None,
                                             ip=ip if isinstance(ip, str) else None)
            log.info("limits reset", user=user, ip=ip, actor=item.get("actor"),
                     cleared=cleared)
            done += 1
        return done

    def probe_audit(self) -> bool:
        """While the audit log is unhealthy, try a checkpoint (it seals whatever is
        unsealed, and succeeds once the file can be written again)."""
        healthy = bool(self.audit.healthy)
        if not healthy:
            try:
                self.audit.checkpoint()
            except Exception as exc:
                log.debug("audit still unavailable", error=str(exc))
            healthy = bool(self.audit.healthy)
        if healthy != self._audit_ok:
            self._audit_ok = healthy
            self.gate.observer.health("audit_writable", healthy)
        return healthy

    def trim(self) -> bool:
        if self.trimmer.observe(memory.open_connections()):
            trimmed = memory.malloc_trim()
            log.info("returned freed memory to the system", trimmed=trimmed,
                     connections=memory.open_connections())
            return True
        return False


__all__ = ["Upkeep", "raise_fd_limit"]
