"""The limit scenarios every mail listener must pass (IMAP, POP3, SMTP), driven by
real clients against the real peers; each test_limits_frontends_<protocol>.py
supplies its listener and a blocking login attempt (:data:`Attempt`).

Timings are asserted as lower bounds and orderings only: a throttled answer waits
at least ``auth_delay``; an unthrottled one is faster than that (the delay is a
generous 1 s so a loaded machine does not blur the two).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from unittest import mock

from peers.dovecot import Dovecot
from peers.postfix import PostfixSubmission
from pki_helpers import fresh_posture as posture

from proxy.config import LimitsConfig
from proxy.metrics import PrometheusObserver
from proxy.net.limits import Limits
from proxy.upkeep import Upkeep

#: Small limits, so tests reach them: the third failure of a pair waits AUTH_DELAY_S.
AUTH_DELAY_S = 1.0
CAP = 3
LIMITS = LimitsConfig(auth_failures=2, auth_delay_s=AUTH_DELAY_S, auth_delay_max_s=AUTH_DELAY_S,
                      max_connections_per_ip=CAP)
#: Clients bind these loopback addresses: two "addresses" on one machine.
IP_A, IP_B = "127.0.0.2", "127.0.0.3"

#: (source address, user, password, device or None) -> (accepted?, seconds to the answer)
Attempt = Callable[[str, str, str, "str | None"], tuple[bool, float]]


class FastFailDovecot(Dovecot):
    """Dovecot without its own delays for wrong passwords (the 2 s
    ``auth_failure_delay`` and the per-address auth penalty, disabled as its
    documentation says), so only mailward's throttle delays an answer."""

    def _write_config(self) -> Path:
        path = super()._write_config()
        path.write_text(_no_penalty(path.read_text()) + "\nauth_failure_delay = 0\n")
        return path


class FastFailPostfix(PostfixSubmission):
    """Postfix whose SASL Dovecot has no per-address auth penalty (see
    :class:`FastFailDovecot`; its ``auth_failure_delay`` is already 0)."""

    def _start_dovecot(self) -> None:
        write_text = Path.write_text

        def without_penalty(path: Path, data: str, *args: Any, **kwargs: Any) -> int:
            if path.name == "dovecot.conf":
                data = _no_penalty(data)
            return write_text(path, data, *args, **kwargs)

        with mock.patch.object(Path, "write_text", without_penalty):
            super()._start_dovecot()


def _no_penalty(conf: str) -> str:
    anvil = "service anvil {\n"
    assert anvil in conf
    return conf.replace(anvil, anvil + "  unix_listener anvil-auth-penalty {\n"
                        "    mode = 0\n  }\n", 1)


def install_limits(gate: Any) -> PrometheusObserver:
    """Give ``gate`` the small :data:`LIMITS`, counted in Prometheus (before listening)."""
    observer = PrometheusObserver()
    gate.limits = Limits(LIMITS, on_hit=observer.limit_hit)
    return observer


async def limited(env: Any, user: str) -> AsyncIterator[Any]:
    """A protocol test module's ``Env`` with :data:`LIMITS` (``env.observer`` counts
    the hits) and a compliant ``alice-phone`` of ``user``, closed afterwards."""
    await env.put(posture("alice-phone", user))
    env.observer = install_limits(env.gate)
    yield env
    await env.close()


