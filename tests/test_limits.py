"""Abuse limits (DESIGN "Limits"): the pure counters of proxy.net.limits by tables,
the accept loop refusing over-limit connections, the reset feed of
`mailward limits reset`, and the server's upkeep (abuse summaries, audit probe)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from proxy.config import LimitsConfig, load_config
from proxy.net import memory
from proxy.net.limits import MAX_SUMMARIES, Limits, client_key
from proxy.net.limits_reset import ResetFeed, request_reset
from proxy.net.socket_transport import SocketServer, SocketTransport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(**cfg: Any) -> tuple[Limits, Clock, list[tuple[str, str]]]:
    clock, hits = Clock(), []
    lim = Limits(LimitsConfig(**cfg), clock=clock, on_hit=lambda a, b: hits.append((a, b)))
    return lim, clock, hits


@pytest.mark.pure
@pytest.mark.parametrize(("ip", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("[2001:db8::1]", "2001:db8::/64"),
    ("not-an-ip", "not-an-ip"),
])
def test_client_key_groups_ipv6_by_64(ip: str, key: str) -> None:
    """IPv6 clients count by /64, IPv4-mapped as IPv4, IPv4 as is."""
    assert client_key(ip) == key


@pytest.mark.pure
def test_connections_per_address_are_capped_and_released() -> None:
    """Over max_connections_per_ip a connection is refused (and the hit counted);
    a close or a verified device certificate frees its place, once."""
    lim, _, hits = limits(max_connections_per_ip=2)
    a, b = lim.connection_opened("2001:db8::1", "imaps"), lim.connection_opened(
        "2001:db8::2", "imaps")  # same /64
    assert a and b and lim.connection_opened("2001:db8::3", "imaps") is None
    assert hits == [("max_connections_per_ip", "imaps")]
    assert lim.connection_opened("2001:db8::3", "smtps") is not None  # per listener
    a.verified()
    a.close()  # no double release
    assert lim.connections("2001:db8::9", "imaps") == 1
    assert lim.connection_opened("2001:db8::3", "imaps") is not None
    assert lim.connection_opened("2001:db8::3", "imaps") is None


@pytest.mark.pure
def test_exempt_addresses_are_never_limited() -> None:
    """[limits] exempt CIDRs skip the connection cap, login delay and API rate."""
    lim, _, hits = limits(max_connections_per_ip=1, api_rate_burst=1, auth_failures=1,
                          exempt=("10.0.0.0/8",))
    assert all(lim.connection_opened("10.1.2.3", "imaps") for _ in range(5))
    assert all(lim.api_request("10.1.2.3") == 0 for _ in range(5))
    assert all(lim.auth_failed("u", "10.1.2.3", "imaps") == 0 for _ in range(5))
    assert hits == []


@pytest.mark.pure
def test_handshakes_in_progress_are_capped() -> None:
    """At max_handshakes in progress the next connection may not start one; a failed
    handshake counts as abuse of its address."""
    lim, _, hits = limits(max_handshakes=2)
    lim.handshake_started("imaps")
    lim.handshake_started("imaps")
    assert not lim.may_handshake("imaps", "192.0.2.1")
    assert lim.may_handshake("smtps", "192.0.2.1")
    lim.handshake_finished("imaps", "192.0.2.1", ok=False)
    assert lim.may_handshake("imaps", "192.0.2.1") and lim.handshakes("imaps") == 1
    assert hits == [("max_handshakes", "imaps")]
    (summary,) = lim.abuse_summaries()
    assert summary["client_ip"] == "192.0.2.1"
    assert summary["counts"] == {"failed_handshake": 1}


@pytest.mark.pure
def test_failed_logins_wait_doubling_after_five_then_reset_on_success() -> None:
    """Per (user, address): five failures answer at once, then 2, 4, 8, 16, 30, 30 s
    (no lockout); other users and addresses are not delayed; success clears it."""
    lim, _, hits = limits()
    delays = [lim.auth_failed("Ceo@corp", "192.0.2.1", "imaps") for _ in range(11)]
    assert delays == [0, 0, 0, 0, 0, 2, 4, 8, 16, 30, 30]
    assert lim.auth_wait("ceo@corp", "192.0.2.1") == 30
    assert lim.auth_wait("ceo@corp", "192.0.2.2") == 0
    assert lim.auth_wait("cfo@corp", "192.0.2.1") == 0
    assert len(hits) == 6 and set(hits) == {("auth_delay", "imaps")}
    lim.auth_succeeded("ceo@corp", "192.0.2.1")
    assert lim.auth_wait("ceo@corp", "192.0.2.1") == 0


@pytest.mark.pure
def test_failure_window_expires() -> None:
    """Failures older than auth_failures_window (15 min) no longer count."""
    lim, clock, _ = limits()
    for _ in range(6):
        lim.auth_failed("u", "192.0.2.1", "smtp")
    assert lim.auth_wait("u", "192.0.2.1") == 4
    clock.now += 901
    assert lim.auth_wait("u", "192.0.2.1") == 0
    assert lim.auth_failed("u", "192.0.2.1", "smtp") == 0


@pytest.mark.pure
def test_verified_device_is_not_delayed_by_its_address() -> None:
    """A client with a verified device certificate counts per (user, device): a flood
    of failures for the same user from its NAT address never delays it."""
    lim, _, _ = limits()
    for _ in range(20):
        lim.auth_failed("ceo@corp", "198.51.100.1", "eas")
    assert lim.auth_wait("ceo@corp", "198.51.100.1") == 30
    assert lim.auth_wait("ceo@corp", "198.51.100.1", device="PHONE-1") == 0
    assert lim.auth_failed("ceo@corp", "198.51.100.1", "eas", device="PHONE-1") == 0


@pytest.mark.pure
def test_reset_by_user_or_address() -> None:
    """`limits reset --user` clears the user on every address; `--ip` every user of
    the address (and its API bucket)."""
    lim, _, _ = limits(api_rate_burst=1)
    for ip in ("192.0.2.1", "192.0.2.2"):
        for user in ("a", "b"):
            lim.auth_failed(user, ip, "imaps")
    assert lim.reset(user="A") == 2
    assert lim.auth_failures("b", "192.0.2.1") == 1
    lim.api_request("192.0.2.1")
    assert lim.api_request("192.0.2.1") > 0
    assert lim.reset(ip="192.0.2.1") == 1
    assert lim.api_request("192.0.2.1") == 0
    assert lim.auth_failures("b", "192.0.2.2") == 1


@pytest.mark.pure
def test_api_token_bucket() -> None:
    """api_rate_per_ip with its burst: the burst passes, then a wait of 1/rate."""
    lim, clock, hits = limits(api_rate_per_ip=50, api_rate_burst=100)
    assert [lim.api_request("192.0.2.1") for _ in range(100)] == [0] * 100
    assert lim.api_request("192.0.2.1") == pytest.approx(0.02)
    assert lim.api_request("192.0.2.2") == 0  # another address
    clock.now += 0.1
    assert [lim.api_request("192.0.2.1") for _ in range(5)] == [0] * 5
    assert lim.api_request("192.0.2.1") > 0
    assert hits.count(("api_rate_per_ip", "api")) == 2


@pytest.mark.pure
def test_outstanding_nonces_per_address_and_total() -> None:
    """At most max_outstanding_nonces per address and in total; a used or expired
    nonce frees its place."""
    lim, clock, hits = limits(max_outstanding_nonces=2, max_outstanding_nonces_total=3)
    for n in ("n1", "n2"):
        assert lim.nonce_allowed("192.0.2.1")
        lim.nonce_issued("192.0.2.1", n, 300)
    assert not lim.nonce_allowed("192.0.2.1")
    assert lim.nonce_allowed("192.0.2.2")
    lim.nonce_issued("192.0.2.2", "n3", 300)
    assert not lim.nonce_allowed("192.0.2.3")  # the total
    lim.nonce_used("n1")
    assert lim.nonce_allowed("192.0.2.1") and lim.outstanding_nonces() == 2
    clock.now += 301
    assert lim.outstanding_nonces() == 0
    assert hits.count(("max_outstanding_nonces", "api")) == 2


@pytest.mark.pure
def test_abuse_summaries_one_per_address_capped_per_minute() -> None:
    """One abuse_summary per address per flush, at most MAX_SUMMARIES in all: the
    rest are folded into one record for "*"; a flush drains the counts."""
    lim, _, _ = limits()
    for i in range(MAX_SUMMARIES + 500):
        ip = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        lim.abuse(ip, "report_malformed", "api")
        lim.abuse(ip, "report_malformed", "api")
    out = lim.abuse_summaries()
    assert len(out) == MAX_SUMMARIES
    assert all(r["event"] == "abuse_summary" for r in out)
    assert out[0]["counts"] == {"report_malformed": 2} and out[0]["total"] == 2
    assert out[-1]["client_ip"] == "*" and out[-1]["addresses"] == 501
    assert out[-1]["total"] == 2 * 501
    assert lim.abuse_summaries() == []


@pytest.mark.pure
def test_trimmer_trims_after_a_large_drop() -> None:
    """malloc_trim is due once the connection count fell by the threshold from its
    peak, and then not again until the next drop."""
    t = memory.Trimmer(drop=100)
    assert [t.observe(n) for n in (0, 50, 2000, 1950, 1899)] == [False] * 4 + [True]
    assert t.observe(1850) is False  # the peak restarted at 1899


# ------------------------------------------------------------------ accept loop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"hello\r\n")


def _greeted_or_refused(port: int) -> str:
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        data = s.recv(16)
        return "greeted" if data == b"hello\r\n" else "closed"
    except ConnectionResetError:
        return "refused"
    finally:
        s.close()


@pytest.mark.conversation
async def test_accept_loop_refuses_over_the_per_address_cap() -> None:
    """Every connection is greeted or refused at once: the ones over
    max_connections_per_ip are reset; a closed connection frees its place."""
    lim = Limits(LimitsConfig(max_connections_per_ip=3))
    loop = asyncio.get_running_loop()
    transports: list[SocketTransport] = []
    server = SocketServer(loop, lambda s: transports.append(SocketTransport(loop, s, Echo())),
                          "127.0.0.1", 0, limits=lim, listener="smtp")
    try:
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
        await asyncio.sleep(0.2)
        results = []
        for s in socks:
            s.settimeout(2)
            try:
                results.append("greeted" if s.recv(16) == b"hello\r\n" else "closed")
            except ConnectionResetError:
                results.append("refused")
        assert results.count("greeted") == 3 and results.count("refused") == 2
        assert lim.connections("127.0.0.1", "smtp") == 3
        transports[0].close()
        await asyncio.sleep(0.1)
        assert lim.connections("127.0.0.1", "smtp") == 2
        got = await asyncio.to_thread(_greeted_or_refused, server.port)
        assert got == "greeted"
        for s in socks:
            s.close()
    finally:
        server.close()
        for t in transports:
            t.abort()


@pytest.mark.conversation
async def test_accept_loop_refuses_while_handshakes_are_at_the_cap() -> None:
    """With max_handshakes TLS handshakes in progress (silent clients), the next
    connection is refused at once instead of waiting; a failed handshake is counted
    as abuse and frees the slot."""
    import trustme

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("localhost").configure_cert(ctx)
    lim = Limits(LimitsConfig(max_handshakes=2))
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    async def handshake(t: SocketTransport) -> None:
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            await t.start_tls(ctx, server_side=True, timeout=0.5)

    def accept(s: socket.socket) -> None:
        t = SocketTransport(loop, s, asyncio.Protocol(), start_reading=False)
        tasks.append(loop.create_task(handshake(t)))

    server = SocketServer(loop, accept, "127.0.0.1", 0, limits=lim, listener="imaps")
    try:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert lim.handshakes("imaps") == 2
        third = socket.create_connection(("127.0.0.1", server.port))
        third.settimeout(2)
        await asyncio.sleep(0.1)
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(third.recv, 1)
        await asyncio.gather(*tasks)  # the silent ones time out
        assert lim.handshakes("imaps") == 0
        assert lim.connections("127.0.0.1", "imaps") == 0
        (summary,) = lim.abuse_summaries()
        assert summary["counts"] == {"failed_handshake": 2}
        for s in [*silent, third]:
            s.close()
    finally:
        server.close()


# ------------------------------------------------------------------ reset feed, upkeep


@pytest.mark.conversation
def test_limits_reset_cli_reaches_the_server_feed(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`mailward limits reset --user U` in another process is read by the server's
    feed (which skips what was written before it started) and clears the user."""
    (tmp_path / "config").mkdir()
    cfg = tmp_path / "config" / "mailward.toml"
    cfg.write_text('[server]\nstate_dir = "state"\n')
    state = load_config(cfg).server.state_dir
    request_reset(state, user="old@corp", ip=None, actor="t")  # before the server
    feed = ResetFeed(state)
    assert main(["limits", "reset", "--user", "CEO@corp", "--config", str(cfg)]) == 0
    assert main(["limits", "reset", "--ip", "192.0.2.1", "--config", str(cfg)]) == 0
    assert main(["limits", "reset", "--ip", "nope", "--config", str(cfg)]) == 2
    items = feed.poll()
    assert [(i["user"], i["ip"]) for i in items] == [("CEO@corp", None), (None, "192.0.2.1")]
    assert feed.poll() == []
    lim = Limits()
    for _ in range(7):
        lim.auth_failed("ceo@corp", "198.51.100.7", "imaps")
    assert lim.reset(user=items[0]["user"]) == 1
    assert lim.auth_wait("ceo@corp", "198.51.100.7") == 0
    capsys.readouterr()


