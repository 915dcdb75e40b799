"""What the sans-IO pre-auth layers of IMAP and POP3 share (no I/O, no clock).

:class:`PreauthLayer` is the part of ``imap_preauth.Preauth`` and
``pop3_preauth.Preauth`` that names no protocol: the session events every front end
answers the same way (client bytes to the wire parser, implicit TLS before the
greeting, TLS failed, the client gone, a crash), the records rule (one ``decision``
record per login attempt; a connection that ends before any gets one ``session_end``,
carried by ``Close``), and the loop that turns parser events into commands. A protocol
supplies its words (:meth:`PreauthLayer._greeting` and the other reply hooks), its
answers to the client's commands (:meth:`PreauthLayer._client_event`) and its part of
the login (the upstream's answer, the gate's decision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from proxy.frontends.events import (
    ClientClosed,
    Close,
    Connected,
    Crashed,
    DataReceived,
    DecisionMade,
    RecordUnavailable,
    SendToClient,
    Sentinel,
    SessionEnd,
    ShutdownRequested,
    StartTls,
    TimedOut,
    TlsEstablished,
    TlsFailed,
    UpstreamFailed,
)
from proxy.gate import Identity
from proxy.ids import ClientCert
from proxy.policy import Decision


class PreauthLayer:
    """One client connection before login (see the module docstring); ``conn`` is the
    protocol's sans-IO wire parser."""

    conn: Any

    def __init__(self, conn: Any, *, tls_mode: str,
                 upstream_capabilities: Callable[[], Sequence[str]]) -> None:
        self.conn = conn
        self.tls_mode = tls_mode
        self.upstream_capabilities = upstream_capabilities
        self.device_id: str | None = None
        self.cert: ClientCert | None = None
        self.identity = Identity("")
        self.decided = False  # a decision record exists for this connection
        self.finished = False  # Close or Splice was returned; later events are ignored
        self.end_reason = "client_closed"
        self._answer = b""  # the upstream's OK, sent to the client once allowed

    @property
    def buffered(self) -> int:
        """Unparsed client bytes held (the executor pauses reading above a limit)."""
        return int(self.conn.buffered)

    # ------------------------------------------------------------ protocol's part

    def _greeting(self) -> bytes:
        raise NotImplementedError

    def _unavailable_reply(self) -> bytes:
        """To the login whose upstream is unreachable; the connection then closes."""
        raise NotImplementedError

    def _timeout_reply(self) -> bytes:
        raise NotImplementedError

    def _shutdown_reply(self) -> bytes:
        raise NotImplementedError

    def _tls_established(self) -> list[Any]:
        """TLS is up (``device_id`` and ``cert`` are set): tell the parser, greet."""
        raise NotImplementedError

    def _upstream_answered(self, event: Any) -> list[Any]:
        """The protocol's ``UpstreamAnswered``: the upstream's answer to the login."""
        raise NotImplementedError

    def _decided(self, decision: Decision, shutting_down: bool,
                 alert: str = "") -> list[Any]:
        raise NotImplementedError

    def _client_event(self, ev: Any) -> list[Any]:
        """One parsed client command -> commands."""
        raise NotImplementedError

    # ------------------------------------------------------------------ events

    def handle(self, event: Any) -> list[Any]:
        """Feed one event; returns the commands to perform, in order."""
        if self.finished:
            return []
        match event:
            case DataReceived(data):
                self.conn.receive_data(data)
                return self._drain()
            case Connected():
                if self.tls_mode == "implicit":
                    return [StartTls()]
                return [SendToClient(self._greeting())]
            case TlsEstablished(device_id, cert):
                self.device_id, self.cert = device_id, cert
                return self._tls_established()
            case TlsFailed(detail):
                return self._close("tls_failed", detail)
            case UpstreamFailed(detail):
                self.decided = True  # RecordUnavailable is this attempt's decision record
                return [SendToClient(self._unavailable_reply()),
                        RecordUnavailable(self.identity, detail), *self._close("upstream")]
            case TimedOut(total):
                return [SendToClient(self._timeout_reply()),
                        *self._close("preauth_timeout" if total else "idle_timeout")]
            case ClientClosed():
                return self._close(self.end_reason)
            case ShutdownRequested():
                return [SendToClient(self._shutdown_reply()), *self._close("shutdown")]
            case Crashed(detail):
                return self._close("internal_error", detail)
            case DecisionMade(decision, shutting_down, alert):
                return self._decided(decision, shutting_down, alert)
        return self._upstream_answered(event)  # the one event the protocol defines

    def _close(self, reason: str, detail: str = "") -> list[Any]:
        self.finished = True
        self.end_reason = reason
        if self.decided:
            return [Close(None)]
        identity = self.identity if self.identity.user else None
        return [Close(SessionEnd(reason, detail, identity))]

    def _drain(self) -> list[Any]:
        """Parser events until it needs data or waits for an outcome."""
        out: list[Any] = []
        while not self.finished:
            ev = self.conn.next_event()
            if isinstance(ev, Sentinel):  # NEED_DATA, or PAUSED until an outcome
                break
            out += self._client_event(ev)
        return out


__all__ = ["PreauthLayer"]
