"""Audit you can trust without trusting the disk: coverage by signed checkpoints,
recovery after a crash, witnessed heads, rotated keys, retention (issue 12)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from helpers.serve import free_port, serve, wait_serving  # `mailward serve` as the image runs it
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from proxy import audit
from proxy.audit import AuditLog, Witness, read_witness_file, record_hash, verify
from proxy.audit.command import fingerprint
from proxy.cli import main

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NEW_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUB = KEY.public_key()
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.conversation


def decision(i: int, verdict: str = "deny") -> dict[str, Any]:
    return {"event": "decision", "decision": verdict, "user": f"u{i}@corp.example",
            "device_id": f"dev-{i}", "reasons": [{"code": "prohibited_app"}]}


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(audit.canonical_json(r) + "\n" for r in records))


def rechain(records: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    """What an attacker without the key can do: recompute seq, prev and hash from
    ``start`` on, so the chain is consistent again."""
    out = [dict(r) for r in records]
    for i in range(start, len(out)):
        out[i]["seq"] = i + 1 if i == 0 else out[i - 1]["seq"] + 1
        out[i]["prev"] = audit.ZERO_HASH if i == 0 else out[i - 1]["hash"]
        out[i]["hash"] = record_hash(out[i])
    return out


def crash(log: AuditLog) -> None:
    """What SIGKILL leaves of a writer: its lines as written, no final checkpoint,
    its locks released."""
    for fd in (log._fd, log._lock_fd, log._live_fd):
        if fd is not None:
            os.close(fd)
    log._fd = log._lock_fd = log._live_fd = None
    log._closed = True


def save_witness(path: Path, logs: Sequence[Mapping[str, Any]]) -> Path:
    """The operational log lines as a SIEM keeps them: a syslog prefix, other lines
    in between."""
    with path.open("a") as f:
        for entry in logs:
            f.write("Jun 15 10:00:00 mail1 mailward[4242]: " + json.dumps(dict(entry)) + "\n")
            f.write('{"event": "listening", "listener": "imaps"}\nplain text line\n')
    return path


def pem(key: Ed25519PublicKey, path: Path) -> Path:
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["audit", "verify", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- coverage ---------------------------------------------------------------------------


def test_rewrite_without_checkpoints_fails(tmp_path: Path) -> None:
    """Stripping every checkpoint, turning denies into allows, re-chaining and deleting
    .head leaves records no signed checkpoint covers: verify fails."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY, checkpoint_every=5) as log:
        for i in range(12):
            log.append(decision(i))
    forged = [{**r, "decision": "allow"} for r in lines_of(path) if r["event"] != "checkpoint"]
    write_lines(path, rechain(forged))
    audit.head_path(path).unlink()
    result = verify(path, PUB)
    assert not result.ok and result.bad_line == 1
    assert "no checkpoint" in (result.error or "")


def test_unsealed_tail_longer_than_checkpoint_every_fails(tmp_path: Path) -> None:
    """Up to checkpoint_every records after the last checkpoint pass (a crash can leave
    them); one more fails."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY, checkpoint_every=5) as log:
        log.append(decision(0))
    sealed = lines_of(path)
    for extra, ok in ((5, True), (6, False)):
        write_lines(path, rechain(sealed + [decision(i) for i in range(extra)], len(sealed)))
        result = verify(path, PUB)
        assert result.ok is ok, result
    assert result.bad_line == len(sealed) + 1 and "checkpoint_every (5)" in (result.error or "")


def test_checkpoint_every_cannot_be_raised_without_the_key(tmp_path: Path) -> None:
    """The checkpoint_every a checkpoint announces is signed: raising it breaks the signature."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY, checkpoint_every=5) as log:
        log.append(decision(0))
    records = lines_of(path)
    records[-1]["checkpoint_every"] = 10_000
    records = rechain(records, len(records) - 1)
    write_lines(path, records)
    audit.head_path(path).write_text(audit.canonical_json(records[-1]) + "\n")
    result = verify(path, PUB)
    assert not result.ok and "signature" in (result.error or "")


# -- crashes ----------------------------------------------------------------------------


