"""SMTP submission throughput: directly to Postfix vs through mailward, in one run.

10 concurrent clients send 10 KB messages over STARTTLS with AUTH PLAIN to a
throw-away Postfix (Dovecot SASL, Maildir delivery; ``tests/peers/postfix.py``), once
straight to Postfix and once through an in-process mailward SMTP listener on uvloop
(real gate, SQLite posture store, fsync'd audit log, device client certificate).
Two workloads:

- ``per-connection``: each message on a fresh connection (TLS, AUTH, one message,
  QUIT), which is what a phone does and what exercises the gate per message;
- ``session``: each client keeps one authenticated session and sends message after
  message (a laptop client or a mail merge).

The clients run in a separate process so they do not steal the proxy's CPU. Direct
and proxied runs alternate; the median of the rounds is reported for each (and the
best), then the ratio of the medians proxied/direct (target >= 0.7), and the proxy's
own CPU per message (median of the rounds), which shared machines disturb least.

    .venv/bin/python bench/smtp.py [--seconds 4] [--rounds 3] [--clients 10]
        [--modes per-connection session] [--proxy-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MESSAGE_BYTES = 10 * 1024
USER, PASSWORD, RCPT = "alice@example.test", "alice-secret", "bob@example.test"


def make_message() -> bytes:
    head = (f"From: {USER}\r\nTo: {RCPT}\r\nSubject: bench\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@bench>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuv\r\n"
    body = line * ((MESSAGE_BYTES - len(head)) // len(line) + 1)
    return head + body[: MESSAGE_BYTES - len(head)]


# ------------------------------------------------------------------ client process


async def _client_run(args: argparse.Namespace) -> dict[str, Any]:
    import aiosmtplib

    ctx = ssl.create_default_context(cafile=args.ca)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    msg = make_message()
    deadline = time.monotonic() + args.seconds
    sent = errors = 0

    def client() -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(hostname="127.0.0.1", port=args.port, start_tls=True,
                               tls_context=ctx, local_hostname="bench.example", timeout=30)

    async def per_connection() -> None:
        nonlocal sent, errors
        while time.monotonic() < deadline:
            try:
                async with client() as s:
                    await s.login(USER, PASSWORD)
                    await s.sendmail(USER, [RCPT], msg)
                sent += 1
            except aiosmtplib.SMTPException:
                errors += 1

    async def session() -> None:
        nonlocal sent, errors
        async with client() as s:
            await s.login(USER, PASSWORD)
            while time.monotonic() < deadline:
                try:
                    await s.sendmail(USER, [RCPT], msg)
                    sent += 1
                except aiosmtplib.SMTPResponseException:
                    errors += 1

    worker = per_connection if args.mode == "per-connection" else session
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    elapsed = time.monotonic() - started
    return {"sent": sent, "errors": errors, "elapsed": elapsed, "rate": sent / elapsed}


def client_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", default="")
    p.add_argument("--key", default="")
    p.add_argument("--mode", choices=("per-connection", "session"), required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--clients", type=int, required=True)
    args = p.parse_args(argv)
    import uvloop

    print(json.dumps(uvloop.run(_client_run(args))))


async def run_clients(port: int, ca: Path, mode: str, seconds: float, clients: int,
                      device: tuple[Path, Path] | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--client", "--port", str(port), "--ca", str(ca),
           "--mode", mode, "--seconds", str(seconds), "--clients", str(clients)]
    if device:
        cmd += ["--cert", str(device[0]), "--key", str(device[1])]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"client process failed ({proc.returncode})")
    return dict(json.loads(out))


# ------------------------------------------------------------------ proxy + peer


async def bench(args: argparse.Namespace) -> None:
    from peers.postfix import PostfixSubmission

    from proxy.audit import AuditLog
    from proxy.config import ListenerConfig, load_policy
    from proxy.frontends import FrontendContext
    from proxy.frontends import smtp as smtp_frontend
    from proxy.gate import Gate
    from proxy.net.tls import server_context, upstream_context
    from proxy.pki import certs_init, enroll_device
    from proxy.posture import App, Posture
    from proxy.posture.sqlite import SqlitePostureStore

    tmp = Path(tempfile.mkdtemp(prefix="mailward-bench-smtp-"))
    pki = tmp / "pki"
    certs_init(pki)
    device = enroll_device(device_ca_cert=pki / "device-ca.pem",
                           device_ca_key=pki / "offline" / "device-ca.key", device_id="bench-phone",
                           user=USER, out_dir=pki / "devices" / "bench-phone")
    key_path, cert_path = device
    postfix = await asyncio.to_thread(PostfixSubmission.start)
    store = SqlitePostureStore(tmp / "posture.db")
    audit = AuditLog(tmp / "audit.jsonl", signing_key=None)
    await audit.start()
    try:
        now = int(time.time())
        await store.commit_attestation(Posture(
            device_id="bench-phone", user=USER, platform="android", os_version="14",
            managed=True, apps=(App("com.example.notes", "1.0", "Notes"),), iat=now,
            exp=now + 86400, jti=uuid.uuid4().hex, issuer="bench", attested_by="device",
        ), None, time.time())
        policy = load_policy(ROOT / "config" / "policy.toml")
        gate = Gate(store=store, audit=audit, policy=lambda: policy)
        cfg = ListenerConfig(
            name="submission", protocol="smtp", host="127.0.0.1", port=0,
            upstream=f"127.0.0.1:{postfix.submission_port}", tls="starttls",
            client_cert="optional", upstream_tls="starttls", upstream_ca=postfix.ca_pem)
        ctx = FrontendContext(
            listener=cfg, gate=gate,
            server_tls=server_context(pki / "server.pem", pki / "server.key",
                                      client_ca=pki / "device-ca.pem"),
            upstream_tls=upstream_context(postfix.ca_pem))
        listener = await smtp_frontend.start(ctx)
        print(f"SMTP submission, {args.clients} concurrent clients, "
              f"{MESSAGE_BYTES // 1024} KB messages, STARTTLS + AUTH PLAIN, "
              f"{args.seconds:g} s per run, median of {args.rounds}")
        ratios = []
        for mode in args.modes:
            rates: dict[str, list[float]] = {"direct": [], "mailward": []}
            errors, cpu_ms = 0, []
            for _ in range(args.rounds):
                for name, port, ca, dev in (
                    ("direct", postfix.submission_port, postfix.ca_pem, None),
                    ("mailward", listener.port, pki / "ca.pem", (cert_path, key_path)),
                ):
                    if name == "direct" and args.proxy_only:
                        continue
                    cpu = time.process_time()
                    r = await run_clients(port, ca, mode, args.seconds, args.clients, dev)
                    if name == "mailward" and r["sent"]:  # the proxy's own CPU
                        cpu_ms.append(1000 * (time.process_time() - cpu) / r["sent"])
                    rates[name].append(r["rate"])
                    errors += r["errors"]
            med = {k: statistics.median(v) if v else 0.0 for k, v in rates.items()}
            ratio = med["mailward"] / med["direct"] if med["direct"] else 0.0
            ratios.append(ratio)
            per_msg = f"{statistics.median(cpu_ms):.2f}" if cpu_ms else "-"
            print(f"  {mode:15s} direct {med['direct']:8.1f} msg/s   "
                  f"mailward {med['mailward']:8.1f} msg/s   ratio {ratio:.2f}x   "
                  f"(proxy CPU {per_msg} ms/msg; best {max(rates['mailward']):.1f} msg/s)"
                  + (f"   ({errors} errors)" if errors else ""))
        await listener.close(1.0)
        print(f"ratio (worst workload): {min(ratios):.2f}x direct (target >= 0.70); "
              f"{os.cpu_count()} CPUs shared by clients, Postfix, Dovecot and mailward")
    finally:
        await audit.close()
        await store.close()
        await asyncio.to_thread(postfix.stop)


def main() -> None:
    if "--client" in sys.argv:
        client_main([a for a in sys.argv[1:] if a != "--client"])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--modes", nargs="+", choices=("per-connection", "session"),
                   default=["per-connection", "session"])
    p.add_argument("--proxy-only", action="store_true",
                   help="skip the direct runs (for profiling the proxy)")
    args = p.parse_args()
    from peers.postfix import missing_reason

    reason = missing_reason()
    if reason:
        print(f"bench/smtp.py: skipped: {reason}")
        return
    import uvloop

    uvloop.run(bench(args))


if __name__ == "__main__":
    main()
