"""Checking a log: every line, link, hash and checkpoint signature across the rotated
files and the live file, and the end of the chain against ``.head``; the first bad
line is named (1-based, with its file)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

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
    ZERO_HASH,
    checkpoint_message,
    is_checkpoint,
    key_id,
    parse_line,
    record_hash,
)


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
    last_seq: int = 0
    #: (file, line, hash) of the record ``.head`` seals, once seen.
    sealed_at: tuple[Path, int, str] | None = None
    #: the last file read and how many lines it had.
    last_file: Path | None = None
    last_lines: int = 0


class _Key(NamedTuple):
    public: Ed25519PublicKey
    kid: str


def verify(path: Path | str, verify_key: Ed25519PublicKey | None) -> VerifyResult:
    """Check the log at ``path`` (see the package docstring) and name the first bad line.

    ``path`` is the live log: its rotated siblings are checked first, oldest first, and
    the ``.head`` sidecar is checked against the end. A rotated file (``<name>.<n>``)
    passed explicitly is checked alone, from whatever seq it starts at. Without
    ``verify_key`` signatures are not checked (``signatures_checked`` is false).
    """
    path = Path(path)
    standalone = rotation_number(path) is not None
    key = _Key(verify_key, key_id(verify_key)) if verify_key is not None else None
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
    try:
        _walk(path, handles, state, standalone=standalone, sealed=sealed, key=key)
        if not standalone:
            _check_end(head_file, sealed, state)
    except _Bad as bad:
        return _result(state, bad, signed=key is not None, files=files)
    finally:
        for _, handle, _ in handles:
            handle.close()
    return _result(state, None, signed=key is not None, files=files)


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
    )


def _walk(
    path: Path,
    handles: list[tuple[Path, IO[bytes], int]],
    state: _ChainState,
    *,
    standalone: bool,
    sealed: dict[str, Any] | None,
    key: _Key | None,
) -> None:
    """Check every line of every file in order; raise :class:`_Bad` at the first fault."""
    previous: Path | None = None
    for file, handle, size in handles:
        _check_file_order(path, file, previous, state, standalone=standalone)
        lineno = 0
        for lineno, raw in enumerate(read_lines(handle, size), 1):
            record = _check_line(file, lineno, raw, state, key)
            if sealed is not None and record["seq"] == sealed["seq"]:
                state.sealed_at = (file, lineno, record["hash"])
        state.last_file, state.last_lines = file, lineno
        previous = file


def _check_file_order(
    path: Path, file: Path, previous: Path | None, state: _ChainState, *, standalone: bool
) -> None:
    """No rotated file may be missing: the oldest must be ``.1`` (the chain starts
    at seq 1) and the numbers must not skip."""
    number = rotation_number(file) if file != path else None
    if previous is None and not standalone:
        if number not in (None, 1):  # deleting the oldest files is tampering too
            raise _Bad(file, 1, f"rotated files {path.name}.1 to .{number - 1} are "
                                f"missing: the chain must start at seq 1")
        state.expected_seq, state.prev = 1, ZERO_HASH
    if previous is not None and number is not None:
        before = rotation_number(previous)
        if before is not None and number != before + 1:
            raise _Bad(file, 1, f"rotated file {path.name}.{before + 1} is missing")


def _check_end(head_file: Path, sealed: dict[str, Any] | None, state: _ChainState) -> None:
    """The chain must reach the checkpoint ``.head`` names, and hold it unchanged."""
    assert state.last_file is not None
    after_end = (state.last_file, state.last_lines + 1)
    if sealed is None:
        if state.checkpoints:
            raise _Bad(
                *after_end,
                f"{head_file} is missing, so a cut after the last checkpoint "
                "cannot be ruled out",
            )
    elif sealed["seq"] > state.last_seq:
        raise _Bad(
            *after_end,
            f"{head_file} seals seq {sealed['seq']} but the log ends at seq "
            f"{state.last_seq}: records after line {state.last_lines} were removed",
        )
    elif state.sealed_at is not None and state.sealed_at[2] != sealed["hash"]:
        raise _Bad(
            state.sealed_at[0],
            state.sealed_at[1],
            f"record seq {sealed['seq']} differs from the checkpoint in {head_file}",
        )


def _check_line(
    file: Path, lineno: int, raw: bytes, state: _ChainState, key: _Key | None
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
    if is_checkpoint(record):
        _check_checkpoint(record, key, bad)
        state.checkpoints += 1
        state.unsealed = 0
    else:
        state.unsealed += 1
    state.records += 1
    state.expected_seq, state.prev, state.last_seq = seq + 1, record["hash"], seq
    return record


def _check_checkpoint(
    record: dict[str, Any], key: _Key | None, bad: Callable[[str], _Bad]
) -> None:
    if record.get("head") != record.get("prev") or record.get("head_seq") != record["seq"] - 1:
        raise bad("checkpoint head does not name the previous record")
    if key is None:
        return
    if record.get("key_id") != key.kid:
        raise bad(f"checkpoint key_id {record.get('key_id')!r} is not the verify key's {key.kid}")
    try:
        signature = base64.b64decode(record["sig"], validate=True)
        key.public.verify(signature, checkpoint_message(record["head_seq"], record["head"]))
    except (KeyError, TypeError, binascii.Error, InvalidSignature):
        raise bad("checkpoint signature is not valid") from None