def test_crash_then_start_seals_the_tail_with_a_recovery_checkpoint(tmp_path: Path) -> None:
    """After a crash the next writer seals the unsealed tail with a recovery checkpoint
    naming the previous seal and the count; verify passes and reports the range,
    --strict fails on it."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, signing_key=KEY, checkpoint_every=10)
    log.append(decision(0))
    sealed = log.checkpoint()
    for i in range(3):
        log.append(decision(i))
    crash(log)
    before = verify(path, PUB)
    assert before.ok and before.unsealed == 3  # as a crash can leave it
    with AuditLog(path, signing_key=KEY, checkpoint_every=10):
        pass
    cp = lines_of(path)[-1]
    assert cp["event"] == "checkpoint" and cp["recovery"] is True
    assert (cp["previous_head_seq"], cp["previous_head"], cp["sealed"]) == \
        (sealed["seq"], sealed["hash"], 3)
    result = verify(path, PUB)
    assert result.ok and result.recovered == ((3, 5),), result
    strict = verify(path, PUB, strict=True)
    assert not strict.ok and "sealed after a crash" in (strict.error or "")
    assert strict.bad_line == 6


def test_live_writer_tail_is_not_sealed_as_a_crash(tmp_path: Path) -> None:
    """A second writer opening while the first is alive leaves its tail alone."""
    path = tmp_path / "audit.jsonl"
    server = AuditLog(path, signing_key=KEY)
    server.append(decision(0))
    with AuditLog(path, signing_key=KEY) as cli_log:
        assert cli_log.seq == 1
        cli_log.append({"event": "explain"})
    assert not [r for r in lines_of(path) if r.get("recovery")]
    server.close_sync()
    assert verify(path, PUB).ok


async def test_edited_tail_signed_at_restart_is_caught(tmp_path: Path) -> None:
    """An attacker edits the unsealed tail and forces a restart: the recovery
    checkpoint signs it, but --strict fails and the witnessed heads contradict it."""
    path = tmp_path / "audit.jsonl"
    with capture_logs() as logs:
        log = AuditLog(path, signing_key=KEY, witness=Witness(), instance="mail1")
        await log.write(decision(0))
        log.checkpoint()
        for i in range(4):
            await log.write(decision(i))
    crash(log)
    witness = read_witness_file(save_witness(tmp_path / "siem.log", logs))
    records = lines_of(path)
    records[-2]["decision"] = "allow"
    write_lines(path, rechain(records, len(records) - 2))
    with AuditLog(path, signing_key=KEY, instance="mail1"):
        pass
    assert verify(path, PUB).ok and verify(path, PUB).recovered == ((3, 6),)
    assert not verify(path, PUB, strict=True).ok
    caught = verify(path, PUB, witness=witness)
    assert not caught.ok and "differs from the head witnessed" in (caught.error or "")
    assert caught.bad_line == 5


def test_recovery_beyond_checkpoint_every_fails(tmp_path: Path) -> None:
    """A recovery checkpoint sealing more records than checkpoint_every is more than a
    crash explains: verify fails."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY, checkpoint_every=3) as log:
        log.append(decision(0))
    records = lines_of(path)
    write_lines(path, rechain(records + [decision(i) for i in range(8)], len(records)))
    with AuditLog(path, signing_key=KEY, checkpoint_every=3):
        pass
    assert lines_of(path)[-1]["sealed"] == 8
    result = verify(path, PUB)
    assert not result.ok and "more than a crash" in (result.error or "")


WRITER = """
import sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from proxy.audit import AuditLog
log = AuditLog(sys.argv[1], signing_key=Ed25519PrivateKey.from_private_bytes(bytes(range(32))),
               checkpoint_every=10_000)
i = 0
while True:
    log.append({"event": "decision", "decision": "allow", "i": i})
    i += 1
    if i == 20:
        print("ready", flush=True)
"""


@pytest.mark.peer
def test_sigkill_mid_writes_then_restart_recovers(tmp_path: Path) -> None:
    """A writer process killed with SIGKILL mid-writes: the next writer's start-up
    seals its tail with a recovery checkpoint and the log verifies."""
    path = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with AuditLog(path, signing_key=KEY, checkpoint_every=10_000):
        pass
    result = verify(path, PUB)
    assert result.ok, result
    last = lines_of(path)[-1]
    assert last["recovery"] is True and last["sealed"] == last["seq"] - 1 >= 20
    assert result.recovered == ((1, last["seq"] - 1),)
    assert not verify(path, PUB, strict=True).ok


# -- witnesses --------------------------------------------------------------------------


