"""Checking a log: every line, link, hash and checkpoint signature across the rotated
files and the live file, the end of the chain against ``.head``, that signed
checkpoints cover the records (beyond what a crash explains), and, given a witness
(:mod:`.witness`), that the log holds every head witnessed outside it. The first bad
line is named (1-based, with its file).

Coverage: a log with records but no checkpoint fails, and so does one whose records
after the last checkpoint outnumber that checkpoint's ``checkpoint_every`` (a writer
seals at that count; a crash can leave at most that many unsealed). A recovery
checkpoint (written at start-up after a crash) must name the seal before the tail it
covers and its length; its range is reported as sealed after a crash, unwitnessed,
and ``strict`` fails on it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.audit.files import (
    head_path,
    open_snapshot,
    read_head_file,
    read_lines,
    rotation_number,
)
from proxy.audit.record import (
    DEFAULT_CHECKPOINT_EVERY,
    ZERO_HASH,
    checkpoint_message,
    checkpoint_meta,
    is_checkpoint,
    key_id,
    parse_line,
    record_hash,
)
from proxy.audit.witness import Witnessed


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :func:`verify`. ``bad_line`` is 1-based within ``bad_file``."""

    ok: bool
    records: int = 0  # lines checked, checkpoints included
    checkpoints: int = 0
    unsealed: int = 0  # records after the last checkpoint
    bad_line: int | None = None
    bad_file: Path | None = None
    error: str | None = None
    signatures_checked: bool = False
    files: tuple[Path, ...] = ()
    #: (first seq, last seq) of each range a recovery checkpoint sealed after a crash
    recovered: tuple[tuple[int, int], ...] = ()
    #: key_ids of the keys that verified checkpoints
    keys_used: tuple[str, ...] = ()
    #: instances named by the checkpoints
    instances: tuple[str, ...] = ()
    #: witnessed heads checked against the log, and those left aside (another
    #: instance's, or before the verified range)
    witnessed: int = 0
    witness_skipped: int = 0


class _Bad(Exception):
    def __init__(self, file: Path, line: int, message: str) -> None:
        super().__init__(message)
        self.file, self.line, self.message = file, line, message


@dataclass
class _ChainState:
    expected_seq: int | None
    prev: str | None
    records: int = 0
    checkpoints: int = 0
    unsealed: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    #: (file, line) of the first record, and of the first record after the last checkpoint
    first_at: tuple[Path, int] | None = None
    unsealed_at: tuple[Path, int] | None = None
    #: (seq, hash) of the last checkpoint (0 and 64 zeros at the start of the chain),
    #: None while unknown (a chain verified from the middle)
    seal: tuple[int, str] | None = None
    #: the checkpoint_every the last checkpoint announced
    every: int | None = None
    #: (file, line, hash) of the record ``.head`` seals, once seen.
    sealed_at: tuple[Path, int, str] | None = None
    #: the last file read and how many lines it had.
    last_file: Path | None = None
    last_lines: int = 0
    recovered: list[tuple[int, int]] = field(default_factory=list)
    keys_used: set[str] = field(default_factory=set)
    instances: set[str] = field(default_factory=set)
    #: seq -> (file, line, hash) of records a witness names
    watched: dict[int, tuple[Path, int, str]] = field(default_factory=dict)
    witnessed: int = 0
    witness_skipped: int = 0


@dataclass(frozen=True, slots=True)
class _Options:
    keys: dict[str, Ed25519PublicKey]
    strict: bool
    from_checkpoint: int | None
    witness_seqs: frozenset[int]


