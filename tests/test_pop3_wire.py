"""Tables, split-point and property tests of the sans-IO pre-auth POP3 parser (no sockets)."""

from __future__ import annotations

import base64

import pytest
from helpers.wire import drain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.frontends.pop3_wire import (
    MAX_LINE_BYTES,
    MAX_RESPONSE_BYTES,
    NEED_DATA,
    PAUSED,
    AuthCancelled,
    AuthData,
    AuthStarted,
    BadCommand,
    CapaRequested,
    Connection,
    LimitExceeded,
    LocalProtocolError,
    LoginAttempted,
    MechanismsRequested,
    Pop3ProtocolError,
    PrivacyRequired,
    QuitRequested,
    RemoteProtocolError,
    State,
    StlsRequested,
    UserGiven,
    capa_response,
    decode_plain,
    err_line,
    ok_line,
)
from proxy.frontends.preauth_wire import TRANSITIONS

pytestmark = pytest.mark.pure

ALICE = "alice@corp.example"
CRED = base64.b64encode(b"\0alice@corp.example\0s3cret")


def events(conn: Connection, data: bytes = b"") -> list[object]:
    """Feed ``data`` and drain every event until NEED_DATA or PAUSED."""
    return drain(conn, data, stop=(NEED_DATA, PAUSED), last=LimitExceeded)


# One command line over TLS -> (events, state after). Each row is a sentence of RFC
# 1939 / 2449 / 2595 / 5034 as the proxy reads it.
TABLE = [
    (b"CAPA\r\n", [CapaRequested()], State.COMMANDS),
    (b"capa\n", [CapaRequested()], State.COMMANDS),  # case, bare LF
    (b"QUIT\r\n", [QuitRequested()], State.CLOSED),
    (b"USER alice@corp.example\r\n", [UserGiven(ALICE)], State.COMMANDS),
    (b"PASS x\r\n", [BadCommand("No user name given; send USER first")],
     State.COMMANDS),
    (b"AUTH\r\n", [MechanismsRequested()], State.COMMANDS),
    (b"AUTH PLAIN\r\n", [AuthStarted("PLAIN", None)], State.AUTHENTICATING),
    (b"auth plain " + CRED + b"\r\n",
     [AuthStarted("PLAIN", b"\0alice@corp.example\0s3cret")], State.AWAITING_LOGIN),
    (b"AUTH PLAIN =\r\n", [AuthStarted("PLAIN", b"")], State.AWAITING_LOGIN),
    (b"AUTH PLAIN !!!\r\n", [BadCommand("Invalid base64")], State.COMMANDS),
    (b"AUTH CRAM-MD5\r\n", [BadCommand("Unsupported authentication mechanism")],
     State.COMMANDS),
    (b"AUTH PLAIN a b\r\n",
     [BadCommand("AUTH needs a mechanism and at most an initial response")],
     State.COMMANDS),
    (b"STLS\r\n", [BadCommand("TLS is already active")], State.COMMANDS),
    (b"CAPA now\r\n", [BadCommand("CAPA takes no arguments")], State.COMMANDS),
    (b"APOP alice 0123\r\n",
     [BadCommand("APOP is not supported; use USER/PASS or AUTH PLAIN")], State.COMMANDS),
    (b"RETR 1\r\n", [BadCommand("RETR is not allowed before login")], State.COMMANDS),
    (b"NOOP\r\n", [BadCommand("NOOP is not allowed before login")], State.COMMANDS),
    (b"XYZZY\r\n", [BadCommand("Unknown command")], State.COMMANDS),
    (b"\r\n", [BadCommand("Empty command line")], State.COMMANDS),
    (b"\x00\xff\r\n", [BadCommand("Unknown command")], State.COMMANDS),
    (b"USER\r\n", [BadCommand("USER needs a user name")], State.COMMANDS),
    (b"USER a\x00b\r\n", [BadCommand("USER needs a user name")], State.COMMANDS),
    (b"USER \xff\r\n", [BadCommand("The user name is not UTF-8")], State.COMMANDS),
]


@pytest.mark.parametrize(("line", "expected", "state"), TABLE)
def test_command_table(line: bytes, expected: list[object], state: State) -> None:
    """Each pre-auth command line gives the events and the state of the table."""
    conn = Connection(tls=True)
    assert events(conn, line) == expected
    assert conn.state is state


