"""`run_bench`: resolve the build folder, its checkpoint and the text, run the selected
benchmarks (flops last: it reads the encoder and reranker timings of the same run) and write
the results folder atomically."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from resrank_export.bench.config import BenchConfig, BenchContext, default_path, graph_file, load_bench_data
from resrank_export.bench.report import SUMMARY_FILE, write_results
from resrank_export.bench.timing import apply_threads, machine_info
from resrank_export.errors import ResRankExportError
from resrank_export.fs import atomic_dir, refuse_foreign_folder
from resrank_export.manifest import MANIFEST_FILE
from resrank_export.model.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)
BENCH_BUILD = "bench-build"


def resolve_build(config: BenchConfig) -> Path:
    """The given build folder, or the demo checkpoint's build (made once, then reused)."""
    if config.build is not None:
        build = Path(config.build)
    else:
        from resrank_export.build import BuildConfig, run_build
        from resrank_export.model.demo import cache_dir

        build = cache_dir() / BENCH_BUILD
        log.info("no --build given: using the demo checkpoint's build at %s", build)
        run_build(BuildConfig(out=build))
    for name in ("encoder", "reranker"):
        path, reason = graph_file(build, "fp32", name)
        if path is None:
            raise ResRankExportError(f"--build {build}: {reason}; expected a folder from `resrank-export build`")
    return build


def resolve_checkpoint(config: BenchConfig, build: Path) -> Checkpoint:
    """--checkpoint, else the one recorded in <build>/manifest.json, else the demo checkpoint."""
    if config.checkpoint is not None:
        return load_checkpoint(config.checkpoint)
    manifest = build / MANIFEST_FILE
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("inputs", {}).get("checkpoint", {}).get("path")
        if recorded and Path(recorded).is_dir():
            return load_checkpoint(recorded)
    from resrank_export.model.demo import default_checkpoint

    log.warning("bench: no checkpoint recorded for %s; using the demo checkpoint for the PyTorch baselines", build)
    return load_checkpoint(default_checkpoint())


def run_bench(config: BenchConfig, command: str = "resrank-export bench") -> dict[str, dict]:
    """Run the selected benchmarks and write `config.out`; returns the results by name."""
    from resrank_export.bench.encoder import bench_encoder
    from resrank_export.bench.flops import bench_flops
    from resrank_export.bench.reranker import bench_reranker
    from resrank_export.bench.served import bench_served

    config.validate()
    out = Path(config.out)
    refuse_foreign_folder(out, SUMMARY_FILE, "a benchmark results folder")
    build = resolve_build(config)
    checkpoint = resolve_checkpoint(config, build)
    data = load_bench_data(config.data, max(config.encoder_passages, config.served_passages),
                           config.reranker_queries, max(*config.reranker_ks, config.served_top_k))
    context = BenchContext(build, checkpoint, data, machine_info(apply_threads(config.threads)), config.threads,
                           default_path(build, config.served_precision))
    log.info("default served path: %s", context.default_path["reason"])
    runners = {"encoder": bench_encoder, "reranker": bench_reranker, "served": bench_served,
               "flops": lambda c, ctx: bench_flops(c, ctx, results)}
    results: dict[str, dict] = {}
    for name, runner in runners.items():
        if name not in config.only:
            continue
        log.info("benchmark %s: started (%s preset)", name, config.preset)
        start = time.perf_counter()
        results[name] = {**runner(config, context), "preset": config.preset}
        log.info("benchmark %s: finished in %.1fs", name, time.perf_counter() - start)
    with atomic_dir(out) as tmp:
        files = write_results(results, context.machine, command, tmp)
    log.info("results written to %s: %s", out, ", ".join(files))
    return results
