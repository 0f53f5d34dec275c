"""CLI adapter of `segrec vertex submit`: run `segrec train` as a Vertex AI custom job.

    segrec vertex submit --project P --region us-central1 \\
        --accelerator-type NVIDIA_TESLA_T4 --replica-count 2 \\
        --staging-bucket gs://B [--dry-run] \\
        -- --dataset-dir gs://B/data --output-dir gs://B/runs/r1 --epochs 5

Every replica runs the segrec image (the repository's Dockerfile): by
default `REGION-docker.pkg.dev/PROJECT/segrec/segrec:<segrec version>`,
else `--container-image-uri`. `--build-package` / `--package-uri` run the
sdist on a prebuilt TensorFlow container instead (`--executor-image-uri`).
Everything after `--` (and any flag this command does not know) is passed
unchanged to `python -m trainer.task` on every replica.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

from trainer.cli.registry import UserError, command

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # trainer/cli/ -> repo


def _add_vertex_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="vertex_command", metavar="ACTION")
    sub.required = True
    s = sub.add_parser(
        "submit",
        help="submit a custom training job (or print its spec with --dry-run)",
        description="Submit `python -m trainer.task ARGS` as a Vertex AI custom job: worker pool 0 holds "
                    "the chief, pool 1 the other replica_count - 1 workers (MultiWorkerMirroredStrategy). "
                    "Replicas run the segrec image, by default "
                    "REGION-docker.pkg.dev/PROJECT/segrec/segrec:VERSION (build and push it first: k8s/README.md, "
                    "\"The segrec image\"). Everything after `--`, and unknown flags, are the job's args.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = s.add_argument_group("project")
    where.add_argument("--project", required=True, help="Google Cloud project")
    where.add_argument("--region", required=True, help="Vertex AI region, e.g. us-central1")
    where.add_argument("--display-name", help="job name (default: segrec-train-<UTC time>)")
    where.add_argument("--service-account", help="service account the replicas run as")
    where.add_argument("--base-output-dir", help="gs:// dir; Vertex AI sets AIP_MODEL_DIR, AIP_CHECKPOINT_DIR "
                       "and AIP_TENSORBOARD_LOG_DIR under it, which `segrec train` honours")
    where.add_argument("--tensorboard", help="Vertex AI TensorBoard resource "
                       "(projects/P/locations/R/tensorboards/ID); needs --service-account")
    where.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="job label (repeatable)")

    machines = s.add_argument_group("machines")
    machines.add_argument("--machine-type", default="n1-standard-8", help="(default: n1-standard-8)")
    machines.add_argument("--accelerator-type", help="e.g. NVIDIA_TESLA_T4, NVIDIA_L4, NVIDIA_TESLA_A100")
    machines.add_argument("--accelerator-count", type=int, help="GPUs per replica (default: 1 with "
                          "--accelerator-type, else 0)")
    machines.add_argument("--replica-count", type=int, default=1, help="machines in all: 1 chief + N-1 workers")

    code = s.add_argument_group("code: the segrec image (default), or a package on a prebuilt container")
    code.add_argument("--container-image-uri", help="the segrec image (built from the repository's Dockerfile) "
                      "or another with segrec installed; default: "
                      "REGION-docker.pkg.dev/PROJECT/segrec/segrec:<installed segrec version>, "
                      "Artifact Registry in the job's --project and --region")
    code.add_argument("--package-uri", help="instead of an image: gs:// URI of a segrec sdist, run on "
                      "--executor-image-uri")
    code.add_argument("--build-package", action="store_true", help="instead of an image: build the sdist from "
                      "this checkout and upload it under --staging-bucket (dry run: build only, show the would-be "
                      "URI)")
    code.add_argument("--staging-bucket", help="gs://bucket for the package and Vertex AI staging")
    code.add_argument("--executor-image-uri", help="prebuilt container that runs the package (default: Vertex "
                      "AI's TensorFlow 2.17 CPU or GPU training image; pip installs TensorFlow 2.20 over it)")
    code.add_argument("--python-module", default="trainer.task", help="(default: trainer.task)")

    s.add_argument("--dry-run", action="store_true", help="print the job spec JSON; no credentials, no network")
    s.add_argument("--no-wait", action="store_true", help="return once the job is created")
    # The generic description (Beam options) does not apply: rewrite it.
    p.description = "Vertex AI custom training jobs. Unknown flags and args after `--` go to trainer.task."


# beam=True only makes the dispatcher hand this command its unknown flags
# (here: the job's args for trainer.task); nothing runs on Beam.
@command("vertex", "Run training on Vertex AI: `segrec vertex submit ... -- TRAIN ARGS`.", beam=True)(_add_vertex_args)
def run_vertex(args: argparse.Namespace, extra_args) -> int:
    if args.vertex_command == "submit":
        return run_submit(args, list(extra_args or []))
    raise UserError(f"unknown vertex action {args.vertex_command!r}")


def job_args(extra_args) -> tuple:
    """The job's args: unknown flags and everything after `--` (one `--` separator dropped)."""
    extra = list(extra_args)
    if "--" in extra:
        extra.remove("--")
    return tuple(extra)


