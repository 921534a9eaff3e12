"""ONNX Runtime sessions, created one way everywhere (parity, index, Triton python models)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from resrank_export.errors import InputDataError, NotAvailableError, ResRankExportError

log = logging.getLogger(__name__)

EXECUTION_MODES = ("sequential", "parallel")


@dataclass(frozen=True)
class SessionSettings:
    """ONNX Runtime session options that matter on a shared CPU. Defaults are ORT's; the Triton
    repository writes its own (triton/config.py) as model parameters ORT_<FIELD>."""

    threads: int = 0  # intra-op threads; 0: ORT's default (one per physical core)
    inter_op_threads: int = 0  # parallel mode only; 0: ORT's default
    spinning: bool = True  # idle intra-op threads spin-wait (session.intra_op.allow_spinning)
    arena: bool = True  # CPU memory arena (enable_cpu_mem_arena)
    execution_mode: str = "sequential"  # or "parallel": independent branches on inter-op threads

    def __post_init__(self):
        if self.execution_mode not in EXECUTION_MODES:
            raise ResRankExportError(f"ONNX Runtime execution mode {self.execution_mode!r}: expected "
                                     f"{' or '.join(EXECUTION_MODES)}")
        if self.threads < 0 or self.inter_op_threads < 0:
            raise ResRankExportError("ONNX Runtime thread counts must be >= 0 (0: ORT's default)")

    def to_parameters(self) -> dict[str, str]:
        return {f"ORT_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "SessionSettings":
        """The settings `to_parameters` wrote (missing keys: the defaults)."""
        values = {}
        for f in fields(cls):
            text = params.get(f"ORT_{f.name.upper()}")
            if text is not None:
                values[f.name] = text == "True" if f.type == "bool" else int(text) if f.type == "int" else text
        return cls(**values)

    def options(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.inter_op_threads:
            options.inter_op_num_threads = self.inter_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        options.enable_cpu_mem_arena = self.arena
        options.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if self.execution_mode == "parallel"
                                  else ort.ExecutionMode.ORT_SEQUENTIAL)
        return options


def ort_session(path: str | Path, providers: list[str] | None = None, threads: int = 0,
                settings: SessionSettings | None = None):
    """A CPU session unless other providers are asked for; `threads` 0 = ORT's default (ignored
    when `settings` are given). A BF16 graph on the CPU alone is refused with a one-line reason
    (no BF16 MatMul/Add kernels there)."""
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    options = (settings or SessionSettings(threads=threads)).options()
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        if providers == ["CPUExecutionProvider"] and is_bfloat16_graph(path):
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise NotAvailableError(f"{path}: a BF16 graph, which ONNX Runtime's CPU execution provider cannot "
                                    f"run ({reason[:160]}); run it with the CUDA or TensorRT provider, or serve "
                                    f"the fp16 graphs on a CPU") from None
        raise


# `--providers` names -> ONNX Runtime's execution providers, in preference order.
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def execution_providers(name: str) -> list[str]:
    """ONNX Runtime providers for a `--providers` name, checked against this installation."""
    import onnxruntime as ort

    if name not in PROVIDERS:
        raise NotAvailableError(f"--providers {name!r}: expected one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[name][0]
    if wanted not in ort.get_available_providers():
        raise NotAvailableError(f"--providers {name}: this onnxruntime has no {wanted} (install onnxruntime-gpu "
                                f"on a machine with a GPU), it offers {', '.join(ort.get_available_providers())}")
    return PROVIDERS[name]


def provider_session(path: str | Path, name: str = "cpu", threads: int = 0):
    """A session on the `--providers` name's provider; refused in one line when that provider
    cannot start here (onnxruntime-gpu lists CUDA without a GPU, then quietly runs on the CPU)."""
    import onnxruntime as ort

    providers = execution_providers(name)
    ort.set_default_logger_severity(3)  # a provider that cannot start is our one-line error, not ORT's log
    session = ort_session(path, None if name == "cpu" else providers, threads)
    if session.get_providers()[0] != providers[0]:
        raise NotAvailableError(f"--providers {name}: {providers[0]} did not start for {path} (no GPU, or no CUDA "
                                f"libraries?); ONNX Runtime would run on {session.get_providers()[0]}")
    return session


def graph_session(path: str | Path, providers: list[str] | None = None, threads: int = 0):
    """`ort_session`, except that on the CPU a BF16 graph runs on onnx's reference evaluator and an
    FP8 one on ONNX Runtime without its Q/DQ fusions: what parity and fidelity use, so those graphs
    are checked on machines without a GPU (slowly)."""
    dtypes = graph_dtypes(path) if not providers else set()
    if "BFLOAT16" in dtypes:
        log.warning("%s: BF16 graph on a CPU: checked with onnx's reference evaluator (slow; ONNX Runtime's "
                    "CPU provider has no BF16 kernels)", Path(path).name)
        return ReferenceSession(path)
    if "FLOAT8E4M3FN" in dtypes:
        # ONNX Runtime's CPU provider runs FP8 QuantizeLinear / DequantizeLinear (MatMul in the
        # graph's float type), but its extended optimizations fuse Q/DQ + MatMul into
        # MatMulIntegerToFloat, which takes INT8 only, and refuse the graph: basic level keeps them
        import onnxruntime as ort

        options = SessionSettings(threads=threads).options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return ort_session(path, providers, threads)


def is_bfloat16_graph(path: str | Path) -> bool:
    """Whether the graph computes in BF16 anywhere: a BF16 weight or a Cast to BF16."""
    return "BFLOAT16" in graph_dtypes(path)


def graph_dtypes(path: str | Path) -> set[str]:
    """onnx.TensorProto names of the graph's weights and Cast targets, from one read of its
    structure (external weight data is not read). Empty for a file onnx cannot parse."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: not this check's to report; the session's own error names the file
        return set()
    types = {init.data_type for init in model.graph.initializer} | {
        a.i for node in model.graph.node if node.op_type == "Cast" for a in node.attribute if a.name == "to"}
    return {onnx.TensorProto.DataType.Name(t) for t in types}


