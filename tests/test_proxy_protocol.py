"""PROXY protocol v1/v2 parser (proxy/net/proxy_protocol.py): tables, split points, fuzz."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.net.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)

pytestmark = pytest.mark.pure

V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 993\r\n"


def v2(src: str, dst: str, sport: int, dport: int, *, command: int = 1, tlv: bytes = b"") -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport) + tlv
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack("!H", len(body)) + body


def test_v1_tcp4_and_rest_left_alone() -> None:
    """A v1 header gives the client's address; the bytes after it are not consumed."""
    got = parse(V1 + b"\x16\x03\x01")
    assert got == ProxyHeader(1, "PROXY", "TCP4", ("203.0.113.7", 51234), ("192.0.2.1", 993),
                              len(V1))


def test_v1_tcp6_and_unknown() -> None:
    """TCP6 addresses parse; UNKNOWN keeps the connection's own address (source None)."""
    got = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
    assert got is not None and got.source == ("2001:db8::1", 1)
    unknown = parse(b"PROXY UNKNOWN\r\nA1 CAPABILITY\r\n")
    assert unknown is not None and unknown.source is None and unknown.length == 15


def test_v2_ipv4_ipv6_local_and_tlvs() -> None:
    """v2 headers with IPv4, IPv6, TLVs (skipped) and LOCAL (no address) parse."""
    four = v2("198.51.100.9", "10.0.0.1", 4000, 143, tlv=b"\x04\x00\x01x")
    got = parse(four + b"rest")
    assert got is not None and got.source == ("198.51.100.9", 4000) and got.length == len(four)
    six = parse(v2("2001:db8::7", "2001:db8::1", 5, 6))
    assert six is not None and six.family == "TCP6" and six.source == ("2001:db8::7", 5)
    local = parse(v2("127.0.0.1", "127.0.0.1", 1, 2, command=0))
    assert local is not None and local.command == "LOCAL" and local.source is None


@pytest.mark.parametrize("bad", [
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", b"PROXY TCP5 a b 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", b"PROXY " + b"x" * 120,
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # address block too short
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # too long
])
def test_invalid_headers_raise_own_error(bad: bytes) -> None:
    """Each malformed header raises ProxyProtocolError."""
    with pytest.raises(ProxyProtocolError):
        parse(bad)


@pytest.mark.parametrize("header", [V1, v2("203.0.113.7", "192.0.2.1", 51234, 993)])
def test_every_split_point_needs_more_then_parses(header: bytes) -> None:
    """Any strict prefix of a valid header asks for more; the whole header parses."""
    for i in range(len(header)):
        assert parse(header[:i]) is None
    assert parse(header) is not None


@given(st.binary(max_size=300))
def test_fuzz_any_bytes_parse_or_raise_own_error(data: bytes) -> None:
    """Any input either parses, asks for more, or raises ProxyProtocolError."""
    try:
        got = parse(data)
    except ProxyProtocolError:
        return
    assert got is None or 0 < got.length <= len(data)


@given(st.binary(max_size=64))
def test_fuzz_after_v2_signature(tail: bytes) -> None:
    """Bytes after the v2 signature parse, ask for more, or raise ProxyProtocolError."""
    with contextlib.suppress(ProxyProtocolError):
        parse(V2_SIGNATURE + tail)


@given(st.text(alphabet="PROXYTCP46UNKOW0123456789.:abcdef \r\n", max_size=80))
def test_fuzz_v1_like_text(text: str) -> None:
    """v1-looking lines parse, ask for more, or raise ProxyProtocolError."""
    with contextlib.suppress(ProxyProtocolError):
        parse(b"PROXY " + text.encode())
