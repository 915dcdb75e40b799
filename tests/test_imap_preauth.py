"""Playbooks of the IMAP pre-auth conversation (``imap_preauth.Preauth``), no sockets.

Each test feeds events and states the commands expected back, in order, as mitmproxy
tests its layers: the whole pre-auth conversation can be read here without an executor.
"""

from __future__ import annotations

import base64

import pytest
from helpers.playbook import ALICE, ALLOW, BUSY, DENY, PHONE, PW, play
from hypothesis import given, settings
from hypothesis import strategies as st

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
from proxy.frontends.imap_preauth import (
    PRIVACY_TEXT,
    SHUTDOWN_TEXT,
    TIMEOUT_TEXT,
    UNAVAILABLE_TEXT,
    OpenUpstream,
    Preauth,
    UpstreamAnswered,
)
from proxy.frontends.imap_syntax import MAX_REFUSAL_CHARS
from proxy.gate import Identity
from proxy.policy import Decision, Reason

pytestmark = pytest.mark.conversation

CAPS_TLS = b"IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN IDLE"
CAPS_PLAIN = b"IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED IDLE"
PRIVACY = f"NO [PRIVACYREQUIRED] {PRIVACY_TEXT}\r\n".encode()


def send(*lines: bytes) -> SendToClient:
    return SendToClient(b"".join(lines))


def layer(tls_mode: str = "implicit", **kw: object) -> Preauth:
    """A fresh layer whose upstream advertised IDLE."""
    args: dict = {"cleartext_allowed": False, "max_commands": 50,
                  "upstream_capabilities": lambda: ["IDLE"], **kw}
    return Preauth(tls_mode=tls_mode, **args)


def tls_up(p: Preauth, device: str | None = "alice-phone") -> None:
    """Implicit TLS: connected, handshake done, greeting sent."""
    play(p,
         (Connected(), [StartTls()]),
         (TlsEstablished(device),
          [send(b"* OK [CAPABILITY " + CAPS_TLS + b"] mailward ready\r\n")]))


def test_implicit_tls_greets_after_the_handshake_and_answers_capability_noop_id():
    """With implicit TLS the greeting waits for the handshake; CAPABILITY shows
    AUTH=PLAIN and the upstream's IDLE, ID and NOOP are answered without the upstream."""
    p = layer()
    tls_up(p)
    play(p, (DataReceived(b'a CAPABILITY\r\nb ID ("name" "K-9")\r\nc NOOP\r\n'), [
        send(b"* CAPABILITY " + CAPS_TLS + b"\r\n", b"a OK CAPABILITY completed\r\n"),
        send(b'* ID ("name" "mailward")\r\n', b"b OK ID completed\r\n"),
        send(b"c OK NOOP completed\r\n"),
    ]))


def test_login_allowed_splices_with_the_upstreams_answer_and_pipelined_bytes():
    """LOGIN opens the upstream with the client's tag and ID; its OK goes to the gate;
    on allow the upstream's answer reaches the client and the rest is spliced."""
    p = layer()
    tls_up(p)
    play(p,
         (DataReceived(b'i ID ("name" "K-9")\r\n'), [
             send(b'* ID ("name" "mailward")\r\n', b"i OK ID completed\r\n")]),
         (DataReceived(f"t1 LOGIN {ALICE} {PW}\r\nt2 SELECT".encode()), [
             OpenUpstream("t1", ALICE, PW, (("name", "K-9"),))]),
         (DataReceived(b" INBOX\r\n"), []),  # held while the upstream answers
         (UpstreamAnswered(True, b"* CAPABILITY IMAP4rev1 IDLE\r\n", b"t1 OK Logged in\r\n"),
          [RequestDecision(PHONE)]),
         (DecisionMade(ALLOW), [
             Splice(b"* CAPABILITY IMAP4rev1 IDLE\r\nt1 OK Logged in\r\n",
                    b"t2 SELECT INBOX\r\n", PHONE)]),
         (ClientClosed(), []))  # spliced: the layer is done
    assert p.finished and p.decided


