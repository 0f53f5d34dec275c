#!/bin/sh
# Entry point of the segrec image (Dockerfile at the repository root).
#
#   docker run IMAGE ARGS        runs `segrec ARGS`
#
# The same image is the Dataflow SDK container of `segrec score` /
# `segrec preprocess` on Dataflow (--sdk_container_image). Dataflow starts an
# SDK container with the Beam worker's flags (--id=..., --logging_endpoint=...,
# --provision_endpoint=..., ...) and needs Beam's boot binary to run them;
# --provision_endpoint is one that boot requires and segrec never takes, so
# its presence routes the call to boot.
set -eu

BEAM_BOOT="${SEGREC_BEAM_BOOT:-/opt/apache/beam/boot}"

for arg in "$@"; do
  case "$arg" in
    --provision_endpoint=*|--provision_endpoint)
      exec "$BEAM_BOOT" "$@"
      ;;
  esac
done
exec segrec "$@"
