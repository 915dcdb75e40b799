"""The ActiveSync upstream leg without I/O (``proxy.frontends.activesync.wire``): HTTP/1.1
framing as mailward uses it, request heads nothing can be injected into, the one
hop-by-hop filter, and the invariants: any bytes from the upstream give an answer or
``UpstreamProtocolError``; any chunking of the same bytes gives the same answer."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.frontends.activesync.wire import (
    MAX_HEAD_BYTES,
    ResponseHead,
    UnsendableRequest,
    UpstreamClosedEarly,
    UpstreamProtocolError,
    UpstreamWire,
    end_to_end,
    forward_head,
    forwarded_headers,
    request_head,
)

pytestmark = pytest.mark.pure

Answer = tuple[int, bytes, list[tuple[bytes, bytes]], int | None, bytes]


def _wire(method: bytes = b"GET") -> UpstreamWire:
    wire = UpstreamWire()
    wire.request(request_head(method, b"/Microsoft-Server-ActiveSync", [(b"Host", b"u")], 0),
                 b"")
    return wire


def _drain(wire: UpstreamWire, head: list[ResponseHead], body: list[bytes]) -> bool:
    """Events until more bytes are needed (False) or the answer ended (True)."""
    while (event := wire.next_event()) is not None:
        if isinstance(event, ResponseHead):
            assert not head and not body, "a second head"
            head.append(event)
            if event.body is not None:  # the whole body came with the head
                assert event.length == len(event.body)
                body.append(event.body)
                assert wire.next_event() == b"", "a body event after the whole body"
                return True
        elif event:
            assert head, "body before head"
            body.append(event)
        else:
            return True
    return False


def answer(pieces: Iterable[bytes], method: bytes = b"GET", *, eof: bool = True,
           wire: UpstreamWire | None = None) -> Answer:
    """One answer fed in ``pieces`` (then the end of the connection, with ``eof``):
    status, body, headers, known length and the reason."""
    wire = wire or _wire(method)
    head: list[ResponseHead] = []
    body: list[bytes] = []
    done = False
    for piece in pieces:
        wire.receive_data(piece)
        if _drain(wire, head, body):
            done = True
            break
    if not done and eof:
        wire.receive_data(b"")
        done = _drain(wire, head, body)
    assert done and head, "no complete answer"
    h = head[0]
    return h.status, b"".join(body), h.headers, h.length, h.reason


VALID: list[tuple[bytes, bytes, tuple[int, bytes, int | None]]] = [
    # (method, bytes, (status, body, length))
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", (200, b"hello", 5)),
    (b"POST", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n"
              b"10\r\n" + b"x" * 16 + b"\r\n0\r\nX-Trailer: t\r\n\r\n",
     (200, b"abc" + b"x" * 16, None)),
    (b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, b"ok", 2)),
    (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", (204, b"", 0)),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", (304, b"", 0)),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", (200, b"", 0)),
    (b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close", (200, b"until close",
                                                                           None)),
    (b"GET", b"HTTP/1.0 200 OK\r\n\r\nold style", (200, b"old style", None)),
    (b"POST", b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\n"
              b"Content-Length: 0\r\n\r\n", (401, b"", 0)),
    (b"POST", b"HTTP/1.1 200 \r\nContent-Length: 3\r\n\r\n\x03\x01\x6a", (200, b"\x03\x01\x6a",
                                                                           3)),
]


@pytest.mark.parametrize(("method", "data", "expected"), VALID)
def test_framing(method: bytes, data: bytes, expected: tuple[int, bytes, int | None]) -> None:
    """Content-Length, chunked (extensions, trailers), interim 1xx, no-body statuses,
    HEAD and close-delimited answers give the status, body and known length."""
    status, body, _, length, _ = answer([data], method)
    assert (status, body, length) == expected


def test_headers_keep_their_case_and_order() -> None:
    """Answer headers come out as the upstream spelt them, in order."""
    _, _, headers, _, reason = answer(
        [b"HTTP/1.1 200 Fine\r\nX-B: 1\r\nMS-ASProtocolVersions: 14.1\r\nx-a: 2\r\n"
         b"Content-Length: 0\r\n\r\n"])
    assert headers == [(b"X-B", b"1"), (b"MS-ASProtocolVersions", b"14.1"), (b"x-a", b"2"),
                       (b"Content-Length", b"0")]
    assert reason == b"Fine"


def test_keep_alive_cycles_and_reuse() -> None:
    """A keep-alive answer read whole leaves the wire reusable for the next request;
    Connection: close, HTTP/1.0, a close-delimited body or extra bytes do not."""
    wire = _wire()
    assert answer([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"], eof=False,
                  wire=wire)[1] == b"a"
    assert wire.reusable
    wire.request(request_head(b"POST", b"/", [(b"Host", b"u")], 4), b"body")
    assert answer([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"], eof=False,
                  wire=wire)[1] == b"b"
    assert wire.reusable
    for data in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                 b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n"):
        wire = _wire()
        answer([data], eof=False, wire=wire)
        assert not wire.reusable, data
    wire = _wire()
    answer([b"HTTP/1.1 200 OK\r\n\r\nuntil close"], wire=wire)
    assert not wire.reusable


def test_a_whole_answer_comes_with_its_head() -> None:
    """An answer of known length read in one piece is handed out as one head carrying
    its body, then the end; in pieces, the head has no body and the pieces follow."""
    data = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\nContent-Length: 5\r\n\r\nhello"
    wire = _wire()
    wire.receive_data(data)
    head = wire.next_event()
    assert isinstance(head, ResponseHead)
    assert (head.body, head.length, head.headers) == (
        b"hello", 5, [(b"Content-Type", b"x"), (b"Content-Length", b"5")])
    assert wire.next_event() == b""
    assert wire.reusable
    wire = _wire()
    wire.receive_data(data[:-2])
    head = wire.next_event()
    assert isinstance(head, ResponseHead) and head.body is None
    assert wire.next_event() == b"hel"
    wire.receive_data(data[-2:])
    assert (wire.next_event(), wire.next_event()) == (b"lo", b"")
    wire = _wire()
    wire.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
                      b"0\r\n\r\n")
    head = wire.next_event()
    assert isinstance(head, ResponseHead) and head.body is None  # chunked: streamed
    assert (wire.next_event(), wire.next_event()) == (b"ok", b"")


BAD = [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
    b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",  # cut short
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 2 * MAX_HEAD_BYTES + b"\r\n\r\n",  # head too long
    b"HTTP/1.1 200 OK\r\nContent-Le",  # head cut short
]


@pytest.mark.parametrize("data", BAD, ids=range(len(BAD)))
def test_bad_answers_are_upstream_protocol_errors(data: bytes) -> None:
    """Malformed, ambiguous, unsupported or truncated answers, arriving in pieces as
    from a socket, raise UpstreamProtocolError, and not the "closed early" kind that
    allows a resend."""
    with pytest.raises(UpstreamProtocolError) as info:
        answer(_split(data, list(range(0, len(data), 4096))))
    assert not isinstance(info.value, UpstreamClosedEarly)


def test_closed_before_any_byte_is_closed_early() -> None:
    """A connection that ends before any byte of the answer raises UpstreamClosedEarly,
    which is also a ConnectionError (the caller may resend a read-only request)."""
    with pytest.raises(UpstreamClosedEarly) as info:
        answer([])
    assert isinstance(info.value, ConnectionError)


def test_unsendable_request_heads() -> None:
    """Headers that are not valid HTTP/1.1 are the caller's error, UnsendableRequest."""
    for headers in ([(b"Host", b"u"), (b"X", b"a\r\nInjected: 1")],
                    [(b"Host", b"u"), (b"Bad Name", b"x")], [(b"Host", b"u\x00")]):
        with pytest.raises(UnsendableRequest):
            request_head(b"POST", b"/", headers, 0)
    with pytest.raises(UnsendableRequest):
        request_head(b"GET", b"/with space", [(b"Host", b"u")], 0)