def test_user_then_pass_gives_the_credentials_with_spaces_kept_and_not_in_repr():
    """PASS takes the rest of the line, spaces included, and the password never shows
    in repr; the connection then waits for the login result."""
    conn = Connection(tls=True)
    got = events(conn, b"USER alice@corp.example\r\nPASS  two words \r\nCAPA\r\n")
    assert got == [UserGiven(ALICE), LoginAttempted(ALICE, " two words ")]
    assert "two words" not in repr(got[1])
    assert conn.state is State.AWAITING_LOGIN and conn.next_event() is PAUSED
    assert conn.login_accepted() == b"CAPA\r\n"  # pipelined: for the upstream
    assert conn.state is State.HANDED_OVER


def test_a_password_that_is_not_utf8_survives_unchanged():
    """USER/PASS has no charset: a Latin-1 password reaches the upstream as sent."""
    conn = Connection(tls=True)
    got = events(conn, b"USER a\r\nPASS caf\xe9\r\n")
    assert isinstance(got[1], LoginAttempted)
    assert got[1].password.encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_refused_login_forgets_the_user_and_allows_another_try():
    """After login_refused the parser reads commands again and wants USER first."""
    conn = Connection(tls=True)
    events(conn, b"USER a\r\nPASS b\r\n")
    conn.login_refused()
    assert events(conn, b"PASS b\r\n") == [BadCommand("No user name given; send USER first")]
    assert events(conn, b"USER a\r\nPASS c\r\n") == [UserGiven("a"), LoginAttempted("a", "c")]


def test_sasl_continuation_data_cancel_and_bad_base64():
    """After AUTH PLAIN the next line is the response: base64, empty, or * to cancel."""
    conn = Connection(tls=True)
    assert events(conn, b"AUTH PLAIN\r\n" + CRED + b"\r\n") == [
        AuthStarted("PLAIN", None), AuthData(b"\0alice@corp.example\0s3cret")]
    conn.login_refused()
    assert events(conn, b"AUTH PLAIN\r\n*\r\n") == [AuthStarted("PLAIN", None), AuthCancelled()]
    assert events(conn, b"AUTH PLAIN\r\n\r\n") == [AuthStarted("PLAIN", None), AuthData(b"")]
    conn.login_refused()
    assert events(conn, b"AUTH PLAIN\r\n@@\r\n") == [
        AuthStarted("PLAIN", None), BadCommand("AUTH: Invalid base64")]
    assert conn.state is State.COMMANDS


def test_before_tls_credentials_are_privacy_required_and_stls_discards_pipelined_bytes():
    """Before TLS, USER/PASS/AUTH PLAIN are refused by event (AUTH alone lists); bytes
    pipelined after STLS are dropped, and after the handshake USER is read."""
    conn = Connection(tls=False, starttls=True)
    assert events(conn, b"USER a\r\nPASS b\r\nAUTH PLAIN =\r\nAUTH\r\n") == [
        PrivacyRequired("USER"), PrivacyRequired("PASS"), PrivacyRequired("AUTH"),
        MechanismsRequested()]
    assert events(conn, b"STLS\r\nUSER evil\r\n") == [StlsRequested()]
    conn.receive_data(b"PASS evil\r\n")
    assert conn.next_event() is PAUSED
    conn.starttls_done()
    assert conn.tls and conn.buffered == 0
    assert events(conn, b"STLS\r\nUSER a\r\n") == [
        BadCommand("TLS is already active"), UserGiven("a")]


def test_events_validate_their_fields_and_keep_sasl_data_out_of_repr():
    """PrivacyRequired only names a command that carries credentials, and AuthData's
    bytes (a password, for PLAIN) are not in its repr."""
    with pytest.raises(ValueError):
        PrivacyRequired("CAPA")
    assert "s3cret" not in repr(AuthData(b"\0alice\0s3cret"))
    assert AuthData(b"x") == AuthData(b"x") != AuthStarted("PLAIN", b"x")


def test_stls_unavailable_and_cleartext_allowed_on_loopback():
    """An implicit-TLS listener has no STLS; a loopback listener allowing cleartext
    reads USER/PASS before TLS."""
    assert events(Connection(starttls=False), b"STLS\r\n") == [
        BadCommand("STLS is not available here")]
    conn = Connection(cleartext_login=True)
    assert events(conn, b"USER a\r\nPASS b\r\n") == [UserGiven("a"), LoginAttempted("a", "b")]


