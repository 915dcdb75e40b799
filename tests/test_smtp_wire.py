"""The sans-IO SMTP parser (proxy.frontends.smtp_wire) and the reply catalogue: whole
conversations without sockets, split points, limits, smuggling, and property tests
(any input gives events; only the parser's own errors escape)."""

from __future__ import annotations

import base64
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.frontends import smtp_session, smtp_wire
from proxy.frontends.smtp_events import check_reply
from proxy.frontends.smtp_relay import dot_stuff, normalize_line_endings
from proxy.frontends.smtp_replies import Replies
from proxy.frontends.smtp_wire import (
    MAX_COMMAND_BYTES,
    MAX_LINE_BYTES,
    MAX_UNRECOGNIZED_COMMANDS,
    NEED_DATA,
    PAUSED,
    AuthCancelled,
    AuthResponse,
    AuthStarted,
    ChunkReceived,
    ClientError,
    Connection,
    DataRequested,
    Event,
    Hello,
    LimitExceeded,
    MailFrom,
    MessageReceived,
    PassThrough,
    PrivacyRequired,
    QuitRequested,
    RcptTo,
    ReplyNeeded,
    ResetRequested,
    StartTlsRequested,
    State,
    UsageError,
    check_parameters,
    decode_plain,
    parse_path,
)

pytestmark = pytest.mark.pure

PLAIN = base64.b64encode(b"\0alice@example.test\0secret")


# ------------------------------------------------------------------ a scripted executor


def answer(conn: Connection, event: Event) -> str:
    """What a well-behaved executor answers (the upstream accepting everything)."""
    replies: dict[type, str] = {
        Hello: "250 mailward", StartTlsRequested: Replies.READY_FOR_TLS,
        AuthStarted: Replies.AUTH_OK, AuthResponse: Replies.AUTH_OK,
        AuthCancelled: Replies.AUTH_ABORTED, MailFrom: "250 2.1.0 Ok",
        RcptTo: "250 2.1.5 Ok", DataRequested: Replies.START_MAIL,
        MessageReceived: "250 2.0.0 queued", ResetRequested: Replies.OK,
        QuitRequested: Replies.BYE, ChunkReceived: "250 2.0.0 Ok: chunk",
        PassThrough: "252 2.0.0 upstream",
    }
    if isinstance(event, (ReplyNeeded, PrivacyRequired, LimitExceeded)):
        return event.reply
    if isinstance(event, AuthStarted) and event.initial_response is None:
        return Replies.PLAIN_CHALLENGE
    return replies[type(event)]


def run(conn: Connection, data: bytes) -> list[Event]:
    """Feed ``data``; answer every event; finish STARTTLS at once."""
    conn.receive_data(data)
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            if conn.state is State.STARTTLS:
                conn.starttls_done()
                continue
            return events
        assert not isinstance(event, type(NEED_DATA))
        events.append(event)
        conn.send(answer(conn, event))


def starttls_conn() -> Connection:
    return Connection(starttls=True)


def logged_in(**kwargs: typing.Any) -> Connection:
    conn = Connection(tls=True, **kwargs)
    run(conn, b"EHLO phone\r\nAUTH PLAIN " + PLAIN + b"\r\n")
    assert conn.authenticated
    return conn


CONVERSATION = (
    b"EHLO phone.example\r\nSTARTTLS\r\n",
    b"EHLO phone.example\r\nAUTH PLAIN " + PLAIN + b"\r\n"
    b"MAIL FROM:<alice@example.test> BODY=8BITMIME\r\nRCPT TO:<bob@example.test>\r\n"
    b"DATA\r\nSubject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n",
)


def conversation_events() -> list[Event]:
    conn = starttls_conn()
    return run(conn, CONVERSATION[0]) + run(conn, CONVERSATION[1])


# ------------------------------------------------------------------ conversations