async def test_cut_back_to_an_earlier_checkpoint_is_caught_by_the_witness(
    tmp_path: Path,
) -> None:
    """A log cut back to an earlier signed checkpoint (copied into .head) passes verify
    alone; with --witness it fails because a witnessed checkpoint is missing."""
    path = tmp_path / "audit.jsonl"
    with capture_logs() as logs:
        log = AuditLog(path, signing_key=KEY, checkpoint_every=4, witness=Witness(),
                       instance="mail1")
        for i in range(10):
            await log.write(decision(i))
        await log.close()
    assert {e["event"] for e in logs} >= {"audit_checkpoint", "audit_head"}
    siem = save_witness(tmp_path / "siem.log", logs)
    records = lines_of(path)
    first_cp = next(r for r in records if r["event"] == "checkpoint")
    write_lines(path, records[: first_cp["seq"]])
    audit.head_path(path).write_text(audit.canonical_json(first_cp) + "\n")
    assert verify(path, PUB).ok  # the disk alone cannot tell
    result = verify(path, PUB, witness=read_witness_file(siem))
    assert not result.ok and "cut back" in (result.error or "")


async def test_witness_lines_carry_the_checkpoint(tmp_path: Path) -> None:
    """audit_checkpoint lines carry seq, hash, head, sig, key_id and instance, so the
    signature can be checked from the line alone; heads are logged per group commit."""
    path = tmp_path / "audit.jsonl"
    with capture_logs() as logs:
        log = AuditLog(path, signing_key=KEY, witness=Witness(), instance="mail1")
        await asyncio.gather(*(log.write(decision(i)) for i in range(20)))
        await log.close()
    heads = [e for e in logs if e["event"] == "audit_head"]
    assert heads and heads[-1]["seq"] == 20 and len(heads) < 20  # one per group commit
    [line] = [e for e in logs if e["event"] == "audit_checkpoint"]
    record = {k: v for k, v in line.items() if k != "log_level"} | {"event": "checkpoint"}
    assert record == lines_of(path)[-1] and record["instance"] == "mail1"
    assert record["key_id"] == fingerprint(PUB)[:16] and record_hash(record) == record["hash"]


WITNESS_ISH = st.dictionaries(
    st.sampled_from(["event", "seq", "hash", "instance", "message"]),
    st.one_of(st.integers(-2, 5), st.text(max_size=70), st.just("a" * 64),
              st.sampled_from(["audit_head", "audit_checkpoint"])),
).map(json.dumps)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=80), WITNESS_ISH), max_size=6))
def test_witness_file_reader_parses_or_raises(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str]
) -> None:
    """Any witness file either parses or raises ValueError naming the line."""
    path = tmp_path_factory.mktemp("w") / "siem.log"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        found = read_witness_file(path)
    except ValueError as exc:
        assert str(path) in str(exc)
    else:
        assert all(w.seq >= 1 and len(w.hash) == 64 for w in found)


