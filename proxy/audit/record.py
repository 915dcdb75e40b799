"""One record: its canonical form, its hash, and checkpoint signatures.

Pure code: no files, no clock (the caller passes the time). Everything that decides
whether a line *is* a valid record lives here, so the writer, :mod:`.verify` and
:mod:`.query` agree on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy import __version__

ZERO_HASH = "0" * 64
CHECKPOINT_EVENT = "checkpoint"
SIGNATURE_CONTEXT = "mailward-audit-checkpoint"
#: Fields the writer assigns; callers may not pass them.
WRITER_FIELDS = frozenset({"seq", "ts", "prev", "hash"})
#: Records between checkpoints when ``[audit] checkpoint_every`` is not set, and the
#: limit ``verify`` applies after a checkpoint that does not say.
DEFAULT_CHECKPOINT_EVERY = 1000
#: Largest record line the writer accepts.
MAX_RECORD_BYTES = 1024 * 1024


class AuditUnavailable(Exception):
    """The audit log cannot be written; refuse the action that needed the record."""


class AuditIntegrityError(AuditUnavailable):
    """The existing log is inconsistent (e.g. cut after a checkpoint); the writer will
    not extend it. Run ``mailward audit verify`` and move the damaged files aside."""


def canonical_json(obj: Any) -> str:
    """The serialisation used for hashing and for every line of the log."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(record: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of ``record`` without its ``hash`` field, serialised
    canonically (see the package docstring)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def format_ts(posix: float) -> str:
    """RFC 3339 UTC with microseconds and ``Z``: ``2025-06-01T12:00:00.000000Z``."""
    return datetime.fromtimestamp(posix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seal(body: Mapping[str, Any], *, seq: int, prev: str, posix: float) -> dict[str, Any]:
    """The record ``body`` becomes at ``seq`` after ``prev``, written at ``posix``."""
    record = {"seq": seq, "ts": format_ts(posix), **body, "prev": prev}
    record["hash"] = record_hash(record)
    return record


def validated(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a caller's fields, refused if they name writer fields, lack an
    ``event`` or pretend to be a checkpoint."""
    if not isinstance(fields, Mapping):
        raise TypeError("audit fields must be a mapping")
    reserved = WRITER_FIELDS.intersection(fields)
    if reserved:
        raise ValueError(f"audit fields {sorted(reserved)} are assigned by the writer")
    event = fields.get("event")
    if not isinstance(event, str) or not event:
        raise ValueError("audit fields need a non-empty 'event'")
    if event == CHECKPOINT_EVENT:
        raise ValueError("checkpoint records are written only by the audit log itself")
    return dict(fields)


def parse_line(raw: bytes) -> dict[str, Any]:
    """Parse one line (without ``\\n``) strictly: UTF-8 JSON object in canonical form.
    Raises ``ValueError`` with a short description."""
    try:
        text = raw.decode("utf-8")
        record = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not valid UTF-8 JSON") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    try:
        canonical = canonical_json(record)
    except ValueError:
        raise ValueError("not in canonical form") from None
    if canonical != text:
        raise ValueError("not in canonical form")
    return record


def parse_sealed(raw: bytes) -> dict[str, Any]:
    """:func:`parse_line` plus an integer ``seq`` and a matching ``hash``."""
    record = parse_line(raw)
    if type(record.get("seq")) is not int:
        raise ValueError("no integer seq")
    if record.get("hash") != record_hash(record):
        raise ValueError("hash does not match the record")
    return record


def is_checkpoint(record: Mapping[str, Any]) -> bool:
    return record.get("event") == CHECKPOINT_EVENT


def count_unsealed(records: list[dict[str, Any]], *, base: int = 0) -> int:
    """Records after the last checkpoint among ``records``, starting from ``base``."""
    count = base
    for record in records:
        count = 0 if is_checkpoint(record) else count + 1
    return count


# -- checkpoint signatures ------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes_raw()
    return hashlib.sha256(raw).hexdigest()[:16]


#: Checkpoint fields the signature covers beyond ``head_seq`` and ``head`` are all the
#: others except these (``key_id`` only selects the key; the rest the writer assigns).
_UNSIGNED_CHECKPOINT_FIELDS = frozenset({"event", "head", "head_seq", "key_id", "sig"})


def checkpoint_meta(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a checkpoint its signature covers besides ``head_seq`` and
    ``head``: ``version`` (of the mailward that wrote it), ``instance``,
    ``checkpoint_every`` and, for a recovery checkpoint, ``recovery``,
    ``previous_head``, ``previous_head_seq`` and ``sealed``."""
    skip = _UNSIGNED_CHECKPOINT_FIELDS | WRITER_FIELDS
    return {k: v for k, v in record.items() if k not in skip}


def checkpoint_message(head_seq: int, head: str, meta: Mapping[str, Any] | None = None) -> bytes:
    """The bytes a checkpoint signature covers: ``"mailward-audit-checkpoint\n{head_seq}
    \n{head}"``, then ``"\n"`` and the canonical JSON of :func:`checkpoint_meta` when
    the checkpoint has such fields (so none of them can be changed or removed without
    the key; checkpoints written before they existed keep verifying)."""
    message = f"{SIGNATURE_CONTEXT}\n{head_seq}\n{head}"
    if meta:
        message += "\n" + canonical_json(meta)
    return message.encode()


def checkpoint_body(
    head_seq: int,
    head: str,
    signing_key: Ed25519PrivateKey | None,
    kid: str | None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields of a checkpoint sealing ``head`` (record ``head_seq``) with ``meta``
    (see :func:`checkpoint_meta`) and this build's ``version``, signed when there is a
    key (``kid`` is its :func:`key_id`). The version is signed like the rest of the
    meta; checkpoints written before it existed have none and keep verifying."""
    body: dict[str, Any] = {
        "event": CHECKPOINT_EVENT, "head": head, "head_seq": head_seq,
        "version": __version__, **(meta or {})
    }
    if signing_key is not None:
        sig = signing_key.sign(checkpoint_message(head_seq, head, checkpoint_meta(body)))
        body["key_id"] = kid
        body["sig"] = base64.b64encode(sig).decode("ascii")
    return body
