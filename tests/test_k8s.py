"""k8s/: the kustomize overlays render, validate against the Kubernetes
schemas and pass checkov (k8s/validate.sh), and the model config agrees with
what the init container fetches.

The tools (kustomize v5+ or kubectl, kubernetes-validate, checkov) are not
Python dependencies of segrec; CI installs them (k8s/README.md
"Validation"). Where they are missing the integration tests skip, except
under CI (CI=true), where a missing tool is a failure: a green CI must not
hide a missing install step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
VALIDATE = K8S / "validate.sh"
MISSING_TOOL_RC = 3


def _run_validate(k8s_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("K8S_TOOLS_BIN", str(REPO / "build" / "k8s-tools" / "bin"))
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        ["bash", str(k8s_dir / "validate.sh")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode == MISSING_TOOL_RC:
        msg = f"k8s validation tools missing:\n{proc.stderr}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return proc


@pytest.mark.integration
def test_validate_sh_passes(tmp_path):
    proc = _run_validate(K8S, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for target in ("overlays/brute-force", "overlays/scann", "jobs"):
        assert f"  {target} -> " in proc.stdout, out
    assert "all objects valid" in proc.stdout, out
    assert re.search(r"Failed checks: 0\b", proc.stdout), out
    assert "validate.sh: OK" in proc.stdout, out


@pytest.mark.integration
@pytest.mark.parametrize("breakage", ["schema", "security"])
def test_validate_sh_fails_on_a_broken_manifest(tmp_path, breakage):
    """The script is not a rubber stamp: a schema error and a security
    regression in a copy of k8s/ each make it exit non-zero."""
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    deployment = k8s / "base" / "deployment.yaml"
    text = deployment.read_text()
    if breakage == "schema":
        # `replica` is not a DeploymentSpec field: strict validation rejects it.
        text = text.replace("  replicas: 2\n", "  replicas: 2\n  replica: 2\n", 1)
        expected = "schema validation"
    else:
        text = text.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
        expected = "checkov"
    assert text != deployment.read_text()
    deployment.write_text(text)
    (tmp_path / "work").mkdir()
    proc = _run_validate(k8s, tmp_path / "work")
    assert proc.returncode != 0, proc.stdout
    assert f"FAIL: {expected}" in proc.stderr, proc.stdout + proc.stderr


def _versions_and_labels(models_config: str):
    versions = [int(v) for v in re.findall(r"versions:\s*(\d+)", models_config)]
    labels = dict(re.findall(r'key:\s*"(\w+)"\s*value:\s*(\d+)', models_config))
    return versions, {k: int(v) for k, v in labels.items()}


def test_model_config_matches_fetched_versions():
    """models.config's `specific` versions are exactly what the init
    container fetches (MODEL_VERSIONS), and stable/canary point at them."""
    config = (K8S / "base" / "config" / "models.config").read_text()
    env = dict(
        line.split("=", 1)
        for line in (K8S / "base" / "config" / "model-source.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    versions, labels = _versions_and_labels(config)
    assert re.search(r'name:\s*"segrec"', config)
    assert re.search(r'base_path:\s*"/models/segrec"', config)
    assert versions and sorted(versions) == sorted(int(v) for v in env["MODEL_VERSIONS"].split())
    assert set(labels) == {"stable", "canary"}
    assert set(labels.values()) <= set(versions)
