"""IMAP logins through mailward against a real Dovecot: SASL mechanisms (LOGIN, and
XOAUTH2 / OAUTHBEARER verified by Dovecot's ``oauth2`` passdb against a local
introspection endpoint), the refusal reason on screen for clients that retry, and
Dovecot's auth penalty applying to the phone's address (``ID x-originating-ip`` from a
``login_trusted_networks`` address).
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from peers.dovecot import Dovecot, require_dovecot
from pki_helpers import fresh_posture as posture
from test_imap import ALICE, BOB, PASSWORDS, TIKTOK, Env, Pki, imaps, pki, run

pytestmark = pytest.mark.peer
RUN_ON_BOTH_LOOPS = False  # Dovecot's timing is measured here, once is enough

__all__ = ["pki"]  # a fixture, shared with test_imap

#: Dovecot delays an address's logins up to 15 s (AUTH_PENALTY_MAX_SECS) plus 2 s.
UPSTREAM_TIMEOUT_S = 30.0
#: Bearer tokens the introspection endpoint knows, and whose they are.
TOKENS = {"alice-token": ALICE, "bob-token": BOB}


class _Introspection(BaseHTTPRequestHandler):
    """RFC 7662 token introspection: ``POST token=...`` -> ``{"active", "username"}``."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        token = urllib.parse.parse_qs(body).get("token", [""])[0]
        user = TOKENS.get(token)
        answer = {"active": "true", "username": user} if user else {"active": "false"}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def dovecot(pki: Pki) -> Iterator[Dovecot]:
    """A Dovecot of this module's own (its auth penalties start empty) with token logins."""
    require_dovecot()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Introspection)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}/introspect"
    dv = Dovecot(pki.dir / "server.pem", pki.dir / "server.key", PASSWORDS,
                 oauth2_introspection_url=url)
    try:
        with dv:
            yield dv
    finally:
        http.shutdown()


@pytest.fixture
async def env(pki: Pki, dovecot: Dovecot, tmp_path: Path) -> AsyncIterator[Env]:
    """Listeners wait for Dovecot's answers as long as its auth penalty may last."""
    e = Env(pki, dovecot, tmp_path)
    listen = e.listen
    e.listen = lambda **kw: listen(**{"upstream_timeout_s": UPSTREAM_TIMEOUT_S, **kw})
    await e.put(posture("alice-phone", ALICE))
    await e.put(posture("alice-tiktok", ALICE, (TIKTOK,)))
    yield e
    await e.close()


