"""Command line: parses options, builds a stage config, calls the library. Nothing else."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from resrank_export.errors import ResRankExportError

log = logging.getLogger("resrank_export")
_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch", "transformers", "modelopt", "urllib3")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False, markup=False)], force=True)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        import warnings

        import torch._logging
        import transformers

        warnings.filterwarnings("ignore")
        torch._logging.set_logs(onnx=logging.ERROR)  # torch's own handlers ignore the levels above
        transformers.utils.logging.disable_progress_bar()


class _Group(click.Group):
    """Turns our typed errors into one line on stderr and their exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ResRankExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs, including the exporters' own.")
@click.version_option(package_name="resrank-export")
def main(verbose: bool) -> None:
    """Export a ResRank retrieval+reranking model for deployment: ONNX graphs checked against
    PyTorch, FP16/INT8 precision, a FAISS index and a Triton model repository."""
    _setup_logging(verbose)


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="ResRank checkpoint folder (resrank.json, encoder/, reranker/). "
                   "Default: the demo checkpoint, built once and cached.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Numeric precision of the graphs to deploy.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("resrank-build"), show_default=True,
              help="Build folder; replaced atomically, finished stages are reused on rerun.")
@click.option("--parity-data", type=click.Path(path_type=Path),
              help="BEIR folder with queries.jsonl, corpus.jsonl and run.bm25.trec (e.g. TREC DL19) "
                   "for the parity check. Default: the embedded standard-library corpus.")
@click.option("--parity-queries", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many queries the parity check ranks.")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset.")
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights beside the graph (.onnx.data). Default: only when over 1 GiB.")
@click.option("--force", is_flag=True, help="Run every stage even if its inputs are unchanged.")
def build(checkpoint, precision, out, parity_data, parity_queries, opset, external_data, force) -> None:
    """Export the encoder and reranker to ONNX, check parity with PyTorch and write the manifest."""
    from resrank_export.build import BuildConfig, run_build
    from resrank_export.export import ExportConfig
    from resrank_export.parity import ParityConfig

    config = BuildConfig(out=out, checkpoint=checkpoint, precision=precision, force=force,
                         export=ExportConfig(opset=opset, external_data=external_data),
                         parity=ParityConfig(data_dir=parity_data, queries=parity_queries))
    manifest = run_build(config)
    parity = manifest["stages"]["parity"]["report"]
    click.echo(f"build written to {out}: reranker max |diff| {parity['reranker']['max_abs_diff']:.2e}, "
               f"encoder max |diff| {parity['encoder']['max_abs_diff']:.2e}, parity "
               f"{'passed' if parity['passed'] else 'FAILED'}; stages: "
               + ", ".join(f"{k} {v['status']}" for k, v in manifest["stages"].items()))


@main.command("demo-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--reranker", type=click.Choice(["qwen3", "minilm"]), default="qwen3", show_default=True,
              help="qwen3: small seeded Qwen3 (untrained); minilm: BERT reranker initialised from "
                   "the MiniLM weights (pretrained activation statistics, also untrained for ranking).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random reranker weights.")
def demo_checkpoint(out: Path, reranker: str, seed: int) -> None:
    """Write a checkpoint from the bundled all-MiniLM-L6-v2 encoder and an untrained reranker
    (no download). Its rankings are not meaningful; its graphs and shapes are."""
    from resrank_export.demo import build_demo_checkpoint

    if out.exists():
        raise ResRankExportError(f"{out}: already exists; choose a new folder")
    build_demo_checkpoint(out, reranker=reranker, seed=seed)
    click.echo(f"demo checkpoint written to {out}")


# --- Benchmarks -----------------------------------------------------------------------------------


@main.command()
@click.option("--smoke", is_flag=True, help="Tiny sizes (seconds): checks the benchmarks run, figures mean nothing.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
              help="Results folder (JSON, summary.md, plots); replaced atomically.")
@click.option("--only", default="encoder,reranker,served,flops", show_default=True,
              help="Comma-separated benchmarks to run.")
@click.option("--build", "build_dir", type=click.Path(path_type=Path),
              help="Build folder (from `resrank-export build`). Default: the demo checkpoint's build, cached.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Checkpoint for the PyTorch baselines. Default: the one recorded in the build's manifest.")
@click.option("--data", type=click.Path(path_type=Path),
              help="BEIR folder with corpus.jsonl, queries.jsonl, run.bm25.trec (e.g. ../shared/data/dl19). "
                   "Default: the embedded standard-library corpus.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Intra-op threads for torch and ONNX Runtime; 0: library defaults.")
@click.option("--repeats", type=click.IntRange(min=1), help="Timed repeats (default: the preset's).")
def bench(smoke, out, only, build_dir, checkpoint, data, threads, repeats) -> None:
    """Run the benchmarks: encoder throughput, reranker latency vs k, served pipeline, FLOPs."""
    from resrank_export.bench.config import BenchConfig
    from resrank_export.bench.run import run_bench

    preset = BenchConfig.smoke if smoke else BenchConfig.full
    overrides = {"repeats": repeats} if repeats else {}
    config = preset(out=out, only=tuple(n.strip() for n in only.split(",") if n.strip()), build=build_dir,
                    checkpoint=checkpoint, data=data, threads=threads, **overrides)
    run_bench(config, command=" ".join(["resrank-export", *sys.argv[1:]]))
    click.echo(f"benchmark results written to {out} (summary: {out / 'summary.md'})")
