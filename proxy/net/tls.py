"""TLS contexts for listeners and upstream connections, and the device id of a TLS
connection's verified client certificate.

Listeners accept TLS 1.2+ only. A client certificate, when presented, must verify
against ``[tls] client_ca`` (an invalid one fails the handshake); its SAN
``urn:mailward:device:<id>`` names the device.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from proxy.ids import ClientCert, client_cert_from_der


def server_context(
    cert: Path,
    key: Path,
    *,
    client_ca: Path | None,
    client_cert: Literal["none", "optional", "required"] = "optional",
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_cert != "none" and client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def upstream_context(ca: Path | None) -> ssl.SSLContext:
    """Verifying client context for the upstream; ``ca`` None = system trust store."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def device_id_from_ssl(obj: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """Device id from a TLS connection's verified peer certificate."""
    cert = client_cert_from_ssl(obj)
    return cert.device_id if cert is not None else None


def client_cert_from_ssl(obj: ssl.SSLObject | ssl.SSLSocket | None) -> ClientCert | None:
    """The identity facts of a TLS connection's verified peer certificate, for
    :class:`proxy.gate.Identity` (``cert=``); None without TLS or certificate."""
    if obj is None:
        return None
    try:
        der = obj.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        return None
    return client_cert_from_der(der)


def feed_early_tls_bytes(transport: Any, data: bytes) -> None:
    """Hand bytes read before ``loop.start_tls`` (the start of a ClientHello: uvloop
    keeps reading after ``connection_made``) to the TLS protocol now on ``transport``."""
    proto = transport.get_protocol()
    if transport.is_closing() or proto is None:
        return
    if hasattr(proto, "get_buffer"):  # asyncio and uvloop TLS protocols are buffered
        view = memoryview(data)
        while view:
            buf = proto.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            proto.buffer_updated(n)
            view = view[n:]
    else:
        proto.data_received(data)
