"""Vectors reused, served: a 100-document `/v1/rerank` through the real gateway and tritonserver
(demo build, python backend, CPU), for several DL19 queries and their BM25 top-100:

- `first`: the documents by text, never seen (the passage encoder encodes them);
- `repeated`: the same request again (the passage encoder's cache serves the vectors);
- `by ids`: the same documents as `{"id": ...}` of the served index (its stored vectors).

Ratios against `first`, in the same run. The index holds the BM25 top-100 of the queries used.

    python benchmarks/served_reuse.py OUT_DIR [--data ../shared/data/dl19] [--queries 5]

Writes OUT_DIR/served_reuse.json and .md; a few minutes on 2 cores (encoding the index, starting
Triton). Timings on a shared machine are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from rerank_passes import demo_build  # this folder is on sys.path when the script runs

from resrank_export.data.readers import iter_passages, read_queries, read_trec_run


def serve_gateway(repository: Path, triton_grpc: str):
    """The gateway app on uvicorn in a thread; returns (url, server)."""
    import uvicorn

    from resrank_export.triton.gateway import GatewayConfig, create_app
    from resrank_export.triton.server import free_port

    config = GatewayConfig(repository=repository, triton_url=triton_grpc, port=free_port(), timeout_s=600)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host=config.host, port=config.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return f"http://127.0.0.1:{config.port}", server


def main() -> None:
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.stage import build_index
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository
    from resrank_export.triton.server import ServerConfig, TritonServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dl19"))
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args()
    build = demo_build()
    queries = read_queries(args.data / "queries.jsonl")
    bm25 = read_trec_run(args.data / "run.bm25.trec")
    picked = [qid for qid in queries if bm25.get(qid)][:args.queries]
    wanted = {pid for qid in picked for pid in bm25[qid][:100]}
    texts = {p.id: p.text for p in iter_passages(args.data / "corpus.jsonl") if p.id in wanted}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"_id": pid, "text": text}) + "\n" for pid, text in texts.items()))
        build_index(IndexConfig(build=build, corpus=corpus, out=Path(work) / "index"))
        write_repository(TritonConfig(build=build, out=Path(work) / "repository", index=Path(work) / "index"))
        with TritonServer(ServerConfig(repository=Path(work) / "repository")) as triton:
            url, gateway = serve_gateway(Path(work) / "repository", triton.grpc_url)
            requests.post(f"{url}/v1/rerank", json={"query": "warm up", "documents": ["a warm-up text"]}, timeout=600)
            for qid in picked:
                ids = [pid for pid in bm25[qid][:100] if pid in texts]
                by_text = {"query": queries[qid], "documents": [texts[pid] for pid in ids]}
                by_id = {"query": queries[qid], "documents": [{"id": pid} for pid in ids]}
                times = {}
                for mode, body in (("first", by_text), ("repeated", by_text), ("by ids", by_id)):
                    begin = time.perf_counter()
                    answer = requests.post(f"{url}/v1/rerank", json=body, timeout=600)
                    times[mode] = time.perf_counter() - begin
                    assert answer.status_code == 200, answer.text
                rows.append({"query": qid, "documents": len(ids), **{f"{m}_s": t for m, t in times.items()}})
                print(rows[-1], flush=True)
            gateway.should_exit = True
    medians = {mode: float(np.median([r[f"{mode}_s"] for r in rows])) for mode in ("first", "repeated", "by ids")}
    result = {"build": str(build), "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
              "rows": rows, "median_s": medians,
              "first_over_repeated": medians["first"] / medians["repeated"],
              "first_over_by_ids": medians["first"] / medians["by ids"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "served_reuse.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Vectors reused: 100-document /v1/rerank through the gateway and Triton", "",
             f"Build: `{build}`; {result['machine']}; {len(rows)} DL19 queries, their BM25 top-100.", "",
             "| request | median s | first / this |", "|---|---:|---:|"]
    lines += [f"| {mode} | {medians[mode]:.3f} | {medians['first'] / medians[mode]:.2f} |" for mode in medians]
    (args.out / "served_reuse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
