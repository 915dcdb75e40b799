"""Events, commands and sentinels that the sans-IO front ends share (no I/O here).

Three kinds, each protocol-neutral; what names a protocol stays in its own module:

- The sentinels of the wire parsers (``imap_wire``, ``pop3_wire``, ``smtp_wire``):
  ``next_event`` returns :data:`NEED_DATA` or :data:`PAUSED` when it has no event.
- The pre-auth session of IMAP and POP3 (``imap_preauth``, ``pop3_preauth``, performed
  by ``preauth_exec``): events in, past tense (:class:`Connected`,
  :class:`DataReceived`, :class:`TlsEstablished`, :class:`DecisionMade`, ...), and
  commands out, imperative (:class:`SendToClient`, :class:`StartTls`,
  :class:`RequestDecision`, :class:`Splice`, :class:`Close`, ...). The login's own
  (``OpenUpstream``, ``UpstreamAnswered``) are each protocol's.
- The client side of the login to the upstream server (``imap_upstream``,
  ``pop3_upstream``, driven by ``preauth_exec.converse_upstream``): the events
  :class:`UpstreamDataReceived` and :class:`UpstreamTlsEstablished`, the commands
  :class:`SendToUpstream`, :class:`StartUpstreamTls` and :class:`ReportCapabilities`
  (the answer, ``LoginAnswered``, is each protocol's).

Events and commands are small frozen dataclasses; credentials stay out of their
``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.gate import Identity
from proxy.ids import ClientCert
from proxy.policy import Decision

# --------------------------------------------------------------------------- sentinels


class Sentinel:
    """The type of NEED_DATA and PAUSED (not events)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_event`` needs more bytes from the client.
NEED_DATA = Sentinel("NEED_DATA")
#: ``next_event`` gives nothing until the executor reports an outcome (STARTTLS
#: handshake, login result, an answer to the last event), or because the conversation
#: is over.
PAUSED = Sentinel("PAUSED")

# ------------------------------------------------------------- pre-auth session events


@dataclass(frozen=True, slots=True)
class Connected:
    """The client connected (implicit TLS: nothing has been read yet)."""


@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes = field(repr=False)  # may carry a password


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    device_id: str | None  # from a verified client certificate's SAN
    cert: ClientCert | None = None  # that certificate's identity facts, for the gate


@dataclass(frozen=True, slots=True)
class TlsFailed:
    detail: str


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The upstream is unreachable, timed out or answered nonsense."""

    detail: str


@dataclass(frozen=True, slots=True)
class DecisionMade:
    decision: Decision
    shutting_down: bool = False  # the listener is closing: start no session
    alert: str = ""  # a warning to show before the login's OK (IMAP ``* OK [ALERT]``)


@dataclass(frozen=True, slots=True)
class TimedOut:
    total: bool  # the total pre-auth limit (else the idle one)


@dataclass(frozen=True, slots=True)
class ClientClosed:
    pass


@dataclass(frozen=True, slots=True)
class ShutdownRequested:
    pass


@dataclass(frozen=True, slots=True)
class Crashed:
    """The executor hit a bug; the connection has been aborted."""

    detail: str


# ----------------------------------------------------------- pre-auth session commands


@dataclass(frozen=True, slots=True)
class SendToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Handshake with the client; then feed TlsEstablished or TlsFailed."""


@dataclass(frozen=True, slots=True)
class RequestDecision:
    """Ask the gate (it writes the decision record); then feed DecisionMade."""

    identity: Identity


@dataclass(frozen=True, slots=True)
class RecordAuthFailed:
    identity: Identity


@dataclass(frozen=True, slots=True)
class RecordUnavailable:
    """The login attempt's one decision record: a temporary deny."""

    identity: Identity
    detail: str


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Log out of the upstream connection and close it."""


@dataclass(frozen=True, slots=True)
class Splice:
    """Send ``answer`` (the upstream's OK) and join client and upstream, if both are
    still there (else close: no false success); ``pipelined`` is what the client sent
    after the login, for the upstream."""

    answer: bytes
    pipelined: bytes = field(repr=False)
    identity: Identity


@dataclass(frozen=True, slots=True)
class SessionEnd:
    reason: str
    detail: str = ""
    identity: Identity | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client (after what was sent), drop the upstream, and write
    ``record`` as a ``session_end`` (None: a decision record exists)."""

    record: SessionEnd | None


#: The events every pre-auth layer takes (a protocol adds its ``UpstreamAnswered``).
SessionEvent = (Connected | DataReceived | TlsEstablished | TlsFailed | UpstreamFailed
                | DecisionMade | TimedOut | ClientClosed | ShutdownRequested | Crashed)
#: The commands every pre-auth layer gives (a protocol adds its ``OpenUpstream``).
SessionCommand = (SendToClient | StartTls | RequestDecision | RecordAuthFailed
                  | RecordUnavailable | CloseUpstream | Splice | Close)

# ------------------------------------------------------------ the login to the upstream


@dataclass(frozen=True, slots=True)
class UpstreamDataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class UpstreamTlsEstablished:
    """The handshake asked for by :class:`StartUpstreamTls` succeeded."""


@dataclass(frozen=True, slots=True)
class SendToUpstream:
    data: bytes = field(repr=False)  # may carry the password


@dataclass(frozen=True, slots=True)
class StartUpstreamTls:
    """Upgrade the upstream connection to TLS, then feed :class:`UpstreamTlsEstablished`."""


@dataclass(frozen=True, slots=True)
class ReportCapabilities:
    """The server's capabilities before login (the listener shows some of them)."""

    capabilities: tuple[str, ...]


UpstreamEvent = UpstreamDataReceived | UpstreamTlsEstablished
