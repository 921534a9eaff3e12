"""`build`: checkpoint -> ONNX graphs -> parity report -> precision graphs -> engine scripts ->
index -> Triton repository, each a stage recorded in the folder's manifest; the stage configs
live beside their stages and `BuildConfig` composes them. The folder is replaced atomically: a
failed build leaves the previous one (or nothing) in place; an interrupted one (SIGTERM,
Ctrl-C) also keeps its finished stages in `.<out>.partial`, which the next build resumes from."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resrank_export.engine.profiles import EngineConfig
from resrank_export.errors import ResRankExportError
from resrank_export.export.onnx import AUTO, EXPORT_DTYPES, ExportConfig, export_onnx, graphs_folder
from resrank_export.export.parity import (CPU_PATH_GATES, RUN_FILE, ParityConfig, check_cpu_paths, check_parity_data,
                                         compare_graphs, reference_outputs)
from resrank_export.fs import (atomic_dir, output_lock, refuse_foreign_folder, require_free_space, sha256_file,
                               sha256_tree, stale_temps)
from resrank_export.interrupt import INTERRUPTIONS, note_kept
from resrank_export.manifest import (MANIFEST_FILE, StageRunner, describe_unfinished, key_of, library_versions,
                                     read_manifest, unfinished_stage)
from resrank_export.model.checkpoint import Checkpoint, load_checkpoint
from resrank_export.precision import PRECISIONS, precision_row
from resrank_export.precision.calibration import CalibrationConfig
from resrank_export.precision.fidelity import FidelityConfig
from resrank_export.precision.graphs import PrecisionConfig
from resrank_export.precision.stages import PrecisionStagesConfig, check_precision_inputs, run_precision_stages
from resrank_export.precision.weight_only import WeightOnlyConfig

log = logging.getLogger(__name__)
BACKENDS = ("onnxruntime", "tensorrt")
PARITY_FILE = "parity.json"


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    checkpoint: Path | None = None  # None: the cached demo checkpoint
    precision: str = "fp32"
    export: ExportConfig = field(default_factory=lambda: ExportConfig(dtype=AUTO))  # resolved by run_build
    parity: ParityConfig = field(default_factory=ParityConfig)
    calibration: Path | None = None  # a calibration folder made by `calibrate`; None: build one
    calibration_set: CalibrationConfig = field(default_factory=CalibrationConfig)
    precision_graphs: PrecisionConfig = field(default_factory=PrecisionConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    force: bool = False
    backend: str = "onnxruntime"  # tensorrt: also build plans for this machine's GPU
    engine: EngineConfig = field(default_factory=EngineConfig)
    corpus: Path | None = None  # index stage; with no checkpoint either: the embedded corpus
    index_kind: str = "flat"
    triton_backend: str | None = "python"  # None: no model repository stage
    # the python backend's CPU runtime and OpenVINO compute (triton.config.TritonConfig); "auto": the
    # fastest path whose gate this build measured (its parity stage checks the faster paths)
    cpu_runtime: str = "auto"
    openvino_compute: str = "f32"
    ort_optimize: bool = False  # also write ORT-fused graphs (onnx/<precision>/*.ort.onnx), parity-checked
    weight_only: WeightOnlyConfig | None = None  # int8_wo / int4_awq knobs (the TOML's table); None: defaults

    def to_json(self) -> dict:
        """Every setting, resolved (the manifest records it): paths as strings, tuples as lists."""
        return json.loads(json.dumps(asdict(self), default=str))

    @property
    def precision_stages(self) -> PrecisionStagesConfig:
        return PrecisionStagesConfig(self.precision, self.calibration, self.calibration_set, self.precision_graphs,
                                     self.fidelity, self.weight_only)


def _files_under(folder: Path, *parts: str) -> list[Path]:
    return sorted(p for part in parts for p in (folder / part).rglob("*") if p.is_file()) \
        + [folder / p for p in parts if (folder / p).is_file()]


def _parity_data_identity(config: ParityConfig) -> dict:
    data = config.data_dir
    if data is None or not (data / RUN_FILE).is_file():
        return {"data": "embedded"}
    return {"data": str(data.resolve()), "run": sha256_file(data / RUN_FILE),
            "queries": sha256_file(data / "queries.jsonl")}


def run_build(config: BuildConfig) -> dict:
    """Run the build stages into `config.out`; returns the manifest."""
    if config.precision not in PRECISIONS:
        raise ResRankExportError(f"--precision {config.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if config.export.dtype not in (AUTO, "fp32", config.precision):
        raise ResRankExportError(
            f"--export-dtype {config.export.dtype} makes the {config.export.dtype} graphs straight from PyTorch: use it "
            f"with --precision {config.export.dtype} (not {config.precision}; int8 is quantized from fp32 graphs)")
    if config.ort_optimize and "bf16" in (config.precision, config.export.dtype):
        raise ResRankExportError("--ort-optimize with bf16 graphs: ONNX Runtime's CPU provider has no BF16 kernels "
                                 "to fuse for; use it with fp32, fp16 or int8")
    _check_cpu_runtime(config)
    # Before any output: a tensorrt build on a machine without TensorRT or a GPU stops here, and
    # so does --device cuda where PyTorch or ONNX Runtime sees no GPU.
    runtime = _engine_runtime(config)
    _check_devices(config)
    check_parity_data(config.parity)
    out = Path(config.out)
    resume = out.absolute().parent / f".{out.name}.partial"  # finished stages of an interrupted build
    with output_lock(out):  # a second build into the same --out is refused here, before any work
        refuse_foreign_folder(out, MANIFEST_FILE, "a resrank-export build folder")
        _report_killed_builds(out)
        checkpoint = load_checkpoint(_checkpoint_dir(config))
        config = _resolve_export_dtype(config, checkpoint)
        check_precision_inputs(checkpoint, config.precision_stages)
        inputs = {"checkpoint": {"path": str(checkpoint.root.resolve()), "sha256": sha256_tree(checkpoint.root)},
                  "precision": config.precision}
        seed = resume if resume.is_dir() else out
        if seed == resume:
            log.info("resuming the interrupted build kept in %s", resume)
        _check_free_space(out, checkpoint, inputs, config, read_manifest(seed))
        with atomic_dir(out, seed_from=seed, keep_on_interrupt=resume) as work:
            runner = StageRunner(work, read_manifest(work), force=config.force, inputs=inputs,
                                 config=config.to_json())
            try:
                _run_stages(runner, work, checkpoint, inputs, config, runtime)
            except INTERRUPTIONS as exc:
                kept = runner.keep_finished()
                if kept:
                    note_kept(exc, f"finished stages ({', '.join(kept)}) in {resume}")
                raise
            manifest = runner.write()
        shutil.rmtree(resume, ignore_errors=True)
    return manifest


def _check_cpu_runtime(config: BuildConfig) -> None:
    """Before any work: the repository stage's settings (runtime, compute) are ones it can write."""
    from resrank_export.triton.config import TritonConfig

    if config.triton_backend is None or not _serves_on_cpu(config):
        return
    TritonConfig(build=config.out, out=config.out, backend=config.triton_backend, precision=config.precision,
                 ort_fused=config.ort_optimize, cpu_runtime=config.cpu_runtime,
                 openvino_compute=config.openvino_compute).validate()