class ReferenceSession:
    """onnx's ReferenceEvaluator behind the two InferenceSession methods this package calls
    (`get_inputs`, `run`). Two of its kernels are replaced: GatherElements (its np.choose takes
    at most 32 choices, fewer than a sequence's positions) and MatMul (numpy has no BF16 matmul;
    this one accumulates in FP32 and rounds the result to the inputs' type, as GPUs do)."""

    def __init__(self, path: str | Path):
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.op_run import OpRun

        class GatherElements(OpRun):
            def _run(self, data, indices, axis=0):
                return (np.take_along_axis(data, indices.astype(np.int64), axis=axis),)

        class MatMul(OpRun):
            def _run(self, a, b):
                return (np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype),)

        self._evaluator = ReferenceEvaluator(str(path), new_ops=[GatherElements, MatMul])
        self._inputs = [SimpleNamespace(name=name) for name in self._evaluator.input_names]

    def get_inputs(self) -> list:
        return self._inputs

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(out) for out in self._evaluator.run(output_names, feeds)]


# What runs a graph on the CPU (Triton's python backend, the fidelity report), and OpenVINO's
# inference precisions for the ops a graph computes in floating point. (cli.py spells both out in
# its choices so that it need not import this module at start-up.)
CPU_RUNTIMES = ("onnxruntime", "openvino")
OPENVINO_COMPUTE = ("f32", "bf16")


