"""HTTP/1.1 on the upstream leg, without I/O: httptools (llhttp, the C parser of
Node.js) reads the upstream's answers, this module says what mailward forwards.

* :func:`end_to_end` is the one hop-by-hop header filter (RFC 9110 section 7.6.1): it
  serves requests to the upstream and answers to the client, on both upstream paths.
  :func:`forwarded_headers` adds ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` to it.
* :func:`request_head` writes a request head, refusing anything that is not valid
  HTTP/1.1 (a CR, LF or NUL in a header, a name that is not a token, a target with
  spaces): no byte a client sent can start another header or request upstream.
  :func:`forward_head` is ``request_head`` of the forwarded headers in one pass, the
  head of every request mailward forwards.
* :class:`UpstreamWire` is one upstream connection's client side: ``request()`` turns
  a head and a body into bytes to write, ``receive_data()`` takes what the upstream
  sent (``b""`` at the end of the connection) and ``next_event()`` hands out the
  answer: a :class:`ResponseHead`, then the body in pieces, then ``b""``; ``None``
  while more bytes are needed. Interim 1xx answers are skipped. An answer of known
  length that arrived whole with its head (most EAS answers) comes as one head
  carrying its ``body``, then ``b""``.

Errors say whose fault they are. Whatever the upstream sends, ``next_event`` returns
an event or raises :class:`UpstreamProtocolError` (the peer's fault; answer 503), never
anything else: a hypothesis test states that invariant. :class:`UpstreamClosedEarly`,
a subclass, is the connection ending before any byte of the answer, the one case in
which a read-only request may be sent again. :class:`UnsendableRequest` is a request
that cannot be written as valid HTTP/1.1 (the client's headers; answer 400).

llhttp is strict where it matters for a proxy (duplicate or conflicting
``Content-Length``, ``Transfer-Encoding`` with ``Content-Length``, obs-fold, bad tokens,
bare LF); this module adds what it leaves to its caller: only HTTP/1.0 and 1.1, status
100-999 and no 101, ``Transfer-Encoding`` exactly ``chunked``, no control bytes in the
reason, a bound on a head that never ends (:data:`MAX_HEAD_BYTES`), and the end of the
connection (httptools has no ``finish``). httptools cannot be told that an answer to
``HEAD`` has no body, so the parser stops after such a head and the connection is not
reused (mailward sends only POST and OPTIONS).

Cost, per small exchange: h11 (pure Python) took about 45 us at the connection level,
half of mailward's CPU per request. The request head and the answer's headers are
each written in one plain pass (:func:`forward_head`, ``forward.client_headers``);
only what a phone or an upstream repeats all day is remembered (:class:`Memo`:
targets, reasons, header names seen to be tokens; never a value, so nothing of a
credential). Measure before making these cleverer: a version that planned the heads
once per sequence of header names ran as many instructions but cost ~5% more
simulated cycles per request in cache misses and mispredicted branches
(``bench/RESULTS.md``: callgrind with cache simulation of the proxy process), and
every Python-level call costs more than the bytes it saves. ``bench/activesync_calls.py``
counts calls per request and ``bench/activesync.py --tree`` compares req/CPU-s with
other revisions in the same run.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Final, TypeVar

import httptools

#: Bodies move in pieces of at most this many bytes.
CHUNK_BYTES: Final = 64 * 1024
#: Bytes of an upstream answer held without progress (a head, a trailer or a chunk-size
#: line that has not ended) before the answer is refused. Counted per
#: :meth:`UpstreamWire.receive_data` call, so at most one piece more may be held.
MAX_HEAD_BYTES: Final = 64 * 1024

Header = tuple[bytes, bytes]
K = TypeVar("K")
V = TypeVar("V")

#: Headers that describe one connection, never forwarded (lower case).
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect",
})
#: Request headers mailward sets itself, so the client's copies are dropped.
_REPLACED: Final = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto",
                              b"x-forwarded-host"})
#: Request headers that frame the body: :func:`request_head` writes its own.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})
#: How the status line of an HTTP/1.x answer starts.
_HTTP_1X: Final = (b"HTTP/1.1 ", b"HTTP/1.0 ")
#: Statuses whose answer never has a body (RFC 9110 section 6.4.1).
_NO_BODY: Final = frozenset({204, 304})

_TCHAR: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # RFC 9110 section 5.6.2
_TOKENS: Final = re.compile(_TCHAR + b"+(?::" + _TCHAR + b"+)*")  # names joined with ":"
_TOKEN: Final = re.compile(_TCHAR + b"+")


def _table(allowed: Callable[[int], bool]) -> bytes:
    """A ``bytes.translate`` table: each allowed byte to 1, every other byte to 0."""
    return bytes(1 if allowed(i) else 0 for i in range(256))


# Byte classes checked per request by one ``translate`` (a table lookup per byte in C)
# and a ``memchr`` for 0: several times cheaper than a regular expression's character
# class, which the target and the values of every request head went through. "Every
# byte of x is allowed by T" is written ``0 not in x.translate(T)`` (inline: no Python
# frame; the needle an int, since a bytes needle makes ``in`` raise and clear a
# TypeError first).
#: Token characters (RFC 9110 section 5.6.2): a method.
_TOKEN_BYTES: Final = _table(lambda i: re.fullmatch(_TCHAR, bytes([i])) is not None)
#: Visible ASCII (no spaces, controls or non-ASCII): a request target.
_TARGET_BYTES: Final = _table(lambda i: 0x21 <= i <= 0x7E)
#: Anything but the control bytes forbidden in a field value (TAB is allowed).
_FIELD_BYTES: Final = _table(lambda i: i == 0x09 or 0x20 <= i != 0x7F)

header_name: Final = itemgetter(0)  # of a Header (C, no Python frame per header)
header_value: Final = itemgetter(1)


class UpstreamProtocolError(OSError):
    """The upstream's answer is not HTTP/1.1 we can forward."""


