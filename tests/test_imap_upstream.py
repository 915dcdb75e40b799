"""Playbooks of the sans-IO upstream login (``imap_upstream.UpstreamLogin``), no sockets."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.frontends.events import UpstreamDataReceived, UpstreamTlsEstablished
from proxy.frontends.imap_syntax import MAX_UPSTREAM_RESPONSE_BYTES
from proxy.frontends.imap_upstream import (
    LoginAnswered,
    Phase,
    ReportCapabilities,
    SendToUpstream,
    StartUpstreamTls,
    UpstreamCommand,
    UpstreamLogin,
    id_command,
)
from proxy.frontends.imap_wire import LocalProtocolError, RemoteProtocolError

pytestmark = pytest.mark.conversation

ALICE, PW = "alice@corp.example", "alice-secret"
ID = b'mw.id ID ("name" "K-9" "x-originating-ip" "192.0.2.7" "x-originating-port" "4242")\r\n'
LOGIN = f'a1 LOGIN "{ALICE}" "{PW}"\r\n'.encode()


def login(starttls: bool = False, password: str = PW) -> UpstreamLogin:
    return UpstreamLogin(tag="a1", user=ALICE, password=password, starttls=starttls,
                         id_fields=(("name", "K-9"),), client_ip="192.0.2.7", client_port=4242)


def got(lg: UpstreamLogin, data: bytes) -> list[UpstreamCommand]:
    return lg.handle(UpstreamDataReceived(data))


def test_greeting_with_capabilities_pipelines_id_and_login():
    """Capabilities from the greeting's code: ID and LOGIN go out together; ID's
    answers are dropped and LOGIN's answer ends the conversation."""
    lg = login()
    assert got(lg, b"* OK [CAPABILITY IMAP4rev1 ID IDLE AUTH=PLAIN] ready\r\n") == [
        ReportCapabilities(("IMAP4rev1", "ID", "IDLE", "AUTH=PLAIN")),
        SendToUpstream(ID + LOGIN)]
    assert got(lg, b'* ID ("name" "Dovecot")\r\nmw.id OK ID completed\r\n') == []
    assert got(lg, b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK Logged in\r\n* 3 EXISTS\r\n") == [
        LoginAnswered(True, b"* CAPABILITY IMAP4rev1 IDLE\r\n", b"a1 OK Logged in\r\n")]
    assert lg.phase is Phase.DONE and lg.rest == b"* 3 EXISTS\r\n"
    with pytest.raises(LocalProtocolError):
        got(lg, b"more\r\n")


