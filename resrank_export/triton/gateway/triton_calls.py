"""The served models over gRPC (tritonclient's asyncio client), errors turned into GatewayError:
Triton refusing the input -> 400, unreachable -> 503, timeout -> 504."""

import numpy as np

from resrank_export.lazy import require
from resrank_export.triton.config import RERANK_ENSEMBLE, RETRIEVE_ENSEMBLE
from resrank_export.triton.gateway.limits import GatewayError

QUERY_ROWS = 8  # queries per encoder call: the encoder's max_batch_size is at least the repository's 8


def _strings(values: list[str]) -> np.ndarray:
    return np.array([[v.encode() for v in values]], dtype=np.object_)


class TritonCalls:
    def __init__(self, url: str, timeout_s: float):
        self.grpc = require("tritonclient.grpc", "the gateway (pip install 'resrank-export[gateway]')")
        self.aio = require("tritonclient.grpc.aio", "the gateway (pip install 'resrank-export[gateway]')")
        self.utils = require("tritonclient.utils", "the gateway")
        self.client = self.aio.InferenceServerClient(url)
        self.url, self.timeout_s = url, timeout_s

    def _input(self, name: str, array: np.ndarray):
        tensor = self.grpc.InferInput(name, list(array.shape), self.utils.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        return tensor

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        try:
            result = await self.client.infer(model, [self._input(n, a) for n, a in inputs.items()],
                                             outputs=[self.grpc.InferRequestedOutput(n) for n in outputs],
                                             client_timeout=self.timeout_s)
        except self.utils.InferenceServerException as exc:
            status, message = str(exc.status() or ""), (exc.message() or str(exc)).splitlines()[0]
            if "INVALID_ARGUMENT" in status:
                raise GatewayError(400, message) from None
            if "DEADLINE_EXCEEDED" in status:
                raise GatewayError(504, f"Triton did not answer within {self.timeout_s:g} s") from None
            if "UNAVAILABLE" in status:
                raise GatewayError(503, f"Triton at {self.url} is unavailable: {message}") from None
            raise GatewayError(502, f"Triton failed: {message}") from None
        return {name: result.as_numpy(name) for name in outputs}

    async def rerank(self, query: str, texts: list[str]) -> tuple[list[int], list[float]]:
        """The resrank_rerank ensemble: (positions best first, their scores)."""
        out = await self.infer(RERANK_ENSEMBLE, {"QUERY": _strings([query]), "PASSAGES": _strings(texts)},
                               ["ORDER", "SCORES"])
        return [int(i) for i in out["ORDER"][0]], out["SCORES"][0].tolist()

    async def rank(self, query: str, vectors: np.ndarray) -> tuple[list[int], list[float]]:
        """The rank_passes model on slot vectors [n, D] the caller has (stored ones, by id)."""
        out = await self.infer("rank_passes", {
            "QUERY": _strings([query]), "passage_embeddings": np.ascontiguousarray(vectors[None], dtype=np.float32),
            "candidate_ids": _strings([str(i) for i in range(len(vectors))])}, ["ORDER", "SCORES"])
        return [int(i) for i in out["ORDER"][0]], out["SCORES"][0].tolist()

    async def search(self, query: str, top_k: int) -> tuple[list[str], list[float]]:
        """The resrank ensemble: (passage ids best first, their scores)."""
        out = await self.infer(RETRIEVE_ENSEMBLE, {"QUERY": _strings([query]),
                                                   "TOP_K": np.array([[top_k]], dtype=np.int32)}, ["DOC_IDS", "SCORES"])
        return [v.decode() for v in out["DOC_IDS"][0]], out["SCORES"][0].tolist()

    async def embed_passages(self, texts: list[str]) -> np.ndarray:
        """Passage vectors [n, D] (the passage_encoder model: what the rerank ensemble encodes)."""
        out = await self.infer("passage_encoder", {"PASSAGES": _strings(texts)}, ["passage_embeddings"])
        return out["passage_embeddings"][0]

    async def embed_queries(self, texts: list[str], tokenizer) -> np.ndarray:
        """Query vectors [n, D]: the query template and tokenizer of the query_tokenizer model,
        then the encoder model, QUERY_ROWS at a time."""
        chunks = []
        for start in range(0, len(texts), QUERY_ROWS):
            inputs = tokenizer.queries(texts[start:start + QUERY_ROWS])
            chunks.append((await self.infer("encoder", inputs, ["embeddings"]))["embeddings"])
        return np.concatenate(chunks)

    async def ready(self) -> bool:
        try:
            return (await self.client.is_server_ready(client_timeout=5)
                    and all([await self.client.is_model_ready(m, client_timeout=5)
                             for m in (RETRIEVE_ENSEMBLE, RERANK_ENSEMBLE)]))
        except Exception:  # any failure to answer is "not ready"
            return False
