"""Conversation and property tests of the sans-IO pre-auth IMAP parser (no sockets)."""

from __future__ import annotations

import base64

import pytest
from helpers.wire import drain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.frontends.imap_syntax import bye_line, continuation_line, greeting_line, tagged_line
from proxy.frontends.imap_wire import (
    MAX_LINE_BYTES,
    MAX_LITERAL_BYTES,
    NEED_DATA,
    PAUSED,
    AuthenticateCancelled,
    AuthenticateData,
    AuthenticateStarted,
    BadCommand,
    CommandReceived,
    Connection,
    ContinuationNeeded,
    IdReceived,
    ImapProtocolError,
    LimitExceeded,
    LocalProtocolError,
    LoginAttempted,
    PrivacyRequired,
    RemoteProtocolError,
    StartTlsRequested,
    State,
    decode_plain,
)

pytestmark = pytest.mark.pure


def events(conn: Connection, data: bytes = b"") -> list[object]:
    """Feed ``data`` and drain every event until NEED_DATA or PAUSED."""
    return drain(conn, data, stop=(NEED_DATA, PAUSED), last=LimitExceeded)


def test_simple_commands_become_events():
    """CAPABILITY, NOOP and LOGOUT are recognised case-insensitively with their tags."""
    conn = Connection()
    got = events(conn, b"a1 capability\r\na2 NOOP\r\na3 Logout\r\n")
    assert got == [
        CommandReceived("a1", "CAPABILITY"),
        CommandReceived("a2", "NOOP"),
        CommandReceived("a3", "LOGOUT"),
    ]
    assert conn.state is State.CLOSED
    assert conn.next_event() is PAUSED


def test_login_with_atoms_and_quoted_strings():
    """LOGIN takes atoms and quoted strings with escapes; the password is not in repr."""
    conn = Connection()
    got = events(conn, b'a LOGIN alice@corp.example "p\\"a ss\\\\"\r\n')
    assert got == [LoginAttempted("a", "alice@corp.example", 'p"a ss\\')]
    assert "p\\\"a" not in repr(got[0]) and "ss" not in repr(got[0])
    assert conn.state is State.AWAITING_LOGIN
    assert conn.next_event() is PAUSED


def test_login_with_synchronizing_literal_asks_for_continuation():
    """Over TLS a {n} literal within limits yields ContinuationNeeded, then the literal
    is read."""
    conn = Connection(tls=True)
    assert events(conn, b"t1 LOGIN {5}\r\n") == [ContinuationNeeded("t1")]
    assert events(conn, b"alice {6}\r\n") == [ContinuationNeeded("t1")]
    assert events(conn, b"s\xc3\xa9cre\r\n") == [LoginAttempted("t1", "alice", "sécre")]


def test_login_with_non_synchronizing_literal():
    """{n+} (LITERAL+) needs no continuation."""
    conn = Connection()
    got = events(conn, b"t1 LOGIN {5+}\r\nalice {3+}\r\npw!\r\n")
    assert got == [LoginAttempted("t1", "alice", "pw!")]


def test_login_refused_then_retry_and_accept_hands_over_pipelined_bytes():
    """After a refused login the parser continues; after acceptance it hands over the rest."""
    conn = Connection()
    assert events(conn, b"a LOGIN u p\r\n") == [LoginAttempted("a", "u", "p")]
    conn.login_refused()
    assert events(conn, b"b LOGIN u q\r\nc SELECT INBOX\r\n") == [LoginAttempted("b", "u", "q")]
    assert conn.login_accepted() == b"c SELECT INBOX\r\n"
    assert conn.state is State.HANDED_OVER
    with pytest.raises(LocalProtocolError):  # the caller's mistake, not the client's
        conn.login_refused()


def test_authenticate_plain_with_initial_response():
    """SASL-IR: the credentials arrive with the command."""
    ir = base64.b64encode(b"\x00alice\x00secret")
    conn = Connection()
    got = events(conn, b"x AUTHENTICATE PLAIN " + ir + b"\r\n")
    assert got == [AuthenticateStarted("x", "PLAIN", b"\x00alice\x00secret")]
    assert decode_plain(got[0].initial_response) == ("", "alice", "secret")
    assert conn.state is State.AWAITING_LOGIN


def test_authenticate_plain_without_initial_response():
    """Without SASL-IR the next line is the response; '*' cancels."""
    conn = Connection()
    assert events(conn, b"x authenticate plain\r\n") == [AuthenticateStarted("x", "PLAIN", None)]
    assert conn.state is State.AUTHENTICATING
    assert events(conn, b"*\r\n") == [AuthenticateCancelled("x")]
    events(conn, b"y AUTHENTICATE PLAIN\r\n")
    data = base64.b64encode(b"\x00bob\x00pw")
    assert events(conn, data + b"\r\n") == [AuthenticateData("y", b"\x00bob\x00pw")]
    assert conn.state is State.AWAITING_LOGIN


