"""PROXY protocol v1 and v2 (HAProxy's specification): the header a TCP load balancer
such as nginx ``stream`` (``proxy_protocol on;``) or HAProxy (``send-proxy[-v2]``)
puts before the client's first byte, naming the client's address.

Sans-IO: :func:`parse` takes the bytes received so far and returns ``None`` (need
more), or a :class:`ProxyHeader` whose ``length`` says how many bytes the header
took (the rest is the client's: a TLS ClientHello, an IMAP command). Anything else
raises :class:`ProxyProtocolError`; that is the only exception any input can raise
(tests/test_proxy_protocol.py fuzzes it). The accept loop
(:mod:`proxy.net.listener`) reads the header before TLS, only from ``[server]
trusted_proxies``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

#: A v1 header is at most 107 bytes including CRLF (the specification's bound).
MAX_V1_BYTES: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES: Final = 16
#: TLVs beyond the addresses are skipped; a header longer than this is refused.
MAX_V2_BYTES: Final = V2_FIXED_BYTES + 1024
#: The most :func:`parse` may need to see (a reader peeks this much).
MAX_HEADER_BYTES: Final = MAX_V2_BYTES

_V1_PREFIX: Final = b"PROXY "
_V2_FAMILIES: Final = {0x11: ("TCP4", 12), 0x12: ("UDP4", 12), 0x21: ("TCP6", 36),
                       0x22: ("UDP6", 36), 0x31: ("UNIX", 216), 0x32: ("UNIX", 216),
                       0x00: ("UNKNOWN", 0)}

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """The peer sent something that is not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. ``source`` is the client's address; None for ``LOCAL``
    (a health check by the proxy itself) and ``UNKNOWN`` families, where the
    connection's own peer address stands."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: str
    source: Address | None
    destination: Address | None
    length: int


def parse(data: bytes) -> ProxyHeader | None:
    """See the module docstring."""
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)] and data:
        return _parse_v2(data) if len(data) >= len(V2_SIGNATURE) else None
    if data[:len(_V1_PREFIX)] == _V1_PREFIX[:len(data)]:
        return _parse_v1(data) if len(data) >= len(_V1_PREFIX) else None
    raise ProxyProtocolError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_BYTES)
    if end < 0:
        if len(data) >= MAX_V1_BYTES or b"\n" in data[:MAX_V1_BYTES]:
            raise ProxyProtocolError("PROXY v1 line too long or not CRLF-terminated")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("PROXY v1 line must be PROXY TCP4|TCP6 src dst sport dport")
    version = 4 if parts[1] == "TCP4" else 6
    src = _v1_address(parts[2], parts[4], version)
    dst = _v1_address(parts[3], parts[5], version)
    return ProxyHeader(1, "PROXY", parts[1], src, dst, end + 2)


def _v1_address(ip: str, port: str, version: int) -> Address:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1: bad address {ip!r}") from None
    if addr.version != version:
        raise ProxyProtocolError(f"PROXY v1: {ip!r} is not IPv{version}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535 \
            or (len(port) > 1 and port[0] == "0"):
        raise ProxyProtocolError(f"PROXY v1: bad port {port!r}")
    return str(addr), int(port)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED_BYTES:
        return None
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd >> 4 != 2 or ver_cmd & 0x0F > 1:
        raise ProxyProtocolError("PROXY v2: bad version or command")
    if fam not in _V2_FAMILIES:
        raise ProxyProtocolError("PROXY v2: unknown address family")
    total = V2_FIXED_BYTES + length
    if total > MAX_V2_BYTES:
        raise ProxyProtocolError("PROXY v2 header too long")
    if len(data) < total:
        return None
    command: Literal["PROXY", "LOCAL"] = "LOCAL" if ver_cmd & 0x0F == 0 else "PROXY"
    family, need = _V2_FAMILIES[fam]
    if length < need:
        raise ProxyProtocolError("PROXY v2: address block too short")
    body = data[V2_FIXED_BYTES:total]
    if command == "LOCAL" or family in ("UNKNOWN", "UNIX"):
        return ProxyHeader(2, command, family, None, None, total)
    size = 4 if need == 12 else 16
    src_ip = ipaddress.ip_address(body[:size])
    dst_ip = ipaddress.ip_address(body[size:2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return ProxyHeader(2, command, family, (str(src_ip), sport), (str(dst_ip), dport), total)


__all__ = ["MAX_HEADER_BYTES", "ProxyHeader", "ProxyProtocolError", "parse"]
