"""Engine stage over a build folder: write `build_engines.sh` next to the graphs, and build
(or keep) one plan per graph for this machine's GPU, recorded in `engines/<precision>/engines.json`.
`ensure_engines` is what the container entrypoint runs before it starts Triton."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from resrank_export.engine.manifest import (GpuRuntime, cc_model_filenames, check_compatible,
                                            find_entry, plan_filename, read_engine_manifest,
                                            write_engine_manifest)
from resrank_export.engine.profiles import BuildGraphs, EngineConfig, Profile, engine_profiles
from resrank_export.engine.script import write_build_script
from resrank_export.errors import EngineError
from resrank_export.fs import sha256_file
from resrank_export.precision import precision_row

log = logging.getLogger(__name__)
GRAPHS = ("encoder", "reranker")


def graphs_dir(build: Path, precision: str) -> Path:
    return Path(build) / "onnx" / precision


def engines_dir(build: Path, precision: str) -> Path:
    return Path(build) / "engines" / precision


def build_profiles(build: Path, precision: str, config: EngineConfig) -> dict[str, Profile]:
    return engine_profiles(BuildGraphs.from_build(build, graphs_dir(build, precision)), config)


def write_engine_script(build: Path, precision: str, config: EngineConfig) -> Path:
    """build_engines.sh next to the graphs of `precision`."""
    return write_build_script(graphs_dir(build, precision), build_profiles(build, precision, config), config, precision)


def source_hash(build: Path, precision: str, graph: str) -> str:
    """Hash of the graph file and its external-data side file, if any."""
    onnx_path = graphs_dir(build, precision) / f"{graph}.onnx"
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: file not found; build the {precision} graphs first "
                          f"(`resrank-export build --precision {precision}`)")
    side = onnx_path.with_name(onnx_path.name + ".data")
    return sha256_file(onnx_path) + (sha256_file(side) if side.is_file() else "")


@dataclass(frozen=True)
class EngineAction:
    graph: str
    action: str  # "keep" | "build"
    reason: str


def plan_engine_actions(build: Path, precision: str, runtime: GpuRuntime) -> list[EngineAction]:
    """Which plans this machine can keep and which it must build, with the reason for each."""
    entries = read_engine_manifest(engines_dir(build, precision))
    actions = []
    for graph in GRAPHS:
        # Without a plan for this architecture, judge another one of the graph: its verdict
        # says why it cannot serve here.
        entry = find_entry(entries, graph, runtime.compute_capability) \
            or next((e for e in entries if e.graph == graph), None)
        if entry is not None and not (engines_dir(build, precision) / entry.plan).is_file():
            verdict_ok, reason = False, f"{entry.plan}: recorded in the manifest but the file is missing"
        else:
            verdict = check_compatible(entry, runtime, source_hash(build, precision, graph))
            verdict_ok, reason = verdict.ok, verdict.reason
        actions.append(EngineAction(graph, "keep" if verdict_ok else "build", reason))
    return actions


def check_gpu_supports(precision: str, runtime: GpuRuntime) -> None:
    """Refuse, before TensorRT starts, a precision this GPU has no kernels for (the precision
    table's `min_compute_capability`: FP8 needs Ada or Hopper)."""
    needed = precision_row(precision).min_compute_capability
    if needed and float(runtime.compute_capability) < needed:
        raise EngineError(f"{precision} engines need a GPU of compute capability {needed} or newer (L4, L40S, H100); "
                          f"{runtime.gpu_name} is {runtime.compute_capability}: build the fp16, int8_wo or int8 "
                          "graphs for it instead")


def ensure_engines(build: Path, precision: str, config: EngineConfig, runtime: GpuRuntime,
                   dry_run: bool = False) -> list[EngineAction]:
    """Build the plans this machine lacks (missing, other TensorRT release, other GPU
    architecture, changed graph); keep the rest. Plans for other architectures stay, so one
    folder can serve several GPU types."""
    from resrank_export.engine.tensorrt import build_engine

    check_gpu_supports(precision, runtime)
    actions = plan_engine_actions(build, precision, runtime)
    for action in actions:
        log.info("engine %s/%s: %s (%s)", precision, action.graph, action.action, action.reason)
    if dry_run or all(a.action == "keep" for a in actions):
        return actions
    folder = engines_dir(build, precision)
    folder.mkdir(parents=True, exist_ok=True)
    profiles = build_profiles(build, precision, config)
    timing_cache = config.timing_cache or Path(build) / "engines" / f"timing.{runtime.sm}.cache"
    entries = read_engine_manifest(folder)
    to_build = [a for a in actions if a.action == "build"]
    # TensorRT builds take minutes per graph: show which one is running and for how long.
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as progress:
        for action in to_build:
            task = progress.add_task(f"TensorRT {precision} {action.graph} for {runtime.gpu_name}", total=None)
            entry = build_engine(graphs_dir(build, precision) / f"{action.graph}.onnx",
                                 folder / plan_filename(action.graph, runtime), profiles[action.graph], precision,
                                 config, timing_cache, runtime, source_hash(build, precision, action.graph))
            progress.remove_task(task)
            entries = [e for e in entries if (e.graph, e.compute_capability) != (entry.graph, entry.compute_capability)]
            entries.append(entry)
            write_engine_manifest(folder, entries)  # after each plan, so a failed second build keeps the first
    return actions


def install_plans(build: Path, precision: str, repository: Path, models: dict[str, str] | None = None) -> list[Path]:
    """Copy every recorded plan into the Triton `tensorrt` models (`<repository>/<model>/1/`)
    and set their `cc_model_filenames`, so Triton picks the plan of the GPU it runs on."""
    from google.protobuf import text_format

    model_config_pb2 = _model_config_pb2()
    entries = read_engine_manifest(engines_dir(build, precision))
    installed = []
    for graph in GRAPHS:
        model = (models or {}).get(graph, graph)
        config_path = Path(repository) / model / "config.pbtxt"
        if not config_path.is_file():
            raise EngineError(f"{config_path}: not found; write the repository with its tensorrt flavour first")
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        if config.platform != "tensorrt_plan" and config.backend != "tensorrt":
            raise EngineError(f"{config_path}: platform is {config.platform or config.backend!r}; "
                              "expected 'tensorrt_plan' (the repository's tensorrt flavour)")
        names = cc_model_filenames(entries, graph)
        if not names:
            raise EngineError(f"{engines_dir(build, precision)}: no {graph} plan recorded; run `resrank-export engines ensure`")
        version_dir = config_path.parent / "1"
        version_dir.mkdir(exist_ok=True)
        for plan in names.values():
            target = version_dir / plan
            target.unlink(missing_ok=True)
            shutil.copy2(engines_dir(build, precision) / plan, target)
            installed.append(target)
        config.ClearField("cc_model_filenames")
        config.cc_model_filenames.update(names)
        config_path.write_text(text_format.MessageToString(config))
    return installed


def _model_config_pb2():
    from resrank_export.lazy import require

    return require("tritonclient.grpc.model_config_pb2", "writing Triton model configs")


@dataclass(frozen=True)
class EnsureConfig:
    """`resrank-export engines ensure`: what the container entrypoint runs before Triton."""

    build: Path
    precision: str = "fp16"
    engine: EngineConfig = EngineConfig()
    runtime: GpuRuntime | None = None  # None: detect TensorRT and the GPU here
    repository: Path | None = None  # Triton repository whose tensorrt models receive the plans
    dry_run: bool = False


def run_ensure(config: EnsureConfig) -> list[EngineAction]:
    """Decide, build what is missing or incompatible, then install the plans into the repository."""
    from resrank_export.engine.tensorrt import detect_runtime

    runtime = config.runtime or detect_runtime()
    actions = ensure_engines(config.build, config.precision, config.engine, runtime, dry_run=config.dry_run)
    if config.repository is not None and not config.dry_run:
        install_plans(config.build, config.precision, config.repository)
    return actions
