"""The served path a user gets without flags (issue 30): a build's repository written with the
default `--cpu-runtime auto` against one written with ONNX Runtime FP32 (the default before
`auto`), both served at once by real tritonservers and loaded in alternation, round after round
(so both see the same background load; the figures are medians over the rounds): search-ensemble
throughput and latency at 1, 4 and 16 clients (DL19 queries, tritonclient HTTP from a separate
process),
and the min cosine of the served passage embeddings (the `passage_encoder` model, which calls the
served `encoder`) to the build's FP32 encoder graph on ONNX Runtime, on held-out DL19 passages
(neither indexed by the demo nor among the parity check's candidates).

    python benchmarks/served_default.py BUILD --out RESULTS_DIR [--data ../shared/data/dl19]
        [--held-out 256] [--clients 1,4,16] [--requests-per-client 16] [--rounds 3]

Writes RESULTS_DIR/served_default.{json,md}. Throughputs are ratios within one run."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def held_out_passages(data: Path, build: Path, count: int, seed: int = 0) -> list[str]:
    """`count` DL19 passages chosen with a seed, none of them among the build's parity candidates."""
    from resrank_export.data.readers import iter_passages
    from resrank_export.export.parity import ParityConfig, load_parity_data
    from resrank_export.model.checkpoint import CONFIG_FILE, ResRankConfig

    settings = ResRankConfig.from_json(json.loads((build / CONFIG_FILE).read_text()), build / CONFIG_FILE)
    parity = load_parity_data(ParityConfig(data_dir=data, queries=3), settings.max_candidates)
    seen = {text for candidates in parity.candidates for text in candidates}
    pool = [p.text for _, p in zip(range(20 * count), iter_passages(data)) if p.text not in seen]
    picked = np.random.default_rng(seed).choice(len(pool), size=count, replace=False)
    return [pool[i] for i in sorted(picked)]


def served_embeddings(url: str, passages: list[str], chunk: int = 16) -> np.ndarray:
    from resrank_export.triton.client import ResRankClient

    with ResRankClient(url) as client:
        return np.concatenate([client.infer("passage_encoder", {"PASSAGES": np.array([passages[i:i + chunk]],
                                                                                     dtype=object)},
                                            ["passage_embeddings"])["passage_embeddings"][0]
                               for i in range(0, len(passages), chunk)])


def fp32_embeddings(build: Path, passages: list[str]) -> np.ndarray:
    from resrank_export.model.checkpoint import CONFIG_FILE, ResRankConfig
    from resrank_export.model.text import PassageTokenizer
    from resrank_export.runtime import encode_texts, ort_session

    settings = ResRankConfig.from_json(json.loads((build / CONFIG_FILE).read_text()), build / CONFIG_FILE)
    tokenizer = PassageTokenizer.for_config(build / "tokenizer" / "encoder" / "tokenizer.json", settings)
    return encode_texts(ort_session(build / "onnx" / "fp32" / "encoder.onnx"), tokenizer, passages, 32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dl19")
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from resrank_export.bench.served import drive_load
    from resrank_export.data.readers import read_queries
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository
    from resrank_export.triton.server import ServerConfig, TritonServer

    clients = [int(c) for c in args.clients.split(",")]
    queries = sorted(read_queries(args.data).values())
    passages = held_out_passages(args.data, args.build, args.held_out)
    reference = fp32_embeddings(args.build, passages)
    result = {"build": str(args.build), "data": str(args.data), "held_out_passages": len(passages),
              "top_k": args.top_k, "requests_per_client": args.requests_per_client, "paths": {}}
    spawn = multiprocessing.get_context("spawn")
    paths = {"default (auto)": "auto", "ONNX Runtime FP32 (the default before auto)": "onnxruntime"}
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(max_workers=1, mp_context=spawn) as loader, \
            ExitStack() as servers:
        urls = {}
        for label, runtime in paths.items():
            repository = Path(tmp) / runtime
            summary = write_repository(TritonConfig(build=args.build, out=repository, index=args.build / "index",
                                                    cpu_runtime=runtime))
            print(f"{label}: {summary['cpu_path']['reason']}", flush=True)
            server = servers.enter_context(TritonServer(ServerConfig(repository=repository)))
            urls[label] = server.http_url
            result["paths"][label] = {"cpu_path": summary["cpu_path"], "rounds": {str(c): [] for c in clients},
                                      "min_cosine_to_fp32": min_cosine(served_embeddings(server.http_url, passages),
                                                                       reference)}
        for number in range(args.rounds):
            for concurrency in clients:
                n = max(64, args.requests_per_client * concurrency)
                payloads = [(queries[(number * n + i) % len(queries)], args.top_k) for i in range(n)]
                order = list(urls.items())[::-1 if number % 2 else 1]  # alternated: neither always goes first
                for label, url in order:  # one path after the other at each level: the same background load
                    stats = loader.submit(drive_load, url, "search", payloads, concurrency, 1).result()
                    result["paths"][label]["rounds"][str(concurrency)].append(stats)
                    print(f"round {number + 1}, {label}, {concurrency} clients: {stats}", flush=True)
    for entry in result["paths"].values():
        entry["levels"] = {c: {key: statistics.median(r[key] for r in rounds) for key in ("p50_s", "p99_s",
                                                                                        "throughput_rps")}
                           for c, rounds in entry["rounds"].items()}
    auto, base = result["paths"].values()
    top = str(max(clients))
    ratios = [a["throughput_rps"] / b["throughput_rps"] for a, b in zip(auto["rounds"][top], base["rounds"][top])]
    result["throughput_ratio_at_top"] = {"median": statistics.median(ratios), "per_round": ratios}
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result.update(load_average_1m=os.getloadavg()[0], cores=os.cpu_count())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "served_default.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The default served path vs ONNX Runtime FP32 (same build, same run)", "",
             f"Build {args.build}; search ensemble top-{args.top_k} on DL19 queries; min cosine of the served "
             f"passage embeddings to the FP32 graph on ONNX Runtime over {len(passages)} held-out DL19 passages.", "",
             *[f"- {label}: {entry['cpu_path']['reason']}" for label, entry in result["paths"].items()], "",
             "| path | clients | p50 ms | p99 ms | req/s | min cosine to FP32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, entry in result["paths"].items():
        for concurrency, stats in entry["levels"].items():  # medians over the rounds
            lines.append(f"| {label}: {entry['cpu_path']['runtime']}/{entry['cpu_path']['compute']} | "
                         f"{concurrency} | {stats['p50_s'] * 1e3:.1f} | "
                         f"{stats['p99_s'] * 1e3:.1f} | {stats['throughput_rps']:.1f} | "
                         f"{entry['min_cosine_to_fp32']:.6f} |")
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    lines += ["", f"Default / ONNX Runtime FP32 throughput at {top} clients: **{statistics.median(ratios):.2f}×** "
                  f"(median of {len(ratios)} rounds: {per_round}). Medians over {args.rounds} rounds; 1-min load "
                  f"average at the end {result['load_average_1m']:.1f} on {result['cores']} cores."]
    (args.out / "served_default.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
