"""Running mailward as ops do: the installed console script, ``mailward serve`` as a
child process (as the image's ENTRYPOINT/CMD runs it), waiting for it to be ready, and
free loopback ports for its listeners."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

#: The console script of this interpreter's environment.
MAILWARD = Path(sys.executable).with_name("mailward")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def mailward(*args: str, config: Path | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script as an operator would, ``MAILWARD_CONFIG`` set to
    ``config`` if given; output captured as text."""
    env = {**os.environ, "MAILWARD_CONFIG": str(config)} if config is not None else None
    return subprocess.run([str(MAILWARD), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``mailward serve`` exactly as the image's ENTRYPOINT/CMD runs it."""
    with open(log, "ab") as err:
        return subprocess.Popen(
            [str(MAILWARD), "serve"],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            env={**os.environ, "MAILWARD_CONFIG": str(config), "MAILWARD_LOG_FORMAT": "json"},
        )


def wait_serving(proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path,
                 timeout_s: float = 20.0) -> None:
    """Poll ``ready`` (connection errors count as not yet) until it is true; fail with
    the server's log if the process exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, \
            f"serve exited {proc.returncode}: {log.read_text(errors='replace')}"
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready: {log.read_text(errors='replace')}")
