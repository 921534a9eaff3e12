"""`faiss_lookup` of a sharded repository (`triton --index-shards N`): the same inputs and
outputs as the unsharded model, answered by asking every shard model (SHARDS, each a
faiss_lookup over one slice of the index) for its top-k in parallel and merging them by score
(resrank_export.triton.shards.merge_top_k). Shards are asked through BLS async exec on this
server or, when SHARD_URLS is set (`triton --shard-url`), over gRPC on their own servers (one
address per shard, e.g. one Kubernetes Service each)."""

from __future__ import annotations

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

from resrank_export.triton.models.common import input_array, respond
from resrank_export.triton.models.faiss_lookup import top_k
from resrank_export.triton.shards import merge_top_k

OUTPUTS = ("candidate_ids", "retrieval_scores", "passage_embeddings")


class ShardError(RuntimeError):
    """A shard model answered with an error; the request fails with its message."""


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        self.shards = params["SHARDS"].split(",")
        self.shard_top_k = [int(value) for value in params["SHARD_MAX_TOP_K"].split(",")]
        self.max_top_k = int(params["MAX_TOP_K"])
        self.urls = [url for url in params.get("SHARD_URLS", "").split(",") if url]
        self._clients: dict[str, object] = {}  # url -> grpc.aio client, made inside the stub's event loop

    async def _ask(self, number: int, embeddings: np.ndarray, k: int) -> tuple:
        shard, top = self.shards[number], np.full((len(embeddings), 1), min(k, self.shard_top_k[number]), np.int32)
        if self.urls:
            return await self._ask_remote(self.urls[number], shard, embeddings, top)
        request = pb_utils.InferenceRequest(
            model_name=shard, requested_output_names=list(OUTPUTS),
            inputs=[pb_utils.Tensor("embeddings", embeddings), pb_utils.Tensor("TOP_K", top)])
        response = await request.async_exec()
        if response.has_error():
            raise ShardError(f"shard {shard}: {response.error().message()}")
        return tuple(pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in OUTPUTS)

    async def _ask_remote(self, url: str, shard: str, embeddings: np.ndarray, top: np.ndarray) -> tuple:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.grpc.aio import InferenceServerClient
        from tritonclient.utils import InferenceServerException

        if url not in self._clients:
            self._clients[url] = InferenceServerClient(url)
        inputs = [InferInput("embeddings", list(embeddings.shape), "FP32"), InferInput("TOP_K", list(top.shape), "INT32")]
        inputs[0].set_data_from_numpy(embeddings)
        inputs[1].set_data_from_numpy(top)
        try:
            result = await self._clients[url].infer(shard, inputs, outputs=[InferRequestedOutput(n) for n in OUTPUTS])
        except InferenceServerException as exc:
            raise ShardError(f"shard {shard} at {url}: {exc.message()}") from None
        return tuple(result.as_numpy(name) for name in OUTPUTS)

    async def handle(self, request) -> dict:
        k = top_k(request, self.max_top_k)
        embeddings = np.ascontiguousarray(input_array(request, "embeddings"), dtype=np.float32)
        parts = await asyncio.gather(*(self._ask(number, embeddings, k) for number in range(len(self.shards))))
        ids, scores, vectors = merge_top_k(list(parts), k)
        return dict(zip(OUTPUTS, (ids, scores.astype(np.float32), vectors.astype(np.float32))))

    async def execute(self, requests):
        """All requests of the batch and all their shard calls run concurrently; errors stay per request."""
        outcomes = await asyncio.gather(*(self.handle(r) for r in requests), return_exceptions=True)
        by_request = {id(request): outcome for request, outcome in zip(requests, outcomes)}

        def unwrap(request):
            outcome = by_request[id(request)]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return respond(requests, unwrap)
