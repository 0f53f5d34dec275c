"""Vertex AI custom training jobs for `segrec train` (`segrec vertex submit`).

A job is a list of worker pools (Vertex AI's CustomJob API):

    pool 0: 1 replica, the chief (CLUSTER_SPEC "workerpool0", TF "chief")
    pool 1: replica_count - 1 workers (only when replica_count > 1)

Pool 2 (parameter servers) and pool 3 (evaluators) are never created:
training is synchronous all-reduce (trainer/training/distribution.py). Every replica
runs `python -m trainer.task ARGS` either from a container image that has
segrec installed (`container_image_uri`: the segrec image of the repository's
Dockerfile, by default `default_image_uri(project, region)`), or from this
project's sdist on a prebuilt TensorFlow container (`package_uri`).

`build_custom_job` returns the API's own proto type
(`google.cloud.aiplatform_v1.types.CustomJob`), so field names, enum values
(accelerator types) and nesting are checked by the client library, and
`job_spec_json` is what a dry run prints. google-cloud-aiplatform is an
optional dependency (`pip install 'segrec[vertex]'`), imported where used.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from typing import List, Optional, Tuple

INSTALL_HINT = "pip install 'segrec[vertex]'  (google-cloud-aiplatform)"
# Prebuilt TensorFlow training containers, only for the package path
# (--package-uri / --build-package). Their TensorFlow is 2.17 on Python 3.10:
# installing the package pip-installs segrec's tensorflow 2.20.* over it, and
# on GPUs that TensorFlow meets CUDA libraries built for 2.17. The default is
# the segrec image instead (`default_image_uri`), which carries TensorFlow
# 2.20 with its own CUDA wheels.
DEFAULT_EXECUTOR_IMAGE_CPU = "us-docker.pkg.dev/vertex-ai/training/tf-cpu.2-17.py310:latest"
DEFAULT_EXECUTOR_IMAGE_GPU = "us-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest"
# Where `segrec vertex submit` looks for the segrec image unless told
# otherwise: an Artifact Registry Docker repository named `segrec` in the
# job's own project and region, image `segrec`, tagged with the version of
# the installed segrec (k8s/README.md "The segrec image": build and push).
IMAGE_REPOSITORY = "segrec"
IMAGE_NAME = "segrec"


def package_version() -> str:
    """The installed segrec distribution's version (the default image tag)."""
    try:
        return importlib.metadata.version("segrec")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("segrec is not installed as a distribution, so the default image tag (its version) "
                         "is unknown: give --container-image-uri") from None


def default_image_uri(project: str, region: str, version: Optional[str] = None) -> str:
    """The segrec image built from the repository's Dockerfile and pushed to
    Artifact Registry in the job's project and region:
    `REGION-docker.pkg.dev/PROJECT/segrec/segrec:VERSION`."""
    if not project:
        raise ValueError("--project is required (the Google Cloud project that runs the job)")
    if not region:
        raise ValueError("--region is required (e.g. us-central1)")
    return (f"{region}-docker.pkg.dev/{project}/{IMAGE_REPOSITORY}/{IMAGE_NAME}:"
            f"{version or package_version()}")


@dataclasses.dataclass(frozen=True)
class VertexJobConfig:
    """One Vertex AI custom training job (built by `segrec vertex submit`).

    Exactly one of `container_image_uri` (an image with segrec installed,
    normally `default_image_uri(project, region)`; runs `python -m
    python_module`) and `package_uri` (gs:// sdist of this project, run with
    `python_module` on `executor_image_uri`) is set. `args` go to
    trainer.task unchanged. `executor_image_uri` belongs to the package path;
    None there picks the prebuilt TF CPU or GPU container by
    `accelerator_type`.
    """

    project: str
    region: str
    display_name: str = "segrec-train"
    staging_bucket: Optional[str] = None
    machine_type: str = "n1-standard-8"
    accelerator_type: Optional[str] = None  # e.g. "NVIDIA_TESLA_T4", "NVIDIA_L4"
    accelerator_count: int = 0
    replica_count: int = 1
    package_uri: Optional[str] = None
    container_image_uri: Optional[str] = None
    python_module: str = "trainer.task"
    executor_image_uri: Optional[str] = None
    args: Tuple[str, ...] = ()
    service_account: Optional[str] = None
    tensorboard: Optional[str] = None  # projects/P/locations/R/tensorboards/ID
    base_output_dir: Optional[str] = None  # gs://...; Vertex AI sets AIP_MODEL_DIR etc. under it
    labels: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self):
        validate(self)

    @property
    def executor_image(self) -> str:
        if self.executor_image_uri:
            return self.executor_image_uri
        return DEFAULT_EXECUTOR_IMAGE_GPU if self.accelerator_type else DEFAULT_EXECUTOR_IMAGE_CPU