def verify(
    path: Path | str,
    keys: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None,
    *,
    strict: bool = False,
    from_checkpoint: int | None = None,
    witness: Sequence[Witnessed] = (),
) -> VerifyResult:
    """Check the log at ``path`` (see the package docstring) and name the first bad line.

    ``path`` is the live log: its rotated siblings are checked first, oldest first, and
    the ``.head`` sidecar is checked against the end. A rotated file (``<name>.<n>``)
    passed explicitly is checked alone, from whatever seq it starts at.

    ``keys``: the public key, or several (rotation), each checkpoint verified by the
    one its ``key_id`` names; without any, signatures are not checked
    (``signatures_checked`` is false). ``strict``: ranges sealed after a crash fail.
    ``from_checkpoint``: the chain may start later than seq 1 (older files deleted
    under retention) but must reach the checkpoint with that seq. ``witness``: heads
    witnessed outside the log (:func:`proxy.audit.witness.read_witness_file`), of
    this log's instances, that the log must hold unchanged.
    """
    path = Path(path)
    standalone = rotation_number(path) is not None
    options = _Options(_key_table(keys), strict, from_checkpoint,
                       frozenset(w.seq for w in witness))
    head_file = head_path(path)
    sealed: dict[str, Any] | None = None
    if not standalone:
        try:
            sealed = read_head_file(head_file)
        except ValueError as exc:
            return VerifyResult(False, bad_line=1, bad_file=head_file, error=str(exc))

    try:
        handles = open_snapshot(path, standalone)
    except FileNotFoundError as exc:
        return VerifyResult(False, bad_line=1, bad_file=path, error=f"cannot read log: {exc}")

    files = tuple(p for p, _, _ in handles)
    state = _ChainState(expected_seq=None, prev=None, last_file=path)
    bad: _Bad | None = None
    try:
        _walk(path, handles, state, standalone=standalone, sealed=sealed, options=options)
        if not standalone:
            _check_end(head_file, sealed, state)
        _check_start(path, state, options)
        _check_coverage(state)
        _check_witness(state, witness)
    except _Bad as exc:
        bad = exc
    finally:
        for _, handle, _ in handles:
            handle.close()
    return _result(state, bad, signed=bool(options.keys), files=files)


def _key_table(
    keys: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None,
) -> dict[str, Ed25519PublicKey]:
    if keys is None:
        return {}
    if isinstance(keys, Ed25519PublicKey):
        keys = [keys]
    return {key_id(k): k for k in keys}


def _result(
    state: _ChainState, bad: _Bad | None, *, signed: bool, files: tuple[Path, ...]
) -> VerifyResult:
    return VerifyResult(
        bad is None,
        records=state.records,
        checkpoints=state.checkpoints,
        unsealed=state.unsealed,
        bad_line=bad.line if bad else None,
        bad_file=bad.file if bad else None,
        error=bad.message if bad else None,
        signatures_checked=signed,
        files=files,
        recovered=tuple(state.recovered),
        keys_used=tuple(sorted(state.keys_used)),
        instances=tuple(sorted(state.instances)),
        witnessed=state.witnessed,
        witness_skipped=state.witness_skipped,
    )


def _walk(
    path: Path,
    handles: list[tuple[Path, IO[bytes], int]],
    state: _ChainState,
    *,
    standalone: bool,
    sealed: dict[str, Any] | None,
    options: _Options,
) -> None:
    """Check every line of every file in order; raise :class:`_Bad` at the first fault."""
    previous: Path | None = None
    watch = options.witness_seqs
    for file, handle, size in handles:
        _check_file_order(path, file, previous, state, standalone=standalone,
                          anywhere=options.from_checkpoint is not None)
        lineno = 0
        for lineno, raw in enumerate(read_lines(handle, size), 1):
            record = _check_line(file, lineno, raw, state, options)
            seq = record["seq"]
            if sealed is not None and seq == sealed["seq"]:
                state.sealed_at = (file, lineno, record["hash"])
            if seq in watch:
                state.watched[seq] = (file, lineno, record["hash"])
        state.last_file, state.last_lines = file, lineno
        previous = file