class OpenVINOSession:
    """An ONNX graph compiled by OpenVINO's CPU plugin, behind the InferenceSession methods this
    package calls (`get_inputs`, `get_outputs`, `run`). OpenVINO runs ModelOpt's Q/DQ graphs with INT8
    kernels (VNNI/AMX), and with `compute="bf16"` the floating-point ops in BF16 on CPUs with
    AMX or AVX512-BF16; ONNX Runtime's CPU provider has no BF16 kernels and leaves the GEMMs next
    to shared Q/DQ activations in FP32 (measured in docs/benchmarks.md). `compute` is the
    precision asked for; `self.compute` the one OpenVINO chose (a CPU without BF16 runs f32)."""

    def __init__(self, path: str | Path, threads: int = 0, compute: str = "f32"):
        from resrank_export.lazy import require

        if compute not in OPENVINO_COMPUTE:
            raise ResRankExportError(f"OpenVINO compute precision {compute!r}: expected one of "
                                     f"{', '.join(OPENVINO_COMPUTE)}")
        ov = require("openvino", "the OpenVINO CPU runtime")
        config = {"INFERENCE_PRECISION_HINT": compute, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if not Path(path).is_file():
            raise InputDataError(f"{path}: graph not found")
        try:
            core = ov.Core()
            model = core.read_model(str(path))
            # the graph's own input and output names: after compilation a port may answer to another
            # of its tensor's names (a half graph's Cast, "_to_copy"), which no caller uses
            names = ([port.get_any_name() for port in model.inputs], [port.get_any_name() for port in model.outputs])
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:  # OpenVINO reports every load/compile failure as RuntimeError
            # its message is a stack of "Exception from <source file>" lines above the reason
            reason = next((line for line in reversed(str(exc).splitlines())
                           if line.strip() and not line.startswith("Exception from")), "no reason given")
            raise NotAvailableError(f"{path}: OpenVINO's CPU plugin could not load it: {reason.strip()[:200]}") from None
        self.compute = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._request = compiled.create_infer_request()
        self._inputs, self._outputs = ([SimpleNamespace(name=name) for name in group] for group in names)

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # by position (the compiled outputs keep the graph's order), copied: the request reuses its
        # output buffers on the next call
        ports = {k: feeds[i.name] for k, i in enumerate(self._inputs)}
        values = dict(zip((o.name for o in self._outputs), self._request.infer(ports).to_tuple()))
        return [np.array(values[name]) for name in (output_names or list(values))]


# --- the served CPU path `auto` picks (Triton's python backend) ---------------------------------
AUTO = "auto"
BASE_PATH = ("onnxruntime", "f32")  # parity-checked by every build: the path when no faster one is gated
# Fastest first, measured on the demo build (docs/benchmarks.md, AMX Xeon): OpenVINO computing the
# FP32 graphs in BF16 served the search ensemble at 3.2x ONNX Runtime FP32's throughput. OpenVINO
# f32 is left to explicit choice: it was measured faster on this AVX-512 machine only.
CPU_PATHS = (("openvino", "bf16"), BASE_PATH)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native BF16 arithmetic


def path_name(runtime: str, compute: str) -> str:
    """"openvino/bf16": the key of a path in the parity and fidelity reports."""
    return f"{runtime}/{compute}"


def cpu_flags() -> set[str]:
    """The ISA flags /proc/cpuinfo lists (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@dataclass(frozen=True)
class CpuCapabilities:
    """What the CPU offers the served paths, and where that was read."""

    bf16: bool  # native BF16 arithmetic (AMX-BF16 or AVX512-BF16)
    source: str


def probe_cpu() -> CpuCapabilities:
    """OpenVINO's own capability query where it is installed (the plugin computes in BF16 only
    where it lists BF16), else the /proc/cpuinfo flags."""
    import importlib.util

    if importlib.util.find_spec("openvino") is not None:
        import openvino

        capabilities = list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        return CpuCapabilities("BF16" in capabilities,
                               f"OpenVINO CPU capabilities: {', '.join(capabilities) or 'none'}")
    found = sorted(cpu_flags() & set(BF16_FLAGS))
    return CpuCapabilities(bool(found), f"/proc/cpuinfo BF16 flags: {', '.join(found) or f'none of {BF16_FLAGS}'}")


def installed_cpu_runtimes() -> tuple[str, ...]:
    import importlib.util

    return tuple(r for r in CPU_RUNTIMES if importlib.util.find_spec(r) is not None)


def path_candidates(cpu: CpuCapabilities, installed) -> tuple[tuple[str, str], ...]:
    """The paths faster than BASE_PATH this machine could serve: the ones a build measures a gate
    for. BF16 compute only where the CPU has it natively (elsewhere OpenVINO emulates or falls
    back to f32, and nothing would be gained)."""
    return tuple((runtime, compute) for runtime, compute in CPU_PATHS[:CPU_PATHS.index(BASE_PATH)]
                 if runtime in installed and (compute != "bf16" or cpu.bf16))


@dataclass(frozen=True)
class CpuPathChoice:
    runtime: str
    compute: str
    reason: str

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "compute": self.compute, "reason": self.reason}


def choose_cpu_path(cpu: CpuCapabilities, installed, gates: dict[str, bool]) -> CpuPathChoice:
    """The fastest of CPU_PATHS that is installed, that the CPU runs natively and whose fidelity
    gate this build measured and passed (`gates`: {path_name: passed}); BASE_PATH otherwise, with
    why each faster path was passed over."""
    passed_over = []
    for runtime, compute in CPU_PATHS[:CPU_PATHS.index(BASE_PATH)]:
        name = path_name(runtime, compute)
        if runtime not in installed:
            passed_over.append(f"not {name}: {runtime} is not installed (pip install 'resrank-export[{runtime}]')")
        elif compute == "bf16" and not cpu.bf16:
            passed_over.append(f"not {name}: this CPU has no native BF16 ({cpu.source})")
        elif name not in gates:
            passed_over.append(f"not {name}: this build has not measured its fidelity gate (rebuild on this machine)")
        elif not gates[name]:
            passed_over.append(f"not {name}: its fidelity gate failed in this build")
        else:
            return CpuPathChoice(runtime, compute, f"{name}: the fastest path, installed, native on this CPU "
                                                   f"({cpu.source}) and its fidelity gate passed in this build")
    return CpuPathChoice(*BASE_PATH, f"{path_name(*BASE_PATH)}: {'; '.join(passed_over) or 'the fastest path'}")


def run_session(session, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Feed only the inputs the graph declares (callers may carry extra arrays)."""
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: inputs[name] for name in names})