def hits(observer: PrometheusObserver, limit: str, listener: str) -> float:
    """``mailward_limit_hits_total{limit,listener}`` as ``/metrics`` shows it."""
    body = observer.expose()[0].decode()
    for line in body.splitlines():
        if (line.startswith("mailward_limit_hits_total{")
                and f'limit="{limit}"' in line and f'listener="{listener}"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def connect(port: int, ip: str = IP_A, timeout: float = 20) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(ip, 0))


def tls_connect(port: int, ctx: ssl.SSLContext, ip: str = IP_A) -> ssl.SSLSocket:
    return ctx.wrap_socket(connect(port, ip), server_hostname="localhost")


def timed_lines(s: socket.socket, request: bytes, done: Callable[[bytes], bool]) -> \
        tuple[bytes, float]:
    """Send ``request``; the first line ``done`` accepts, and the seconds it took."""
    f = s.makefile("rb")
    started = time.monotonic()
    s.sendall(request)
    while True:
        line = f.readline()
        if not line or done(line):
            return line, time.monotonic() - started


async def attempt(fn: Attempt, ip: str, user: str, password: str,
                  device: str | None = None) -> tuple[bool, float]:
    return await asyncio.to_thread(fn, ip, user, password, device)


async def check_throttle(fn: Attempt, observer: PrometheusObserver, listener: str,
                         user: str, password: str) -> None:
    """After ``auth_failures`` wrong passwords from one address the next answer to that
    (user, address) waits; another address and a verified device certificate do not;
    the right password still works, only later; every delay is a metric hit."""
    for _ in range(LIMITS.auth_failures):
        assert (await attempt(fn, IP_A, user, "wrong"))[0] is False
    ok, took = await attempt(fn, IP_A, user, "wrong")
    assert not ok and took >= AUTH_DELAY_S, took
    ok, other = await attempt(fn, IP_B, user, "wrong")
    assert not ok and other < AUTH_DELAY_S, other
    ok, device = await attempt(fn, IP_A, user, password, "alice-phone")
    assert ok and device < AUTH_DELAY_S, device
    ok, later = await attempt(fn, IP_A, user, password)
    assert ok and later >= AUTH_DELAY_S, later  # no lockout
    ok, cleared = await attempt(fn, IP_A, user, "wrong")  # the success cleared the pair
    assert not ok and cleared < AUTH_DELAY_S, cleared
    assert hits(observer, "auth_delay", listener) >= 2


async def check_reset(fn: Attempt, gate: Any, audit: Any, state_dir: Path, config: Path,
                      user: str) -> None:
    """``mailward limits reset --user U`` (another process) reaches the running
    listener through the state directory within a second: no more delay."""
    upkeep = Upkeep(gate, audit, state_dir)
    task = asyncio.create_task(upkeep.run())
    try:
        for _ in range(LIMITS.auth_failures):
            await attempt(fn, IP_A, user, "wrong")
        assert gate.limits.auth_wait(user, IP_A) >= AUTH_DELAY_S
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "limits", "reset", "--user", user,
            "--config", str(config), stdout=subprocess.DEVNULL)
        assert await proc.wait() == 0
        deadline = time.monotonic() + 3
        while gate.limits.auth_wait(user, IP_A) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gate.limits.auth_wait(user, IP_A) == 0
        ok, took = await attempt(fn, IP_A, user, "wrong")
        assert not ok and took < AUTH_DELAY_S, took
    finally:
        task.cancel()


def reset_config(tmp: Path) -> tuple[Path, Path]:
    """A mailward.toml whose state directory is ``tmp/state``: (config, state_dir)."""
    state = tmp / "state"
    cfg = tmp / "mailward.toml"
    cfg.write_text(f'[server]\nstate_dir = "{state}"\n')
    return cfg, state


def read_greeting(s: socket.socket) -> bytes:
    try:
        return s.makefile("rb").readline()
    except (ConnectionError, TimeoutError, OSError):
        return b""


def greeting_on_new_connection(port: int, ip: str = IP_A) -> bytes:
    """The first line a new connection from ``ip`` is sent; b"" when it is closed
    without a word. A refused connection is reset at once (``listener._refuse``), and a
    busy client may see that reset already in ``connect`` (the handshake completed, the
    RST came before the thread read the socket's error), so a reset there is a refusal
    too."""
    try:
        s = connect(port, ip, timeout=5)
    except ConnectionResetError:
        return b""
    with s:
        return read_greeting(s)


async def check_connection_cap(port: int, greeting: bytes, observer: PrometheusObserver,
                               listener: str) -> None:
    """The per-address cap refuses the (CAP+1)-th connection at once; another address
    and a freed place are served."""
    def go() -> None:
        held = [connect(port) for _ in range(CAP)]
        try:
            assert all(read_greeting(s).startswith(greeting) for s in held)
            assert greeting_on_new_connection(port) == b""  # closed without a word
            assert greeting_on_new_connection(port, IP_B).startswith(greeting)
            held.pop().close()
            deadline = time.monotonic() + 5
            while True:  # the server notices the close
                line = greeting_on_new_connection(port)
                if line.startswith(greeting) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert line.startswith(greeting)
        finally:
            for s in held:
                s.close()

    await asyncio.to_thread(go)
    assert hits(observer, "max_connections_per_ip", listener) >= 1


async def check_idle_goodbye(port: int, greeting: bytes, goodbye: bytes) -> None:
    """A silent client is sent the protocol's goodbye after the pre-auth idle time,
    and the connection is closed."""
    def go() -> tuple[bytes, bytes, bytes]:
        with connect(port, timeout=10) as s:
            f = s.makefile("rb")
            return f.readline(), f.readline(), f.read()

    first, last, rest = await asyncio.to_thread(go)
    assert first.startswith(greeting)
    assert last.startswith(goodbye), last
    assert rest == b""


async def check_burst_greeted(port: int, greeting: bytes, n: int = 60) -> None:
    """A burst of silent connections: each one is greeted (or refused at once), none
    is left waiting."""
    def go() -> list[bytes]:
        socks = []
        try:
            for i in range(n):
                socks.append(connect(port, f"127.0.1.{i + 1}", timeout=10))
            return [read_greeting(s) for s in socks]
        finally:
            for s in socks:
                s.close()

    lines = await asyncio.to_thread(go)
    assert all(line.startswith(greeting) for line in lines), lines