def test_wrong_password_passes_the_upstreams_answer_and_records_auth_failed():
    """The upstream's NO goes to the client as it is, is recorded as auth_failed, and
    the client may try again on the same connection."""
    p = layer()
    tls_up(p)
    no = b"t1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    play(p,
         (DataReceived(f"t1 LOGIN {ALICE} wrong\r\n".encode()),
          [OpenUpstream("t1", ALICE, "wrong")]),
         (UpstreamAnswered(False, b"", no), [SendToClient(no), CloseUpstream(),
                                             RecordAuthFailed(PHONE)]),
         (DataReceived(f"t2 LOGIN {ALICE} {PW}\r\n".encode()), [OpenUpstream("t2", ALICE, PW)]),
         (UpstreamAnswered(True, b"", b"t2 OK\r\n"), [RequestDecision(PHONE)]),
         (DecisionMade(ALLOW), [Splice(b"t2 OK\r\n", b"", PHONE)]))


def test_deny_sends_alert_authorizationfailed_and_bye_with_the_same_reason():
    """A policy deny: * NO [ALERT] text, tagged NO [AUTHORIZATIONFAILED] text, * BYE
    text (the same reason, for clients that show only the last line); the decision
    record is the gate's, so Close records nothing, and a retry after it is ignored."""
    p = layer()
    tls_up(p)
    text = "Uninstall TikTok to restore mail."
    play(p,
         (DataReceived(f"t1 LOGIN {ALICE} {PW}\r\n".encode()), [OpenUpstream("t1", ALICE, PW)]),
         (UpstreamAnswered(True, b"", b"t1 OK\r\n"), [RequestDecision(PHONE)]),
         (DecisionMade(DENY), [
             CloseUpstream(),
             send(f"* NO [ALERT] {text}\r\n".encode(),
                  f"t1 NO [AUTHORIZATIONFAILED] {text}\r\n".encode(),
                  f"* BYE {text}\r\n".encode()),
             Close(None)]),
         (DataReceived(f"t2 LOGIN {ALICE} {PW}\r\n".encode()), []),
         (ClientClosed(), []))


def test_refusal_text_is_ascii_one_line_and_bounded_in_alert_no_and_bye():
    """A long, non-ASCII, multi-line policy text reaches ALERT, NO and BYE as the same
    ASCII line of at most MAX_REFUSAL_CHARS characters."""
    long_text = ("TikTok est install\u00e9 \u2014 d\u00e9sinstallez-le.\r\n* OK forged "
                 + "word " * 200)
    deny = Decision(False, (Reason("prohibited_app", long_text),), "v1", "sha")
    p = layer()
    tls_up(p)
    p.handle(DataReceived(f"t1 LOGIN {ALICE} {PW}\r\n".encode()))
    p.handle(UpstreamAnswered(True, b"", b"t1 OK\r\n"))
    sent = p.handle(DecisionMade(deny))[1]
    assert isinstance(sent, SendToClient)
    alert, no, bye, end = sent.data.split(b"\r\n")
    reason = alert.removeprefix(b"* NO [ALERT] ")
    assert no == b"t1 NO [AUTHORIZATIONFAILED] " + reason
    assert bye == b"* BYE " + reason and end == b""
    assert reason.startswith(b"TikTok est installe - desinstallez-le. * OK forged word")
    assert reason.endswith(b"...") and len(reason) <= MAX_REFUSAL_CHARS
    assert reason.isascii()


def test_temporary_deny_is_unavailable_and_the_client_may_retry():
    """A temporary deny answers NO [UNAVAILABLE] and keeps the connection."""
    p = layer()
    tls_up(p)
    play(p,
         (DataReceived(f"t1 LOGIN {ALICE} {PW}\r\nt2 NOOP\r\n".encode()),
          [OpenUpstream("t1", ALICE, PW)]),
         (UpstreamAnswered(True, b"", b"t1 OK\r\n"), [RequestDecision(PHONE)]),
         (DecisionMade(BUSY), [CloseUpstream(),
                               send(b"t1 NO [UNAVAILABLE] Try again later.\r\n"),
                               send(b"t2 OK NOOP completed\r\n")]))
    assert not p.finished