# Encoder batches are sized by tokens, not rows: rows x longest row stays under this (32 rows of
# 512 tokens), so long texts of a large model cannot blow up activation memory.
BATCH_TOKENS = 16384


def length_batches(lengths, max_rows: int, max_tokens: int = BATCH_TOKENS) -> list[np.ndarray]:
    """Row indices grouped shortest first: each group holds at most `max_rows` rows and its row count
    times its longest length is at most `max_tokens` (a single longer row forms a group of its own)."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < max_rows and (end - start + 1) * lengths[order[end]] <= max_tokens:
            end += 1
        groups.append(order[start:end])
        start = end
    return groups


def encode_texts(session, tokenizer, texts: list[str], batch_size: int, max_batch_tokens: int = BATCH_TOKENS) -> np.ndarray:
    """Encoder graph outputs [n, D] float32 in input order; `tokenizer(texts)` makes the right-padded
    inputs (a PassageTokenizer, or its `queries` method for queries). Batches hold texts of similar
    token length (little compute goes to padding), at most `batch_size` rows and `max_batch_tokens`
    tokens each."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    inputs = tokenizer(texts)
    lengths = inputs["attention_mask"].sum(1)
    vectors = None
    for rows in length_batches(lengths, batch_size, max_batch_tokens):
        width = int(lengths[rows].max())  # right padding: the columns past it are padding only
        batch = run_session(session, {name: array[rows, :width] for name, array in inputs.items()})[0]
        if vectors is None:
            vectors = np.empty((len(texts), batch.shape[1]), dtype=np.float32)
        vectors[rows] = batch
    return vectors