def test_authenticate_bad_base64_and_unknown_mechanism():
    """Broken SASL data and unsupported mechanisms are BAD, not fatal."""
    conn = Connection()
    events(conn, b"x AUTHENTICATE PLAIN\r\n")
    assert events(conn, b"!!notbase64\r\n") == [BadCommand("x", "AUTHENTICATE: invalid base64")]
    got = events(conn, b"y AUTHENTICATE CRAM-MD5\r\n")
    assert isinstance(got[0], BadCommand) and "CRAM-MD5" in got[0].text
    assert conn.state is State.COMMANDS


def test_sasl_continue_reads_another_response_line_under_the_same_tag():
    """After a further challenge (LOGIN's Password:) the next line is read as the
    response of the same AUTHENTICATE, with or without an initial response first;
    sasl_continue is refused outside an exchange awaiting its outcome."""
    conn = Connection()
    user = base64.b64encode(b"alice")
    assert events(conn, b"x AUTHENTICATE LOGIN " + user + b"\r\n") == [
        AuthenticateStarted("x", "LOGIN", b"alice")]
    conn.sasl_continue()
    assert conn.state is State.AUTHENTICATING
    assert events(conn, base64.b64encode(b"pw") + b"\r\n") == [AuthenticateData("x", b"pw")]
    assert conn.state is State.AWAITING_LOGIN
    conn.login_refused()
    with pytest.raises(LocalProtocolError):
        conn.sasl_continue()


def test_decode_plain_rejects_malformed():
    """Malformed PLAIN credentials are the client's fault, answered BAD."""
    with pytest.raises(RemoteProtocolError) as err:
        decode_plain(b"alice\x00secret")
    assert err.value.reply == "BAD"
    with pytest.raises(RemoteProtocolError):
        decode_plain(b"\x00\x00secret")


def test_id_command():
    """ID NIL and ID with pairs (NIL values allowed)."""
    conn = Connection()
    got = events(conn, b'a ID NIL\r\nb ID ("name" "K-9" "version" NIL)\r\n')
    assert got == [IdReceived("a", None), IdReceived("b", (("name", "K-9"), ("version", None)))]
    assert isinstance(events(conn, b"c ID (name)\r\n")[0], BadCommand)


def test_post_auth_commands_and_garbage_are_bad_but_not_fatal():
    """SELECT before login, missing tags and empty lines get BAD and parsing continues."""
    conn = Connection()
    got = events(conn, b"a SELECT INBOX\r\n\r\n+ NOOP\r\nb NOOP extra\r\nc NOOP\r\n")
    assert [type(e) for e in got] == [BadCommand] * 4 + [CommandReceived]
    assert got[0] == BadCommand("a", "Command SELECT not allowed before login")
    assert got[1].tag == "*" and got[2].tag == "*"


def test_starttls_discards_pipelined_commands():
    """Bytes after STARTTLS (the injection) never become events."""
    conn = Connection()
    got = events(conn, b"a STARTTLS\r\nb LOGIN evil pw\r\n")
    assert got == [StartTlsRequested("a")]
    conn.receive_data(b"c LOGIN more evil\r\n")
    assert conn.next_event() is PAUSED
    conn.starttls_done()
    assert conn.tls and conn.state is State.COMMANDS
    assert conn.next_event() is NEED_DATA
    got = events(conn, b"d STARTTLS\r\n")
    assert got == [BadCommand("d", "TLS is already active")]


def test_line_too_long_is_fatal_and_bounded():
    """A line without LF beyond MAX_LINE_BYTES ends the connection; later data is dropped."""
    conn = Connection()
    got = events(conn, b"a NOOP " + b"x" * MAX_LINE_BYTES)
    assert got == [LimitExceeded("a", "line", "Command line too long")]
    conn.receive_data(b"y" * 100_000)
    assert conn.buffered == 0
    with pytest.raises(RemoteProtocolError) as err:
        conn.next_event()
    assert err.value.reply == "BYE"


def test_huge_literal_refused_without_continuation():
    """A 100 MB literal is refused at once: no ContinuationNeeded, no buffering."""
    conn = Connection()
    got = events(conn, b"a LOGIN {104857600}\r\n")
    text = f"Literal too large (limit {MAX_LITERAL_BYTES} bytes)"
    assert got == [LimitExceeded("a", "literal", text)]
    got = events(Connection(), b"a LOGIN {104857600+}\r\n")
    assert isinstance(got[0], LimitExceeded)


def test_literal_at_limit_is_accepted():
    conn = Connection()
    pw = b"p" * MAX_LITERAL_BYTES
    got = events(conn, b"a LOGIN u {%d+}\r\n" % len(pw) + pw + b"\r\n")
    assert got == [LoginAttempted("a", "u", pw.decode())]


def test_too_many_commands():
    """The (max_commands + 1)th command is a LimitExceeded."""
    conn = Connection(max_commands=3)
    got = events(conn, b"a NOOP\r\n" * 10)
    assert [type(e) for e in got] == [CommandReceived] * 3 + [LimitExceeded]
    assert got[-1].limit == "commands"