def _serves_on_cpu(config: BuildConfig) -> bool:
    """Whether the repository stage can serve the build's precision (the python backend runs its
    graphs on ONNX Runtime's CPU provider, which has no BF16 kernels)."""
    return "onnxruntime" in precision_row(config.precision).cpu_runtimes or config.triton_backend != "python"


def _check_devices(config: BuildConfig) -> None:
    from resrank_export.model.reference import torch_device
    from resrank_export.runtime import execution_providers

    devices = {config.export.device, config.parity.device, config.calibration_set.device,
               config.precision_graphs.calibration_device}
    for device in sorted(devices):
        torch_device(device)
    if "cuda" in (config.parity.device, config.precision_graphs.calibration_device):
        execution_providers("cuda")


def _resolve_export_dtype(config: BuildConfig, checkpoint: Checkpoint) -> BuildConfig:
    export = config.export.for_precision(config.precision, checkpoint)
    if config.export.dtype == AUTO and export.dtype != "fp32":
        log.info("--export-dtype auto: the checkpoint stores half weights, so the %s graphs are exported in %s "
                 "(no FP32 copy; --export-dtype fp32 exports FP32 graphs and adds a fidelity report against them)",
                 config.precision, export.dtype)
    return dataclasses.replace(config, export=export)


def _checkpoint_dir(config: BuildConfig) -> Path:
    if config.checkpoint is not None:
        return Path(config.checkpoint)
    from resrank_export.model.demo import default_checkpoint

    log.info("no --checkpoint given: using the demo checkpoint")
    return default_checkpoint()


