"""FP16, BF16 and INT8 graphs of the tiny checkpoints against FP32 (ONNX Runtime CPU; BF16 on onnx's
reference evaluator) and BF16 against PyTorch in BF16."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from resrank_export.errors import NotAvailableError, ResRankExportError
from resrank_export.export.onnx import graph_specs
from resrank_export.export.parity import PARITY_GATES, _row_cosine
from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration
from resrank_export.precision import BY_NAME
from resrank_export.precision.graphs import PrecisionConfig, convert_half, quantize_fp8, quantize_int8
from resrank_export.runtime import ReferenceSession, graph_session, is_bfloat16_graph, ort_session, run_session

# Min cosine against the FP32 graph on held-out inputs: FP16 and BF16 at their parity gates, INT8 and
# FP8 at their fidelity gates in the precision table (docs/precision.md,
# tests/precision/test_fidelity.py). Measured on these checkpoints: FP16 >= 0.9999997, BF16 >=
# 0.99989, INT8 >= 0.999996, FP8 >= 0.9998.
MIN_COSINE = {"fp16": PARITY_GATES["fp16"].min_cosine, "bf16": PARITY_GATES["bf16"].min_cosine,
              "int8": BY_NAME["int8"].min_cosine, "fp8": BY_NAME["fp8"].min_cosine}


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


def _convert(precision, src, dst, calibration, config):
    if precision in ("int8", "fp8"):
        return (quantize_int8 if precision == "int8" else quantize_fp8)(src, dst, calibration, config)
    return convert_half(src, dst, calibration, config, precision)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "fp8"])
def test_precision_graphs_track_fp32_and_keep_io(exported, precision):
    checkpoint, graphs, calib, held, root = exported
    for name, src in graphs.items():
        dst = root / precision / f"{name}.onnx"
        report = _convert(precision, src, dst, calib[name], PrecisionConfig(calibration_method="max"))
        assert _io_types(dst) == _io_types(src)
        ref = run_session(ort_session(src), held[name])[0]
        got = run_session(graph_session(dst), held[name])[0]  # bf16: onnx's reference evaluator
        assert _row_cosine(ref, got).min() >= MIN_COSINE[precision], (name, precision, _row_cosine(ref, got).min())
        assert not np.array_equal(ref, got)
        if precision in ("fp16", "bf16"):
            kept = report["nodes"]["fp32"]
            assert report["nodes"][precision].get("MatMul", 0) > 0
            assert not report["nodes"]["bf16" if precision == "fp16" else "fp16"]
            # RMSNorm / LayerNorm, softmax and the final cosine / L2 norm stay FP32
            assert kept.get("Softmax", 0) > 0
            assert kept.get("LayerNormalization", 0) + kept.get("ReduceMean", 0) > 0
            assert set(kept) & {"ReduceL2", "ReduceSum"}
        else:
            assert report["quantize_nodes"] > 0
        if precision == "fp8":  # every quantized weight stored as FP8 levels (no FP32 weight under a DQ)
            model = onnx.load(str(dst))
            weights = {i.name: i.data_type for i in model.graph.initializer}
            dequantized = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
            assert dequantized and {weights[name] for name in dequantized} == {onnx.TensorProto.FLOAT8E4M3FN}
            with pytest.raises(Exception, match="MatMulIntegerToFloat|float8"):
                ort_session(dst)  # ONNX Runtime's full optimizations cannot run it: graph_session's reason


def test_bf16_graphs_match_pytorch_in_bf16(exported):
    """The BF16 graphs (run by onnx's reference evaluator, since ONNX Runtime's CPU provider has no
    BF16 kernels) against the same model run by PyTorch in BF16: closer to it than to nothing, and
    the evaluator itself reproduces ONNX Runtime on the FP32 graph."""
    import torch

    from resrank_export.model.reference import load_encoder, load_reranker

    checkpoint, graphs, calib, held, root = exported
    for name, load in (("encoder", load_encoder), ("reranker", load_reranker)):
        dst = root / "bf16-vs-torch" / f"{name}.onnx"
        convert_half(graphs[name], dst, calib[name], PrecisionConfig(), "bf16")
        feeds = {k: v[:4] for k, v in held[name].items()}
        module = load(checkpoint, torch.bfloat16)
        with torch.inference_mode():
            torch_bf16 = module(*(torch.from_numpy(feeds[i.name]) for i in ort_session(graphs[name]).get_inputs()))
        assert torch_bf16.dtype == torch.float32  # FP32 outputs whatever the weights' dtype
        graph_bf16 = run_session(graph_session(dst), feeds)[0]
        fp32 = run_session(ort_session(graphs[name]), feeds)[0]
        assert _row_cosine(torch_bf16.numpy(), graph_bf16).min() > 0.995, name
        assert np.abs(torch_bf16.numpy() - graph_bf16).max() < 0.05, name
        assert np.abs(torch_bf16.numpy() - fp32).max() > 0, name  # PyTorch really ran in BF16
        evaluated = run_session(ReferenceSession(graphs[name]), feeds)[0]
        np.testing.assert_allclose(evaluated, fp32, atol=1e-5)


def test_bf16_graph_on_onnx_runtime_cpu_is_refused_with_the_file(exported):
    _, graphs, calib, _, root = exported
    dst = root / "bf16-refused" / "encoder.onnx"
    convert_half(graphs["encoder"], dst, calib["encoder"], PrecisionConfig(), "bf16")
    assert is_bfloat16_graph(dst) and not is_bfloat16_graph(graphs["encoder"])
    with pytest.raises(NotAvailableError, match=r"encoder\.onnx: a BF16 graph.*CUDA or TensorRT"):
        ort_session(dst)
    assert isinstance(graph_session(dst), ReferenceSession)


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


def test_calibration_batches_group_by_length_and_cut_only_padding():
    """Every sample once, in runs of similar length, each run as wide as its longest sample: the
    columns cut are padding, the per-candidate inputs are untouched."""
    from resrank_export.precision.graphs import calibration_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=21)
    mask = (np.arange(40)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(5, 100, size=mask.shape), 0)
    slots = rng.integers(0, 40, size=(21, 3))
    batches = calibration_batches({"input_ids": ids, "attention_mask": mask, "slot_positions": slots}, batch=8)
    assert [len(b["input_ids"]) for b in batches] == [8, 8, 5]
    widths = [b["attention_mask"].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True) and widths[0] == lengths.max()  # the largest run first
    seen = []
    for b in batches:
        assert b["attention_mask"].sum(1).max() == b["attention_mask"].shape[1]
        assert b["slot_positions"].shape[1] == 3
        for row_ids, row_mask, row_slots in zip(b["input_ids"], b["attention_mask"], b["slot_positions"]):
            i = next(i for i in range(21) if i not in seen and np.array_equal(slots[i], row_slots)
                     and np.array_equal(ids[i, :len(row_ids)], row_ids))
            seen.append(i)
            assert mask[i, len(row_ids):].sum() == 0 and np.array_equal(mask[i, :len(row_mask)], row_mask)
    assert sorted(seen) == list(range(21))


def test_calibration_runs_are_bounded_by_the_activations_they_keep():
    """Runs hold at most max_tokens tokens (padding included), a sample longer than that alone; the
    token budget is what the quantized GEMMs' inputs and outputs of one run may hold."""
    from onnx import TensorProto, helper, numpy_helper

    from resrank_export.precision.graphs import CALIBRATION_RUN_BYTES, calibration_batches, calibration_tokens_per_run

    lengths = np.array([30, 7, 12, 50, 9, 9, 3])
    mask = (np.arange(50)[None] < lengths[:, None]).astype(np.int64)
    runs = calibration_batches({"input_ids": mask * 7, "attention_mask": mask}, batch=8, max_tokens=25)
    assert [r["attention_mask"].shape for r in runs] == [(1, 50), (1, 30), (2, 12), (2, 9), (1, 3)]
    weights = [numpy_helper.from_array(np.zeros((64, 32), np.float32), "w"),
               numpy_helper.from_array(np.zeros((32, 16), np.float32), "v")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("MatMul", ["y", "v"], ["z"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16])], weights)
    assert calibration_tokens_per_run(helper.make_model(graph)) == CALIBRATION_RUN_BYTES // (4 * (96 + 48))
