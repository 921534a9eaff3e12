"""nDCG@10 through pytrec_eval against a direct computation of trec_eval's formula."""

from __future__ import annotations

import math

import pytest

from resrank_export.data.evaluation import ndcg_at_10, recall_against_exact
from resrank_export.errors import InputDataError


def _ndcg10(judged: dict[str, int], ranked: list[str]) -> float:
    """trec_eval ndcg_cut.10: gain = grade, discount log2(rank + 1)."""
    dcg = sum(judged.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:10]))
    ideal = sorted(judged.values(), reverse=True)[:10]
    return dcg / sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))


def test_ndcg_at_10_follows_trec_eval():
    qrels = {"q1": {"d1": 1, "d2": 2}, "q2": {"d7": 1}}
    ranked = {"q1": ["d2", "d3", "d1"] + [f"x{i}" for i in range(12)], "q2": [f"x{i}" for i in range(9)] + ["d7"]}
    run = {q: {doc: float(100 - i) for i, doc in enumerate(docs)} for q, docs in ranked.items()}
    expected = (_ndcg10(qrels["q1"], ranked["q1"]) + _ndcg10(qrels["q2"], ranked["q2"])) / 2
    assert ndcg_at_10(qrels, run) == pytest.approx(expected, abs=1e-6)


def test_ndcg_without_judged_queries_is_a_typed_error():
    with pytest.raises(InputDataError, match="relevance judgements"):
        ndcg_at_10({"q1": {"d1": 1}}, {"other": {"d1": 1.0}})


def test_recall_against_exact_counts_shared_ids():
    assert recall_against_exact([["a", "b", "c"], ["x", "y", "z"]], [["c", "a", "d"], ["x", "y", "z"]], 3) \
        == pytest.approx((2 / 3 + 1) / 2)
