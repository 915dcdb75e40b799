"""DESIGN "Limits" on the SMTP submission listener, with real clients against a real
Postfix: the failed-login throttle, `mailward limits reset`, the per-address
connection cap, the pre-auth idle timeout and a burst of silent connections."""

from __future__ import annotations

import base64
import smtplib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import limits_frontends as lf
import pytest
from peers import peer_missing
from peers.postfix import PeerUnavailable, PostfixSubmission
from test_smtp import ALICE, PASSWORD, Env, Pki, pki  # noqa: F401  (pki: a fixture)

pytestmark = pytest.mark.peer

NAME = "submission-limits"


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixSubmission]:
    try:
        peer = lf.FastFailPostfix.start()
    except PeerUnavailable as exc:
        peer_missing(f"Postfix peer unavailable: {exc}")
    with peer:
        yield peer


@pytest.fixture
async def env(pki: Pki, postfix: PostfixSubmission,  # noqa: F811
              tmp_path: Path) -> AsyncIterator[Env]:
    async for e in lf.limited(Env(pki, tmp_path, postfix.ca_pem), ALICE):
        yield e


def attempt_on(port: int, pki: Pki) -> lf.Attempt:  # noqa: F811
    def attempt(ip: str, user: str, password: str, device: str | None) -> tuple[bool, float]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(ip, 0)) as s:
            s.ehlo("phone.example")
            s.starttls(context=pki.client_ctx(device))
            s.ehlo("phone.example")
            plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            started = time.monotonic()
            code, _ = s.docmd("AUTH", "PLAIN " + plain)
            return code == 235, time.monotonic() - started
    return attempt


async def test_wrong_passwords_delay_the_pair_not_others(
        env: Env, pki: Pki, postfix: PostfixSubmission) -> None:  # noqa: F811
    """After auth_failures wrong passwords from one address the next 535 waits;
    another address and a device certificate do not; the right password still works."""
    port = await env.listen(postfix.submission_port, name=NAME, unidentified="allow")
    await lf.check_throttle(attempt_on(port, pki), env.observer,  # type: ignore[attr-defined]
                            NAME, ALICE, PASSWORD[ALICE])


async def test_limits_reset_clears_the_delay(
        env: Env, pki: Pki, postfix: PostfixSubmission, tmp_path: Path) -> None:  # noqa: F811
    """`mailward limits reset --user` in another process ends an SMTP pair's delay."""
    port = await env.listen(postfix.submission_port, name=NAME, unidentified="allow")
    config, state = lf.reset_config(tmp_path)
    await lf.check_reset(attempt_on(port, pki), env.gate, env.audit, state, config, ALICE)


async def test_connection_cap_idle_goodbye_and_burst(
        env: Env, postfix: PostfixSubmission) -> None:
    """The (cap+1)-th connection from an address is refused, a silent client gets
    421 at the idle limit, and a burst of silent clients is greeted."""
    port = await env.listen(postfix.submission_port, name=NAME, preauth_idle_timeout_s=1.5)
    await lf.check_burst_greeted(port, b"220 ")
    await lf.check_connection_cap(port, b"220 ", env.observer,  # type: ignore[attr-defined]
                                  NAME)
    await lf.check_idle_goodbye(port, b"220 ", b"421 ")
