"""Bookkeeping the line-based sans-IO pre-auth parsers of IMAP and POP3 share (no I/O).

:class:`ClientWire` is the part of ``imap_wire.Connection`` and ``pop3_wire.Connection``
that names no protocol: the buffer of client bytes (with the offset of what is not
parsed yet), the rule that input is dropped once nothing more will be parsed or while
the TLS handshake runs (STARTTLS command injection), the state machine, and the
hand-over of what the client pipelined after a successful login. The protocol keeps its
events and its parser.

IMAP and POP3 before login are the same machine under each RFC's names, so there is one
:class:`State` and one :data:`TRANSITIONS` table, with protocol-neutral names; the
comment on each state gives the RFC names. Everything that affects the state machine
lives in this module: that table, the states in which input is dropped or parsing
pauses, and the methods of :class:`ClientWire` that use them.

:class:`UpstreamConversation` is the same for the client side of the login to the
upstream server (``imap_upstream.UpstreamLogin``, ``pop3_upstream.UpstreamLogin``): the
guard at the top of ``handle`` (nothing after the end; TLS only when asked for; bytes
that arrive during the handshake are not protected by it and are dropped) and the
buffer the server's bytes go to.
"""

from __future__ import annotations

import enum
from typing import Final, Generic, TypedDict, TypeVar, Unpack

from proxy.frontends.events import UpstreamEvent, UpstreamTlsEstablished

#: Command lines before login (every line counts, junk too); the listener's
#: ``max_preauth_commands`` overrides it.
MAX_PREAUTH_COMMANDS = 50

S = TypeVar("S", bound=enum.Enum)  # a protocol's upstream login phases
C = TypeVar("C")  # a protocol's upstream commands


class State(enum.Enum):
    """Where a client connection is before login (IMAP: RFC 3501 section 3; POP3:
    RFC 1939 sections 3 to 6)."""

    #: Reading commands. IMAP: "not authenticated"; POP3: AUTHORIZATION.
    COMMANDS = "commands"
    #: Reading one SASL response line (IMAP AUTHENTICATE, POP3 AUTH).
    AUTHENTICATING = "authenticating"
    #: STARTTLS (POP3: STLS) was answered and its handshake runs; buffered bytes are
    #: discarded.
    TLS_HANDSHAKE = "tls_handshake"
    #: The credentials were handed out; waiting for the login result.
    AWAITING_LOGIN = "awaiting_login"
    #: Handed over to the upstream; the parser is done. IMAP: "authenticated"; POP3:
    #: TRANSACTION.
    HANDED_OVER = "handed_over"
    #: The client said goodbye (IMAP LOGOUT, POP3 QUIT).
    CLOSED = "closed"
    #: A limit was broken; the connection is unusable.
    ERROR = "error"


#: (state, trigger) -> next state. The parser's triggers name what the client did; the
#: executor's are the names of the :class:`ClientWire` methods it calls. POP3 never
#: takes the two edges marked IMAP: its parser itself refuses AUTH before TLS and
#: mechanisms other than PLAIN, and PLAIN needs no further challenge.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.COMMANDS, "starttls"): State.TLS_HANDSHAKE,
    (State.COMMANDS, "login"): State.AWAITING_LOGIN,  # IMAP LOGIN, POP3 PASS
    (State.COMMANDS, "sasl_start+ir"): State.AWAITING_LOGIN,  # with an initial response
    (State.COMMANDS, "sasl_start"): State.AUTHENTICATING,
    (State.COMMANDS, "goodbye"): State.CLOSED,
    (State.COMMANDS, "limit"): State.ERROR,
    (State.AUTHENTICATING, "sasl_response"): State.AWAITING_LOGIN,
    (State.AUTHENTICATING, "sasl_cancelled"): State.COMMANDS,
    (State.AUTHENTICATING, "bad_command"): State.COMMANDS,  # a response not in base64
    (State.AUTHENTICATING, "limit"): State.ERROR,
    (State.AUTHENTICATING, "login_refused"): State.COMMANDS,  # IMAP: e.g. before TLS
    (State.TLS_HANDSHAKE, "starttls_done"): State.COMMANDS,
    (State.AWAITING_LOGIN, "sasl_continue"): State.AUTHENTICATING,  # IMAP: e.g. LOGIN's Password:
    (State.AWAITING_LOGIN, "login_refused"): State.COMMANDS,
    (State.AWAITING_LOGIN, "login_accepted"): State.HANDED_OVER,
}


class WireOptions(TypedDict, total=False):
    """How a listener sets up a connection's parser (the defaults are ``ClientWire``'s)."""

    max_commands: int  # command lines before login
    tls: bool  # implicit TLS: the connection starts encrypted
    starttls: bool  # STARTTLS (POP3: STLS) is offered
    cleartext_login: bool  # config allows a password before TLS (loopback)


#: States in which client bytes are dropped: nothing more will be parsed, or they were
#: pipelined after STARTTLS (dropping them also keeps memory bounded).
DISCARD_INPUT_IN: Final = frozenset(
    {State.TLS_HANDSHAKE, State.HANDED_OVER, State.CLOSED, State.ERROR})
