"""FP16 and INT8 graphs of the tiny checkpoints, run on ONNX Runtime CPU against FP32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from resrank_export.errors import ResRankExportError
from resrank_export.export.onnx import graph_specs
from resrank_export.export.parity import _row_cosine
from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration
from resrank_export.precision.graphs import PrecisionConfig, convert_fp16, quantize_int8
from resrank_export.runtime import ort_session, run_session


@pytest.fixture(scope="module", params=["qwen3", "bert"])
def exported(request, tiny_export, tmp_path_factory):
    checkpoint, graphs = tiny_export(reranker=request.param)
    root = tmp_path_factory.mktemp(f"prec-{request.param}")
    build_calibration_set(checkpoint, root / "calib", CalibrationConfig(encoder_samples=16, reranker_queries=8, retrieval_pool=100))
    calib = {spec.name: load_calibration(root / "calib", spec) for spec in graph_specs(checkpoint)}
    # held-out inputs: another seed of the same corpus
    build_calibration_set(checkpoint, root / "held", CalibrationConfig(encoder_samples=16, reranker_queries=4, seed=9, retrieval_pool=100))
    held = {spec.name: load_calibration(root / "held", spec) for spec in graph_specs(checkpoint)}
    return checkpoint, graphs, calib, held, root


def _io_types(path):
    graph = onnx.load(str(path)).graph
    return [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_precision_graphs_track_fp32_and_keep_io(exported, precision):
    checkpoint, graphs, calib, held, root = exported
    for name, src in graphs.items():
        dst = root / precision / f"{name}.onnx"
        make = convert_fp16 if precision == "fp16" else quantize_int8
        report = make(src, dst, calib[name], PrecisionConfig(calibration_method="max"))
        assert _io_types(dst) == _io_types(src)
        ref = run_session(ort_session(src), held[name])[0]
        got = run_session(ort_session(dst), held[name])[0]
        floor = 0.999 if precision == "fp16" else 0.95
        assert _row_cosine(ref, got).min() > floor, (name, precision)
        if precision == "fp16":
            kept = report["nodes"]["fp32"]
            assert report["nodes"]["fp16"].get("MatMul", 0) > 0
            assert kept.get("Softmax", 0) + kept.get("LayerNormalization", 0) + kept.get("ReduceMean", 0) > 0
            assert set(kept) & {"ReduceL2", "ReduceSum"}
        else:
            assert report["quantize_nodes"] > 0 and not np.array_equal(ref, got)


def test_int8_exclusions_leave_those_nodes_unquantized(exported):
    _, graphs, calib, _, root = exported
    full = quantize_int8(graphs["encoder"], root / "x" / "full.onnx", calib["encoder"], PrecisionConfig("max"))
    fewer = quantize_int8(graphs["encoder"], root / "x" / "fewer.onnx", calib["encoder"],
                          PrecisionConfig("max", int8_exclude_ops=("MatMul",)))
    assert fewer["quantize_nodes"] < full["quantize_nodes"]
    model = onnx.load(str(root / "x" / "fewer.onnx"))
    produced_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and not any(i in produced_by_dq for n in matmuls for i in n.input)


def test_unknown_method_is_a_typed_error(exported):
    _, graphs, calib, _, root = exported
    with pytest.raises(ResRankExportError, match="'percentile'.*entropy, max"):
        quantize_int8(graphs["encoder"], root / "y.onnx", calib["encoder"], PrecisionConfig("percentile"))