def test_upstream_unavailable_answers_unavailable_and_records_a_temporary_deny():
    """An unreachable upstream: NO [UNAVAILABLE], * BYE, one temporary-deny record."""
    p = layer()
    tls_up(p, device=None)
    unidentified = Identity(ALICE)
    play(p,
         (DataReceived(f"t1 LOGIN {ALICE} {PW}\r\n".encode()), [OpenUpstream("t1", ALICE, PW)]),
         (UpstreamFailed("connection refused"), [
             send(f"t1 NO [UNAVAILABLE] {UNAVAILABLE_TEXT}\r\n".encode(),
                  f"* BYE {UNAVAILABLE_TEXT}\r\n".encode()),
             RecordUnavailable(unidentified, "connection refused"),
             Close(None)]))


def test_listener_closing_during_the_decision_starts_no_session():
    """An allow that arrives while the listener shuts down is answered UNAVAILABLE."""
    p = layer()
    tls_up(p)
    play(p,
         (DataReceived(f"t1 LOGIN {ALICE} {PW}\r\n".encode()), [OpenUpstream("t1", ALICE, PW)]),
         (UpstreamAnswered(True, b"", b"t1 OK\r\n"), [RequestDecision(PHONE)]),
         (DecisionMade(ALLOW, shutting_down=True), [
             CloseUpstream(),
             send(f"t1 NO [UNAVAILABLE] {UNAVAILABLE_TEXT}\r\n".encode(),
                  f"* BYE {SHUTDOWN_TEXT}\r\n".encode()),
             Close(None)]))


def test_authenticate_plain_with_and_without_initial_response():
    """AUTHENTICATE PLAIN: with SASL-IR the upstream is opened at once; without, a
    continuation is sent first; an authzid other than the user is refused."""
    cred = base64.b64encode(f"\0{ALICE}\0{PW}".encode())
    p = layer()
    tls_up(p)
    play(p, (DataReceived(b"a AUTHENTICATE PLAIN " + cred + b"\r\n"),
             [OpenUpstream("a", ALICE, PW)]))
    p = layer()
    tls_up(p)
    other = base64.b64encode(f"bob\0{ALICE}\0{PW}".encode())
    play(p,
         (DataReceived(b"b AUTHENTICATE PLAIN\r\n"), [send(b"+ \r\n")]),
         (DataReceived(other + b"\r\n"),
          [send(b"b NO [CANNOT] Authorization identity not supported\r\n")]),
         (DataReceived(b"c AUTHENTICATE PLAIN\r\n"), [send(b"+ \r\n")]),
         (DataReceived(base64.b64encode(b"no-nuls") + b"\r\n"),
          [send(b"c BAD malformed PLAIN credentials\r\n")]),
         (DataReceived(b"d AUTHENTICATE PLAIN\r\n"), [send(b"+ \r\n")]),
         (DataReceived(cred + b"\r\n"), [OpenUpstream("d", ALICE, PW)]))


def test_privacy_required_before_tls_without_touching_upstream_or_gate():
    """On a STARTTLS listener, before TLS: CAPABILITY shows STARTTLS and LOGINDISABLED;
    LOGIN, AUTHENTICATE and a LOGIN literal get NO [PRIVACYREQUIRED] (no `+`); leaving
    then records session_end with the last reason."""
    p = layer("starttls")
    play(p,
         (Connected(), [send(b"* OK [CAPABILITY " + CAPS_PLAIN + b"] mailward ready\r\n")]),
         (DataReceived(b"a CAPABILITY\r\n"), [
             send(b"* CAPABILITY " + CAPS_PLAIN + b"\r\n", b"a OK CAPABILITY completed\r\n")]),
         (DataReceived(b"b LOGIN alice pw\r\nc AUTHENTICATE PLAIN\r\nd LOGIN {5}\r\n"),
          [send(b"b " + PRIVACY), send(b"c " + PRIVACY), send(b"d " + PRIVACY)]),
         (ClientClosed(), [Close(SessionEnd("cleartext_refused"))]))