def test_request_bytes() -> None:
    """The request goes out as given, with Content-Length for a body or a POST."""
    wire = UpstreamWire()
    out = wire.request(request_head(b"POST", b"/p?Cmd=Sync", [(b"Host", b"u"),
                                                              (b"MS-ASProtocolVersion",
                                                               b"14.1")], 3), b"abc")
    assert out == (b"POST /p?Cmd=Sync HTTP/1.1\r\nHost: u\r\nMS-ASProtocolVersion: 14.1\r\n"
                   b"Content-Length: 3\r\n\r\nabc")
    assert UpstreamWire().request(request_head(b"OPTIONS", b"/", [(b"Host", b"u")], 0),
                                  b"") == b"OPTIONS / HTTP/1.1\r\nHost: u\r\n\r\n"


@pytest.mark.parametrize(("method", "target", "headers"), [
    (b"POST", b"/", [(b"Host", b"u"), (b"X", b"a\nInjected: 1")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"X", b"a\rInjected: 1")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"X", b"a\x00b")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"X", b"a\x7fb")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"X\r\nInjected", b"1")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"X\x00", b"1")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"", b"1")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"X:Y", b"1")]),
    (b"POST", b"/?a\r\nInjected: 1", [(b"Host", b"u")]),
    (b"POST", b"/\x00", [(b"Host", b"u")]),
    (b"POST", b"/caf\xc3\xa9", [(b"Host", b"u")]),
    (b"POST", b"", [(b"Host", b"u")]),
    (b"POST / HTTP/1.1\r\nX:", b"/", [(b"Host", b"u")]),
    (b"", b"/", [(b"Host", b"u")]),
    (b"POST", b"/", []),
    (b"POST", b"/", [(b"Host", b"u"), (b"host", b"v")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"Content-Length", b"5")]),
    (b"POST", b"/", [(b"Host", b"u"), (b"Transfer-Encoding", b"chunked")]),
])
def test_nothing_can_be_injected_into_a_request_head(
        method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """CR, LF, NUL or other control bytes anywhere in a head, a name that is not a
    token, a target that is not visible ASCII, no or two Host headers, or the client's
    own body framing: UnsendableRequest, never bytes on the wire."""
    with pytest.raises(UnsendableRequest):
        request_head(method, target, headers, 0)


_TCHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@pytest.mark.parametrize("byte", range(256))
def test_each_byte_is_allowed_exactly_where_http_allows_it(byte: int) -> None:
    """Every byte value, in a method, a target and a header value, is accepted exactly
    when RFC 9110 allows it there: token characters in a method, visible ASCII in a
    target, anything but the control bytes other than TAB inside a field value."""
    b = bytes([byte])
    checks = [(b"P" + b + b"T", b"/", b"v", byte in _TCHARS),
              (b"POST", b"/a" + b + b"b", b"v", 0x21 <= byte <= 0x7E),
              (b"POST", b"/", b"a" + b + b"b", byte == 0x09 or 0x20 <= byte != 0x7F)]
    for method, target, value, allowed in checks:
        headers = [(b"Host", b"u"), (b"X", value)]
        if allowed:
            head = request_head(method, target, headers, 0)
            assert head.data.startswith(method + b" " + target + b" HTTP/1.1\r\n")
            assert b"\r\nX: " + value + b"\r\n" in head.data
        else:
            with pytest.raises(UnsendableRequest):
                request_head(method, target, headers, 0)


def test_a_body_must_match_its_head() -> None:
    """A body of another length than the head announced is UnsendableRequest."""
    head = request_head(b"POST", b"/", [(b"Host", b"u")], 3)
    with pytest.raises(UnsendableRequest):
        UpstreamWire().request(head, b"four")


_NAME = st.binary(min_size=0, max_size=8) | st.sampled_from([b"X-A", b"Authorization"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_NAME, st.binary(max_size=12)), max_size=5),
       st.binary(max_size=12))
