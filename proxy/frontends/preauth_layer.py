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

from proxy.frontends import events as ev
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


    def _upstream_answered(self, event: Any) -> list[Any]:
        """The protocol's ``UpstreamAnswered``: the upstream's answer to the login
        (most protocols hand it to :meth:`_login_answered`)."""
        raise NotImplementedError

    def _decided(self, decision: Decision, shutting_down: bool,
                 alert: str = "") -> list[Any]:
        raise NotImplementedError

    def _client_event(self, event: Any) -> list[Any]:
        """One parsed client command -> commands."""
        raise NotImplementedError

    # ------------------------------------------------------------------ events

    def handle(self, event: Any) -> list[Any]:
        """Feed one event; returns the commands to perform, in order."""
        if self.finished:
            return []
        match event:
            case ev.DataReceived(data):
                self.conn.receive_data(data)
                return self._drain()
            case ev.Connected():
                if self.tls_mode == "implicit":
                    return [ev.StartTls()]
                return [ev.SendToClient(self._greeting())]
            case ev.TlsEstablished(device_id, cert):
                self.device_id, self.cert = device_id, cert
                return self._tls_established()
            case ev.TlsFailed(detail):
                return self._close("tls_failed", detail)
            case ev.UpstreamFailed(detail):
                self.decided = True  # RecordUnavailable is this attempt's decision record
                return [ev.SendToClient(self._unavailable_reply()),
                        ev.RecordUnavailable(self.identity, detail), *self._close("upstream")]
            case ev.TimedOut(total):
                return [ev.SendToClient(self._timeout_reply()),
                        *self._close("preauth_timeout" if total else "idle_timeout")]
            case ev.ClientClosed():
                return self._close(self.end_reason)
            case ev.ShutdownRequested():
                return [ev.SendToClient(self._shutdown_reply()), *self._close("shutdown")]
            case ev.Crashed(detail):
                return self._close("internal_error", detail)
            case ev.DecisionMade(decision, shutting_down, alert):
                return self._decided(decision, shutting_down, alert)
        return self._upstream_answered(event)  # the one event the protocol defines

    def _tls_established(self) -> list[Any]:
        """TLS is up (``device_id`` and ``cert`` are set). After STARTTLS the parser
        drops what was pipelined before the handshake; with implicit TLS, greet now."""
        if self.conn.starttls_pending:
            self.conn.starttls_done()
            return self._drain()
        self.conn.tls = True
        return [ev.SendToClient(self._greeting()), *self._drain()]

    def _login_answered(self, ok: bool, answer: bytes) -> list[Any]:
        """The upstream's answer to the login: an OK is kept for the client while the
        gate decides; a refusal (e.g. bad credentials) goes to the client as it is, is
        recorded as ``auth_failed``, and the client may try again."""
        if ok:
            self._answer = answer
            return [ev.RequestDecision(self.identity)]
        self.decided = True
        self.conn.login_refused()
        return [ev.SendToClient(answer), ev.CloseUpstream(), ev.RecordAuthFailed(self.identity),
                *self._drain()]

    def _close(self, reason: str, detail: str = "") -> list[Any]:
        self.finished = True
        self.end_reason = reason
        if self.decided:
            return [ev.Close(None)]
        identity = self.identity if self.identity.user else None
        return [ev.Close(ev.SessionEnd(reason, detail, identity))]

    def _drain(self) -> list[Any]:
        """Parser events until it needs data or waits for an outcome."""
        out: list[Any] = []
        while not self.finished:
            parsed = self.conn.next_event()
            if isinstance(parsed, ev.Sentinel):  # NEED_DATA, or PAUSED until an outcome
                break
            out += self._client_event(parsed)
        return out


__all__ = ["PreauthLayer"]
