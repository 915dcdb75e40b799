"""POP3 front end against a real Dovecot POP3, driven by real clients (poplib, fetchmail).

The gate is the real Gate with the real SqlitePostureStore and AuditLog; postures are
put into the store directly. Device certificates come from ``proxy.pki``. Blocking
clients run in threads (or subprocesses) so the proxy can run on the test's loop.
"""

from __future__ import annotations

import asyncio
import base64
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers.frontend_env import FrontendEnv
from helpers.tls import Pki, enrolled_pki
from peers import peer_missing
from peers.dovecot import Dovecot, make_message, require_dovecot
from pki_helpers import fresh_posture as posture

from proxy.config import ListenerConfig
from proxy.frontends.pop3 import start
from proxy.posture import App

pytestmark = pytest.mark.peer
RUN_ON_BOTH_LOOPS = True  # see conftest.py

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "alice@corp.example", "bob@corp.example"
PASSWORDS = {ALICE: "alice-secret", BOB: "bob secret with spaces"}
TIKTOK = App("com.zhiliaoapp.musically", "35.1.3", "TikTok")
MESSAGES = 12
FETCHMAIL = shutil.which("fetchmail") or "/usr/bin/fetchmail"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return enrolled_pki(tmp_path_factory.mktemp("pki"),
                        (("alice-phone", ALICE), ("alice-tiktok", ALICE), ("bob-phone", BOB)))


@pytest.fixture(scope="module")
def dovecot(pki: Pki) -> Iterator[Dovecot]:
    require_dovecot()
    if not os.path.exists("/usr/lib/dovecot/pop3-login"):
        peer_missing("Dovecot POP3 is not installed (Debian package dovecot-pop3d; `make peers`)")
    dv = Dovecot(pki.dir / "server.pem", pki.dir / "server.key", PASSWORDS, pop3=True)
    with dv:
        dv.deliver(ALICE, [make_message(i, 1500 + 301 * i) for i in range(MESSAGES)])
        dv.deliver(BOB, [make_message(i, 100) for i in range(3)])
        yield dv


class Env(FrontendEnv):
    """A running POP3 listener with its gate, store and audit log."""

    def __init__(self, pki: Pki, dovecot: Dovecot, tmp: Path) -> None:
        super().__init__(pki, tmp)
        self.dovecot = dovecot

    async def listen(self, **overrides: Any) -> int:
        cfg = ListenerConfig(
            name=str(overrides.pop("name", "pop3s")), protocol="pop3", host="127.0.0.1",
            port=0, upstream=f"127.0.0.1:{self.dovecot.pop3_port_tls}", tls="implicit",
            client_cert="optional", unidentified="deny", upstream_tls="implicit",
            upstream_ca=self.pki.dir / "ca.pem", preauth_idle_timeout_s=10,
            preauth_timeout_s=30, upstream_connect_timeout_s=3, upstream_timeout_s=15,
        )
        cfg = replace(cfg, **overrides)
        return await self.start(cfg, start)


