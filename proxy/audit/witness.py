"""Witnesses: copies of the chain head kept where the log's disk cannot reach.

A signed checkpoint proves who sealed a head, not that the log still holds the newest
one: whoever can write the disk can cut the log back to an older checkpoint (and copy
it into ``.head``), or edit a tail that no checkpoint covers yet. So once a record is
durable the writer tells someone else:

* each checkpoint, as an operational log line (event ``audit_checkpoint``: the
  checkpoint record's fields, ``event`` aside: ``seq``, ``hash``, ``head``,
  ``head_seq``, ``sig``, ``key_id``, ``instance``, ...), and, with ``[audit]
  witness_url``, as a JSON POST to that URL (queued, retried with backoff, bounded);
* the head of each group commit, as an operational log line (event ``audit_head``:
  ``seq``, ``hash``, ``instance``).

A SIEM that collects those lines holds a witness; ``mailward audit verify --witness
FILE`` (:func:`read_witness_file`) fails when the log lacks or contradicts any of them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from proxy.oplog import get_logger

if TYPE_CHECKING:
    import asyncio

log = get_logger("mailward.audit")

CHECKPOINT_LINE = "audit_checkpoint"
HEAD_LINE = "audit_head"
#: Checkpoints waiting for the witness URL; beyond this the oldest are dropped (the
#: operational log line still witnesses them).
MAX_PENDING = 10_000
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
POST_TIMEOUT_S = 10.0
#: How long closing waits for the queue to drain.
CLOSE_FLUSH_S = 2.0

_HASH = re.compile(r"[0-9a-f]{64}")


class WitnessObserver(Protocol):
    """What the witness reports to metrics (``proxy.metrics.PrometheusObserver``)."""

    def audit_witness_pending(self, count: int) -> None: ...


def checkpoint_line(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields an ``audit_checkpoint`` line (and POST) carries: the checkpoint
    record without ``event``, so a witness can recompute its hash and signature."""
    return {k: v for k, v in record.items() if k != "event"}


class Witness:
    """Reports durable checkpoints and group-commit heads (see the module docstring).

    Everything is called on the writer's thread (the event loop in a server); the
    POST queue is drained by a task that :meth:`start` creates.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        max_pending: int = MAX_PENDING,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.url = url or None
        self._max_pending = max_pending
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._written: collections.deque[Mapping[str, Any]] = collections.deque()
        self._observer: WitnessObserver | None = None
        self._wake: asyncio.Event | None = None
        self._sender: asyncio.Task[None] | None = None
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Checkpoints not yet accepted by the witness URL."""
        return len(self._queue)

    def written(self, checkpoint: Mapping[str, Any]) -> None:
        """``checkpoint`` is in the log, not yet durable."""
        self._written.append(checkpoint)

    def durable(self, upto: int, head: str | None, instance: str) -> None:
        """An fsync made records up to ``upto`` durable: report the checkpoints among
        them, and ``head`` (the hash of record ``upto``, after a group commit) unless
        that record is one of them."""
        last = 0
        while self._written and self._written[0]["seq"] <= upto:
            checkpoint = self._written.popleft()
            last = checkpoint["seq"]
            self.checkpoint(checkpoint)
        if head is not None and last != upto:
            self.head(upto, head, instance)

    def head(self, seq: int, hash: str, instance: str) -> None:
        log.info(HEAD_LINE, seq=seq, hash=hash, instance=instance)

    def checkpoint(self, record: Mapping[str, Any]) -> None:
        line = checkpoint_line(record)
        log.info(CHECKPOINT_LINE, **line)
        if self.url is None:
            return
        if len(self._queue) >= self._max_pending:
            self._queue.popleft()
            self.dropped += 1
            log.error("audit_witness_dropped", url=_shown(self.url), dropped=self.dropped,
                      max_pending=self._max_pending)
        self._queue.append(line)
        self._report()
        if self._wake is not None:
            self._wake.set()

    async def start(self, observer: WitnessObserver | None = None) -> None:
        """Start posting to the witness URL (if any); report the queue to ``observer``."""
        import asyncio

        self._observer = observer
        self._report()
        if self.url is None or self._sender is not None:
            return
        self._wake = asyncio.Event()
        if self._queue:
            self._wake.set()
        self._sender = asyncio.get_running_loop().create_task(
            self._send_loop(), name="audit-witness"
        )

    async def close(self, flush_s: float = CLOSE_FLUSH_S) -> None:
        """Give the queue ``flush_s`` to drain, then stop; what is left is logged."""
        import asyncio

        if self._sender is None:
            return
        deadline = time.monotonic() + flush_s
        while self._queue and time.monotonic() < deadline and not self._sender.done():
            await asyncio.sleep(0.05)
        self._sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sender
        self._sender = None
        if self._queue:
            log.error("audit_witness_undelivered", url=_shown(self.url or ""),
                      pending=len(self._queue))

    async def _send_loop(self) -> None:
        import asyncio

        import aiohttp

        assert self._wake is not None and self.url is not None
        timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
        delay = self._retry_initial_s
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                error = await _post(session, self.url, self._queue[0])
                if error is None:
                    self._queue.popleft()
                    self._report()
                    delay = self._retry_initial_s
                    continue
                log.warning("audit_witness_post_failed", url=_shown(self.url), error=error,
                            pending=len(self._queue), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)

    def _report(self) -> None:
        if self._observer is not None:
            self._observer.audit_witness_pending(len(self._queue))


