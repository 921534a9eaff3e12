"""SmoothQuant (Xiao et al., 2023) on an ONNX graph, before ModelOpt places the INT8 Q/DQ nodes.

LayerNorm/RMSNorm outputs carry a few outlier channels (all-MiniLM-L6-v2: per-channel maxima
0.8-30 on the input of the FFN up-projection), so one per-tensor INT8 scale leaves the other
channels a handful of levels. Dividing the GEMM's input by a per-channel factor s and
multiplying the weight's rows by s is exact in FP32 and moves the outliers into the weights,
whose INT8 scales are per output channel. Written here because ModelOpt's ONNX INT8 path has
no smoothing (its PyTorch path does, for a different export route) and ONNX Runtime's needs
Intel Neural Compressor. The divisor is an explicit Mul on the GEMM's edge only: in post-LN
BERT the normalisation output is also the residual stream, so folding 1/s into its gamma
would change the model.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np

from resrank_export.lazy import require
from resrank_export.runtime import ort_session, run_session

log = logging.getLogger(__name__)


def smoothable_groups(model, gemm_names: set[str]) -> dict[str, list]:
    """{activation tensor: [MatMul nodes]} for the named MatMuls whose weight is a 2-D initializer
    used by no other node (a tied weight cannot take two different row scalings)."""
    weights = {init.name: init for init in model.graph.initializer}
    users = collections.Counter(name for node in model.graph.node for name in node.input)
    groups: dict[str, list] = {}
    for node in model.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if node.name in gemm_names and weight is not None and len(weight.dims) == 2 and users[weight.name] == 1:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def probe_runs(graph: Path, tensors: list[str], batches: list[dict[str, np.ndarray]], what: str):
    """Yields (inputs, {tensor: value}) for each calibration batch, `tensors` computed on ONNX
    Runtime: a probe graph beside `graph` declares them as outputs and reads `graph`'s own
    external-data file, so no second copy of the weights is made (at 0.6B a copy is 2.4 GB)."""
    onnx = require("onnx", what)
    graph = Path(graph)
    probe = onnx.load(str(graph), load_external_data=False)
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in tensors if name not in declared)
    probe_path = graph.with_name(f".{graph.stem}.probe.onnx")
    onnx.save(probe, str(probe_path))
    del probe
    wanted = set(tensors)
    try:
        session = ort_session(probe_path)
        names = [o.name for o in session.get_outputs()]
        for inputs in batches:
            yield inputs, {name: value for name, value in zip(names, run_session(session, inputs)) if name in wanted}
    finally:
        probe_path.unlink(missing_ok=True)


def channel_absmax(graph: Path, tensors: list[str], batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of `tensors` over the calibration batches (`probe_runs`)."""
    amax = {name: None for name in tensors}
    for _, outputs in probe_runs(graph, tensors, batches, "SmoothQuant"):
        for name, value in outputs.items():
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            amax[name] = peak if amax[name] is None else np.maximum(amax[name], peak)
    return amax


def smooth_gemm_inputs(model, gemm_names: set[str], amax: dict[str, np.ndarray], alpha: float) -> dict:
    """Rewrites `model` in place: s_j = max|x_j|^alpha / max|w_j|^(1-alpha) per input channel j
    (weights of all GEMMs sharing the input together), x / s on each GEMM edge, w_j * s_j; `amax`
    is `channel_absmax` of the `smoothable_groups` inputs."""
    numpy_helper = require("onnx", "SmoothQuant").numpy_helper
    groups = smoothable_groups(model, gemm_names)
    if not groups:
        return {"alpha": alpha, "gemms": 0, "inputs": 0}
    weights = {init.name: init for init in model.graph.initializer}
    scales = {}
    for tensor, nodes in groups.items():
        wmax = np.max([np.abs(numpy_helper.to_array(weights[n.input[1]])).max(axis=1) for n in nodes], axis=0)
        usable = (amax[tensor] > 0) & (wmax > 0)
        scales[tensor] = np.ones_like(wmax, dtype=np.float32)
        scales[tensor][usable] = amax[tensor][usable] ** alpha / wmax[usable] ** (1 - alpha)
    scale_gemm_inputs(model, groups, scales, "smoothquant")
    largest = max(float(scale.max()) for scale in scales.values())
    report = {"alpha": alpha, "gemms": sum(len(n) for n in groups.values()), "inputs": len(groups),
              "max_scale": largest}
    log.info("smoothquant: %d GEMMs over %d inputs, alpha %.2f, largest factor %.1f", report["gemms"],
             report["inputs"], alpha, largest)
    return report


def scale_gemm_inputs(model, groups: dict[str, list], scales: dict[str, np.ndarray], tag: str) -> None:
    """Rewrites `model` in place, exactly in FP32: for each input tensor of `groups` (as
    `smoothable_groups` gives them) with a factor s per channel in `scales`, one Mul(x, 1/s) on
    the GEMMs' edge (named `<tensor>_<tag>`) and each GEMM's weight rows multiplied by s."""
    onnx = require("onnx", "scaling GEMM inputs")
    numpy_helper = onnx.numpy_helper
    weights = {init.name: init for init in model.graph.initializer}
    first_user = {}
    for tensor, scale in scales.items():
        nodes = groups[tensor]
        for node in nodes:
            w = numpy_helper.to_array(weights[node.input[1]])
            weights[node.input[1]].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(w.dtype), node.input[1]))
        divisor, scaled = f"{tensor}_{tag}_inv", f"{tensor}_{tag}"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), divisor))
        first_user[nodes[0].output[0]] = onnx.helper.make_node("Mul", [tensor, divisor], [scaled],
                                                               name=f"{tensor}_{tag}_mul")
        for node in nodes:
            node.input[0] = scaled
    ordered = []
    for node in model.graph.node:  # each Mul goes right before its first GEMM: topological order kept
        if node.output[0] in first_user:
            ordered.append(first_user[node.output[0]])
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        ordered.append(kept)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