def test_a_whole_submission_gives_these_events() -> None:
    """EHLO, STARTTLS, EHLO, AUTH, MAIL, RCPT, DATA, the message, RSET, QUIT: one
    event each, in order, the message dot-unstuffed."""
    assert conversation_events() == [
        Hello("phone.example", True), StartTlsRequested(), Hello("phone.example", True),
        AuthStarted("PLAIN", b"\0alice@example.test\0secret"),
        MailFrom(b"<alice@example.test>", (b"BODY=8BITMIME",)),
        RcptTo(b"<bob@example.test>"), DataRequested(),
        MessageReceived(b"Subject: hi\r\n\r\n.dot\r\nbody\r\n"), ResetRequested(),
        QuitRequested(),
    ]


def test_every_split_point_gives_the_same_events() -> None:
    """The bytes may arrive in any two pieces: the events are the same."""
    whole = conversation_events()
    data = CONVERSATION[1]
    for cut in range(len(data) + 1):
        conn = starttls_conn()
        events = run(conn, CONVERSATION[0])
        events += run(conn, data[:cut])
        events += run(conn, data[cut:])
        assert events == whole, cut


def test_pipelined_commands_wait_for_the_previous_reply() -> None:
    """Nothing is parsed while an event awaits its reply (RFC 2920 order)."""
    conn = logged_in()
    conn.receive_data(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    assert conn.next_event() == MailFrom(b"<a@x>", ())
    assert conn.next_event() is PAUSED
    conn.send("250 ok")
    assert conn.next_event() == RcptTo(b"<b@x>")


def test_auth_login_and_a_cancelled_auth() -> None:
    """AUTH LOGIN reads one SASL line per 334; ``*`` cancels."""
    conn = Connection(tls=True)
    run(conn, b"EHLO phone\r\n")
    conn.receive_data(b"AUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n"
                      + base64.b64encode(b"pw") + b"\r\nAUTH PLAIN\r\n*\r\n")
    assert conn.next_event() == AuthStarted("LOGIN", None)
    conn.send(Replies.USERNAME_CHALLENGE)
    assert conn.next_event() == AuthResponse(b"alice")
    conn.send(Replies.PASSWORD_CHALLENGE)
    assert conn.next_event() == AuthResponse(b"pw")
    conn.send("535 5.7.8 no")
    assert not conn.authenticated
    assert conn.next_event() == AuthStarted("PLAIN", None)
    conn.send(Replies.PLAIN_CHALLENGE)
    assert conn.next_event() == AuthCancelled()
    conn.send(Replies.AUTH_ABORTED)
    assert conn.state is State.COMMAND


def test_credentials_and_messages_stay_out_of_reprs() -> None:
    """Passwords and message contents never reach logs through an event's repr."""
    assert "secret" not in repr(AuthStarted("PLAIN", b"\0a\0secret"))
    assert "secret" not in repr(AuthResponse(b"secret"))
    assert "secret" not in repr(MessageReceived(b"secret"))


def test_before_tls_only_ehlo_noop_starttls_quit() -> None:
    """On a STARTTLS listener, AUTH/MAIL/HELO before TLS are PrivacyRequired (530)."""
    conn = starttls_conn()
    events = run(conn, b"EHLO x\r\nNOOP\r\nAUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<a@b>\r\n"
                       b"HELO x\r\n")
    assert events[1] == ReplyNeeded(Replies.OK)
    assert events[2:] == [PrivacyRequired("AUTH"), PrivacyRequired("MAIL"),
                          PrivacyRequired("HELO")]
    assert not conn.authenticated


def test_bytes_pipelined_after_starttls_are_discarded() -> None:
    """RFC 3207 4.2: what arrived with or after STARTTLS never becomes a command."""
    conn = starttls_conn()
    conn.receive_data(b"EHLO x\r\n")
    conn.send(answer(conn, typing.cast(Event, conn.next_event())))
    conn.receive_data(b"STARTTLS\r\nMAIL FROM:<injected@x>\r\n")
    assert conn.next_event() == StartTlsRequested()
    conn.send(Replies.READY_FOR_TLS)
    conn.receive_data(b"RCPT TO:<injected@x>\r\n")  # before the handshake ends
    assert conn.next_event() is PAUSED
    conn.starttls_done()
    assert conn.next_event() is NEED_DATA
    assert conn.tls and conn.helo is None  # EHLO again


@pytest.mark.parametrize(("arg", "parsed"), [
    (b"<a@b.c>", (b"<a@b.c>", b"")),
    (b"<a@b.c> SIZE=123 BODY=8BITMIME", (b"<a@b.c>", b"SIZE=123 BODY=8BITMIME")),
    (b" <> ", (b"<>", b"")),
    (b'<"a > b"@c>', (b'<"a > b"@c>', b"")),
    (b'<"a \\" > b"@c> X', (b'<"a \\" > b"@c>', b"X")),
    (b"a@b.c", (b"<a@b.c>", b"")),
    (b"a@b.c SIZE=1", (b"<a@b.c>", b"SIZE=1")),
    (b"", (b"", b"")),
    (b"<a@b", None),
    (b"<a<b@c>", None),
    (b"a<b@c>", None),
])
def test_paths(arg: bytes, parsed: tuple[bytes, bytes] | None) -> None:
    """Paths are taken as the client wrote them (the upstream judges their syntax);
    a bare address gets angle brackets; an unclosed bracket is malformed."""
    assert parse_path(arg) == parsed


@pytest.mark.parametrize(("line", "reply"), [
    (b"MAIL FROM:<a@b> SIZE=999999999999", Replies.SIZE_EXCEEDED),
    (b"MAIL FROM:<a@b> SIZE=x", Replies.syntax("MAIL FROM: <address> [SP <mail-parameters>]")),
    (b"MAIL FROM:<a@b> BODY=BINARYMIME", Replies.BAD_BODY),
    (b"MAIL FROM:<a@b> SMTPUTF8=yes", Replies.BAD_SMTPUTF8),
    (b"MAIL FROM:<a@b> X-FOO=HDRS", Replies.MAIL_PARAMETERS),
    (b"MAIL FROM:<a@b", Replies.BAD_ADDRESS),
    (b"MAIL TO:<a@b>", Replies.syntax("MAIL FROM: <address> [SP <mail-parameters>]")),
    (b"RCPT TO:<a@b>", Replies.NEED_MAIL),
    (b"DATA", Replies.NEED_RCPT),
    (b"BOGUS", Replies.unrecognized("BOGUS")),
    (b"", Replies.BAD_SYNTAX),
    (b"NOOP \x00", Replies.BAD_SYNTAX),
    (b"NOOP " + b"x" * MAX_COMMAND_BYTES, Replies.LINE_TOO_LONG),
    (b"AUTH PLAIN " + PLAIN, Replies.ALREADY_AUTHENTICATED),
    (b"EXPN x", Replies.EXPN),
])
def test_errors_get_the_catalogue_reply_and_the_session_goes_on(line: bytes, reply: str) -> None:
    """Syntax and sequence errors are ReplyNeeded events; the session carries on."""
    conn = logged_in(message_limit=1000)
    conn.receive_data(line + b"\r\n")
    assert conn.next_event() == ReplyNeeded(reply)
    conn.send(reply)
    assert conn.state is State.COMMAND


def test_limits_end_the_connection() -> None:
    """A line over MAX_LINE_BYTES, too many commands before AUTH, and too many
    unrecognised commands each give LimitExceeded, and the connection is closed."""
    conn = Connection(tls=True)
    conn.receive_data(b"x" * MAX_LINE_BYTES)
    assert conn.next_event() == LimitExceeded("line", Replies.LINE_LIMIT)
    conn.send(Replies.LINE_LIMIT)
    assert conn.state is State.CLOSED
    conn = Connection(tls=True, max_commands=3)
    events = run(conn, b"NOOP\r\n" * 4)
    assert events[-1] == LimitExceeded("commands", Replies.TOO_MANY_COMMANDS)
    assert conn.state is State.CLOSED
    conn = logged_in()
    events = run(conn, b"BOGUS\r\n" * (MAX_UNRECOGNIZED_COMMANDS + 1))
    assert len(events) == MAX_UNRECOGNIZED_COMMANDS
    assert events[-1] == LimitExceeded("unrecognized", Replies.TOO_MANY_UNRECOGNIZED)


def test_a_message_over_the_limit_is_read_to_its_end_and_refused() -> None:
    """552 once the message has ended; a dot line cut from its CRLF by the discard
    does not end it early; what follows the real end is a command."""
    conn = logged_in(message_limit=100)
    run(conn, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    conn.receive_data(b"y" * 200 + b"z")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b".\r\nRCPT TO:<smuggled@x>\r\n")  # "z.\r\n": not an end
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\r\n.\r\nNOOP\r\n")
    assert conn.next_event() == ReplyNeeded(Replies.MESSAGE_TOO_BIG)
    conn.send(Replies.MESSAGE_TOO_BIG)
    assert conn.next_event() == ReplyNeeded(Replies.OK)
    assert not conn.in_mail


# ------------------------------------------------------------------ smuggling

#: Line endings around a dot that are not <CRLF>.<CRLF> (SMTP smuggling, 2023).
SMUGGLING_ENDINGS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r",
                     b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n.\r\x00\n"]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS)
def test_only_crlf_dot_crlf_ends_a_message(ending: bytes) -> None:
    """A smuggled end of data and the commands after it stay inside the one message;
    the upstream gets them dot-stuffed or length-counted, never as commands."""
    conn = logged_in()
    run(conn, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\nDATA\r\nforged\r\n"
    body = b"Subject: hi\r\n\r\nhello" + ending + smuggled
    events = run(conn, body + b".\r\nNOOP\r\n")
    unstuffed = body.replace(b"\r\n.", b"\r\n")  # RFC 5321 4.5.2, as for any line
    assert events == [MessageReceived(unstuffed), ReplyNeeded(Replies.OK)]
    assert smuggled in unstuffed
    wire = dot_stuff(normalize_line_endings(unstuffed))
    assert (b"\r\n" + wire).count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")


def test_commands_after_the_end_of_data_wait_for_the_data_reply() -> None:
    """Commands pipelined after <CRLF>.<CRLF> are parsed only after the message's
    reply, as commands of the next transaction, and are not part of the message."""
    conn = logged_in()
    run(conn, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    conn.receive_data(b"body\r\n.\r\nMAIL FROM:<c@x>\r\nQUIT\r\n")
    assert conn.next_event() == MessageReceived(b"body\r\n")
    assert conn.next_event() is PAUSED
    assert conn.in_mail  # until the reply
    conn.send("250 2.0.0 queued")
    assert not conn.in_mail
    assert conn.next_event() == MailFrom(b"<c@x>", ())


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_relayed_message_has_exactly_one_end(content: bytes) -> None:
    """Whatever the client's message holds, what goes upstream after DATA has one
    <CRLF>.<CRLF>: its own end."""
    wire = b"\r\n" + dot_stuff(normalize_line_endings(content))
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")


# ------------------------------------------------------------------ properties

_pieces = st.sampled_from([
    b"EHLO x\r\n", b"HELO x\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
    b"AUTH PLAIN " + PLAIN + b"\r\n", b"*\r\n", PLAIN + b"\r\n", b"MAIL FROM:<a@b>\r\n",
    b"RCPT TO:<c@d>\r\n", b"DATA\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"RSET\r\n",
    b"NOOP\r\n", b"QUIT\r\n", b"\r\n", b"\n", b"\r", b"\x00", b".", b"x" * 600, b"HELP\r\n",
    b"BDAT 5\r\n", b"BDAT 0 LAST\r\n", b"BDAT 3 LAST\r\nabc", b"BDAT x\r\n", b"VRFY a\r\n",
    b"ETRN x\r\n", b"MAIL FROM:<a@b> RET=HDRS ENVID=x+2B\r\n",
    b"RCPT TO:<c@d> NOTIFY=SUCCESS ORCPT=rfc822;c@d\r\n", b"RCPT TO:<c@d> NOTIFY=NEVER,X\r\n",
])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_pieces, st.binary(max_size=40)), max_size=40),
       st.booleans(), st.sets(st.sampled_from(smtp_wire.RELAYED_EXTENSIONS)))
