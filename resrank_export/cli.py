"""Command line: parses options, builds a stage config, calls the library. Nothing else."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from resrank_export.config_file import load_config_callback, render_config, render_table
from resrank_export.errors import ResRankExportError
from resrank_export.export import MAX_OPSET, MIN_OPSET  # light: two numbers, no imports
from resrank_export.index.config import KINDS, VECTOR_DTYPES  # light: no numpy, no FAISS
from resrank_export.interrupt import Interrupted, stop_on_signals
from resrank_export.precision import PRECISIONS  # light: a tuple, no imports

log = logging.getLogger("resrank_export")
PORT = click.IntRange(min=0, max=65535)
SEED = click.IntRange(min=0, max=2**32 - 1)  # what numpy's and torch's generators all accept
_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch", "transformers", "modelopt", "urllib3", "faiss")


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
    """Turns our typed errors into one line on stderr and their exit code; SIGTERM and Ctrl-C
    stop a command cleanly (resrank_export/interrupt.py) with one line saying what was kept. A
    library's own exception that no stage turned into ours is still one line, never a traceback
    (-v logs it)."""

    def invoke(self, ctx: click.Context):
        try:
            with stop_on_signals():
                return super().invoke(ctx)
        except ResRankExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Interrupted as exc:
            click.echo(exc.summary(), err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            log.debug("unexpected error", exc_info=True)
            reason = (str(exc).strip().splitlines() or [""])[0]
            click.echo(f"error: {ctx.invoked_subcommand}: unexpected {type(exc).__name__}"
                       f"{': ' + reason if reason else ''} (rerun with -v for the traceback)", err=True)
            sys.exit(1)



def cpu_runtime_options(scope: str):
    """--cpu-runtime and --openvino-compute, the same for `build` (its repository stage) and `triton`."""
    def decorate(command):
        command = click.option("--openvino-compute", type=click.Choice(["f32", "bf16"]), default="f32",
                               show_default=True, help="--cpu-runtime openvino: precision of the floating-point "
                                                       "ops (bf16 on AMX / AVX512-BF16 CPUs).")(command)
        return click.option("--cpu-runtime", type=click.Choice(["auto", "onnxruntime", "openvino"]), default="auto",
                            show_default=True,
                            help=f"{scope}: run the encoder and reranker graphs on ONNX Runtime's CPU provider or "
                                 "OpenVINO's CPU plugin (pip install 'resrank-export[openvino]'; INT8 GEMMs for "
                                 "--precision int8). auto: the fastest path installed, native on this CPU and gated "
                                 "by the build's parity or fidelity stage (OpenVINO in BF16 on AMX / AVX512-BF16 "
                                 "CPUs, else ONNX Runtime FP32); the repository's resrank_repository.json says "
                                 "which and why.")(command)
    return decorate

@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs, including the exporters' own.")
@click.version_option(package_name="resrank-export")
def main(verbose: bool) -> None:
    """Export a ResRank retrieval+reranking model for deployment: ONNX graphs checked against
    PyTorch, FP16/BF16/INT8 precision, a FAISS index and a Triton model repository."""
    _setup_logging(verbose)


@main.command()
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), is_eager=True, expose_value=False,
              callback=load_config_callback,
              help="TOML file of build options (keys: option names without dashes, e.g. precision = \"fp16\"); "
                   "options given on the command line override it. See --print-config.")
@click.option("--print-config", is_flag=True,
              help="Print the resolved options (defaults, --config file, command line) as TOML and exit.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="ResRank checkpoint folder (resrank.json, encoder/, reranker/). "
                   "Default: the demo checkpoint, built once and cached.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Numeric precision of the graphs to deploy. bf16: for models that overflow in FP16 (Qwen); "
                   "served on GPUs (ONNX Runtime's CPU provider has no BF16 kernels).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("resrank-build"), show_default=True,
              help="Build folder; replaced atomically, finished stages are reused on rerun.")
@click.option("--parity-data", type=click.Path(path_type=Path),
              help="BEIR folder with queries.jsonl, corpus.jsonl and run.bm25.trec (e.g. TREC DL19) "
                   "for the parity check. Default: the embedded standard-library corpus.")
@click.option("--parity-queries", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many queries the parity check ranks.")
@click.option("--opset", type=click.IntRange(min=MIN_OPSET, max=MAX_OPSET), default=18, show_default=True,
              help="ONNX opset.")
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights beside the graph (.onnx.data). Default: only when over 1 GiB.")
@click.option("--export-dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="Weights of the exported graphs. fp16/bf16: exported straight from PyTorch in that dtype (no FP32 "
                   "copy of a half checkpoint), with --precision of the same dtype; parity compares with the "
                   "checkpoint's weights computed in FP32. auto: the --precision fp16/bf16 dtype when the checkpoint "
                   "stores half weights (the Qwen3 releases), else fp32 (then the half graphs are converted from FP32 "
                   "ones and get a fidelity report against them).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where export, parity and calibration run: cuda puts the PyTorch modules on the GPU and runs the "
                   "graphs of parity and INT8 calibration on ONNX Runtime's CUDA provider (onnxruntime-gpu).")
@click.option("--force", is_flag=True, help="Run every stage even if its inputs are unchanged.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: also build TensorRT plans for this machine's GPU (needs TensorRT and a GPU).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest request batch the TensorRT profiles admit.")
@click.option("--workspace", default="4GiB", show_default=True, help="TensorRT builder workspace limit.")
@click.option("--corpus", type=click.Path(path_type=Path),
              help="Corpus to index into <out>/index (see 'index --help' for formats). Without --checkpoint "
                   "and --corpus the embedded standard-library corpus is indexed.")
@click.option("--index", "index_kind", type=click.Choice(KINDS), default="flat",
              show_default=True, help="FAISS index kind of the index stage.")
@click.option("--triton-backend", type=click.Choice(["python", "onnxruntime", "tensorrt", "none"]), default="python",
              show_default=True, help="Backend of the graphs in <out>/model_repository; none: no repository.")
@cpu_runtime_options("--triton-backend python")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="fp16/bf16/int8: calibration folder written by `resrank-export calibrate`.")
@click.option("--calibration-corpus", type=click.Path(path_type=Path),
              help="fp16/bf16/int8: build the calibration set from this BEIR folder or JSONL/TSV passage file "
                   "(default: the embedded standard-library corpus).")
@click.option("--calibration-method", type=click.Choice(["entropy", "max"]), default="entropy", show_default=True,
              help="int8: how ModelOpt picks the activation ranges.")
@click.option("--int8-exclude-op", multiple=True, help="int8: op type left unquantized (repeatable).")
@click.option("--int8-exclude-node", multiple=True, help="int8: node-name regex left unquantized (repeatable).")
@click.option("--int8-smoothquant-alpha", type=click.FloatRange(min=0, min_open=True, max=1), default=0.5,
              show_default=True, help="int8: SmoothQuant migration strength for GEMM inputs (outlier channels "
                                      "moved into the weights).")
@click.option("--no-int8-smoothquant", is_flag=True, help="int8: quantize without SmoothQuant.")
@click.option("--int8-cpu-kernels", is_flag=True,
              help="int8: lay the graph out for ONNX Runtime's CPU integer kernels (GEMMs sharing an input "
                   "merged, 7-bit weights): every quantized GEMM runs as MatMulIntegerToFloat, at a small "
                   "fidelity cost (docs/precision.md).")
@click.option("--int8-piece-size", default="256MiB", show_default=True,
              help="int8: graphs with more weights than this are quantized a piece of about this size at a time "
                   "(ModelOpt holds about four copies of what it quantizes; docs/scale.md).")
@click.option("--fidelity-retrieval-data", type=click.Path(path_type=Path),
              help="fp16/bf16/int8: BEIR folder with qrels (e.g. SciFact) for the encoder nDCG@10 comparison.")
@click.option("--fidelity-rerank-data", type=click.Path(path_type=Path),
              help="fp16/bf16/int8: BEIR folder with run.bm25.trec (e.g. DL19) for the reranker comparison.")
@click.option("--precision-tables", type=click.UNPROCESSED, hidden=True,
              help="Set by --config from its [int4_awq] / [int8_wo] tables (each precision's own knobs).")
@click.option("--ort-optimize", is_flag=True,
              help="Also write graphs fused for ONNX Runtime (onnx/<precision>/*.ort.onnx: Attention, "
                   "SkipLayerNormalization, RMSNorm, ...), parity-checked; the Triton repository serves them.")
@click.pass_context
def build(ctx, print_config, checkpoint, precision, out, parity_data, parity_queries, opset, external_data, export_dtype,
          device, force, backend,
          max_batch, workspace, corpus, index_kind, triton_backend, calibration, calibration_corpus,
          calibration_method, int8_exclude_op, int8_exclude_node, int8_smoothquant_alpha, no_int8_smoothquant,
          int8_cpu_kernels, int8_piece_size, fidelity_retrieval_data, fidelity_rerank_data, precision_tables,
          ort_optimize, cpu_runtime, openvino_compute) -> None:
    """Export the encoder and reranker to ONNX, check parity with PyTorch, make FP16/INT8 graphs with a
    fidelity report if asked, write TensorRT build scripts (and plans with --backend tensorrt), index
    the corpus and write the Triton model repository."""
    weight_only = _weight_only_tables(precision_tables)
    if print_config:
        click.echo(render_config(ctx), nl=False)
        if precision in weight_only:
            click.echo(render_table(precision, weight_only[precision].to_table()), nl=False)
        return
    from resrank_export.build import BuildConfig, run_build
    from resrank_export.engine.plan import parse_size
    from resrank_export.engine.profiles import EngineConfig
    from resrank_export.export.onnx import ExportConfig
    from resrank_export.export.parity import ParityConfig
    from resrank_export.precision.calibration import CalibrationConfig
    from resrank_export.precision.fidelity import FidelityConfig
    from resrank_export.precision.graphs import PrecisionConfig

    config = BuildConfig(out=out, checkpoint=checkpoint, precision=precision, force=force, backend=backend,
                         engine=EngineConfig(max_batch=max_batch, workspace_bytes=parse_size(workspace, "--workspace")),
                         triton_backend=None if triton_backend == "none" else triton_backend,
                         ort_optimize=ort_optimize, cpu_runtime=cpu_runtime, openvino_compute=openvino_compute,
                         export=ExportConfig(opset=opset, external_data=external_data, dtype=export_dtype,
                                             device=device),
                         parity=ParityConfig(data_dir=parity_data, queries=parity_queries, device=device),
                         corpus=corpus, index_kind=index_kind,
                         calibration=calibration,
                         calibration_set=CalibrationConfig(corpus=calibration_corpus, device=device),
                         precision_graphs=PrecisionConfig(calibration_method=calibration_method,
                                                          int8_exclude_ops=tuple(int8_exclude_op),
                                                          int8_exclude_nodes=tuple(int8_exclude_node),
                                                          int8_smoothquant_alpha=None if no_int8_smoothquant
                                                          else int8_smoothquant_alpha,
                                                          int8_cpu_integer_kernels=int8_cpu_kernels,
                                                          int8_piece_bytes=parse_size(int8_piece_size, "--int8-piece-size"),
                                                          calibration_device=device),
                         fidelity=FidelityConfig(retrieval_data=fidelity_retrieval_data,
                                                 rerank_data=fidelity_rerank_data),
                         weight_only=weight_only.get(precision))
    manifest = run_build(config)
    parity = manifest["stages"]["parity"]["report"]
    click.echo(f"build written to {out}: reranker max |diff| {parity['reranker']['max_abs_diff']:.2e}, "
               f"encoder max |diff| {parity['encoder']['max_abs_diff']:.2e}, parity "
               f"{'passed' if parity['passed'] else 'FAILED'}; stages: "
               + ", ".join(f"{k} {v['status']}" for k, v in manifest["stages"].items()))
    served = manifest["stages"].get("triton", {}).get("report", {}).get("cpu_path")
    if served:
        click.echo(f"{out / 'model_repository'} serves the graphs on {served['reason']}")
    if precision != manifest["stages"]["export"]["report"]["dtype"]:
        from resrank_export.precision.fidelity import failed_gates

        failed = failed_gates(manifest["stages"][f"fidelity_{precision}"]["report"])
        click.echo(f"{precision} fidelity vs fp32: {out / 'fidelity.md'}; gates "
                   + (f"FAILED: {'; '.join(failed)}" if failed else "passed"))


def _weight_only_tables(tables: dict | None) -> dict:
    """{precision: WeightOnlyConfig} of the --config file's precision tables (all checked, whichever
    precision is built), with the defaults for the weight-only precisions it does not name."""
    from resrank_export.precision.weight_only import DEFAULT_CONFIGS, WeightOnlyConfig

    given = (tables or {}).get("tables", {})
    return {**DEFAULT_CONFIGS, **{name: WeightOnlyConfig.from_table(name, table, tables["source"])
                                  for name, table in given.items()}}


@main.command("demo-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--reranker", type=click.Choice(["distilled", "qwen3", "minilm"]), default="distilled",
              show_default=True,
              help="distilled: the demo's reranker, MiniLM weights trained here to rank (minutes on a CPU; "
                   "docs/demo.md); qwen3: small seeded Qwen3 (untrained); minilm: BERT reranker initialised "
                   "from the MiniLM weights (pretrained activation statistics, untrained for ranking).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the random reranker weights, or of the distillation.")
def demo_checkpoint(out: Path, reranker: str, seed: int) -> None:
    """Write a checkpoint from the bundled all-MiniLM-L6-v2 encoder and a reranker (no download):
    the distilled one ranks; the untrained ones have meaningful graphs and shapes only."""
    from resrank_export.model.demo import build_demo_checkpoint

    if out.exists():
        raise ResRankExportError(f"{out}: already exists; choose a new folder")
    build_demo_checkpoint(out, reranker=reranker, seed=seed)
    click.echo(f"demo checkpoint written to {out}")


@main.command("qwen3-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder with the Qwen3 tokenizer.json and tokenizer_config.json (e.g. ../shared/tokenizers/qwen3).")
@click.option("--shape", type=click.Choice(["tiny", "0.6b", "1.7b", "4b", "8b"]), default="0.6b", show_default=True,
              help="Released Qwen3 / Qwen3-Embedding size of both the encoder and the reranker.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="dtype of the saved weights (the releases are BF16).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random weights.")
def qwen3_checkpoint(out: Path, tokenizer_dir: Path, shape: str, dtype: str, seed: int) -> None:
    """Write a checkpoint of real Qwen3 shape with the real tokenizer, Qwen3-Embedding's conventions
    and seeded random weights: for measuring cost at real sizes (its rankings mean nothing)."""
    from resrank_export.model.demo import build_qwen3_checkpoint

    if out.exists():
        raise ResRankExportError(f"{out}: already exists; choose a new folder")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ResRankExportError(f"{tokenizer_dir / 'tokenizer.json'}: file not found; --tokenizer must hold "
                                 "the Qwen3 tokenizer.json")
    build_qwen3_checkpoint(out, tokenizer_dir, shape=shape, seed=seed, dtype=dtype)
    click.echo(f"Qwen3-{shape}-shape checkpoint ({dtype}) written to {out}")


# --- TensorRT engines and memory planning ----------------------------------------------------

@main.command("plan")
@click.option("--gpu-memory", help="GPU memory to plan the TensorRT engines for, e.g. 16GiB, 24GB, 80GiB.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="ResRank checkpoint folder. Default: the demo checkpoint.")
@click.option("--qwen3-shape", type=click.Choice(["0.6b", "1.7b", "4b", "8b"]),
              help="Plan the build of a released Qwen3-Embedding + Qwen3 size (BF16) instead of a checkpoint folder.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Request batch to plan for.")
@click.option("--workspace", default="4GiB", show_default=True, help="TensorRT builder workspace limit.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(gpu_memory, checkpoint, qwen3_shape, max_batch, workspace, as_json) -> None:
    """Estimate the build's host memory and graph bytes per precision and, with --gpu-memory, GPU memory
    (weights + activations + workspace) and the largest batch / k that fit."""
    from resrank_export.engine.build_plan import build_plans, qwen3_shapes, render_build_plans
    from resrank_export.engine.plan import PlanConfig, parse_size, plan_checkpoint, plan_qwen3_shape, render_plan
    from resrank_export.engine.profiles import EngineConfig

    if qwen3_shape and checkpoint:
        raise click.UsageError("--qwen3-shape plans a released size without its checkpoint; it takes no --checkpoint")
    stored, plans = build_plans(checkpoint, qwen3_shape)
    result = {"build": [p.to_json() for p in plans], "weights_stored": stored}
    text = [render_build_plans(plans, stored)]
    if gpu_memory:
        config = PlanConfig(parse_size(gpu_memory), EngineConfig(max_batch=max_batch,
                                                                  workspace_bytes=parse_size(workspace, "--workspace")))
        gpu = (plan_qwen3_shape(*qwen3_shapes(qwen3_shape), config) if qwen3_shape
               else plan_checkpoint(checkpoint, config))
        result.update(gpu.to_json())
        text.insert(0, render_plan(gpu))
    click.echo(json.dumps(result, indent=2) if as_json else "\n\n".join(text))


@main.group()
def engines() -> None:
    """TensorRT plans of a build folder: build them on this GPU, check and install them."""


@engines.command("ensure")
@click.option("--build", "build_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Build folder (from `resrank-export build`).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True,
              help="Which graphs of the build (onnx/<precision>/) to compile.")
@click.option("--repository", type=click.Path(path_type=Path, file_okay=False),
              help="Triton repository whose tensorrt models receive the plans (cc_model_filenames).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest request batch the TensorRT profiles admit.")
@click.option("--workspace", default="4GiB", show_default=True, help="TensorRT builder workspace limit.")
@click.option("--dry-run", is_flag=True, help="Only print what would be kept or built.")
@click.option("--tensorrt-version", envvar="RESRANK_TENSORRT_VERSION",
              help="Decide for this TensorRT version instead of the installed one (with --compute-capability).")
@click.option("--compute-capability", envvar="RESRANK_GPU_COMPUTE_CAPABILITY", help="e.g. 8.9")
@click.option("--gpu-name", envvar="RESRANK_GPU_NAME", default="unnamed GPU", show_default=True,
              help="GPU name recorded in the engine manifest when the GPU is not queried.")
def engines_ensure(build_dir, precision, repository, max_batch, workspace, dry_run, tensorrt_version,
                   compute_capability, gpu_name) -> None:
    """Build the plans this GPU lacks (missing, other TensorRT release or architecture, changed graph)."""
    from resrank_export.engine.manifest import GpuRuntime
    from resrank_export.engine.plan import parse_size
    from resrank_export.engine.profiles import EngineConfig
    from resrank_export.engine.stage import EnsureConfig, run_ensure

    if bool(tensorrt_version) != bool(compute_capability):
        raise click.UsageError("--tensorrt-version and --compute-capability go together")
    runtime = GpuRuntime(tensorrt_version, gpu_name, compute_capability) if tensorrt_version else None
    actions = run_ensure(EnsureConfig(build_dir, precision, EngineConfig(max_batch=max_batch,
                                      workspace_bytes=parse_size(workspace, "--workspace")), runtime, repository, dry_run))
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
        if not folder or precision not in PRECISIONS:
            raise click.BadParameter(f"{item!r}: expected FOLDER:PRECISION with precision one of {', '.join(PRECISIONS)}")
        pairs.append((Path(folder), precision))
    results = check_builds(pairs, report)
    click.echo(render_checks(results))
    if not all(r.passed for r in results):
        raise SystemExit(1)


# --- index and search (resrank_export/index/stage.py) ---------------------------------------------


@main.command("index")
@click.option("--build", "build_dir", required=True, type=click.Path(path_type=Path),
              help="Build folder from 'resrank-export build' (its encoder graph encodes the corpus).")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="Encode with the build's onnx/<precision>/ encoder (queries then use the same graph). "
                   "Default: the exported one (fp32).")
@click.option("--providers", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="ONNX Runtime execution provider for the encoding (cuda/tensorrt: onnxruntime-gpu and a GPU).")
@click.option("--corpus", type=click.Path(path_type=Path),
              help="BEIR folder or corpus.jsonl, JSONL (id/text), TSV (id<TAB>text) or text (one passage "
                   "per line). Default: the embedded standard-library corpus.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Index folder (written atomically).")
@click.option("--index", "kind", type=click.Choice(KINDS), default="flat", show_default=True,
              help="flat: exact inner product; ivf: IVF-Flat; hnsw: graph; ivfpq: compressed, for little memory.")
@click.option("--vector-dtype", type=click.Choice(VECTOR_DTYPES), default="float32", show_default=True,
              help="Precision of the stored slot vectors (vectors.npy).")
@click.option("--texts/--no-texts", default=True, show_default=True, help="Store passage texts for display.")
@click.option("--nlist", type=click.IntRange(min=1), help="ivf/ivfpq: lists. Default ~4*sqrt(passages).")
@click.option("--nprobe", type=click.IntRange(min=1), help="ivf/ivfpq: lists searched. Default max(32, nlist/8).")
@click.option("--hnsw-m", type=click.IntRange(min=2), default=32, show_default=True, help="hnsw: links per node.")
@click.option("--ef-search", type=click.IntRange(min=1), default=128, show_default=True, help="hnsw: search breadth.")
@click.option("--pq-m", type=click.IntRange(min=1), help="ivfpq: sub-quantizers (divides the dim). Default dim/4.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Passages per resumable chunk: an interrupted build resumes after the last finished chunk.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Encoder batch size.")
@click.option("--from-index", type=click.Path(path_type=Path),
              help="Reuse the vectors of this index (another --index kind without re-encoding).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: encode in this process; ray: encode the chunks in a Ray Data actor pool.")
@click.option("--ray-address", help="ray: cluster address (default: the running cluster, else a new local one).")
@click.option("--actors", type=click.IntRange(min=1), default=2, show_default=True, help="ray: encoder actors.")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0, show_default=True,
              help="ray: GPUs per actor (CUDA execution provider when > 0).")
@click.option("--rows-per-add-task", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="ray, ivf/ivfpq: vectors each Ray task adds to a copy of the trained index before the merge.")
@click.option("--on-disk-lists", is_flag=True,
              help="ray, ivf/ivfpq: merge the inverted lists into index.ivfdata (memory-mapped), for indexes "
                   "larger than RAM.")
def index_command(build_dir, precision, providers, corpus, out, kind, vector_dtype, texts, nlist, nprobe, hnsw_m, ef_search, pq_m,
                  chunk_size, batch_size, from_index, engine, ray_address, actors, gpus_per_actor, rows_per_add_task,
                  on_disk_lists) -> None:
    """Encode a corpus with the exported encoder and write a FAISS index with the slot vectors."""
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.stage import build_index

    config = IndexConfig(build=build_dir, corpus=corpus, out=out, kind=kind, vector_dtype=vector_dtype,
                         store_texts=texts, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search, pq_m=pq_m,
                         chunk_size=chunk_size, batch_size=batch_size, source_index=from_index, precision=precision,
                         providers=providers)
    if engine == "ray":
        from resrank_export.index.ray_engine import RayIndexConfig, build_index_ray

        info = build_index_ray(RayIndexConfig(index=config, address=ray_address, actors=actors,
                                              gpus_per_actor=gpus_per_actor, rows_per_add_task=rows_per_add_task,
                                              on_disk_lists=on_disk_lists))
    else:
        info = build_index(config)
    click.echo(f"{info['kind']} index of {info['count']} passages (dim {info['dim']}) written to {out}; "
               f"report: {out / 'report.md'}")


@main.command("search")
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path), help="Index folder.")
@click.option("--query", help="One query text (query_id null in --json output).")
@click.option("--queries", "queries_file", type=click.Path(path_type=Path),
              help="queries.jsonl ({_id or id, text}) or a BEIR folder.")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many passages to return per query.")
@click.option("--build", "build_dir", type=click.Path(path_type=Path),
              help="Build folder whose encoder encodes the queries. Default: the one recorded in the index.")
@click.option("--json", "as_json", is_flag=True, help='One {"query_id", "ids", "scores"} JSON object per line.')
def search_command(index_dir, query, queries_file, top_k, build_dir, as_json) -> None:
    """Retrieve the top-k passages of each query."""
    import json

    from resrank_export.index.retriever import SearchConfig, run_search

    config = SearchConfig(index=index_dir, query=query, queries_file=queries_file, top_k=top_k, build=build_dir)
    for hits in run_search(config):
        if as_json:
            click.echo(json.dumps({"query_id": hits.query_id, "ids": hits.result.ids,
                                   "scores": [round(float(s), 6) for s in hits.result.scores]}, ensure_ascii=False))
            continue
        click.echo(f"query {hits.query_id or ''}: {hits.query}")
        for rank, (pid, score) in enumerate(zip(hits.result.ids, hits.result.scores), 1):
            snippet = f"  {hits.texts[rank - 1][:100]}" if hits.texts else ""
            click.echo(f"{rank:4d}  {score:.4f}  {pid}{snippet}")


# --- Triton: model repository, server, queries -------------------------------------------------


@main.command()
@click.option("--build", "build_dir", type=click.Path(path_type=Path), default=Path("resrank-build"),
              show_default=True, help="Build folder (from `resrank-export build`).")
@click.option("--index", "index_dir", type=click.Path(path_type=Path),
              help="Index folder (from `resrank-export index`). Without it only the resrank_rerank ensemble is written.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("model_repository"), show_default=True,
              help="Model repository folder; replaced atomically.")
@click.option("--backend", type=click.Choice(["python", "onnxruntime", "tensorrt"]), default="python",
              show_default=True, help="Backend of the encoder and reranker models (the others are python).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Which graphs of the build to serve (onnx/<precision>/; plans of engines/<precision>/).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="max_batch_size of the composing models (dynamic batching merges up to this many).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=0, show_default=True,
              help="How long dynamic batching waits to fill a batch, in microseconds (each ensemble step "
                   "adds it at low load; requests that queue while a model runs merge anyway).")
@click.option("--max-queue-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests queued per model beyond this are rejected.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=16384, show_default=True,
              help="python-backend encoder/reranker: rows x padded length per graph run; merged batches "
                   "above it are split into several runs.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances per composing model.")
@click.option("--gpu", is_flag=True, help="KIND_GPU instance groups for the encoder and reranker.")
@click.option("--ort-accelerator", type=click.Choice(["tensorrt", "cuda"]),
              help="onnxruntime backend: GPU execution accelerator.")
@click.option("--cc-model-filename", "cc_model_filenames", multiple=True, metavar="CC=FILE",
              help="tensorrt backend: engine file per compute capability, e.g. 9.0=model_sm90.plan.")
@click.option("--index-shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the index into N faiss_lookup_<i> models behind a faiss_lookup router that merges their top-k.")
@click.option("--shard-url", "shard_urls", multiple=True, metavar="HOST:PORT",
              help="gRPC address serving faiss_lookup_<i>, in shard order (one per shard): the router asks "
                   "each shard's own Triton instead of this one's.")
@cpu_runtime_options("python backend")
def triton(build_dir, index_dir, out, backend, precision, max_batch_size, max_queue_delay_us, max_queue_size,
           max_batch_tokens, instances, gpu, ort_accelerator, cc_model_filenames, index_shards, shard_urls,
           cpu_runtime, openvino_compute) -> None:
    """Write a Triton model repository: composing models and the resrank / resrank_rerank ensembles."""
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository

    pairs = dict(item.split("=", 1) for item in cc_model_filenames if "=" in item)
    if len(pairs) != len(cc_model_filenames):
        raise ResRankExportError("--cc-model-filename: expected CC=FILE, e.g. 9.0=model_sm90.plan")
    summary = write_repository(TritonConfig(
        build=build_dir, out=out, index=index_dir, backend=backend, precision=precision, max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us, max_queue_size=max_queue_size, max_batch_tokens=max_batch_tokens,
        instances=instances, gpu=gpu, ort_accelerator=ort_accelerator, cc_model_filenames=pairs, index_shards=index_shards,
        shard_urls=tuple(shard_urls), cpu_runtime=cpu_runtime, openvino_compute=openvino_compute))
    click.echo(f"model repository written to {out}: {', '.join(summary['models'])}")
    if summary["cpu_path"]:
        click.echo(f"graphs served on {summary['cpu_path']['reason']}")


@main.command("k8s")
@click.option("--repository", type=click.Path(path_type=Path), required=True,
              help="Model repository folder (from `resrank-export triton`).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("k8s"), show_default=True,
              help="Manifest folder; replaced atomically.")
@click.option("--name", default="resrank", show_default=True, help="Name of the Deployment, Service and HPA.")
@click.option("--namespace", default="default", show_default=True, help="Kubernetes namespace.")
@click.option("--image", default="resrank-triton:latest", show_default=True,
              help="Triton image with resrank-export installed (docker/Dockerfile).")
@click.option("--model-store", help="s3://bucket/prefix holding the repository, instead of a PersistentVolumeClaim.")
@click.option("--s3-secret", help="Secret with the AWS_* variables Triton reads for --model-store.")
@click.option("--service-account", help="ServiceAccount of the pods (KServe takes S3 credentials from it).")
@click.option("--storage", default="20Gi", show_default=True, help="PersistentVolumeClaim size.")
@click.option("--storage-class", help="StorageClass of the claim (default: the cluster's).")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="nvidia.com/gpu per pod.")
@click.option("--cpu", default="2", show_default=True, help="CPU request per pod.")
@click.option("--memory", default="8Gi", show_default=True, help="Memory request and limit per pod.")
@click.option("--min-replicas", type=click.IntRange(min=1), default=1, show_default=True, help="HPA lower bound.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=4, show_default=True, help="HPA upper bound.")
@click.option("--queue-target-us", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="HPA target: average queue time per request per pod, in microseconds.")
@click.option("--kubernetes-version", default="1.31.0", show_default=True,
              help="Kubernetes API version the manifests are validated against.")
def k8s(repository, out, name, namespace, image, model_store, s3_secret, service_account, storage, storage_class, gpus,
        cpu, memory, min_replicas, max_replicas, queue_target_us, kubernetes_version) -> None:
    """Write validated Kubernetes manifests (Deployment, Service, PVC, HPA; KServe variant) for a repository."""
    from resrank_export.triton.k8s import K8sConfig, write_manifests

    written = write_manifests(K8sConfig(
        repository=repository, out=out, name=name, namespace=namespace, image=image, model_store=model_store,
        s3_secret=s3_secret, service_account=service_account, storage=storage, storage_class=storage_class, gpus=gpus,
        cpu=cpu, memory=memory, min_replicas=min_replicas, max_replicas=max_replicas, queue_target_us=queue_target_us,
        kubernetes_version=kubernetes_version))
    click.echo(f"manifests written to {out}: {', '.join(sorted(written))}")


@main.command()
@click.option("--repository", type=click.Path(path_type=Path), default=Path("model_repository"), show_default=True,
              help="Model repository folder (from `resrank-export triton` or <build>/model_repository).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the server binds to.")
@click.option("--http-port", type=PORT, default=8000, show_default=True, help="HTTP port (0: a free one).")
@click.option("--grpc-port", type=PORT, default=8001, show_default=True, help="gRPC port (0: a free one).")
@click.option("--metrics-port", type=PORT, default=8002, show_default=True,
              help="Prometheus metrics port (0: a free one).")
@click.option("--print-docker", is_flag=True, help="Print the NGC container command for a GPU host and exit.")
def serve(repository, host, http_port, grpc_port, metrics_port, print_docker) -> None:
    """Run tritonserver (from the nvidia-pytriton wheel) on the repository until Ctrl-C."""
    from resrank_export.triton.server import ServerConfig, docker_command
    from resrank_export.triton.server import serve as run_server

    config = ServerConfig(repository=repository, host=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port)
    if print_docker:
        click.echo(docker_command(config))
        return
    sys.exit(run_server(config))


@main.command()
@click.option("--repository", type=click.Path(path_type=Path), default=Path("model_repository"), show_default=True,
              help="The model repository Triton serves (limits, tokenizers and passage texts are read from it).")
@click.option("--triton", "triton_url", default="127.0.0.1:8001", show_default=True, help="Triton's gRPC address.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the gateway binds to.")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8080, show_default=True,
              help="Port the gateway listens on.")
@click.option("--api-key", help="Require this key on /v1/* (Authorization: Bearer KEY or X-API-Key). Default: "
              "$RESRANK_GATEWAY_API_KEY. An empty key (or variable) is refused, never taken as no key.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--max-documents", type=click.IntRange(min=1),
              help="Documents per rerank request (default and ceiling: the repository's max_candidates).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds per Triton call before the client gets 504.")
def gateway(repository, triton_url, host, port, api_key, max_body_bytes, max_documents, timeout) -> None:
    """HTTP front end: Cohere/Jina-style POST /v1/rerank, POST /v1/search, /health, /metrics."""
    from resrank_export.triton.gateway import GatewayConfig, api_key_setting, run_gateway

    run_gateway(GatewayConfig(repository=repository, triton_url=triton_url, host=host, port=port,
                              api_key=api_key_setting(api_key), max_body_bytes=max_body_bytes,
                              max_documents=max_documents, timeout_s=timeout))


@main.command()
@click.argument("text")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="How many passages to return per query.")
@click.option("--passages", type=click.Path(path_type=Path),
              help="Rerank the passages of this file (JSONL/TSV/text) instead of searching the index.")
@click.option("--url", help="Server address. Default: 127.0.0.1:8000 (HTTP) or 127.0.0.1:8001 (gRPC).")
@click.option("--grpc", is_flag=True, help="Use gRPC instead of HTTP.")
def query(text, top_k, passages, url, grpc) -> None:
    """Ask a running server: the reranked top-k of the index, or the order of --passages."""
    from resrank_export.triton.client import QueryConfig, run_query

    protocol = "grpc" if grpc else "http"
    results = run_query(QueryConfig(query=text, url=url or f"127.0.0.1:{8001 if grpc else 8000}",
                                    protocol=protocol, top_k=top_k, passages=passages))
    for rank, (passage_id, score) in enumerate(results, 1):
        click.echo(f"{rank:3d}  {score:+.4f}  {passage_id}")


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
@click.option("--encoder-passages", type=click.IntRange(min=1), help="Passages of the encoder benchmark "
              "(default: the preset's).")
@click.option("--reranker-k", "reranker_ks", multiple=True, type=click.IntRange(min=1),
              help="Candidate count of the reranker benchmark (repeatable; default: the preset's).")
@click.option("--served-precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Served benchmark: which graphs of the build the repository serves.")
@click.option("--served-runtime", type=click.Choice(["auto", "onnxruntime", "openvino"]), default="auto",
              show_default=True, help="Served benchmark: the python backend's runtime (`triton --cpu-runtime`; "
                                      "auto: the default path a user gets).")
@click.option("--served-openvino-compute", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True,
              help="Served benchmark with --served-runtime openvino: `triton --openvino-compute`.")
def bench(smoke, out, only, build_dir, checkpoint, data, threads, repeats, encoder_passages, reranker_ks,
          served_precision, served_runtime, served_openvino_compute) -> None:
    """Run the benchmarks: encoder throughput, reranker latency vs k, served pipeline, FLOPs."""
    from resrank_export.bench.config import BenchConfig
    from resrank_export.bench.run import run_bench

    preset = BenchConfig.smoke if smoke else BenchConfig.full
    overrides = {name: value for name, value in (("repeats", repeats), ("encoder_passages", encoder_passages),
                                                 ("reranker_ks", tuple(reranker_ks))) if value}
    config = preset(out=out, only=tuple(n.strip() for n in only.split(",") if n.strip()), build=build_dir,
                    checkpoint=checkpoint, data=data, threads=threads, served_precision=served_precision,
                    served_runtime=served_runtime, served_openvino_compute=served_openvino_compute, **overrides)
    run_bench(config, command=" ".join(["resrank-export", *sys.argv[1:]]))
    click.echo(f"benchmark results written to {out} (summary: {out / 'summary.md'})")


# --- precision (calibration sets) ----------------------------------------------------------------

@main.command()
@click.option("--corpus", type=click.Path(path_type=Path),
              help="BEIR folder (corpus.jsonl, queries.jsonl, optional run.bm25.trec) or JSONL/TSV passage "
                   "file. Default: the embedded standard-library corpus.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for encoder.npz, reranker.npz and card.json (written atomically).")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="ResRank checkpoint whose encoder (PyTorch, FP32 arithmetic) makes the slot vectors. Default: the "
                   "demo checkpoint.")
@click.option("--encoder-samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Passages in the encoder set.")
@click.option("--reranker-queries", type=click.IntRange(min=1), default=16, show_default=True,
              help="Queries in the reranker set.")
@click.option("--candidates", type=click.IntRange(min=1),
              help="Candidates per reranker query. Default: the checkpoint's max_candidates.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the passage and query sample.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the PyTorch encoder making the slot vectors runs.")
def calibrate(corpus, out, checkpoint, encoder_samples, reranker_queries, candidates, seed, device) -> None:
    """Write INT8 calibration sets for both graphs from real text."""
    from resrank_export.precision.calibration import CalibrationConfig, calibrate_checkpoint

    card = calibrate_checkpoint(checkpoint, out, CalibrationConfig(
        corpus=corpus, encoder_samples=encoder_samples, reranker_queries=reranker_queries,
        candidates=candidates, seed=seed, device=device))
    click.echo(f"calibration set written to {out}: {card['encoder']['samples']} passages, "
               f"{card['reranker']['queries']} queries x {card['reranker']['candidates']} candidates")
