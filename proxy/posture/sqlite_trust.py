"""Device trust records in the SQLite store: aliases, bindings, revocations, the
change feed. Plain functions on a connection, called by
:class:`~proxy.posture.sqlite.SqlitePostureStore` on its worker thread inside a
transaction. Every id is compared lower-cased (:func:`~proxy.posture.device_key`).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from proxy.posture import Change, Posture, TrustRecords, device_key

#: Change-feed rows older than this are deleted (servers poll every second).
CHANGES_KEEP_S = 24 * 3600.0


def resolve(db: sqlite3.Connection, device_id: str) -> str:
    """The device an id names: its alias target, or the id itself (lower-cased)."""
    key = device_key(device_id)
    row = db.execute("SELECT device FROM alias WHERE alias = ?", (key,)).fetchone()
    return str(row[0]) if row else key


def note_change(db: sqlite3.Connection, device: str, kind: str, origin: str,
                now: float) -> None:
    db.execute("INSERT INTO changes (device, kind, origin, at) VALUES (?, ?, ?, ?)",
               (device, kind, origin, now))


def is_revoked(db: sqlite3.Connection, *keys: str) -> bool:
    return any(db.execute("SELECT 1 FROM revoked WHERE device = ?", (k,)).fetchone()
               for k in keys)


def records(db: sqlite3.Connection) -> TrustRecords:
    seq = db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
    return TrustRecords(
        aliases={a: d for a, d in db.execute("SELECT alias, device FROM alias")},
        bindings=frozenset(r[0] for r in db.execute("SELECT device FROM binding")),
        revoked={d: w for d, w in db.execute("SELECT device, why FROM revoked")},
        change_seq=int(seq),
    )


def changes_since(db: sqlite3.Connection, seq: int, origin: str) -> tuple[int, list[Change]]:
    """Changes after ``seq`` written by other stores, and the feed's newest seq."""
    rows = db.execute("SELECT seq, device, kind, origin FROM changes WHERE seq > ? ORDER BY seq",
                      (seq,)).fetchall()
    last = rows[-1][0] if rows else seq
    return last, [Change(s, d, k) for s, d, k, o in rows if o != origin]


def revoke(db: sqlite3.Connection, device_id: str, why: str, actor: str, now: float,
           origin: str) -> tuple[str, bool]:
    """(device, newly revoked). An id never seen is revoked in advance."""
    device = resolve(db, device_id)
    cur = db.execute("INSERT OR IGNORE INTO revoked (device, why, actor, at) VALUES (?, ?, ?, ?)",
                     (device, why, actor, now))
    if cur.rowcount:
        note_change(db, device, "revoked", origin, now)
    return device, bool(cur.rowcount)


def unrevoke(db: sqlite3.Connection, device_id: str, now: float, origin: str) -> tuple[str, bool]:
    device = resolve(db, device_id)
    keys = {device, device_key(device_id)}
    removed = sum(db.execute("DELETE FROM revoked WHERE device = ?", (k,)).rowcount for k in keys)
    if removed:
        note_change(db, device, "unrevoked", origin, now)
    return device, bool(removed)


def unbind(db: sqlite3.Connection, device_id: str, now: float, origin: str) -> tuple[str, bool]:
    device = resolve(db, device_id)
    removed = db.execute("DELETE FROM binding WHERE device = ?", (device,)).rowcount
    if removed:
        note_change(db, device, "unbound", origin, now)
    return device, bool(removed)


def bind(db: sqlite3.Connection, device: str, now: float, origin: str) -> bool:
    cur = db.execute("INSERT OR IGNORE INTO binding (device, bound_at) VALUES (?, ?)",
                     (device, now))
    if cur.rowcount:
        note_change(db, device, "bound", origin, now)
    return bool(cur.rowcount)


def forget(db: sqlite3.Connection, device_id: str, now: float, origin: str) -> tuple[str, bool]:
    """Remove posture, binding and aliases (not a revocation: that stays)."""
    device = resolve(db, device_id)
    n = db.execute("DELETE FROM posture WHERE device = ?", (device,)).rowcount
    n += db.execute("DELETE FROM binding WHERE device = ?", (device,)).rowcount
    n += db.execute("DELETE FROM alias WHERE device = ? OR alias = ?", (device, device)).rowcount
    note_change(db, device, "forgotten", origin, now)
    return device, bool(n)


def alias(db: sqlite3.Connection, device_id: str, other: str, now: float,
          origin: str) -> str:
    """Make ``other`` another id of the device ``device_id`` names. Whatever was
    recorded under ``other``'s device (posture per authority, binding, revocation,
    aliases) moves to this device; a revocation of either side stays in force."""
    device, old = resolve(db, device_id), resolve(db, other)
    if old == device:
        return device
    for (authority, text) in db.execute("SELECT authority, json FROM posture WHERE device = ?",
                                        (old,)).fetchall():
        moved = Posture.from_json(text)
        mine = db.execute("SELECT json FROM posture WHERE device = ? AND authority = ?",
                          (device, authority)).fetchone()
        if mine is None or Posture.from_json(mine[0]).iat < moved.iat:
            db.execute("INSERT OR REPLACE INTO posture (device, authority, user, json,"
                       " received_at) VALUES (?, ?, ?, ?, ?)",
                       (device, authority, moved.user.lower(), text, moved.received_at))
    db.execute("DELETE FROM posture WHERE device = ?", (old,))
    db.execute("UPDATE OR IGNORE binding SET device = ? WHERE device = ?", (device, old))
    db.execute("UPDATE OR IGNORE revoked SET device = ? WHERE device = ?", (device, old))
    db.execute("DELETE FROM binding WHERE device = ?", (old,))
    db.execute("DELETE FROM revoked WHERE device = ?", (old,))
    db.execute("UPDATE alias SET device = ? WHERE device = ?", (device, old))
    for a in {old, device_key(other)}:
        db.execute("INSERT OR REPLACE INTO alias (alias, device) VALUES (?, ?)", (a, device))
    db.execute("DELETE FROM alias WHERE alias = device")
    note_change(db, device, "alias", origin, now)
    note_change(db, old, "alias", origin, now)
    return device


def list_devices(db: sqlite3.Connection, revoked_only: bool) -> list[dict[str, Any]]:
    """Every device the store knows of (posture, binding, revocation or alias)."""
    devices: dict[str, dict[str, Any]] = {}

    def entry(device: str) -> dict[str, Any]:
        return devices.setdefault(device, {
            "device": device, "aliases": [], "user": None, "platform": None,
            "sources": [], "bound": False, "revoked": None})

    for device, authority, text in db.execute("SELECT device, authority, json FROM posture"
                                              " ORDER BY device, authority"):
        e, p = entry(device), Posture.from_json(text)
        e["sources"].append(authority)
        if e["user"] is None or p.is_mdm:
            e["user"], e["platform"] = p.user, p.platform
    for (device,) in db.execute("SELECT device FROM binding"):
        entry(device)["bound"] = True
    for a, device in db.execute("SELECT alias, device FROM alias ORDER BY alias"):
        entry(device)["aliases"].append(a)
    for device, why, actor, at in db.execute("SELECT device, why, actor, at FROM revoked"):
        entry(device)["revoked"] = {"why": why, "actor": actor, "at": at}
    out = sorted(devices.values(), key=lambda e: e["device"])
    return [e for e in out if e["revoked"]] if revoked_only else out