def test_any_input_gives_events(pieces: list[bytes], starttls: bool,
                                extensions: set[str]) -> None:
    """Any bytes, answered as an executor would, whatever extensions are offered,
    give events: nothing escapes but the parser's own errors (and none is raised
    while the executor plays by the rules)."""
    conn = Connection(starttls=starttls, tls=not starttls, message_limit=2000,
                      extensions=frozenset(extensions))
    for piece in pieces:
        for event in run(conn, piece):
            assert isinstance(event, typing.get_args(Event))
        if conn.state is State.CLOSED:
            break


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decode_plain_raises_only_its_own_error(data: bytes) -> None:
    """Any SASL PLAIN message decodes to three parts or raises ClientError."""
    try:
        parts = decode_plain(data)
    except ClientError as exc:
        assert exc.reply == Replies.BAD_PLAIN
    else:
        assert b"\0".join(parts) == data


def test_caller_misuse_is_a_usage_error() -> None:
    """Replies nobody asked for, malformed replies and a stray starttls_done are the
    executor's fault: UsageError."""
    conn = Connection(tls=True)
    conn.send(Replies.greeting("mx"))
    with pytest.raises(UsageError):
        conn.send("250 nobody asked")
    with pytest.raises(UsageError):
        conn.starttls_done()
    conn.receive_data(b"NOOP\r\n")
    conn.next_event()
    for bad in ("25 short", "250 two\r\n251 codes", "250-no last line", "250 a\nb"):
        with pytest.raises(UsageError):
            conn.send(bad)
    conn.send(Replies.SHUTDOWN)  # 421 closes
    with pytest.raises(UsageError):
        conn.send(Replies.SHUTDOWN)


