"""Playbooks of the POP3 pre-auth conversation (``pop3_preauth.Preauth``), no sockets.

Each test feeds events and states the commands expected back, in order: the whole
pre-auth conversation can be read here without an executor.
"""

from __future__ import annotations

import base64

import pytest
from helpers.playbook import ALICE, ALLOW, BUSY, DENY, PHONE, PW, play

from proxy.frontends.events import (
    ClientClosed,
    Close,
    CloseUpstream,
    Connected,
    Crashed,
    DataReceived,
    DecisionMade,
    RecordAuthFailed,
    RecordUnavailable,
    RequestDecision,
    SendToClient,
    SessionEnd,
    ShutdownRequested,
    Splice,
    StartTls,
    TimedOut,
    TlsEstablished,
    TlsFailed,
    UpstreamFailed,
)
from proxy.frontends.pop3_preauth import (
    PRIVACY_TEXT,
    SHUTDOWN_TEXT,
    TIMEOUT_TEXT,
    UNAVAILABLE_TEXT,
    OpenUpstream,
    Preauth,
    UpstreamAnswered,
)
from proxy.gate import Identity

pytestmark = pytest.mark.conversation

GREETING = b"+OK mailward POP3 ready\r\n"
CAPA_TLS = (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
            b"USER\r\nSASL PLAIN\r\n.\r\n")
CAPA_PLAIN = (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
              b"STLS\r\n.\r\n")
LOGGED_IN = b"+OK Logged in.\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"


def send(*lines: bytes) -> SendToClient:
    return SendToClient(b"".join(lines))


def layer(tls_mode: str = "implicit", **kw: object) -> Preauth:
    """A fresh layer whose upstream advertised TOP and UIDL."""
    args: dict = {"cleartext_allowed": False, "max_commands": 50,
                  "upstream_capabilities": lambda: ["TOP", "UIDL"], **kw}
    return Preauth(tls_mode=tls_mode, **args)


def tls_up(p: Preauth, device: str | None = "alice-phone") -> None:
    """Implicit TLS: connected, handshake done, greeting sent."""
    play(p, (Connected(), [StartTls()]), (TlsEstablished(device), [send(GREETING)]))


def test_implicit_tls_greets_after_the_handshake_and_answers_capa_and_auth_list():
    """With implicit TLS the greeting waits for the handshake; CAPA shows USER, SASL
    PLAIN and the upstream's TOP/UIDL; AUTH alone lists PLAIN."""
    p = layer()
    tls_up(p)
    play(p, (DataReceived(b"CAPA\r\nAUTH\r\n"), [
        send(CAPA_TLS), send(b"+OK\r\nPLAIN\r\n.\r\n")]))


def test_user_pass_allowed_splices_with_the_upstreams_ok_and_pipelined_bytes():
    """USER is answered by the proxy; PASS opens the upstream; its +OK goes to the gate;
    on allow the upstream's line reaches the client and the rest is spliced."""
    p = layer()
    tls_up(p)
    play(p,
         (DataReceived(f"USER {ALICE}\r\nPASS {PW}\r\nSTAT".encode()), [
             send(b"+OK Send PASS\r\n"), OpenUpstream(ALICE, PW)]),
         (DataReceived(b"\r\n"), []),  # held while the upstream answers
         (UpstreamAnswered(True, LOGGED_IN), [RequestDecision(PHONE)]),
         (DecisionMade(ALLOW), [Splice(LOGGED_IN, b"STAT\r\n", PHONE)]),
         (ClientClosed(), []))  # spliced: the layer is done
    assert p.finished and p.decided


