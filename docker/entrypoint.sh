#!/usr/bin/env bash
# Container entrypoint: build the TensorRT plans this GPU lacks (missing, built by another
# TensorRT release or for another GPU architecture, or from a changed graph), install them into
# the Triton repository, then serve it. The decisions live in `resrank-export engines ensure`,
# which is tested on CPU; this script only wires the environment to it.
set -euo pipefail

BUILD="${RESRANK_BUILD:-/opt/resrank/build}"
REPOSITORY="${RESRANK_REPOSITORY:-/opt/resrank/repository}"
PRECISION="${RESRANK_PRECISION:-fp16}"
PYTHON="${PYTHON:-python3}"
TRITONSERVER="${TRITONSERVER:-tritonserver}"

"$PYTHON" -m resrank_export engines ensure \
    --build "$BUILD" \
    --precision "$PRECISION" \
    --repository "$REPOSITORY" \
    --max-batch "${RESRANK_MAX_BATCH:-8}" \
    --workspace "${RESRANK_WORKSPACE:-4GiB}"

exec "$TRITONSERVER" --model-repository="$REPOSITORY" "$@"
