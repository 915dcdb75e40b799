"""deploy/: the systemd unit passes ``systemd-analyze verify`` and the Kubernetes
manifests validate against a current Kubernetes schema and carry what DESIGN asks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from peers import peer_missing

from proxy.cli_ops import report_only_policy, sample_text
from proxy.config import load_config, load_policy

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy/systemd/mailward.service"
K8S = ROOT / "deploy/kubernetes"
#: The newest Kubernetes whose schema kubernetes-validate ships (checked offline).
K8S_VERSION = "1.37"
MANIFESTS = ("configmap.yaml", "secret.yaml", "service.yaml", "statefulset.yaml", "pdb.yaml")


def _unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at the installed mailward (verify checks that
    the binary exists)."""
    mailward = Path(sys.executable).with_name("mailward")
    unit = tmp_path / "mailward.service"
    unit.write_text((text or UNIT.read_text()).replace("/opt/mailward/bin/mailward",
                                                       str(mailward)))
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        peer_missing("systemd-analyze not installed (Debian package systemd)")
    return subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.peer
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit with no warning about it, and the unit
    has the hardening the issue lists."""
    result = _verify(_unit(tmp_path))
    noise = [line for line in result.stderr.splitlines() if "mailward" in line]
    assert result.returncode == 0 and noise == [], result.stderr
    text = UNIT.read_text()
    for line in ("Type=simple", "ExecReload=/bin/kill -HUP $MAINPID", "User=mailward",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ReadWritePaths=/srv/mailward/state",
                 "PrivateTmp=yes"):
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE), line


@pytest.mark.peer
def test_systemd_verify_catches_a_mistake(tmp_path: Path) -> None:
    """The check has teeth: a misspelt directive is reported by name."""
    unit = _unit(tmp_path, UNIT.read_text().replace("ProtectHome=", "ProtectHom="))
    assert "ProtectHom" in _verify(unit).stderr


def _docs() -> list[dict[str, Any]]:
    return [d for name in MANIFESTS for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.mark.pure
def test_kubernetes_manifests_validate() -> None:
    """Every manifest validates strictly (no unknown fields) against the schema of a
    current Kubernetes; kustomization lists them all."""
    import kubernetes_validate

    for doc in _docs():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(MANIFESTS)


@pytest.mark.pure
def test_kubernetes_validation_catches_a_mistake() -> None:
    """The validator has teeth: an unknown field in the StatefulSet is refused."""
    import kubernetes_validate

    sts = next(d for d in _docs() if d["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


@pytest.mark.pure
def test_statefulset_runs_as_design_says(tmp_path: Path) -> None:
    """One replica with a volume for state/, non-root, read-only root filesystem,
    /healthz liveness and /readyz readiness on the API port, and a grace period that
    covers preStop plus the config's shutdown_grace."""
    docs = {d["kind"]: d for d in _docs()}
    sts = docs["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert sts["spec"]["replicas"] == 1
    assert [v["metadata"]["name"] for v in sts["spec"]["volumeClaimTemplates"]] == ["state"]
    assert {"name": "state", "mountPath": "/srv/mailward/state"} in c["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"][
        "readOnlyRootFilesystem"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"

    root = tmp_path / "srv"
    (root / "config").mkdir(parents=True)
    data = docs["ConfigMap"]["data"]
    for name, text in data.items():
        (root / "config" / name).write_text(text)
    cfg = load_config(root / "config/mailward.toml")  # mailward's own loader
    policy = load_policy(root / "config/policy.toml")
    assert policy.mode == "report-only"
    assert data["policy.toml"] == report_only_policy(sample_text("policy.toml"))
    assert cfg.api.host == "0.0.0.0" and cfg.api.port in {p["containerPort"] for p in c["ports"]}
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + cfg.server.shutdown_grace_s + 5
    secret = docs["Secret"]
    mounted = {v["name"]: v for v in pod["volumes"]}
    assert mounted["certs"]["secret"]["secretName"] == secret["metadata"]["name"]
    for key in ("server.pem", "server.key", "audit-signing.key", "admin.token"):
        assert key in secret["stringData"]
