"""HTTP/1.1 on the upstream leg, without I/O: h11 does the parsing, this module says
what mailward forwards.

* :func:`end_to_end` is the one hop-by-hop header filter (RFC 9110 section 7.6.1): it
  serves requests to the upstream and answers to the client, on both upstream paths.
  :func:`forwarded_headers` adds ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` to it.
* :func:`request_head` validates a request head once (a phone repeats the same few
  requests all day, so a head may be kept and sent again).
* :class:`UpstreamWire` is one upstream connection's client side: ``request()`` turns
  a head and a body into bytes to write, ``receive_data()`` takes what the upstream
  sent (``b""`` at the end of the connection) and ``next_event()`` hands out the
  answer: a :class:`ResponseHead`, then the body in pieces, then ``b""``; ``None``
  while more bytes are needed. Interim 1xx answers are skipped. Keep-alive cycles follow
  h11.

Errors say whose fault they are. Whatever the upstream sends, ``next_event`` returns
an event or raises :class:`UpstreamProtocolError` (the peer's fault; answer 503), never
anything else: a hypothesis test states that invariant. :class:`UpstreamClosedEarly`,
a subclass, is the connection ending before any byte of the answer, the one case in
which a read-only request may be sent again. :class:`UnsendableRequest` is a request
that h11 will not write (the client's headers are not valid HTTP; answer 400).

Cost: h11 is pure Python and the dearest part of a small exchange. Measured on the
bench's Sync (2 CPUs shared, so noisy): about 45 us per request and answer at the
connection level against about 5 us for the hand-written parser it replaced, which
halves ``bench/activesync.py``'s requests per CPU-second (13,800 -> 6,900). Validating
the request head is a quarter of it, hence :func:`request_head` and the head cache in
:mod:`.forward`. The interface here does not name h11 outside this module, so another
sans-IO parser could take its place under the same tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import h11

#: Bodies move in pieces of at most this many bytes.
CHUNK_BYTES: Final = 64 * 1024
#: Longest incomplete upstream response head (or chunk-size line) held, in bytes
#: (h11's ``max_incomplete_event_size``: a head is refused once this much of it has
#: arrived without its end).
MAX_HEAD_BYTES: Final = 64 * 1024

Header = tuple[bytes, bytes]
#: A validated request head, from :func:`request_head`.
RequestHead = h11.Request

#: Headers that describe one connection, never forwarded (lower case).
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect",
})
#: Request headers mailward sets itself, so the client's copies are dropped.
_REPLACED: Final = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto",
                              b"x-forwarded-host"})
#: Statuses whose answer never has a body (RFC 9110 section 6.4.1).
_NO_BODY: Final = frozenset({204, 304})


class UpstreamProtocolError(OSError):
    """The upstream's answer is not HTTP/1.1 we can forward."""


class UpstreamClosedEarly(UpstreamProtocolError, ConnectionResetError):
    """The upstream closed the connection before any byte of the answer."""


class UnsendableRequest(ValueError):
    """The request cannot be written as valid HTTP/1.1 (the client's headers)."""


def end_to_end(headers: Iterable[Header], drop: frozenset[bytes] = frozenset()
               ) -> list[Header]:
    """``headers`` in order without the hop-by-hop ones: the fixed set, those the
    ``Connection`` header names, and the lower-case names in ``drop``."""
    headers = list(headers)
    skip = HOP_BY_HOP | drop
    for name, value in headers:
        if name.lower() == b"connection":
            skip = skip.union(t.strip().lower() for t in value.split(b","))
    return [(k, v) for k, v in headers if k.lower() not in skip]