def test_starttls_discards_pipelined_bytes_then_login_works():
    """Bytes pipelined after STARTTLS, in the same packet or before the handshake ends,
    never run; after TLS the capabilities change and LOGIN goes upstream."""
    p = layer("starttls")
    p.handle(Connected())
    play(p,
         (DataReceived(b"a STARTTLS\r\nb LOGIN evil pw\r\n"),
          [send(b"a OK Begin TLS negotiation now\r\n"), StartTls()]),
         (DataReceived(b"c LOGIN more evil\r\n"), []),
         (TlsEstablished("alice-phone"), []),
         (DataReceived(b"d CAPABILITY\r\n"), [
             send(b"* CAPABILITY " + CAPS_TLS + b"\r\n", b"d OK CAPABILITY completed\r\n")]),
         (DataReceived(f"e LOGIN {ALICE} {PW}\r\n".encode()), [OpenUpstream("e", ALICE, PW)]))


def test_cleartext_allowed_on_loopback_logs_in_without_tls():
    """With cleartext allowed (loopback config), LOGIN goes upstream without TLS and
    the identity carries no device."""
    p = layer("none", cleartext_allowed=True)
    p.handle(Connected())
    play(p, (DataReceived(b"a LOGIN u p\r\n"), [OpenUpstream("a", "u", "p")]),
         (UpstreamAnswered(True, b"", b"a OK\r\n"), [RequestDecision(Identity("u"))]))


def test_tls_failure_records_session_end():
    """A failed handshake ends the connection with a tls_failed session_end."""
    p = layer()
    play(p, (Connected(), [StartTls()]),
         (TlsFailed("wrong version number"),
          [Close(SessionEnd("tls_failed", "wrong version number"))]),
         (DataReceived(b"a NOOP\r\n"), []))


def test_literal_limits():
    """Over TLS a literal within limits is invited with `+ Ready`; a huge one is refused
    with BAD and BYE, no continuation, and the session ends limit_literal."""
    p = layer()
    tls_up(p)
    play(p,
         (DataReceived(b"a LOGIN {5}\r\n"), [send(b"+ Ready\r\n")]),
         (DataReceived(b"alice {2}\r\n"), [send(b"+ Ready\r\n")]),
         (DataReceived(b"pw\r\n"), [OpenUpstream("a", "alice", "pw")]))
    p = layer()
    tls_up(p)
    text = b"Literal too large (limit 8192 bytes)"
    play(p, (DataReceived(b"a LOGIN {104857600}\r\n"), [
        send(b"a BAD " + text + b"\r\n", b"* BYE " + text + b"\r\n"),
        Close(SessionEnd("limit_literal"))]))


def test_too_many_commands_ends_with_bye():
    """The command after max_commands gets BYE and the connection ends."""
    p = layer(max_commands=2)
    tls_up(p)
    play(p, (DataReceived(b"a NOOP\r\nb NOOP\r\nc NOOP\r\nd NOOP\r\n"), [
        send(b"a OK NOOP completed\r\n"), send(b"b OK NOOP completed\r\n"),
        send(b"c BAD Too many commands before login\r\n",
             b"* BYE Too many commands before login\r\n"),
        Close(SessionEnd("limit_commands"))]))


def test_bad_syntax_logout_timeouts_shutdown_and_crash_end_reasons():
    """Each way out before a login attempt gives one session_end with its reason;
    after a decision record, none."""
    p = layer()
    tls_up(p)
    play(p, (DataReceived(b"a SELECT INBOX\r\n"),
             [send(b"a BAD Command SELECT not allowed before login\r\n")]),
         (DataReceived(b"b LOGOUT\r\n"), [send(b"* BYE Logging out\r\n",
                                              b"b OK LOGOUT completed\r\n"),
                                         Close(SessionEnd("logout"))]))
    for total, reason in ((False, "idle_timeout"), (True, "preauth_timeout")):
        p = layer()
        tls_up(p)
        play(p, (TimedOut(total), [send(f"* BYE {TIMEOUT_TEXT}\r\n".encode()),
                                   Close(SessionEnd(reason))]))
    p = layer()
    tls_up(p)
    play(p, (ShutdownRequested(), [send(f"* BYE {SHUTDOWN_TEXT}\r\n".encode()),
                                   Close(SessionEnd("shutdown"))]),
         (ClientClosed(), []))
    p = layer()
    tls_up(p)
    play(p, (DataReceived(f"t LOGIN {ALICE} {PW}\r\n".encode()), [OpenUpstream("t", ALICE, PW)]),
         (Crashed("KeyError"), [Close(SessionEnd("internal_error", "KeyError", PHONE))]))


