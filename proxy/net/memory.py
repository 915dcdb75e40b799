"""Giving freed memory back to the system after a burst of connections.

glibc's allocator keeps the pages of freed small objects in its arenas; after 2,000
connections come and go, a Python process can stay tens of MB larger for good.
``malloc_trim(0)`` returns free pages at the top and inside the arenas. The server
watches the number of open connections (:func:`open_connections`, kept by
:class:`~proxy.net.socket_transport.SocketTransport`) with a :class:`Trimmer` and trims
once the count has dropped by :data:`TRIM_AFTER_DROP` from its recent peak.
Elsewhere (musl, macOS) trimming is a no-op.

The other half of keeping idle connections small: :func:`shared_read_buffer`, the one
plaintext receive buffer per event-loop thread that every connection reads into.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Final

#: Plaintext receive buffer, one per event-loop thread (above a TLS record's 16 KiB,
#: so one ``recv_into`` takes a whole record).
READ_BUFFER_BYTES = 256 * 1024


class _ReadBuffer(threading.local):
    view: memoryview | None = None


_read_buffer = _ReadBuffer()


def shared_read_buffer() -> memoryview:
    """The receive buffer of this event-loop thread, shared by all its connections.

    A read is handed on before the next one starts (the read into it and the
    protocol's ``buffer_updated`` run with no other Python code in between), and a
    :class:`SocketTransport` copies what it cannot send at once, so idle connections
    hold no receive buffer at all."""
    view = _read_buffer.view
    if view is None:
        view = _read_buffer.view = memoryview(bytearray(READ_BUFFER_BYTES))
    return view


#: Trim once this many connections have closed since the peak.
TRIM_AFTER_DROP: Final = 256

_open = [0]


def connection_opened() -> None:
    _open[0] += 1


def connection_closed() -> None:
    _open[0] -= 1


def open_connections() -> int:
    """Connections on :class:`~proxy.net.socket_transport.SocketTransport` now open."""
    return _open[0]


class Trimmer:
    """Pure: says when to trim, given the connection count over time."""

    def __init__(self, drop: int = TRIM_AFTER_DROP) -> None:
        self.drop = drop
        self.peak = 0

    def observe(self, count: int) -> bool:
        """True when ``count`` is ``drop`` below the peak since the last trim (the
        peak then restarts from ``count``)."""
        if count > self.peak:
            self.peak = count
            return False
        if self.peak - count >= self.drop:
            self.peak = count
            return True
        return False


def _libc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


#: ``MAILWARD_MALLOC_TRIM=0`` turns trimming off (to measure what it saves).
_trim = None if os.environ.get("MAILWARD_MALLOC_TRIM") == "0" else _libc_trim()


def malloc_trim() -> bool:
    """Return free heap pages to the system (glibc); False where unavailable."""
    if _trim is None:
        return False
    return bool(_trim(0))


__all__ = ["TRIM_AFTER_DROP", "Trimmer", "malloc_trim", "open_connections"]
