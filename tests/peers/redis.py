"""A throw-away ``redis-server`` for tests and benchmarks.

``RedisServer(workdir)`` writes a config under ``workdir`` (loopback only, a free port,
AOF on, no RDB snapshots, a password when given) and runs ``redis-server <conf>`` in
the foreground. :meth:`stop` and :meth:`start` can be called again on the same object
(same port, same data directory): a test stops Redis mid-test to see the degraded
behaviour and starts it again to see the recovery (the AOF brings the data back, as a
production Redis that persists must).

When ``redis-server`` is not installed, :func:`require_redis` skips the test, or
fails it under CI (``CI=true``), where ``make test`` installs the Debian package.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from peers import peer_missing

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT_S = 10.0


def require_redis() -> None:
    if not (os.path.exists(REDIS) and os.access(REDIS, os.X_OK)):
        peer_missing("redis-server is not installed (Debian package redis-server; `make peers`)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` on 127.0.0.1:``port`` with its data in ``workdir``."""

    def __init__(self, workdir: Path, *, password: str = "", port: int = 0) -> None:
        require_redis()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.workdir / "redis.conf"
        lines = [
            "bind 127.0.0.1", f"port {self.port}", "protected-mode yes",
            f"dir {self.workdir}", "appendonly yes", "appendfsync everysec", 'save ""',
            "daemonize no", f"logfile {self.workdir / 'redis.log'}",
        ]
        if password:
            lines.append(f"requirepass {password}")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen([REDIS, str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log")
                raise RuntimeError("redis-server exited: "
                                   + (log.read_text()[-2000:] if log.exists() else ""))
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                auth = f"AUTH {self.password}\r\n" if self.password else ""
                s.sendall(f"{auth}PING\r\n".encode())
                data = b""
                while b"PONG" not in data and b"-" not in data[:1]:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    data += chunk
                return b"PONG" in data
        except OSError:
            return False

    def stop(self) -> None:
        """Shut down (SIGTERM: Redis flushes the AOF first) and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
