"""Packaging for operators: the samples in the wheel, ``mailward init``, the version
everywhere it shows, the dependency locks, LICENSE and CHANGELOG."""

from __future__ import annotations

import json
import re
import stat
import tomllib
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import pytest

import proxy
from proxy.cli import main
from proxy.cli_ops import REPORT_ONLY_LINE, report_only_policy, sample_text
from proxy.config import load_config, load_policy

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[1]


def _keys(table: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a TOML document (array-of-tables entries merged)."""
    out: set[str] = set()
    if isinstance(table, list):
        for item in table:
            out |= _keys(item, prefix)
        return out
    if isinstance(table, dict):
        for k, v in table.items():
            out.add(prefix + k)
            out |= _keys(v, f"{prefix}{k}.")
    return out


# ------------------------------------------------------------------ samples and init


@pytest.mark.parametrize("name", ["mailward.toml", "policy.toml"])
def test_packaged_samples_are_the_repository_config(name: str) -> None:
    """proxy/samples/ (what the wheel carries) is byte-identical to config/: one
    file, two places (cp config/NAME proxy/samples/ after editing config/)."""
    shipped = (ROOT / "config" / name).read_text()
    assert sample_text(name) == shipped, f"cp config/{name} proxy/samples/{name}"
    assert _keys(tomllib.loads(sample_text(name))) == _keys(tomllib.loads(shipped))


def test_init_policy_differs_from_the_shipped_one_only_in_the_mode_line() -> None:
    """The policy init writes is the shipped policy with the policy-wide mode made
    report-only, every other line unchanged."""
    shipped = sample_text("policy.toml").splitlines()
    written = report_only_policy(sample_text("policy.toml")).splitlines()
    changed = [(a, b) for a, b in zip(shipped, written, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith('mode = "enforce"')
    assert changed[0][1] == REPORT_ONLY_LINE
    assert _keys(tomllib.loads("\n".join(written))) == _keys(tomllib.loads("\n".join(shipped)))


def test_init_writes_a_deployment_that_checks(tmp_path: Path, monkeypatch: Any,
                                               capsys: Any) -> None:
    """`mailward init DIR` writes config (policy report-only), certs (CA keys offline)
    and a 0700 state/, prints the next steps, and check-config then exits 0."""
    root = tmp_path / "mw"
    assert main(["init", str(root)]) == 0
    out = capsys.readouterr().out
    for step in ("check-config", "serve", "audit query", 'mode = "enforce"'):
        assert step in out
    assert stat.S_IMODE((root / "state").stat().st_mode) == 0o700
    assert (root / "certs/offline/ca.key").exists() and not (root / "certs/ca.key").exists()
    assert stat.S_IMODE((root / "certs/audit-signing.key").stat().st_mode) == 0o600
    policy = load_policy(root / "config/policy.toml")
    assert policy.mode == "report-only" and policy.prohibited[0].name == "TikTok"
    cfg = load_config(root / "config/mailward.toml")
    assert {lc.port for lc in cfg.listeners} == {993, 143, 587, 465, 443}  # standard ports
    monkeypatch.chdir(root)
    assert main(["check-config"]) == 0
    assert "mode report-only" in capsys.readouterr().out


def test_init_defaults_to_the_current_directory(tmp_path: Path, monkeypatch: Any) -> None:
    """`mailward init` with no DIR writes into the current directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert (tmp_path / "config/mailward.toml").exists() and (tmp_path / "state").is_dir()


def test_init_refuses_to_overwrite_and_force_keeps_state(tmp_path: Path, capsys: Any) -> None:
    """A second init writes nothing and exits 2 naming an existing file; --force
    rewrites config and certificates but leaves state/ and its files alone."""
    assert main(["init", str(tmp_path)]) == 0
    policy = tmp_path / "config/policy.toml"
    policy.write_text("# edited\n")
    (tmp_path / "state/audit.jsonl").write_text("kept\n")
    capsys.readouterr()
    assert main(["init", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and err.endswith("\n")
    assert policy.read_text() == "# edited\n"
    key = (tmp_path / "certs/audit-signing.key").read_bytes()
    assert main(["init", str(tmp_path), "--force"]) == 0
    assert policy.read_text() != "# edited\n"
    assert (tmp_path / "certs/audit-signing.key").read_bytes() != key
    assert (tmp_path / "state/audit.jsonl").read_text() == "kept\n"


def test_init_refuses_when_only_a_certificate_exists(tmp_path: Path) -> None:
    """Any file init would write counts, certificates too; nothing is written then."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs/server.key").write_text("mine")
    assert main(["init", str(tmp_path)]) == 2
    assert not (tmp_path / "config").exists()
    assert (tmp_path / "certs/server.key").read_text() == "mine"


# ------------------------------------------------------------------ version


def test_version_is_one_number_everywhere(capsys: Any) -> None:
    """`mailward --version` prints the installed distribution's version, which is
    proxy.__version__ and the CHANGELOG's newest release."""
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"mailward {proxy.__version__}\n"
    assert dist_version("mailward") == proxy.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.MULTILINE)
    assert releases[0] == proxy.__version__


async def test_healthz_and_build_info_name_the_version() -> None:
    """/healthz's body and the mailward_build_info metric carry the version."""
    from aiohttp.test_utils import make_mocked_request

    from proxy.api import _healthz
    from proxy.metrics import PrometheusObserver

    response = await _healthz(make_mocked_request("GET", "/healthz"))
    assert json.loads(response.body) == {"status": "ok", "version": proxy.__version__}
    body, _ = PrometheusObserver().expose()
    assert f'mailward_build_info{{version="{proxy.__version__}"}} 1.0' in body.decode()


def test_every_checkpoint_carries_the_signed_version(tmp_path: Path) -> None:
    """Checkpoints name the writer's version inside the signed meta; changing it
    breaks verification."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from proxy.audit import AuditLog, verify

    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, signing_key=key) as log:
        log.append({"event": "notice"})
        cp = log.checkpoint()
    assert cp["version"] == proxy.__version__
    assert verify(path, key.public_key()).ok
    lines = path.read_text().splitlines()
    forged = json.loads(lines[-1])
    forged["version"] = "9.9.9"
    from proxy.audit.record import canonical_json, record_hash

    forged["hash"] = record_hash(forged)
    path.write_text("\n".join([*lines[:-1], canonical_json(forged)]) + "\n")
    (tmp_path / "audit.jsonl.head").write_text(canonical_json(forged))
    result = verify(path, key.public_key())
    assert not result.ok and "signature" in (result.error or "")


# ------------------------------------------------------------------ locks and files


def _pins(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if m:
            hashes = frozenset(re.findall(r"--hash=(sha256:[0-9a-f]{64})", block))
            assert hashes, f"{path.name}: {m[1]} has no hash"
            pins[m[1].lower()] = (m[2], hashes)
    return pins


def test_locks_pin_every_dependency_with_hashes() -> None:
    """requirements.lock pins every dependency and test extra of pyproject.toml with
    hashes; requirements-runtime.lock (the image's) is its subset, same pins and
    hashes, without the test tools."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    full = _pins(ROOT / "requirements.lock")
    runtime = _pins(ROOT / "requirements-runtime.lock")

    def name(req: str) -> str:
        return re.split(r"[\s<>=~!;\[]", req, maxsplit=1)[0].lower()

    for req in project["dependencies"]:
        assert name(req) in runtime, req
    for req in project["optional-dependencies"]["test"]:
        assert name(req) in full, req
    for pkg, pin in runtime.items():
        assert full.get(pkg) == pin, f"{pkg}: runtime lock differs from requirements.lock"
    assert "pytest" not in runtime and "mypy" not in runtime


def test_make_venv_installs_from_the_lock() -> None:
    """The venv stamp depends on requirements.lock and installs it with
    --require-hashes, then the package without dependencies; the image uses the
    runtime lock the same way."""
    make = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\): (.*)\n((?:\t.*\n)+)", make, re.MULTILINE)
    assert stamp and "$(LOCK)" in stamp[1]
    assert "--require-hashes -r $(LOCK)" in stamp[2] and "--no-deps -e ." in stamp[2]
    assert re.search(r"^lock:", make, re.MULTILINE)
    docker = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements-runtime.lock" in docker
    assert "--no-deps ." in docker and "USER 10001" in docker and "HEALTHCHECK" in docker


def test_license_is_the_declared_apache_2() -> None:
    """LICENSE holds the Apache-2.0 text that pyproject.toml declares, and the wheel
    carries py.typed and the samples as package data."""
    assert "Apache License\n                           Version 2.0, January 2004" in (
        ROOT / "LICENSE").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == {"text": "Apache-2.0"}
    data = project["tool"]["setuptools"]["package-data"]["proxy"]
    assert "py.typed" in data and "samples/*.toml" in data
    assert (ROOT / "proxy/py.typed").exists()
