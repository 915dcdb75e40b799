"""DESIGN "Limits" on the POP3 listener, with real clients against a real Dovecot:
the failed-login throttle, `mailward limits reset`, the per-address connection cap,
the pre-auth idle timeout and a burst of silent connections."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import limits_frontends as lf
import pytest
from peers import peer_missing
from peers.dovecot import require_dovecot
from test_pop3 import ALICE, PASSWORDS, Env, Pki, pki  # noqa: F401  (pki: a fixture)

pytestmark = pytest.mark.peer

NAME = "pop3s-limits"


@pytest.fixture(scope="module")
def dovecot(pki: Pki) -> Iterator[lf.FastFailDovecot]:  # noqa: F811
    require_dovecot()
    if not os.path.exists("/usr/lib/dovecot/pop3-login"):
        peer_missing("Dovecot POP3 is not installed (Debian package dovecot-pop3d; `make peers`)")
    with lf.FastFailDovecot(pki.dir / "server.pem", pki.dir / "server.key", PASSWORDS,
                            pop3=True) as dv:
        yield dv


@pytest.fixture
async def env(pki: Pki, dovecot: lf.FastFailDovecot,  # noqa: F811
              tmp_path: Path) -> AsyncIterator[Env]:
    async for e in lf.limited(Env(pki, dovecot, tmp_path), ALICE):
        yield e


def attempt_on(port: int, pki: Pki) -> lf.Attempt:  # noqa: F811
    def attempt(ip: str, user: str, password: str, device: str | None) -> tuple[bool, float]:
        with lf.tls_connect(port, pki.client_ctx(device), ip) as s:
            f = s.makefile("rb")
            f.readline()  # greeting
            s.sendall(f"USER {user}\r\n".encode())
            assert f.readline().startswith(b"+OK")
            line, took = lf.timed_lines(s, f"PASS {password}\r\n".encode(), lambda b: True)
            return line.startswith(b"+OK"), took
    return attempt


async def test_wrong_passwords_delay_the_pair_not_others(env: Env, pki: Pki) -> None:  # noqa: F811
    """After auth_failures wrong passwords from one address the next POP3 answer waits;
    another address and a device certificate do not; the right password still works."""
    port = await env.listen(name=NAME, unidentified="allow")
    await lf.check_throttle(attempt_on(port, pki), env.observer,  # type: ignore[attr-defined]
                            NAME, ALICE, PASSWORDS[ALICE])


async def test_limits_reset_clears_the_delay(env: Env, pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """`mailward limits reset --user` in another process ends a POP3 pair's delay."""
    port = await env.listen(name=NAME, unidentified="allow")
    config, state = lf.reset_config(tmp_path)
    await lf.check_reset(attempt_on(port, pki), env.gate, env.audit, state, config, ALICE)


async def test_connection_cap_idle_goodbye_and_burst(env: Env) -> None:
    """STLS listener: the (cap+1)-th connection from an address is refused, a silent
    client gets `-ERR` at the idle limit, and a burst of silent clients is greeted."""
    port = await env.listen(name=NAME, tls="starttls", preauth_idle_timeout_s=1.5)
    await lf.check_burst_greeted(port, b"+OK")
    await lf.check_connection_cap(port, b"+OK", env.observer,  # type: ignore[attr-defined]
                                  NAME)
    await lf.check_idle_goodbye(port, b"+OK", b"-ERR")