def test_wrong_password_passes_the_upstreams_answer_and_records_auth_failed():
    """The upstream's -ERR goes to the client as it is, is recorded as auth_failed, and
    the client may try again on the same connection."""
    p = layer()
    tls_up(p)
    play(p,
         (DataReceived(f"USER {ALICE}\r\nPASS wrong\r\n".encode()), [
             send(b"+OK Send PASS\r\n"), OpenUpstream(ALICE, "wrong")]),
         (UpstreamAnswered(False, AUTH_FAILED), [
             send(AUTH_FAILED), CloseUpstream(), RecordAuthFailed(PHONE)]),
         (DataReceived(f"USER {ALICE}\r\nPASS {PW}\r\n".encode()), [
             send(b"+OK Send PASS\r\n"), OpenUpstream(ALICE, PW)]))


def test_policy_deny_is_sys_perm_with_the_reason_then_close():
    """After the upstream accepted the login, a policy deny is -ERR [SYS/PERM] <reason>
    (not [AUTH]) and the connection closes; the gate's record is the only one."""
    p = layer()
    tls_up(p, "alice-tiktok")
    tiktok = Identity(ALICE, "alice-tiktok", "client_cert")
    play(p,
         (DataReceived(f"USER {ALICE}\r\nPASS {PW}\r\n".encode()), [
             send(b"+OK Send PASS\r\n"), OpenUpstream(ALICE, PW)]),
         (UpstreamAnswered(True, LOGGED_IN), [RequestDecision(tiktok)]),
         (DecisionMade(DENY), [
             CloseUpstream(), send(b"-ERR [SYS/PERM] Uninstall TikTok to restore mail.\r\n"),
             Close(None)]))


def test_temporary_deny_is_sys_temp_and_the_client_may_retry():
    """A temporary deny (the posture store is down) answers -ERR [SYS/TEMP] and keeps
    the connection for another try."""
    p = layer()
    tls_up(p)
    cred = base64.b64encode(f"\0{ALICE}\0{PW}".encode())
    play(p,
         (DataReceived(b"AUTH PLAIN " + cred + b"\r\n"), [OpenUpstream(ALICE, PW)]),
         (UpstreamAnswered(True, LOGGED_IN), [RequestDecision(PHONE)]),
         (DecisionMade(BUSY), [CloseUpstream(), send(b"-ERR [SYS/TEMP] Try again later.\r\n")]),
         (DataReceived(b"AUTH PLAIN\r\n"), [send(b"+ \r\n")]),
         (DataReceived(cred + b"\r\n"), [OpenUpstream(ALICE, PW)]))


def test_upstream_unavailable_is_sys_temp_a_temporary_deny_record_and_close():
    """An unreachable upstream: -ERR [SYS/TEMP], a temporary deny record, close."""
    p = layer()
    tls_up(p)
    play(p,
         (DataReceived(f"USER {ALICE}\r\nPASS {PW}\r\n".encode()), [
             send(b"+OK Send PASS\r\n"), OpenUpstream(ALICE, PW)]),
         (UpstreamFailed("connection refused"), [
             send(f"-ERR [SYS/TEMP] {UNAVAILABLE_TEXT}\r\n".encode()),
             RecordUnavailable(PHONE, "connection refused"), Close(None)]))


def test_stls_listener_refuses_cleartext_credentials_and_drops_injected_bytes():
    """Before STLS: CAPA has STLS and no USER, credentials get -ERR [SYS/PERM] without
    the upstream; bytes after STLS are dropped; a connection that ends without a login
    attempt has a session_end record with the reason."""
    p = layer("starttls")
    privacy = f"-ERR [SYS/PERM] {PRIVACY_TEXT}\r\n".encode()
    play(p,
         (Connected(), [send(GREETING)]),
         (DataReceived(b"CAPA\r\nUSER a\r\nAUTH PLAIN =\r\n"), [
             send(CAPA_PLAIN), send(privacy), send(privacy)]),
         (DataReceived(b"STLS\r\nUSER evil\r\n"), [
             send(b"+OK Begin TLS negotiation now\r\n"), StartTls()]),
         (TlsEstablished(None), []),
         (DataReceived(b"QUIT\r\n"), [
             send(b"+OK Logging out\r\n"), Close(SessionEnd("logout"))]))