def _labels(entries) -> tuple:
    labels = []
    for entry in entries:
        if "=" not in entry:
            raise UserError(f"--label {entry!r}: expected KEY=VALUE")
        key, value = entry.split("=", 1)
        labels.append((key, value))
    return tuple(labels)


def container_image(args: argparse.Namespace, package_uri=None):
    """The image the replicas run: --container-image-uri, else (no package
    asked for) the segrec image in the job's project and region."""
    if args.container_image_uri or package_uri or args.package_uri or args.executor_image_uri:
        return args.container_image_uri  # the package path, or a mix that validate() names
    from trainer.training import vertex

    return vertex.default_image_uri(args.project, args.region)


def job_config(args: argparse.Namespace, extra_args, package_uri=None, container_image_uri=None):
    from trainer.training import vertex

    accelerator_count = args.accelerator_count
    if accelerator_count is None:
        accelerator_count = 1 if args.accelerator_type else 0
    name = args.display_name or "segrec-train-" + datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%d-%H%M%S")
    return vertex.VertexJobConfig(
        project=args.project,
        region=args.region,
        display_name=name,
        staging_bucket=args.staging_bucket,
        machine_type=args.machine_type,
        accelerator_type=args.accelerator_type,
        accelerator_count=accelerator_count,
        replica_count=args.replica_count,
        package_uri=package_uri or args.package_uri,
        container_image_uri=container_image_uri or args.container_image_uri,
        python_module=args.python_module,
        executor_image_uri=args.executor_image_uri,
        args=job_args(extra_args),
        service_account=args.service_account,
        tensorboard=args.tensorboard,
        base_output_dir=args.base_output_dir,
        labels=_labels(args.label),
    )


def run_submit(args: argparse.Namespace, extra_args) -> int:
    from trainer.training import vertex

    package_uri = None
    if args.build_package:
        if args.package_uri or args.container_image_uri:
            raise UserError("--build-package builds the package itself: drop --package-uri / --container-image-uri")
        if not args.staging_bucket:
            raise UserError("--build-package needs --staging-bucket gs://BUCKET (where the sdist is uploaded)")
        if not args.staging_bucket.startswith("gs://"):
            raise UserError(f"--staging-bucket must be a gs:// URI, got {args.staging_bucket!r}")
        with tempfile.TemporaryDirectory(prefix="segrec-sdist-") as out:
            sdist = vertex.build_sdist(_REPO_ROOT, out)
            print(f"built {os.path.basename(sdist)}", file=sys.stderr)
            if args.dry_run:
                package_uri = vertex.package_gcs_uri(sdist, args.staging_bucket)
                print(f"dry run: would upload it to {package_uri}", file=sys.stderr)
            else:
                package_uri = _vertex_call(vertex.upload_package, sdist, args.staging_bucket, args.project)
                print(f"uploaded {package_uri}", file=sys.stderr)
    image = container_image(args, package_uri)
    if image and not args.container_image_uri:
        print(f"image: {image} (the default: the segrec image of this project and region; "
              "--container-image-uri to use another)", file=sys.stderr)
    config = job_config(args, extra_args, package_uri=package_uri, container_image_uri=image)
    if config.package_uri and not config.executor_image_uri:
        print(f"note: the package runs on {config.executor_image} (TensorFlow 2.17), over which pip installs "
              "segrec's TensorFlow 2.20; the segrec image (no --build-package / --package-uri) has no such "
              "mismatch", file=sys.stderr)
    if args.dry_run:
        print(_vertex_call(vertex.job_spec_json, config))
        return 0
    job = _vertex_call(vertex.submit, config, not args.no_wait)
    print(f"submitted {job.resource_name} ({config.display_name}, {config.replica_count} replica(s))")
    if not args.no_wait:
        print(f"  state: {job.state.name}")
    return 0


def _vertex_call(fn, *fn_args):
    try:
        return fn(*fn_args)
    except ImportError as err:
        raise UserError(str(err)) from None