@pytest.mark.conversation
async def test_upkeep_applies_resets_and_writes_abuse_summaries(tmp_path: Path) -> None:
    """The server's upkeep applies a CLI reset within a tick and turns abuse counts
    into abuse_summary records through the gate."""
    from proxy.gate import Gate, NullObserver
    from proxy.upkeep import Upkeep

    records: list[dict[str, Any]] = []

    class Audit:
        healthy = True

        async def write(self, fields: dict[str, Any]) -> dict[str, Any]:
            records.append(fields)
            return fields

    gate = Gate(store=object(), audit=Audit(), policy=lambda: None,  # type: ignore[arg-type,return-value]
                observer=NullObserver())
    upkeep = Upkeep(gate, Audit(), tmp_path)
    for _ in range(8):
        gate.limits.auth_failed("ceo@corp", "192.0.2.9", "eas")
    gate.limits.abuse("192.0.2.9", "report_malformed", "api")
    request_reset(tmp_path, user=None, ip="192.0.2.9", actor="t")
    upkeep.tick()
    assert gate.limits.auth_wait("ceo@corp", "192.0.2.9") == 0
    assert await upkeep.flush_abuse() == 1
    assert records[0]["event"] == "abuse_summary"
    assert records[0]["counts"] == {"report_malformed": 1}


