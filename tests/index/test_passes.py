"""Ranking past one reranker pass (index/passes.py): the strategies against a brute-force sort
with a context-free scorer, pass counts, and the in-process pipeline on the tiny build against
single reranker runs of the passes it made."""

from __future__ import annotations

import numpy as np
import pytest

from resrank_export.errors import ResRankExportError
from resrank_export.index.passes import PassSettings, batches, run_rankings

STRATEGIES = [PassSettings(10, "blocks"), PassSettings(10, "sliding"), PassSettings(10, "sliding", 3)]


def _rank(settings: PassSettings, values: np.ndarray, seen: list | None = None):
    """Rank with a scorer that reads each candidate's own value (what a perfect reranker would)."""
    def score(asks):
        if seen is not None:
            seen.append([len(group) for _, group in asks])
        assert all(len(group) <= settings.window for _, group in asks), "a pass over the window"
        return [values[group] for _, group in asks]

    [(order, scores)] = run_rankings([settings.ranking(len(values))], score)
    return order, scores


@pytest.mark.parametrize("settings", STRATEGIES, ids=lambda s: f"{s.strategy}-{s.step}")
@pytest.mark.parametrize("n", [1, 7, 10, 11, 37, 100, 250])
def test_every_strategy_returns_a_permutation_with_the_best_first(settings, n):
    values = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    order, scores = _rank(settings, values)
    assert sorted(order.tolist()) == list(range(n))
    np.testing.assert_array_equal(scores, np.minimum.accumulate(values[order]))  # own score, capped by the above
    truth = np.argsort(-values, kind="stable")
    assert order[0] == truth[0]
    if n <= settings.window:  # one pass: a plain sort
        np.testing.assert_array_equal(order, truth)
    elif settings.strategy == "sliding":  # windows from the back carry the best (window - step) to the front
        kept = settings.window - settings.slide
        np.testing.assert_array_equal(order[:kept], truth[:kept])


def test_pass_counts_and_rounds():
    blocks, sliding = PassSettings(100, "blocks"), PassSettings(100, "sliding", 50)
    assert blocks.cost(100) == sliding.cost(100) == (1, 1)
    assert blocks.cost(1000) == (11, 2)  # 10 blocks in one round, then their winners
    assert sliding.cost(1000) == (19, 19)  # (1000 - 100) / 50 + 1, one after the other
    rounds: list = []
    _rank(blocks, np.arange(1000, dtype=np.float32), rounds)
    assert rounds == [[100] * 10, [100]]


def test_rankings_of_many_queries_share_rounds():
    """Two queries of different lengths: their passes are asked together, each gets its own."""
    values = [np.arange(30, dtype=np.float32), -np.arange(5, dtype=np.float32)]
    settings = PassSettings(10, "blocks")
    rounds: list = []

    def score(asks):
        rounds.append(sorted({i for i, _ in asks}))
        return [values[i][group] for i, group in asks]

    (first, _), (second, _) = run_rankings([settings.ranking(30), settings.ranking(5)], score)
    assert rounds[0] == [0, 1] and first[0] == 29 and second.tolist() == [0, 1, 2, 3, 4]


def test_batches_group_by_candidate_count_within_the_row_limit():
    asks = [(0, np.arange(k)) for k in (10, 10, 4, 10, 10, 10)]
    assert batches(asks, 2) == [[0, 1], [3, 4], [5], [2]]


@pytest.mark.parametrize("settings, message", [(PassSettings(10, "zigzag"), "expected one of blocks, sliding"),
                                               (PassSettings(10, "sliding", 11), "rank step 11: expected 1..10"),
                                               (PassSettings(0), "window 0")])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ResRankExportError, match=message):
        settings.validate()


@pytest.mark.parametrize("strategy", ["blocks", "sliding"])
def test_pipeline_passes_are_reranker_runs(tiny_build, strategy):
    """The tiny build (20 per pass) ranks 45 passages: its answer is the strategy driven by
    single reranker runs (one ORT call per pass); within one pass it is today's scores."""
    from resrank_export.data.default_corpus import SAMPLE_QUERIES, stdlib_passages
    from resrank_export.index.pipeline import ResRankPipeline
    from resrank_export.runtime import run_session

    pipeline = ResRankPipeline(tiny_build, strategy=strategy)
    texts = [p.text for p in stdlib_passages(limit=45)]
    vectors = pipeline.encoder.encode(texts)
    query = SAMPLE_QUERIES[0]

    def one_by_one(asks):
        scores = []
        for _, group in asks:
            inputs = pipeline.prompts.batch([query], len(group))
            inputs["passage_embeddings"] = vectors[group][None].astype(np.float32)
            scores.append(run_session(pipeline.reranker, inputs)[0][0])
        return scores

    [(order, scores)] = run_rankings([pipeline.passes.ranking(len(texts))], one_by_one)
    got = pipeline.rerank(query, texts)
    assert got.ids == [str(i) for i in order]
    np.testing.assert_allclose(got.scores, scores, rtol=0, atol=1e-5)
    single = pipeline.rerank(query, texts[:20])
    [(order, scores)] = run_rankings([PassSettings(20).ranking(20)], one_by_one)
    assert single.ids == [str(i) for i in order]
    np.testing.assert_allclose(single.scores, scores, rtol=0, atol=1e-6)
