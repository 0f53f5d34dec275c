"""trainer/training/vertex.py and `segrec vertex submit`: job specs as Vertex AI's own proto types, dry runs."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest

pytest.importorskip("google.cloud.aiplatform_v1", reason="google-cloud-aiplatform not installed")

from google.cloud.aiplatform_v1 import types  # noqa: E402

from trainer.cli import main as cli  # noqa: E402
from trainer.training import vertex
from trainer.training.vertex import VertexJobConfig  # noqa: E402

PACKAGE = "gs://bucket/segrec/packages/abc/segrec-0.1.0.tar.gz"
IMAGE = "us-central1-docker.pkg.dev/proj/segrec/train:1"
TRAIN_ARGS = ("--dataset-dir", "gs://bucket/data", "--output-dir", "gs://bucket/runs/r1", "--epochs", "3")


def _config(**overrides) -> VertexJobConfig:
    settings = dict(project="proj", region="us-central1", display_name="t", package_uri=PACKAGE, args=TRAIN_ARGS)
    settings.update(overrides)
    return VertexJobConfig(**settings)


def test_one_replica_one_t4_from_package():
    job = vertex.build_custom_job(_config(accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1))
    assert isinstance(job, types.CustomJob) and job.display_name == "t"
    (pool,) = job.job_spec.worker_pool_specs
    assert pool.replica_count == 1
    assert pool.machine_spec.machine_type == "n1-standard-8"
    assert pool.machine_spec.accelerator_type == types.AcceleratorType.NVIDIA_TESLA_T4
    assert pool.machine_spec.accelerator_count == 1
    spec = pool.python_package_spec
    assert list(spec.package_uris) == [PACKAGE] and spec.python_module == "trainer.task"
    assert list(spec.args) == list(TRAIN_ARGS)
    assert spec.executor_image_uri == vertex.DEFAULT_EXECUTOR_IMAGE_GPU
    assert "container_spec" not in pool


def test_three_replicas_from_container_image():
    cfg = _config(package_uri=None, container_image_uri=IMAGE, replica_count=3, machine_type="n1-standard-16",
                  base_output_dir="gs://bucket/jobs/j1", service_account="sa@proj.iam.gserviceaccount.com")
    job = vertex.build_custom_job(cfg)
    chief, workers = job.job_spec.worker_pool_specs
    assert (chief.replica_count, workers.replica_count) == (1, 2)  # 1 chief + 2 workers = 3
    for pool in (chief, workers):
        assert pool.container_spec.image_uri == IMAGE
        assert list(pool.container_spec.command) == ["python", "-m", "trainer.task"]
        assert list(pool.container_spec.args) == list(TRAIN_ARGS)
        assert pool.machine_spec.machine_type == "n1-standard-16"
        assert pool.machine_spec.accelerator_type == types.AcceleratorType.ACCELERATOR_TYPE_UNSPECIFIED
        assert "python_package_spec" not in pool
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://bucket/jobs/j1"
    assert job.job_spec.service_account == "sa@proj.iam.gserviceaccount.com"


def test_worker_pool_specs_are_api_shaped_dicts():
    specs = vertex.build_worker_pool_specs(_config(replica_count=2, accelerator_type="NVIDIA_L4", accelerator_count=2))
    assert [s["replica_count"] for s in specs] == [1, 1]
    assert specs[0]["machine_spec"] == {"machine_type": "n1-standard-8", "accelerator_type": "NVIDIA_L4",
                                        "accelerator_count": 2}
    assert specs[0]["python_package_spec"]["args"] == list(TRAIN_ARGS)
    # The dicts are what aiplatform.CustomJob accepts: the proto type takes them as they are.
    assert types.WorkerPoolSpec(**specs[1]).machine_spec.accelerator_count == 2


@pytest.mark.parametrize("overrides, message", [
    (dict(accelerator_count=1), "needs --accelerator-type"),
    (dict(accelerator_type="NVIDIA_TESLA_T4", accelerator_count=0), "needs --accelerator-count"),
    (dict(replica_count=0), "--replica-count must be >= 1"),
    (dict(container_image_uri=IMAGE), "exactly one of"),
    (dict(package_uri=None), "exactly one of"),
    (dict(package_uri=None, container_image_uri=IMAGE, executor_image_uri="gcr.io/x/y:1"), "needs --package-uri"),
    (dict(package_uri="dist/segrec-0.1.0.tar.gz"), "gs:// URI"),
    (dict(tensorboard="projects/p/locations/r/tensorboards/1", base_output_dir="gs://b/o"), "--service-account"),
    (dict(project=""), "--project"),
])
def test_invalid_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_unknown_accelerator_is_rejected_by_name():
    with pytest.raises(ValueError, match="NVIDIA_TESLA_X1.*NVIDIA_TESLA_T4"):
        vertex.build_custom_job(_config(accelerator_type="NVIDIA_TESLA_X1", accelerator_count=1))


def test_job_spec_json_is_the_rest_shape():
    doc = json.loads(vertex.job_spec_json(_config(accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1)))
    pool = doc["jobSpec"]["workerPoolSpecs"][0]
    assert pool["machineSpec"] == {"machineType": "n1-standard-8", "acceleratorType": "NVIDIA_TESLA_T4",
                                   "acceleratorCount": 1}
    assert int(pool["replicaCount"]) == 1  # int64 is a JSON string in the REST encoding
    assert pool["pythonPackageSpec"]["args"] == list(TRAIN_ARGS)


def _submit(capsys, *argv):
    code = cli.main(["vertex", "submit", "--project", "proj", "--region", "us-central1", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_dry_run_prints_the_job(capsys):
    code, out, err = _submit(
        capsys, "--display-name", "nightly", "--machine-type", "n1-standard-4", "--accelerator-type",
        "NVIDIA_TESLA_T4", "--accelerator-count", "2", "--replica-count", "3", "--container-image-uri", IMAGE,
        "--dry-run", "--steps-per-epoch", "5", "--", "--dataset-dir", "gs://bucket/data", "--epochs", "3")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["displayName"] == "nightly"
    pools = doc["jobSpec"]["workerPoolSpecs"]
    assert [int(p["replicaCount"]) for p in pools] == [1, 2]
    for pool in pools:
        assert pool["machineSpec"] == {"machineType": "n1-standard-4", "acceleratorType": "NVIDIA_TESLA_T4",
                                       "acceleratorCount": 2}
        assert pool["containerSpec"]["imageUri"] == IMAGE
        # Unknown flags and everything after `--` reach trainer.task in order.
        assert pool["containerSpec"]["args"] == ["--steps-per-epoch", "5", "--dataset-dir", "gs://bucket/data",
                                                 "--epochs", "3"]


def test_cli_dry_run_with_build_package_does_not_upload(capsys):
    code, out, err = _submit(capsys, "--build-package", "--staging-bucket", "gs://stage", "--dry-run",
                             "--", "--epochs", "1")
    assert code == 0, err
    spec = json.loads(out)["jobSpec"]["workerPoolSpecs"][0]["pythonPackageSpec"]
    (uri,) = spec["packageUris"]
    assert uri.startswith("gs://stage/segrec/packages/") and uri.endswith("/segrec-0.1.0.tar.gz")
    assert spec["pythonModule"] == "trainer.task" and spec["args"] == ["--epochs", "1"]
    assert spec["executorImageUri"] == vertex.DEFAULT_EXECUTOR_IMAGE_CPU
    assert "would upload it to " + uri in err


def test_default_image_uri_is_artifact_registry_in_the_jobs_project_and_region():
    assert (vertex.default_image_uri("proj", "europe-west4", version="1.2.3")
            == "europe-west4-docker.pkg.dev/proj/segrec/segrec:1.2.3")
    # Untagged: the installed segrec's version, the tag the README's build command gives the image.
    assert vertex.default_image_uri("proj", "us-central1") == (
        f"us-central1-docker.pkg.dev/proj/segrec/segrec:{importlib.metadata.version('segrec')}")
    with pytest.raises(ValueError, match="--region"):
        vertex.default_image_uri("proj", "")


def test_cli_default_runs_the_segrec_image(capsys):
    """No --container-image-uri, no package: every replica runs the segrec
    image of the job's project and region, with the train args as the
    container's args."""
    code, out, err = _submit(capsys, "--replica-count", "2", "--accelerator-type", "NVIDIA_L4", "--dry-run",
                             "--steps-per-epoch", "5", "--", "--dataset-dir", "gs://bucket/data", "--epochs", "3")
    assert code == 0, err
    default = vertex.default_image_uri("proj", "us-central1")
    assert default.startswith("us-central1-docker.pkg.dev/proj/segrec/segrec:")
    pools = json.loads(out)["jobSpec"]["workerPoolSpecs"]
    assert [int(p["replicaCount"]) for p in pools] == [1, 1]
    for pool in pools:
        assert "pythonPackageSpec" not in pool
        assert pool["containerSpec"] == {
            "imageUri": default,
            "command": ["python", "-m", "trainer.task"],
            "args": ["--steps-per-epoch", "5", "--dataset-dir", "gs://bucket/data", "--epochs", "3"],
        }
    # The dry run says which image it picked, and how to pick another.
    assert f"image: {default}" in err and "--container-image-uri" in err