@pytest.mark.conversation
async def test_readyz_audit_recovers_within_seconds_after_the_disk_is_writable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit log fails (ENOSPC injected into the writer's file layer, as a full
    disk would), then the failure is removed: with the default checkpoint interval
    (60 s) the upkeep's probe makes it healthy again within 5 s, without any
    decision being written. (The injection replaces the writer's write_all; a real
    full tmpfs is not available here.)"""
    import errno

    from proxy.audit import AuditLog, AuditUnavailable
    from proxy.audit import writer as audit_writer
    from proxy.gate import Gate, NullObserver
    from proxy.upkeep import Upkeep

    log = AuditLog(tmp_path / "audit.jsonl", signing_key=None)
    await log.start()
    real = audit_writer.write_all

    def full(*_a: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_writer, "write_all", full)
    with pytest.raises(AuditUnavailable):
        await log.write({"event": "session_end", "reason": "test"})
    assert not log.healthy
    gate = Gate(store=object(), audit=log, policy=lambda: None,  # type: ignore[arg-type,return-value]
                observer=NullObserver())
    task = asyncio.get_running_loop().create_task(Upkeep(gate, log, tmp_path).run())
    try:
        await asyncio.sleep(1.2)
        assert not log.healthy  # still full: stays red
        monkeypatch.setattr(audit_writer, "write_all", real)
        freed = time.monotonic()
        while not log.healthy and time.monotonic() - freed < 5:
            await asyncio.sleep(0.1)
        assert log.healthy
    finally:
        task.cancel()
        await log.close()
