"""Ranking past one reranker pass (resrank_export/index/passes.py), measured on the in-process
pipeline (the code the Triton `rank_passes` model runs, without the BLS hop):

1. latency of ranking n = 10, 100, 300, 1,000 candidates per strategy (slot vectors encoded
   beforehand: encoding costs every strategy the same), median of --repeats, with the number
   of reranker passes and of sequential rounds;
2. agreement with one pass on DL19 BM25 top-100 when a pass holds only --window (20)
   candidates: top-10 overlap and Kendall's tau against the single 100-candidate pass, and
   nDCG@10 of each (the demo reranker is untrained: its nDCG says nothing of quality, the
   agreement does; BM25's own nDCG@10 is the row `bm25`);
3. the same agreement with a context-free synthetic scorer (each candidate's own value, no
   position bias): what the strategies keep of a perfect single pass.

    python benchmarks/rerank_passes.py OUT_DIR [--build BUILD] [--data ../shared/data/dl19]

BUILD: a build folder (default: the demo checkpoint exported at FP32 once, under the cache
folder). Writes OUT_DIR/rerank_passes.json and .md and rerank_passes_latency.png; a few minutes
on 2 cores (mostly encoding DL19's 4,300 candidates). Timings on a shared machine are upper
bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from resrank_export.data.evaluation import judged_queries, ndcg_at_10
from resrank_export.data.readers import iter_passages, read_trec_run
from resrank_export.index.passes import PassSettings
from resrank_export.index.pipeline import ResRankPipeline

SIZES = (10, 100, 300, 1000)


def strategies(window: int) -> dict[str, PassSettings]:
    return {"blocks": PassSettings(window, "blocks"), "sliding": PassSettings(window, "sliding", window // 2)}


def demo_build() -> Path:
    from resrank_export.export.onnx import export_onnx
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import build_demo_checkpoint, cache_dir

    checkpoint, build = cache_dir() / "demo-checkpoint-v1", cache_dir() / "rerank-passes-build"
    if not (checkpoint / "resrank.json").is_file():
        build_demo_checkpoint(checkpoint)
    if not (build / "resrank.json").is_file():
        build = export_onnx(load_checkpoint(checkpoint), build)["encoder"].parents[2]
    return build


def latency(pipeline: ResRankPipeline, vectors: np.ndarray, query: str, repeats: int) -> list[dict]:
    rows = []
    for name, settings in strategies(pipeline.passes.window).items():
        for n in SIZES:
            pipeline.rank(query, vectors[:n], settings)  # warm-up
            times = []
            for _ in range(repeats):
                begin = time.perf_counter()
                pipeline.rank(query, vectors[:n], settings)
                times.append(time.perf_counter() - begin)
            passes, rounds = settings.cost(n)
            rows.append({"strategy": name, "n": n, "passes": passes, "rounds": rounds,
                         "median_s": float(np.median(times)), "times_s": times})
            print(f"latency {name:8s} n={n:5d}: {rows[-1]['median_s'] * 1e3:8.1f} ms "
                  f"({rows[-1]['passes']} passes, {rows[-1]['rounds']} rounds)", flush=True)
    return rows


def kendall_tau(a: list[str], b: list[str]) -> float:
    from scipy.stats import kendalltau

    position = {pid: i for i, pid in enumerate(b)}
    return float(kendalltau(range(len(a)), [position[pid] for pid in a]).statistic)


def context_free(window: int, n: int = 100, seeds: int = 50) -> dict:
    """The strategies driven by a scorer that reads each candidate's own value (a reranker
    without position bias): top-10 overlap and Kendall tau with the true sort, window `window`."""
    from resrank_export.index.passes import run_rankings

    rows: dict[str, dict[str, list]] = {name: {"overlap": [], "tau": []} for name in strategies(window)}
    for seed in range(seeds):
        values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
        truth = [str(i) for i in np.argsort(-values, kind="stable")]
        for name, settings in strategies(window).items():
            [(order, _)] = run_rankings([settings.ranking(n)], lambda asks: [values[g] for _, g in asks])
            order = [str(i) for i in order]
            rows[name]["overlap"].append(len(set(order[:10]) & set(truth[:10])) / 10)
            rows[name]["tau"].append(kendall_tau(order, truth))
    return {"candidates": n, "window": window, "seeds": seeds,
            "top10_overlap": {name: float(np.mean(r["overlap"])) for name, r in rows.items()},
            "kendall_tau": {name: float(np.mean(r["tau"])) for name, r in rows.items()}}


def agreement(pipeline: ResRankPipeline, data: Path, window: int) -> dict:
    qrels, queries = judged_queries(data)
    bm25 = read_trec_run(data / "run.bm25.trec")
    queries = {qid: text for qid, text in queries.items() if bm25.get(qid)}
    wanted = {pid for qid in queries for pid in bm25[qid][:100]}
    texts = {p.id: p.text for p in iter_passages(data / "corpus.jsonl") if p.id in wanted}
    single = PassSettings(100)
    runs: dict[str, dict] = {"bm25": {}, "single pass (100)": {}}
    runs.update({f"{name} (window {window})": {} for name in strategies(window)})
    overlap: dict[str, list] = {name: [] for name in runs if "window" in name}
    tau: dict[str, list] = {name: [] for name in overlap}
    for number, (qid, query) in enumerate(queries.items(), 1):
        ids = [pid for pid in bm25[qid][:100] if pid in texts]
        vectors = pipeline.encoder.encode([texts[pid] for pid in ids])
        runs["bm25"][qid] = {pid: float(len(ids) - i) for i, pid in enumerate(ids)}
        ranked = {"single pass (100)": pipeline.rank(query, vectors, single)}
        ranked.update({f"{name} (window {window})": pipeline.rank(query, vectors, settings)
                       for name, settings in strategies(window).items()})
        orders = {name: [ids[i] for i in order] for name, (order, _) in ranked.items()}
        for name, order in orders.items():
            runs[name][qid] = {pid: float(len(order) - i) for i, pid in enumerate(order)}
        for name in overlap:
            overlap[name].append(len(set(orders[name][:10]) & set(orders["single pass (100)"][:10])) / 10)
            tau[name].append(kendall_tau(orders[name], orders["single pass (100)"]))
        print(f"agreement: query {number}/{len(queries)}", flush=True)
    return {"queries": len(queries), "window": window,
            "ndcg_at_10": {name: ndcg_at_10(qrels, run) for name, run in runs.items()},
            "top10_overlap_with_single_pass": {name: float(np.mean(v)) for name, v in overlap.items()},
            "kendall_tau_with_single_pass": {name: float(np.mean(v)) for name, v in tau.items()}}


def markdown(result: dict) -> str:
    lines = ["# Ranking past one reranker pass", "", f"Build: `{result['build']}`; {result['machine']}.", "",
             "## Latency vs candidates (reranker passes only; median ms)", "",
             "| strategy | n | passes | sequential rounds | median ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['strategy']} | {r['n']} | {r['passes']} | {r['rounds']} | {r['median_s'] * 1e3:.1f} |"
              for r in result["latency"]]
    if "agreement" in result:
        a = result["agreement"]
        lines += ["", f"## Agreement with one pass, DL19 BM25 top-100, window {a['window']} ({a['queries']} queries)",
                  "", "| ranking | top-10 overlap with single pass | Kendall tau | nDCG@10 |", "|---|---:|---:|---:|"]
        for name, ndcg in a["ndcg_at_10"].items():
            over = a["top10_overlap_with_single_pass"].get(name)
            tau = a["kendall_tau_with_single_pass"].get(name)
            lines.append(f"| {name} | {'' if over is None else f'{over:.3f}'} | "
                         f"{'' if tau is None else f'{tau:.3f}'} | {ndcg:.4f} |")
    c = result["context_free"]
    lines += ["", f"## Context-free scorer ({c['candidates']} candidates, window {c['window']}, {c['seeds']} seeds)", "",
              "| strategy | top-10 overlap with the true sort | Kendall tau |", "|---|---:|---:|"]
    lines += [f"| {name} | {c['top10_overlap'][name]:.3f} | {c['kendall_tau'][name]:.3f} |" for name in c["top10_overlap"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name in {r["strategy"] for r in result["latency"]}:
        rows = [r for r in result["latency"] if r["strategy"] == name]
        axes.plot([r["n"] for r in rows], [r["median_s"] * 1e3 for r in rows], marker="o", label=name)
    axes.set(xscale="log", yscale="log", xlabel="candidates", ylabel="median ms (reranker passes)",
             title="Ranking past one pass")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--build", type=Path)
    parser.add_argument("--data", type=Path, help="BEIR folder with run.bm25.trec (DL19) for the agreement rows")
    parser.add_argument("--window", type=int, default=20, help="candidates per pass in the agreement rows")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    build = args.build or demo_build()
    pipeline = ResRankPipeline(build)
    data_texts = [p.text for p in iter_passages(args.data / "corpus.jsonl")][:max(SIZES)] if args.data else None
    if data_texts is None:
        from resrank_export.data.default_corpus import stdlib_passages

        data_texts = [p.text for p in stdlib_passages(limit=max(SIZES))]
    vectors = pipeline.encoder.encode(data_texts)
    if len(vectors) < max(SIZES):
        vectors = np.resize(vectors, (max(SIZES), vectors.shape[1]))  # the embedded corpus is smaller: repeat it
    result = {"build": str(build), "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
              "window": pipeline.passes.window, "latency": latency(pipeline, vectors, "how do I parse JSON", args.repeats)}
    result["context_free"] = context_free(args.window)
    if args.data:
        result["agreement"] = agreement(pipeline, args.data, args.window)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rerank_passes.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "rerank_passes.md").write_text(markdown(result))
    plot(result, args.out / "rerank_passes_latency.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
