"""The SQLite posture store's schema, and the migration from older versions.

Version 2 (this build):

``posture``  the newest posture per device *per authority* (``device``, ``authority``
             primary key; ``device`` is the lower-cased, alias-resolved id).
``jti``      replay memory per issuer: (signing certificate SHA-256, ``jti``) until
             ``exp`` plus the clock skew.
``nonce``    challenges issued by ``GET /v1/challenge``, each usable once.
``alias``    other ids of a device (lower-cased alias -> device).
``binding``  devices seen with a verified client certificate naming them (sticky).
``revoked``  revoked devices, with why, who and when (may name ids never seen).
``changes``  the change feed: one row per change of posture or trust records, with
             the writing store's ``origin``, so a server notices what the CLI did.

Version 1 kept one posture per device and one global ``jti`` namespace;
:func:`migrate` moves such a database to version 2 in one transaction (each posture
under the authority it was signed by; old ``jti`` rows under an empty issuer).
"""

from __future__ import annotations

import json
import sqlite3

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS posture (
    device      TEXT NOT NULL,
    authority   TEXT NOT NULL,
    user        TEXT NOT NULL,
    json        TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (device, authority)
);
CREATE INDEX IF NOT EXISTS posture_user ON posture (user);
CREATE TABLE IF NOT EXISTS jti (
    issuer     TEXT NOT NULL,
    jti        TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (issuer, jti)
);
CREATE TABLE IF NOT EXISTS nonce (
    nonce      TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    used       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS alias (
    alias  TEXT PRIMARY KEY,
    device TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alias_device ON alias (device);
CREATE TABLE IF NOT EXISTS binding (
    device   TEXT PRIMARY KEY,
    bound_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked (
    device TEXT PRIMARY KEY,
    why    TEXT NOT NULL,
    actor  TEXT NOT NULL,
    at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    kind   TEXT NOT NULL,
    origin TEXT NOT NULL,
    at     REAL NOT NULL
);
"""


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def migrate(db: sqlite3.Connection, path: object) -> None:
    """Bring the database to :data:`SCHEMA_VERSION`; call inside a write transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.OperationalError(
            f"{path} has schema version {version}; this build knows {SCHEMA_VERSION}")
    if version <= 1 and "posture" in _tables(db):
        columns = {r[1] for r in db.execute("PRAGMA table_info(posture)")}
        if "device_id" in columns:  # version 1
            db.execute("ALTER TABLE posture RENAME TO posture_v1")
            db.execute("DROP INDEX IF EXISTS posture_user")
            db.execute("ALTER TABLE jti RENAME TO jti_v1")
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)
    tables = _tables(db)
    if "posture_v1" in tables:
        rows = db.execute("SELECT device_id, user, json, received_at FROM posture_v1")
        for device_id, user, text, received_at in rows.fetchall():
            attested_by = json.loads(text).get("attested_by", "device")
            authority = "device" if attested_by in ("device", "") else attested_by
            db.execute(
                "INSERT OR REPLACE INTO posture (device, authority, user, json, received_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (device_id.lower(), authority, user, text, received_at))
        db.execute("DROP TABLE posture_v1")
    if "jti_v1" in tables:
        db.execute("INSERT OR IGNORE INTO jti (issuer, jti, expires_at)"
                   " SELECT '', jti, expires_at FROM jti_v1")
        db.execute("DROP TABLE jti_v1")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
