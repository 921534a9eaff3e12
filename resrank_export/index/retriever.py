"""A loaded index: FAISS search plus the stored slot vectors, ids and texts, and `run_search`, the
`search` command's library side."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from resrank_export.data.readers import read_queries
from resrank_export.errors import IndexFormatError, ResRankExportError
from resrank_export.index.encode import OnnxEncoder
from resrank_export.index.faiss_index import apply_search_params, read_faiss
from resrank_export.index.layout import FAISS_FILE, IDS_FILE, INDEX_FILE, TEXTS_FILE, VECTORS_FILE, read_index_info
from resrank_export.lazy import require


@dataclass(frozen=True)
class SearchResult:
    ids: list[str]
    scores: np.ndarray  # [k] float32, descending
    vectors: np.ndarray  # [k, D] float32: the stored slot vectors of the hits


class Retriever:
    """A loaded index: FAISS search plus the stored slot vectors and ids; with a build folder
    it also encodes queries (checked to be the encoder that made the index)."""

    def __init__(self, folder: Path, info: dict, index, vectors: np.ndarray, ids: list[str],
                 encoder: OnnxEncoder | None):
        self.folder = folder
        self.info = info
        self.index = index
        self.vectors = vectors
        self.ids = ids
        self.encoder = encoder
        self._text_offsets: dict[str, int] | None = None

    @classmethod
    def load(cls, index_dir: str | Path, build_dir: str | Path | None = None,
             encoder: OnnxEncoder | None = None) -> "Retriever":
        """`build_dir` (or an already loaded `encoder`) enables search by text."""
        folder = Path(index_dir)
        info = read_index_info(folder)
        faiss = require("faiss", "loading a FAISS index")
        try:
            index = read_faiss(faiss, folder, info)
        except RuntimeError as exc:  # faiss names neither the file nor a cause a user can act on
            reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(exc).splitlines()[0])
            raise IndexFormatError(f"{folder / FAISS_FILE}: not a readable FAISS index ({reason}); "
                                   "rebuild it with `resrank-export index`") from None
        apply_search_params(faiss, index, info["kind"], info["params"])
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
        ids = json.loads((folder / IDS_FILE).read_text(encoding="utf-8"))
        if index.ntotal != info["count"] or vectors.shape != (info["count"], info["dim"]) or len(ids) != info["count"]:
            raise IndexFormatError(f"{folder}: index.faiss ({index.ntotal}), vectors.npy {vectors.shape} and "
                                   f"ids.json ({len(ids)}) disagree with {INDEX_FILE} (count {info['count']})")
        if encoder is None and build_dir is not None:  # queries through the graph that encoded the passages
            encoder = OnnxEncoder(build_dir, precision=info.get("encoder_precision"))
        if encoder is not None:
            check_encoder_matches(info, encoder, folder)
        return cls(folder, info, index, vectors, ids, encoder)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def search(self, query: str, k: int) -> SearchResult:
        return self.search_texts([query], k)[0]

    def search_texts(self, queries: list[str], k: int) -> list[SearchResult]:
        """Encode the queries (one batch) and search; hits an approximate index could not fill
        are left out."""
        if self.encoder is None:
            raise ResRankExportError(f"{self.folder}: searching by text needs the build folder "
                                     "(Retriever.load(index_dir, build_dir))")
        ids, scores, vectors = self.search_vectors(self.encoder.encode_queries(list(queries)), k)
        results = []
        for row_ids, row_scores, row_vectors in zip(ids, scores, vectors):
            found = len([i for i in row_ids if i])
            results.append(SearchResult(row_ids[:found], row_scores[:found], row_vectors[:found]))
        return results

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
        """Top-k for a batch of query vectors: ids [B][k], scores [B, k], slot vectors [B, k, D].
        k is capped at the corpus size; a slot an approximate index could not fill (rare, small
        nprobe) has id "", score -inf and a zero vector."""
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ResRankExportError(f"query vectors have shape {queries.shape}; expected [batch, {self.dim}]")
        if k < 1:
            raise ResRankExportError(f"k must be at least 1, got {k}")
        k = min(k, len(self.ids))
        scores, rows = self.index.search(queries, k)
        missing = rows < 0
        vectors = np.asarray(self.vectors[np.where(missing, 0, rows).ravel()], dtype=np.float32)
        vectors = vectors.reshape(len(queries), k, self.dim)
        vectors[missing] = 0.0
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        ids = [[self.ids[r] if r >= 0 else "" for r in row] for row in rows]
        return ids, scores, vectors

    def texts(self, ids: list[str]) -> list[str]:
        """Stored passage texts (display); read by seeking, so the texts stay on disk."""
        if not self.info.get("has_texts"):
            raise ResRankExportError(f"{self.folder}: the index was built without passage texts")
        if self._text_offsets is None:
            offsets, position = {}, 0
            with open(self.folder / TEXTS_FILE, "rb") as handle:
                for line, passage_id in zip(handle, self.ids):
                    offsets[passage_id] = position
                    position += len(line)
            self._text_offsets = offsets
        texts = []
        with open(self.folder / TEXTS_FILE, "rb") as handle:
            for passage_id in ids:
                if passage_id not in self._text_offsets:
                    raise ResRankExportError(f"{self.folder}: unknown passage id {passage_id!r}")
                handle.seek(self._text_offsets[passage_id])
                texts.append(json.loads(handle.readline())["text"])
        return texts


@dataclass(frozen=True)
class SearchConfig:
    index: Path
    query: str | None = None  # one query text (its query_id is None) ...
    queries_file: Path | None = None  # ... or a queries.jsonl ({_id|id, text}) / BEIR folder
    top_k: int = 10
    build: Path | None = None  # encoder for the queries; default: the build recorded in index.json
    batch_size: int = 64


@dataclass(frozen=True)
class QueryHits:
    query_id: str | None
    query: str
    result: SearchResult
    texts: list[str] | None  # stored passage texts of the hits, when the index has them


def run_search(config: SearchConfig) -> Iterator[QueryHits]:
    """Search every query of `config`, encoding them in batches; yields results in query order."""
    if (config.query is None) == (config.queries_file is None):
        raise ResRankExportError("give exactly one of a query text (--query) or a queries file (--queries)")
    if config.query is not None and not config.query.strip():  # as the served pipeline refuses it
        raise ResRankExportError("--query is empty or whitespace-only; expected the text to search for")
    queries = [(None, config.query)] if config.query is not None else list(read_queries(config.queries_file).items())
    info = read_index_info(Path(config.index))
    retriever = Retriever.load(config.index, config.build or info["build"])
    for start in range(0, len(queries), config.batch_size):
        batch = queries[start:start + config.batch_size]
        for (query_id, query), result in zip(batch, retriever.search_texts([q for _, q in batch], config.top_k)):
            texts = retriever.texts(result.ids) if info["has_texts"] else None
            yield QueryHits(query_id, query, result, texts)


def check_encoder_matches(info: dict, encoder: OnnxEncoder, folder: Path) -> None:
    """Query vectors must come from the encoder that made the index, else scores are meaningless."""
    if info["dim"] != encoder.dim:
        raise IndexFormatError(f"{folder / INDEX_FILE}: index dim {info['dim']} does not match the encoder "
                               f"dim {encoder.dim} of {encoder.graph}")
    if info["encoder_sha256"] != encoder.sha256:
        raise IndexFormatError(f"{folder / INDEX_FILE}: encoder_sha256 {info['encoder_sha256'][:12]}... does "
                               f"not match {encoder.graph} ({encoder.sha256[:12]}...); "
                               "rebuild the index with this build's encoder")
