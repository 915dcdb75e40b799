"""The decision log: an append-only, hash-chained, checkpoint-signed JSON-lines file.

How the parts fit
    :mod:`.record`    one record: canonical form, hash, checkpoint signature (pure)
    :mod:`.keys`      the Ed25519 checkpoint keys, checked when they are loaded
    :mod:`.files`     names, rotation, locking, durable writes, reading the files in order
    :mod:`.recovery`  finding the chain head on disk (torn tails, other writers, ``.head``)
    :mod:`.witness`   reporting durable heads outside the log; reading what a SIEM kept
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
    seconds while running, before rotation and on close (so every process that
    appends seals what it wrote before it exits), the writer appends a
    ``checkpoint`` record sealing the chain head: ``head`` (hash of the record before
    it), ``head_seq``, ``instance``, ``checkpoint_every``, ``key_id`` (first 16 hex
    chars of SHA-256 of the raw Ed25519 public key) and ``sig``, the base64 Ed25519
    signature over ``f"mailward-audit-checkpoint\\n{head_seq}\\n{head}"`` followed by
    ``"\\n"`` and the canonical JSON of the other fields (:func:`checkpoint_meta`:
    all but ``event``, ``head``, ``head_seq``, ``key_id``, ``sig`` and the writer's),
    so none of them can be changed without the key. Once the checkpoint line is on
    disk, the writer atomically replaces ``<path>.head`` with a copy of it. A tail
    cut after the last checkpoint, including the checkpoint line itself, is then
    detectable because ``.head`` names a record the log no longer has. Records after
    the last checkpoint are *unsealed*; :func:`verify` fails a log with records but
    no checkpoint, or with more unsealed records than ``checkpoint_every``.

Crashes
    Every open writer holds ``<path>.writers`` shared. A writer that opens the log
    and can take it exclusively knows no other writer is alive, so unsealed records
    are the tail of a process that died: it seals them at once with a checkpoint
    marked ``"recovery": true`` that names the seal before them (``previous_head``,
    ``previous_head_seq``) and their number (``sealed``). :func:`verify` reports
    such ranges as sealed after a crash, unwitnessed (``strict`` fails on them): an
    attacker who edits an unsealed tail and forces a restart gets it signed only
    this way, and the witness still holds the heads the tail had.

Witnesses
    Once a checkpoint is on disk it is reported (operational log event
    ``audit_checkpoint``, and POSTed to ``[audit] witness_url``), and so is the head
    of every group commit (``audit_head``), see :mod:`.witness`. ``verify`` given
    those lines fails when the log lacks (a cut back) or contradicts (a rewrite)
    any of them.

Files
    ``<path>``        the live log          ``<path>.1, .2, ...``  rotated logs, oldest first
    ``<path>.head``   latest checkpoint     ``<path>.torn``        torn tails moved aside
    ``<path>.lock``   writers' lock        ``<path>.writers``     held by each open writer

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
from proxy.audit.keys import (
    load_signing_key,
    load_verify_key,
    signing_key_from_config,
    signing_key_warnings,
)
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
    DEFAULT_CHECKPOINT_EVERY,
    MAX_RECORD_BYTES,
    SIGNATURE_CONTEXT,
    WRITER_FIELDS,
    ZERO_HASH,
    AuditIntegrityError,
    AuditUnavailable,
    canonical_json,
    checkpoint_message,
    checkpoint_meta,
    format_ts,
    key_id,
    record_hash,
)
from proxy.audit.verify import VerifyResult, verify
from proxy.audit.witness import Witness, Witnessed, WitnessObserver, read_witness_file
from proxy.audit.writer import (
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
    "Witness",
    "WitnessObserver",
    "Witnessed",
    "canonical_json",
    "checkpoint_message",
    "checkpoint_meta",
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
    "read_witness_file",
    "reason_codes",
    "record_hash",
    "rotated_files",
    "signing_key_from_config",
    "signing_key_warnings",
    "torn_path",
    "verify",
]
