"""Bookkeeping the line-based sans-IO pre-auth parsers of IMAP and POP3 share (no I/O).

:class:`ClientWire` is the part of ``imap_wire.Connection`` and ``pop3_wire.Connection``
that names no protocol: the buffer of client bytes (with the offset of what is not
parsed yet), the rule that input is dropped once nothing more will be parsed or while
the TLS handshake runs (STARTTLS command injection), the state change through the
protocol's transition table, and the hand-over of what the client pipelined after a
successful login. The protocol keeps its states, its table, its events and its parser.

:class:`UpstreamConversation` is the same for the client side of the login to the
upstream server (``imap_upstream.UpstreamLogin``, ``pop3_upstream.UpstreamLogin``): the
guard at the top of ``handle`` (nothing after the end; TLS only when asked for; bytes
that arrive during the handshake are not protected by it and are dropped) and the
buffer the server's bytes go to.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from typing import Generic, TypedDict, TypeVar, Unpack

from proxy.frontends.events import UpstreamEvent, UpstreamTlsEstablished

#: Command lines before login (every line counts, junk too); the listener's
#: ``max_preauth_commands`` overrides it.
MAX_PREAUTH_COMMANDS = 50

S = TypeVar("S", bound=enum.Enum)  # a protocol's states (or phases)
C = TypeVar("C")  # a protocol's upstream commands


class WireOptions(TypedDict, total=False):
    """How a listener sets up a connection's parser (the defaults are ``ClientWire``'s)."""

    max_commands: int  # command lines before login
    tls: bool  # implicit TLS: the connection starts encrypted
    starttls: bool  # STARTTLS (POP3: STLS) is offered
    cleartext_login: bool  # config allows a password before TLS (loopback)


class ClientWire(Generic[S]):
    """The client bytes and the state of one pre-auth connection (see the module
    docstring). ``transitions`` maps (state, trigger) to the next state; a trigger the
    table does not allow raises ``local_error`` (the caller's bug, not the client's)."""

    def __init__(self, state: S, transitions: Mapping[tuple[S, str], S], *,
                 discard_in: Collection[S], local_error: type[Exception],
                 **options: Unpack[WireOptions]) -> None:
        self.state = state
        self._transitions = transitions
        self._discard_in = discard_in  # states in which client bytes are dropped
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

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client."""
        if self.state in self._discard_in:
            return  # done, or pipelined after STARTTLS; dropping keeps memory bounded
        self._buf += data

    @property
    def starttls_pending(self) -> bool:
        """STARTTLS was answered and its handshake runs (:meth:`starttls_done` next)."""
        return (self.state, "starttls_done") in self._transitions

    def starttls_done(self) -> None:
        """TLS is up: drop everything the client pipelined after STARTTLS (STLS)."""
        self._transition("starttls_done")
        self.tls = True
        self._drop_input()

    def login_accepted(self) -> bytes:
        """Hand over to the upstream; returns bytes the client pipelined after login."""
        self._transition("login_accepted")
        rest = bytes(self._buf[self._pos :])
        self._drop_input()
        return rest

    def _transition(self, trigger: str) -> None:
        try:
            self.state = self._transitions[(self.state, trigger)]
        except KeyError:
            raise self._local_error(
                f"{trigger} not allowed in state {self.state.value}") from None

    def _break(self) -> None:
        """A limit was broken: the connection is dead and holds no more input."""
        self.state = self._transitions[(self.state, "LimitExceeded")]
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


__all__ = ["MAX_PREAUTH_COMMANDS", "ClientWire", "UpstreamConversation", "WireOptions"]
