#!/usr/bin/env bash
# For a machine with TensorRT, an NVIDIA GPU and ModelOpt (pip install 'resrank-export[precision]'
# tensorrt): builds FP16 and INT8 engines of the demo checkpoint, compares their outputs with
# ONNX Runtime on the same graphs (the fidelity report's gates) and times both; prints a table.
# Usage: scripts/gpu_check.sh [work folder]   (exit code 1 when a gate fails)
set -euo pipefail

WORK="${1:-${TMPDIR:-/tmp}/resrank-gpu-check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader
"$PYTHON" -c "import tensorrt; print('TensorRT', tensorrt.__version__)"

for precision in fp16 int8; do
    "$PYTHON" -m resrank_export build --precision "$precision" --backend tensorrt --out "$WORK/$precision"
done
"$PYTHON" -m resrank_export engines check "$WORK/fp16:fp16" "$WORK/int8:int8" --report "$WORK/gpu_check.json"
