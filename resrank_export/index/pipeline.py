"""The deployed pipeline in-process, on the same ONNX graphs: encode the query, retrieve from the
index, rerank the candidates with their slot vectors, sort by reranker score. The Triton
ensembles must return exactly this (it is their reference in the tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resrank_export.errors import InputDataError
from resrank_export.model.checkpoint import CONFIG_FILE, ResRankConfig
from resrank_export.model.text import PromptBuilder
from resrank_export.runtime import ort_session, run_session


@dataclass(frozen=True)
class RankedPassages:
    ids: list[str]  # passage ids (search) or positions in the given list (rerank), best first
    scores: np.ndarray  # reranker scores, best first


def read_resrank_config(path: Path) -> ResRankConfig:
    """resrank.json as copied into a build folder or a Triton model's version folder."""
    return ResRankConfig.from_json(json.loads(Path(path).read_text()), path)


def load_prompt_builder(tokenizer_file: Path, config: ResRankConfig) -> PromptBuilder:
    return PromptBuilder(tokenizer_file, config.prompt_template, config.placeholder_token,
                         config.max_query_tokens, config.max_candidates)


def _check_query(query: str) -> None:
    if not query.strip():
        raise InputDataError("query is empty or whitespace-only")


class ResRankPipeline:
    def __init__(self, build_dir: str | Path, index_dir: str | Path | None = None, precision: str | None = None):
        """`precision`: the graphs of onnx/<precision>/ (what a repository of that precision serves);
        None: the exported ones."""
        from resrank_export.index.encode import OnnxEncoder, encoder_graph
        from resrank_export.index.retriever import Retriever

        build = Path(build_dir)
        self.prompts = load_prompt_builder(build / "tokenizer" / "reranker" / "tokenizer.json",
                                           read_resrank_config(build / CONFIG_FILE))
        self.encoder = OnnxEncoder(build, precision=precision)
        self.reranker = ort_session(encoder_graph(build, precision).with_name("reranker.onnx"))
        self.retriever = Retriever.load(index_dir, build) if index_dir is not None else None

    def score(self, query: str, slot_vectors: np.ndarray) -> np.ndarray:
        """Reranker scores [k] of k candidates given by their slot vectors [k, D]."""
        inputs = self.prompts.batch([query], len(slot_vectors))
        inputs["passage_embeddings"] = np.ascontiguousarray(slot_vectors[None], dtype=np.float32)
        return run_session(self.reranker, inputs)[0][0]

    def search(self, query: str, k: int) -> RankedPassages:
        _check_query(query)
        if self.retriever is None:
            raise InputDataError("search needs an index; pass index_dir")
        hits = self.retriever.search(query, k)
        scores = self.score(query, hits.vectors)
        order = np.argsort(-scores, kind="stable")
        return RankedPassages([hits.ids[i] for i in order], scores[order])

    def rerank(self, query: str, passages: list[str]) -> RankedPassages:
        _check_query(query)
        if not passages:
            raise InputDataError("no passages to rerank")
        scores = self.score(query, self.encoder.encode(passages))
        order = np.argsort(-scores, kind="stable")
        return RankedPassages([str(i) for i in order], scores[order])
