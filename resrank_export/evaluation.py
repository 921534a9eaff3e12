"""Retrieval quality figures: nDCG@10 with trec_eval's definition (pytrec_eval). Minimal copy for
the precision report; the index branch holds the full module."""

from __future__ import annotations

import numpy as np

from resrank_export.errors import InputDataError
from resrank_export.lazy import require

Run = dict[str, dict[str, float]]  # query id -> {passage id: score}


def ndcg_at_10(qrels: dict[str, dict[str, int]], run: Run) -> float:
    """Mean nDCG@10 over the judged queries of the run (trec_eval's ndcg_cut.10)."""
    pytrec_eval = require("pytrec_eval", "nDCG evaluation")
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    if not per_query:
        raise InputDataError("no query of the run has relevance judgements (qrels)")
    return float(np.mean([scores["ndcg_cut_10"] for scores in per_query.values()]))