class Receiver:
    """A witness endpoint: collects the JSON bodies POSTed to /witness."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    async def start(self, port: int) -> None:
        async def take(request: web.Request) -> web.Response:
            self.bodies.append(await request.json())
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/witness", take)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Gauge:
    def __init__(self) -> None:
        self.values: list[int] = []

    def audit_witness_pending(self, count: int) -> None:
        self.values.append(count)


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_checkpoints_are_posted_to_the_witness_url(tmp_path: Path) -> None:
    """Each checkpoint is POSTed to witness_url; a receiver that is down is retried
    until it is up, and the pending gauge goes back to 0."""
    port = free_port()
    receiver, gauge = Receiver(), Gauge()
    witness = Witness(f"http://127.0.0.1:{port}/witness", retry_initial_s=0.05,
                      retry_max_s=0.2)
    log = AuditLog(tmp_path / "audit.jsonl", signing_key=KEY, witness=witness,
                   instance="mail1")
    await log.start(gauge)
    await log.write(decision(1))
    first = log.checkpoint()
    await asyncio.sleep(0.3)  # receiver down: retried, still pending
    assert witness.pending == 1 and gauge.values[-1] == 1
    await receiver.start(port)
    try:
        await wait_for(lambda: witness.pending == 0)
        await log.write(decision(2))
        await log.close()  # the final checkpoint is delivered before close returns
    finally:
        await receiver.stop()
    assert [b["seq"] for b in receiver.bodies] == [first["seq"], first["seq"] + 2]
    assert receiver.bodies[0] == {"event": "audit_checkpoint",
                                  **{k: v for k, v in first.items() if k != "event"}}
    assert gauge.values[-1] == 0


async def test_witness_queue_is_bounded(tmp_path: Path) -> None:
    """With the witness down, the queue keeps the newest max_pending checkpoints."""
    witness = Witness(f"http://127.0.0.1:{free_port()}/w", max_pending=3,
                      retry_initial_s=5.0)
    log = AuditLog(tmp_path / "audit.jsonl", signing_key=KEY, witness=witness)
    for i in range(5):
        log.append(decision(i))
        log.checkpoint()
    assert witness.pending == 3 and witness.dropped == 2
    log.close_sync()


# -- keys, retention, several logs: the CLI ----------------------------------------------


def test_rotated_keys_verify_by_key_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A log signed first with one key and then another verifies with both --key,
    printing the fingerprints; with only one key it fails naming the other key_id."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY) as log:
        log.append(decision(1))
    with AuditLog(path, signing_key=NEW_KEY) as log:
        log.append(decision(2))
    old, new = pem(PUB, tmp_path / "old.pub"), pem(NEW_KEY.public_key(), tmp_path / "new.pub")
    rc, out, err = cli(capsys, "--log", str(path), "--key", str(old), "--key", str(new))
    assert rc == 0, err
    assert fingerprint(PUB) in out and fingerprint(NEW_KEY.public_key()) in out
    assert f"{fingerprint(PUB)[:16]}, {fingerprint(NEW_KEY.public_key())[:16]}" in out \
        or f"{fingerprint(NEW_KEY.public_key())[:16]}, {fingerprint(PUB)[:16]}" in out
    rc, out, err = cli(capsys, "--log", str(path), "--key", str(old))
    assert rc == 1 and fingerprint(NEW_KEY.public_key())[:16] in err


def test_key_fingerprint_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--key-fingerprint: a pin no given key matches cannot verify (exit 2); a matching
    pin for a key that did not sign the log fails it (exit 1); no key at all exits 2."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY) as log:
        log.append(decision(1))
    old, new = pem(PUB, tmp_path / "old.pub"), pem(NEW_KEY.public_key(), tmp_path / "new.pub")
    fp_old, fp_new = fingerprint(PUB), fingerprint(NEW_KEY.public_key())
    assert cli(capsys, "--log", str(path), "--key", str(old), "--key-fingerprint", fp_old)[0] == 0
    rc, _, err = cli(capsys, "--log", str(path), "--key", str(old), "--key-fingerprint", fp_new)
    assert rc == 2 and "cannot verify" in err
    rc, _, err = cli(capsys, "--log", str(path), "--key", str(old), "--key", str(new),
                     "--key-fingerprint", fp_new[:16])
    assert rc == 1 and "key_id" in err
    rc, _, err = cli(capsys, "--log", str(path), "--config", str(tmp_path / "none.toml"))
    assert rc == 2 and "without the checkpoint public key" in err


def test_from_checkpoint_after_retention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the oldest rotated files deleted verify fails, and --from-checkpoint SEQ
    (a signed checkpoint in what is left) verifies the rest; a seq that is not a
    checkpoint or was deleted fails."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=KEY, checkpoint_every=5, rotate_bytes=2500) as log:
        for i in range(60):
            log.append(decision(i))
    rotated = audit.rotated_files(path)
    assert len(rotated) >= 3
    for old in rotated[:2]:
        old.unlink()
    key = str(pem(PUB, tmp_path / "k.pub"))
    assert cli(capsys, "--log", str(path), "--key", key)[0] == 1
    kept = lines_of(rotated[2])
    cp = next(r for r in kept if r["event"] == "checkpoint")
    rc, _, err = cli(capsys, "--log", str(path), "--key", key, "--from-checkpoint",
                     str(cp["seq"]))
    assert rc == 0, err
    rc, _, err = cli(capsys, "--log", str(path), "--key", key, "--from-checkpoint",
                     str(cp["seq"] - 1))
    assert rc == 1 and "not a checkpoint" in err
    rc, _, err = cli(capsys, "--log", str(path), "--key", key, "--from-checkpoint",
                     str(kept[0]["seq"] - 1))
    assert rc == 1 and "deleted" in err


async def test_several_logs_verify_separately_against_one_witness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two instances' logs and one SIEM file: each log is checked against its own
    instance's lines, and only the cut-back one fails."""
    paths = {}
    with capture_logs() as logs:
        for name in ("mail1", "mail2"):
            paths[name] = tmp_path / f"{name}.jsonl"
            log = AuditLog(paths[name], signing_key=KEY, checkpoint_every=3,
                           witness=Witness(), instance=name)
            for i in range(8):
                await log.write(decision(i))
            await log.close()
    siem = save_witness(tmp_path / "siem.log", logs)
    key = str(pem(PUB, tmp_path / "k.pub"))
    argv = ["--log", str(paths["mail1"]), "--log", str(paths["mail2"]), "--key", key,
            "--witness", str(siem)]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    assert out.count(": ok,") == 2 and "heads match" in out
    records = lines_of(paths["mail2"])
    cps = [r for r in records if r["event"] == "checkpoint"]
    write_lines(paths["mail2"], records[: cps[0]["seq"]])
    audit.head_path(paths["mail2"]).write_text(audit.canonical_json(cps[0]) + "\n")
    rc, out, err = cli(capsys, *argv)
    assert rc == 1 and out.count(": ok,") == 1 and "mail2.jsonl" in err and "cut back" in err


