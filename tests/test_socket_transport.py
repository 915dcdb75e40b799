"""proxy.net.socket_transport against real TLS peers (Python's ssl module as the other
end, certificates from trustme), on stdlib asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.net.socket_transport import SocketServer, SocketTransport, open_connection

RUN_ON_BOTH_LOOPS = True  # see conftest.py


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca.issue_cert("localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Recorder(asyncio.BufferedProtocol):
    """Collects what it reads; counts callbacks."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.data = bytearray()
        self.buf = bytearray(64 * 1024)
        self.made = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_calls = 0
        self.eof = False
        self.paused = 0
        self.resumed = 0
        self.on_data: Callable[[Recorder], None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.made.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buf[:nbytes]
        if self.on_data is not None:
            self.on_data(self)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_calls += 1
        self.lost.set()

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


@contextlib.contextmanager
def serving(
    tls: ssl.SSLContext | None,
    protocols: list[Recorder],
    *,
    on_data: Callable[[Recorder], None] | None = None,
    handshake_timeout: float = 5.0,
) -> Iterator[SocketServer]:
    """A SocketServer whose connections get a Recorder each (calling ``on_data`` on
    every read); with ``tls``, each connection starts TLS at once (implicit TLS)."""
    loop = asyncio.get_running_loop()

    def accept(sock: socket.socket) -> None:
        proto = Recorder()
        proto.on_data = on_data
        protocols.append(proto)
        transport = SocketTransport(loop, sock, proto, start_reading=tls is None)
        if tls is not None:
            task = loop.create_task(
                transport.start_tls(tls, server_side=True, timeout=handshake_timeout))
            proto.handshake = task  # type: ignore[attr-defined]

    server = SocketServer(loop, accept, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close()


def connect(server: SocketServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=20)


@contextlib.asynccontextmanager
async def silent_tls_client(
    server_ctx: ssl.SSLContext, *, handshake_timeout: float
) -> AsyncIterator[Recorder]:
    """An implicit-TLS server and one client that connects and sends nothing; yields
    the server side's protocol once the connection is accepted."""
    protocols: list[Recorder] = []
    with serving(server_ctx, protocols, handshake_timeout=handshake_timeout) as server:
        s = connect(server)
        try:
            while not protocols:
                await asyncio.sleep(0.01)
            yield protocols[0]
        finally:
            s.close()


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def read_until_eof(sock: socket.socket | ssl.SSLSocket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


async def test_tls_echo_of_large_payloads_is_byte_exact(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """8 MiB each way through a client that reads nothing until it has sent it all: the
    server's writes hit would-block mid-record (OpenSSL's retry path) and flow control,
    and nothing is lost."""
    protocols: list[Recorder] = []
    payload = os.urandom(8 * 1024 * 1024)
    def echo(proto: Recorder) -> None:
        if not proto.paused and not proto.resumed:  # a small kernel buffer: we must queue
            sock = proto.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        proto.transport.write(bytes(proto.data))
        proto.data.clear()

    with serving(server_ctx, protocols, on_data=echo) as server:

        def client() -> tuple[bytes, bytes]:
            raw = socket.socket()
            raw.settimeout(20)
            # Small, so what the kernel can hold (this plus the server's send buffer,
            # at most 4 MiB) is well below the payload: the server must buffer.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            raw.connect(("127.0.0.1", server.port))
            s = client_ctx.wrap_socket(raw, server_hostname="localhost")
            sender = threading.Thread(target=s.sendall, args=(payload,))
            sender.start()
            sender.join()  # reading only now: the echo backs up in the server meanwhile
            got = bytearray()
            while len(got) < len(payload):
                got += s.recv(65536)
            s.close()
            return hashlib.sha256(got).digest(), bytes(got[:16])


        task = asyncio.ensure_future(in_thread(client))
        digest, _ = await asyncio.wait_for(task, 60)
    assert digest == hashlib.sha256(payload).digest()
    proto = protocols[0]
    await asyncio.wait_for(proto.lost.wait(), 5)
    assert proto.paused >= 1 and proto.resumed >= 1  # the slow reader pushed back
    assert proto.lost_calls == 1


async def test_close_flushes_everything_then_sends_close_notify(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    protocols: list[Recorder] = []
    payload = os.urandom(4 * 1024 * 1024)
    def respond(proto: Recorder) -> None:
        proto.transport.write(payload)
        proto.transport.close()

    with serving(server_ctx, protocols, on_data=respond) as server:

        def client() -> tuple[bytes, bool]:
            s = client_ctx.wrap_socket(connect(server), server_hostname="localhost")
            s.sendall(b"go")
            time.sleep(0.3)  # not reading yet: the 4 MiB write must be buffered, in parts
            got = bytearray()
            clean = False
            while True:
                chunk = s.recv(65536)
                if not chunk:  # a clean EOF: the server's close_notify arrived
                    clean = True
                    break
                got += chunk
            s.close()
            return bytes(got), clean


        task = asyncio.ensure_future(in_thread(client))
        got, clean = await asyncio.wait_for(task, 30)
    assert got == payload and clean
    await asyncio.wait_for(protocols[0].lost.wait(), 5)


async def test_last_response_survives_a_flood_of_unread_input(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """The server answers the first line and closes while the client is still sending:
    without the lingering close the kernel would reset the connection and the client
    could lose the answer."""
    protocols: list[Recorder] = []
    def refuse(proto: Recorder) -> None:
        proto.on_data = None
        proto.transport.write(b"* BYE too much\r\n")
        proto.transport.close()

    with serving(server_ctx, protocols, on_data=refuse) as server:

        def client() -> bytes:
            s = client_ctx.wrap_socket(connect(server), server_hostname="localhost")
            with contextlib.suppress(OSError):
                s.sendall(b"x" * 2_000_000)
            return read_until_eof(s)


        task = asyncio.ensure_future(in_thread(client))
        got = await asyncio.wait_for(task, 30)
    assert got == b"* BYE too much\r\n"


async def test_handshake_garbage_fails_start_tls_and_loses_connection_once(
    server_ctx: ssl.SSLContext,
) -> None:
    protocols: list[Recorder] = []
    with serving(server_ctx, protocols) as server:

        def client() -> bytes:
            s = connect(server)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
            return read_until_eof(s)

        await asyncio.wait_for(in_thread(client), 10)
        proto = protocols[0]
        with pytest.raises(ssl.SSLError):
            await proto.handshake  # type: ignore[attr-defined]
        await asyncio.wait_for(proto.lost.wait(), 5)
        await asyncio.sleep(0.05)
    assert proto.lost_calls == 1 and proto.transport.is_closing()


async def test_silent_client_times_the_handshake_out(server_ctx: ssl.SSLContext) -> None:
    async with silent_tls_client(server_ctx, handshake_timeout=0.3) as proto:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proto.handshake, 5)  # type: ignore[attr-defined]
        await asyncio.wait_for(proto.lost.wait(), 5)


async def test_starttls_upgrade_sends_the_ok_in_plaintext_first(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    protocols: list[Recorder] = []
    async def upgrade(proto: Recorder) -> None:
        proto.transport.write(b"a OK begin\r\n")
        await proto.transport.start_tls(server_ctx, server_side=True, timeout=5)
        assert proto.transport.get_extra_info("ssl_object").version() in ("TLSv1.3",
                                                                         "TLSv1.2")

    def on_data(proto: Recorder) -> None:
        if proto.data == b"a STARTTLS\r\n":
            proto.data.clear()
            proto.upgrade = asyncio.ensure_future(upgrade(proto))  # type: ignore[attr-defined]
        elif proto.data.endswith(b"\n"):
            proto.transport.write(b"got " + bytes(proto.data))
            proto.transport.close()

    with serving(None, protocols, on_data=on_data) as server:

        def client() -> bytes:
            s = connect(server)
            s.sendall(b"a STARTTLS\r\n")
            f = s.makefile("rb")
            ok = f.readline()
            assert ok == b"a OK begin\r\n", ok
            t = client_ctx.wrap_socket(s, server_hostname="localhost")
            t.sendall(b"secret\r\n")
            return read_until_eof(t)


        task = asyncio.ensure_future(in_thread(client))
        got = await asyncio.wait_for(task, 10)
        await protocols[0].upgrade  # type: ignore[attr-defined]
    assert got == b"got secret\r\n"


async def test_open_connection_verifies_the_server_and_refuses_a_wrong_name(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    protocols: list[Recorder] = []
    with serving(server_ctx, protocols) as server:
        good = Recorder()
        transport = await open_connection("localhost", server.port, good, tls=client_ctx,
                                          timeout=5)
        assert transport.get_extra_info("ssl_object").getpeercert()["subjectAltName"]
        transport.write(b"hello")
        while not protocols or protocols[0].data != b"hello":
            await asyncio.sleep(0.01)
        transport.close()
        await asyncio.wait_for(good.lost.wait(), 5)

        wrong = ssl.create_default_context()
        wrong.load_verify_locations(cadata=client_ctx.get_ca_certs(binary_form=True)[0])
        with pytest.raises(ssl.SSLCertVerificationError):
            # the certificate names localhost, not 127.0.0.1
            await open_connection("127.0.0.1", server.port, Recorder(), tls=client_ctx,
                                  timeout=5)


async def test_open_connection_to_a_closed_port_raises() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionRefusedError):
        await open_connection("127.0.0.1", port, Recorder(), timeout=5)


async def test_plain_protocol_gets_data_received_and_eof() -> None:
    got: list[bytes] = []
    lost = asyncio.Event()

    class Plain(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            got.append(data)

        def eof_received(self) -> bool:
            got.append(b"<eof>")
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            lost.set()

    loop = asyncio.get_running_loop()
    server = SocketServer(loop, lambda sock: SocketTransport(loop, sock, Plain()), "127.0.0.1", 0)
    try:
        def client() -> None:
            with connect(server) as s:
                s.sendall(b"one two")
                s.shutdown(socket.SHUT_WR)
                read_until_eof(s)

        await asyncio.wait_for(in_thread(client), 10)
        await asyncio.wait_for(lost.wait(), 5)
    finally:
        server.close()
    assert b"".join(got) == b"one two<eof>"


async def test_server_close_stops_accepting() -> None:
    loop = asyncio.get_running_loop()
    accepted: list[socket.socket] = []
    server = SocketServer(loop, accepted.append, "127.0.0.1", 0)
    port = server.port
    with socket.create_connection(("127.0.0.1", port)):
        while not accepted:
            await asyncio.sleep(0.01)
    server.close()
    for s in accepted:
        s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


async def test_close_during_the_handshake_ends_it_at_once(server_ctx: ssl.SSLContext) -> None:
    async with silent_tls_client(server_ctx, handshake_timeout=30) as proto:
        await asyncio.sleep(0.05)  # the handshake is waiting for a ClientHello
        with pytest.raises(RuntimeError):
            proto.transport.write(b"not in the middle of an upgrade")
        proto.transport.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(proto.handshake, 2)  # type: ignore[attr-defined]
        await asyncio.wait_for(proto.lost.wait(), 2)


async def test_accept_backs_off_when_out_of_file_descriptors() -> None:
    """EMFILE from accept() closes the connections waiting in the queue (with the
    reserve descriptor: their clients see a reset, never a silent connection) and
    pauses accepting for a moment instead of spinning, then accepting resumes."""
    loop = asyncio.get_running_loop()
    accepted: list[socket.socket] = []
    server = SocketServer(loop, accepted.append, "127.0.0.1", 0)
    listener = server.sockets[0]
    calls = 0

    class Exhausted:
        def fileno(self) -> int:
            return listener.fileno()

        def accept(self) -> tuple[socket.socket, Any]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OSError(errno.EMFILE, "Too many open files")
            return listener.accept()

    try:
        with socket.create_connection(("127.0.0.1", server.port)) as waiting:
            server._accept(Exhausted())  # type: ignore[arg-type]
            assert calls >= 2  # the failure, then the shedding accepts
            waiting.settimeout(2)
            with pytest.raises(ConnectionResetError):
                assert waiting.recv(1) == b""  # closed by us, not left hanging
            await asyncio.sleep(0.02)
            assert not accepted  # shed, not served
            with socket.create_connection(("127.0.0.1", server.port)):
                await asyncio.sleep(0.3)  # past ACCEPT_RETRY_S: accepting again
                assert len(accepted) == 1
    finally:
        server.close()
        for s in accepted:
            s.close()


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.integers(1, 70_000), min_size=1, max_size=12),
       pauses=st.lists(st.sampled_from([0.0, 0.0, 0.002, 0.01]), min_size=1, max_size=12))
async def test_echo_is_exact_for_any_write_sizes_and_pacing(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, pieces: list[int],
    pauses: list[float],
) -> None:
    """Whatever sizes the client writes in and however it paces them, over TLS the
    server receives every byte in order, and what it echoes comes back exact."""
    protocols: list[Recorder] = []
    payload = os.urandom(sum(pieces))

    def echo(proto: Recorder) -> None:
        proto.transport.write(bytes(proto.data))
        proto.data.clear()

    with serving(server_ctx, protocols, on_data=echo) as server:

        def client() -> bytes:
            s = client_ctx.wrap_socket(connect(server), server_hostname="localhost")
            got = bytearray()
            offset = 0
            for i, size in enumerate(pieces):
                s.sendall(payload[offset:offset + size])
                offset += size
                time.sleep(pauses[i % len(pauses)])
            while len(got) < len(payload):
                got += s.recv(65536)
            s.close()
            return bytes(got)

        got = await asyncio.wait_for(in_thread(client), 30)
    assert got == payload
