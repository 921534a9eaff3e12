"""Weight-only INT8 / INT4 graphs (int8_wo, int4_awq) and the compact storage they share with INT8:
the rounding against a loop written from its definition, ONNX Runtime on the stored graphs against
numpy on the dequantized weights, AWQ against plain rounding on outlier channels, and the demo
encoder's graphs against FP32 on held-out passages under the precision table's gates."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from resrank_export.errors import InputDataError, ResRankExportError
from resrank_export.export.half import graph_file_bytes
from resrank_export.export.parity import _row_cosine
from resrank_export.precision import precision_row
from resrank_export.precision.compact import compact_embeddings, dequantize_blocks, quantize_blocks, store_weights
from resrank_export.precision.weight_only import (DEFAULT_CONFIGS, WeightOnlyConfig, awq_scale, default_block_size,
                                                  quantize_weight_only)
from resrank_export.runtime import ort_session, run_session


def _reference_levels(weight, bits, block):
    """quantize_blocks written as a loop over the blocks of each output column, from the definition:
    scale = max(largest / levels, -smallest / (levels + 1)), q = clip(round(w / scale))."""
    levels = 2 ** (bits - 1) - 1
    k, n = weight.shape
    step = block or k
    q = np.zeros((k, n), dtype=np.int8)
    scales = np.zeros((-(-k // step), n), dtype=np.float32)
    for b, start in enumerate(range(0, k, step)):
        for j in range(n):
            column = weight[start:start + step, j]
            scale = max(column.max() / levels, -column.min() / (levels + 1)) or 1.0
            scales[b, j] = scale
            q[start:start + step, j] = np.clip(np.rint(column / np.float32(scale)), -levels - 1, levels)
    return q, (scales[0] if block == 0 else scales)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 16), (8, 0), (8, 64)])
def test_rounding_matches_its_definition_and_stays_within_half_a_step(bits, block):
    rng = np.random.default_rng(bits + block)
    weight = rng.normal(size=(100, 24)).astype(np.float32)  # 100 rows: the last block is short
    weight[:, 3] = 0  # an all-zero column keeps a usable scale
    q, scale = quantize_blocks(weight, bits, block)
    ref_q, ref_scale = _reference_levels(weight, bits, block)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    assert np.abs(q.astype(int) - ref_q.astype(int)).max() <= 1  # rounding ties of float32 division only
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1 and (scale > 0).all()
    step = np.repeat(scale, block, axis=0)[:100] if block else scale
    assert (np.abs(dequantize_blocks(q, scale, block) - weight) <= step / 2 + 1e-6).all()


def _matmul_graph(path, weight, table=None):
    """x [B, K] @ W, plus (with `table`) a Gather of ids from the table as a second output."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", weight.shape[0]])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", weight.shape[1]])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="gemm")]
    inits = [numpy_helper.from_array(weight, "w")]
    if table is not None:
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"]))
        outputs.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["b", table.shape[1]]))
        nodes.append(helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup", axis=0))
        inits.append(numpy_helper.from_array(table, "table"))
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    return model


@pytest.mark.parametrize("bits,block", [(4, 32), (8, 0)])
def test_stored_weights_run_on_onnx_runtime_as_their_dequantized_values(tmp_path, bits, block):
    """The DequantizeLinear + MatMul form on ONNX Runtime equals numpy on the dequantized weight, the
    file holds the levels (INT4 two to a byte), and ORT runs INT4 blocks as MatMulNBits."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(256, 64)).astype(np.float32)
    x = rng.normal(size=(5, 256)).astype(np.float32)
    model = _matmul_graph(tmp_path / "g.onnx", weight)
    store_weights(model, {"w": (bits, block)})
    onnx.checker.check_model(model)
    stored = {i.name: i for i in model.graph.initializer}
    assert "w" not in stored and stored["w_q"].data_type == (TensorProto.INT4 if bits == 4 else TensorProto.INT8)
    assert len(stored["w_q"].raw_data) == weight.size * bits // 8
    onnx.save(model, str(tmp_path / "q.onnx"))
    import onnxruntime as ort

    # FP32 compute in ORT's fused kernel (accuracy level 1): exactly the graph's W4A32 / W8A32 product
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    expected = x @ dequantize_blocks(*quantize_blocks(weight, bits, block), block)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-4)
    if bits == 4:
        assert [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node] == ["MatMulNBits"]
        # the default session (ours) quantizes the activations to INT8 inside MatMulNBits: close, not equal
        got = run_session(ort_session(tmp_path / "q.onnx"), {"x": x})[0]
        assert _row_cosine(got, expected).min() > 0.999


@pytest.mark.parametrize("storage", ["int8", "fp16"])
def test_embedding_table_stored_compactly_gathers_the_rounded_rows(tmp_path, storage):
    rng = np.random.default_rng(1)
    table = (rng.normal(size=(4096, 256)) * rng.uniform(0.1, 3, size=(4096, 1))).astype(np.float32)
    model = _matmul_graph(tmp_path / "g.onnx", np.eye(8, dtype=np.float32), table)
    assert compact_embeddings(model, storage) == ["table"]
    onnx.save(model, str(tmp_path / "e.onnx"))
    ids = np.array([0, 17, 4095, 17], dtype=np.int64)
    rows = run_session(ort_session(tmp_path / "e.onnx"), {"x": np.zeros((4, 8), np.float32), "ids": ids})[1]
    if storage == "fp16":
        expected = table[ids].astype(np.float16).astype(np.float32)
    else:
        scale = np.abs(table[ids]).max(axis=1, keepdims=True) / 127
        expected = np.clip(np.rint(table[ids] / scale), -127, 127) * scale
    np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-7)
    assert graph_file_bytes(tmp_path / "e.onnx") < table.nbytes * (0.27 if storage == "int8" else 0.52)


def test_awq_beats_plain_rounding_where_activations_have_outlier_channels():
    """Two input channels carrying 40x the others' activations: the searched scales cut the GEMM's
    output error against plain rounding (alpha 0, which the search also tries)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(512, 128)).astype(np.float32)
    x[:, [5, 77]] *= 40
    weight = rng.normal(size=(128, 96)).astype(np.float32)

    def error(scale):
        q, step = quantize_blocks(weight * scale[:, None], 4, 32)
        return np.square(x @ (dequantize_blocks(q, step, 32) / scale[:, None]) - x @ weight).sum()

    scale, alpha = awq_scale(x, weight, 4, 32)
    assert alpha > 0
    assert error(scale) < 0.7 * error(np.ones(128, np.float32))