def validate(cfg: VertexJobConfig) -> None:
    """Raises ValueError naming the setting (as its CLI flag) that is wrong."""
    if not cfg.project:
        raise ValueError("--project is required (the Google Cloud project that runs the job)")
    if not cfg.region:
        raise ValueError("--region is required (e.g. us-central1)")
    if not cfg.display_name:
        raise ValueError("--display-name must not be empty")
    if cfg.replica_count < 1:
        raise ValueError(f"--replica-count must be >= 1 (1 chief + N-1 workers), got {cfg.replica_count}")
    if cfg.accelerator_count < 0:
        raise ValueError(f"--accelerator-count must be >= 0, got {cfg.accelerator_count}")
    if cfg.accelerator_count > 0 and not cfg.accelerator_type:
        raise ValueError(f"--accelerator-count {cfg.accelerator_count} needs --accelerator-type "
                         "(e.g. NVIDIA_TESLA_T4)")
    if cfg.accelerator_type and cfg.accelerator_count < 1:
        raise ValueError(f"--accelerator-type {cfg.accelerator_type} needs --accelerator-count >= 1")
    if cfg.executor_image_uri and not cfg.package_uri:
        raise ValueError("--executor-image-uri is the container that runs the package: it needs --package-uri "
                         "or --build-package (with --container-image-uri, that image runs the job)")
    if bool(cfg.package_uri) == bool(cfg.container_image_uri):
        raise ValueError("give exactly one of --package-uri gs://.../segrec-*.tar.gz (or --build-package) "
                         "and --container-image-uri")
    if cfg.package_uri and not cfg.package_uri.startswith("gs://"):
        raise ValueError(f"--package-uri must be a gs:// URI of the sdist (Vertex AI reads it from Cloud "
                         f"Storage), got {cfg.package_uri!r}")
    for flag, value in (("--staging-bucket", cfg.staging_bucket), ("--base-output-dir", cfg.base_output_dir)):
        if value and not value.startswith("gs://"):
            raise ValueError(f"{flag} must be a gs:// URI, got {value!r}")
    if cfg.tensorboard and not cfg.service_account:
        raise ValueError("--tensorboard needs --service-account (Vertex AI uploads TensorBoard logs "
                         "as that service account)")
    if cfg.tensorboard and not cfg.base_output_dir and not cfg.staging_bucket:
        raise ValueError("--tensorboard needs --base-output-dir or --staging-bucket (where the logs are "
                         "written before upload)")


def _machine_spec(cfg: VertexJobConfig) -> dict:
    spec = {"machine_type": cfg.machine_type}
    if cfg.accelerator_type:
        spec["accelerator_type"] = cfg.accelerator_type
        spec["accelerator_count"] = cfg.accelerator_count
    return spec


def _task_spec(cfg: VertexJobConfig) -> dict:
    if cfg.package_uri:
        return {"python_package_spec": {
            "executor_image_uri": cfg.executor_image,
            "package_uris": [cfg.package_uri],
            "python_module": cfg.python_module,
            "args": list(cfg.args),
        }}
    # The image's own entrypoint is not relied on: every replica runs the
    # same module as with a package.
    return {"container_spec": {
        "image_uri": cfg.container_image_uri,
        "command": ["python", "-m", cfg.python_module],
        "args": list(cfg.args),
    }}


def build_worker_pool_specs(cfg: VertexJobConfig) -> List[dict]:
    """The job's worker pools as dicts in the Vertex API's shape (snake_case,
    as `aiplatform.CustomJob(worker_pool_specs=...)` takes them): pool 0 with
    one chief replica, pool 1 with replica_count - 1 workers when > 0."""
    pool = {"machine_spec": _machine_spec(cfg), **_task_spec(cfg)}
    specs = [dict(pool, replica_count=1)]
    if cfg.replica_count > 1:
        specs.append(dict(pool, replica_count=cfg.replica_count - 1))
    return specs


def _import_aiplatform_types():
    try:
        from google.cloud.aiplatform_v1 import types
    except ImportError as err:
        raise ImportError(f"Vertex AI support needs google-cloud-aiplatform: {INSTALL_HINT} ({err})") from None
    return types


