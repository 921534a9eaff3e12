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
@click.option("--calibration", type=click.Path(path_type=Path),
              help="fp16/int8: calibration folder written by `resrank-export calibrate`.")
@click.option("--calibration-corpus", type=click.Path(path_type=Path),
              help="fp16/int8: build the calibration set from this BEIR folder or JSONL/TSV passage file "
                   "(default: the embedded standard-library corpus).")
@click.option("--calibration-method", type=click.Choice(["entropy", "max"]), default="entropy", show_default=True,
              help="int8: how ModelOpt picks the activation ranges.")
@click.option("--int8-exclude-op", multiple=True, help="int8: op type left unquantized (repeatable).")
@click.option("--int8-exclude-node", multiple=True, help="int8: node-name regex left unquantized (repeatable).")
@click.option("--fidelity-retrieval-data", type=click.Path(path_type=Path),
              help="fp16/int8: BEIR folder with qrels (e.g. SciFact) for the encoder nDCG@10 comparison.")
@click.option("--fidelity-rerank-data", type=click.Path(path_type=Path),
              help="fp16/int8: BEIR folder with run.bm25.trec (e.g. DL19) for the reranker comparison.")
def build(checkpoint, precision, out, parity_data, parity_queries, opset, external_data, force, calibration,
          calibration_corpus, calibration_method, int8_exclude_op, int8_exclude_node, fidelity_retrieval_data,
          fidelity_rerank_data) -> None:
    """Export the encoder and reranker to ONNX, check parity with PyTorch, make FP16/INT8 graphs
    with a fidelity report if asked, and write the manifest."""
    from resrank_export.build import BuildConfig, run_build
    from resrank_export.calibration import CalibrationConfig
    from resrank_export.export import ExportConfig
    from resrank_export.fidelity import FidelityConfig
    from resrank_export.parity import ParityConfig
    from resrank_export.precision import PrecisionConfig

    config = BuildConfig(out=out, checkpoint=checkpoint, precision=precision, force=force,
                         export=ExportConfig(opset=opset, external_data=external_data),
                         parity=ParityConfig(data_dir=parity_data, queries=parity_queries),
                         calibration=calibration, calibration_set=CalibrationConfig(corpus=calibration_corpus),
                         precision_graphs=PrecisionConfig(calibration_method=calibration_method,
                                                          int8_exclude_ops=tuple(int8_exclude_op),
                                                          int8_exclude_nodes=tuple(int8_exclude_node)),
                         fidelity=FidelityConfig(retrieval_data=fidelity_retrieval_data,
                                                 rerank_data=fidelity_rerank_data))
    manifest = run_build(config)
    parity = manifest["stages"]["parity"]["report"]
    click.echo(f"build written to {out}: reranker max |diff| {parity['reranker']['max_abs_diff']:.2e}, "
               f"encoder max |diff| {parity['encoder']['max_abs_diff']:.2e}, parity "
               f"{'passed' if parity['passed'] else 'FAILED'}; stages: "
               + ", ".join(f"{k} {v['status']}" for k, v in manifest["stages"].items()))
    if precision != "fp32":
        click.echo(f"{precision} fidelity vs fp32: {out / 'fidelity.md'}")


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


# --- precision (calibration sets) ----------------------------------------------------------------

@main.command()
@click.option("--corpus", type=click.Path(path_type=Path),
              help="BEIR folder (corpus.jsonl, queries.jsonl, optional run.bm25.trec) or JSONL/TSV passage "
                   "file. Default: the embedded standard-library corpus.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for encoder.npz, reranker.npz and card.json (written atomically).")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="ResRank checkpoint whose FP32 encoder makes the slot vectors. Default: the demo checkpoint.")
@click.option("--encoder-samples", type=int, default=64, show_default=True, help="Passages in the encoder set.")
@click.option("--reranker-queries", type=int, default=16, show_default=True, help="Queries in the reranker set.")
@click.option("--candidates", type=click.IntRange(min=1),
              help="Candidates per reranker query. Default: the checkpoint's max_candidates.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the passage and query sample.")
def calibrate(corpus, out, checkpoint, encoder_samples, reranker_queries, candidates, seed) -> None:
    """Write INT8 calibration sets for both graphs from real text."""
    from resrank_export.calibration import CalibrationConfig, calibrate_checkpoint

    card = calibrate_checkpoint(checkpoint, out, CalibrationConfig(
        corpus=corpus, encoder_samples=encoder_samples, reranker_queries=reranker_queries,
        candidates=candidates, seed=seed))
    click.echo(f"calibration set written to {out}: {card['encoder']['samples']} passages, "
               f"{card['reranker']['queries']} queries x {card['reranker']['candidates']} candidates")