def connect(pki: Pki, port: int, device: str = "alice-phone",
            source: str = "127.0.0.1") -> tuple[ssl.SSLSocket, object]:
    """A TLS connection from ``source`` (a loopback address), greeting read."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30,
                                   source_address=(source, 0))
    s = pki.client_ctx(device).wrap_socket(raw, server_hostname="localhost")
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    return s, f


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str) -> bytes:
    return f"n,a={user},\x01host=localhost\x01port=993\x01auth=Bearer {token}\x01\x01".encode()


# ------------------------------------------------------------------------ mechanisms


async def test_imaplib_authenticate_login_through_mailward(env: Env, pki: Pki):
    """The upstream offers AUTH=LOGIN, so mailward does: imaplib's AUTHENTICATE LOGIN
    logs in (Username:/Password: prompts) and the session works."""
    port = await env.listen()
    prompts: list[bytes] = []

    def answer(challenge: bytes) -> bytes:
        prompts.append(challenge)
        return ALICE.encode() if challenge == b"Username:" else PASSWORDS[ALICE].encode()

    def go() -> tuple[str, tuple[str, ...]]:
        m = imaps(pki, port)
        caps = m.capabilities
        typ, _ = m.authenticate("LOGIN", answer)
        m.select("INBOX")
        m.logout()
        return typ, caps

    typ, caps = await run(go)
    assert typ == "OK" and "AUTH=LOGIN" in caps and "AUTH=PLAIN" in caps
    assert prompts == [b"Username:", b"Password:"]
    recs = await env.wait_records(1, "decision")
    assert [(r["decision"], r["user"]) for r in recs] == [("allow", ALICE)]


async def test_xoauth2_and_oauthbearer_verified_by_dovecot(env: Env, pki: Pki):
    """Dovecot offers XOAUTH2 and OAUTHBEARER, so mailward does; a valid token logs in
    (imaplib's XOAUTH2 after a continuation, OAUTHBEARER with SASL-IR); an unknown
    token and another user's token are refused by Dovecot (auth_failed records)."""
    port = await env.listen()

    def go() -> list[bytes]:
        m = imaps(pki, port)
        assert {"AUTH=XOAUTH2", "AUTH=OAUTHBEARER"} <= set(m.capabilities)
        assert m.authenticate("XOAUTH2", lambda _: xoauth2(ALICE, "alice-token"))[0] == "OK"
        m.logout()
        answers = []
        for message in (oauthbearer(ALICE, "alice-token"), oauthbearer(ALICE, "nope"),
                        xoauth2(ALICE, "bob-token")):
            s, f = connect(pki, port, source="127.0.0.4")  # its own auth penalty
            s.sendall(b"a AUTHENTICATE " + (b"OAUTHBEARER " if message[:1] == b"n" else
                      b"XOAUTH2 ") + base64.b64encode(message) + b"\r\n")
            answers.append(f.readline())
            s.close()
        return answers

    ok, unknown, borrowed = await run(go)
    assert ok.startswith(b"a OK"), ok
    assert unknown.startswith(b"a NO"), unknown
    assert borrowed.startswith(b"a NO"), borrowed
    recs = await env.wait_records(4, "decision")
    assert [(r["decision"], r["user"], [x["code"] for x in r["reasons"]]) for r in recs] == [
        ("allow", ALICE, []), ("allow", ALICE, []), ("deny", ALICE, ["auth_failed"]),
        ("deny", ALICE, ["auth_failed"])]
    text = (env.tmp / "audit.jsonl").read_text()
    assert "alice-token" not in text and "bob-token" not in text


# ------------------------------------------------------------------ refusal on screen


async def test_client_retrying_after_a_refusal_still_reads_the_reason_in_bye(env: Env,
                                                                            pki: Pki):
    """A client that tries LOGIN again on the same connection after the refusal (as
    neomutt does) reads a BYE naming the reason; one decision record, for the attempt."""
    port = await env.listen()

    def go() -> tuple[bytes, list[bytes]]:
        s, f = connect(pki, port, device="alice-tiktok")
        s.sendall(f"t1 LOGIN {ALICE} {PASSWORDS[ALICE]}\r\n".encode())
        lines = [f.readline(), f.readline()]
        assert lines[1].startswith(b"t1 NO [AUTHORIZATIONFAILED]"), lines
        with contextlib.suppress(OSError):  # mailward may have closed: BYE came first
            s.sendall(f"t2 LOGIN {ALICE} {PASSWORDS[ALICE]}\r\n".encode())
        rest = f.read().splitlines(keepends=True)
        s.close()
        return lines[0], rest

    alert, rest = await run(go)
    reason = alert.removeprefix(b"* NO [ALERT] ").rstrip(b"\r\n")
    assert b"TikTok" in reason
    assert rest == [b"* BYE " + reason + b"\r\n"]  # the last line the client shows
    recs = await env.wait_records(1, "decision")
    assert len(recs) == 1 and recs[0]["decision"] == "deny"
    assert [x["code"] for x in recs[0]["reasons"]] == ["prohibited_app"]
    assert env.records("session_end") == []


# ----------------------------------------------------------------- auth penalty


def _wrong_login_time(pki: Pki, port: int, source: str) -> float:
    """Seconds from a wrong LOGIN to its NO, on a new connection from ``source``."""
    s, f = connect(pki, port, source=source)
    start = time.monotonic()
    s.sendall(f"a LOGIN {ALICE} wrong-password\r\n".encode())
    line = f.readline()
    elapsed = time.monotonic() - start
    assert line.startswith(b"a NO"), line
    s.close()
    return elapsed


async def test_dovecot_auth_penalty_applies_to_the_phones_address(env: Env, pki: Pki):
    """Through mailward, Dovecot's growing delay after wrong passwords applies to the
    phone's address (127.0.0.2), not to another phone's (127.0.0.3), although both
    reach Dovecot from mailward's 127.0.0.1; Dovecot logs the phone's address."""
    port = await env.listen()

    def go() -> tuple[list[float], float]:
        phone = [_wrong_login_time(pki, port, "127.0.0.2") for _ in range(2)]
        other = _wrong_login_time(pki, port, "127.0.0.3")
        return phone, other

    phone, other = await run(go)
    # Measured: phone 1.5 s then 6.0 s (Dovecot's 2 s initial penalty plus its failure
    # delay), the other phone 2.0 s; as Dovecot answers those addresses directly.
    assert phone[1] >= 3.0 and phone[1] > phone[0] + 1.5, phone
    assert other < phone[1] - 1.5, (phone, other)
    log = env.dovecot.log_tail(200000)
    assert "rip=127.0.0.2" in log and "rip=127.0.0.3" in log
    recs = await env.wait_records(3, "decision")
    assert [(r["client_ip"], [x["code"] for x in r["reasons"]]) for r in recs] == [
        ("127.0.0.2", ["auth_failed"])] * 2 + [("127.0.0.3", ["auth_failed"])]