def test_reserved_tags_never_reach_the_upstream():
    """A client tag in the proxy's own mw. namespace is refused before any upstream."""
    p = layer()
    tls_up(p)
    play(p, (DataReceived(f"mw.id LOGIN {ALICE} x\r\n".encode()),
             [send(b"mw.id BAD Tags starting with mw. are reserved\r\n")]))


def test_credentials_never_in_repr():
    """Commands and events that carry a password or client bytes do not show them."""
    assert PW not in repr(OpenUpstream("t", ALICE, PW))
    assert PW not in repr(DataReceived(f"t LOGIN {ALICE} {PW}\r\n".encode()))


def token_layer(*mechanisms: str) -> Preauth:
    """A layer over TLS whose upstream offers these relayable mechanisms."""
    p = layer(upstream_mechanisms=lambda: list(mechanisms))
    play(p, (Connected(), [StartTls()]))
    p.handle(TlsEstablished("alice-phone"))
    return p


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_mechanisms_offered_are_plain_and_those_the_upstream_offers():
    """CAPABILITY lists AUTH=PLAIN and the upstream's relayable mechanisms; one the
    upstream lacks is refused BAD like an unknown one, without reaching the upstream."""
    p = token_layer("LOGIN", "XOAUTH2")
    play(p, (DataReceived(b"a CAPABILITY\r\n"), [send(
        b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN AUTH=XOAUTH2 IDLE"
        b"\r\n", b"a OK CAPABILITY completed\r\n")]),
        (DataReceived(b"b AUTHENTICATE OAUTHBEARER " + b64(b"n,a=x,\x01\x01") + b"\r\n"),
         [send(b"b BAD Unsupported authentication mechanism OAUTHBEARER\r\n")]),
        (DataReceived(b"c AUTHENTICATE CRAM-MD5\r\n"),
         [send(b"c BAD Unsupported authentication mechanism CRAM-MD5\r\n")]),
        (DataReceived(b"d NOOP\r\n"), [send(b"d OK NOOP completed\r\n")]))


def test_authenticate_login_prompts_for_user_and_password():
    """AUTHENTICATE LOGIN: + Username:, + Password:, then the upstream LOGIN; with an
    initial response (the user) only the password prompt; * cancels."""
    p = token_layer("LOGIN")
    play(p,
         (DataReceived(b"a AUTHENTICATE LOGIN\r\n"), [send(b"+ VXNlcm5hbWU6\r\n")]),
         (DataReceived(b64(ALICE.encode()) + b"\r\n"), [send(b"+ UGFzc3dvcmQ6\r\n")]),
         (DataReceived(b64(PW.encode()) + b"\r\n"), [OpenUpstream("a", ALICE, PW)]),
         (UpstreamAnswered(False, b"", b"a NO [AUTHENTICATIONFAILED] x\r\n"),
          [send(b"a NO [AUTHENTICATIONFAILED] x\r\n"), CloseUpstream(),
           RecordAuthFailed(PHONE)]),
         (DataReceived(b"b AUTHENTICATE LOGIN " + b64(ALICE.encode()) + b"\r\n"),
          [send(b"+ UGFzc3dvcmQ6\r\n")]),
         (DataReceived(b"*\r\n"), [send(b"b BAD AUTHENTICATE cancelled\r\n")]),
         (DataReceived(b"c AUTHENTICATE LOGIN =\r\n"),
          [send(b"c BAD user name: empty or with control characters\r\n")]),
         (DataReceived(b"d AUTHENTICATE LOGIN " + b64(ALICE.encode()) + b"\r\n"),
          [send(b"+ UGFzc3dvcmQ6\r\n")]),
         (DataReceived(b64(PW.encode()) + b"\r\n"), [OpenUpstream("d", ALICE, PW)]))


