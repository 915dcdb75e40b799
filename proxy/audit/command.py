"""``mailward audit verify`` as the CLI runs it: which keys, which logs, what is printed
and the exit code (0 every log holds; 1 one does not; 2 it cannot be checked).

Keys and fingerprints
    A key's fingerprint is the lowercase hex SHA-256 of its raw 32 bytes; its
    ``key_id`` (what checkpoints carry) is the first 16 characters. Several keys may
    be given (rotation): each checkpoint is verified with the key its ``key_id``
    names. ``--key-fingerprint`` pins the keys: only those whose fingerprint starts
    with a pin (16 hex characters at least) are used. A pin that no given key matches
    means the log *cannot be verified* as asked (exit 2, like no key at all); a
    checkpoint signed by a key other than the pinned ones means the log *fails*
    (exit 1).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.audit.keys import load_verify_key
from proxy.audit.verify import VerifyResult, verify
from proxy.audit.witness import Witnessed, read_witness_file

EXIT_OK, EXIT_FAILED, EXIT_CANNOT = 0, 1, 2
_PIN = re.compile(r"[0-9a-f]{16,64}")


def fingerprint(key: Ed25519PublicKey) -> str:
    """Lowercase hex SHA-256 of the raw public key (its key_id is the first 16)."""
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()


def pinned_keys(keys: Sequence[Ed25519PublicKey], pins: Sequence[str]) -> list[Ed25519PublicKey]:
    """The keys whose fingerprint starts with one of ``pins`` (all of them without
    pins). ValueError (exit 2) for a malformed pin or one that no key matches."""
    wanted = [p.strip().lower().replace(":", "") for p in pins]
    for pin, given in zip(wanted, pins, strict=True):
        if not _PIN.fullmatch(pin):
            raise ValueError(f"--key-fingerprint {given!r}: want 16 to 64 hex characters")
    if not wanted:
        return list(keys)
    chosen = [k for k in keys if any(fingerprint(k).startswith(p) for p in wanted)]
    unmatched = [p for p in wanted if not any(fingerprint(k).startswith(p) for k in keys)]
    if unmatched:
        have = ", ".join(fingerprint(k)[:16] for k in keys) or "none"
        raise ValueError(f"cannot verify: no verify key has the pinned fingerprint "
                         f"{unmatched[0]} (keys given: {have})")
    return chosen


def run_verify(
    logs: Sequence[Path],
    key_files: Sequence[Path],
    *,
    pins: Sequence[str] = (),
    strict: bool = False,
    from_checkpoint: int | None = None,
    witness_files: Sequence[Path] = (),
    out: TextIO,
    err: TextIO,
) -> int:
    """Verify each log on its own (one per instance); print one result per log."""
    if not key_files:
        raise ValueError("cannot verify without the checkpoint public key: set [audit] "
                         "verify_key or pass --key")
    if from_checkpoint is not None and len(logs) > 1:
        raise ValueError("--from-checkpoint names a seq in one log: pass one --log")
    missing = [p for p in logs if not p.exists()]
    if missing:
        raise ValueError(f"{missing[0]}: no such audit log")
    keys = pinned_keys([load_verify_key(p) for p in key_files], pins)
    witness: list[Witnessed] = []
    for wf in witness_files:
        witness.extend(read_witness_file(wf))
    for key in keys:
        print(f"key {fingerprint(key)} (key_id {fingerprint(key)[:16]})", file=out)
    results = [(p, verify(p, keys, strict=strict, from_checkpoint=from_checkpoint,
                          witness=witness)) for p in logs]
    for path, result in results:
        _print_result(path, result, out, err)
    for warning in shared_instances([(p, r.instances) for p, r in results]):
        print(f"warning: {warning}", file=err)
    if witness_files:
        _print_unmatched(witness, results, out)
    return EXIT_OK if all(r.ok for _, r in results) else EXIT_FAILED


def shared_instances(logs: Sequence[tuple[Path, Sequence[str]]]) -> list[str]:
    """A warning for each instance that more than one of the logs names: two servers
    with one ``[server] instance``, or one log given twice under two names (a merge
    would count its records twice)."""
    owners: dict[str, list[Path]] = {}
    for path, instances in logs:
        for instance in dict.fromkeys(instances):
            owners.setdefault(instance, []).append(path)
    return [f"instance {name} is named by {len(paths)} logs: "
            + ", ".join(str(p) for p in paths)
            for name, paths in owners.items() if len(paths) > 1]


def _print_result(path: Path, result: VerifyResult, out: TextIO, err: TextIO) -> None:
    if not result.ok:
        print(f"{result.bad_file or path}:{result.bad_line}: {result.error}", file=err)
        return
    print(f"{path}: ok, {result.records} records, {result.checkpoints} checkpoints, "
          f"{result.unsealed} after the last checkpoint; signed by key_id "
          f"{', '.join(result.keys_used) or 'none'}", file=out)
    for first, last in result.recovered:
        print(f"  records {first} to {last}: sealed after a crash, unwitnessed", file=out)
    if result.witnessed or result.witness_skipped:
        print(f"  witness: {result.witnessed} heads match", file=out)


def _print_unmatched(
    witness: list[Witnessed], results: list[tuple[Path, VerifyResult]], out: TextIO
) -> None:
    covered = {i for _, r in results for i in r.instances}
    others = sorted({w.instance for w in witness if w.instance and w.instance not in covered})
    if others:
        print(f"witness lines of instances with no log given: {', '.join(others)}", file=out)