def _run_stages(runner: StageRunner, work: Path, checkpoint: Checkpoint, inputs: dict, config: BuildConfig,
                runtime) -> None:
    _export_stage(runner, work, checkpoint, inputs, config)
    _parity_stage(runner, work, checkpoint, config)
    if config.precision != config.export.dtype:  # fp16/bf16/int8 graphs made from the fp32 export
        run_precision_stages(runner, work, checkpoint, config.precision_stages)
    elif config.precision != "fp32":
        log.info("--export-dtype %s: the exported graphs are the %s graphs; parity compared them with PyTorch in %s "
                 "(no fp32 graph, so no fidelity report against fp32)", config.precision, config.precision,
                 config.precision)
    if config.ort_optimize:
        _ort_optimize_stage(runner, work, checkpoint, config)
    _engine_stages(runner, work, config, runtime)
    if config.corpus is not None or config.checkpoint is None:
        _index_stage(runner, work, config)
    _triton_stage(runner, work, config)


def _report_killed_builds(out: Path) -> None:
    """A temp folder whose process is gone was a build killed mid-stage (SIGKILL, OOM): say which
    stage and how much memory it had reached, before atomic_dir removes the folder."""
    for folder in stale_temps(out):
        unfinished = unfinished_stage(folder)
        if unfinished is not None:
            log.warning("the build killed in %s: %s", folder.name, describe_unfinished(*unfinished))


def _check_free_space(out: Path, checkpoint: Checkpoint, inputs: dict, config: BuildConfig,
                      previous: dict | None) -> None:
    """Refuse before writing graphs that will not fit: the weights of every graph a stage that
    will run writes (the plan's ModelShape at the graph's dtype); a rerun whose export stage is
    unchanged counts only stages the previous build lacks. Hard-linked files take no space."""
    from resrank_export.engine.plan import graph_weight_bytes

    stages = (previous or {}).get("stages", {})
    fresh = config.force or stages.get("export", {}).get("key") != key_of(_export_inputs(inputs, config))
    needed = {}
    graph_stages = {"export": config.export.dtype}
    if config.precision != config.export.dtype:
        graph_stages[f"precision_{config.precision}"] = config.precision
    if config.backend == "tensorrt":
        graph_stages["engines"] = config.precision
    for stage, precision in graph_stages.items():
        if fresh or stage not in stages:
            for graph, size in graph_weight_bytes(checkpoint, precision).items():
                needed[f"{stage} {graph} ({precision})"] = size
    if needed:
        require_free_space(out.absolute().parent, needed, "the build")


def _export_inputs(inputs: dict, config: BuildConfig) -> dict:
    return {"checkpoint": inputs["checkpoint"]["sha256"], "opset": config.export.opset,
            "external_data": config.export.external_data, "dtype": config.export.dtype,
            "versions": {k: v for k, v in library_versions().items()
                         if k in ("torch", "transformers", "onnx", "onnxscript")}}


def _export_stage(runner: StageRunner, work: Path, checkpoint: Checkpoint, inputs: dict, config: BuildConfig) -> None:
    def export() -> dict:
        kept_fp32: dict = {}
        export_onnx(checkpoint, work, config.export, kept_fp32)
        graphs = graphs_folder(work, config.export).relative_to(work).as_posix()
        return {"outputs": _files_under(work, graphs, "tokenizer", "resrank.json"),
                "report": {"dtype": config.export.dtype, **({"kept_fp32": kept_fp32} if kept_fp32 else {})}}

    runner.run("export", _export_inputs(inputs, config), export)


def _cpu_paths(config: BuildConfig) -> tuple[tuple[str, str], ...]:
    """The served CPU paths faster than ONNX Runtime FP32 the parity stage measures, for `auto` to
    pick from: only where the repository serves the exported graphs on the python backend."""
    from resrank_export.runtime import AUTO, installed_cpu_runtimes, path_candidates, probe_cpu

    if config.cpu_runtime != AUTO or config.triton_backend != "python" or config.precision != config.export.dtype:
        return ()
    return path_candidates(probe_cpu(), installed_cpu_runtimes())