# ------------------------------------------------------------------ catalogue, executor


def test_reply_catalogue_is_well_formed() -> None:
    """Every reply of mailward's own is a valid reply, and every 2xx/4xx/5xx one
    carries an enhanced status code of its class on every line (ENHANCEDSTATUSCODES
    is advertised); long texts wrap."""
    replies = [v for k, v in vars(Replies).items() if k.isupper() and isinstance(v, str)]
    replies += [Replies.denied("x"), Replies.temporary("x"), Replies.terminated("x"),
                Replies.syntax("X"), Replies.unrecognized("X"), Replies.send_hello_first("X")]
    for text in replies:
        conn = Connection(tls=True)
        conn._pending, conn.state = "NOOP", State.REPLYING  # any command awaiting a reply
        conn.send(text)
        code = text[:3]
        if code in ("220", "334", "354"):
            continue
        for line in text.split("\r\n"):
            assert line[4:6] == code[0] + ".", text
    long = "TikTok is installed on this device \u2014 " + "uninstall it. " * 60
    lines = Replies.denied(long).split("\r\n")
    assert len(lines) > 1 and all(line.startswith("550-5.7.1 ") for line in lines[:-1])
    assert lines[-1].startswith("550 5.7.1 ")
    assert all(line.isascii() and len(line) <= 512 for line in lines)


