"""Query embeddings + TOP_K -> candidate ids, retrieval scores and the candidates' slot vectors,
from the index folder that write_repository copied into the version folder."""

from __future__ import annotations

import numpy as np

from resrank_export.triton.models.common import RequestError, input_array, respond, string_array, version_dir


def top_k(request, max_top_k: int) -> int:
    """The one k of a request: every row must ask for the same 1..max_top_k."""
    values = input_array(request, "TOP_K").reshape(-1)
    if values.size == 0:
        raise RequestError("TOP_K is empty; send one integer per query")
    k = int(values[0])
    if not np.all(values == k):
        raise RequestError(f"TOP_K differs between the rows of one request ({sorted(set(values.tolist()))}); "
                           "send one request per k")
    if not 1 <= k <= max_top_k:
        raise RequestError(f"TOP_K is {k}; expected 1..{max_top_k}")
    return k


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        from resrank_export.index.retriever import Retriever

        self.retriever = Retriever.load(version_dir(args) / "index")
        self.max_top_k = int(params["MAX_TOP_K"])

    def handle(self, request):
        k = top_k(request, self.max_top_k)
        embeddings = np.ascontiguousarray(input_array(request, "embeddings"), dtype=np.float32)
        ids, scores, vectors = self.retriever.search_vectors(embeddings, k)
        return {"candidate_ids": string_array(ids), "retrieval_scores": scores.astype(np.float32),
                "passage_embeddings": vectors.astype(np.float32)}

    def execute(self, requests):
        return respond(requests, self.handle)
