"""Command line: parses options, builds a stage config, calls the library. Nothing else."""

from __future__ import annotations

import json
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
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: also build TensorRT plans for this machine's GPU (needs TensorRT and a GPU).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest request batch the TensorRT profiles admit.")
@click.option("--workspace", default="4GiB", show_default=True, help="TensorRT builder workspace limit.")
def build(checkpoint, precision, out, parity_data, parity_queries, opset, external_data, force, backend,
          max_batch, workspace) -> None:
    """Export the encoder and reranker to ONNX, check parity with PyTorch and write the manifest."""
    from resrank_export.build import BuildConfig, run_build
    from resrank_export.engine.profiles import EngineConfig
    from resrank_export.export import ExportConfig
    from resrank_export.parity import ParityConfig
    from resrank_export.plan import parse_size

    config = BuildConfig(out=out, checkpoint=checkpoint, precision=precision, force=force, backend=backend,
                         engine=EngineConfig(max_batch=max_batch, workspace_bytes=parse_size(workspace)),
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


# --- TensorRT engines and memory planning ----------------------------------------------------

@main.command("plan")
@click.option("--gpu-memory", required=True, help="GPU memory to plan for, e.g. 16GiB, 24GB, 80GiB.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="ResRank checkpoint folder. Default: the demo checkpoint.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Request batch to plan for.")
@click.option("--workspace", default="4GiB", show_default=True, help="TensorRT builder workspace limit.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(gpu_memory, checkpoint, max_batch, workspace, as_json) -> None:
    """Estimate GPU memory (weights + activations + workspace) per precision and the largest batch / k that fit."""
    from resrank_export.engine.profiles import EngineConfig
    from resrank_export.plan import PlanConfig, parse_size, plan_checkpoint, render_plan

    result = plan_checkpoint(checkpoint, PlanConfig(parse_size(gpu_memory), EngineConfig(
        max_batch=max_batch, workspace_bytes=parse_size(workspace))))
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else render_plan(result))


@main.group()
def engines() -> None:
    """TensorRT plans of a build folder: build them on this GPU, check and install them."""


@engines.command("ensure")
@click.option("--build", "build_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Build folder (from `resrank-export build`).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True)
@click.option("--repository", type=click.Path(path_type=Path, file_okay=False),
              help="Triton repository whose tensorrt models receive the plans (cc_model_filenames).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--workspace", default="4GiB", show_default=True)
@click.option("--dry-run", is_flag=True, help="Only print what would be kept or built.")
@click.option("--tensorrt-version", envvar="RESRANK_TENSORRT_VERSION",
              help="Decide for this TensorRT version instead of the installed one (with --compute-capability).")
@click.option("--compute-capability", envvar="RESRANK_GPU_COMPUTE_CAPABILITY", help="e.g. 8.9")
@click.option("--gpu-name", envvar="RESRANK_GPU_NAME", default="unnamed GPU", show_default=True)
def engines_ensure(build_dir, precision, repository, max_batch, workspace, dry_run, tensorrt_version,
                   compute_capability, gpu_name) -> None:
    """Build the plans this GPU lacks (missing, other TensorRT release or architecture, changed graph)."""
    from resrank_export.engine.profiles import EngineConfig
    from resrank_export.engine.stage import EnsureConfig, run_ensure
    from resrank_export.engine.manifest import GpuRuntime
    from resrank_export.plan import parse_size

    if bool(tensorrt_version) != bool(compute_capability):
        raise click.UsageError("--tensorrt-version and --compute-capability go together")
    runtime = GpuRuntime(tensorrt_version, gpu_name, compute_capability) if tensorrt_version else None
    actions = run_ensure(EnsureConfig(build_dir, precision, EngineConfig(max_batch=max_batch,
                                      workspace_bytes=parse_size(workspace)), runtime, repository, dry_run))
    for action in actions:
        click.echo(f"{action.graph}: {action.action} - {action.reason}")


@engines.command("check")
@click.argument("builds", nargs=-1, required=True)
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False), help="Also write the results as JSON.")
def engines_check(builds, report) -> None:
    """Compare this GPU's plans with ONNX Runtime and time both. BUILDS: FOLDER:PRECISION, e.g. out/fp16:fp16."""
    from resrank_export.engine.check import check_builds, render_checks

    pairs = []
    for item in builds:
        folder, _, precision = item.rpartition(":")
        if not folder or precision not in ("fp32", "fp16", "int8"):
            raise click.BadParameter(f"{item!r}: expected FOLDER:PRECISION with precision fp32, fp16 or int8")
        pairs.append((Path(folder), precision))
    results = check_builds(pairs, report)
    click.echo(render_checks(results))
    if not all(r.passed for r in results):
        raise SystemExit(1)
