"""The decision log: an append-only, hash-chained, checkpoint-signed JSON-lines file.

How the parts fit
    :mod:`.record`    one record: canonical form, hash, checkpoint signature (pure)
    :mod:`.keys`      the Ed25519 checkpoint keys, checked when they are loaded
    :mod:`.files`     names, rotation, locking, durable writes, reading the files in order
    :mod:`.recovery`  finding the chain head on disk (torn tails, other writers, ``.head``)
    :mod:`.writer`    :class:`AuditLog`, the one writer: group commit, fsync, fail closed;
                      :func:`open_audit_log` builds it from ``[audit]`` in mailward.toml
    :mod:`.verify`    checks a log end to end and names the first bad line
    :mod:`.query`     filters records and prints them as a table, JSON lines or CSV

    Each module imports only those above it. Everything other modules use is
    importable from ``proxy.audit`` itself.

Records
    One JSON object per line (UTF-8, ``\\n``). Callers pass the fields (``event`` plus
    whatever describes the event); the writer adds ``seq`` (1, 2, 3, ...), ``ts``
    (RFC 3339 UTC with microseconds, ``Z``), ``prev`` (the previous record's ``hash``;
    64 zeros for the first record) and ``hash``: the lowercase hex SHA-256 of the
    record without ``hash``, serialised as ``json.dumps(r, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)`` in UTF-8 (:func:`record_hash`). Each
    line is written in exactly that canonical form plus ``hash``, so *any* changed byte
    either breaks the JSON, changes a hashed value or breaks the canonical form.

    Callers pass only descriptive fields: never passwords, tokens or message bodies.
    This package does not (and cannot) scrub values.

Checkpoints
    The chain alone shows that the records are consistent, not that nobody rewrote
    or cut it. Every ``checkpoint_every`` records, every ``checkpoint_interval_s``
    seconds while running, before rotation and on close, the writer appends a
    ``checkpoint`` record sealing the chain head: ``head`` (hash of the record before
    it), ``head_seq``, ``key_id`` (first 16 hex chars of SHA-256 of the raw Ed25519
    public key) and ``sig``, the base64 Ed25519 signature over
    ``f"mailward-audit-checkpoint\\n{head_seq}\\n{head}"``. Once the checkpoint line is
    on disk, the writer atomically replaces ``<path>.head`` with a copy of it. A tail
    cut after the last checkpoint, including the checkpoint line itself, is then
    detectable because ``.head`` names a record the log no longer has. Records after
    the last checkpoint are *unsealed*: deleting them is not detectable.

Files
    ``<path>``        the live log          ``<path>.1, .2, ...``  rotated logs, oldest first
    ``<path>.head``   latest checkpoint     ``<path>.torn``        torn tails moved aside
    ``<path>.lock``   writers' lock

    When the live file exceeds ``rotate_bytes`` it is sealed with a checkpoint and
    renamed to the next ``<path>.<n>``; the chain continues in a fresh file.

Writing
    :class:`AuditLog` is the only writer. ``append`` (CLI) writes and fsyncs one record.
    ``write`` (server) writes the line at once, so records are in call order, and then
    waits for a group commit: one fsync in a worker thread covers every record written
    since the previous one. Each append holds an ``flock`` on ``<path>.lock`` and
    re-reads the tail if another process appended meanwhile, so a CLI command and the
    server can share one log without forking the chain. Failures are fail-closed:
    :class:`AuditUnavailable` is raised, ``healthy`` turns false, a partly written line
    is cut off again, and the next write retries.

Reading
    :func:`verify` checks every line, link, hash and signature across the rotated files
    and the live file and names the first bad line. :func:`query` filters records and
    :func:`format_records` prints them as a table, JSON lines or CSV.
"""

from proxy.audit.files import (
    FILE_MODE,
    LOCK_RETRY_S,
    LOCK_TIMEOUT_S,
    RECOVERY_SCAN_BYTES,
    head_path,
    lock_path,
    rotated_files,
    torn_path,
)
from proxy.audit.keys import load_signing_key, load_verify_key, signing_key_from_config
from proxy.audit.query import (
    CSV_COLUMNS,
    TABLE_COLUMNS,
    format_records,
    parse_time,
    query,
    reason_codes,
)
from proxy.audit.record import (
    CHECKPOINT_EVENT,
    MAX_RECORD_BYTES,
    SIGNATURE_CONTEXT,
    WRITER_FIELDS,
    ZERO_HASH,
    AuditIntegrityError,
    AuditUnavailable,
    canonical_json,
    checkpoint_message,
    format_ts,
    key_id,
    record_hash,
)
from proxy.audit.verify import VerifyResult, verify
from proxy.audit.writer import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_INTERVAL_S,
    DEFAULT_ROTATE_BYTES,
    AuditLog,
    open_audit_log,
)

__all__ = [
    "CHECKPOINT_EVENT",
    "CSV_COLUMNS",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CHECKPOINT_INTERVAL_S",
    "DEFAULT_ROTATE_BYTES",
    "FILE_MODE",
    "LOCK_RETRY_S",
    "LOCK_TIMEOUT_S",
    "MAX_RECORD_BYTES",
    "RECOVERY_SCAN_BYTES",
    "SIGNATURE_CONTEXT",
    "TABLE_COLUMNS",
    "WRITER_FIELDS",
    "ZERO_HASH",
    "AuditIntegrityError",
    "AuditLog",
    "AuditUnavailable",
    "VerifyResult",
    "canonical_json",
    "checkpoint_message",
    "format_records",
    "format_ts",
    "head_path",
    "key_id",
    "load_signing_key",
    "load_verify_key",
    "lock_path",
    "open_audit_log",
    "parse_time",
    "query",
    "reason_codes",
    "record_hash",
    "rotated_files",
    "signing_key_from_config",
    "torn_path",
    "verify",
]
