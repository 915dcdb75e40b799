"""MDM connector posture in the SQLite store: one page of devices per transaction.

Plain functions on a connection, called by
:class:`~proxy.posture.sqlite.SqlitePostureStore` on its worker thread inside a write
transaction, like :mod:`proxy.posture.sqlite_trust`. A connector's posture is stored
in the same ``posture`` table under its authority (``mdm:<name>``), with the same
change-feed rows as a report; there is no replay memory for it (no ``jti`` rows).

A sync pass writes thousands of devices of which few changed, so :func:`commit`
compares each device's *content* (everything but the times and ``jti``) with what is
stored: a changed or new device is written and noted in the change feed; a device
that only checked in again has its times refreshed (so it does not go stale) and
nothing else happens.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Literal

from proxy.posture import DEVICE_AUTHORITY, Posture, device_key
from proxy.posture import sqlite_trust as trust

#: Fields that change on every check-in without the device changing.
VOLATILE = ("iat", "exp", "jti", "received_at")

Outcome = Literal["new", "changed", "fresh", "same", "revoked"]


@dataclass(frozen=True, slots=True)
class MdmWrite:
    """One device as a connector sees it: its posture and its other ids."""

    posture: Posture
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MdmResult:
    """What :func:`commit` did with one device; ``previous`` is the stored posture
    it replaced when the content changed; ``aliased`` when a new alias was recorded."""

    device: str
    outcome: Outcome
    previous: Posture | None = None
    aliased: bool = False


def content(text: str) -> str:
    """A posture's JSON without the fields that change on every check-in."""
    d = json.loads(text)
    for key in VOLATILE:
        d.pop(key, None)
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def commit(db: sqlite3.Connection, writes: list[MdmWrite], now: float,
           origin: str) -> list[MdmResult]:
    """Store a page of connector postures (see the module docstring)."""
    return [_one(db, w, now, origin) for w in writes]


def _one(db: sqlite3.Connection, w: MdmWrite, now: float, origin: str) -> MdmResult:
    p = w.posture
    device = trust.resolve(db, p.device_id)
    aliased = False
    for other in w.aliases:
        if trust.resolve(db, other) != device:
            device, aliased = trust.alias(db, p.device_id, other, now, origin), True
    if trust.is_revoked(db, device, device_key(p.device_id)):
        return MdmResult(device, "revoked", aliased=aliased)
    text = p.to_json()
    row = db.execute("SELECT json FROM posture WHERE device = ? AND authority = ?",
                     (device, p.authority)).fetchone()
    if row is None:
        outcome: Outcome = "new"
    elif content(row[0]) != content(text):
        outcome = "changed"
    else:
        outcome = "fresh"
    previous = Posture.from_json(row[0]) if row is not None else None
    if previous is not None and previous.iat > p.iat:
        return MdmResult(device, "same", aliased=aliased)  # older: never roll back
    if outcome == "fresh" and previous is not None and previous.iat == p.iat:
        return MdmResult(device, "same", aliased=aliased)
    db.execute("INSERT OR REPLACE INTO posture (device, authority, user, json, received_at)"
               " VALUES (?, ?, ?, ?, ?)", (device, p.authority, p.user.lower(), text, now))
    if outcome != "fresh":
        trust.note_change(db, device, "posture", origin, now)
    return MdmResult(device, outcome, previous if outcome == "changed" else None, aliased)


def devices(db: sqlite3.Connection, authority: str) -> set[str]:
    """Every device holding posture from ``authority``."""
    rows = db.execute("SELECT device FROM posture WHERE authority = ?", (authority,))
    return {r[0] for r in rows}


def remove(db: sqlite3.Connection, keys: list[str], authority: str, now: float,
           origin: str) -> list[str]:
    """The devices lose ``authority``'s posture and their own reports (the MDM says
    they are gone: a report of the device's own must not keep them in). Returns
    the devices that had any."""
    removed = []
    for key in keys:
        device = trust.resolve(db, key)
        n = db.execute("DELETE FROM posture WHERE device = ? AND authority IN (?, ?)",
                       (device, authority, DEVICE_AUTHORITY)).rowcount
        if n:
            trust.note_change(db, device, "posture", origin, now)
            removed.append(device)
    return removed


def not_seen_since(db: sqlite3.Connection, before: float) -> list[str]:
    """Devices whose newest posture (any authority) was made before ``before``."""
    rows = db.execute("SELECT device FROM posture GROUP BY device"
                      " HAVING max(json_extract(json, '$.iat')) < ?", (before,))
    return [r[0] for r in rows]
