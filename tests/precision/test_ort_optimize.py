"""ORT-fused graphs (onnxscript's ort_fusions) and integer INT8 kernels on the tiny checkpoint
(BERT encoder, Qwen3 reranker): fused graphs against the plain graphs and the PyTorch reference,
kernels counted in ONNX Runtime's own optimized model."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from resrank_export.export.onnx import graph_specs
from resrank_export.export.parity import ParityConfig, check_parity
from resrank_export.model.reference import ResRankReference
from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration
from resrank_export.precision.graphs import PrecisionConfig, merge_shared_input_gemms, quantize_int8
from resrank_export.precision.ort_optimize import make_ort_graphs, ort_graph_path, session_kernels
from resrank_export.runtime import ort_session, run_session

pytest.importorskip("onnxscript.rewriter.ort_fusions")

# Fusions the tiny graphs must get (the demo graphs get the same kinds; docs/precision.md).
EXPECTED = {"encoder": ("Attention", "SkipLayerNormalization", "BiasGelu"),
            "reranker": ("MultiHeadAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")}


@pytest.fixture(scope="module")
def copied(tiny_export, tmp_path_factory):
    """The tiny graphs copied (fused files go beside them) with calibration inputs for both."""
    checkpoint, graphs = tiny_export()
    root = tmp_path_factory.mktemp("ort")
    local = {}
    for name, path in graphs.items():
        local[name] = root / "fp32" / path.name
        local[name].parent.mkdir(exist_ok=True)
        shutil.copyfile(path, local[name])
    build_calibration_set(checkpoint, root / "calib", CalibrationConfig(encoder_samples=16, reranker_queries=8,
                                                                        retrieval_pool=100))
    calib = {spec.name: load_calibration(root / "calib", spec) for spec in graph_specs(checkpoint)}
    return checkpoint, local, calib, root


def test_fused_graphs_fuse_and_pass_the_parity_gate(copied):
    checkpoint, graphs, calib, _ = copied
    reports = make_ort_graphs(graphs)
    fused = {name: ort_graph_path(path) for name, path in graphs.items()}
    for name, ops in EXPECTED.items():
        for op in ops:
            assert reports[name]["fused_ops"].get(op, 0) > 0, (name, op, reports[name]["fused_ops"])
            assert reports[name]["session_kernels"]["fused"].get(op, 0) > 0, (name, op)
        assert reports[name]["nodes"][1] < reports[name]["nodes"][0]
        plain = run_session(ort_session(graphs[name]), calib[name])[0]
        got = run_session(ort_session(fused[name]), calib[name])[0]
        assert np.abs(plain - got).max() <= ParityConfig().gate("fp32").atol, name
    report = check_parity(ResRankReference(checkpoint), fused, ParityConfig())  # raises ParityError on failure
    assert report["passed"]


def test_gemm_merge_is_exact_in_fp32(copied, tmp_path):
    _, graphs, calib, _ = copied
    for name, path in graphs.items():
        model = onnx.load(str(path))
        merged = merge_shared_input_gemms(model, {n.name for n in model.graph.node if n.op_type == "MatMul"})
        assert merged and all(len(members) > 1 for members in merged.values())
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        plain = run_session(ort_session(path), calib[name])[0]
        got = run_session(ort_session(tmp_path / f"{name}.onnx"), calib[name])[0]
        assert np.abs(plain - got).max() < 1e-5, name


def test_int8_encoder_runs_every_quantized_gemm_as_an_integer_kernel(copied):
    _, graphs, calib, root = copied
    int8 = root / "int8" / "encoder.onnx"
    report = quantize_int8(graphs["encoder"], int8, calib["encoder"],
                           PrecisionConfig(calibration_method="max", int8_cpu_integer_kernels=True))
    assert report["merged_gemms"] and report["seven_bit_weights"] > 0
    model = onnx.load(str(int8))
    weights = {i.name for i in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] in weights for n in model.graph.node if n.op_type == "DequantizeLinear"}
    # INT8 weights (stored) and INT8 activations (Q/DQ); the FFN down-projections are weight-only
    quantized_gemms = [n for n in model.graph.node if n.op_type == "MatMul" and dequantized.get(n.input[1]) is True
                       and dequantized.get(n.input[0]) is False]
    kernels = session_kernels(int8)
    assert quantized_gemms and kernels.get("MatMulIntegerToFloat", 0) == len(quantized_gemms), kernels
    fused = make_ort_graphs({"encoder": int8})["encoder"]
    assert fused["session_kernels"]["fused"].get("MatMulIntegerToFloat", 0) == len(quantized_gemms)


ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


@pytest.mark.parametrize("name", ["encoder", "reranker"])
def test_int8_graphs_get_the_attention_fusions_of_fp32(copied, name):
    """ModelOpt renames every dim of the INT8 graph; with the FP32 graph's shapes restored the
    fusions that need q, k and v to share dims (attention, rotary) fire as they do in FP32, and
    the fused INT8 graph computes what the plain INT8 graph does."""
    _, graphs, calib, root = copied
    int8 = root / "int8-fusion" / f"{name}.onnx"
    report = quantize_int8(graphs[name], int8, calib[name], PrecisionConfig(calibration_method="max"))
    assert report["value_shapes_restored"] > 0
    fp32_ops = make_ort_graphs({name: graphs[name]})[name]["fused_ops"]
    int8_ops = make_ort_graphs({name: int8})[name]["fused_ops"]
    attention = sum(int8_ops.get(op, 0) for op in ATTENTION_OPS)
    assert attention == sum(fp32_ops.get(op, 0) for op in ATTENTION_OPS) > 0, (fp32_ops, int8_ops)
    assert int8_ops.get("RotaryEmbedding", 0) == fp32_ops.get("RotaryEmbedding", 0), (fp32_ops, int8_ops)
    plain = run_session(ort_session(int8), calib[name])[0]
    fused = run_session(ort_session(ort_graph_path(int8)), calib[name])[0]
    assert np.abs(plain - fused).max() < 1e-4, name