def test_cleartext_refused_then_closed_records_why():
    """A client that only tried cleartext credentials ends as cleartext_refused."""
    p = layer("starttls")
    play(p,
         (Connected(), [send(GREETING)]),
         (DataReceived(b"USER a\r\n"), [
             send(f"-ERR [SYS/PERM] {PRIVACY_TEXT}\r\n".encode())]),
         (ClientClosed(), [Close(SessionEnd("cleartext_refused"))]))


def test_authzid_of_someone_else_and_malformed_plain_are_refused_locally():
    """PLAIN naming another authorization identity, or malformed, never reaches the
    upstream."""
    p = layer()
    tls_up(p)
    other = base64.b64encode(f"boss@corp.example\0{ALICE}\0{PW}".encode())
    bad = base64.b64encode(b"no-nuls")
    play(p,
         (DataReceived(b"AUTH PLAIN " + other + b"\r\n"), [
             send(b"-ERR Authorization identity not supported\r\n")]),
         (DataReceived(b"AUTH PLAIN " + bad + b"\r\n"), [
             send(b"-ERR Malformed PLAIN credentials\r\n")]),
         (DataReceived(b"AUTH PLAIN\r\n*\r\n"), [
             send(b"+ \r\n"), send(b"-ERR AUTH cancelled\r\n")]),
         (ClientClosed(), [Close(SessionEnd("bad_syntax"))]))


def test_limits_timeouts_shutdown_tls_failure_and_crash_end_with_session_end():
    """Every way a connection ends before a login attempt gives one session_end."""
    p = layer(max_commands=2)
    tls_up(p)
    play(p, (DataReceived(b"CAPA\r\nCAPA\r\nCAPA\r\n"), [
        send(CAPA_TLS), send(CAPA_TLS),
        send(b"-ERR Too many commands before login\r\n"),
        Close(SessionEnd("limit_commands"))]))
    for event, reason, sent in (
            (TimedOut(total=False), "idle_timeout", TIMEOUT_TEXT),
            (TimedOut(total=True), "preauth_timeout", TIMEOUT_TEXT),
            (ShutdownRequested(), "shutdown", f"[SYS/TEMP] {SHUTDOWN_TEXT}")):
        p = layer()
        tls_up(p)
        play(p, (event, [send(f"-ERR {sent}\r\n".encode()), Close(SessionEnd(reason))]))
    p = layer()
    play(p, (Connected(), [StartTls()]),
         (TlsFailed("bad certificate"), [Close(SessionEnd("tls_failed", "bad certificate"))]))
    p = layer()
    tls_up(p)
    play(p, (Crashed("KeyError"), [Close(SessionEnd("internal_error", "KeyError"))]),
         (DataReceived(b"CAPA\r\n"), []))  # finished: later events are ignored


def test_allowed_while_the_listener_shuts_down_starts_no_session():
    """An allow that arrives while the listener closes is a SYS/TEMP refusal."""
    p = layer()
    tls_up(p)
    play(p,
         (DataReceived(f"USER {ALICE}\r\nPASS {PW}\r\n".encode()), [
             send(b"+OK Send PASS\r\n"), OpenUpstream(ALICE, PW)]),
         (UpstreamAnswered(True, LOGGED_IN), [RequestDecision(PHONE)]),
         (DecisionMade(ALLOW, shutting_down=True), [
             CloseUpstream(), send(f"-ERR [SYS/TEMP] {SHUTDOWN_TEXT}\r\n".encode()),
             Close(None)]))


def test_credentials_never_appear_in_command_reprs():
    """Commands and events that carry a password keep it out of repr (logs)."""
    assert PW not in repr(OpenUpstream(ALICE, PW))
    assert PW not in repr(DataReceived(PW.encode()))
    assert b"STAT" not in repr(Splice(b"+OK", b"STAT", PHONE)).encode()