def test_xoauth2_and_oauthbearer_relay_the_token_for_the_claimed_user():
    """XOAUTH2 (initial response) and OAUTHBEARER (after a continuation) open the
    upstream with the mechanism and the message; the identity is the claimed user."""
    xo = f"user={ALICE}\x01auth=Bearer tok\x01\x01".encode()
    ob = f"n,a={ALICE},\x01auth=Bearer tok\x01\x01".encode()
    p = token_layer("XOAUTH2", "OAUTHBEARER")
    play(p,
         (DataReceived(b"a AUTHENTICATE XOAUTH2 " + b64(xo) + b"\r\n"),
          [OpenUpstream("a", ALICE, "", None, "XOAUTH2", xo)]),
         (UpstreamAnswered(True, b"", b"a OK Logged in\r\n"), [RequestDecision(PHONE)]))
    p = token_layer("XOAUTH2", "OAUTHBEARER")
    play(p,
         (DataReceived(b"a AUTHENTICATE OAUTHBEARER\r\n"), [send(b"+ \r\n")]),
         (DataReceived(b64(ob) + b"\r\n"),
          [OpenUpstream("a", ALICE, "", None, "OAUTHBEARER", ob)]))


def test_malformed_or_userless_token_messages_are_refused_and_the_client_may_retry():
    """Malformed XOAUTH2/OAUTHBEARER get BAD, OAUTHBEARER without a= gets NO [CANNOT],
    bad base64 BAD; nothing reaches the upstream and the connection carries on."""
    p = token_layer("XOAUTH2", "OAUTHBEARER")
    play(p,
         (DataReceived(b"a AUTHENTICATE XOAUTH2 " + b64(b"user=alice\x01\x01") + b"\r\n"),
          [send(b"a BAD XOAUTH2: no bearer token\r\n")]),
         (DataReceived(b"b AUTHENTICATE OAUTHBEARER " + b64(b"n,,\x01auth=Bearer t\x01\x01")
                       + b"\r\n"),
          [send(b"b NO [CANNOT] OAUTHBEARER needs the user name (a=) to be relayed\r\n")]),
         (DataReceived(b"c AUTHENTICATE XOAUTH2\r\n"), [send(b"+ \r\n")]),
         (DataReceived(b"%%%\r\n"), [send(b"c BAD AUTHENTICATE: invalid base64\r\n")]),
         (DataReceived(b"d AUTHENTICATE OAUTHBEARER\r\n"), [send(b"+ \r\n")]),
         (DataReceived(b64(b"garbage") + b"\r\n"),
          [send(b"d BAD malformed OAUTHBEARER response\r\n")]),
         (ClientClosed(), [Close(SessionEnd("bad_syntax"))]))


_PIECES = [b"a AUTHENTICATE LOGIN", b"b AUTHENTICATE XOAUTH2", b"c AUTHENTICATE OAUTHBEARER",
           b"d AUTHENTICATE PLAIN", b" ", b"\r\n", b"*", b"=", b"{3}\r\n", b"x LOGIN u p",
           b64(b"user=a\x01auth=Bearer t\x01\x01"), b64(b"n,a=a,\x01auth=Bearer t\x01\x01"),
           b64(b"n,,\x01\x01"), b64(b"\x00a\x00p"), b64(b"alice"), b"%%", b"\xff", b"e NOOP"]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(_PIECES), max_size=30), st.booleans())
def test_any_client_bytes_give_commands_and_at_most_one_upstream_login(
        pieces: list[bytes], refuse: bool):
    """Client bytes made of AUTHENTICATE pieces never raise; each OpenUpstream waits
    for its outcome (an upstream NO lets the client go on)."""
    p = token_layer("LOGIN", "XOAUTH2", "OAUTHBEARER")
    for piece in pieces:
        cmds = p.handle(DataReceived(piece))
        assert all(isinstance(c, (SendToClient, OpenUpstream, Close)) for c in cmds)
        if any(isinstance(c, OpenUpstream) for c in cmds):
            assert isinstance(cmds[-1], OpenUpstream)
            if not refuse:
                return
            p.handle(UpstreamAnswered(False, b"", b"x NO no\r\n"))