async def _post(session: Any, url: str, line: dict[str, Any]) -> str | None:
    """POST one checkpoint; None when the witness accepted it (2xx), else why not."""

    import aiohttp

    body = {"event": CHECKPOINT_LINE, **line}
    try:
        async with session.post(url, json=body) as response:
            if 200 <= response.status < 300:
                return None
            return f"HTTP {response.status}"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _shown(url: str) -> str:
    """The URL without credentials, query or fragment, for log lines."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


# -- reading what a SIEM collected ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Witnessed:
    """One witnessed head: the record ``seq`` of ``instance``'s log has ``hash``.
    ``checkpoint``: it was a checkpoint line; ``source:line``: where it was read."""

    seq: int
    hash: str
    instance: str | None
    checkpoint: bool
    source: str
    line: int

    @property
    def where(self) -> str:
        kind = "checkpoint" if self.checkpoint else "head"
        return f"the {kind} witnessed at {self.source}:{self.line}"


def read_witness_file(path: Path) -> list[Witnessed]:
    """The ``audit_checkpoint`` and ``audit_head`` lines in ``path``, a file as a SIEM
    collected them: other lines, and text before the JSON object on a line (a syslog
    prefix), are skipped; a JSON object whose ``message`` holds the line is unwrapped.
    ValueError (naming the line) for a witness line without a valid seq and hash."""
    found = []
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, obj in _json_objects(f):
            event = obj.get("event")
            if event not in (CHECKPOINT_LINE, HEAD_LINE):
                continue
            seq, digest, instance = obj.get("seq"), obj.get("hash"), obj.get("instance")
            if type(seq) is not int or seq < 1 or not isinstance(digest, str) \
                    or not _HASH.fullmatch(digest):
                raise ValueError(f"{path}:{lineno}: {event} line without a valid seq and hash")
            if instance is not None and not isinstance(instance, str):
                raise ValueError(f"{path}:{lineno}: {event} line with a non-string instance")
            found.append(
                Witnessed(seq, digest, instance, event == CHECKPOINT_LINE, str(path), lineno)
            )
    return found


def _json_objects(lines: Iterator[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, text in enumerate(lines, 1):
        start = text.find("{")
        if start < 0:
            continue
        try:
            obj = json.loads(text[start:])
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("message"), str) \
                and "event" not in obj:
            with contextlib.suppress(ValueError):
                inner = json.loads(obj["message"])
                obj = inner if isinstance(inner, dict) else obj
        if isinstance(obj, dict):
            yield lineno, obj


__all__ = [
    "CHECKPOINT_LINE",
    "HEAD_LINE",
    "Witness",
    "WitnessObserver",
    "Witnessed",
    "checkpoint_line",
    "read_witness_file",
]