def _check_file_order(
    path: Path, file: Path, previous: Path | None, state: _ChainState, *,
    standalone: bool, anywhere: bool,
) -> None:
    """No rotated file may be missing: the oldest must be ``.1`` (the chain starts
    at seq 1; ``anywhere``: a later start is checked by :func:`_check_start`) and the
    numbers must not skip."""
    number = rotation_number(file) if file != path else None
    if previous is None and not standalone and not anywhere:
        if number not in (None, 1):  # deleting the oldest files is tampering too
            raise _Bad(file, 1, f"rotated files {path.name}.1 to .{number - 1} are "
                                f"missing: the chain must start at seq 1")
        state.expected_seq, state.prev, state.seal = 1, ZERO_HASH, (0, ZERO_HASH)
    if previous is not None and number is not None:
        before = rotation_number(previous)
        if before is not None and number != before + 1:
            raise _Bad(file, 1, f"rotated file {path.name}.{before + 1} is missing")


def _after_end(state: _ChainState) -> tuple[Path, int]:
    assert state.last_file is not None
    return state.last_file, state.last_lines + 1


def _check_end(head_file: Path, sealed: dict[str, Any] | None, state: _ChainState) -> None:
    """The chain must reach the checkpoint ``.head`` names, and hold it unchanged."""
    if sealed is None:
        if state.checkpoints:
            raise _Bad(
                *_after_end(state),
                f"{head_file} is missing, so a cut after the last checkpoint "
                "cannot be ruled out",
            )
    elif sealed["seq"] > state.last_seq:
        raise _Bad(
            *_after_end(state),
            f"{head_file} seals seq {sealed['seq']} but the log ends at seq "
            f"{state.last_seq}: records after line {state.last_lines} were removed",
        )
    elif state.sealed_at is not None and state.sealed_at[2] != sealed["hash"]:
        raise _Bad(
            state.sealed_at[0],
            state.sealed_at[1],
            f"record seq {sealed['seq']} differs from the checkpoint in {head_file}",
        )


def _check_start(path: Path, state: _ChainState, options: _Options) -> None:
    """With ``from_checkpoint``, the log must hold that checkpoint."""
    start = options.from_checkpoint
    if start is None or (state.first_seq is not None and state.first_seq <= start
                         and state.last_seq >= start):
        return
    first = state.first_at or (path, 1)
    if state.first_seq is None or state.first_seq > start:
        raise _Bad(*first, f"the log starts at seq {state.first_seq}, after checkpoint "
                           f"{start} to verify from: its records were deleted")
    raise _Bad(*_after_end(state), f"the log ends at seq {state.last_seq}, before "
                                   f"checkpoint {start} to verify from")


def _check_coverage(state: _ChainState) -> None:
    """Records no checkpoint covers, beyond what a crash can explain, fail."""
    if state.records and not state.checkpoints:
        raise _Bad(*(state.first_at or _after_end(state)),
                   f"{state.records} records and no checkpoint: nothing signed covers them")
    limit = state.every or DEFAULT_CHECKPOINT_EVERY
    if state.unsealed > limit and state.unsealed_at is not None:
        raise _Bad(*state.unsealed_at,
                   f"{state.unsealed} records after the last checkpoint exceed its "
                   f"checkpoint_every ({limit}): more than a crash leaves unsealed")


def _check_witness(state: _ChainState, witness: Sequence[Witnessed]) -> None:
    """The log must hold every witnessed head of its instances, unchanged."""
    lacking: Witnessed | None = None
    for w in sorted(witness, key=lambda w: w.seq):
        if (w.instance is not None and state.instances and w.instance not in state.instances) \
                or state.first_seq is None or w.seq < state.first_seq:
            state.witness_skipped += 1
            continue
        state.witnessed += 1
        seen = state.watched.get(w.seq)
        if seen is None:
            lacking = lacking or w
        elif seen[2] != w.hash:
            raise _Bad(seen[0], seen[1],
                       f"record seq {w.seq} differs from {w.where}: the log was rewritten")
    if lacking is not None:
        raise _Bad(*_after_end(state),
                   f"the log ends at seq {state.last_seq} but {lacking.where} has seq "
                   f"{lacking.seq}: the log was cut back")