def test_cli_container_image_uri_overrides_the_default(capsys):
    code, out, err = _submit(capsys, "--container-image-uri", IMAGE, "--dry-run", "--", "--epochs", "1")
    assert code == 0, err
    (pool,) = json.loads(out)["jobSpec"]["workerPoolSpecs"]
    assert pool["containerSpec"]["imageUri"] == IMAGE and pool["containerSpec"]["args"] == ["--epochs", "1"]
    assert "image:" not in err


def test_cli_package_path_still_takes_an_executor_image(capsys):
    executor = "us-docker.pkg.dev/my-proj/images/tf-2-20:1"
    code, out, err = _submit(capsys, "--package-uri", PACKAGE, "--executor-image-uri", executor, "--dry-run",
                             "--", "--epochs", "1")
    assert code == 0, err
    (pool,) = json.loads(out)["jobSpec"]["workerPoolSpecs"]
    assert "containerSpec" not in pool
    spec = pool["pythonPackageSpec"]
    assert spec["executorImageUri"] == executor and spec["packageUris"] == [PACKAGE]
    assert spec["args"] == ["--epochs", "1"]
    # The prebuilt TF 2.17 default is named as such when it is used.
    code, out, err = _submit(capsys, "--package-uri", PACKAGE, "--dry-run")
    assert code == 0, err
    assert "TensorFlow 2.17" in err and vertex.DEFAULT_EXECUTOR_IMAGE_CPU in err