def forwarded_headers(headers: Sequence[Header], remote: str, scheme: str,
                      drop: frozenset[bytes] = frozenset()) -> list[Header]:
    """The client's request headers as the upstream gets them: end to end only, without
    ``Host`` and the names in ``drop``; ``X-Forwarded-For`` extended with ``remote``,
    ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (the client's ``Host``) set."""
    prior: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"x-forwarded-for" and prior is None:
            prior = value
        elif lower == b"host" and host is None:
            host = value
    out = end_to_end(headers, _REPLACED | drop)
    addr = remote.encode()
    out.append((b"X-Forwarded-For", prior + b", " + addr if prior else addr))
    out.append((b"X-Forwarded-Proto", scheme.encode()))
    if host is not None:
        out.append((b"X-Forwarded-Host", host))
    return out


def header_text(raw: bytes) -> str:
    """A header name or value as text for aiohttp: UTF-8 when it is, else Latin-1 (so
    any byte string survives)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def request_head(method: bytes, target: bytes, headers: list[Header], body_length: int
                 ) -> RequestHead:
    """A validated request head (``UnsendableRequest`` when h11 refuses it); with a
    body, or for POST, ``Content-Length`` is added. Immutable: the same head may be sent
    any number of times."""
    if body_length or method == b"POST":
        headers = [*headers, (b"Content-Length", b"%d" % body_length)]
    try:
        return h11.Request(method=method, target=target, headers=headers)
    except h11.LocalProtocolError as e:
        raise UnsendableRequest(str(e)) from None


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """Status line and headers of the upstream's answer (names as sent)."""

    status: int
    reason: bytes
    headers: list[Header]
    #: Body size when known before reading it (Content-Length, or 0 when the answer
    #: has no body); None for chunked or close-delimited bodies.
    length: int | None


class UpstreamWire:
    """The client side of one upstream connection; see the module docstring."""

    __slots__ = ("_done", "_eof", "_got_bytes", "_h11", "_method")

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._method = b""
        self._got_bytes = False  # something arrived for the current request
        self._done = False  # the answer to the current request was read whole
        self._eof = False  # the upstream closed the connection

    def request(self, head: RequestHead, body: bytes) -> bytes:
        """The bytes of a request (``head`` from :func:`request_head`) and its body."""
        conn = self._h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        self._method, self._got_bytes, self._done = head.method, False, False
        try:
            out = conn.send(head)
            if body:
                out += conn.send(h11.Data(data=body))
            return out + conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:  # the body's length is not the head's
            raise UnsendableRequest(str(e)) from None

    def receive_data(self, data: bytes) -> None:
        """Bytes from the upstream; ``b""`` when it closed the connection."""
        if data:
            self._got_bytes = True
        else:
            self._eof = True
        try:
            self._h11.receive_data(data)
        except RuntimeError as e:  # bytes after the end of the connection
            raise UpstreamProtocolError(str(e)) from None

    def next_event(self) -> ResponseHead | bytes | None:
        """The answer's head, then body pieces, then ``b""`` (again on every later
        call); None when more bytes are needed."""
        if self._done:
            return b""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                if not self._got_bytes:
                    raise UpstreamClosedEarly("upstream closed the connection") from None
                raise UpstreamProtocolError(f"bad upstream answer: {e}") from None
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.Response):
                return self._head(event)
            if isinstance(event, h11.EndOfMessage):
                self._done = True
                return b""
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue, 102, 103: the real answer follows
            # PAUSED (bytes after the answer) or ConnectionClosed before one
            raise UpstreamProtocolError(f"unexpected upstream event {event!r}")

    def _head(self, event: h11.Response) -> ResponseHead:
        headers = event.headers.raw_items()  # h11 has validated them
        length: int | None = None
        if self._method == b"HEAD" or event.status_code in _NO_BODY:
            length = 0
        else:
            for name, value in headers:
                lower = name.lower()
                if lower == b"transfer-encoding":
                    length = None
                    break
                if lower == b"content-length":
                    length = int(value)
        return ResponseHead(event.status_code, bytes(event.reason), headers, length)

    @property
    def reusable(self) -> bool:
        """The last answer was read whole, both sides keep the connection alive, it is
        open and nothing more arrived."""
        conn = self._h11
        return (self._done and not self._eof and conn.our_state is h11.DONE
                and conn.their_state is h11.DONE and not conn.trailing_data[0])
