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
``repr``. Those that carry nothing but their kind subclass :class:`Marker`, and those
that share fields share a base (:class:`Failure`, :class:`ForIdentity`,
:class:`Credentials`, ...); a subclass
that adds no field needs no decorator of its own.
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

# --------------------------------------------------------------------------- bases


@dataclass(frozen=True, slots=True)
class Marker:
    """An event or command that is only its kind (no fields). Subclasses inherit the
    frozen dataclass methods; equality, like the ``repr``, goes by class."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Something failed; ``detail`` says what (for the logs, never for the client)."""

    detail: str


@dataclass(frozen=True, slots=True)
class ForIdentity:
    """A command about the login attempt of ``identity``."""

    identity: Identity


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes from or for a peer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SecretData:
    """Bytes from or for a peer that may carry a password: kept out of the ``repr``."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and a password; the password is never in logs or tracebacks."""

    user: str
    password: str = field(repr=False)


# ------------------------------------------------------------- pre-auth session events


class Connected(Marker):
    """The client connected (implicit TLS: nothing has been read yet)."""


class DataReceived(SecretData):
    """Bytes from the client."""


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    device_id: str | None  # from a verified client certificate's SAN
    cert: ClientCert | None = None  # that certificate's identity facts, for the gate


class TlsFailed(Failure):
    """The TLS handshake with the client failed."""


class UpstreamFailed(Failure):
    """The upstream is unreachable, timed out or answered nonsense."""


@dataclass(frozen=True, slots=True)
class DecisionMade:
    decision: Decision
    shutting_down: bool = False  # the listener is closing: start no session
    alert: str = ""  # a warning to show before the login's OK (IMAP ``* OK [ALERT]``)


@dataclass(frozen=True, slots=True)
class TimedOut:
    total: bool  # the total pre-auth limit (else the idle one)


class ClientClosed(Marker):
    """The client closed its connection."""


class ShutdownRequested(Marker):
    """The listener is shutting down."""


class Crashed(Failure):
    """The executor hit a bug; the connection has been aborted."""


# ----------------------------------------------------------- pre-auth session commands


class SendToClient(Data):
    """Write to the client."""


class StartTls(Marker):
    """Handshake with the client; then feed TlsEstablished or TlsFailed."""


class RequestDecision(ForIdentity):
    """Ask the gate (it writes the decision record); then feed DecisionMade."""


class RecordAuthFailed(ForIdentity):
    """The upstream refused the credentials: an ``auth_failed`` record."""


@dataclass(frozen=True, slots=True)
class RecordUnavailable(ForIdentity):
    """The login attempt's one decision record: a temporary deny."""

    detail: str


class CloseUpstream(Marker):
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


class UpstreamDataReceived(Data):
    """Bytes from the upstream server."""


class UpstreamTlsEstablished(Marker):
    """The handshake asked for by :class:`StartUpstreamTls` succeeded."""


class SendToUpstream(SecretData):
    """Write to the upstream server."""


class StartUpstreamTls(Marker):
    """Upgrade the upstream connection to TLS, then feed :class:`UpstreamTlsEstablished`."""


@dataclass(frozen=True, slots=True)
class ReportCapabilities:
    """The server's capabilities before login (the listener shows some of them)."""

    capabilities: tuple[str, ...]


UpstreamEvent = UpstreamDataReceived | UpstreamTlsEstablished
