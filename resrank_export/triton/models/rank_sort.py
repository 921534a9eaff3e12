"""Reranker scores -> candidates sorted by score (best first, stable on ties): DOC_IDS, SCORES
and ORDER (positions in the input candidate list)."""

from __future__ import annotations

import numpy as np

from resrank_export.triton.models.common import input_array, respond


def sort_candidates(request) -> dict[str, np.ndarray]:
    scores = input_array(request, "scores")
    ids = input_array(request, "candidate_ids")
    order = np.argsort(-scores, axis=1, kind="stable")
    return {"DOC_IDS": np.take_along_axis(ids, order, axis=1),
            "SCORES": np.take_along_axis(scores, order, axis=1), "ORDER": order.astype(np.int64)}


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        pass

    def execute(self, requests):
        return respond(requests, sort_candidates)