class UpstreamClosedEarly(UpstreamProtocolError, ConnectionResetError):
    """The upstream closed the connection before any byte of the answer."""


class UnsendableRequest(ValueError):
    """The request cannot be written as valid HTTP/1.1 (the client's headers)."""


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp (a HEAD answer's end, or an error)."""


class Memo(dict[K, V]):
    """A bounded memo: ``memo[key]`` is ``make(key)``, made once (a hit is one dict
    lookup, no Python frame); emptied when ``size`` keys are held. For what a phone or
    an upstream repeats all day (targets, reasons, sets of names), never a
    credential."""

    __slots__ = ("_make", "_size")

    def __init__(self, make: Callable[..., V], size: int) -> None:
        super().__init__()
        self._make = make
        self._size = size

    def __missing__(self, key: K) -> V:
        if len(self) >= self._size:
            self.clear()
        value = self[key] = self._make(key)
        return value


#: :data:`HOP_BY_HOP` and a drop set, by the drop set (the few drop sets are joined
#: once, not per request): what an answer leaves out without a ``Connection`` header.
HOP_BY_HOP_AND: Final[Memo[frozenset[bytes], frozenset[bytes]]] = Memo(HOP_BY_HOP.union, 16)
#: The request headers mailward replaces and a drop set, by the drop set.
_REPLACED_AND: Final[Memo[frozenset[bytes], frozenset[bytes]]] = Memo(_REPLACED.union, 16)
#: What a forwarded request leaves out of the client's headers, by the drop set:
#: hop-by-hop, replaced and dropped.
_FORWARD_SKIP: Final[Memo[frozenset[bytes], frozenset[bytes]]] = Memo(
    (HOP_BY_HOP | _REPLACED).union, 16)


def end_to_end(headers: Iterable[Header], drop: frozenset[bytes] = frozenset(),
               lowered: list[bytes] | None = None) -> list[Header]:
    """``headers`` in order without the hop-by-hop ones: the fixed set, those the
    ``Connection`` header names, and the lower-case names in ``drop``. ``lowered``:
    the names of ``headers`` in lower case, when the caller has them."""
    headers = list(headers)
    if lowered is None:
        lowered = lower_names(headers)
    skip = HOP_BY_HOP_AND[drop]
    if b"connection" in lowered:
        skip = _and_connection_names(skip, headers, lowered)
    return [h for h, lk in zip(headers, lowered, strict=True) if lk not in skip]


def lower_names(headers: Sequence[Header]) -> list[bytes]:
    """The lower-case names of ``headers``, in order (three C calls for all of them
    when no name holds a line feed, which no parsed header can)."""
    lowered = b"\n".join(map(header_name, headers)).lower().split(b"\n")
    if len(lowered) != len(headers):
        lowered = [k.lower() for k, _ in headers]
    return lowered


def _and_connection_names(skip: frozenset[bytes], headers: Sequence[Header],
                          lowered: list[bytes]) -> frozenset[bytes]:
    """``skip`` and the names the ``Connection`` headers list."""
    return skip.union(*(connection_names(v) for (_, v), lk in zip(headers, lowered, strict=True)
                        if lk == b"connection"))


def connection_names(value: bytes) -> frozenset[bytes]:
    """The lower-case header names a ``Connection`` header value lists."""
    return frozenset(t.strip().lower() for t in value.split(b","))


def forwarded_headers(headers: Sequence[Header], remote: str, scheme: str,
                      drop: frozenset[bytes] = frozenset()) -> list[Header]:
    """The client's request headers as the upstream gets them: end to end only, without
    ``Host`` and the names in ``drop``; ``X-Forwarded-For`` (``remote``: a client's own
    value is dropped, since no proxy in front of mailward is trusted),
    ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (the client's first ``Host``) set."""
    lowered = lower_names(headers)
    out = end_to_end(headers, _REPLACED_AND[drop], lowered)
    out.append((b"X-Forwarded-For", remote.encode()))
    out.append((b"X-Forwarded-Proto", scheme.encode()))
    if b"host" in lowered:
        out.append((b"X-Forwarded-Host", headers[lowered.index(b"host")][1]))
    return out


def header_text(raw: bytes) -> str:
    """A header name or value as text for aiohttp: UTF-8 when it is, else Latin-1 (so
    any byte string survives)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@dataclass(slots=True)
class RequestHead:
    """A request head written by :func:`request_head`, ready to send. (Not frozen: a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``,
    three times slower, and one is made for every request.)"""

    method: bytes
    data: bytes
    body_length: int


def request_head(method: bytes, target: bytes, headers: list[Header], body_length: int
                 ) -> RequestHead:
    """The head of a request (``UnsendableRequest`` when it would not be valid
    HTTP/1.1): ``method`` a token, ``target`` visible ASCII, exactly one ``Host``,
    header names tokens and values free of control bytes (CR, LF, NUL...). The body's
    framing is written here (``Content-Length`` with a body or for POST), so the
    headers must not carry their own."""
    if not method or 0 in method.translate(_TOKEN_BYTES):
        raise UnsendableRequest("request method is not a token")
    if not _visible(target):
        raise UnsendableRequest("request target is not visible ASCII")
    error = _names_error([name for name, _ in headers], lower_names(headers))
    if error is not None:
        raise UnsendableRequest(error)
    # Without surrounding spaces or tabs: recipients strip them (RFC 9110 5.5), and
    # llhttp strips a trailing space but not a trailing tab, so strip both here. (Tab
    # and space are no control bytes: stripping first changes nothing of the check.)
    values = [value.strip(b" \t") for _, value in headers]
    if 0 in b"\t".join(values).translate(_FIELD_BYTES):
        raise UnsendableRequest("a header is not valid HTTP")
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for (name, _), value in zip(headers, values, strict=True)]
    if body_length or method == b"POST":
        lines.append(b"Content-Length: %d" % body_length)
    return RequestHead(method, b"\r\n".join(lines) + b"\r\n\r\n", body_length)


def forward_head(method: bytes, target: bytes, host: bytes, headers: Sequence[Header],
                 remote: str, scheme: str, drop: frozenset[bytes], body_length: int
                 ) -> RequestHead:
    """``request_head(method, target, [(b"Host", host), *forwarded_headers(headers,
    remote, scheme, drop)], body_length)``: the same bytes and the same checks (a
    property test holds it to that), for every request mailward forwards.

    One pass over the client's headers writes the head, then one scan of all the values
    for control bytes. Header names are checked against the names already seen to be
    tokens (a phone sends the same dozen all day; names only, so nothing of a
    credential is kept). Anything else (a ``Connection`` header, which names more to
    drop; a name not seen before; a failed check) takes ``request_head``'s way, which
    writes the same bytes or says why it cannot. A plain loop on purpose: the version
    planned once per sequence of names that this replaces ran as many instructions but
    cost more CPU in cache misses (see ``bench/RESULTS.md``)."""
    skip = _FORWARD_SKIP[drop]
    # Four pieces per line, so the values are parts[7::4] (Host's first).
    parts = [method, b" ", target, b" HTTP/1.1", b"\r\n", b"Host", b": ", host]
    client_host: bytes | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered in skip:
            if lowered == b"host":
                if client_host is None:
                    client_host = value
            elif lowered == b"connection":
                return _forward_head_checked(method, target, host, headers, remote, scheme,
                                             drop, body_length)
            continue
        if lowered not in _SENDABLE_NAMES and not _learn_name(lowered):
            return _forward_head_checked(method, target, host, headers, remote, scheme, drop,
                                         body_length)
        parts += (b"\r\n", name, b": ", value.strip(b" \t"))
    parts += (b"\r\n", b"X-Forwarded-For", b": ", remote.encode(),
              b"\r\n", b"X-Forwarded-Proto", b": ", scheme.encode())
    if client_host is not None:
        parts += (b"\r\n", b"X-Forwarded-Host", b": ", client_host.strip(b" \t"))
    if (not method or 0 in method.translate(_TOKEN_BYTES) or not _VISIBLE_TARGETS[target]
            or 0 in b"\t".join(parts[7::4]).translate(_FIELD_BYTES)):
        return _forward_head_checked(method, target, host, headers, remote, scheme, drop,
                                     body_length)
    if body_length or method == b"POST":
        parts.append(b"\r\nContent-Length: %d\r\n\r\n" % body_length)
    else:
        parts.append(b"\r\n\r\n")
    data = b"".join(parts)
    return RequestHead(method, data, body_length)


def _forward_head_checked(method: bytes, target: bytes, host: bytes,
                          headers: Sequence[Header], remote: str, scheme: str,
                          drop: frozenset[bytes], body_length: int) -> RequestHead:
    """:func:`forward_head` the general way (``UnsendableRequest`` with the reason)."""
    return request_head(method, target, [(b"Host", host), *forwarded_headers(
        headers, remote, scheme, drop)], body_length)


#: Lower-case header names seen to be tokens and free to forward (not the body's
#: framing): :func:`forward_head` checks a name once, not on every request.
_SENDABLE_NAMES: Final[set[bytes]] = set()


def _learn_name(lowered: bytes) -> bool:
    """Whether ``lowered`` (a lower-case header name) may be forwarded as it is; if so
    it joins :data:`_SENDABLE_NAMES` (emptied at 1,024 names, so junk names cannot
    grow it)."""
    if lowered in _FRAMING or _TOKEN.fullmatch(lowered) is None:
        return False
    if len(_SENDABLE_NAMES) >= 1024:
        _SENDABLE_NAMES.clear()
    _SENDABLE_NAMES.add(lowered)
    return True


def _names_error(names: list[bytes], lowered: list[bytes]) -> str | None:
    """Why a request with these header names cannot be sent, or None. (Checked joined,
    one regular expression for all.)"""
    joined = b":".join(names)  # ":" is no token character, so a name holding one
    if not _TOKENS.fullmatch(joined) or joined.count(b":") != len(names) - 1:  # shows
        return "a header is not valid HTTP"
    if lowered.count(b"host") != 1:
        return "a request needs exactly one Host header"
    if not _FRAMING.isdisjoint(lowered):
        return "the body's framing is the wire's"
    return None


def _visible(target: bytes) -> bool:
    """A request target of visible ASCII only (no spaces, controls or non-ASCII)."""
    return bool(target) and 0 not in target.translate(_TARGET_BYTES)


#: Whether a target is :func:`_visible`, by target: a phone repeats the same few (and
#: :mod:`.forward` hands out the same bytes object for each, so its hash is kept).
_VISIBLE_TARGETS: Final[Memo[bytes, bool]] = Memo(_visible, 4096)


@dataclass(slots=True)
class ResponseHead:
    """Status line and headers of the upstream's answer (names as sent). (Not frozen,
    as :class:`RequestHead`.)"""

    status: int
    reason: bytes
    headers: list[Header]
    #: Body size when known before reading it (Content-Length, or 0 when the answer
    #: has no body); None for chunked or close-delimited bodies.
    length: int | None
    #: The whole body, when its length was known and all of it arrived by the time the
    #: head was handed out (then no body event follows, only ``b""``); else None.
    body: bytes | None = None


class UpstreamWire:
    """The client side of one upstream connection; see the module docstring.

    The ``on_*`` methods are llhttp's callbacks (httptools calls them from
    ``feed_data``), not for callers."""

    __slots__ = ("_body", "_dead", "_done", "_eof", "_error", "_events", "_got_bytes", "_head",
                 "_headers", "_interim", "_keep_alive", "_method", "_parser", "_reason",
                 "_stall", "_started", "_to_close", "_trailing", "_version_seen")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._dead = False  # the parser was stopped: the next request needs a new one
        self._eof = False  # the upstream closed the connection
        self._events: deque[ResponseHead | bytes] = deque()
        self._body: list[bytes] = []  # pieces of the body from one receive_data
        self._method = b""
        self._reset()

    def _reset(self) -> None:
        self._events.clear()
        self._error: UpstreamProtocolError | None = None
        self._got_bytes = False  # something arrived for the current request
        # The answer's first bytes were "HTTP/1.1 " or "HTTP/1.0 ": the version of its
        # first head need not be asked of the parser (which formats a string for it).
        self._version_seen = False
        self._started = False  # the head of the final answer was read
        self._done = False  # the answer to the current request was read whole
        self._to_close = False  # its body ends with the connection
        self._trailing = False  # bytes arrived after the answer
        self._keep_alive = False
        self._interim = False  # the answer being read is a 1xx
        self._stall = 0  # bytes given to the parser since it last made progress
        self._headers: list[Header] = []
        self._reason = b""
        # The final answer's head, read in this receive_data, not yet an event:
        # (status, known length).
        self._head: tuple[int, int | None] | None = None

    def request(self, head: RequestHead, body: bytes) -> bytes:
        """The bytes of a request (``head`` from :func:`request_head`) and its body."""
        if len(body) != head.body_length:
            raise UnsendableRequest("the body's length is not the head's")
        if self._dead:
            self._parser = httptools.HttpResponseParser(self)
            self._dead = False
        self._method = head.method
        self._reset()
        return head.data + body if body else head.data

    def receive_data(self, data: bytes) -> None:
        """Bytes from the upstream; ``b""`` when it closed the connection."""
        if self._eof:
            if data:
                raise UpstreamProtocolError("bytes after the end of the connection")
            return
        if not data:
            self._eof = True
            if not self._done and self._error is None:
                self._error = self._end_of_connection()
            return
        if not self._got_bytes:
            self._got_bytes = True
            self._version_seen = data.startswith(_HTTP_1X)
        if self._done or self._dead or self._error is not None:
            self._trailing = True  # nothing more is read from this connection
            return
        self._stall += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._dead = True
            if not self._done and self._error is None:
                self._error = UpstreamProtocolError(f"bad upstream answer: {e}")
        finally:
            self._events_from_feed()
        if not self._done and self._error is None and self._stall > MAX_HEAD_BYTES:
            self._error = UpstreamProtocolError("upstream answer head too long")

    def _events_from_feed(self) -> None:
        """The head and body pieces one ``feed_data`` read, as events: the head with
        the whole body when both arrived and its length was known (most EAS answers:
        no body event to hand out), else the head, then the body in one piece."""
        body = self._body
        if self._head is not None:
            status, length = self._head
            self._head = None
            whole = None
            if self._done and length is not None:
                whole = b"".join(body)
                body.clear()
            self._events.append(ResponseHead(status, self._reason, self._headers, length,
                                             whole))
        if body:
            self._events.append(b"".join(body))
            body.clear()

    def _end_of_connection(self) -> UpstreamProtocolError | None:
        """What the end of the connection means for an unfinished answer: the end of a
        close-delimited body (None), or an error."""
        if not self._got_bytes:
            return UpstreamClosedEarly("upstream closed the connection")
        if self._to_close:
            self._done = True
            return None
        return UpstreamProtocolError("upstream answer cut short")

    def next_event(self) -> ResponseHead | bytes | None:
        """The answer's head, then body pieces, then ``b""`` (again on every later
        call); None when more bytes are needed."""
        if self._events:
            return self._events.popleft()
        if self._done:
            return b""
        if self._error is not None:
            raise self._error
        return None

    @property
    def reusable(self) -> bool:
        """The last answer was read whole, both sides keep the connection alive, it is
        open and nothing more arrived."""
        return (self._done and not self._events and self._keep_alive and not self._eof
                and not self._trailing and not self._dead)

    # -- llhttp's callbacks

    def _fail(self, why: str) -> None:
        self._error = UpstreamProtocolError(f"bad upstream answer: {why}")
        raise _Stop

    def on_message_begin(self) -> None:
        if self._done:  # another answer after the one asked for
            self._trailing = True
            raise _Stop
        self._headers = []
        self._reason = b""

    def on_status(self, piece: bytes) -> None:
        self._reason += piece

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if not self._version_seen and parser.get_http_version() not in ("1.1", "1.0"):
            self._fail("not HTTP/1.x")
        self._version_seen = False  # a head after an interim one is asked about
        if status < 100 or status == 101:
            self._fail(f"status {status}")
        if status < 200:
            self._interim = True  # 100 Continue, 102, 103: the real answer follows
            return
        if 0 in self._reason.translate(_FIELD_BYTES):
            self._fail("control bytes in the reason")
        # lower_names without its frame: llhttp lets no line feed into a name
        lowered = b"\n".join(map(header_name, self._headers)).lower().split(b"\n")
        length: int | None = None
        chunked = False
        if self._method == b"HEAD" or status in _NO_BODY:
            length = 0
        elif b"transfer-encoding" in lowered:
            # llhttp refused it beside Content-Length; only "chunked", once, is read
            codings = [v for (_, v), lk in zip(self._headers, lowered, strict=True)
                       if lk == b"transfer-encoding"]
            if len(codings) != 1 or codings[0].lower() != b"chunked":
                self._fail("transfer coding other than chunked")
            chunked = True
        elif b"content-length" in lowered:  # llhttp checked: digits, once, no overflow
            length = int(self._headers[lowered.index(b"content-length")][1])
        self._to_close = length is None and not chunked
        self._head = (status, length)
        self._started, self._stall = True, 0
        if self._method == b"HEAD":  # llhttp would wait for the body Content-Length names
            self._keep_alive = False
            self._done = True
            raise _Stop

    def on_body(self, piece: bytes) -> None:
        self._stall = 0
        self._body.append(piece)  # joined into one event per receive_data

    def on_message_complete(self) -> None:
        self._stall = 0
        if self._interim:
            self._interim = False
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._done = True