def test_wrong_password_is_an_answer_not_an_error():
    """A tagged NO ends the login with ok False and the server's own line."""
    lg = login(password="wrong")
    got(lg, b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
    no = b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert got(lg, no) == [LoginAnswered(False, b"", no)]


def test_greeting_without_capabilities_asks_for_them():
    """No capability code in the greeting: CAPABILITY first; no ID without ID."""
    lg = login()
    assert got(lg, b"* OK ready\r\n") == [SendToUpstream(b"mw.cap CAPABILITY\r\n")]
    assert got(lg, b"* CAPABILITY IMAP4rev1\r\nmw.cap OK\r\n") == [
        ReportCapabilities(("IMAP4rev1",)), SendToUpstream(LOGIN)]


def test_starttls_discards_bytes_after_ok_and_asks_capabilities_again():
    """With STARTTLS: the greeting's capabilities are not trusted, bytes after the OK
    (unprotected) are dropped, and CAPABILITY is asked over TLS."""
    lg = login(starttls=True)
    assert got(lg, b"* OK [CAPABILITY IMAP4rev1 ID STARTTLS] ready\r\n") == [
        SendToUpstream(b"mw.tls STARTTLS\r\n")]
    assert got(lg, b"mw.tls OK Begin TLS\r\na1 OK injected\r\n") == [StartUpstreamTls()]
    assert got(lg, b"a1 OK injected too\r\n") == []
    assert lg.handle(UpstreamTlsEstablished()) == [SendToUpstream(b"mw.cap CAPABILITY\r\n")]
    assert got(lg, b"* CAPABILITY IMAP4rev1 LITERAL+\r\nmw.cap OK\r\n") == [
        ReportCapabilities(("IMAP4rev1", "LITERAL+")), SendToUpstream(LOGIN)]


def test_password_needing_a_literal_waits_for_the_continuation():
    """Without LITERAL+ a password that cannot be quoted is sent after `+`, once ID's
    answer has come; with LITERAL+ it goes at once as {n+}."""
    pw = "pässwörd"
    raw = pw.encode()
    lg = login(password=pw)
    head = f'a1 LOGIN "{ALICE}" '.encode() + b"{%d}\r\n" % len(raw)
    assert got(lg, b"* OK [CAPABILITY IMAP4rev1 ID] hi\r\n") == [
        ReportCapabilities(("IMAP4rev1", "ID")), SendToUpstream(ID + head)]
    assert got(lg, b"mw.id OK\r\n+ go ahead\r\n") == [SendToUpstream(raw + b"\r\n")]
    assert got(lg, b"a1 OK\r\n") == [LoginAnswered(True, b"", b"a1 OK\r\n")]
    lg = login(password=pw)
    plus = f'a1 LOGIN "{ALICE}" '.encode() + b"{%d+}\r\n" % len(raw) + raw + b"\r\n"
    assert got(lg, b"* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n")[1] == SendToUpstream(plus)


def test_refusal_before_the_literal_ends_the_login():
    """A tagged answer instead of `+` ends the login with that answer."""
    lg = login(password="pässwörd")
    got(lg, b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    assert got(lg, b"a1 NO too long\r\n") == [LoginAnswered(False, b"", b"a1 NO too long\r\n")]


@pytest.mark.parametrize("data, message", [
    (b"* BYE go away\r\n", "greeting"),
    (b"* PREAUTH hi\r\n", "greeting"),
    (b"* OK [CAPABILITY IMAP4rev1] hi\r\n* BYE shutting down\r\n", "upstream said"),
    (b"x" * (MAX_UPSTREAM_RESPONSE_BYTES + 1), "too long"),
])
def test_misbehaving_server_is_a_remote_error_answered_no(data: bytes, message: str):
    """Greeting not OK, * BYE, or an endless response: RemoteProtocolError, reply NO."""
    with pytest.raises(RemoteProtocolError, match=message) as err:
        got(login(), data)
    assert err.value.reply == "NO"


def test_refused_starttls_is_a_remote_error():
    """An upstream refusing STARTTLS cannot be used."""
    lg = login(starttls=True)
    got(lg, b"* OK hi\r\n")
    with pytest.raises(RemoteProtocolError, match="STARTTLS"):
        got(lg, b"mw.tls NO not today\r\n")


def test_responses_with_literals_are_read_whole_in_any_chunking():
    """A response carrying a literal (which may contain CRLF) is one response."""
    lg = login()
    data = (b"* OK [CAPABILITY IMAP4rev1] hi\r\n"
            b"* ID (\"x\" {4}\r\na1 O)\r\na1 OK done\r\n")
    out: list[UpstreamCommand] = []
    for b in data:
        out += got(lg, bytes([b]))
    assert out[-1] == LoginAnswered(True, b'* ID ("x" {4}\r\na1 O)\r\n', b"a1 OK done\r\n")


def test_id_command_passes_safe_client_fields_only():
    """Client ID fields with CR/LF, non-ASCII or x- names are not passed upstream."""
    fields = (("name", "K-9"), ("\r\nT NOOP", "v"), ("x-originating-ip", "1.2.3.4"),
              ("os", None), ("vendor", "ü"))
    assert id_command(fields, "192.0.2.1", 1) == (
        b'mw.id ID ("name" "K-9" "x-originating-ip" "192.0.2.1" '
        b'"x-originating-port" "1")\r\n')


def test_id_command_names_the_address_the_client_connected_to():
    """With the proxy's own address known, ID carries x-connected-ip/-port after the
    client's x-originating-ip/-port (the four fields Dovecot reads)."""
    assert id_command(None, "192.0.2.1", 1, "198.51.100.2", 993) == (
        b'mw.id ID ("x-originating-ip" "192.0.2.1" "x-originating-port" "1" '
        b'"x-connected-ip" "198.51.100.2" "x-connected-port" "993")\r\n')


def token_login(mechanism: str, message: bytes) -> UpstreamLogin:
    return UpstreamLogin(tag="a1", user=ALICE, password="", starttls=False,
                         client_ip="192.0.2.7", client_port=4242, mechanism=mechanism,
                         response=message)


def test_token_relayed_with_sasl_ir_and_an_error_challenge_acknowledged():
    """XOAUTH2 goes as AUTHENTICATE with an initial response when the server has
    SASL-IR; the server's error challenge is answered (empty line) and its NO ends the
    login; a second challenge would be cancelled."""
    msg = f"user={ALICE}\x01auth=Bearer tok\x01\x01".encode()
    lg = token_login("XOAUTH2", msg)
    assert got(lg, b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n") == [
        ReportCapabilities(("IMAP4rev1", "SASL-IR", "AUTH=XOAUTH2")),
        SendToUpstream(b"a1 AUTHENTICATE XOAUTH2 " + base64.b64encode(msg) + b"\r\n")]
    assert got(lg, b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n") == [SendToUpstream(b"\r\n")]
    assert got(lg, b"+ again\r\n") == [SendToUpstream(b"*\r\n")]
    no = b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert got(lg, no) == [LoginAnswered(False, b"", no)]
    assert "tok" not in repr(lg)


def test_token_relayed_after_a_continuation_without_sasl_ir():
    """Without SASL-IR: AUTHENTICATE OAUTHBEARER, then the message after the server's
    +; an error challenge is acknowledged with %x01 (RFC 7628)."""
    msg = f"n,a={ALICE},\x01auth=Bearer tok\x01\x01".encode()
    lg = token_login("OAUTHBEARER", msg)
    assert got(lg, b"* OK [CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER] hi\r\n")[1:] == [
        SendToUpstream(b"a1 AUTHENTICATE OAUTHBEARER\r\n")]
    assert got(lg, b"+ \r\n") == [SendToUpstream(base64.b64encode(msg) + b"\r\n")]
    assert got(lg, b"+ eyJ9\r\n") == [SendToUpstream(b"AQ==\r\n")]
    assert got(lg, b"a1 OK Logged in\r\n") == [
        LoginAnswered(True, b"", b"a1 OK Logged in\r\n")]


def test_probe_reports_capabilities_and_logs_out():
    """A probe asks for the capabilities (over TLS when STARTTLS), reports them and
    logs out without ID or login."""
    lg = UpstreamLogin.probe(starttls=True)
    assert got(lg, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n") == [
        SendToUpstream(b"mw.tls STARTTLS\r\n")]
    assert got(lg, b"mw.tls OK\r\n") == [StartUpstreamTls()]
    assert lg.handle(UpstreamTlsEstablished()) == [SendToUpstream(b"mw.cap CAPABILITY\r\n")]
    assert got(lg, b"* CAPABILITY IMAP4rev1 ID AUTH=PLAIN AUTH=LOGIN\r\nmw.cap OK\r\n") == [
        ReportCapabilities(("IMAP4rev1", "ID", "AUTH=PLAIN", "AUTH=LOGIN")),
        SendToUpstream(b"mw.bye LOGOUT\r\n")]
    assert lg.phase is Phase.DONE


def test_password_not_in_repr():
    """Neither the login object nor its commands show the password."""
    lg = login()
    cmds = got(lg, b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    assert PW not in repr(lg) and PW not in repr(cmds)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=20), st.booleans(), st.booleans())
def test_any_upstream_bytes_progress_or_raise_remote_error(chunks: list[bytes],
                                                            starttls: bool, token: bool):
    """Any bytes from the server give commands or RemoteProtocolError, nothing else
    (password and token logins alike)."""
    lg = token_login("XOAUTH2", b"user=a\x01auth=Bearer t\x01\x01") if token else login(
        starttls=starttls)
    try:
        for chunk in chunks:
            if lg.phase is Phase.DONE:
                break
            cmds = got(lg, chunk)
            if StartUpstreamTls() in cmds:
                lg.handle(UpstreamTlsEstablished())
    except RemoteProtocolError:
        pass
