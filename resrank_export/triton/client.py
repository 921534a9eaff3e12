"""Query helpers over HTTP or gRPC (tritonclient). One client per thread: the HTTP client is not
thread-safe. Close clients before stopping a server (keep-alive connections delay its exit)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resrank_export.errors import ResRankExportError
from resrank_export.lazy import require
from resrank_export.triton.config import RERANK_ENSEMBLE, RETRIEVE_ENSEMBLE


class QueryError(ResRankExportError):
    """The server refused the query or could not be reached."""


@dataclass(frozen=True)
class Ranked:
    ids: list[str]  # DOC_IDS for `search`; passage positions (as text) for `rerank`
    scores: np.ndarray  # reranker scores, best first


class ResRankClient:
    """`timeout`: seconds a call may take (connect + answer) before it raises; None: no limit."""

    def __init__(self, url: str, protocol: str = "http", timeout: float | None = None):
        self.protocol = protocol
        self.timeout = timeout
        self.module = require(f"tritonclient.{protocol}", f"querying Triton over {protocol}")
        self.utils = require("tritonclient.utils", "querying Triton")
        limits = {} if timeout is None or protocol != "http" else {"connection_timeout": timeout,
                                                                     "network_timeout": timeout}
        self.client = self.module.InferenceServerClient(url, **limits)

    def _input(self, name: str, array: np.ndarray):
        tensor = self.module.InferInput(name, list(array.shape), self.utils.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        return tensor

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Raw call: raises tritonclient's InferenceServerException with the server's message."""
        limit = {"client_timeout": self.timeout} if self.timeout is not None and self.protocol == "grpc" else {}
        result = self.client.infer(model, [self._input(name, array) for name, array in inputs.items()],
                                   outputs=[self.module.InferRequestedOutput(name) for name in outputs], **limit)
        return {name: result.as_numpy(name) for name in outputs}

    def search(self, query: str | bytes, top_k: int = 10) -> Ranked:
        """`resrank` ensemble: retrieve top_k from the index, rerank, sort."""
        raw = query if isinstance(query, bytes) else query.encode()
        out = self.infer(RETRIEVE_ENSEMBLE, {"QUERY": np.array([[raw]], dtype=np.object_),
                                             "TOP_K": np.array([[top_k]], dtype=np.int32)}, ["DOC_IDS", "SCORES"])
        return Ranked([v.decode() for v in out["DOC_IDS"][0]], out["SCORES"][0])

    def rerank(self, query: str, passages: list[str]) -> Ranked:
        """`resrank_rerank` ensemble: the user's passages, best first (ids = positions)."""
        out = self.infer(RERANK_ENSEMBLE, {"QUERY": np.array([[query.encode()]], dtype=np.object_),
                                           "PASSAGES": np.array([[p.encode() for p in passages]], dtype=np.object_)},
                         ["ORDER", "SCORES"])
        return Ranked([str(int(i)) for i in out["ORDER"][0]], out["SCORES"][0])

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "ResRankClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class QueryConfig:
    query: str
    url: str = "127.0.0.1:8000"
    protocol: str = "http"
    top_k: int = 10
    passages: Path | None = None  # rerank these (corpus file formats of resrank_export.data.readers) instead


def run_query(config: QueryConfig) -> list[tuple[str, float]]:
    """`resrank-export query`: (passage id, reranker score) pairs, best first."""
    from resrank_export.data.readers import iter_passages

    passages = list(iter_passages(config.passages)) if config.passages is not None else None
    utils = require("tritonclient.utils", "querying Triton")
    try:
        with ResRankClient(config.url, config.protocol) as client:
            if passages is None:
                ranked = client.search(config.query, config.top_k)
                return list(zip(ranked.ids, ranked.scores.tolist()))
            ranked = client.rerank(config.query, [p.text for p in passages])
            return [(passages[int(i)].id, score) for i, score in zip(ranked.ids, ranked.scores.tolist())]
    except utils.InferenceServerException as exc:
        raise QueryError(f"Triton at {config.url} ({config.protocol}): {exc.message()}") from None
    except OSError as exc:  # the HTTP client's connection errors (refused, unknown host) are OSErrors
        raise QueryError(f"Triton at {config.url} ({config.protocol}): cannot connect "
                         f"({exc.strerror or exc}); is `resrank-export serve` running there?") from None
