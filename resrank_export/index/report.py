"""The index report: build time, bytes per passage, recall of an approximate index against exact
search and, on a BEIR folder with judged queries, nDCG@10 of first-stage retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from resrank_export.data.evaluation import Run, is_beir_folder, judged_queries, ndcg_at_10, recall_against_exact
from resrank_export.index.config import IndexConfig
from resrank_export.index.faiss_index import ADD_BLOCK
from resrank_export.index.layout import FAISS_FILE, IVF_LISTS_FILE, VECTORS_FILE
from resrank_export.index.retriever import Retriever, SearchResult
from resrank_export.lazy import require

REPORT_JSON, REPORT_MD = "report.json", "report.md"
_RECALL_K = (10, 100)


def index_report(retriever: Retriever, config: IndexConfig, timings: dict) -> dict:
    """Build time, bytes per passage, recall@10/@100 of an approximate index against exact search
    and, when the corpus is a BEIR folder with judged queries, nDCG@10. Recall queries are those
    BEIR queries, else a seeded sample of stored passage vectors."""
    info, count = retriever.info, retriever.info["count"]
    report = {
        "kind": info["kind"], "count": count, "dim": info["dim"], "vector_dtype": info["vector_dtype"],
        "params": info["params"], "build_seconds": round(timings["build_seconds"], 3),
        "encode_seconds": round(timings["encode_seconds"], 3), "encoded_passages": timings["encoded_passages"],
        "passages_per_second": round(timings["encoded_passages"] / max(timings["encode_seconds"], 1e-9), 1),
        "bytes_per_passage": {name: round((retriever.folder / name).stat().st_size / count, 1)
                              for name in (FAISS_FILE, IVF_LISTS_FILE, VECTORS_FILE)
                              if (retriever.folder / name).is_file()},
    }
    if is_beir_folder(config.corpus):
        _, queries = judged_queries(Path(config.corpus))
        query_vectors = retriever.encoder.encode_queries(list(queries.values()))
        report["ndcg@10"] = round(evaluate_beir(retriever, Path(config.corpus))["ndcg@10"], 4)
        report["queries"] = f"{len(queries)} judged queries of {config.corpus}"
    else:
        rows = np.sort(np.random.default_rng(0).choice(count, size=min(count, config.eval_queries), replace=False))
        query_vectors = np.asarray(retriever.vectors[rows], dtype=np.float32)
        report["queries"] = f"{len(rows)} stored passage vectors (seeded sample)"
    if info["kind"] != "flat":
        ids, _, _ = retriever.search_vectors(query_vectors, max(_RECALL_K))
        exact = _exact_ids(retriever, query_vectors, max(_RECALL_K))
        report.update({f"recall@{k}": round(recall_against_exact(ids, exact, k), 4) for k in _RECALL_K})
    return report


def _exact_ids(retriever: Retriever, query_vectors: np.ndarray, k: int) -> list[list[str]]:
    faiss = require("faiss", "exact search")
    exact = faiss.IndexFlatIP(retriever.dim)
    for start in range(0, len(retriever.ids), ADD_BLOCK):
        exact.add(np.ascontiguousarray(retriever.vectors[start:start + ADD_BLOCK], dtype=np.float32))
    _, rows = exact.search(np.ascontiguousarray(query_vectors), min(k, len(retriever.ids)))
    return [[retriever.ids[r] for r in row if r >= 0] for row in rows]


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Index report", "", "| figure | value |", "|---|---|"]
    for key, value in report.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        lines.append(f"| {key} | {shown} |")
    (folder / REPORT_MD).write_text("\n".join(lines) + "\n")


def as_run(qids: list[str], results: list[SearchResult]) -> Run:
    return {qid: {pid: float(score) for pid, score in zip(result.ids, result.scores)}
            for qid, result in zip(qids, results)}


def evaluate_beir(retriever: Retriever, beir_dir: Path, k: int = 100) -> dict:
    """nDCG@10 of first-stage retrieval on a BEIR folder's judged test queries, encoded with the
    retriever's encoder."""
    qrels, queries = judged_queries(Path(beir_dir))
    run = as_run(list(queries), retriever.search_texts(list(queries.values()), k))
    return {"data": str(beir_dir), "queries": len(queries), "ndcg@10": ndcg_at_10(qrels, run)}