def test_config_checks_and_the_toml_table():
    with pytest.raises(ResRankExportError, match="INT4 weights need a block size"):
        WeightOnlyConfig(block_size=0).check(4)
    with pytest.raises(ResRankExportError, match="power of two"):
        WeightOnlyConfig(block_size=48).check(4)
    config = WeightOnlyConfig.from_table("int4_awq", {"block-size": 64, "method": "rtn"}, "b.toml")
    assert (config.block_size, config.method, config.embedding) == (64, "rtn", "int8")
    assert WeightOnlyConfig.from_table("int4_awq", config.to_table(), "b.toml") == config
    assert WeightOnlyConfig.from_table("int4_awq", {"block-size": "auto"}, "b.toml").block_size is None
    for table, message in (({"block": 64}, r"b.toml: \[int4_awq\] unknown key 'block'"),
                           ({"block-size": 64.0}, r"b.toml: \[int4_awq\] block-size = 64.0: expected int"),
                           ({"ffn-down-int8": 1}, r"ffn-down-int8 = 1: expected bool"),
                           ({"method": "gptq"}, r"b.toml: \[int4_awq\] weight-only method 'gptq'"),
                           ({"block-size": 2**40}, r"block size 1099511627776: expected 0 .* from 16 to 4096"),
                           ({"awq-tokens": 10**12}, r"AWQ tokens 1000000000000: expected 16 to 8192")):
        with pytest.raises(InputDataError, match=message):
            WeightOnlyConfig.from_table("int4_awq", table, "b.toml")
    assert (default_block_size(384), default_block_size(1024)) == (32, 128)


@pytest.fixture(scope="module")
def demo_graphs(demo_export, scifact_dir, tmp_path_factory):
    """The demo's FP32 graphs, a calibration set of the embedded corpus, and held-out inputs: SciFact
    passages (never calibrated on) tokenized as the encoder reads them."""
    from resrank_export.export.onnx import graph_specs
    from resrank_export.model.reference import passage_tokenizer
    from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration

    checkpoint, graphs = demo_export
    root = tmp_path_factory.mktemp("weight-only")
    build_calibration_set(checkpoint, root / "calib", CalibrationConfig(encoder_samples=32, reranker_queries=4),
                          graphs["encoder"])
    calibration = {spec.name: load_calibration(root / "calib", spec) for spec in graph_specs(checkpoint)}
    texts = [json.loads(line)["text"] for line in (scifact_dir / "corpus.jsonl").read_text().splitlines()[-96:]]
    held = passage_tokenizer(checkpoint)(texts)
    return graphs, calibration, held, root


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8_wo", "int4_awq"])
def test_demo_encoder_weight_only_holds_its_gates(demo_graphs, precision):
    """Issue 24's acceptance on the demo encoder: INT4 at most 0.35x the FP32 graph's bytes with min
    cosine >= 0.95 on held-out passages; INT8 weight-only min cosine >= 0.999."""
    graphs, calibration, held, root = demo_graphs
    dst = root / precision / "encoder.onnx"
    row = precision_row(precision)
    report = quantize_weight_only(graphs["encoder"], dst, calibration["encoder"], row.weight_bits,
                                  DEFAULT_CONFIGS[precision])
    assert graph_file_bytes(dst) <= 0.35 * graph_file_bytes(graphs["encoder"])
    ref = run_session(ort_session(graphs["encoder"]), held)[0]
    got = run_session(ort_session(dst), held)[0]
    assert _row_cosine(ref, got).min() >= row.min_cosine
    assert not np.array_equal(ref, got)
    assert report["gemms"] == 36 and report["embedding_tables"] and report["block_size"] == (32 if row.weight_bits == 4 else 128)
    if precision == "int4_awq":
        assert report["int8_per_channel_gemms"] == 6 and report["awq_alphas"]


@pytest.mark.slow
def test_demo_int8_graph_stores_int8_weights_and_keeps_its_gate(demo_graphs):
    from resrank_export.precision.graphs import PrecisionConfig, quantize_int8

    graphs, calibration, held, root = demo_graphs
    dst = root / "int8" / "encoder.onnx"
    report = quantize_int8(graphs["encoder"], dst, calibration["encoder"], PrecisionConfig())
    assert graph_file_bytes(dst) <= 0.35 * graph_file_bytes(graphs["encoder"])
    model = onnx.load(str(dst))
    initializers = {i.name: i for i in model.graph.initializer}
    # no GEMM reads an FP32 weight (each goes through a DequantizeLinear of INT8 levels)
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert [initializers[t].data_type for t in report["embedding_tables"]] == [TensorProto.INT8]
    assert report["weights"] == "int8" and report["weight_only_gemms"] == 6
    ref = run_session(ort_session(graphs["encoder"]), held)[0]
    got = run_session(ort_session(dst), held)[0]
    assert _row_cosine(ref, got).min() >= precision_row("int8").min_cosine