def test_the_executor_handles_every_event() -> None:
    """Each event type of the wire has a handler in the session (a missing one would
    be a KeyError on the first such command)."""
    assert set(smtp_session._HANDLERS) == set(typing.get_args(Event))


# ------------------------------------------------------------------ extensions

NO_DSN = frozenset({"SIZE", "8BITMIME", "SMTPUTF8", "CHUNKING"})
USAGE_MAIL = "MAIL FROM: <address> [SP <mail-parameters>]"
USAGE_RCPT = "RCPT TO: <address> [SP <mail-parameters>]"


def in_transaction(**kwargs: typing.Any) -> Connection:
    conn = logged_in(**kwargs)
    run(conn, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    assert conn.recipients == 1
    return conn


def test_dsn_parameters_pass_as_written() -> None:
    """With DSN offered, RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT become the event's
    parameters: keywords upper-cased, values exactly as the client wrote them."""
    conn = logged_in()
    events = run(conn, b"MAIL FROM:<a@x> ret=hdrs envid=Q+2Bid-1 size=10 body=8bitmime\r\n"
                       b"RCPT TO:<b@x> notify=success,DELAY ORCPT=rfc822;B@X\r\n")
    assert events == [
        MailFrom(b"<a@x>", (b"RET=hdrs", b"ENVID=Q+2Bid-1", b"SIZE=10", b"BODY=8bitmime")),
        RcptTo(b"<b@x>", (b"NOTIFY=success,DELAY", b"ORCPT=rfc822;B@X")),
    ]


@pytest.mark.parametrize(("line", "extensions", "reply"), [
    (b"MAIL FROM:<a@b> RET=HDRS", NO_DSN, Replies.MAIL_PARAMETERS),
    (b"MAIL FROM:<a@b> ENVID=x", NO_DSN, Replies.MAIL_PARAMETERS),
    (b"MAIL FROM:<a@b> SMTPUTF8", frozenset(), Replies.MAIL_PARAMETERS),
    (b"MAIL FROM:<a@b> BODY=8BITMIME", frozenset(), Replies.MAIL_PARAMETERS),
    (b"MAIL FROM:<a@b> X-FOO", None, Replies.MAIL_PARAMETERS),
    (b"MAIL FROM:<a@b> RET=BODY", None, Replies.BAD_RET),
    (b"MAIL FROM:<a@b> RET", None, Replies.BAD_RET),
    (b"MAIL FROM:<a@b> ENVID=" + b"x" * 101, None, Replies.BAD_ENVID),
    (b"MAIL FROM:<a@b> ENVID=a+zz", None, Replies.BAD_ENVID),
    (b"MAIL FROM:<a@b> ENVID=a+2b", None, Replies.BAD_ENVID),  # hexchar is upper case
    (b"MAIL FROM:<a@b> RET=HDRS ret=FULL", None, Replies.syntax(USAGE_MAIL)),
    (b"MAIL FROM:<a@b> -X=1", None, Replies.syntax(USAGE_MAIL)),
    (b"MAIL FROM:<a@b> RET=", None, Replies.syntax(USAGE_MAIL)),
    (b"MAIL FROM:<a@b> RET=A=B", None, Replies.syntax(USAGE_MAIL)),
    (b"MAIL FROM:<a@b> SIZE=-1", None, Replies.syntax(USAGE_MAIL)),
    (b"MAIL FROM:<a@b> SIZE=1001", frozenset(), Replies.SIZE_EXCEEDED),
])
def test_mail_parameters_refused(line: bytes, extensions: frozenset[str] | None,
                                 reply: str) -> None:
    """A MAIL parameter whose extension the upstream does not offer is unknown (555);
    a malformed or repeated one is a 501; SIZE is checked whatever is offered."""
    conn = logged_in(message_limit=1000)
    if extensions is not None:
        conn.extensions = extensions
    assert run(conn, line + b"\r\n") == [ReplyNeeded(reply)]
    assert not conn.in_mail


@pytest.mark.parametrize(("params", "extensions", "reply"), [
    (b"NOTIFY=SUCCESS", NO_DSN, Replies.RCPT_PARAMETERS),
    (b"ORCPT=rfc822;a@b", NO_DSN, Replies.RCPT_PARAMETERS),
    (b"NOTIFY=NEVER,SUCCESS", None, Replies.BAD_NOTIFY),
    (b"NOTIFY=SUCCESS,SUCCESS", None, Replies.BAD_NOTIFY),
    (b"NOTIFY=SOMETIMES", None, Replies.BAD_NOTIFY),
    (b"NOTIFY=", None, Replies.syntax(USAGE_RCPT)),
    (b"ORCPT=a@b", None, Replies.BAD_ORCPT),
    (b"ORCPT=rfc822;" + b"x" * 500, None, Replies.BAD_ORCPT),
    (b"SIZE=1", None, Replies.RCPT_PARAMETERS),
])
def test_rcpt_parameters_refused(params: bytes, extensions: frozenset[str] | None,
                                 reply: str) -> None:
    """RCPT takes NOTIFY and ORCPT only with DSN, with RFC 3461 values."""
    conn = logged_in()
    if extensions is not None:
        conn.extensions = extensions
    run(conn, b"MAIL FROM:<a@x>\r\n")
    assert run(conn, b"RCPT TO:<b@x> " + params + b"\r\n") == [ReplyNeeded(reply)]
    assert conn.recipients == 0


def test_size_is_relayed_only_when_the_upstream_offers_it() -> None:
    """SIZE within the limit passes; without SIZE upstream it is dropped (mailward
    enforced it), not sent to a server that would not know it."""
    conn = logged_in(extensions=NO_DSN - {"SIZE"})
    assert run(conn, b"MAIL FROM:<a@x> SIZE=10\r\n") == [MailFrom(b"<a@x>", ())]


@settings(max_examples=300)
@given(st.binary(max_size=120), st.sets(st.sampled_from(sorted(NO_DSN | {"DSN"}))))
def test_relayed_parameters_are_well_formed(text: bytes, extensions: set[str]) -> None:
    """Any parameter text gives a reply or parameters that are single esmtp-params:
    no spaces or control characters can reach the upstream's command line."""
    for known in (smtp_wire.MAIL_PARAMETERS, smtp_wire.RCPT_PARAMETERS):
        out = check_parameters(text, known, frozenset(extensions), "X", "555 5.5.4 no")
        if isinstance(out, str):
            check_reply(out)
            continue
        for param in out:
            assert param and not any(b <= 0x20 or b == 0x7F for b in param)
            assert param.split(b"=", 1)[0] in known


# ------------------------------------------------------------------ BDAT


def test_bdat_chunks_in_any_pieces_give_the_same_events() -> None:
    """BDAT chunks are read by length, whatever they hold (dot lines, commands) and
    however the bytes arrive; LAST ends the transaction."""
    data = (b"BDAT 12\r\n.\r\nQUIT\r\n\r\n."
            b"BDAT 8 LAST\r\nend\r\n.\r\nNOOP\r\n")
    expected = [ChunkReceived(b".\r\nQUIT\r\n\r\n.", False), ChunkReceived(b"end\r\n.\r\n", True),
                ReplyNeeded(Replies.OK)]
    for cut in range(len(data) + 1):
        conn = in_transaction()
        events = run(conn, data[:cut]) + run(conn, data[cut:])
        assert events == expected, cut
        assert not conn.in_mail and conn.chunked == -1


def test_bdat_zero_last_and_data_after_bdat() -> None:
    """``BDAT 0 LAST`` ends a chunked message; DATA after a BDAT in the same
    transaction is a sequence error (RFC 3030 2)."""
    conn = in_transaction()
    assert run(conn, b"BDAT 3\r\nabcDATA\r\n") == [
        ChunkReceived(b"abc", False), ReplyNeeded(Replies.DATA_AFTER_BDAT)]
    assert run(conn, b"BDAT 0 LAST\r\n") == [ChunkReceived(b"", True)]
    assert not conn.in_mail


@pytest.mark.parametrize(("setup", "reply"), [
    (b"", Replies.NEED_MAIL),
    (b"MAIL FROM:<a@x>\r\n", Replies.NEED_RCPT),
])
def test_a_refused_bdat_chunk_is_dropped_never_parsed(setup: bytes, reply: str) -> None:
    """A BDAT refused for its sequence still consumes its chunk: commands inside it
    are never executed; the refusal comes after the chunk."""
    conn = logged_in()
    run(conn, setup)
    chunk = b"RCPT TO:<smuggled@x>\r\n"
    events = run(conn, b"BDAT %d\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert events == [ReplyNeeded(reply), ReplyNeeded(Replies.OK)]


def test_bdat_before_tls_and_before_auth_drop_the_chunk() -> None:
    """Before TLS (PrivacyRequired) and before AUTH (530) the chunk is read and
    dropped as it arrives, never buffered, never parsed."""
    conn = starttls_conn()
    run(conn, b"EHLO x\r\n")
    conn.receive_data(b"BDAT 100000\r\n")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"AUTH PLAIN x\r\n" * 5000)
    assert conn.next_event() is NEED_DATA and conn.buffered == 0
    conn.receive_data(b"z" * (100000 - 14 * 5000) + b"NOOP\r\n")
    assert conn.next_event() == PrivacyRequired("BDAT")
    conn.send(Replies.STARTTLS_FIRST)
    assert conn.next_event() == ReplyNeeded(Replies.OK)
    conn = Connection(tls=True)
    assert run(conn, b"EHLO x\r\nBDAT 6\r\nDATA\r\n") == [
        Hello("x", True), ReplyNeeded(Replies.AUTH_REQUIRED)]


def test_bdat_over_the_limit_is_dropped_and_refused() -> None:
    """Chunks adding up to more than the message limit: the chunk is dropped, 552,
    and the transaction is over (RFC 3030 4.2: later chunks are dropped too)."""
    conn = in_transaction(message_limit=100)
    assert run(conn, b"BDAT 60\r\n" + b"x" * 60) == [ChunkReceived(b"x" * 60, False)]
    assert run(conn, b"BDAT 60\r\n" + b"y" * 60) == [ReplyNeeded(Replies.MESSAGE_TOO_BIG)]
    assert run(conn, b"BDAT 5 LAST\r\nhelloNOOP\r\n") == [
        ReplyNeeded(Replies.NEED_MAIL), ReplyNeeded(Replies.OK)]
    assert not conn.in_mail


@pytest.mark.parametrize("arg", [b"", b"x", b"-1", b"1 FIRST", b"1 LAST x",
                                 b"1234567890123456789"])
def test_bdat_without_a_readable_size_ends_the_connection(arg: bytes) -> None:
    """Where a chunk of unknown size ends is unknown: 501 and close, nothing after it
    is a command."""
    conn = in_transaction()
    events = run(conn, b"BDAT " + arg + b"\r\nRCPT TO:<smuggled@x>\r\n")
    assert events == [LimitExceeded("bdat_syntax", Replies.BDAT_SYNTAX)]
    assert conn.state is State.CLOSED


def test_bdat_is_unknown_when_the_upstream_lacks_chunking() -> None:
    """Without CHUNKING offered, BDAT is an unrecognised command like any other."""
    conn = in_transaction(extensions=NO_DSN - {"CHUNKING"})
    assert run(conn, b"BDAT 3 LAST\r\n") == [ReplyNeeded(Replies.unrecognized("BDAT"))]


# ------------------------------------------------------------------ VRFY, ETRN


def test_vrfy_and_etrn_go_upstream_when_offered() -> None:
    """Logged in, VRFY and ETRN are PassThrough events if the upstream offers them;
    otherwise VRFY gets mailward's 252 and ETRN is unknown; before AUTH, 530."""
    conn = logged_in()
    assert run(conn, b"VRFY <b@x>\r\nETRN example.test\r\nVRFY\r\n") == [
        PassThrough("VRFY", b"<b@x>"), PassThrough("ETRN", b"example.test"),
        ReplyNeeded(Replies.syntax("VRFY <argument>"))]
    conn = logged_in(extensions=NO_DSN)
    assert run(conn, b"VRFY <b@x>\r\nETRN x\r\n") == [
        ReplyNeeded(Replies.VRFY), ReplyNeeded(Replies.unrecognized("ETRN"))]
    conn = Connection(tls=True)
    assert run(conn, b"EHLO x\r\nVRFY b\r\nETRN x\r\n")[1:] == [
        ReplyNeeded(Replies.AUTH_REQUIRED), ReplyNeeded(Replies.AUTH_REQUIRED)]


@settings(max_examples=200)
@given(st.binary(max_size=300), st.binary(max_size=300), st.data())
def test_bdat_chunks_carry_any_bytes_exactly(first: bytes, last: bytes,
                                            data: st.DataObject) -> None:
    """Whatever two chunks hold and wherever the bytes are cut, the events are the two
    chunks, byte for byte, and the command after them is a command."""
    wire = (b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(last) + last
            + b"NOOP\r\n")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=4)))
    conn = in_transaction()
    events: list[Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        events += run(conn, wire[a:b])
    assert events == [ChunkReceived(first, False), ChunkReceived(last, True),
                      ReplyNeeded(Replies.OK)]