# -- check-config -----------------------------------------------------------------------


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "config").mkdir()
    for name in ("mailward.toml", "policy.toml"):
        shutil.copy(ROOT / "config" / name, tmp_path / "config" / name)
    assert main(["certs", "init", "--dir", str(tmp_path / "certs")]) == 0
    yield tmp_path


def test_check_config_warns_about_a_writable_signing_key(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config prints a warning (exit 0) when the audit signing key can be written
    by the user running it (as root: by its group, others or a non-root owner)."""
    key = deployment / "certs" / "audit-signing.key"
    cfg = str(deployment / "config" / "mailward.toml")
    capsys.readouterr()
    if os.geteuid() == 0:
        key.chmod(0o440)
        assert main(["check-config", "--config", cfg]) == 0
        assert "warning:" not in capsys.readouterr().err
        key.chmod(0o660)
    assert main(["check-config", "--config", cfg]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "audit.signing_key" in err and "writable" in err


# -- mailward serve killed mid-writes ---------------------------------------------------


def http(port: int, method: str, path: str, body: bytes | None = None,
         token: str = "") -> int:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/jose"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    wait_serving(proc, lambda: http(port, "GET", "/readyz") == 200, log)


@pytest.mark.peer
def test_mailward_serve_killed_mid_writes_restarts_with_a_recovery_checkpoint(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL of `mailward serve` while it records revocations: the next start-up
    seals the tail with a recovery checkpoint; verify passes (and with the server's
    own log lines as witness), --strict fails."""
    port = free_port()
    cfg = deployment / "config" / "mailward.toml"
    cfg.write_text(f"""\
[server]
state_dir = "state"
policy = "config/policy.toml"
shutdown_grace = "1s"
instance = "mail1"

[audit]
checkpoint_every = 10000

[api]
listen = "127.0.0.1:{port}"
tls = false
""")
    logs = [deployment / "serve1.log", deployment / "serve2.log"]
    first = serve(cfg, logs[0])
    try:
        wait_ready(first, port, logs[0])
        audit_log = deployment / "state" / "audit.jsonl"
        token = (deployment / "certs" / "admin.token").read_text().strip()
        n = 0
        while len(audit_log.read_text().splitlines()) < 30:
            n += 1  # garbage reports are summarised per minute, not recorded each
            assert http(port, "POST", f"/v1/devices/lost-{n}/revoke", b"", token) == 200
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    killed_at = len(lines_of(audit_log))
    second = serve(cfg, logs[1])
    try:
        wait_ready(second, port, logs[1])
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0, logs[1].read_text()
    recovery = lines_of(audit_log)[killed_at]
    assert recovery["recovery"] is True and recovery["sealed"] >= 30
    assert recovery["instance"] == "mail1"
    capsys.readouterr()
    rc, out, err = cli(capsys, "--config", str(cfg))
    assert rc == 0, err
    assert "sealed after a crash, unwitnessed" in out
    assert cli(capsys, "--config", str(cfg), "--strict")[0] == 1
    rc, out, err = cli(capsys, "--config", str(cfg), "--witness", str(logs[0]),
                       "--witness", str(logs[1]))
    assert rc == 0 and "heads match" in out, err


def test_audit_files_are_private_to_the_service_user(tmp_path: Path) -> None:
    """The log, its sidecars and a directory the writer creates are 0600 / 0700."""
    path = tmp_path / "state" / "audit.jsonl"
    with AuditLog(path, signing_key=KEY) as log:
        log.append(decision(1))
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    for f in (path, audit.head_path(path), audit.lock_path(path)):
        assert (f.stat().st_mode & 0o777) == 0o600, f