def build_custom_job(cfg: VertexJobConfig):
    """The job as a `google.cloud.aiplatform_v1.types.CustomJob` (validated by the proto types)."""
    types = _import_aiplatform_types()
    if cfg.accelerator_type and cfg.accelerator_type not in types.AcceleratorType.__members__:
        known = ", ".join(n for n in types.AcceleratorType.__members__ if n.startswith("NVIDIA"))
        raise ValueError(f"--accelerator-type {cfg.accelerator_type!r} is not a Vertex AI accelerator; "
                         f"known GPUs: {known}")
    pools = []
    for spec in build_worker_pool_specs(cfg):
        machine = types.MachineSpec(**spec["machine_spec"])
        if "python_package_spec" in spec:
            task = {"python_package_spec": types.PythonPackageSpec(**spec["python_package_spec"])}
        else:
            task = {"container_spec": types.ContainerSpec(**spec["container_spec"])}
        pools.append(types.WorkerPoolSpec(machine_spec=machine, replica_count=spec["replica_count"], **task))
    job_spec = types.CustomJobSpec(worker_pool_specs=pools)
    if cfg.base_output_dir:
        job_spec.base_output_directory = types.GcsDestination(output_uri_prefix=cfg.base_output_dir)
    if cfg.service_account:
        job_spec.service_account = cfg.service_account
    if cfg.tensorboard:
        job_spec.tensorboard = cfg.tensorboard
    return types.CustomJob(display_name=cfg.display_name, job_spec=job_spec, labels=dict(cfg.labels))


def job_spec_json(cfg: VertexJobConfig) -> str:
    """The CustomJob as the REST API's JSON (camelCase, enum names), what a dry run prints."""
    job = build_custom_job(cfg)
    return type(job).to_json(job, use_integers_for_enums=False, always_print_fields_with_no_presence=False, indent=2)


def build_sdist(repo_root: str, out_dir: str) -> str:
    """Builds this project's source distribution into `out_dir`; returns its path.

    `python -m build --sdist --no-isolation` when the `build` package is
    installed (no isolation: the build uses this environment's setuptools
    instead of downloading one), else `python setup.py sdist`.
    """
    os.makedirs(out_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(out_dir, "*.tar.gz")))
    try:
        # Ask for the installed distribution: a find_spec("build") would also
        # match a plain build/ directory in the working tree.
        importlib.metadata.distribution("build")
        has_build = True
    except importlib.metadata.PackageNotFoundError:
        has_build = False
    if has_build:
        cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", os.path.abspath(out_dir),
               os.path.abspath(repo_root)]
        cwd = os.path.abspath(out_dir)  # not the repo root, whose build/ would shadow the package
    else:
        cmd = [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", os.path.abspath(out_dir)]
        cwd = repo_root
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the sdist failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-2000:]}")
    built = sorted(set(glob.glob(os.path.join(out_dir, "*.tar.gz"))) - before, key=os.path.getmtime)
    if not built:  # the same file name rebuilt in place
        built = sorted(glob.glob(os.path.join(out_dir, "segrec-*.tar.gz")), key=os.path.getmtime)
    if not built:
        raise RuntimeError(f"building the sdist wrote no .tar.gz to {out_dir}")
    return built[-1]


def package_gcs_uri(sdist_path: str, staging_bucket: str) -> str:
    """Where `upload_package` puts the sdist: keyed by its content hash, so a
    new build never overwrites the package of a job that is still starting."""
    with open(sdist_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return f"{staging_bucket.rstrip('/')}/segrec/packages/{digest}/{os.path.basename(sdist_path)}"


def upload_package(sdist_path: str, staging_bucket: str, project: Optional[str] = None) -> str:
    """Copies the sdist to `package_gcs_uri(...)`; returns that gs:// URI."""
    uri = package_gcs_uri(sdist_path, staging_bucket)
    try:
        from google.cloud import storage
    except ImportError as err:
        raise ImportError(f"uploading the package needs google-cloud-storage: {INSTALL_HINT} ({err})") from None
    blob = storage.Blob.from_string(uri, client=storage.Client(project=project))
    blob.upload_from_filename(sdist_path)
    return uri


def submit(cfg: VertexJobConfig, sync: bool = True):
    """Creates the job on Vertex AI; with `sync`, waits for it to finish.
    Returns the `aiplatform.CustomJob` (its `.resource_name`, `.state`)."""
    try:
        aiplatform = importlib.import_module("google.cloud.aiplatform")
    except ImportError as err:
        raise ImportError(f"`segrec vertex submit` needs google-cloud-aiplatform: {INSTALL_HINT} ({err})") from None
    build_custom_job(cfg)  # the same checks as a dry run, before any network call
    if not cfg.staging_bucket and not cfg.base_output_dir:
        raise ValueError("submitting needs --staging-bucket or --base-output-dir (Vertex AI's job output)")
    job = aiplatform.CustomJob(
        display_name=cfg.display_name,
        worker_pool_specs=build_worker_pool_specs(cfg),
        base_output_dir=cfg.base_output_dir,
        project=cfg.project,
        location=cfg.region,
        staging_bucket=cfg.staging_bucket,
        labels=dict(cfg.labels) or None,
    )
    options = {"service_account": cfg.service_account, "tensorboard": cfg.tensorboard}
    if sync:
        job.run(sync=True, **options)
    else:
        job.submit(**options)
    return job