@pytest.fixture
async def env(pki: Pki, dovecot: Dovecot, tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(pki, dovecot, tmp_path)
    await e.put(posture("alice-phone", ALICE))
    await e.put(posture("alice-tiktok", ALICE, (TIKTOK,)))
    await e.put(posture("bob-phone", BOB))
    yield e
    await e.close()


def run(fn: Any, *args: Any) -> Any:
    return asyncio.to_thread(fn, *args)


def pop3s(pki: Pki, port: int, device: str | None = "alice-phone") -> poplib.POP3_SSL:
    return poplib.POP3_SSL("localhost", port, context=pki.client_ctx(device), timeout=20)


def retrieve_all(p: poplib.POP3) -> list[bytes]:
    """Every message as RETR gives it (poplib undoes the dot-stuffing), CRLF-joined."""
    count, _ = p.stat()
    return [b"\r\n".join(p.retr(i + 1)[1]) for i in range(count)]


def decisions(env: Env) -> list[tuple[str, list[str]]]:
    return [(r["decision"], [x["code"] for x in r["reasons"]])
            for r in env.records("decision")]


# ------------------------------------------------------------------------------ allow


async def test_compliant_phone_retrieves_the_same_bytes_as_directly(env: Env, pki: Pki):
    """Through mailward, poplib's RETR and UIDL give exactly what Dovecot gives directly,
    and the login is one allow record naming the certificate's device."""
    port = await env.listen()

    def go() -> tuple[tuple[list[bytes], list[bytes]], tuple[list[bytes], list[bytes]]]:
        out = []
        for p in (pop3s(pki, port),
                  poplib.POP3_SSL("localhost", env.dovecot.pop3_port_tls,
                                  context=pki.client_ctx(), timeout=20)):
            p.user(ALICE)
            p.pass_(PASSWORDS[ALICE])
            out.append((retrieve_all(p), p.uidl()[1]))
            p.quit()
        return out[0], out[1]

    through, direct = await run(go)
    assert len(through[0]) == MESSAGES
    assert through == direct
    recs = await env.wait_records(1, "decision")
    assert [(r["decision"], r["device_id"], r["protocol"]) for r in recs] == [
        ("allow", "alice-phone", "pop3")]


async def test_auth_plain_with_initial_response_and_with_continuation(env: Env, pki: Pki):
    """AUTH PLAIN works with an initial response and after the server's "+ "; a password
    with spaces passes both ways (USER/PASS too)."""
    port = await env.listen()
    cred = base64.b64encode(f"\0{BOB}\0{PASSWORDS[BOB]}".encode())

    def go() -> list[tuple[list[bytes], int]]:
        out = []
        for lines in ([b"AUTH PLAIN " + cred], [b"AUTH PLAIN", cred],
                      [f"USER {BOB}".encode(), f"PASS {PASSWORDS[BOB]}".encode()]):
            p = pop3s(pki, port, "bob-phone")
            answers = [p._shortcmd(line.decode()) for line in lines]
            out.append((answers, p.stat()[0]))
            p.quit()
        return out

    got = await run(go)
    assert got == [([b"+OK Logged in."], 3), ([b"+ ", b"+OK Logged in."], 3),
                   ([b"+OK Send PASS", b"+OK Logged in."], 3)]
    recs = await env.wait_records(3, "decision")
    assert [r["decision"] for r in recs] == ["allow"] * 3


async def test_stls_listener_refuses_cleartext_login_then_works_after_stls(env: Env, pki: Pki):
    """On a STLS listener CAPA offers STLS and no USER/SASL before TLS, USER gets
    -ERR [SYS/PERM] without an upstream or a decision, and after STLS the login works."""
    port = await env.listen(name="pop3", tls="starttls")

    def go() -> tuple[list[bytes], str, list[bytes], int]:
        p = poplib.POP3("localhost", port, timeout=20)
        caps = p._longcmd("CAPA")[1]
        with pytest.raises(poplib.error_proto) as err:
            p.user(ALICE)
        p.stls(pki.client_ctx("alice-phone"))
        caps_tls = p._longcmd("CAPA")[1]
        p.user(ALICE)
        p.pass_(PASSWORDS[ALICE])
        n = p.stat()[0]
        p.quit()
        return caps, str(err.value), caps_tls, n

    caps, refused, caps_tls, n = await run(go)
    assert b"STLS" in caps and b"USER" not in caps and not any(c.startswith(b"SASL") for c in caps)
    assert "[SYS/PERM]" in refused and "STLS" in refused
    assert b"STLS" not in caps_tls and b"USER" in caps_tls and b"SASL PLAIN" in caps_tls
    assert b"UIDL" in caps_tls and b"TOP" in caps_tls  # learnt from the upstream
    assert n == MESSAGES
    assert decisions(env) == [("allow", [])]


# ------------------------------------------------------------------------------- deny


async def test_tiktok_phone_is_refused_with_the_reason_not_asked_for_a_password(
        env: Env, pki: Pki):
    """The TikTok phone's correct password gets -ERR [SYS/PERM] naming TikTok and what to
    do (not [AUTH]), then the connection closes; one deny record prohibited_app."""
    port = await env.listen()

    def go() -> tuple[str, bytes]:
        p = pop3s(pki, port, "alice-tiktok")
        p.user(ALICE)
        with pytest.raises(poplib.error_proto) as err:
            p.pass_(PASSWORDS[ALICE])
        rest = p.file.read()
        p.close()
        return str(err.value), rest

    text, rest = await run(go)
    assert text.startswith("b'-ERR [SYS/PERM] ") and "TikTok" in text, text
    assert "Uninstall TikTok" in text and "[AUTH]" not in text
    assert rest == b""  # closed
    recs = await env.wait_records(1, "decision")
    assert decisions(env) == [("deny", ["prohibited_app"])]
    assert recs[0]["device_id"] == "alice-tiktok" and recs[0]["protocol"] == "pop3"


async def test_wrong_password_gets_dovecots_answer_and_an_auth_failed_record(
        env: Env, pki: Pki):
    """A wrong password gets Dovecot's own -ERR [AUTH] line, recorded as auth_failed;
    the client may try again on the same connection: exactly one record per attempt."""
    port = await env.listen()

    def go() -> tuple[str, int]:
        p = pop3s(pki, port)
        p.user(ALICE)
        with pytest.raises(poplib.error_proto) as err:
            p.pass_("wrong")
        p.user(ALICE)
        p.pass_(PASSWORDS[ALICE])
        n = p.stat()[0]
        p.quit()
        return str(err.value), n

    text, n = await run(go)
    assert text == "b'-ERR [AUTH] Authentication failed.'"  # Dovecot's words
    assert n == MESSAGES
    await env.wait_records(2, "decision")
    assert decisions(env) == [("deny", ["auth_failed"]), ("allow", [])]
    assert env.records("session_end") == []


async def test_unidentified_phone_denied_and_other_users_certificate_denied(
        env: Env, pki: Pki):
    """Without a certificate the default listener denies (unidentified_device); bob's
    certificate cannot log in as alice (user_mismatch); both with [SYS/PERM]."""
    port = await env.listen()

    def go() -> list[str]:
        texts = []
        for device in (None, "bob-phone"):
            p = pop3s(pki, port, device)
            p.user(ALICE)
            with pytest.raises(poplib.error_proto) as err:
                p.pass_(PASSWORDS[ALICE])
            texts.append(str(err.value))
            p.close()
        return texts

    texts = await run(go)
    assert all("-ERR [SYS/PERM]" in t for t in texts), texts
    await env.wait_records(2, "decision")
    assert decisions(env) == [("deny", ["unidentified_device"]), ("deny", ["user_mismatch"])]


async def test_upstream_down_gives_sys_temp_and_one_temporary_deny(env: Env, pki: Pki):
    """An unreachable upstream: -ERR [SYS/TEMP], the connection closes, and the attempt's
    one decision record is a temporary deny upstream_unavailable."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    port = await env.listen(upstream=f"127.0.0.1:{dead_port}")

    def go() -> tuple[str, bytes]:
        p = pop3s(pki, port)
        p.user(ALICE)
        with pytest.raises(poplib.error_proto) as err:
            p.pass_(PASSWORDS[ALICE])
        return str(err.value), p.file.read()

    text, rest = await run(go)
    assert "-ERR [SYS/TEMP]" in text and rest == b""
    recs = await env.wait_records(1, "decision")
    assert decisions(env) == [("deny", ["upstream_unavailable"])]
    assert recs[0]["client_ip"] == "127.0.0.1" and env.records("session_end") == []


# --------------------------------------------------------------------- live sessions


async def test_gate_ends_a_live_session_by_closing_and_deles_are_not_applied(
        env: Env, pki: Pki):
    """When the phone reports TikTok, the live session is closed (POP3 has no
    unsolicited responses) without QUIT upstream: a DELE it sent is not applied, and the
    next login is refused with the reason."""
    port = await env.listen()
    p = await run(pop3s, pki, port)

    def login_and_dele() -> None:
        p.user(ALICE)
        p.pass_(PASSWORDS[ALICE])
        p.dele(1)

    await run(login_and_dele)
    assert len(env.gate.live_sessions()) == 1
    await env.put(posture("alice-phone", ALICE, (TIKTOK,)))
    assert await env.gate.posture_changed("alice-phone") == 1
    assert await run(p.file.read) == b""  # closed, without a word
    ends = await env.wait_records(1, "session_end")
    assert ends[0]["reason"] == "posture_changed" and ends[0]["protocol"] == "pop3"
    assert env.gate.live_sessions() == []

    def count_and_retry() -> tuple[int, str]:
        d = poplib.POP3_SSL("localhost", env.dovecot.pop3_port_tls,
                            context=pki.client_ctx(), timeout=20)
        d.user(ALICE)
        d.pass_(PASSWORDS[ALICE])
        n = d.stat()[0]
        d.quit()
        q = pop3s(pki, port)
        q.user(ALICE)
        with pytest.raises(poplib.error_proto) as err:
            q.pass_(PASSWORDS[ALICE])
        return n, str(err.value)

    n, refused = await run(count_and_retry)
    assert n == MESSAGES  # the DELE was rolled back
    assert "[SYS/PERM]" in refused and "TikTok" in refused


async def test_listener_close_ends_live_and_preauth_sessions(env: Env, pki: Pki):
    """Closing the listener closes a live session and tells a pre-auth one
    -ERR [SYS/TEMP]; the live one gets a session_end shutdown record."""
    port = await env.listen()

    def login() -> poplib.POP3_SSL:
        p = pop3s(pki, port)
        p.user(ALICE)
        p.pass_(PASSWORDS[ALICE])
        return p

    live = await run(login)
    waiting = await run(pop3s, pki, port)
    await env.listeners.pop().close(0.1)
    assert await run(live.file.read) == b""
    assert (await run(waiting.file.read)).startswith(b"-ERR [SYS/TEMP]")
    ends = await env.wait_records(2, "session_end")
    assert sorted(r["reason"] for r in ends) == ["shutdown", "shutdown"]
    assert env.gate.live_sessions() == []


# ----------------------------------------------------------------------- adversarial


def tls_sock(pki: Pki, port: int, device: str | None = "alice-phone",
             source: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
    return pki.client_ctx(device).wrap_socket(raw, server_hostname="localhost")


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (OSError, ssl.SSLError):
            return out
        if not chunk:
            return out
        out += chunk


async def test_bytes_pipelined_after_stls_are_discarded(env: Env, pki: Pki):
    """A command injected after STLS in the same packet is never answered after TLS."""
    port = await env.listen(name="pop3", tls="starttls")

    def go() -> bytes:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"STLS\r\nUSER evil\r\n")
        assert f.readline().startswith(b"+OK")
        s = pki.client_ctx("alice-phone").wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"QUIT\r\n")
        return read_all(s)

    assert await run(go) == b"+OK Logging out\r\n"


async def test_preauth_limits_answer_err_and_close(env: Env, pki: Pki):
    """A line over 8 KiB and too many commands get -ERR and a close, each with one
    session_end record and no decision."""
    port = await env.listen(max_preauth_commands=5)

    def go() -> tuple[bytes, bytes]:
        s = tls_sock(pki, port)
        s.sendall(b"X" * 9000 + b"\r\n")
        long_line = read_all(s)
        s = tls_sock(pki, port)
        s.sendall(b"CAPA\r\n" * 6)
        many = read_all(s)
        return long_line, many

    long_line, many = await run(go)
    assert long_line.endswith(b"-ERR Command line too long\r\n")
    assert many.endswith(b"-ERR Too many commands before login\r\n")
    assert many.count(b"+OK Capability list follows") == 5
    ends = await env.wait_records(2, "session_end")
    assert sorted(r["reason"] for r in ends) == ["limit_commands", "limit_line"]
    assert env.records("decision") == []


async def test_idle_client_is_logged_out(env: Env, pki: Pki):
    """A client silent past the idle limit gets -ERR and a close (session_end)."""
    port = await env.listen(preauth_idle_timeout_s=0.5)
    got = await run(lambda: read_all(tls_sock(pki, port)))
    assert got == b"+OK mailward POP3 ready\r\n-ERR Autologout; too slow before login\r\n"
    ends = await env.wait_records(1, "session_end")
    assert ends[0]["reason"] == "idle_timeout"


async def test_dovecot_sees_the_phones_address_through_xclient(env: Env, pki: Pki):
    """Dovecot trusts the proxy (login_trusted_networks), so XCLIENT passes the phone's
    address: Dovecot's log names it, not the proxy's."""
    port = await env.listen()

    def go() -> bytes:
        s = tls_sock(pki, port, source="127.0.0.9")
        s.sendall(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\nQUIT\r\n".encode())
        return read_all(s)

    out = await run(go)
    assert out.count(b"+OK") == 4, out
    deadline = time.monotonic() + 5
    while "rip=127.0.0.9" not in env.dovecot.log_tail(20000) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert re.search(r"Login: user=<alice@corp.example>.*rip=127\.0\.0\.9",
                     env.dovecot.log_tail(20000))
    recs = await env.wait_records(1, "decision")
    assert recs[0]["client_ip"] == "127.0.0.9"


# ------------------------------------------------------------------------ fetchmail


def fetchmail(pki: Pki, port: int, device: str, out: Path) -> subprocess.CompletedProcess[str]:
    """One fetchmail run (implicit TLS, the device's certificate, keep, fetch all),
    each message delivered by an MDA into its own file under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    home = out.parent / f"{out.name}.home"
    home.mkdir(exist_ok=True)
    cert, key = pki.device(device)
    rc = home / "fetchmailrc"
    rc.write_text(
        f'poll localhost service {port} proto POP3 auth password\n'
        f'  user "{ALICE}" there with password "{PASSWORDS[ALICE]}" is "root" here\n'
        f'  options ssl sslcertck sslcertfile "{pki.dir / "ca.pem"}"\n'
        f'  sslcert "{cert}" sslkey "{key}" keep fetchall\n'
        f'  mda "cat > {out}/msg.$(date +%s%N)"\n')
    rc.chmod(0o600)
    env = {**os.environ, "FETCHMAILHOME": str(home), "HOME": str(home)}
    return subprocess.run(
        [FETCHMAIL, "-f", str(rc), "-i", str(home / "ids"), "--invisible", "--nosyslog",
         "-v"], capture_output=True, text=True, env=env, timeout=60)


def messages_in(d: Path) -> list[bytes]:
    """The delivered messages, sorted by content (delivery order is poplib's test)."""
    return sorted(p.read_bytes() for p in d.iterdir())


async def test_fetchmail_retrieves_identical_messages_and_tiktok_sees_the_reason(
        env: Env, pki: Pki, tmp_path: Path):
    """fetchmail through mailward delivers byte for byte what it delivers directly from
    Dovecot; on the TikTok phone it fails and its output carries the reason."""
    if not os.path.exists(FETCHMAIL):
        peer_missing("fetchmail is not installed (Debian package fetchmail; `make peers`)")
    port = await env.listen()
    through = await run(fetchmail, pki, port, "alice-phone", tmp_path / "through")
    direct = await run(fetchmail, pki, env.dovecot.pop3_port_tls, "alice-phone",
                       tmp_path / "direct")
    assert through.returncode == 0, through.stderr[-2000:]
    assert direct.returncode == 0, direct.stderr[-2000:]
    got = messages_in(tmp_path / "through")
    assert len(got) == MESSAGES and got == messages_in(tmp_path / "direct")
    refused = await run(fetchmail, pki, port, "alice-tiktok", tmp_path / "tiktok")
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "-ERR [SYS/PERM]" in said and "Uninstall TikTok" in said, said[-3000:]
    assert messages_in(tmp_path / "tiktok") == []
    await env.wait_records(2, "decision")
    assert decisions(env) == [("allow", []), ("deny", ["prohibited_app"])]
