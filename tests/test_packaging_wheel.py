"""The operator's route, from a built wheel: install it into a fresh virtual environment
outside the repository, then ``mailward --version``, ``init``, ``check-config``,
``serve`` on the generated files and ``demo``, run from there."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

import proxy

pytestmark = pytest.mark.peer  # builds, installs and runs subprocesses (about a minute)

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MAILWARD_CONFIG")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built (isolated, as `python -m build`) from a copy of the tracked
    files, so nothing lands in the checkout and untracked files cannot leak in."""
    src = tmp_path_factory.mktemp("src")
    files = _run("git", "ls-files", "-z", cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        target = src / name
        if (ROOT / name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / name).read_bytes())
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--wheel", "--outdir", out, src, cwd=src)
    (built,) = out.glob("mailward-*.whl")
    return built


def test_wheel_carries_samples_licence_and_typing(wheel: Path) -> None:
    """The wheel holds the samples init writes, py.typed and the licence, and is
    named for this version."""
    assert wheel.name == f"mailward-{proxy.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("proxy/samples/mailward.toml", "proxy/samples/policy.toml", "proxy/py.typed"):
        assert name in names
    assert any(re.search(r"\.dist-info/(licenses/)?LICENSE$", n) for n in names), names


def test_fresh_venv_from_the_wheel_inits_checks_serves_and_demos(
        wheel: Path, tmp_path: Path) -> None:
    """pip install WHEEL into a new venv outside the repository; from an empty
    directory there: --version, init, check-config exits 0, serve becomes ready on the
    generated files (ports moved to free ones), and demo exits 0."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    _run(venv / "bin/pip", "install", "-q", wheel, cwd=tmp_path)
    mailward = venv / "bin/mailward"
    site = _run(venv / "bin/python", "-c", "import proxy; print(proxy.__file__)", cwd=tmp_path)
    assert ROOT not in Path(site.stdout.strip()).parents  # the installed copy, not ours

    assert _run(mailward, "--version", cwd=tmp_path).stdout == f"mailward {proxy.__version__}\n"
    deploy = tmp_path / "srv-mw"
    _run(mailward, "init", deploy, cwd=tmp_path)
    r = _run(mailward, "check-config", cwd=deploy)
    assert "mode report-only" in r.stdout

    config = deploy / "config/mailward.toml"
    text = config.read_text()
    api = _free_port()
    text = text.replace('listen = "127.0.0.1:8443"', f'listen = "127.0.0.1:{api}"')
    text = re.sub(r'listen = "0\.0\.0\.0:\d+"',
                  lambda _: f'listen = "127.0.0.1:{_free_port()}"', text)
    config.write_text(text)
    _serve_until_ready(mailward, deploy, api)

    _run(mailward, "demo", cwd=tmp_path, timeout=120)


def _serve_until_ready(mailward: Path, deploy: Path, api: int) -> None:
    log = deploy / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(mailward), "serve"], cwd=deploy, stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    ctx = ssl.create_default_context(cafile=str(deploy / "certs/ca.pem"))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{api}/readyz", context=ctx,
                                            timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
