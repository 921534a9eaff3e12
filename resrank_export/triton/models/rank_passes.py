"""QUERY + the candidates' slot vectors and ids -> candidates ranked best first: DOC_IDS, SCORES
and ORDER (positions in the input candidate list). Up to `max_candidates` candidates are one
reranker pass, exactly as a single forward; more are ranked in several passes by the strategy
of the repository (index/passes.py). The reranker prompts are built here and the `reranker`
model is called by BLS, the passes of all queries of one `execute` call batched together."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from resrank_export.index.passes import PassSettings, run_rankings, score_asks
from resrank_export.index.pipeline import load_prompt_builder
from resrank_export.triton.models.common import (
    RequestError,
    input_array,
    queries,
    refusal,
    resrank_config,
    tensors,
    version_dir,
)


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        folder = version_dir(args)
        settings = resrank_config(folder)
        self.prompts = load_prompt_builder(folder / "tokenizer.json", settings)
        self.passes = PassSettings(settings.max_candidates, params["STRATEGY"], int(params["STEP"]) or None)
        self.reranker_rows = int(params["RERANKER_MAX_BATCH"])
        self.max_candidates = int(params["MAX_CANDIDATES"])  # the deployment's ceiling

    def rerank(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One reranker call: scores [rows, k]."""
        response = pb_utils.InferenceRequest(model_name="reranker", requested_output_names=["scores"],
                                             inputs=tensors(inputs)).exec()
        if response.has_error():
            raise RuntimeError(f"reranker: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "scores").as_numpy()

    def execute(self, requests):
        """Read every request, rank all their rows together, answer each (errors per request)."""
        responses: list = [None] * len(requests)
        rows = []  # (request position, query, slot vectors [k, D], candidate ids [k])
        for position, request in enumerate(requests):
            try:
                texts = queries(request)
                vectors, ids = input_array(request, "passage_embeddings"), input_array(request, "candidate_ids")
                if not 1 <= vectors.shape[1] <= self.max_candidates or ids.shape != vectors.shape[:2]:
                    raise RequestError(f"passage_embeddings has {vectors.shape[1]} candidates (candidate_ids "
                                       f"{ids.shape[1]}); expected 1..{self.max_candidates}, as many ids")
                rows.extend((position, q, v, i) for q, v, i in zip(texts, vectors, ids))
            except ValueError as exc:
                responses[position] = pb_utils.InferenceResponse(error=refusal(exc))
        try:
            ranked = run_rankings([self.passes.ranking(len(v)) for _, _, v, _ in rows], lambda asks: score_asks(
                asks, [q for _, q, _, _ in rows], [v for _, _, v, _ in rows], self.prompts, self.reranker_rows,
                self.rerank))
        except Exception as exc:  # the reranker failed: every request that needed it says so
            error = refusal(exc) if isinstance(exc, ValueError) else pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            ranked = None
        for position in range(len(requests)):
            if responses[position] is not None:
                continue
            if ranked is None:
                responses[position] = pb_utils.InferenceResponse(error=error)
                continue
            own = [(r, ids) for (p, _, _, ids), r in zip(rows, ranked) if p == position]
            order = np.stack([r[0] for r, _ in own]).astype(np.int64)
            outputs = {"DOC_IDS": np.stack([ids[r[0]] for r, ids in own]),
                       "SCORES": np.stack([r[1] for r, _ in own]).astype(np.float32), "ORDER": order}
            responses[position] = pb_utils.InferenceResponse(output_tensors=tensors(outputs))
        return responses
