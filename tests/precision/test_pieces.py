"""INT8 a piece at a time (precision/pieces.py): the cut graph computes what the whole one does,
cuts respect attention blocks and shared GEMM inputs, and the joined INT8 graph has the ranges the
whole-graph quantization gives (same tensors, same scales) on the tiny checkpoints."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from resrank_export.errors import ResRankExportError
from resrank_export.export.onnx import graph_specs
from resrank_export.export.parity import _row_cosine
from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration
from resrank_export.precision import BY_NAME
from resrank_export.precision.graphs import PrecisionConfig, calibration_batches, quantize_fp8, quantize_int8
from resrank_export.precision.pieces import CarriedValues, _allowed_cuts, piece_model, plan_pieces
from resrank_export.runtime import graph_session, ort_session, run_session

PIECE_BYTES = 16_000  # a layer of the tiny checkpoints is 20-40 KB: cuts inside and between layers


@pytest.fixture(scope="module")
def exported(tiny_export, tmp_path_factory):
    checkpoint, graphs = tiny_export(reranker="qwen3")
    root = tmp_path_factory.mktemp("pieces")
    build_calibration_set(checkpoint, root / "calib", CalibrationConfig(encoder_samples=16, reranker_queries=8,
                                                                        retrieval_pool=100))
    calib = {spec.name: load_calibration(root / "calib", spec) for spec in graph_specs(checkpoint)}
    return graphs, calib, root


def _qdq_scales(path) -> dict[str, np.ndarray]:
    """{quantized tensor: its scale} of a Q/DQ graph."""
    model = onnx.load(str(path))
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    return {n.input[0]: weights[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("name", ["encoder", "reranker"])
def test_pieces_run_in_a_chain_give_the_whole_graphs_outputs(exported, name):
    graphs, calib, root = exported
    structure = onnx.load(str(graphs[name]))
    pieces = plan_pieces(structure, PIECE_BYTES)
    assert len(pieces) >= 4
    assert [p.start for p in pieces] == [0, *(p.stop for p in pieces[:-1])] and pieces[-1].stop == len(structure.graph.node)
    allowed = _allowed_cuts(list(structure.graph.node), {i.name for i in structure.graph.initializer})
    assert all(allowed[p.stop - 1] for p in pieces[:-1])
    runs = calibration_batches(calib[name], max_tokens=512)
    carried = CarriedValues(runs)
    sessions = []
    for k, piece in enumerate(pieces):
        path = root / f"{name}-piece{k}.onnx"
        onnx.save(piece_model(structure, piece, graphs[name].parent), str(path))
        sessions.append(ort_session(path))
        if k + 1 < len(pieces):
            carried.advance(sessions[-1], piece, pieces[k + 1:])
            assert all(set(values) == {n for p in pieces[k + 1:] for n in p.inputs} & set(values)
                       for values in carried.runs)  # only what later pieces read is kept
    whole = ort_session(graphs[name])
    for run, values in zip(runs, carried.runs):
        for got, want in zip(run_session(sessions[-1], values), run_session(whole, run)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_no_cut_inside_attention_or_between_gemms_sharing_an_input(exported):
    graphs, _, _ = exported
    structure = onnx.load(str(graphs["reranker"]))
    nodes = list(structure.graph.node)
    allowed = _allowed_cuts(nodes, {i.name for i in structure.graph.initializer})
    softmax = next(k for k, n in enumerate(nodes) if n.op_type == "Softmax")
    assert not allowed[softmax] and not allowed[softmax - 1]
    readers = {}
    for k, n in enumerate(nodes):
        if n.op_type == "MatMul":
            readers.setdefault(n.input[0], []).append(k)
    shared = next(ks for ks in readers.values() if len(ks) > 1)  # Q/K/V projections of one input
    assert not any(allowed[shared[0]:shared[-1]])
    assert any(allowed)


@pytest.mark.parametrize("name", ["encoder", "reranker"])
def test_int8_in_pieces_has_the_whole_graphs_ranges(exported, name):
    graphs, calib, root = exported
    whole = quantize_int8(graphs[name], root / "whole" / f"{name}.onnx", calib[name], PrecisionConfig())
    cut = quantize_int8(graphs[name], root / "cut" / f"{name}.onnx", calib[name],
                        PrecisionConfig(int8_piece_bytes=PIECE_BYTES))
    assert whole["pieces"] == 1 and cut["pieces"] >= 4
    assert cut["smoothquant"]["gemms"] == whole["smoothquant"]["gemms"]
    expected, got = _qdq_scales(root / "whole" / f"{name}.onnx"), _qdq_scales(root / "cut" / f"{name}.onnx")
    # Every tensor the whole graph quantizes, the pieces quantize with the same scale. (ModelOpt
    # matches its own GEMV exclusions as name prefixes: the tiny reranker's small "node_linear_1"
    # also drops node_linear_10..12 in the whole graph, not in a piece without it.)
    assert expected and set(expected) <= set(got)
    for tensor, scale in expected.items():
        np.testing.assert_allclose(got[tensor], scale, rtol=1e-4, err_msg=tensor)
    if name == "encoder":
        assert set(got) == set(expected)
    fp32 = run_session(ort_session(graphs[name]), calib[name])[0]
    outputs = {k: run_session(ort_session(root / k / f"{name}.onnx"), calib[name])[0] for k in ("whole", "cut")}
    assert _row_cosine(fp32, outputs["cut"]).min() > 0.95
    if name == "encoder":
        np.testing.assert_allclose(outputs["cut"], outputs["whole"], atol=1e-5)


def test_fp8_in_pieces_computes_what_the_whole_graph_does(exported):
    """FP8 shares INT8's piece path (same ModelOpt driver, FP8 mode, FP16 elsewhere): each piece is
    calibrated on the FP32 values that reach it, so the joined graph is the whole one."""
    graphs, calib, root = exported
    whole = quantize_fp8(graphs["encoder"], root / "fp8-whole" / "encoder.onnx", calib["encoder"], PrecisionConfig())
    cut = quantize_fp8(graphs["encoder"], root / "fp8-cut" / "encoder.onnx", calib["encoder"],
                       PrecisionConfig(int8_piece_bytes=PIECE_BYTES))
    assert whole["pieces"] == 1 and cut["pieces"] >= 4
    assert cut["quantize_nodes"] == whole["quantize_nodes"] > 0
    fp32 = run_session(ort_session(graphs["encoder"]), calib["encoder"])[0]
    outputs = {k: run_session(graph_session(root / f"fp8-{k}" / "encoder.onnx"), calib["encoder"])[0]
               for k in ("whole", "cut")}
    assert _row_cosine(fp32, outputs["cut"]).min() >= BY_NAME["fp8"].min_cosine
    np.testing.assert_allclose(outputs["cut"], outputs["whole"], atol=2e-3)


def test_int8_pieces_read_weights_from_external_data(exported, tmp_path):
    """A large graph's weights sit in `<graph>.onnx.data`: each piece reads its own from there (a
    file with a second hard link too, as a rebuild's folder has), and the result equals the pieces
    of the same graph with embedded weights."""
    graphs, calib, root = exported
    model = onnx.load(str(graphs["encoder"]))
    external = tmp_path / "external" / "encoder.onnx"
    external.parent.mkdir()
    onnx.save(model, str(external), save_as_external_data=True, location="encoder.onnx.data", size_threshold=0)
    assert (tmp_path / "external" / "encoder.onnx.data").stat().st_size > 1 << 20
    os.link(tmp_path / "external" / "encoder.onnx.data", tmp_path / "previous-build-encoder.onnx.data")
    config = PrecisionConfig(int8_piece_bytes=PIECE_BYTES)
    quantize_int8(external, tmp_path / "from-external.onnx", calib["encoder"], config)
    quantize_int8(graphs["encoder"], tmp_path / "from-embedded.onnx", calib["encoder"], config)
    a = run_session(ort_session(tmp_path / "from-external.onnx"), calib["encoder"])[0]
    b = run_session(ort_session(tmp_path / "from-embedded.onnx"), calib["encoder"])[0]
    np.testing.assert_array_equal(a, b)


def test_piece_size_must_be_positive(exported, tmp_path):
    graphs, calib, _ = exported
    with pytest.raises(ResRankExportError, match="INT8 piece size 0 bytes: expected a positive size"):
        quantize_int8(graphs["encoder"], tmp_path / "x.onnx", calib["encoder"], PrecisionConfig(int8_piece_bytes=0))
    assert not (tmp_path / "x.onnx").exists()


def test_pieces_of_a_large_graph_are_quantized_in_processes_of_their_own(exported, tmp_path, monkeypatch):
    """Past ISOLATE_BYTES each piece's ModelOpt run is a child process (what it leaves allocated
    cannot pile up across pieces): the same INT8 graph as in this process, one child per piece."""
    import resrank_export.isolated as isolated
    import resrank_export.precision.graphs as graphs_module

    graphs, calib, _ = exported
    config = PrecisionConfig(int8_piece_bytes=PIECE_BYTES)
    here = quantize_int8(graphs["encoder"], tmp_path / "here.onnx", calib["encoder"], config)
    children = len(isolated.finished_child_peaks)
    monkeypatch.setattr(graphs_module, "ISOLATE_BYTES", 0)
    apart = quantize_int8(graphs["encoder"], tmp_path / "apart.onnx", calib["encoder"], config)
    assert len(isolated.finished_child_peaks) == children + apart["pieces"]
    assert apart == here
    a = run_session(ort_session(tmp_path / "apart.onnx"), calib["encoder"])[0]
    b = run_session(ort_session(tmp_path / "here.onnx"), calib["encoder"])[0]
    np.testing.assert_array_equal(a, b)


def test_a_graph_with_control_flow_stays_whole():
    """An If's branches read outer tensors the cut does not follow: one piece, whatever the size."""
    from onnx import TensorProto, helper

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("If", ["flag"], ["z"], then_branch=branch("then"), else_branch=branch("else")),
         helper.make_node("Add", ["y", "z"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 64])],
        [onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")])
    pieces = plan_pieces(helper.make_model(graph), piece_bytes=1024)
    assert [(p.start, p.stop) for p in pieces] == [(0, 3)]


def _one_matmul_graph(tmp_path):
    """y = x @ w with w in `graph.onnx.data`, and its structure loaded without the weights."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), "w")])
    onnx.save(helper.make_model(graph), str(tmp_path / "graph.onnx"), save_as_external_data=True,
              location="graph.onnx.data", size_threshold=0)
    return onnx.load(str(tmp_path / "graph.onnx"), load_external_data=False)


def test_weights_pointing_outside_the_graphs_folder_or_cut_short_are_one_line_errors(tmp_path):
    from resrank_export.precision.pieces import Piece

    structure = _one_matmul_graph(tmp_path)
    piece = Piece(0, 1, ("x",), ("y",), 256)
    assert piece_model(structure, piece, tmp_path).graph.initializer[0].raw_data == np.ones((8, 8), np.float32).tobytes()
    (tmp_path / "graph.onnx.data").write_bytes(b"\0" * 100)  # truncated
    with pytest.raises(ResRankExportError, match=r"graph.onnx.data: w needs 256 bytes at offset 0, the file has 100"):
        piece_model(structure, piece, tmp_path)
    location = next(e for e in structure.graph.initializer[0].external_data if e.key == "location")
    location.value = "../elsewhere.data"
    with pytest.raises(ResRankExportError, match=r"the graph's weights w point outside its folder \(../elsewhere.data\)"):
        piece_model(structure, piece, tmp_path)


def test_a_piece_whose_inputs_or_outputs_changed_is_refused(tmp_path):
    """What ModelOpt returns must keep the piece's inputs and outputs, or the join would be wrong."""
    from resrank_export.precision.graphs import _check_piece_io
    from resrank_export.precision.pieces import Piece

    _one_matmul_graph(tmp_path)
    _check_piece_io(tmp_path / "graph.onnx", Piece(0, 1, ("x",), ("y",), 256))
    with pytest.raises(ResRankExportError, match=r"ModelOpt changed the inputs/outputs of nodes 0-0"):
        _check_piece_io(tmp_path / "graph.onnx", Piece(0, 1, ("x",), ("y", "z"), 256))


def test_a_cut_tensor_without_a_recorded_type_is_named(tmp_path):
    from resrank_export.precision.pieces import Piece

    structure = _one_matmul_graph(tmp_path)
    with pytest.raises(ResRankExportError, match=r"no type recorded for hidden in the graph"):
        piece_model(structure, Piece(0, 1, ("x", "hidden"), ("y",), 256), tmp_path)
