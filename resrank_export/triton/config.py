"""Triton `config.pbtxt` builders. Every tensor name, dtype and dim comes from a GraphSpec
(resrank_export.model.specs for the exported graphs, `model_specs` below for the python models and
ensembles), so the configs cannot drift from the graphs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from resrank_export.errors import NotAvailableError, ResRankExportError
from resrank_export.lazy import require
from resrank_export.precision import PRECISIONS, precision_row
from resrank_export.model.specs import BATCH, CANDIDATES, GraphSpec, TensorSpec, encoder_spec, reranker_spec
from resrank_export.runtime import (AUTO, CPU_RUNTIMES, EXECUTION_MODES, OPENVINO_COMPUTE, CpuPathChoice, SessionSettings,
                                    choose_cpu_path, installed_cpu_runtimes, path_name, probe_cpu)
from resrank_export.triton.models.batching import DEFAULT_MAX_BATCH_TOKENS

BACKENDS = ("python", "onnxruntime", "tensorrt")
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds resrank_export/

# Tensors the Triton models add around the graphs ("bytes" = TYPE_STRING).
QUERY = TensorSpec("QUERY", "bytes", (BATCH, 1))
TOP_K = TensorSpec("TOP_K", "int32", (BATCH, 1))
PASSAGES = TensorSpec("PASSAGES", "bytes", (BATCH, CANDIDATES))
DOC_IDS = TensorSpec("DOC_IDS", "bytes", (BATCH, CANDIDATES))
SCORES = TensorSpec("SCORES", "float32", (BATCH, CANDIDATES))
ORDER = TensorSpec("ORDER", "int64", (BATCH, CANDIDATES))
CANDIDATE_IDS = TensorSpec("candidate_ids", "bytes", (BATCH, CANDIDATES))
RETRIEVAL_SCORES = TensorSpec("retrieval_scores", "float32", (BATCH, CANDIDATES))

RETRIEVE_ENSEMBLE, RERANK_ENSEMBLE = "resrank", "resrank_rerank"
GRAPH_MODELS = ("encoder", "reranker")


@dataclass(frozen=True)
class TritonConfig:
    """What `write_repository` builds. `index` None: only the rerank ensemble is written."""

    build: Path
    out: Path
    index: Path | None = None
    backend: str = "python"  # for the encoder and reranker; the other models are always python
    precision: str = "fp32"  # which graphs of the build (onnx/<precision>/, engines/<precision>/) to serve
    max_batch_size: int = 8
    # No wait to fill a batch: requests that queue while a model runs still merge, and each step
    # of an ensemble would add the wait at low load (2 ms per step doubled the search ensemble's
    # latency at concurrency 1 for no throughput gain at 16 clients; docs/benchmarks.md).
    max_queue_delay_us: int = 0
    max_queue_size: int = 64  # requests waiting per model beyond this are rejected
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # python-backend graphs: rows x padded length per run
    instances: int = 1
    gpu: bool = False  # instance groups KIND_GPU instead of KIND_CPU for the graph models
    ort_threads: int = 1  # intra-op threads per ONNX Runtime session
    # python backend's ORT sessions (runtime.SessionSettings; defaults measured, docs/benchmarks.md)
    ort_spinning: bool = False
    ort_arena: bool = True
    ort_execution_mode: str = "sequential"
    ort_fused: bool = False  # ONNX flavours serve the build's ORT-fused graphs (onnx/<precision>/*.ort.onnx)
    # python backend: the graphs' runtime, ONNX Runtime's CPU provider or OpenVINO's CPU plugin
    # (runtime.OpenVINOSession, ort_threads threads, compute in openvino_compute); "auto": the fastest
    # path whose gate the build measured (resolve_cpu_runtime)
    cpu_runtime: str = AUTO
    openvino_compute: str = "f32"
    # what `auto` picks from, {runtime.path_name: passed}; None: read from the build's manifest
    measured_gates: dict[str, bool] | None = None
    ort_accelerator: str | None = None  # onnxruntime backend: "tensorrt" or "cuda" execution accelerator
    trt_precision: str = "FP16"  # precision_mode of the ORT TensorRT accelerator
    cc_model_filenames: dict[str, str] = field(default_factory=dict)  # tensorrt: {"9.0": "model_sm90.plan"}
    package_path: Path | None = PACKAGE_PARENT  # put on the stub's sys.path; None: the installed package
    index_shards: int = 1  # > 1: faiss_lookup_<i> per slice of the index behind a faiss_lookup router
    shard_urls: tuple[str, ...] = ()  # gRPC host:port serving faiss_lookup_<i>, one per shard; (): this server

    @property
    def session_settings(self) -> SessionSettings:
        return SessionSettings(threads=self.ort_threads, spinning=self.ort_spinning, arena=self.ort_arena,
                               execution_mode=self.ort_execution_mode)

    def validate(self) -> None:
        if self.ort_execution_mode not in EXECUTION_MODES:
            raise ResRankExportError(f"ort_execution_mode {self.ort_execution_mode!r}: expected "
                                     f"{' or '.join(EXECUTION_MODES)}")
        if self.backend not in BACKENDS:
            raise ResRankExportError(f"--backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ResRankExportError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.cpu_runtime not in (AUTO, *CPU_RUNTIMES):
            raise ResRankExportError(f"cpu_runtime {self.cpu_runtime!r}: expected one of {AUTO}, {', '.join(CPU_RUNTIMES)}")
        runtime = "onnxruntime" if self.cpu_runtime == AUTO else self.cpu_runtime  # auto's fallback
        if self.backend == "python" and runtime not in precision_row(self.precision).cpu_runtimes:
            raise NotAvailableError(f"--precision {self.precision} with the python backend: {runtime} on a CPU "
                                    f"cannot run these graphs ({precision_row(self.precision).summary}); serve "
                                    f"{self.precision} with --backend tensorrt (or onnxruntime on a GPU), or fp16 or "
                                    "int8 on a CPU")
        if self.cpu_runtime == "openvino":
            if self.backend != "python":
                raise ResRankExportError(f"--cpu-runtime openvino runs the graphs in the python backend; "
                                         f"--backend {self.backend} runs them itself")
            if self.ort_fused:
                raise ResRankExportError("--cpu-runtime openvino serves the portable graphs: the ORT-fused ones "
                                         "(*.ort.onnx) hold ONNX Runtime's own contrib ops")
            if self.openvino_compute not in OPENVINO_COMPUTE:
                raise ResRankExportError(f"--openvino-compute {self.openvino_compute!r}: expected one of "
                                         f"{', '.join(OPENVINO_COMPUTE)}")
        if self.ort_accelerator not in (None, "tensorrt", "cuda"):
            raise ResRankExportError(f"ort_accelerator {self.ort_accelerator!r}: expected tensorrt or cuda")
        for name in ("max_batch_size", "max_queue_size", "max_batch_tokens", "instances", "ort_threads", "index_shards"):
            if getattr(self, name) < 1:
                raise ResRankExportError(f"{name} is {getattr(self, name)}; expected an integer >= 1")
        if self.index_shards > 1 and self.index is None:
            raise ResRankExportError(f"--index-shards {self.index_shards} needs --index (the index to split)")
        if self.shard_urls and len(self.shard_urls) != self.index_shards:
            raise ResRankExportError(f"--shard-url given {len(self.shard_urls)} times; expected one per shard "
                                     f"(--index-shards {self.index_shards})")
        for url in self.shard_urls:
            if not re.match(r"^[A-Za-z0-9.-]+:[0-9]{1,5}$", url):
                raise ResRankExportError(f"--shard-url {url!r}: expected host:port of a Triton gRPC endpoint")


def measured_gates(stages: dict, precision: str) -> dict[str, bool]:
    """{path name: passed} of the served CPU paths a build measured for the graphs of `precision`
    (a manifest's stages): its parity stage's, where those graphs are the exported ones, else
    the fidelity stage's, measured on the path that stage ran on."""
    export = stages.get("export", {}).get("report", {})
    if export.get("dtype", "fp32") == precision:
        return {name: bool(report["passed"])
                for name, report in stages.get("parity", {}).get("report", {}).get("cpu_paths", {}).items()}
    fidelity = stages.get(f"fidelity_{precision}", {}).get("report", {})
    if "cpu_path" not in fidelity:
        return {}
    return {fidelity["cpu_path"]: all(check["passed"] for check in fidelity["gates"].get(precision, []))}


def resolve_cpu_runtime(config: TritonConfig) -> CpuPathChoice:
    """The python backend's runtime and compute for `config`, and why: an explicit choice as given;
    `auto` the fastest path that is installed, native on this CPU and gated by the build
    (runtime.choose_cpu_path)."""
    from resrank_export.manifest import read_manifest

    if config.cpu_runtime != AUTO:
        compute = config.openvino_compute if config.cpu_runtime == "openvino" else "f32"
        return CpuPathChoice(config.cpu_runtime, compute, f"{path_name(config.cpu_runtime, compute)}: asked for")
    if config.backend != "python":
        return CpuPathChoice("onnxruntime", "f32", f"the {config.backend} backend runs the graphs itself")
    if config.ort_fused:
        return CpuPathChoice("onnxruntime", "f32", "onnxruntime/f32: the ORT-fused graphs (--ort-optimize) run only "
                                                   "on ONNX Runtime")
    gates = config.measured_gates
    if gates is None:
        gates = measured_gates((read_manifest(config.build) or {}).get("stages", {}), config.precision)
    installed = [r for r in installed_cpu_runtimes() if r in precision_row(config.precision).cpu_runtimes]
    return choose_cpu_path(probe_cpu(), installed, gates)


def model_specs(dim: int) -> dict[str, GraphSpec]:
    """I/O of every composing model and ensemble, keyed by model name."""
    enc, rer = encoder_spec(dim), reranker_spec(dim)
    slots = rer.tensor("passage_embeddings")
    prompt = tuple(rer.tensor(n) for n in ("input_ids", "attention_mask", "slot_positions"))
    return {
        "query_tokenizer": GraphSpec("query_tokenizer", (QUERY,), enc.inputs),
        "encoder": enc,
        "faiss_lookup": GraphSpec("faiss_lookup", (enc.outputs[0], TOP_K), (CANDIDATE_IDS, RETRIEVAL_SCORES, slots)),
        "passage_encoder": GraphSpec("passage_encoder", (PASSAGES,), (slots, CANDIDATE_IDS)),
        "prompt_builder": GraphSpec("prompt_builder", (QUERY, slots), prompt),
        "reranker": rer,
        "rank_sort": GraphSpec("rank_sort", (rer.outputs[0], CANDIDATE_IDS), (DOC_IDS, SCORES, ORDER)),
        RETRIEVE_ENSEMBLE: GraphSpec(RETRIEVE_ENSEMBLE, (QUERY, TOP_K), (DOC_IDS, SCORES)),
        RERANK_ENSEMBLE: GraphSpec(RERANK_ENSEMBLE, (QUERY, PASSAGES), (ORDER, SCORES)),
    }


# Ensemble wiring: (model, {model input: source}); a source is an ensemble input name or
# "<model>.<output>". The final map sends "<model>.<output>" to the ensemble outputs.
def _rerank_steps(candidates: str) -> tuple:
    """prompt_builder -> reranker -> rank_sort over the candidates that model `candidates` made."""
    return (
        ("prompt_builder", {"QUERY": "QUERY", "passage_embeddings": f"{candidates}.passage_embeddings"}),
        ("reranker", {"input_ids": "prompt_builder.input_ids", "attention_mask": "prompt_builder.attention_mask",
                      "passage_embeddings": f"{candidates}.passage_embeddings",
                      "slot_positions": "prompt_builder.slot_positions"}),
        ("rank_sort", {"scores": "reranker.scores", "candidate_ids": f"{candidates}.candidate_ids"}),
    )


RETRIEVE_STEPS = (
    ("query_tokenizer", {"QUERY": "QUERY"}),
    ("encoder", {"input_ids": "query_tokenizer.input_ids", "attention_mask": "query_tokenizer.attention_mask"}),
    ("faiss_lookup", {"embeddings": "encoder.embeddings", "TOP_K": "TOP_K"}),
) + _rerank_steps("faiss_lookup")
RETRIEVE_OUTPUTS = {"DOC_IDS": "rank_sort.DOC_IDS", "SCORES": "rank_sort.SCORES"}
RERANK_STEPS = (("passage_encoder", {"PASSAGES": "PASSAGES"}),) + _rerank_steps("passage_encoder")
RERANK_OUTPUTS = {"ORDER": "rank_sort.ORDER", "SCORES": "rank_sort.SCORES"}


def _pb():
    return require("tritonclient.grpc.model_config_pb2", "writing Triton model configs")


def data_type(tensor: TensorSpec) -> int:
    pb = _pb()
    types = {"bytes": pb.TYPE_STRING, "float32": pb.TYPE_FP32, "float16": pb.TYPE_FP16,
             "int64": pb.TYPE_INT64, "int32": pb.TYPE_INT32, "bool": pb.TYPE_BOOL}
    return types[tensor.dtype]


def triton_dims(tensor: TensorSpec) -> list[int]:
    """Dims without the leading batch axis (all models batch); symbolic axes become -1."""
    if tensor.dims[0] != BATCH:
        raise ValueError(f"{tensor.name}: first axis must be '{BATCH}'")
    return [-1 if isinstance(d, str) else d for d in tensor.dims[1:]]


def _io(config, spec: GraphSpec, ragged: bool = False) -> None:
    """Inputs and outputs; `ragged`: inputs with a variable axis allow ragged batches (the
    python models pad the requests of a batch themselves, batching.py), so requests of
    different lengths or candidate counts share a batch instead of waiting for their twins."""
    pb = _pb()
    for tensor in spec.inputs:
        dims = triton_dims(tensor)
        config.input.append(pb.ModelInput(name=tensor.name, data_type=data_type(tensor), dims=dims,
                                          allow_ragged_batch=ragged and -1 in dims))
    for tensor in spec.outputs:
        config.output.append(pb.ModelOutput(name=tensor.name, data_type=data_type(tensor), dims=triton_dims(tensor)))


def _batched(spec: GraphSpec, config: TritonConfig, max_batch_size: int, gpu: bool, ragged: bool = False):
    pb = _pb()
    model = pb.ModelConfig(name=spec.name, max_batch_size=max_batch_size)
    _io(model, spec, ragged)
    model.dynamic_batching.max_queue_delay_microseconds = config.max_queue_delay_us
    model.dynamic_batching.default_queue_policy.max_queue_size = config.max_queue_size
    kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
    model.instance_group.add(kind=kind, count=config.instances)
    return model


def python_model_config(spec: GraphSpec, config: TritonConfig, parameters: dict[str, str],
                        max_batch_size: int | None = None):
    """A python-backend model running resrank_export.triton.models.<RESRANK_MODEL>."""
    model = _batched(spec, config, max_batch_size or config.max_batch_size, gpu=False, ragged=True)
    model.backend = "python"
    params = {"RESRANK_PACKAGE_PATH": str(config.package_path or ""), **parameters}
    for key, value in params.items():
        model.parameters[key].string_value = str(value)
    return model


def graph_model_config(spec: GraphSpec, config: TritonConfig, max_batch_size: int):
    """The encoder or reranker in the chosen backend flavour."""
    if config.backend == "python":
        return python_model_config(spec, config, {"RESRANK_MODEL": "onnx_graph", "GRAPH": "model.onnx",
                                                  **config.session_settings.to_parameters(),
                                                  "CPU_RUNTIME": config.cpu_runtime,
                                                  "OPENVINO_COMPUTE": config.openvino_compute,
                                                  "MAX_BATCH_TOKENS": str(config.max_batch_tokens)},
                                   max_batch_size)
    model = _batched(spec, config, max_batch_size, gpu=config.gpu)
    if config.backend == "onnxruntime":
        model.platform, model.backend, model.default_model_filename = "onnxruntime_onnx", "onnxruntime", "model.onnx"
        model.parameters["intra_op_thread_count"].string_value = str(config.ort_threads)
        if config.ort_accelerator:
            accelerator = model.optimization.execution_accelerators.gpu_execution_accelerator.add(
                name=config.ort_accelerator)
            if config.ort_accelerator == "tensorrt":
                accelerator.parameters["precision_mode"] = config.trt_precision
    else:
        model.platform, model.backend, model.default_model_filename = "tensorrt_plan", "tensorrt", "model.plan"
        for capability, filename in config.cc_model_filenames.items():
            model.cc_model_filenames[capability] = filename
    return model


def ensemble_config(spec: GraphSpec, steps, outputs: dict[str, str], max_batch_size: int):
    """ensemble_scheduling linking the composing models; intermediate tensors are named
    "<model>.<output>"."""
    pb = _pb()
    model = pb.ModelConfig(name=spec.name, platform="ensemble", max_batch_size=max_batch_size)
    _io(model, spec)
    consumed = {source for _, inputs in steps for source in inputs.values()}
    final = {source: name for name, source in outputs.items()}
    for step_model, inputs in steps:
        step = model.ensemble_scheduling.step.add(model_name=step_model, model_version=-1)
        for name, source in inputs.items():
            step.input_map[name] = source
        for produced in sorted(s for s in consumed | set(final) if s.startswith(step_model + ".")):
            step.output_map[produced.split(".", 1)[1]] = final.get(produced, produced)
    return model


def to_text(model) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(model)


def parse_config(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())
