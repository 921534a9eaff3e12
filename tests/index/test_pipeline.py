"""The in-process pipeline (the Triton ensembles' reference) against the PyTorch reference model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resrank_export.data.default_corpus import SAMPLE_QUERIES, stdlib_passages
from resrank_export.errors import InputDataError
from resrank_export.model.reference import ResRankReference


@pytest.fixture(scope="module")
def tiny_build(tiny_export):
    checkpoint, graphs = tiny_export()
    return checkpoint, graphs["encoder"].parents[2]


def test_rerank_matches_pytorch_reference(tiny_build):
    from resrank_export.index.pipeline import ResRankPipeline

    checkpoint, build = tiny_build
    reference = ResRankReference(checkpoint)
    pipeline = ResRankPipeline(build)
    passages = [p.text for p in stdlib_passages(limit=7)]
    got = pipeline.rerank(SAMPLE_QUERIES[0], passages)
    expected = reference.rank(SAMPLE_QUERIES[0], passages)
    assert got.ids == [str(i) for i in expected.order]
    np.testing.assert_allclose(got.scores, expected.scores[expected.order], rtol=0, atol=1e-4)
    with pytest.raises(InputDataError, match="empty"):
        pipeline.rerank("  ", passages)


def test_search_reranks_retrieved_candidates(tiny_build, tmp_path):
    pytest.importorskip("faiss")
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.encode import OnnxEncoder
    from resrank_export.index.pipeline import ResRankPipeline
    from resrank_export.index.stage import build_index

    checkpoint, build = tiny_build
    passages = stdlib_passages(limit=30)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": p.id, "text": p.text}) + "\n" for p in passages))
    build_index(IndexConfig(build=build, corpus=corpus, out=tmp_path / "index"))
    got = ResRankPipeline(build, tmp_path / "index").search(SAMPLE_QUERIES[1], 5)

    # Brute force: exact inner-product top-5 of the encoded corpus, scored by the PyTorch reranker.
    encoder = OnnxEncoder(build)
    vectors = encoder.encode([p.text for p in passages])
    top = np.argsort(-(vectors @ encoder.encode([SAMPLE_QUERIES[1]])[0]), kind="stable")[:5]
    scores = ResRankReference(checkpoint).score([SAMPLE_QUERIES[1]], vectors[top][None])[0]
    order = np.argsort(-scores, kind="stable")
    assert got.ids == [passages[top[i]].id for i in order]
    np.testing.assert_allclose(got.scores, scores[order], rtol=0, atol=1e-4)
