"""Graphs fused for ONNX Runtime (`build --ort-optimize`): `onnxscript.rewriter.ort_fusions`
rewrites the exported graphs into ORT's contrib kernels (Attention, MultiHeadAttention,
SkipLayerNormalization, BiasGelu, RMSNorm, RotaryEmbedding) and writes them as
`onnx/<precision>/<graph>.ort.onnx` beside the portable graphs, which TensorRT keeps (the
contrib ops are ORT-only). ORT's own transformer optimizer matches the TorchScript exporter's
patterns, not the dynamo exporter's; onnxscript's fusions are written for the latter.

Also the record of which kernels an ORT CPU session really runs: the session's optimized model
(SessionOptions.optimized_model_filepath) counted by op type, so a Q/DQ graph is shown to run as
integer kernels (MatMulIntegerToFloat, QLinearMatMul, ...) rather than dequantize + FP32 MatMul."""

from __future__ import annotations

import collections
import logging
import tempfile
from pathlib import Path

from resrank_export.errors import ResRankExportError
from resrank_export.export.half import EXTERNAL_DATA_THRESHOLD
from resrank_export.lazy import require

log = logging.getLogger(__name__)
ORT_SUFFIX = ".ort.onnx"
# The fused ORT kernels reported per graph (op types, any domain).
FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization", "BiasGelu",
             "FastGelu", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding")
# ORT CPU kernels that compute a GEMM on integers.
INTEGER_GEMM_OPS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm")


def ort_graph_path(graph: Path) -> Path:
    """onnx/<precision>/encoder.onnx -> onnx/<precision>/encoder.ort.onnx"""
    graph = Path(graph)
    return graph.with_name(graph.name.removesuffix(".onnx") + ORT_SUFFIX)


def op_counts(model, op_types: tuple[str, ...]) -> dict[str, int]:
    """{op type: count} of `op_types` present in an onnx ModelProto (zeros left out)."""
    counts = collections.Counter(node.op_type for node in model.graph.node if node.op_type in op_types)
    return dict(sorted(counts.items()))


def fuse_for_ort(src: Path, dst: Path) -> dict:
    """Writes `src` with onnxscript's ORT fusions applied to `dst`; returns {"fusions": {rule: times
    applied}, "fused_ops": {op type: count in the written graph}, "nodes": [before, after]}."""
    ir = require("onnx_ir", "ORT graph fusion")
    fusions = require("onnxscript.rewriter.ort_fusions", "ORT graph fusion")
    onnx = require("onnx", "ORT graph fusion")
    if not hasattr(fusions, "optimize_for_ort"):
        raise ResRankExportError("onnxscript has no rewriter.ort_fusions.optimize_for_ort; "
                                 "pip install 'onnxscript>=0.7' for --ort-optimize")
    model = ir.load(str(src))
    before = sum(1 for _ in model.graph)
    model, applied = fusions.optimize_for_ort(model)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for old in dst.parent.glob(f"{dst.name}*"):
        old.unlink()
    ir.save(model, str(dst), external_data=f"{dst.name}.data" if weights > EXTERNAL_DATA_THRESHOLD else None)
    written = onnx.load(str(dst), load_external_data=False)
    report = {"fusions": {rule: n for rule, n in sorted(applied.items()) if n},
              "fused_ops": op_counts(written, FUSED_OPS), "nodes": [before, len(written.graph.node)]}
    log.info("ort fusion %s: %s (%d -> %d nodes)", dst.name, report["fused_ops"], *report["nodes"])
    return report


def session_kernels(graph: Path) -> dict[str, int]:
    """{op type: count} of the fused and integer kernels in the model an ORT CPU session runs
    (all graph optimisations, this machine's kernels), read from the session's optimized model."""
    ort = require("onnxruntime", "ORT session kernels")
    onnx = require("onnx", "ORT session kernels")
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(optimized), load_external_data=False)
    return op_counts(model, (*FUSED_OPS, *INTEGER_GEMM_OPS, "MatMul", "DequantizeLinear"))


def make_ort_graphs(graphs: dict[str, Path]) -> dict[str, dict]:
    """Each graph of {name: onnx/<precision>/<name>.onnx} fused beside it as <name>.ort.onnx;
    {name: fusion report with the session's kernels of the plain and the fused graph}."""
    reports = {}
    for name, graph in graphs.items():
        fused = ort_graph_path(graph)
        report = fuse_for_ort(graph, fused)
        report["session_kernels"] = {"plain": session_kernels(graph), "fused": session_kernels(fused)}
        reports[name] = report
    return reports
