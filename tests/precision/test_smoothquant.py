"""SmoothQuant graph rewrite and the INT8 Q/DQ post-pass, checked numerically on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from resrank_export.errors import ResRankExportError
from resrank_export.export.onnx import graph_specs
from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration
from resrank_export.precision.graphs import PrecisionConfig, calibration_batches, quantize_int8
from resrank_export.precision.smoothquant import channel_absmax, smooth_gemm_inputs, smoothable_groups
from resrank_export.runtime import ort_session, run_session

CHANNELS = 64


def _outlier_activations(seed: int, samples: int = 16) -> np.ndarray:
    """Activations like a LayerNorm output: two channels 40x larger than the rest."""
    x = np.random.default_rng(seed).standard_normal((samples, 12, CHANNELS)).astype(np.float32)
    x[..., [3, 17]] *= 40
    return x


@pytest.fixture(scope="module")
def gemm_with_residual(tmp_path_factory):
    """y = x @ W and z = x + y: x feeds a quantized GEMM and an unquantized Add, as the
    LayerNorm output does in post-LN BERT."""
    w = np.random.default_rng(1).standard_normal((CHANNELS, CHANNELS)).astype(np.float32) / 8
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="gemm"),
         helper.make_node("Add", ["x", "y"], ["z"], name="residual")],
        "gemm_with_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", CHANNELS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", CHANNELS]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "sequence", CHANNELS])],
        [numpy_helper.from_array(w, "w")])
    path = tmp_path_factory.mktemp("smooth") / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _int8_outputs(src, tmp_path, name, config):
    dst = tmp_path / f"{name}.onnx"
    report = quantize_int8(src, dst, {"x": _outlier_activations(0)}, config)
    y, z = ort_session(dst).run(None, {"x": _outlier_activations(7)})
    return report, y, z


def test_smoothing_cuts_int8_error_on_outlier_channels(gemm_with_residual, tmp_path):
    reference = ort_session(gemm_with_residual).run(None, {"x": _outlier_activations(7)})[0]
    _, plain, _ = _int8_outputs(gemm_with_residual, tmp_path, "plain", PrecisionConfig("max", int8_smoothquant_alpha=None))
    report, smoothed, _ = _int8_outputs(gemm_with_residual, tmp_path, "smoothed", PrecisionConfig("max"))
    assert report["smoothquant"]["gemms"] == 1
    plain_error = np.abs(plain - reference).mean()
    smoothed_error = np.abs(smoothed - reference).mean()
    assert smoothed_error < plain_error / 2, (plain_error, smoothed_error)


def test_unquantized_consumer_reads_the_fp32_tensor(gemm_with_residual, tmp_path):
    """z - y must be x itself, not x rounded to INT8 (the Add is not quantized)."""
    report, y, z = _int8_outputs(gemm_with_residual, tmp_path, "residual",
                                 PrecisionConfig("max", int8_smoothquant_alpha=None))
    assert report["fp32_consumers_rewired"] == 1
    np.testing.assert_allclose(z - y, _outlier_activations(7), atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_alpha_outside_unit_interval_is_a_typed_error(gemm_with_residual, tmp_path, alpha):
    with pytest.raises(ResRankExportError, match="SmoothQuant alpha"):
        quantize_int8(gemm_with_residual, tmp_path / "x.onnx", {"x": _outlier_activations(0)},
                      PrecisionConfig(int8_smoothquant_alpha=alpha))


@pytest.mark.parametrize("reranker", ["qwen3", "bert"])
def test_smoothing_keeps_the_fp32_graphs_outputs(tiny_export, tmp_path, reranker):
    """The rewrite alone (no quantization) must not change what either graph computes."""
    checkpoint, graphs = tiny_export(reranker=reranker)
    build_calibration_set(checkpoint, tmp_path / "calib", CalibrationConfig(encoder_samples=8, reranker_queries=8,
                                                                            retrieval_pool=100))
    for spec in graph_specs(checkpoint):
        calibration = load_calibration(tmp_path / "calib", spec)
        model = onnx.load(str(graphs[spec.name]))
        before = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
        gemms = {n.name for n in model.graph.node if n.op_type == "MatMul"}
        amax = channel_absmax(graphs[spec.name], list(smoothable_groups(model, gemms)), calibration_batches(calibration))
        report = smooth_gemm_inputs(model, gemms, amax, alpha=0.5)
        assert report["gemms"] > 0, spec.name
        changed = [i.name for i in model.graph.initializer
                   if i.name in before and not np.array_equal(before[i.name], numpy_helper.to_array(i))]
        assert len(changed) == report["gemms"], spec.name
        onnx.checker.check_model(model)
        smoothed = tmp_path / f"{spec.name}-smoothed.onnx"
        onnx.save(model, str(smoothed))
        ref = run_session(ort_session(graphs[spec.name]), calibration)[0]
        got = run_session(ort_session(smoothed), calibration)[0]
        np.testing.assert_allclose(got, ref, atol=2e-5 * max(1.0, float(np.abs(ref).max())), err_msg=spec.name)
