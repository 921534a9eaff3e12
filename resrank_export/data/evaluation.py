"""Retrieval quality figures shared by the index and precision reports: nDCG@10 with trec_eval's
definition (pytrec_eval) and recall of an approximate top-k against exact search."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from resrank_export.data.readers import read_qrels, read_queries
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


def recall_against_exact(approx_ids: list[list[str]], exact_ids: list[list[str]], k: int) -> float:
    """Mean fraction of the exact top-k that the approximate top-k also returns."""
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / len(e[:k]) for a, e in zip(approx_ids, exact_ids)]))


def is_beir_folder(path: Path | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "queries.jsonl").is_file() \
        and (Path(path) / "qrels" / "test.tsv").is_file()


def judged_queries(beir_dir: Path) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """(qrels, {query id: text}) for the test queries that have judgements."""
    qrels = read_qrels(beir_dir)
    queries = read_queries(beir_dir)
    judged = {qid: text for qid, text in queries.items() if qid in qrels}
    if not judged:
        raise InputDataError(f"{beir_dir / 'queries.jsonl'}: no query appears in {beir_dir / 'qrels' / 'test.tsv'}")
    return qrels, judged
