"""Served pipeline: both Triton ensembles (`resrank`: query -> retrieve -> rerank, and
`resrank_rerank`: query + passages -> order) on the real local tritonserver, driven by
tritonclient from a separate process at each concurrency; against the same pipeline run
in-process on the same graphs and index. Reports latency p50/p95/p99, throughput, the serving
overhead at concurrency 1 and the dynamic-batching gain (same load, Triton max_batch_size N vs 1).

Uses resrank_export.triton, resrank_export.index.pipeline and resrank_export.index.stage when they are
installed; otherwise the result says which piece is missing."""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from resrank_export.bench.config import BenchConfig, BenchContext
from resrank_export.bench.timing import percentile
from resrank_export.errors import ResRankExportError

log = logging.getLogger(__name__)
ENSEMBLES = ("search", "rerank")  # ResRankClient / ResRankPipeline method per ensemble
_NEEDED = {"resrank_export.triton.server": "the Triton server launcher (branch triton)",
           "resrank_export.triton.client": "the Triton client helpers (branch triton)",
           "resrank_export.triton.repository": "the model repository writer (branch triton)",
           "resrank_export.index.pipeline": "the in-process pipeline (branch triton)",
           "resrank_export.index.stage": "the FAISS index (branch index)",
           "tritonclient.http": "tritonclient (pip install 'resrank-export[triton]')",
           "pytriton": "tritonserver from nvidia-pytriton (pip install 'resrank-export[triton]')",
           "faiss": "faiss (pip install 'resrank-export[index]')"}


def missing_pieces() -> list[str]:
    """What the served benchmark needs and this installation lacks, in words."""
    missing = []
    for module, what in _NEEDED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package
            found = False
        if not found:
            missing.append(f"{what}: module {module} not found")
    return missing