def test_cli_errors_exit_2_with_the_flag_named(capsys):
    code, _, err = _submit(capsys, "--accelerator-count", "1", "--package-uri", PACKAGE, "--dry-run")
    assert code == 2 and "--accelerator-count 1 needs --accelerator-type" in err
    code, _, err = _submit(capsys, "--build-package", "--dry-run")
    assert code == 2 and "--staging-bucket" in err
    # An executor image runs a package: alone, or with an image, it is a mistake.
    for extra in ((), ("--container-image-uri", IMAGE)):
        code, _, err = _submit(capsys, "--executor-image-uri", "gcr.io/x/y:1", *extra, "--dry-run")
        assert code == 2 and "--executor-image-uri" in err and "--build-package" in err


def test_submit_uses_aiplatform_custom_job(monkeypatch):
    from google.cloud import aiplatform

    calls = {}

    class FakeCustomJob:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def submit(self, **kwargs):
            calls["submit"] = kwargs

        def run(self, **kwargs):
            calls["run"] = kwargs

    monkeypatch.setattr(aiplatform, "CustomJob", FakeCustomJob)
    cfg = _config(replica_count=2, staging_bucket="gs://stage", service_account="sa@proj.iam.gserviceaccount.com")
    vertex.submit(cfg, sync=False)
    assert calls["init"]["project"] == "proj" and calls["init"]["location"] == "us-central1"
    assert calls["init"]["worker_pool_specs"] == vertex.build_worker_pool_specs(cfg)
    assert calls["submit"] == {"service_account": "sa@proj.iam.gserviceaccount.com", "tensorboard": None}
    vertex.submit(cfg, sync=True)
    assert calls["run"]["sync"] is True
    with pytest.raises(ValueError, match="--staging-bucket or --base-output-dir"):
        vertex.submit(_config(), sync=False)


def test_missing_aiplatform_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.cloud.aiplatform", None)
    with pytest.raises(ImportError, match=r"segrec\[vertex\]"):
        vertex.submit(_config(staging_bucket="gs://stage"), sync=False)
