"""The answers mailward gives itself: 403 as Exchange refuses a blocked device, 503
when something it depends on is down, and plain-text errors.

Exchange answers a blocked device with HTTP 403 and EAS status 129
(DeviceIsBlockedForThisUser), and names the block reason in ``X-MS-ASThrottle``. For
clients of protocol 14.0 and later, whose command responses carry a global
``Status``, the 403 body is that command's WBXML response with ``Status`` 129, so
native mail apps show their own "device blocked" message. EAS has no field for
server-supplied text in such a response, so the remediation text travels in the
``X-Mailward-Refusal`` header (percent-encoded where not ASCII) and in the audit log;
older clients and commands without a ``Status`` get it as the ``text/plain`` body.
``X-MS-ASThrottle`` says ``ExternalCompliance``: Exchange's reason for a device barred
by an external compliance system, which is what mailward is.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

from aiohttp import web

from proxy.gate import TEMPORARY_TEXT

#: Retry-After on temporary refusals (upstream, posture store or audit unavailable).
RETRY_AFTER_S: Final = 30
THROTTLE_REASON: Final = "ExternalCompliance"
STATUS_BLOCKED: Final = "129"  # DeviceIsBlockedForThisUser (MS-ASCMD 2.2.2)

# Command -> (WBXML code page, command tag, Status tag) per MS-ASWBXML, for the
# commands whose response carries a global Status in protocol 14.0 and later.
_STATUS_RESPONSE: Final[dict[str, tuple[int, int, int]]] = {
    "Sync": (0, 0x05, 0x0E),
    "MoveItems": (5, 0x05, 0x0B),
    "GetItemEstimate": (6, 0x05, 0x0E),
    "FolderCreate": (7, 0x13, 0x0C),
    "FolderDelete": (7, 0x14, 0x0C),
    "FolderUpdate": (7, 0x15, 0x0C),
    "FolderSync": (7, 0x16, 0x0C),
    "ResolveRecipients": (10, 0x05, 0x07),
    "Ping": (13, 0x05, 0x07),
    "Provision": (14, 0x05, 0x0B),
    "Search": (15, 0x05, 0x0C),
    "Settings": (18, 0x05, 0x06),
    "ItemOperations": (20, 0x05, 0x0D),
    "SendMail": (21, 0x05, 0x12),
    "SmartForward": (21, 0x06, 0x12),
    "SmartReply": (21, 0x07, 0x12),
}


def status_wbxml(command: str, status: str) -> bytes | None:
    """A minimal WBXML response ``<Command><Status>status</Status></Command>``, or None
    when the command's response has no global Status."""
    entry = _STATUS_RESPONSE.get(command)
    if entry is None:
        return None
    page, tag, status_tag = entry
    # version 1.3, unknown public id, UTF-8, empty string table
    out = bytearray(b"\x03\x01\x6a\x00")
    if page:
        out += bytes([0x00, page])  # SWITCH_PAGE
    out += bytes([0x40 | tag, 0x40 | status_tag, 0x03]) + status.encode() + b"\x00\x01\x01"
    return bytes(out)


def protocol_at_least(version: str | None, minimum: tuple[int, int]) -> bool:
    """Whether an ``MS-ASProtocolVersion`` such as ``"14.1"`` is at least ``minimum``."""
    try:
        major, _, minor = (version or "").partition(".")
        return (int(major), int(minor or 0)) >= minimum
    except ValueError:
        return False


def header_safe(text: str) -> str:
    """``text`` for a header: printable ASCII stays readable, anything else (and %)
    is percent-encoded."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def text_response(status: int, text: str, headers: dict[str, str] | None = None
                  ) -> web.Response:
    """A ``text/plain`` answer of one line."""
    return web.Response(status=status, text=text + "\n", headers=headers,
                        content_type="text/plain", charset="utf-8")


def unavailable() -> web.Response:
    """503 with Retry-After: the upstream, the posture store or the audit log is down."""
    return text_response(503, TEMPORARY_TEXT, {"Retry-After": str(RETRY_AFTER_S)})


def blocked_response(command: str, protocol_version: str | None, text: str) -> web.Response:
    """HTTP 403 as Exchange answers a blocked device (see the module docstring)."""
    headers = {
        "X-MS-ASThrottle": THROTTLE_REASON,
        "X-Mailward-Refusal": header_safe(text),
        "Cache-Control": "private, no-store",
    }
    body = status_wbxml(command, STATUS_BLOCKED) if protocol_at_least(
        protocol_version, (14, 0)) else None
    if body is not None:
        headers["Content-Type"] = "application/vnd.ms-sync.wbxml"
        return web.Response(status=403, body=body, headers=headers)
    return text_response(403, text, headers)
