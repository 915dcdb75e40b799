"""Playbooks and a fuzz test of the sans-IO login to the upstream POP3 server (no sockets)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.frontends.events import UpstreamDataReceived, UpstreamTlsEstablished
from proxy.frontends.pop3_upstream import (
    MAX_UPSTREAM_RESPONSE_BYTES,
    LoginAnswered,
    ReportCapabilities,
    SendToUpstream,
    StartUpstreamTls,
    Step,
    UpstreamLogin,
    offers_plain,
)
from proxy.frontends.pop3_wire import LocalProtocolError, RemoteProtocolError

pytestmark = pytest.mark.conversation

ALICE, PW = "alice@corp.example", "alice-secret"
PLAIN = b"AUTH PLAIN " + base64.b64encode(f"\0{ALICE}\0{PW}".encode()) + b"\r\n"
CAPA = b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nSTLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
CAPS = ("CAPA", "TOP", "UIDL", "RESP-CODES", "STLS", "USER", "SASL PLAIN LOGIN")


def login(**kw: object) -> UpstreamLogin:
    args: dict = {"user": ALICE, "password": PW, "starttls": False, **kw}
    return UpstreamLogin(**args)


def got(lg: UpstreamLogin, data: bytes) -> list[object]:
    return lg.handle(UpstreamDataReceived(data))


def test_dovecot_with_xclient_gets_the_phones_address_then_auth_plain():
    """A trusting Dovecot greets with [XCLIENT]: CAPA, XCLIENT ADDR/PORT, then AUTH
    PLAIN with an initial response; its +OK ends the login."""
    lg = login(client_ip="10.1.2.3", client_port=5555)
    assert got(lg, b"+OK [XCLIENT] Dovecot ready.\r\n") == [SendToUpstream(b"CAPA\r\n")]
    assert got(lg, CAPA) == [ReportCapabilities(CAPS),
                             SendToUpstream(b"XCLIENT ADDR=10.1.2.3 PORT=5555\r\n")]
    assert got(lg, b"+OK Updated\r\n") == [SendToUpstream(PLAIN)]
    assert got(lg, b"+OK Logged in.\r\n+OK 2 650\r\n") == [
        LoginAnswered(True, b"+OK Logged in.\r\n")]
    assert lg.rest == b"+OK 2 650\r\n" and lg.phase is Step.DONE
    with pytest.raises(LocalProtocolError):
        got(lg, b"more")


def test_without_xclient_and_with_stls_upstream():
    """STLS upstream: the handshake, bytes sent before it discarded, then CAPA and the
    login; no XCLIENT when the greeting does not offer it."""
    lg = login(starttls=True, client_ip="10.1.2.3")
    assert got(lg, b"+OK ready\r\n") == [SendToUpstream(b"STLS\r\n")]
    assert got(lg, b"+OK Begin TLS\r\n+OK injected\r\n") == [StartUpstreamTls()]
    assert got(lg, b"+OK also injected\r\n") == []
    assert lg.handle(UpstreamTlsEstablished()) == [SendToUpstream(b"CAPA\r\n")]
    assert got(lg, CAPA) == [ReportCapabilities(CAPS), SendToUpstream(PLAIN)]
    assert got(lg, b"-ERR [AUTH] Authentication failed.\r\n") == [
        LoginAnswered(False, b"-ERR [AUTH] Authentication failed.\r\n")]


def test_rfc1939_server_without_capa_or_sasl_gets_user_and_pass():
    """A server that refuses CAPA is logged in with USER/PASS; a -ERR to USER is the
    answer."""
    lg = login()
    got(lg, b"+OK POP3 server\r\n")
    assert got(lg, b"-ERR unknown command\r\n") == [
        ReportCapabilities(()), SendToUpstream(f"USER {ALICE}\r\n".encode())]
    assert got(lg, b"+OK\r\n") == [SendToUpstream(f"PASS {PW}\r\n".encode())]
    assert got(lg, b"+OK maildrop locked\r\n") == [LoginAnswered(True, b"+OK maildrop locked\r\n")]
    lg = login()
    got(lg, b"+OK POP3 server\r\n")
    got(lg, b"-ERR\r\n")
    assert got(lg, b"-ERR no such user\r\n") == [LoginAnswered(False, b"-ERR no such user\r\n")]


def test_long_credentials_wait_for_the_servers_continuation():
    """An AUTH line over 255 octets is sent without the initial response (RFC 5034)."""
    long_pw = "p" * 300
    lg = login(password=long_pw)
    got(lg, b"+OK ready\r\n")
    assert got(lg, CAPA)[-1] == SendToUpstream(b"AUTH PLAIN\r\n")
    response = base64.b64encode(f"\0{ALICE}\0{long_pw}".encode()) + b"\r\n"
    assert got(lg, b"+ \r\n") == [SendToUpstream(response)]
    assert got(lg, b"+OK Logged in.\r\n") == [LoginAnswered(True, b"+OK Logged in.\r\n")]


def test_credentials_with_line_breaks_are_never_sent_as_user_pass():
    """Without SASL PLAIN upstream, a password holding CR/LF (possible in PLAIN) is
    refused instead of being split into commands."""
    lg = login(password="pw\r\nDELE 1")
    got(lg, b"+OK ready\r\n")
    answer = got(lg, b"+OK\r\nUSER\r\n.\r\n")
    assert answer[0] == ReportCapabilities(("USER",))
    assert isinstance(answer[1], LoginAnswered) and not answer[1].ok
    assert not any(isinstance(c, SendToUpstream) for c in answer)


def test_bad_servers_are_remote_errors():
    """A greeting that is not +OK, a refused STLS, a stray SASL challenge and an endless
    line are the server's fault."""
    with pytest.raises(RemoteProtocolError):
        got(login(), b"-ERR go away\r\n")
    lg = login(starttls=True)
    got(lg, b"+OK\r\n")
    with pytest.raises(RemoteProtocolError):
        got(lg, b"-ERR no TLS\r\n")
    lg = login()
    got(lg, b"+OK\r\n")
    got(lg, CAPA)
    with pytest.raises(RemoteProtocolError):
        got(lg, b"+ more please\r\n")
    with pytest.raises(RemoteProtocolError):
        got(login(), b"+" * (MAX_UPSTREAM_RESPONSE_BYTES + 1))
    with pytest.raises(LocalProtocolError):
        login().handle(UpstreamTlsEstablished())


def test_password_is_not_in_repr_and_offers_plain_reads_sasl_lines():
    """The login's repr hides the password; SASL PLAIN is found in any CAPA spelling."""
    assert PW not in repr(login())
    assert PW not in repr(SendToUpstream(PLAIN))
    assert offers_plain(("sasl login plain",)) and not offers_plain(("SASL LOGIN", "PLAIN"))


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=10), st.booleans())
def test_any_server_input_gives_commands_or_the_remote_error(chunks: list[bytes],
                                                             starttls: bool):
    """Whatever the server sends, the login returns commands or raises RemoteProtocolError."""
    lg = login(starttls=starttls, client_ip="10.0.0.1")
    try:
        for chunk in chunks:
            if lg.phase is Step.DONE:
                break
            if lg.phase is Step.HANDSHAKE:
                lg.handle(UpstreamTlsEstablished())
            lg.handle(UpstreamDataReceived(chunk))
    except RemoteProtocolError:
        pass