#: States in which the parser gives no events (an outcome is awaited, or it is over).
PAUSED_IN: Final = frozenset(
    {State.TLS_HANDSHAKE, State.AWAITING_LOGIN, State.HANDED_OVER, State.CLOSED})


class ClientWire:
    """The client bytes and the state of one pre-auth connection (see the module
    docstring). A trigger :data:`TRANSITIONS` does not allow in the current state
    raises ``local_error`` (the caller's bug, not the client's)."""

    def __init__(self, *, local_error: type[Exception],
                 **options: Unpack[WireOptions]) -> None:
        self.state = State.COMMANDS
        self._local_error = local_error
        self.tls = options.get("tls", False)
        self.starttls_available = options.get("starttls", True)
        self.cleartext_login = options.get("cleartext_login", False)
        self.max_commands = options.get("max_commands", MAX_PREAUTH_COMMANDS)
        self.commands = 0
        self._buf = bytearray()
        self._pos = 0  # start of unparsed data in _buf

    @property
    def buffered(self) -> int:
        """Unparsed bytes held (the executor pauses reading when this grows)."""
        return len(self._buf) - self._pos

    @property
    def paused(self) -> bool:
        """``next_event`` gives ``PAUSED``: an outcome is awaited, or parsing is over."""
        return self.state in PAUSED_IN

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client."""
        if self.state in DISCARD_INPUT_IN:
            return
        self._buf += data

    @property
    def starttls_pending(self) -> bool:
        """STARTTLS was answered and its handshake runs (:meth:`starttls_done` next)."""
        return self.state is State.TLS_HANDSHAKE

    def starttls_done(self) -> None:
        """TLS is up: drop everything the client pipelined after STARTTLS (STLS)."""
        self._transition("starttls_done")
        self.tls = True
        self._drop_input()

    def login_refused(self) -> None:
        """The login failed or was refused; the client may try again."""
        self._transition("login_refused")

    def login_accepted(self) -> bytes:
        """Hand over to the upstream; returns bytes the client pipelined after login."""
        self._transition("login_accepted")
        rest = bytes(self._buf[self._pos :])
        self._drop_input()
        return rest

    def _transition(self, trigger: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise self._local_error(
                f"{trigger} not allowed in state {self.state.value}") from None

    def _break(self) -> None:
        """A limit was broken: the connection is dead and holds no more input."""
        self.state = TRANSITIONS[(self.state, "limit")]
        self._drop_input()

    def _drop_input(self) -> None:
        self._buf.clear()
        self._pos = 0

    def _compact(self) -> None:
        """Keep only the unparsed bytes (call when the parser needs more data)."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0


class UpstreamConversation(Generic[S, C]):
    """The guard every upstream login runs before its own reading (see the module
    docstring). ``phase`` is what the login waits for; ``handshake`` and ``done`` are
    the protocol's phases for "the TLS handshake runs" and "the login was answered". A
    protocol supplies :meth:`_tls_established`, :meth:`_next_response` and
    :meth:`_respond`."""

    def __init__(self, phase: S, *, handshake: S, done: S, starttls_verb: str,
                 local_error: type[Exception]) -> None:
        self.phase = phase
        self._handshake, self._done = handshake, done
        self._starttls_verb = starttls_verb  # for the error text
        self._local_error = local_error
        self._buf = bytearray()  # server bytes not yet read

    @property
    def finished(self) -> bool:
        """The login was answered (or a probe is over)."""
        return self.phase is self._done

    def handle(self, event: UpstreamEvent) -> list[C]:
        """Feed one event; returns what to do. Raises ``RemoteProtocolError`` when the
        server misbehaves, ``LocalProtocolError`` when fed after the end."""
        if self.finished:
            raise self._local_error(f"{type(event).__name__} after the login was answered")
        if isinstance(event, UpstreamTlsEstablished):
            if self.phase is not self._handshake:
                raise self._local_error(f"TLS established without {self._starttls_verb}")
            return self._tls_established()
        if self.phase is self._handshake:
            return []  # not protected by TLS: discarded
        self._buf += event.data
        out: list[C] = []
        while self.phase not in (self._handshake, self._done):
            line = self._next_response()
            if line is None:
                break
            out += self._respond(line)
        return out

    # ------------------------------------------------------------ protocol's part

    def _tls_established(self) -> list[C]:
        """The handshake asked for by ``StartUpstreamTls`` succeeded."""
        raise NotImplementedError

    def _next_response(self) -> bytes | None:
        """Take one complete response from ``_buf``; None until there is one."""
        raise NotImplementedError

    def _respond(self, line: bytes) -> list[C]:
        raise NotImplementedError


__all__ = ["DISCARD_INPUT_IN", "MAX_PREAUTH_COMMANDS", "PAUSED_IN", "TRANSITIONS", "ClientWire",
           "State", "UpstreamConversation", "WireOptions"]
