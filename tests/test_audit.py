"""The audit log: chain format, group commit, checkpoints, tamper evidence, rotation,
failure handling, recovery, query and output formats."""

from __future__ import annotations

import asyncio
import base64
import csv
import errno
import functools
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

import proxy
from proxy import audit
from proxy.audit import (
    ZERO_HASH,
    AuditIntegrityError,
    AuditLog,
    AuditUnavailable,
    format_records,
    open_audit_log,
    parse_time,
    query,
    record_hash,
    verify,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


class FakeClock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def decision(i: int, **extra: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "event": "decision",
        "decision": "deny" if i % 3 == 0 else "allow",
        "reasons": [{"code": "prohibited_app", "text": "TikTok", "app": "com.zhiliaoapp"}]
        if i % 3 == 0
        else [],
        "protocol": ("imap", "smtp", "activesync")[i % 3],
        "listener": "imaps",
        "client_ip": "192.0.2.10",
        "user": f"user{i % 4}@corp.example",
        "device_id": f"dev-{i % 5}",
        "platform": "android",
        "posture_age_s": 12,
        "policy_version": "7",
        "policy_sha256": "ab" * 32,
        "mode": "enforce",
        "latency_us": 150 + i,
    }
    fields.update(extra)
    return fields


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def make_log(path: Path, n: int = 50, *, every: int = 7, **kw: object) -> None:
    """A closed log of n records (with checkpoints every `every` and a final one)."""
    with AuditLog(path, signing_key=KEY, checkpoint_every=every, clock=FakeClock(), **kw) as log:
        for i in range(n):
            log.append(decision(i, user="Zoë@corp.example" if i == 4 else f"u{i % 4}@c.example"))


# -- format -----------------------------------------------------------------------------


def test_chain_starts_at_one_with_zero_prev(tmp_path: Path) -> None:
    """seq counts from 1, the first prev is 64 zeros, each prev is the previous hash."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY, clock=FakeClock()) as log:
        first = log.append(decision(1))
        second = log.append(decision(2))
    assert first["seq"] == 1 and first["prev"] == ZERO_HASH
    assert second["seq"] == 2 and second["prev"] == first["hash"]
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0] == first and records[1] == second
    assert records[2]["event"] == "checkpoint"  # close() seals the log
    assert all(TS_RE.fullmatch(r["ts"]) for r in records)
    assert records[0]["ts"] == "2025-06-15T15:06:41.000000Z"


def test_hash_definition_matches_design(tmp_path: Path) -> None:
    """hash = sha256 of the record without hash, json sort_keys/compact/ensure_ascii=False."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=None) as log:
        log.append(decision(1, user="zoë@corp.example", note="日本"))
    raw = lines_of(path)[0]
    assert raw.endswith(b"\n") and "zoë".encode() in raw  # UTF-8, not \u escapes
    record = json.loads(raw)
    body = {k: v for k, v in record.items() if k != "hash"}
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    assert record["hash"] == expected == record_hash(record)
    assert re.fullmatch(r"[0-9a-f]{64}", record["hash"])


def test_writer_assigned_fields_refused(tmp_path: Path) -> None:
    """Callers cannot set seq/ts/prev/hash, omit event, or forge checkpoints."""
    with AuditLog(tmp_path / "a.jsonl", signing_key=KEY) as log:
        for bad in ({"event": "x", "seq": 9}, {"event": "x", "hash": "0"}, {"user": "u"}):
            with pytest.raises(ValueError):
                log.append(bad)
        with pytest.raises(ValueError):
            log.append({"event": "checkpoint", "head": "x"})
        with pytest.raises(ValueError):
            log.append({"event": "x", "latency": float("nan")})
        assert log.append({"event": "x"})["seq"] == 1  # nothing was consumed


# -- group commit -----------------------------------------------------------------------


async def test_group_commit_fewer_fsyncs_than_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 concurrent writes: 200 consecutive records, far fewer fsyncs."""
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signing_key=KEY)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    records = await asyncio.gather(*(log.write(decision(i)) for i in range(200)))
    assert fsyncs < 200
    assert [r["seq"] for r in records] == list(range(1, 201))
    assert [r["latency_us"] for r in records] == [150 + i for i in range(200)]  # call order
    monkeypatch.setattr(os, "fsync", real_fsync)
    await log.close()
    result = verify(path, KEY.public_key())
    assert result.ok and result.records == 201


async def test_write_waits_for_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write() does not return before an fsync covering its record has completed."""
    synced: list[int] = []
    real_fsync = os.fsync
    log = AuditLog(tmp_path / "a.jsonl", signing_key=KEY)

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(log.seq)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    record = await log.write(decision(1))
    assert synced and synced[-1] >= record["seq"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    await log.close()


# -- checkpoints ------------------------------------------------------------------------


def test_checkpoint_signature(tmp_path: Path) -> None:
    """A checkpoint seals the head, its instance, checkpoint_every and the writer's
    version with an Ed25519 signature over the documented text."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY) as log:
        last = log.append(decision(1))
        cp = log.checkpoint()
    assert cp["event"] == "checkpoint"
    assert cp["head"] == last["hash"] and cp["head_seq"] == last["seq"] == cp["seq"] - 1
    raw_pub = KEY.public_key().public_bytes_raw()
    assert cp["key_id"] == hashlib.sha256(raw_pub).hexdigest()[:16]
    assert cp["instance"] == socket.gethostname() and cp["checkpoint_every"] == 1000
    assert cp["version"] == proxy.__version__
    meta = json.dumps({"checkpoint_every": 1000, "instance": cp["instance"],
                       "version": cp["version"]}, sort_keys=True, separators=(",", ":"))
    message = f"mailward-audit-checkpoint\n{cp['head_seq']}\n{cp['head']}\n{meta}".encode()
    KEY.public_key().verify(base64.b64decode(cp["sig"]), message)  # raises if bad
    assert json.loads((tmp_path / "audit.jsonl.head").read_text()) == cp

    good = verify(path, KEY.public_key())
    assert good.ok and good.checkpoints == 1 and good.unsealed == 0 and good.signatures_checked
    wrong = verify(path, OTHER_KEY.public_key())
    assert not wrong.ok and wrong.bad_line == 2 and "key_id" in (wrong.error or "")


def test_bad_signature_with_right_key_id_fails(tmp_path: Path) -> None:
    """A checkpoint whose signature is wrong fails even if the chain is recomputed."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY) as log:
        log.append(decision(1))
    lines = lines_of(path)
    cp = json.loads(lines[1])
    cp["sig"] = base64.b64encode(OTHER_KEY.sign(b"something else")).decode()
    cp["hash"] = record_hash(cp)
    lines[1] = (audit.canonical_json(cp) + "\n").encode()
    path.write_bytes(b"".join(lines))
    audit.head_path(path).write_text(audit.canonical_json(cp))
    result = verify(path, KEY.public_key())
    assert not result.ok and result.bad_line == 2 and "signature" in (result.error or "")


def test_checkpoint_every_n_records(tmp_path: Path) -> None:
    """A checkpoint follows every checkpoint_every records."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 20, every=5)
    events = [json.loads(x)["event"] for x in lines_of(path)]
    assert [i for i, e in enumerate(events, 1) if e == "checkpoint"] == [6, 12, 18, 24]
    result = verify(path, KEY.public_key())
    assert result.ok and result.records == 24 and result.checkpoints == 4


async def test_periodic_checkpoint(tmp_path: Path) -> None:
    """While running, unsealed records are sealed every checkpoint_interval_s."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signing_key=KEY, checkpoint_interval_s=0.05)
    await log.start()
    await log.write(decision(1))
    for _ in range(100):
        await asyncio.sleep(0.02)
        if audit.head_path(path).exists():
            break
    assert json.loads(audit.head_path(path).read_text())["head_seq"] == 1
    await log.close()
    assert [json.loads(x)["event"] for x in lines_of(path)] == ["decision", "checkpoint"]


def test_unsigned_log(tmp_path: Path) -> None:
    """Without a signing key checkpoints carry no sig; a verify key then rejects them."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=None) as log:
        log.append(decision(1))
    unchecked = verify(path, None)
    assert unchecked.ok and not unchecked.signatures_checked and unchecked.checkpoints == 1
    assert not verify(path, KEY.public_key()).ok


# -- tamper evidence --------------------------------------------------------------------


def test_intact_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path)
    result = verify(path, KEY.public_key())
    assert result.ok, result
    assert result.records == 58 and result.checkpoints == 8 and result.unsealed == 0


def test_every_single_line_deletion_is_detected(tmp_path: Path) -> None:
    """Deleting any one line (first, middle, checkpoint or last) fails at that line."""
    path = tmp_path / "audit.jsonl"
    make_log(path)
    pristine = lines_of(path)
    for index in range(len(pristine)):
        path.write_bytes(b"".join(pristine[:index] + pristine[index + 1 :]))
        result = verify(path, KEY.public_key())
        assert not result.ok, f"deleting line {index + 1} went unnoticed"
        assert result.bad_line == index + 1, (index, result)
        assert result.bad_file == path


def test_random_byte_flips_are_detected(tmp_path: Path) -> None:
    """Changing any single byte fails verification and names the line holding it."""
    path = tmp_path / "audit.jsonl"
    make_log(path)
    pristine = path.read_bytes()
    rng = random.Random(20250615)
    positions = [*rng.sample(range(len(pristine)), 600), len(pristine) - 1, 0]
    for pos in positions:
        data = bytearray(pristine)
        data[pos] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
        result = verify(path, KEY.public_key())
        expected_line = pristine[:pos].count(b"\n") + 1
        assert not result.ok, f"flip at byte {pos} went unnoticed"
        assert result.bad_line == expected_line, (pos, result)


def test_truncation_after_checkpoint_detected_via_head(tmp_path: Path) -> None:
    """Cutting the tail back to an earlier checkpoint is caught by the .head sidecar."""
    path = tmp_path / "audit.jsonl"
    make_log(path)
    lines = lines_of(path)
    cut = [i for i, x in enumerate(lines, 1) if json.loads(x)["event"] == "checkpoint"][-2]
    path.write_bytes(b"".join(lines[:cut]))  # ends with a valid, signed checkpoint
    result = verify(path, KEY.public_key())
    assert not result.ok and result.bad_line == cut + 1
    assert "were removed" in (result.error or "")


def test_rewritten_tail_detected_via_head(tmp_path: Path) -> None:
    """A tail replaced with re-chained records differs from the checkpoint in .head."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 10, every=100)  # records 1-10, checkpoint 11
    lines = lines_of(path)[:5]
    prev = json.loads(lines[-1])["hash"]
    for seq in range(6, 13):  # forge 6..12 with correct hashes but no valid signature
        forged = {"event": "decision", "seq": seq, "ts": "2025-06-15T00:00:00.000000Z"}
        forged["prev"] = prev
        forged["hash"] = prev = record_hash(forged)
        lines.append((audit.canonical_json(forged) + "\n").encode())
    path.write_bytes(b"".join(lines))
    result = verify(path, KEY.public_key())
    assert not result.ok and result.bad_line == 11 and "differs" in (result.error or "")


def test_missing_head_sidecar_detected(tmp_path: Path) -> None:
    """Deleting .head along with the tail does not hide the cut."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 10)
    audit.head_path(path).unlink()
    result = verify(path, KEY.public_key())
    assert not result.ok and result.bad_line == len(lines_of(path)) + 1


def test_unsealed_tail_is_reported(tmp_path: Path) -> None:
    """Records after the last checkpoint are counted as unsealed."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signing_key=KEY)
    log.append(decision(1))
    log.checkpoint()
    log.append(decision(2))
    log.append(decision(3))
    result = verify(path, KEY.public_key())
    assert result.ok and result.unsealed == 2 and result.checkpoints == 1
    log.close_sync()
    assert verify(path, KEY.public_key()).unsealed == 0


# -- rotation ---------------------------------------------------------------------------


def test_rotation_keeps_the_chain(tmp_path: Path) -> None:
    """Rotated files continue one chain; verify spans them; each file ends sealed."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 60, every=1000, rotate_bytes=4000)
    rotated = audit.rotated_files(path)
    assert [p.name for p in rotated[:3]] == ["audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    files = [*rotated, path]
    chained = [json.loads(x) for f in files for x in lines_of(f)]
    assert [r["seq"] for r in chained] == list(range(1, len(chained) + 1))
    for older, newer in itertools.pairwise(files):
        if lines_of(newer):
            assert json.loads(lines_of(newer)[0])["prev"] == json.loads(lines_of(older)[-1])["hash"]
        assert json.loads(lines_of(older)[-1])["event"] == "checkpoint"

    result = verify(path, KEY.public_key())
    assert result.ok and result.records == len(chained) and result.files == tuple(files)
    assert verify(rotated[1], KEY.public_key()).ok  # a rotated file alone

    # Tampering inside a rotated file names that file.
    data = bytearray(rotated[1].read_bytes())
    data[10] ^= 1
    rotated[1].write_bytes(bytes(data))
    bad = verify(path, KEY.public_key())
    assert not bad.ok and bad.bad_file == rotated[1] and bad.bad_line == 1


def test_missing_rotated_file_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 60, every=1000, rotate_bytes=4000)
    audit.rotated_files(path)[1].unlink()
    result = verify(path, KEY.public_key())
    assert not result.ok and result.bad_file == audit.rotated_files(path)[1]


def test_deleting_the_oldest_rotated_files_is_detected(tmp_path: Path) -> None:
    """Removing the oldest rotated files (the start of the chain) fails verification,
    naming the first file left; the chain must start at seq 1."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 60, every=1000, rotate_bytes=4000)
    rotated = audit.rotated_files(path)
    assert len(rotated) >= 3
    rotated[0].unlink()
    rotated[1].unlink()
    result = verify(path, KEY.public_key())
    assert not result.ok and result.bad_file == rotated[2] and result.bad_line == 1
    assert "missing" in (result.error or "")


def test_reopen_after_rotation_continues(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 30, every=1000, rotate_bytes=3000)
    last = max(
        json.loads(x)["seq"] for f in [*audit.rotated_files(path), path] for x in lines_of(f)
    )
    with AuditLog(path, signing_key=KEY) as log:
        assert log.append(decision(1))["seq"] == last + 1
    assert verify(path, KEY.public_key()).ok


# -- failures ---------------------------------------------------------------------------


def test_write_error_fails_closed_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC after a partial write: AuditUnavailable, unhealthy, no half record; then ok."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signing_key=KEY)
    log.append(decision(1))
    real_write = os.write

    def half_then_fail(fd: int, data: bytes) -> int:
        if fd == log._fd and len(data) > 10:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(AuditUnavailable):
        log.append(decision(2))
    assert not log.healthy and "No space" in (log.last_error or "")
    assert len(lines_of(path)) == 1 and path.read_bytes().endswith(b"\n")  # no fragment

    monkeypatch.setattr(os, "write", real_write)
    assert log.append(decision(3))["seq"] == 2
    assert log.healthy and log.last_error is None
    log.close_sync()
    assert verify(path, KEY.public_key()).ok


async def test_fsync_error_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing group-commit fsync raises AuditUnavailable to every waiting writer."""
    log = AuditLog(tmp_path / "a.jsonl", signing_key=KEY)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    results = await asyncio.gather(
        *(log.write(decision(i)) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, AuditUnavailable) for r in results)
    assert not log.healthy
    monkeypatch.undo()
    await log.write(decision(9))
    assert log.healthy
    await log.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory(tmp_path: Path) -> None:
    """A log in a read-only directory: unhealthy at open, AuditUnavailable on append."""
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        log = AuditLog(locked / "audit.jsonl", signing_key=KEY)
        assert not log.healthy and log.last_error
        with pytest.raises(AuditUnavailable):
            log.append(decision(1))
        log.close_sync()
    finally:
        locked.chmod(0o700)


def test_unopenable_path(tmp_path: Path) -> None:
    """A log whose parent is a file cannot be opened: unhealthy, appends raise."""
    (tmp_path / "file").write_text("x")
    log = AuditLog(tmp_path / "file" / "audit.jsonl", signing_key=KEY)
    assert not log.healthy
    with pytest.raises(AuditUnavailable):
        log.append(decision(1))
    log.close_sync()


# -- recovery ---------------------------------------------------------------------------


def test_reopen_continues_seq(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY) as log:
        log.append(decision(1))
        log.append(decision(2))
    with AuditLog(path, signing_key=KEY) as log:
        record = log.append(decision(3))
    assert record["seq"] == 4  # 1, 2, checkpoint 3, then 4
    assert record["prev"] == json.loads(lines_of(path)[2])["hash"]
    assert verify(path, KEY.public_key()).ok


def test_torn_tail_moved_aside(tmp_path: Path) -> None:
    """An incomplete last line from a crash goes to .torn, is logged, and the chain goes on."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 5)
    with path.open("ab") as f:
        f.write(b'{"decision":"allow","event":"deci')
    with capture_logs() as logs:
        log = AuditLog(path, signing_key=KEY)
    assert any(e["event"] == "audit_torn_tail_moved" for e in logs)
    assert audit.torn_path(path).read_bytes() == b'{"decision":"allow","event":"deci\n'
    assert log.healthy
    assert log.append(decision(6))["seq"] == 7
    log.close_sync()
    assert verify(path, KEY.public_key()).ok


def test_cut_log_is_not_extended(tmp_path: Path) -> None:
    """A log cut behind its .head is refused: the writer will not paper over it."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 5)
    path.write_bytes(b"".join(lines_of(path)[:-1]))
    log = AuditLog(path, signing_key=KEY)
    assert not log.healthy and "removed" in (log.last_error or "")
    with pytest.raises(AuditIntegrityError):
        log.append(decision(9))
    log.close_sync()


def test_head_file_repaired_after_crash_window(tmp_path: Path) -> None:
    """A crash between the checkpoint line and .head: reopening re-publishes .head."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 5)
    audit.head_path(path).unlink()
    with AuditLog(path, signing_key=KEY):
        pass
    assert json.loads(audit.head_path(path).read_text())["seq"] == 6
    assert verify(path, KEY.public_key()).ok


async def test_two_writers_share_one_chain(tmp_path: Path) -> None:
    """A CLI writer and the server writer interleave without forking the chain."""
    path = tmp_path / "audit.jsonl"
    server = AuditLog(path, signing_key=KEY, checkpoint_every=4)
    cli = AuditLog(path, signing_key=KEY, checkpoint_every=4)
    for i in range(10):
        await server.write(decision(i))
        cli.append({"event": "explain", "n": i})
    cli.close_sync()
    await server.write(decision(99))
    await server.close()
    result = verify(path, KEY.public_key())
    assert result.ok, result
    assert result.records == len(lines_of(path))


@pytest.mark.peer
async def test_separate_processes_share_one_chain(tmp_path: Path) -> None:
    """CLI processes appending while the server writes (and rotates) keep one chain."""
    import subprocess
    import sys

    path = tmp_path / "audit.jsonl"
    script = (
        "import sys; from proxy.audit import AuditLog; "
        "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as K\n"
        "key = K.from_private_bytes(bytes(range(32)))\n"
        "opts = dict(signing_key=key, checkpoint_every=9, rotate_bytes=20000)\n"
        "with AuditLog(sys.argv[1], **opts) as a:\n"
        "    for i in range(150): a.append({'event': 'explain', 'i': i})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path)]) for _ in range(2)]
    server = AuditLog(path, signing_key=KEY, checkpoint_every=25, rotate_bytes=20000)
    for batch in range(10):
        await asyncio.gather(*(server.write(decision(batch * 30 + i)) for i in range(30)))
        await asyncio.sleep(0.01)
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    await server.close()
    result = verify(path, KEY.public_key())
    assert result.ok, result
    assert len(list(query(path, event="explain"))) == 300
    assert len(list(query(path))) == 600


# -- query and formats ------------------------------------------------------------------


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    make_log(path, 40, every=10, rotate_bytes=6000)
    assert audit.rotated_files(path)
    return path


def test_query_filters(populated: Path) -> None:
    everything = list(query(populated))
    assert len(everything) == 40 and all(r["event"] == "decision" for r in everything)
    assert len(list(query(populated, event="checkpoint"))) >= 4

    by_user = list(query(populated, user="U1@C.EXAMPLE"))
    assert by_user and all(r["user"] == "u1@c.example" for r in by_user)
    assert [r["user"] for r in query(populated, user="zoë@corp.example")] == ["Zoë@corp.example"]
    assert all(r["device_id"] == "dev-2" for r in query(populated, device="dev-2"))
    denies = list(query(populated, decision="deny"))
    assert len(denies) == 14 and all(r["decision"] == "deny" for r in denies)
    assert len(list(query(populated, protocol="smtp", decision="allow"))) == 13

    first_ts = datetime.fromisoformat(everything[0]["ts"])
    since = first_ts + timedelta(seconds=10)
    window = list(query(populated, since=since, until=since + timedelta(seconds=5)))
    assert window and all(
        since <= datetime.fromisoformat(r["ts"]) < since + timedelta(seconds=5) for r in window
    )
    naive = since.replace(tzinfo=None)  # naive datetimes are UTC
    assert list(query(populated, since=naive)) == list(query(populated, since=since))


def test_format_json(populated: Path) -> None:
    out = io.StringIO()
    records = list(query(populated, decision="deny"))
    assert format_records(records, "json", out) == len(records)
    assert [json.loads(x) for x in out.getvalue().splitlines()] == records


def test_format_csv(populated: Path) -> None:
    out = io.StringIO()
    format_records(query(populated, decision="deny"), "csv", out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows and rows[0]["reasons"] == "prohibited_app"
    assert set(audit.CSV_COLUMNS) == set(rows[0])
    out = io.StringIO()
    format_records([{"event": "decision", "reasons": [{"code": "a"}, "b"]}], "csv", out)
    assert next(iter(csv.DictReader(io.StringIO(out.getvalue()))))["reasons"] == "a;b"


def test_format_table(populated: Path) -> None:
    out = io.StringIO()
    format_records(query(populated, user="u0@c.example"), "table", out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == list(audit.TABLE_COLUMNS)
    column = lines[0].index("event")
    assert all(line[column:].startswith("decision") for line in lines[1:])
    assert any("prohibited_app" in line for line in lines)


def test_parse_time() -> None:
    now = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
    assert parse_time("2025-06-01T10:00:00Z") == datetime(2025, 6, 1, 10, tzinfo=UTC)
    assert parse_time("2025-06-01T12:00:00+02:00") == datetime(2025, 6, 1, 10, tzinfo=UTC)
    assert parse_time("2025-06-01") == datetime(2025, 6, 1, tzinfo=UTC)
    assert parse_time("7d", now=now) == now - timedelta(days=7)
    assert parse_time("24h", now=now) == now - timedelta(hours=24)
    assert parse_time("30m", now=now) == now - timedelta(minutes=30)
    assert parse_time("7d").tzinfo is not None
    for bad in ("yesterday", "", "7x", "2025-13-01"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_key_loaders_match_cryptography(tmp_path: Path) -> None:
    """The fast Ed25519 PEM loaders give the same keys as cryptography's loaders, and
    refuse a key of another type."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from proxy.audit import load_signing_key, load_verify_key

    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    priv.write_bytes(KEY.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    assert load_signing_key(priv).private_bytes_raw() == KEY.private_bytes_raw()
    assert load_verify_key(pub).public_bytes_raw() == KEY.public_key().public_bytes_raw()
    other = tmp_path / "ec.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ValueError):
        load_signing_key(other)


# -- building the log from configuration --------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
MAILWARD = Path(sys.executable).with_name("mailward")


@functools.cache
def other_keys() -> dict[str, bytes]:
    """PKCS#8 PEM private keys of the types the audit key must not be."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    return {"ec": pem(ec.generate_private_key(ec.SECP256R1())),
            "rsa": pem(rsa.generate_private_key(65537, 2048)),
            "garbage": b"not a key\n"}


def config_with_key(root: Path, name: str, key_file: str) -> Path:
    """``config/<name>.toml``: the shipped config with ``[audit] signing_key = key_file``."""
    (root / "config").mkdir(exist_ok=True)
    for shipped in ("mailward.toml", "policy.toml"):
        if not (root / "config" / shipped).exists():
            shutil.copy(ROOT / "config" / shipped, root / "config" / shipped)
    text = (ROOT / "config/mailward.toml").read_text()
    assert '"certs/audit-signing.key"' in text
    path = root / "config" / f"{name}.toml"
    path.write_text(text.replace('"certs/audit-signing.key"', f'"{key_file}"'))
    return path


WHAT = {"ec": "holds an EC (secp256r1) key", "rsa": "holds an RSA-2048 key",
        "garbage": "does not hold an unencrypted PEM private key",
        "missing": "file not found"}


@pytest.mark.pure
@pytest.mark.parametrize("kind", sorted(WHAT))
def test_open_audit_log_refuses_a_key_that_is_not_ed25519(tmp_path: Path, kind: str) -> None:
    """open_audit_log raises ConfigError, one line naming the config and the key file,
    when the signing key is missing or not an Ed25519 PKCS#8 PEM key."""
    from proxy.config import ConfigError, load_config

    keys = other_keys()
    (tmp_path / "certs").mkdir()
    if kind in keys:
        (tmp_path / "certs" / f"{kind}.key").write_bytes(keys[kind])
    cfg_path = config_with_key(tmp_path, kind, f"certs/{kind}.key")
    with pytest.raises(ConfigError) as caught:
        open_audit_log(load_config(cfg_path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{cfg_path}: audit.signing_key: ")
    assert str(tmp_path / "certs" / f"{kind}.key") in message and WHAT[kind] in message
    assert not (tmp_path / "state").exists()  # refused before touching the log


@pytest.mark.pure
def test_open_audit_log_signs_with_the_configured_key(tmp_path: Path) -> None:
    """open_audit_log builds the log [audit] describes, its checkpoints signed with the
    configured Ed25519 key; signing_key = "" gives unsigned checkpoints."""
    from cryptography.hazmat.primitives import serialization

    from proxy.config import load_config

    (tmp_path / "certs").mkdir()
    (tmp_path / "certs/audit.key").write_bytes(KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with open_audit_log(load_config(config_with_key(tmp_path, "good", "certs/audit.key"))) as log:
        log.append(decision(1))
    assert verify(tmp_path / "state/audit.jsonl", KEY.public_key()).ok
    unsigned = config_with_key(tmp_path, "unsigned", "")
    unsigned.write_text(unsigned.read_text().replace("state/audit.jsonl", "state/u.jsonl"))
    with open_audit_log(load_config(unsigned)) as log:
        log.append(decision(1))
    checkpoint = json.loads(lines_of(tmp_path / "state/u.jsonl")[-1])
    assert checkpoint["event"] == "checkpoint" and "sig" not in checkpoint


@pytest.fixture(scope="module")
def deploy_wrong_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployment root with fresh certs (`mailward certs init`) and configs naming an
    EC and an RSA key as the audit signing key."""
    root = tmp_path_factory.mktemp("deploy")
    config_with_key(root, "mailward", "certs/audit-signing.key")
    r = subprocess.run([str(MAILWARD), "certs", "init", "--dir", "certs"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for kind, pem in other_keys().items():
        (root / "certs" / f"{kind}.key").write_bytes(pem)
        config_with_key(root, kind, f"certs/{kind}.key")
    return root


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["ec", "rsa"])
@pytest.mark.parametrize("command", [
    ("serve",),
    ("check-config",),
    ("explain", "--user", "alice@corp.example", "--device", "phone-1"),
])
def test_commands_refuse_a_non_ed25519_audit_key(
    deploy_wrong_keys: Path, kind: str, command: tuple[str, ...]
) -> None:
    """serve, check-config and explain with an EC or RSA audit signing key print one
    line naming the key file and exit 2, without a traceback."""
    root = deploy_wrong_keys
    cfg = root / "config" / f"{kind}.toml"
    r = subprocess.run([str(MAILWARD), *command], cwd=root, capture_output=True, text=True,
                       timeout=30, env={**os.environ, "MAILWARD_CONFIG": str(cfg)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"mailward: {cfg}: audit.signing_key: {root}/certs/{kind}.key "
                               f"{WHAT[kind]}; ")
    assert "Ed25519" in lines[0]
