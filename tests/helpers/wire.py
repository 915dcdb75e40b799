"""Driving the h11-style sans-IO parsers (``imap_wire``, ``pop3_wire``) in tests."""

from __future__ import annotations

from typing import Protocol


class Connection(Protocol):
    """What the wire modules' ``Connection`` offers a reader of events."""

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...


def drain(conn: Connection, data: bytes, *, stop: tuple[object, ...],
          last: type) -> list[object]:
    """Feed ``data`` and collect every event until one of the ``stop`` sentinels (not
    collected) or an event of type ``last`` (collected)."""
    if data:
        conn.receive_data(data)
    out: list[object] = []
    while True:
        ev = conn.next_event()
        if any(ev is s for s in stop):
            return out
        out.append(ev)
        if isinstance(ev, last):
            return out