def _check_line(
    file: Path, lineno: int, raw: bytes, state: _ChainState, options: _Options
) -> dict[str, Any]:
    def bad(message: str) -> _Bad:
        return _Bad(file, lineno, message)

    if not raw.endswith(b"\n"):
        raise bad("incomplete last line (no line break)")
    try:
        record = parse_line(raw[:-1])
    except ValueError as exc:
        raise bad(str(exc)) from None
    seq = record.get("seq")
    if type(seq) is not int:
        raise bad("no integer seq")
    if state.expected_seq is not None and seq != state.expected_seq:
        raise bad(f"seq {seq}, expected {state.expected_seq}")
    if state.prev is not None and record.get("prev") != state.prev:
        raise bad("prev does not match the previous record's hash")
    if record.get("hash") != record_hash(record):
        raise bad("hash does not match the record")
    if not isinstance(record.get("event"), str):
        raise bad("no event")
    if state.first_seq is None:
        state.first_seq, state.first_at = seq, (file, lineno)
    if is_checkpoint(record):
        _check_checkpoint(record, state, options, bad)
    else:
        if seq == options.from_checkpoint:
            raise bad(f"record seq {seq} to verify from is not a checkpoint")
        if state.unsealed == 0:
            state.unsealed_at = (file, lineno)
        state.unsealed += 1
    state.records += 1
    state.expected_seq, state.prev, state.last_seq = seq + 1, record["hash"], seq
    return record


def _check_checkpoint(
    record: dict[str, Any], state: _ChainState, options: _Options,
    bad: Callable[[str], _Bad],
) -> None:
    if record.get("head") != record.get("prev") or record.get("head_seq") != record["seq"] - 1:
        raise bad("checkpoint head does not name the previous record")
    if options.keys:
        _check_signature(record, options.keys, bad)
        state.keys_used.add(record["key_id"])
    if record.get("recovery") is True:
        _check_recovery(record, state, bad, strict=options.strict)
    every = record.get("checkpoint_every")
    state.every = every if type(every) is int and every > 0 else None
    instance = record.get("instance")
    if isinstance(instance, str):
        state.instances.add(instance)
    state.checkpoints += 1
    state.unsealed = 0
    state.unsealed_at = None
    state.seal = (record["seq"], record["hash"])


def _check_signature(
    record: dict[str, Any], keys: dict[str, Ed25519PublicKey], bad: Callable[[str], _Bad]
) -> None:
    kid = record.get("key_id")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise bad(f"checkpoint key_id {kid!r} is not the key_id of a verify key "
                  f"({', '.join(keys)})")
    message = checkpoint_message(record["head_seq"], record["head"], checkpoint_meta(record))
    try:
        signature = base64.b64decode(record["sig"], validate=True)
        key.verify(signature, message)
    except (KeyError, TypeError, binascii.Error, InvalidSignature):
        raise bad("checkpoint signature is not valid") from None


def _check_recovery(
    record: dict[str, Any], state: _ChainState, bad: Callable[[str], _Bad], *, strict: bool
) -> None:
    """A recovery checkpoint must name the seal before the tail it covers and its
    length, and that tail must be one a crash can leave."""
    sealed = record.get("sealed")
    if state.seal is not None:
        named = (record.get("previous_head_seq"), record.get("previous_head"))
        if named != state.seal or sealed != state.unsealed:
            raise bad(f"recovery checkpoint names {sealed!r} records after seq {named[0]!r}; "
                      f"the log has {state.unsealed} after seq {state.seal[0]}")
    limit = state.every or record.get("checkpoint_every") or DEFAULT_CHECKPOINT_EVERY
    if type(sealed) is not int or sealed > limit:
        raise bad(f"recovery checkpoint seals {sealed!r} records, more than "
                  f"checkpoint_every ({limit}): more than a crash leaves unsealed")
    first = record["seq"] - sealed
    if sealed:
        state.recovered.append((first, record["seq"] - 1))
    if strict:
        raise bad(f"records {first} to {record['seq'] - 1} were sealed after a crash, "
                  "unwitnessed (--strict)")