def latency_stats(latencies: list[float], wall_s: float) -> dict:
    return {"requests": len(latencies), "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "p99_s": percentile(latencies, 99), "wall_s": wall_s, "throughput_rps": len(latencies) / wall_s}


def _payloads(config: BenchConfig, context: BenchContext) -> dict[str, list[tuple]]:
    """Requests of each ensemble, cycling over the benchmark's queries."""
    data, n = context.data, max(map(config.served_level_requests, config.served_concurrency))
    pairs = list(zip(data.queries, data.candidates))
    return {"search": [(pairs[i % len(pairs)][0], config.served_top_k) for i in range(n)],
            "rerank": [(pairs[i % len(pairs)][0], pairs[i % len(pairs)][1][:config.served_top_k]) for i in range(n)]}


def drive_load(url: str, ensemble: str, payloads: list[tuple], concurrency: int, warmup: int) -> dict:
    """Runs in the load process: `concurrency` threads, one HTTP client each (tritonclient's
    HTTP client is not thread-safe), all released together; per-request latencies and wall time."""
    from resrank_export.triton.client import ResRankClient

    shares = [share for share in (payloads[i::concurrency] for i in range(concurrency)) if share]
    start_line = threading.Barrier(len(shares) + 1)  # fewer payloads than clients: only the clients with work
    latencies: list[float] = []
    errors: list[str] = []

    def client_thread(share: list[tuple]) -> None:
        try:
            with ResRankClient(url) as client:
                call = getattr(client, ensemble)
                for payload in share[:warmup]:
                    call(*payload)
                start_line.wait()
                for payload in share:
                    begin = time.perf_counter()
                    call(*payload)
                    latencies.append(time.perf_counter() - begin)
        except Exception as exc:  # reported to the parent as data; exceptions may not pickle
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            start_line.abort()

    threads = [threading.Thread(target=client_thread, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    try:
        start_line.wait()
    except threading.BrokenBarrierError:
        pass
    begin = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    if errors:
        return {"error": errors[0]}
    return latency_stats(latencies, wall)


def _in_process(build: Path, index: Path, payloads: dict[str, list[tuple]], warmup: int) -> dict:
    from resrank_export.index.pipeline import ResRankPipeline

    pipeline = ResRankPipeline(build, index)
    result = {}
    for ensemble, requests in payloads.items():
        call = getattr(pipeline, ensemble)
        for payload in requests[:warmup]:
            call(*payload)
        latencies, begin = [], time.perf_counter()
        for payload in requests:
            start = time.perf_counter()
            call(*payload)
            latencies.append(time.perf_counter() - start)
        result[ensemble] = latency_stats(latencies, time.perf_counter() - begin)
        log.info("in-process %s: p50 %.1f ms, %.1f req/s", ensemble, result[ensemble]["p50_s"] * 1e3,
                 result[ensemble]["throughput_rps"])
    return result


def _served(config: BenchConfig, context: BenchContext, repository: Path,
            payloads: dict[str, list[tuple]], loader: ProcessPoolExecutor) -> dict:
    """Start tritonserver on `repository`, drive each ensemble at each concurrency."""
    from resrank_export.triton.server import ServerConfig, TritonServer

    result: dict = {}
    with TritonServer(ServerConfig(repository=repository)) as server:
        for ensemble in ENSEMBLES:
            for concurrency in config.served_concurrency:
                requests = payloads[ensemble][:config.served_level_requests(concurrency)]
                stats = loader.submit(drive_load, server.http_url, ensemble, requests, concurrency,
                                      config.warmup).result()
                result.setdefault(ensemble, {})[str(concurrency)] = stats
                log.info("served %s c=%d: %s", ensemble, concurrency,
                         stats.get("error") or f"p50 {stats['p50_s'] * 1e3:.1f} ms, {stats['throughput_rps']:.1f} req/s")
            server.check_running()
    return result


def _write_corpus(passages: list[str], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for number, text in enumerate(passages):
            handle.write(json.dumps({"_id": f"p{number}", "text": text}) + "\n")
    return path


def bench_served(config: BenchConfig, context: BenchContext) -> dict:
    """Latency and throughput served vs in-process; returns the result dict (status "not
    available" with the reason when a piece is missing)."""
    result = {"benchmark": "served", "concurrency": list(config.served_concurrency), "top_k": config.served_top_k,
              "requests_per_level": {str(c): config.served_level_requests(c) for c in config.served_concurrency},
              "index_passages": config.served_passages,
              "batch_sizes": list(config.served_batch_sizes), "data": context.data.source,
              "graphs": {"precision": config.served_precision, "runtime": config.served_runtime,
                         "openvino_compute": config.served_openvino_compute}}
    missing = missing_pieces()
    if missing:
        log.info("served: not available (%s)", "; ".join(missing))
        return {**result, "status": "not available", "reason": "; ".join(missing)}
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.stage import build_index
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository

    threads = context.threads or context.machine["physical_cores"] or 1
    payloads = _payloads(config, context)
    with tempfile.TemporaryDirectory(prefix="resrank-bench-served-") as tmp:
        work = Path(tmp)
        corpus = _write_corpus(context.data.passages[:config.served_passages], work / "corpus.jsonl")
        build_index(IndexConfig(build=context.build, corpus=corpus, out=work / "index"))
        alone = config.served_level_requests(1)  # in-process is compared with concurrency 1
        result["in_process"] = _in_process(context.build, work / "index",
                                           {name: requests[:alone] for name, requests in payloads.items()},
                                           config.warmup)
        served = {}
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as loader:
            for batch in config.served_batch_sizes:
                repository = work / f"repository-max-batch-{batch}"
                summary = write_repository(TritonConfig(build=context.build, out=repository, index=work / "index",
                                                        max_batch_size=batch, ort_threads=threads,
                                                        precision=config.served_precision,
                                                        cpu_runtime=config.served_runtime,
                                                        openvino_compute=config.served_openvino_compute))
                result["graphs"]["cpu_path"] = summary["cpu_path"]  # what `auto` picked, and why
                try:
                    served[str(batch)] = _served(config, context, repository, payloads, loader)
                except ResRankExportError as exc:
                    return {**result, "status": "failed", "reason": str(exc).splitlines()[0]}
    result.update(status="ok", served=served, ort_threads=threads, **summarize_served(result["in_process"], served,
                                                                                     config))
    return result


def summarize_served(in_process: dict, served: dict, config: BenchConfig) -> dict:
    """Serving overhead at concurrency 1 (p50 served / p50 in-process - 1) and dynamic-batching
    gain (throughput at the highest concurrency, max_batch_size first vs last)."""
    first, last = str(config.served_batch_sizes[0]), str(config.served_batch_sizes[-1])
    top = str(max(config.served_concurrency))
    overhead, gain = {}, {}
    for ensemble in ENSEMBLES:
        levels = served[first][ensemble]
        if "1" in levels and "p50_s" in levels["1"]:
            overhead[ensemble] = levels["1"]["p50_s"] / in_process[ensemble]["p50_s"] - 1
        with_batching, without = levels.get(top, {}), served[last][ensemble].get(top, {})
        if first != last and "throughput_rps" in with_batching and "throughput_rps" in without:
            gain[ensemble] = with_batching["throughput_rps"] / without["throughput_rps"]
    return {"overhead_at_concurrency_1": overhead, "dynamic_batching_gain": gain,
            "dynamic_batching_compared": f"max_batch_size {first} vs {last} at concurrency {top}"}
