"""The sync cursor of a connector, kept across restarts.

``<state_dir>/mdm-<name>.cursor.json`` holds the newest MDM inventory time a pass
has seen and the wall-clock time of the last complete full pass, so that a restarted
``mailward serve`` does an incremental pass first and keeps the full resync on its
interval instead of re-reading every device at each start.

The file is a hint, never an authority: it is ignored (and the first pass is full)
when it is missing, unreadable, written for another MDM (kind, URL, tenant,
customer or client id changed), holds times in the future or not numbers, or when
the posture store holds no device of the connector (a store rebuilt from scratch
must be filled by a full listing). Saving is atomic (a temporary file renamed) and
a failure to save is logged, never fatal: the cost is one full pass after a restart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from proxy.config.mdm import MdmConfig
from proxy.oplog import get_logger

log = get_logger("mailward.mdm")

#: A saved time this far ahead of the clock is not believed.
FUTURE_SLACK_S = 300.0


@dataclass(frozen=True, slots=True)
class SavedCursor:
    cursor: float  # newest MDM inventory time seen (POSIX seconds)
    last_full: float | None  # wall clock of the last complete full pass


def cursor_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"mdm-{name}.cursor.json"


def mdm_identity(cfg: MdmConfig) -> str:
    """What makes a cursor belong to one MDM: a cursor of another one is not used."""
    return " ".join((cfg.kind, cfg.base_url, cfg.tenant, cfg.customer, cfg.client_id))


class CursorFile:
    """Load and save one connector's :class:`SavedCursor` (see the module docstring)."""

    def __init__(self, path: Path, identity: str) -> None:
        self.path, self.identity = path, identity

    def load(self, now: float) -> SavedCursor | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("mdm cursor unreadable; a full pass follows", path=str(self.path),
                        error=type(exc).__name__)
            return None
        if not isinstance(data, dict) or data.get("mdm") != self.identity:
            return None
        cursor, last_full = _time(data.get("cursor"), now), _time(data.get("last_full"), now)
        if cursor is None or (last_full is None and data.get("last_full") is not None):
            return None
        return SavedCursor(cursor, last_full)

    def save(self, saved: SavedCursor) -> None:
        body = json.dumps({"mdm": self.identity, "cursor": saved.cursor,
                           "last_full": saved.last_full}, sort_keys=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("mdm cursor not saved; the next start does a full pass",
                      path=str(self.path), error=exc.strerror or type(exc).__name__)


def _time(value: object, now: float) -> float | None:
    """``value`` as POSIX seconds if it is a plausible past time, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and 0 <= value <= now + FUTURE_SLACK_S:  # also false for NaN and infinities
        return float(value)
    return None


__all__ = ["CursorFile", "SavedCursor", "cursor_path", "mdm_identity"]