def test_line_limit_and_command_limit():
    """A line of MAX_LINE_BYTES without LF, or one command too many, is a LimitExceeded,
    after which the parser raises its own error."""
    conn = Connection(tls=True)
    assert events(conn, b"USER " + b"a" * (MAX_LINE_BYTES - 8) + b"\r\n")[0] == UserGiven(
        "a" * (MAX_LINE_BYTES - 8))
    assert events(conn, b"X" * MAX_LINE_BYTES) == [
        LimitExceeded("line", "Command line too long")]
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    conn = Connection(tls=True, max_commands=3)
    assert events(conn, b"CAPA\r\n" * 4) == [CapaRequested()] * 3 + [
        LimitExceeded("commands", "Too many commands before login")]
    assert conn.state is State.ERROR


def test_outcomes_the_state_does_not_allow_are_local_errors():
    """Reporting a login result while reading commands is the caller's bug."""
    conn = Connection(tls=True)
    with pytest.raises(LocalProtocolError):
        conn.login_accepted()
    with pytest.raises(LocalProtocolError):
        conn.starttls_done()
    assert all(isinstance(k[0], State) and isinstance(v, State) for k, v in TRANSITIONS.items())


@pytest.mark.parametrize("split", range(1, 40))
def test_any_split_point_gives_the_same_events(split: int):
    """The same bytes cut anywhere in two give the same events."""
    data = b"CAPA\r\nUSER alice@corp.example\r\nPASS pw\r\n"
    whole = events(Connection(tls=True), data)
    conn = Connection(tls=True)
    got = events(conn, data[:split]) + events(conn, data[split:])
    assert got == whole == [CapaRequested(), UserGiven(ALICE), LoginAttempted(ALICE, "pw")]


def test_replies_are_single_ascii_lines_within_the_rfc_limit():
    """Reply text is made ASCII, stripped of CR/LF, and kept within 512 octets."""
    line = err_line("TikTok \u2014 uninstall\r\n* it" + "x" * 2000, "SYS/PERM")
    assert line.startswith(b"-ERR [SYS/PERM] TikTok - uninstall * it")
    assert line.count(b"\r\n") == 1 and len(line) <= MAX_RESPONSE_BYTES
    assert ok_line("") == b"+OK .\r\n"
    assert capa_response(["TOP", "USER"]) == (
        b"+OK Capability list follows\r\nTOP\r\nUSER\r\n.\r\n")


def test_decode_plain():
    """PLAIN messages split into authzid, user and password; malformed ones are the
    client's fault."""
    assert decode_plain(b"\0alice\0pw") == ("", "alice", "pw")
    assert decode_plain(b"admin\0alice\0p") == ("admin", "alice", "p")
    for bad in (b"alice\0pw", b"\0\0pw", b"\0\xff\0pw"):
        with pytest.raises(RemoteProtocolError):
            decode_plain(bad)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=12), st.booleans(), st.booleans())
def test_any_input_parses_or_raises_the_parsers_own_error(
        chunks: list[bytes], tls: bool, cleartext: bool):
    """Whatever the client sends, the parser gives events or raises its own error."""
    conn = Connection(tls=tls, cleartext_login=cleartext, max_commands=20)
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if ev is PAUSED:
                    if conn.state is State.AWAITING_LOGIN:
                        conn.login_refused()
                        continue
                    if conn.state is State.TLS_HANDSHAKE:
                        conn.starttls_done()
                        continue
                    break
    except Pop3ProtocolError:
        pass


@settings(max_examples=200)
@given(st.lists(st.sampled_from([b"CAPA", b"USER a", b"PASS b", b"AUTH", b"AUTH PLAIN",
                                 b"*", CRED, b"AUTH PLAIN =", b"QUIT", b"X" * 50, b"STLS"]),
                max_size=15),
       st.integers(min_value=1, max_value=30))
def test_command_streams_fed_in_pieces_match_whole(cmds: list[bytes], size: int):
    """Any stream of plausible commands, fed in pieces of any size, gives the same events
    as fed whole (with login results reported the same way)."""
    data = b"".join(c + b"\r\n" for c in cmds)

    def drive(pieces: list[bytes]) -> list[object]:
        conn = Connection(tls=True)
        out: list[object] = []
        for piece in pieces:
            conn.receive_data(piece)
            while (ev := conn.next_event()) is not NEED_DATA:
                if ev is PAUSED:
                    if conn.state is not State.AWAITING_LOGIN:
                        return out
                    conn.login_refused()
                    continue
                out.append(ev)
        return out

    assert drive([data[i:i + size] for i in range(0, len(data), size)]) == drive([data])
