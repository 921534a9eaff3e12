"""Calibration sets: seeded samples of real text, arrays that match the graph specs, a card
that describes them, and typed errors for bad corpora and mismatched files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resrank_export.errors import InputDataError
from resrank_export.export.onnx import graph_specs
from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration


def _write_corpus(path, n):
    from resrank_export.data.default_corpus import stdlib_passages

    passages = stdlib_passages(limit=n)
    path.write_text("".join(json.dumps({"id": p.id, "text": p.text}) + "\n" for p in passages))
    return passages


@pytest.fixture(scope="module")
def calibration(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    passages = _write_corpus(root / "corpus.jsonl", 120)
    config = CalibrationConfig(corpus=root / "corpus.jsonl", encoder_samples=16, reranker_queries=4, seed=3, retrieval_pool=60)
    checkpoint = tiny_checkpoint()
    card = build_calibration_set(checkpoint, root / "set", config)
    return checkpoint, config, root, passages, card


def test_arrays_match_the_graph_specs_and_the_card(calibration):
    checkpoint, config, root, passages, card = calibration
    encoder_spec, reranker_spec = graph_specs(checkpoint)
    encoder = load_calibration(root / "set", encoder_spec)
    reranker = load_calibration(root / "set", reranker_spec)
    assert encoder["input_ids"].shape[0] == card["encoder"]["samples"] == 16
    lengths = encoder["attention_mask"].sum(1)
    assert card["encoder"]["token_lengths"]["max"] == lengths.max() == encoder["input_ids"].shape[1]
    assert card["encoder"]["token_lengths"]["mean"] == pytest.approx(lengths.mean(), abs=0.01)
    k = checkpoint.config.max_candidates
    assert reranker["passage_embeddings"].shape == (4, k, checkpoint.encoder_dim)
    # slot vectors are the FP32 encoder's (normalised) embeddings of real passages
    np.testing.assert_allclose(np.linalg.norm(reranker["passage_embeddings"], axis=-1), 1.0, atol=1e-5)
    ids = reranker["input_ids"][np.arange(4)[:, None], reranker["slot_positions"]]
    from resrank_export.model.reference import prompt_builder

    assert (ids == prompt_builder(checkpoint).placeholder_id).all()
    assert card["corpus_passages"] == len(passages)


def test_same_seed_same_set_other_seed_other_set(calibration, tmp_path):
    checkpoint, config, root, _, card = calibration
    again = build_calibration_set(checkpoint, tmp_path / "again", config)
    other = build_calibration_set(checkpoint, tmp_path / "other",
                                  CalibrationConfig(**{**vars(config), "seed": config.seed + 1}))
    assert again["encoder"]["sha256"] == card["encoder"]["sha256"]
    assert other["encoder"]["sha256"] != card["encoder"]["sha256"]


def test_empty_corpus_and_too_small_corpus_are_named(tiny_checkpoint, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputDataError, match="empty"):
        build_calibration_set(tiny_checkpoint(), tmp_path / "a", CalibrationConfig(corpus=tmp_path / "empty.jsonl"))
    _write_corpus(tmp_path / "small.jsonl", 5)
    with pytest.raises(InputDataError, match="5 passages, fewer than the 16"):
        build_calibration_set(tiny_checkpoint(), tmp_path / "b",
                              CalibrationConfig(corpus=tmp_path / "small.jsonl", encoder_samples=16))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mismatched_names_and_dims_are_named(calibration, tmp_path):
    checkpoint, _, root, _, _ = calibration
    encoder_spec, reranker_spec = graph_specs(checkpoint)
    arrays = load_calibration(root / "set", reranker_spec)
    np.savez(tmp_path / "renamed.npz", **{("ids" if k == "input_ids" else k): v for k, v in arrays.items()})
    with pytest.raises(InputDataError, match=r"missing \['input_ids'\]"):
        load_calibration(tmp_path / "renamed.npz", reranker_spec)
    np.savez(tmp_path / "dim.npz", **{**arrays, "passage_embeddings": arrays["passage_embeddings"][..., :7]})
    with pytest.raises(InputDataError, match=f"'passage_embeddings' dim 2 is 7, expected {checkpoint.encoder_dim}"):
        load_calibration(tmp_path / "dim.npz", reranker_spec)
    np.savez(tmp_path / "seq.npz", **{**arrays, "attention_mask": arrays["attention_mask"][:, :3]})
    with pytest.raises(InputDataError, match="'attention_mask' dim 1 .* is 3 but 'input_ids'"):
        load_calibration(tmp_path / "seq.npz", reranker_spec)
    with pytest.raises(InputDataError, match="unexpected"):
        load_calibration(root / "set" / "reranker.npz", encoder_spec)


def test_slot_vectors_are_the_references_top_k_corpus_passages(calibration):
    """Without a run file the candidates are the exact-search top-k of the sampled pool, and their
    slot vectors are the pool's reference embeddings (encoded once, not again per query)."""
    from resrank_export.model.reference import ResRankReference
    from resrank_export.precision.calibration import PSEUDO_QUERY_WORDS

    checkpoint, _, root, passages, card = calibration
    slots = load_calibration(root / "set", graph_specs(checkpoint)[1])["passage_embeddings"]
    reference = ResRankReference(checkpoint)
    corpus = reference.encode([p.text for p in passages])
    by_id = {p.id: p for p in passages}
    queries = [" ".join(by_id[q.removeprefix("pseudo-")].text.split()[:PSEUDO_QUERY_WORDS])
               for q in card["reranker"]["query_ids"]]
    for query_vector, row in zip(reference.encode_queries(queries), slots):
        match = np.abs(row[:, None, :] - corpus[None]).max(-1).argmin(1)  # the corpus passage of each slot
        np.testing.assert_allclose(row, corpus[match], atol=1e-5)
        assert len(set(match)) == len(match)
        similarity = corpus[match] @ query_vector
        assert (np.diff(similarity) <= 1e-6).all()  # best first
    assert card["reranker"]["candidate_source"].endswith("over 60 sampled passages")


def test_a_build_makes_the_same_set_with_its_fp32_encoder_graph(calibration, tiny_export, tmp_path):
    """In a build the slot and pool vectors come from the parity-checked FP32 encoder graph (about
    twice as fast on a CPU): the same passages, queries and candidates, vectors within the FP32
    parity gate of the reference's, and the card says which encoder made them."""
    checkpoint, config, root, _, card = calibration
    exported, graphs = tiny_export()
    assert exported.root == checkpoint.root
    by_graph = build_calibration_set(checkpoint, tmp_path / "graph", config, graphs["encoder"])
    assert by_graph["encoder"]["sha256"] == card["encoder"]["sha256"]  # tokens only: identical
    assert by_graph["reranker"]["query_ids"] == card["reranker"]["query_ids"]
    assert "PyTorch reference" in card["reranker"]["slot_vectors"]
    assert by_graph["reranker"]["slot_vectors"] == "the FP32 encoder graph encoder.onnx"
    spec = graph_specs(checkpoint)[1]
    expected, got = load_calibration(root / "set", spec), load_calibration(tmp_path / "graph", spec)
    for name in spec.input_names:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, err_msg=name)