def _parity_stage(runner: StageRunner, work: Path, checkpoint: Checkpoint, config: BuildConfig) -> None:
    paths = _cpu_paths(config)

    def parity() -> dict:
        from resrank_export.model.reference import ResRankReference

        graphs = {name: graphs_folder(work, config.export) / f"{name}.onnx" for name in ("encoder", "reranker")}
        reference = ResRankReference(checkpoint, EXPORT_DTYPES[config.export.dtype],  # the graphs' own dtype
                                     device=config.parity.device)
        expected = reference_outputs(reference, config.parity)
        report = compare_graphs(expected, graphs, config.parity)
        if paths:  # the graphs on each faster CPU path, against its compute type's gate
            report["cpu_paths"] = check_cpu_paths(expected, graphs, config.parity, paths)
        (work / PARITY_FILE).unlink(missing_ok=True)
        (work / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return {"outputs": [work / PARITY_FILE], "report": report}

    runner.run("parity", {"graphs": runner.output_hashes("export"), "gate": vars(config.parity.gate(config.export.dtype)),
                          "queries": config.parity.queries, **_parity_data_identity(config.parity),
                          **({"cpu_paths": {"/".join(p): vars(CPU_PATH_GATES[p[1]]) for p in paths}} if paths else {})},
               parity)


def _ort_optimize_stage(runner: StageRunner, work: Path, checkpoint: Checkpoint, config: BuildConfig) -> None:
    """onnx/<precision>/*.ort.onnx for the exported dtype and the build's precision (resrank_export/precision/
    ort_optimize.py). The fused FP32 graphs pass the same parity gate as the plain ones; a fused
    FP16/INT8 graph's parity to the reference is recorded (its gate is the fidelity stage's)."""
    import onnxscript

    from resrank_export.model.reference import ResRankReference
    from resrank_export.precision.ort_optimize import make_ort_graphs, ort_graph_path

    exported = config.export.dtype
    precisions = tuple(dict.fromkeys((exported, config.precision)))
    graphs = {p: {name: work / "onnx" / p / f"{name}.onnx" for name in ("encoder", "reranker")} for p in precisions}

    def optimize() -> dict:
        reference = ResRankReference(checkpoint, EXPORT_DTYPES[exported], device=config.parity.device)
        expected = reference_outputs(reference, config.parity)  # once, for every precision's fused graphs
        report = {}
        for precision, plain in graphs.items():
            fused = {name: ort_graph_path(path) for name, path in plain.items()}
            report[precision] = {"graphs": make_ort_graphs(plain),
                                 "parity": compare_graphs(expected, fused, config.parity, gate=precision == exported)}
        return {"outputs": sorted(p for plain in graphs.values() for path in plain.values()
                                  for p in path.parent.glob(ort_graph_path(path).name + "*")),
                "report": report}

    sources = {**runner.output_hashes("export"),
               **(runner.output_hashes(f"precision_{config.precision}") if config.precision != exported else {})}
    runner.run("ort_optimize", {"graphs": sources, "onnxscript": onnxscript.__version__,
                                "gate": vars(config.parity.gate(exported)), **_parity_data_identity(config.parity)},
               optimize)


# --- engine stages (TensorRT; see resrank_export/engine) -------------------------------------

def _engine_runtime(config: BuildConfig):
    if config.backend not in BACKENDS:
        raise ResRankExportError(f"--backend {config.backend!r}: expected one of {', '.join(BACKENDS)}")
    if config.backend != "tensorrt":
        return None
    from resrank_export.engine.tensorrt import require_tensorrt_backend

    return require_tensorrt_backend()


def _engine_stages(runner: StageRunner, work: Path, config: BuildConfig, runtime) -> None:
    """build_engines.sh for every build (the on-target path); plans only with --backend tensorrt."""
    from resrank_export.engine.manifest import MANIFEST_NAME, read_engine_manifest
    from resrank_export.engine.stage import GRAPHS, engines_dir, ensure_engines, source_hash, write_engine_script

    precision = config.precision
    key = {"graphs": {g: source_hash(work, precision, g) for g in GRAPHS}, "engine": asdict(config.engine)}
    runner.run("engine-script", key, lambda: {"outputs": [write_engine_script(work, precision, config.engine)]})
    if runtime is None:
        return

    def engines() -> dict:
        ensure_engines(work, precision, config.engine, runtime)
        folder = engines_dir(work, precision)
        plans = [folder / e.plan for e in read_engine_manifest(folder) if e.compute_capability == runtime.compute_capability]
        return {"outputs": [*plans, folder / MANIFEST_NAME], "report": asdict(runtime)}

    runner.run("engines", {**key, "runtime": asdict(runtime)}, engines)
# --- index stage (resrank_export/index/stage.py) ---------------------------------------------------
def _index_stage(runner: StageRunner, work: Path, config: BuildConfig) -> None:
    """Encode the corpus into <build>/index/ with the build's precision encoder (the graph the
    model repository serves, so passages and queries come from one graph); BF16 graphs cannot run
    on a CPU, so a bf16 build made from FP32 graphs encodes with the FP32 one. Its partial chunks
    live beside the build folder, so an interrupted build resumes encoding where it stopped."""
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.encode import corpus_identity
    from resrank_export.index.report import REPORT_JSON
    from resrank_export.index.stage import build_index

    out = Path(config.out)
    precision = config.precision
    if "onnxruntime" not in precision_row(precision).cpu_runtimes and config.export.dtype != precision:
        log.warning("stage index: encoding with the fp32 encoder (ONNX Runtime's CPU provider cannot run %s graphs)",
                    precision)
        precision = "fp32"
    stage = "export" if precision == config.export.dtype else f"precision_{precision}"

    def index() -> dict:
        build_index(IndexConfig(build=work, corpus=config.corpus, out=work / "index", kind=config.index_kind,
                                work_dir=out.parent / f".{out.name}.index-partial", recorded_build=out.resolve(),
                                precision=precision))
        report = json.loads((work / "index" / REPORT_JSON).read_text())
        return {"outputs": _files_under(work, "index"), "report": report}

    runner.run("index", {"encoder": runner.output_hashes(stage)[f"onnx/{precision}/encoder.onnx"],
                         "corpus": corpus_identity(config.corpus), "kind": config.index_kind}, index)
# --- Triton model repository (last stage) ------------------------------------------------------
TRITON_REPOSITORY = "model_repository"


def _triton_stage(runner: StageRunner, work: Path, config: BuildConfig) -> None:
    """<build>/model_repository serving the build's precision, with the index ensemble when
    <build>/index exists. Skipped with a warning when the triton extra is not installed."""
    import importlib.util

    if config.triton_backend is None:
        return
    if not _serves_on_cpu(config):
        log.warning("stage triton: skipped, the python backend runs its graphs on ONNX Runtime's CPU provider, which "
                    "cannot run %s graphs; on a GPU server: resrank-export triton --precision %s --backend tensorrt",
                    config.precision, config.precision)
        return
    if importlib.util.find_spec("tritonclient") is None:
        log.warning("stage triton: skipped, tritonclient is not installed (pip install 'resrank-export[triton]')")
        return
    from resrank_export.triton.config import TritonConfig, measured_gates, resolve_cpu_runtime
    from resrank_export.triton.repository import write_repository

    index = work / "index"
    has_index = (index / "index.json").is_file()
    triton_config = TritonConfig(build=work, out=work / TRITON_REPOSITORY, index=index if has_index else None,
                                 backend=config.triton_backend, precision=config.precision,
                                 ort_fused=config.ort_optimize, cpu_runtime=config.cpu_runtime,
                                 openvino_compute=config.openvino_compute,
                                 measured_gates=measured_gates(runner.stages, config.precision))
    choice = resolve_cpu_runtime(triton_config)

    def triton() -> dict:
        report = write_repository(triton_config)  # before listing its files: they are the outputs
        return {"outputs": _files_under(work, TRITON_REPOSITORY), "report": report}

    from resrank_export import __version__

    graphs_stage = "export" if config.precision == config.export.dtype else f"precision_{config.precision}"
    fused = runner.output_hashes("ort_optimize") if config.ort_optimize else {}
    runner.run("triton", {"graphs": {**runner.output_hashes(graphs_stage), **fused}, "precision": config.precision,
                          "backend": config.triton_backend, "cpu_path": choice.to_json(),
                          "package": __version__,
                          "index": runner.output_hashes("index") if "index" in runner.stages else None}, triton)
