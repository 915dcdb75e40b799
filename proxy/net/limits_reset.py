"""``mailward limits reset``: how a CLI process reaches the running server's throttle.

The failed-login throttle lives in the server's memory (:class:`~proxy.net.limits.Limits`).
The CLI appends one JSON line per request to ``<state_dir>/limits-reset.jsonl``
(:func:`request_reset`); the server reads what was appended since its last look
(:class:`ResetFeed`, polled every half second with the device-trust change feed) and
applies it. Requests written before the server started are skipped: its throttle
state starts empty anyway.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

FEED_NAME = "limits-reset.jsonl"


def feed_path(state_dir: Path) -> Path:
    return state_dir / FEED_NAME


def request_reset(state_dir: Path, *, user: str | None, ip: str | None, actor: str) -> None:
    """Append one reset request (the server applies it within a second)."""
    line = json.dumps({"user": user, "ip": ip, "actor": actor, "at": time.time()})
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(feed_path(state_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())  # one write: lines never interleave
    finally:
        os.close(fd)


class ResetFeed:
    """The server's reader of the feed."""

    def __init__(self, state_dir: Path) -> None:
        self.path = feed_path(state_dir)
        self._offset = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def poll(self) -> list[dict[str, Any]]:
        """Requests appended since the last poll (a truncated file starts over)."""
        size = self._size()
        if size == self._offset:
            return []
        if size < self._offset:
            self._offset = 0
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        out = []
        for raw in complete.splitlines():
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
        return out


__all__ = ["FEED_NAME", "ResetFeed", "feed_path", "request_reset"]
