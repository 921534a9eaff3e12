#!/usr/bin/env bash
# Run whenever a GPU is lent. On a machine with an NVIDIA GPU and ModelOpt
# (pip install 'resrank-export[precision]'):
#  1. the --device cuda stages (export, parity, calibration on the GPU) of the demo checkpoint;
#  2. with TensorRT installed: the engines of every precision this GPU supports (fp16, int8,
#     int8_wo with one scale per output channel, int4_awq, and fp8 at compute capability 8.9+),
#     each compared with ONNX Runtime on the same graphs against its gate in the precision table
#     (`engines check`), one table; without TensorRT, one line saying the engines were skipped.
# Written to finish inside 10 minutes on one GPU (demo-size models).
# Usage: scripts/gpu_check.sh [work folder]   (exit code 1 when a gate fails)
set -euo pipefail

WORK="${1:-${TMPDIR:-/tmp}/resrank-gpu-check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader
CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)"

"$PYTHON" -m resrank_export build --device cuda --precision fp16 --triton-backend none --out "$WORK/device-fp16"

if ! "$PYTHON" -c "import tensorrt" 2>/dev/null; then
    echo "engines: skipped (TensorRT is not installed here; pip install tensorrt to build and check them)"
    exit 0
fi
"$PYTHON" -c "import tensorrt; print('TensorRT', tensorrt.__version__)"

PRECISIONS=(fp16 int8 int8_wo int4_awq)
if awk -v cc="$CC" 'BEGIN { exit !(cc >= 8.9) }'; then
    PRECISIONS+=(fp8)
else
    echo "fp8: skipped (compute capability $CC < 8.9)"
fi
# TensorRT takes INT8 weight-only weights with one scale per output channel only
printf '[int8_wo]\nblock-size = 0\n' > "$WORK/int8_wo.toml"
CHECKS=()
for precision in "${PRECISIONS[@]}"; do
    CONFIG=()
    if [ "$precision" = int8_wo ]; then CONFIG=(--config "$WORK/int8_wo.toml"); fi
    "$PYTHON" -m resrank_export build "${CONFIG[@]}" --precision "$precision" --backend tensorrt --out "$WORK/$precision"
    CHECKS+=("$WORK/$precision:$precision")
done
"$PYTHON" -m resrank_export engines check "${CHECKS[@]}" --report "$WORK/gpu_check.json"
