"""Everything that touches the TensorRT Python API: runtime detection, plan builds from ONNX
files (strongly typed where TensorRT supports it, one optimisation profile, timing cache,
workspace limit) and checked plan loading. `tensorrt` is imported lazily."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from resrank_export.engine.manifest import EngineEntry, GpuRuntime, check_compatible, detect_gpu
from resrank_export.engine.profiles import EngineConfig, Profile
from resrank_export.errors import EngineError, MissingDependencyError, NotAvailableError
from resrank_export.precision import precision_row
from resrank_export.lazy import require

log = logging.getLogger(__name__)


def tensorrt_module(purpose: str = "the TensorRT engine stage"):
    return require("tensorrt", purpose)


def detect_runtime() -> GpuRuntime:
    """TensorRT version and GPU of this machine; raises MissingDependencyError / EngineError."""
    trt = tensorrt_module()
    name, cc = detect_gpu()
    return GpuRuntime(trt.__version__, name, cc)


def typing_mode(tensorrt_version: str) -> str:
    """How a graph's dtypes become the engine's precision in this TensorRT release:
    'always' (11+: every network is strongly typed, the flag is deprecated), 'flag' (9-10:
    NetworkDefinitionCreationFlag.STRONGLY_TYPED) or 'builder_flags' (8: weak typing plus the
    FP16/INT8 builder flags, which let Q/DQ nodes and FP16 casts guide the choice)."""
    major = int(tensorrt_version.split(".")[0])
    return "always" if major >= 11 else "flag" if major >= 9 else "builder_flags"


def _network(trt, builder, precision: str, config) -> tuple[object, bool]:
    mode = typing_mode(trt.__version__)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode == "flag" else 0
    if mode == "builder_flags":
        if precision == "bf16" or precision_row(precision).recipe in ("weight_only", "fp8_qdq"):
            raise EngineError(f"{precision} graphs need TensorRT 9 or newer (strongly typed networks; INT4 and INT8 "
                              f"weight-only need 10); this is TensorRT {trt.__version__}: build the fp16 or int8 "
                              "graphs instead")
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    return builder.create_network(flags), mode != "builder_flags"


def check_tensorrt_layout(onnx_path: Path) -> None:
    """Refuse, before TensorRT runs, a graph whose weights it cannot take: block-wise INT8 weights
    (`int8_wo`'s CPU default; TensorRT 10 reads blocked DequantizeLinear for INT4 weights only)."""
    onnx = require("onnx", "reading a graph")
    structure = onnx.load(str(onnx_path), load_external_data=False)
    int8 = {i.name for i in structure.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    blocked = [n for n in structure.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8
               and any(a.name == "block_size" and a.i > 0 for a in n.attribute)]
    if blocked:
        raise EngineError(f"{onnx_path}: {len(blocked)} INT8 weights stored in blocks (int8_wo's default, for CPU "
                          "serving); TensorRT takes block-wise weights in INT4 only: rebuild with `block-size = 0` "
                          "in the build TOML's [int8_wo] table (one scale per output channel)")


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile, precision: str, config: EngineConfig,
                 timing_cache: Path, runtime: GpuRuntime, source_sha256: str) -> EngineEntry:
    """Compile one ONNX graph into a plan at `plan_path`; returns its manifest entry. The
    graph is parsed from its file so weights in a `.onnx.data` side file (>2 GiB) load too."""
    check_tensorrt_layout(onnx_path)
    trt = tensorrt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    builder_config = builder.create_builder_config()
    network, strongly_typed = _network(trt, builder, precision, builder_config)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:500]}")
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    optimization_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        optimization_profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
    builder_config.add_optimization_profile(optimization_profile)
    cache = builder_config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    builder_config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    seconds = round(time.perf_counter() - start, 1)
    plan_path.unlink(missing_ok=True)
    plan_path.write_bytes(bytes(serialized))
    timing_cache.unlink(missing_ok=True)  # files of a seeded build folder are hard links
    timing_cache.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    log.info("built %s in %.1fs", plan_path.name, seconds)
    return EngineEntry(graph=onnx_path.stem, precision=precision, plan=plan_path.name,
                       tensorrt_version=runtime.tensorrt_version, gpu_name=runtime.gpu_name,
                       compute_capability=runtime.compute_capability, source_sha256=source_sha256,
                       profile={name: shapes.to_json() for name, shapes in profile.items()},
                       strongly_typed=strongly_typed, workspace_bytes=config.workspace_bytes,
                       build_seconds=seconds)


def load_engine(plan_dir: Path, entry: EngineEntry, runtime: GpuRuntime | None = None):
    """Deserialize a plan after checking its manifest entry against this machine; a plan
    from another TensorRT release or GPU architecture is refused with the reason."""
    runtime = runtime or detect_runtime()
    verdict = check_compatible(entry, runtime)
    if not verdict.ok:
        raise EngineError(f"refusing to load {verdict.reason}; rebuild it here "
                          "(`resrank-export engines ensure` or onnx/<precision>/build_engines.sh)")
    trt = tensorrt_module("loading TensorRT plans")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((Path(plan_dir) / entry.plan).read_bytes())
    if engine is None:
        raise EngineError(f"{Path(plan_dir) / entry.plan}: TensorRT could not deserialize the plan")
    return engine


WAYS_FORWARD = ("build with --backend onnxruntime (ONNX Runtime on CPU, or its TensorRT execution provider on "
                "the target), or build the plans on the target GPU: the docker image in docker/ builds missing "
                "plans when it starts, and onnx/<precision>/build_engines.sh holds the trtexec commands")


def require_tensorrt_backend() -> GpuRuntime:
    """The runtime for `build --backend tensorrt`, or a typed error (exit code 2) that names
    the two ways forward on a machine without TensorRT or without a GPU."""
    try:
        return detect_runtime()
    except MissingDependencyError as exc:
        raise MissingDependencyError(f"--backend tensorrt needs TensorRT and an NVIDIA GPU, and the 'tensorrt' "
                                     f"package is not installed here; {WAYS_FORWARD}") from exc
    except EngineError as exc:
        raise NotAvailableError(f"--backend tensorrt needs an NVIDIA GPU ({exc}); {WAYS_FORWARD}") from exc
