"""A throw-away ``redis-server`` (and Sentinel) for tests and benchmarks.

``RedisServer(workdir)`` writes a config under ``workdir`` (loopback only, a free port,
AOF on, no RDB snapshots, a password when given; TLS only with ``tls=``; a replica
with ``replica_of=``, over TLS to a TLS master) and runs ``redis-server <conf>`` in
the foreground. ``RedisSentinel(workdir, master)`` is one Sentinel (``redis-server
<conf> --sentinel``, what the Debian package ``redis-sentinel`` runs) watching
``master`` as ``mymaster`` with quorum 1 and a one-second down-after, over TLS when
the master is. :meth:`stop` and :meth:`start` can be called again on the same object
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS-only Redis: its certificate chain and key, and the CA."""

    cert: Path
    key: Path
    ca: Path


def _tls_lines(port: int, tls: TlsFiles) -> list[str]:
    """TLS only: no plain port; clients need no certificate; a replica (or a Sentinel)
    reaches its master over TLS too."""
    return ["port 0", f"tls-port {port}", f"tls-cert-file {tls.cert}",
            f"tls-key-file {tls.key}", f"tls-ca-cert-file {tls.ca}",
            "tls-auth-clients no", "tls-replication yes"]


class RedisServer:
    """One ``redis-server`` on 127.0.0.1:``port`` with its data in ``workdir``."""

    def __init__(self, workdir: Path, *, password: str = "", port: int = 0,
                 tls: TlsFiles | None = None, replica_of: int = 0) -> None:
        require_redis()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.workdir / "redis.conf"
        lines = [*self._common(), "protected-mode yes", "appendonly yes",
                 "appendfsync everysec", 'save ""']
        if password:
            lines += [f"requirepass {password}", f"masterauth {password}"]
        if replica_of:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        if tls is not None:
            lines += _tls_lines(self.port, tls)
        self.conf.write_text("\n".join(lines) + "\n")

    def _common(self) -> list[str]:
        return ["bind 127.0.0.1", f"port {self.port}", f"dir {self.workdir}",
                "daemonize no", f"logfile {self.workdir / 'redis.log'}"]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [REDIS, str(self.conf)]

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
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

    def client(self) -> Any:
        """A synchronous redis-py client straight to this server (not through
        mailward's store), for the tests to look at what Redis holds."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password or None,
                           ssl=self.tls is not None,
                           ssl_ca_certs=str(self.tls.ca) if self.tls else None,
                           socket_timeout=2, decode_responses=True)

    def _answers(self) -> bool:
        import redis

        try:
            with self.client() as c:
                return bool(c.ping())
        except (OSError, redis.RedisError):
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


class RedisSentinel(RedisServer):
    """One Sentinel watching ``master`` (service ``mymaster``, quorum 1, down after
    ``down_after_ms``). Sentinel rewrites its own config file as it learns."""

    SERVICE = "mymaster"

    def __init__(self, workdir: Path, master: RedisServer, *, down_after_ms: int = 1000) -> None:
        require_redis()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password, self.tls = "", master.tls  # TLS when the master has it
        self.proc = None
        self.conf = self.workdir / "sentinel.conf"
        lines = [*self._common(),
                 f"sentinel monitor {self.SERVICE} 127.0.0.1 {master.port} 1",
                 f"sentinel down-after-milliseconds {self.SERVICE} {down_after_ms}",
                 f"sentinel failover-timeout {self.SERVICE} 10000"]
        if master.password:
            lines.append(f"sentinel auth-pass {self.SERVICE} {master.password}")
        if self.tls is not None:
            lines += _tls_lines(self.port, self.tls)
        self.conf.write_text("\n".join(lines) + "\n")
        self.master_password = master.password

    def argv(self) -> list[str]:
        return [REDIS, str(self.conf), "--sentinel"]

    @property
    def url(self) -> str:
        auth = f":{self.master_password}@" if self.master_password else ""
        tls = f"?ssl=true&ssl_ca_certs={self.tls.ca}" if self.tls is not None else ""
        return f"redis+sentinel://{auth}127.0.0.1:{self.port}/{self.SERVICE}/0{tls}"

    def master_port(self) -> int:
        """The port Sentinel names as the master now."""
        with self.client() as c:
            return int(c.sentinel_get_master_addr_by_name(self.SERVICE)[1])

    def good_replicas(self) -> int:
        """How many replicas Sentinel knows with their link to the master up."""
        with self.client() as c:
            return sum(1 for r in c.sentinel_slaves(self.SERVICE)
                       if not r.get("is_sdown") and r.get("master-link-status") == "ok")
