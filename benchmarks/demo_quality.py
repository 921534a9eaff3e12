"""Ranking quality of the demo, in one run: nDCG@10 of BM25, of the MiniLM encoder alone (cosine
rerank of BM25's top 100) and of the distilled ResRank (one reranker pass over the same 100, the
FP32 graphs as served), on DL19 (its BM25 top-100 run) and SciFact (BM25 top-100 from bm25s over
the corpus, title + text), with the latency of each stage on this machine.

    python benchmarks/demo_quality.py RESULTS_DIR [--checkpoint DIR] [--dl19 ../shared/data/dl19]
        [--scifact ../shared/data/scifact] [--scifact-queries N]

Without --checkpoint the demo checkpoint is used (trained once and cached, docs/demo.md).
Writes RESULTS_DIR/demo_quality.json and RESULTS_DIR/demo_quality.md. About 15 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEPTH = 100

log = logging.getLogger("demo_quality")


def bm25_run(folder: Path, queries: dict[str, str], depth: int) -> dict[str, list[str]]:
    """A BEIR folder's BM25 top-`depth`: its run.bm25.trec when it has one, else bm25s
    (Lucene's BM25, k1 0.9, b 0.4, English stop words and Snowball stemming) over title + text."""
    from resrank_export.data.readers import iter_passages, read_trec_run

    if (folder / "run.bm25.trec").is_file():
        run = read_trec_run(folder / "run.bm25.trec")
        return {q: run[q][:depth] for q in queries if q in run}
    import bm25s
    import Stemmer

    passages = list(iter_passages(folder))
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(bm25s.tokenize([p.text for p in passages], stopwords="en", stemmer=stemmer, show_progress=False),
                    show_progress=False)
    qids = list(queries)
    tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", stemmer=stemmer, show_progress=False)
    hits, _ = retriever.retrieve(tokens, k=depth, show_progress=False)
    return {q: [passages[j].id for j in row] for q, row in zip(qids, hits)}


def _latency(times: list[float]) -> dict:
    return {"median_ms": 1000 * float(np.median(times)), "p90_ms": 1000 * float(np.percentile(times, 90)),
            "count": len(times)}


def evaluate(folder: Path, pipeline, max_queries: int | None) -> dict:
    """nDCG@10 of the three rankers on the judged queries of `folder` with a full BM25 top-100."""
    from resrank_export.data.evaluation import judged_queries, ndcg_at_10
    from resrank_export.data.readers import iter_passages

    qrels, queries = judged_queries(folder)
    if max_queries is not None:
        queries = dict(sorted(queries.items())[:max_queries])
    started = time.perf_counter()
    run = {q: docs for q, docs in bm25_run(folder, queries, DEPTH).items() if len(docs) == DEPTH}
    bm25_seconds = time.perf_counter() - started
    qids = sorted(run)
    wanted = {d for q in qids for d in run[q]}
    texts = {p.id: p.text for p in iter_passages(folder) if p.id in wanted}
    ids = sorted(wanted)
    row = {d: i for i, d in enumerate(ids)}
    log.info("%s: encoding %d candidate passages and %d queries", folder.name, len(ids), len(qids))
    started = time.perf_counter()
    passages = pipeline.encoder.encode([texts[d] for d in ids])
    encode_seconds = time.perf_counter() - started
    query_vectors = pipeline.encoder.encode_queries([queries[q] for q in qids])
    runs = {"bm25": {}, "minilm_encoder": {}, "resrank": {}}
    rerank_times, encoder_times = [], []
    for i, q in enumerate(qids):
        slots = passages[[row[d] for d in run[q]]]
        runs["bm25"][q] = {d: float(DEPTH - r) for r, d in enumerate(run[q])}
        started = time.perf_counter()
        cosines = slots @ query_vectors[i]
        encoder_times.append(time.perf_counter() - started)
        runs["minilm_encoder"][q] = {d: float(s) for d, s in zip(run[q], cosines)}
        started = time.perf_counter()
        scores = pipeline.score(queries[q], slots)
        rerank_times.append(time.perf_counter() - started)
        runs["resrank"][q] = {d: float(s) for d, s in zip(run[q], scores)}
    return {"data": str(folder), "queries": len(qids), "candidates": DEPTH,
            "bm25_source": "run.bm25.trec" if (folder / "run.bm25.trec").is_file() else "bm25s (k1 0.9, b 0.4)",
            "ndcg@10": {name: ndcg_at_10({q: qrels[q] for q in qids}, r) for name, r in runs.items()},
            "latency": {"resrank_rerank_100": _latency(rerank_times),
                        "encoder_passages_per_s": len(ids) / encode_seconds,
                        "bm25_retrieval_s": bm25_seconds}}


def render_markdown(report: dict) -> str:
    lines = [f"# Demo ranking quality ({report['run']['checkpoint_name']})", "",
             "nDCG@10 of BM25 top-100 reranked once; ResRank = the distilled demo's FP32 graphs on ONNX Runtime "
             "CPU, one pass over 100 candidates. Latency measured on a shared 2-core machine (an upper bound).", "",
             "| data | queries | BM25 | MiniLM encoder (cosine) | ResRank (distilled) | ResRank − BM25 | "
             "ResRank − encoder | rerank latency, median (p90) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        n = d["ndcg@10"]
        lat = d["latency"]["resrank_rerank_100"]
        lines.append(f"| {name} | {d['queries']} | {n['bm25']:.4f} | {n['minilm_encoder']:.4f} | {n['resrank']:.4f} "
                     f"| {n['resrank'] - n['bm25']:+.4f} | {n['resrank'] - n['minilm_encoder']:+.4f} "
                     f"| {lat['median_ms']:.0f} ms ({lat['p90_ms']:.0f} ms) |")
    lines += ["", f"Run: {report['run']['seconds']} s, {report['run']['machine']}, Python {report['run']['python']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--dl19", type=Path, default=SHARED / "dl19")
    parser.add_argument("--scifact", type=Path, default=SHARED / "scifact")
    parser.add_argument("--scifact-queries", type=int, help="the first N judged queries (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from resrank_export.export.onnx import export_onnx
    from resrank_export.index.pipeline import ResRankPipeline
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import default_checkpoint

    path = args.checkpoint or default_checkpoint()
    started = time.perf_counter()
    report = {"datasets": {}}
    with tempfile.TemporaryDirectory() as work:
        graphs = export_onnx(load_checkpoint(path), Path(work) / "build")
        pipeline = ResRankPipeline(graphs["encoder"].parents[2])
        for name, folder, limit in (("DL19", args.dl19, None), ("SciFact", args.scifact, args.scifact_queries)):
            if (folder / "queries.jsonl").is_file():
                report["datasets"][name] = evaluate(folder, pipeline, limit)
            else:
                log.warning("%s not found: %s skipped", folder, name)
    report["run"] = {"checkpoint": str(Path(path).resolve()), "checkpoint_name": Path(path).name,
                     "seconds": round(time.perf_counter() - started), "machine": platform.platform(),
                     "python": sys.version.split()[0]}
    distill = Path(path) / "distill.json"
    if distill.is_file():
        report["run"]["recipe_hash"] = json.loads(distill.read_text()).get("recipe_hash")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "demo_quality.md").write_text(render_markdown(report))
    print((args.out / "demo_quality.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