def test_reply_lines_never_emit_raw_newlines():
    """Texts from policy cannot split a response line or forge a tagged reply."""
    out = tagged_line("a", "NO", "bad\r\na OK fake", "AUTHORIZATIONFAILED")
    assert out == b"a NO [AUTHORIZATIONFAILED] bad  a OK fake\r\n"
    assert bye_line("bye") == b"* BYE bye\r\n"
    assert continuation_line() == b"+ \r\n"
    assert greeting_line(["IMAP4rev1", "STARTTLS"]).startswith(
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS] "
    )


# --------------------------------------------------------------------- properties


def drain_all(chunks: list[bytes], max_commands: int = 1000) -> list[object]:
    """Feed chunks one by one; refuse every login so parsing continues; stop at STARTTLS,
    LOGOUT or a broken limit (where the executor would act on the connection)."""
    conn = Connection(max_commands=max_commands)
    out: list[object] = []
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
                return out
            out.append(ev)
            if isinstance(ev, LimitExceeded):
                return out
    return out


_pieces = st.sampled_from([
    b"a1 NOOP\r\n", b"a2 CAPABILITY\r\n", b"a3 LOGIN alice secret\r\n",
    b'a4 LOGIN "al ice" {3}\r\npw!\r\n', b"a5 LOGIN {2+}\r\nab cd\r\n",
    b"a6 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n", b"a7 AUTHENTICATE PLAIN\r\n",
    b"AGFsaWNlAHNlY3JldA==\r\n", b"*\r\n", b'a8 ID ("name" "x")\r\n', b"a9 SELECT INBOX\r\n",
    b"\r\n", b"{999999}\r\n", b"x" * 300, b"\n", b"\r", b'"', b"{", b"}", b"(", b" ",
])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes):
    """Any input either parses or raises RemoteProtocolError, never anything else."""
    conn = Connection()
    conn.receive_data(data)
    try:
        for _ in range(10_000):
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if ev is PAUSED:
                if conn.state is State.AWAITING_LOGIN:
                    conn.login_refused()
                    continue
                break
    except RemoteProtocolError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_pieces, max_size=30), st.lists(st.integers(0, 10_000), max_size=20))
def test_split_points_do_not_change_events(pieces: list[bytes], cuts: list[int]):
    """Delivering the same bytes in any chunking gives the same events."""
    data = b"".join(pieces)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert drain_all(chunks) == drain_all([data])
    assert drain_all([bytes([b]) for b in data]) == drain_all([data])


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_split_points_random_bytes(data: bytes, cuts: list[int]):
    """The split invariant also holds for arbitrary bytes."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert drain_all(chunks) == drain_all([data])


def test_line_limit_boundary():
    """A line of exactly MAX_LINE_BYTES (CRLF included) parses; one more byte does not."""
    head = b"a NOOP"
    line = head + b" " * (MAX_LINE_BYTES - len(head) - 2) + b"\r\n"
    assert len(line) == MAX_LINE_BYTES
    got = events(Connection(), line)
    assert isinstance(got[0], BadCommand | CommandReceived)
    got = events(Connection(), b"a NOOP " + b" " * (MAX_LINE_BYTES - 8) + b"\r\n")
    assert isinstance(got[0], LimitExceeded)


def test_reserved_tags_are_refused() -> None:
    """Tags the proxy uses upstream (mw.*) are refused before login, so an upstream
    answer to the proxy can never be taken for the answer to a client command."""
    conn = Connection()
    conn.receive_data(b"mw.id LOGIN alice secret\r\nMW.X NOOP\r\n")
    first, second = conn.next_event(), conn.next_event()
    assert isinstance(first, BadCommand) and first.tag == "mw.id"
    assert isinstance(second, BadCommand) and second.tag == "MW.X"


def test_login_literal_before_tls_is_not_invited() -> None:
    """Before TLS a LOGIN with a synchronizing literal gets no `+`: the command is
    dropped (PrivacyRequired) and the next command parses normally; with TLS, or
    when config allows cleartext, the literal is invited as usual."""
    conn = Connection()
    conn.receive_data(b"a LOGIN {5}\r\nb NOOP\r\n")
    assert conn.next_event() == PrivacyRequired("a")
    assert conn.next_event() == CommandReceived("b", "NOOP")
    for conn in (Connection(tls=True), Connection(cleartext_login=True)):
        conn.receive_data(b"a LOGIN {5}\r\n")
        assert isinstance(conn.next_event(), ContinuationNeeded)


def test_error_types_say_whose_fault_it_is() -> None:
    """Both error types are ImapProtocolError; the peer's carries a reply hint, and
    PrivacyRequired is one of the parser's events."""
    assert issubclass(RemoteProtocolError, ImapProtocolError)
    assert issubclass(LocalProtocolError, ImapProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert RemoteProtocolError("x").reply == "BAD"
    from proxy.frontends import imap_wire

    assert PrivacyRequired in imap_wire.Event.__args__  # type: ignore[attr-defined]
