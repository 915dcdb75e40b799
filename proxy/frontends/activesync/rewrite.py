"""Autodiscover answers: the upstream's own address replaced by the listener's
``public_url``, and nothing else changed. Pure functions on bytes, no I/O.

Only what mailward itself serves is rewritten: in the XML form (MS-ASCMD
Autodiscover, the ``mobilesync`` response schema) the ``Url``, ``Name`` and ``Server``
children of an ``Action/Settings/Server`` whose ``Type`` is ``MobileSync`` (not
``CertEnroll`` or anything else); in the JSON form (``autodiscover.json``) the
top-level ``Url`` when ``Protocol`` is ``ActiveSync`` or ``AutodiscoverV1``. A value is
rewritten only when its origin (scheme, host, port) *equals* the upstream's; its path
and query are kept. The replacement comes from configuration only, never from the
request (``Host`` is the client's to choose).

Byte for byte: the document is parsed to find the elements (so the structure is
known, not guessed by a pattern), and then only the bytes of those values are
replaced at the offsets the parser reported; everything else, including the XML
declaration, namespaces prefixes, whitespace and the JSON formatting, stays as the
upstream sent it. A value is replaced only when its raw bytes are exactly its parsed
text (no entity reference, CDATA section or comment inside it, UTF-8); otherwise, and
for any document that is not well formed, carries a DTD (``<!DOCTYPE``: no entity is
ever declared, so nothing can expand or be fetched) or repeats a JSON key, the answer
passes unchanged and :class:`Unchanged` says why.

The XML parser is the standard library's expat, used directly (not ElementTree) for its
byte offsets and its handlers: a ``<!DOCTYPE`` stops the parse at its first byte, before
any entity declaration is read; parameter entities and external entities are never
parsed. (defusedxml does the same with the same handlers; its trees would not give
the offsets.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit
from xml.parsers import expat

from yarl import URL

#: ``Protocol`` values of the JSON form whose ``Url`` mailward serves.
SERVED_JSON_PROTOCOLS: Final = frozenset({"activesync", "autodiscoverv1"})
#: The XML path of a server entry, by local names.
_SERVER_PATH: Final = ("Action", "Settings", "Server")
#: Children of a MobileSync server entry that carry its address.
_ADDRESS_FIELDS: Final = frozenset({"Url", "Name", "Server"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class Unchanged(Exception):
    """The document passes unchanged; ``reason`` says why (for the log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, lower case, port explicit."""
    u = URL(url)
    scheme = (u.scheme or "").lower()
    port = u.explicit_port or _DEFAULT_PORTS.get(scheme, 0)
    return scheme, (u.host or "").lower(), port


@dataclass(frozen=True, slots=True)
class Rewriter:
    """Replaces the upstream's origin (``upstream``, e.g. ``https://exchange.corp``)
    by ``public`` (the listener's ``public_url``) in Autodiscover answers."""

    upstream: str
    public: str
    _origin: tuple[str, str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_origin", origin_of(self.upstream))
        object.__setattr__(self, "public", self.public.rstrip("/"))

    def url(self, value: str) -> str | None:
        """``value`` with the public origin when its origin equals the upstream's
        (path, query kept; surrounding whitespace dropped), else None."""
        v = value.strip()
        if not v.isprintable() or any(c in v for c in " \\"):
            return None  # urlsplit would quietly drop tabs and line feeds
        try:
            u = urlsplit(v)
            port = u.port or _DEFAULT_PORTS.get(u.scheme, 0)
        except ValueError:
            return None
        if u.username is not None or u.password is not None:
            return None
        if (u.scheme, (u.hostname or "").lower(), port) != self._origin:
            return None
        head = len(u.scheme) + 3 + len(u.netloc)
        rest = v[head:]
        if v[len(u.scheme):len(u.scheme) + 3] != "://" or rest[:1] not in ("", "/", "?"):
            return None
        return self.public + rest

    # -- XML ----------------------------------------------------------------------

    def xml(self, body: bytes) -> bytes:
        """The XML answer with its MobileSync addresses rewritten (:class:`Unchanged`
        when nothing is)."""
        edits: list[tuple[int, int, bytes]] = []
        for start, end, text, plain in _mobilesync_addresses(body):
            new = self.url(text)
            if new is None:
                continue
            try:
                exact = plain and body[start:end].decode("utf-8") == text
            except UnicodeDecodeError:
                exact = False
            if not exact:  # an entity reference, CDATA, a comment, not UTF-8
                raise Unchanged("address not plain text")
            lead = len(text) - len(text.lstrip())
            trail = len(text.rstrip())
            edits.append((start + len(text[:lead].encode()),
                          start + len(text[:trail].encode()), _xml_escape(new)))
        if not edits:
            raise Unchanged("no upstream address")
        return _splice(body, edits)

    # -- JSON ---------------------------------------------------------------------

    def json(self, body: bytes) -> bytes:
        """The JSON answer with its top-level ``Url`` rewritten (:class:`Unchanged`
        when it is not)."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise Unchanged("not UTF-8") from None
        members = _top_level_members(text)
        protocol = members.get("Protocol")
        url = members.get("Url")
        if protocol is None or not isinstance(protocol[0], str) or \
                protocol[0].lower() not in SERVED_JSON_PROTOCOLS:
            raise Unchanged("protocol not served")
        if url is None or not isinstance(url[0], str):
            raise Unchanged("no Url")
        new = self.url(url[0])
        if new is None:
            raise Unchanged("no upstream address")
        _, start, end = url
        return (text[:start] + json.dumps(new) + text[end:]).encode("utf-8")


def _xml_escape(text: str) -> bytes:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").encode()


def _splice(body: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray()
    pos = 0
    for start, end, new in sorted(edits):
        out += body[pos:start] + new
        pos = end
    return bytes(out + body[pos:])


def _refuse_dtd(*_: Any) -> None:
    raise Unchanged("DTD")


def _refuse_external(*_: Any) -> int:
    raise Unchanged("external entity")


@dataclass(slots=True)
class _Value:
    """The text of one address element, and where its bytes are."""

    name: str
    start: int = -1
    end: int = -1
    parts: list[str] = field(default_factory=list)
    plain: bool = True  # no child element, CDATA section or comment inside


@dataclass(slots=True)
class _ServerEntry:
    types: list[str] = field(default_factory=list)
    values: list[_Value] = field(default_factory=list)


class _Scan:
    """Expat handlers collecting the address values of each server entry."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.stack: list[str] = []
        self.server: _ServerEntry | None = None
        self.value: _Value | None = None
        self.type_text: list[str] | None = None
        self.found: list[_Value] = []

    def start(self, name: str, _attrs: Any) -> None:
        local = name.rpartition(" ")[2]
        if self.value is not None:
            self.value.plain = False
        self.stack.append(local)
        if tuple(self.stack[-3:]) == _SERVER_PATH:
            self.server = _ServerEntry()
        elif self.server is not None and tuple(self.stack[-4:-1]) == _SERVER_PATH:
            if local == "Type":
                self.type_text = []
            elif local in _ADDRESS_FIELDS:
                self.value = _Value(local)

    def text(self, data: str) -> None:
        if self.value is not None:
            if self.value.start < 0:
                self.value.start = self.parser.CurrentByteIndex
            self.value.parts.append(data)
        elif self.type_text is not None:
            self.type_text.append(data)

    def not_plain(self, *_: Any) -> None:
        if self.value is not None:
            self.value.plain = False

    def end(self, _name: str) -> None:
        local = self.stack.pop()
        in_entry = tuple(self.stack[-3:]) == _SERVER_PATH
        if self.value is not None and in_entry and local == self.value.name:
            assert self.server is not None
            self.value.end = self.parser.CurrentByteIndex
            self.server.values.append(self.value)
            self.value = None
        elif self.type_text is not None and in_entry and local == "Type":
            assert self.server is not None
            self.server.types.append("".join(self.type_text).strip())
            self.type_text = None
        elif self.server is not None and (*self.stack[-2:], local) == _SERVER_PATH:
            if self.server.types and all(t == "MobileSync" for t in self.server.types):
                self.found.extend(self.server.values)
            self.server = None


def _mobilesync_addresses(body: bytes) -> Iterator[tuple[int, int, str, bool]]:
    """(start, end, text, plain) of each address value of a MobileSync server entry:
    the value's bytes are ``body[start:end]``; ``plain`` is False when a child
    element, CDATA section, comment or processing instruction is inside.
    :class:`Unchanged` for a document that is not well formed or has a DTD."""
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.buffer_text = False  # every text event has its own byte offset
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.ExternalEntityRefHandler = _refuse_external
    scan = _Scan(parser)
    parser.StartElementHandler = scan.start
    parser.EndElementHandler = scan.end
    parser.CharacterDataHandler = scan.text
    parser.StartCdataSectionHandler = scan.not_plain
    parser.CommentHandler = scan.not_plain
    parser.ProcessingInstructionHandler = scan.not_plain
    try:
        parser.Parse(body, True)
    except expat.ExpatError as e:
        raise Unchanged(f"not well formed: {e}") from None
    for v in scan.found:
        if v.start >= 0:
            yield v.start, v.end, "".join(v.parts), v.plain


def _top_level_members(text: str) -> dict[str, tuple[Any, int, int]]:
    """The members of a JSON object document: key -> (value, start, end), where
    ``text[start:end]`` is the value's source. :class:`Unchanged` when the document is
    not one JSON object or repeats a key."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in ws:
            i += 1
        return i

    members: dict[str, tuple[Any, int, int]] = {}
    try:
        json.loads(text)  # the whole document is valid JSON
        i = skip(0)
        if text[i] != "{":
            raise Unchanged("not a JSON object")
        i = skip(i + 1)
        while text[i] != "}":
            key, i = decoder.raw_decode(text, i)
            i = skip(i)
            if not isinstance(key, str) or text[i] != ":" or key in members:
                raise Unchanged("repeated or bad key")
            start = skip(i + 1)
            value, end = decoder.raw_decode(text, start)
            members[key] = (value, start, end)
            i = skip(end)
            if text[i] == ",":
                i = skip(i + 1)
    except (ValueError, IndexError):
        raise Unchanged("not JSON") from None
    return members