@example(headers=[(b"!", b"!\t")], target=b"")
def test_a_written_head_parses_back_to_exactly_its_headers(
        headers: list[tuple[bytes, bytes]], target: bytes) -> None:
    """Any header names, values and target either raise UnsendableRequest or give a
    head that an HTTP parser (llhttp) reads back as exactly that request: one request,
    the same target, the same headers, nothing added."""
    import httptools

    sent = [(b"Host", b"u"), *headers]
    try:
        head = request_head(b"POST", b"/" + target, sent, 2)
    except UnsendableRequest:
        return
    got: list[tuple[bytes, bytes]] = []
    urls: list[bytes] = []
    done: list[bool] = []

    class Reader:
        def on_url(self, url: bytes) -> None:
            urls.append(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            got.append((name, value))

        def on_message_complete(self) -> None:
            done.append(True)

    httptools.HttpRequestParser(Reader()).feed_data(UpstreamWire().request(head, b"ok"))
    assert done == [True]
    assert b"".join(urls) == b"/" + target
    # llhttp trims the spaces around a value, as any recipient must (RFC 9110 5.5)
    assert got == [*((k, v.strip(b" \t")) for k, v in sent), (b"Content-Length", b"2")]


_HEADERS = st.lists(st.tuples(
    st.sampled_from([b"Host", b"host", b"Connection", b"Content-Length", b"X-Forwarded-For",
                     b"Authorization", b"TE", b"X-A", b"x-a", b"Upgrade", b"Forwarded"])
    | _NAME, st.sampled_from([b"x-a", b"close, X-A", b" te ", b"5"]) | st.binary(max_size=8)),
    max_size=6)


@settings(max_examples=500, deadline=None)
@given(_HEADERS, st.sampled_from([b"/", b"/p?q", b"/ x", b""]),
       st.sampled_from([frozenset(), frozenset({b"content-length"}),
                        frozenset({b"forwarded", b"content-length"})]), st.integers(0, 3))
@example(headers=[(b"a\nb", b"1"), (b"Connection", b"a\nb")], target=b"/",
         drop=frozenset(), body_length=0)
def test_forward_head_is_request_head_of_forwarded_headers(
        headers: list[tuple[bytes, bytes]], target: bytes, drop: frozenset[bytes],
        body_length: int) -> None:
    """The one-pass head of a forwarded request is exactly request_head of the upstream's
    Host and forwarded_headers: the same bytes, or UnsendableRequest for both."""
    def composed() -> bytes:
        return request_head(b"POST", target, [(b"Host", b"up:8080"), *forwarded_headers(
            headers, "10.0.0.1", "https", drop)], body_length).data

    try:
        expected = composed()
    except UnsendableRequest:
        with pytest.raises(UnsendableRequest):
            forward_head(b"POST", target, b"up:8080", headers, "10.0.0.1", "https", drop,
                         body_length)
        return
    assert forward_head(b"POST", target, b"up:8080", headers, "10.0.0.1", "https", drop,
                        body_length).data == expected


@settings(max_examples=500, deadline=None)
@given(_HEADERS, st.sampled_from([frozenset(), frozenset({b"content-length"})]))
@example(headers=[(b"X-A", b"caf\xc3\xa9"), (b"X-B", b"\xff")], drop=frozenset())
@example(headers=[(b"a\nb", b"1"), (b"X", b"2")], drop=frozenset())
def test_client_headers_are_the_end_to_end_headers_as_text(
        headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> None:
    """The answer headers the client gets (planned by names) are exactly the end-to-end
    headers, each name and value as text (UTF-8, else Latin-1), in order."""
    from proxy.frontends.activesync.forward import client_headers
    from proxy.frontends.activesync.wire import header_text

    assert client_headers(headers, drop) == [
        (header_text(k), header_text(v)) for k, v in end_to_end(headers, drop)]


# ------------------------------------------------------------------ header filter


def test_end_to_end_drops_hop_by_hop_and_connection_named_headers() -> None:
    """The fixed hop-by-hop set, headers named in Connection (any case, any spacing)
    and the caller's extra names are dropped; the rest keep order and spelling."""
    headers = [(b"Connection", b"keep-alive, X-Hop ,x-other"), (b"X-Hop", b"1"),
               (b"TE", b"trailers"), (b"Keep-Alive", b"timeout=5"), (b"X-Other", b"2"),
               (b"Transfer-Encoding", b"chunked"), (b"MS-ASProtocolVersion", b"14.1"),
               (b"Proxy-Authorization", b"x"), (b"Content-Length", b"3"),
               (b"X-MS-PolicyKey", b"1307")]
    assert end_to_end(headers) == [(b"MS-ASProtocolVersion", b"14.1"),
                                   (b"Content-Length", b"3"), (b"X-MS-PolicyKey", b"1307")]
    assert end_to_end(headers, frozenset({b"content-length"})) == [
        (b"MS-ASProtocolVersion", b"14.1"), (b"X-MS-PolicyKey", b"1307")]


def test_forwarded_headers() -> None:
    """Host and a client's X-Forwarded-* are replaced: X-Forwarded-For is the address
    mailward saw (a client's own values are dropped), Proto and Host say what mailward
    saw."""
    out = forwarded_headers([(b"Host", b"mail.corp.example"), (b"X-Forwarded-For", b"1.2.3.4"),
                             (b"X-Forwarded-For", b"5.6.7.8"), (b"X-Forwarded-Proto", b"http"),
                             (b"Authorization", b"Basic eA=="), (b"Upgrade", b"h2c")],
                            "198.51.100.7", "https")
    assert out == [(b"Authorization", b"Basic eA=="),
                   (b"X-Forwarded-For", b"198.51.100.7"),
                   (b"X-Forwarded-Proto", b"https"),
                   (b"X-Forwarded-Host", b"mail.corp.example")]
    assert forwarded_headers([], "10.0.0.1", "http") == [
        (b"X-Forwarded-For", b"10.0.0.1"), (b"X-Forwarded-Proto", b"http")]


# ------------------------------------------------------------------ properties


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = zip([0, *points], [*points, len(data)], strict=True)
    return [data[a:b] for a, b in pieces if b > a]  # b"" would mean the end


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_chunking_gives_the_same_answer(case: tuple[bytes, bytes, object],
                                            cuts: list[int]) -> None:
    """The same answer fed in arbitrary pieces parses exactly as when fed at once."""
    method, data, _ = case
    assert answer(_split(data, cuts), method) == answer([data], method)


_PIECES = st.sampled_from([
    b"HTTP/1.1 ", b"HTTP/1.0 ", b"200 OK\r\n", b"100 Continue\r\n", b"204 \r\n", b"101 x\r\n",
    b"Content-Length: 5\r\n", b"Content-Length: 0\r\n", b"Content-Length: x\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
    b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"X: y\r\n", b" folded\r\n",
    b"\r\n", b"\n", b"0\r\n", b"5;e=1\r\n", b"ffffffffffffffffff\r\n", b"hello", b"\x00",
]) | st.binary(max_size=20)


def _fuzz(data_pieces: list[bytes], method: bytes) -> None:
    wire = _wire(method)
    head: list[ResponseHead] = []
    body: list[bytes] = []
    try:
        for piece in [*data_pieces, b""]:
            wire.receive_data(piece)
            if _drain(wire, head, body):
                break
    except UpstreamProtocolError:
        return
    if head:
        assert 100 <= head[0].status <= 999
        assert head[0].length is None or head[0].length >= 0


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000), st.sampled_from([b"GET", b"HEAD", b"POST"]),
       st.lists(st.integers(0, 2000), max_size=10))
def test_any_bytes_give_an_answer_or_upstream_protocol_error(
        data: bytes, method: bytes, cuts: list[int]) -> None:
    """Whatever bytes the upstream sends, in whatever pieces, the wire gives events or
    raises UpstreamProtocolError, never anything else."""
    _fuzz(_split(data, cuts), method)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=30), st.sampled_from([b"GET", b"HEAD", b"POST"]))
def test_answer_shaped_bytes_give_an_answer_or_upstream_protocol_error(
        pieces: list[bytes], method: bytes) -> None:
    """The same invariant for inputs built from HTTP fragments, which reach deeper into
    the head and body states than random bytes do."""
    _fuzz(pieces, method)
