"""Memory planner: how much GPU memory the encoder and reranker engines need at each precision
(weights + activations + workspace), from the checkpoint's configs and safetensors headers
alone, and the largest batch / candidate count that fit a given GPU. An estimate for sizing
before any engine is built; TensorRT reports the exact figure of a built plan."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resrank_export.engine.profiles import GIB, PASSAGE_RUN_ROWS, BuildGraphs, EngineConfig, prompt_length
from resrank_export.errors import InputDataError
from resrank_export.model.checkpoint import Checkpoint, safetensors_header, safetensors_headers
from resrank_export.precision import PRECISIONS, precision_row

MAX_SIZE = 1 << 60  # 1 EiB: past any memory or disk a size option describes
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_LAYER_MATMUL = re.compile(r"(^|\.)(layers?|layer\.\d+|h)\.\d+\..*weight$|\.layer\.\d+\..*weight$")


def parse_size(text: str, option: str = "--gpu-memory") -> int:
    """'16GiB', '24GB', '1.5 GiB', '8000000000' -> bytes; a bad size is an error naming `option`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise InputDataError(f"{option} {text!r}: expected a size such as 512MiB, 16GiB, 24GB or 80GiB")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not size < MAX_SIZE:  # also inf: 400 digits overflow float (int(inf) raised OverflowError)
        raise InputDataError(f"{option} {text!r}: expected a size below 1 EiB")
    return int(size)


def _header_shapes(path: Path) -> dict[str, list[int]]:
    return {name: info["shape"] for name, info in safetensors_header(path).items()}


def _safetensors_shapes(model_dir: Path) -> dict[str, list[int]]:
    return {name: info["shape"] for name, info in safetensors_headers(model_dir).items()}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of one Hugging Face backbone."""

    parameters: int  # all stored tensors the graph uses (a causal LM's lm_head excluded)
    layer_matmul_parameters: int  # 2-D weights inside the transformer layers (INT8 in Q/DQ graphs)
    hidden: int
    intermediate: int
    heads: int
    layers: int

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelShape":
        config = json.loads((Path(model_dir) / "config.json").read_text())
        shapes = {n: s for n, s in _safetensors_shapes(model_dir).items() if not n.startswith("lm_head.")}
        numel = {name: _product(shape) for name, shape in shapes.items()}
        layer = {name for name in numel if len(shapes[name]) == 2 and _LAYER_MATMUL.search(name)}
        hidden = config["hidden_size"]
        return cls(parameters=sum(numel.values()), layer_matmul_parameters=sum(numel[n] for n in layer),
                   hidden=hidden,
                   intermediate=config.get("intermediate_size", 4 * hidden),
                   heads=config["num_attention_heads"], layers=config["num_hidden_layers"])

    @classmethod
    def qwen3(cls, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
              vocab: int) -> "ModelShape":
        """A Qwen3 backbone's shape from its config numbers alone (the released sizes: what a build
        of a checkpoint not at hand would need): tied embeddings, q/k norms, no biases."""
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o; k, v
        mlp = 3 * hidden * intermediate
        norms = 2 * hidden + 2 * head_dim
        return cls(parameters=vocab * hidden + layers * (attention + mlp + norms) + hidden,
                   layer_matmul_parameters=layers * (attention + mlp),
                   hidden=hidden, intermediate=intermediate, heads=heads, layers=layers)

    def weight_bytes(self, precision: str) -> int:
        """Weights in the build's ONNX graph of `precision`, and in a TensorRT engine of it: the
        precision table's bytes for the layers' matmul weights and for the rest (the INT8 and
        weight-only graphs store INT8/INT4 weights and an INT8 embedding table)."""
        row = precision_row(precision)
        rest = self.parameters - self.layer_matmul_parameters
        return int(self.layer_matmul_parameters * row.matmul_weight_bytes + rest * row.other_weight_bytes)

    def activation_bytes(self, batch: int, length: int, precision: str) -> int:
        """Peak activations of one forward pass: TensorRT reuses memory across layers, so about
        one layer's worth is live: the residual stream and its projections (4 x hidden), the
        MLP expansion (2 x intermediate) and the attention scores and softmax, which eager
        attention materialises (2 x heads x length^2 per row)."""
        per_token = 4 * self.hidden + 2 * self.intermediate
        scores = 2 * self.heads * length * length
        return precision_row(precision).activation_bytes * batch * (length * per_token + scores)


def _product(shape: list[int]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    weights: int
    activations: int
    workspace: int
    reserve: int
    total: int
    fits: bool
    largest_batch_at_max_k: int  # 0: not even batch 1 fits
    largest_k_at_batch_1: int


# Which precision to serve when several fit, most faithful first (their fidelity gates in
# precision/__init__.py); fp32 is no serving choice on a GPU.
GPU_PREFERENCE = ("fp16", "bf16", "int8_wo", "int8", "int4_awq")


@dataclass(frozen=True)
class MemoryPlan:
    gpu_memory: int
    max_batch: int
    max_candidates: int
    encoder_parameters: int
    reranker_parameters: int
    precisions: list[PrecisionPlan] = field(default_factory=list)

    @property
    def recommended(self) -> str | None:
        """The most faithful precision (GPU_PREFERENCE) whose engines fit at the planned batch and k."""
        fitting = {p.precision for p in self.precisions if p.fits}
        return next((name for name in GPU_PREFERENCE if name in fitting), None)

    def to_json(self) -> dict:
        return {**asdict(self), "recommended": self.recommended}


@dataclass(frozen=True)
class PlanConfig:
    gpu_memory: int
    engine: EngineConfig = field(default_factory=EngineConfig)
    # CUDA context, Triton server and python backends on the same GPU.
    reserve_bytes: int = GIB


def _footprint(encoder: ModelShape, reranker: ModelShape, projector_parameters: int, passage_tokens: int,
               prompt_tokens: int, precision: str, batch: int, k: int) -> tuple[int, int]:
    """(weights, activations) with both engines resident, at batch `batch` and k candidates (the
    encoder sees up to max(batch, k) texts, in runs of PASSAGE_RUN_ROWS: rerank-only requests
    encode their k passages)."""
    weights = encoder.weight_bytes(precision) + reranker.weight_bytes(precision) \
        + projector_parameters * precision_row(precision).other_weight_bytes
    return weights, encoder.activation_bytes(max(batch, min(k, PASSAGE_RUN_ROWS)), passage_tokens, precision) \
        + reranker.activation_bytes(batch, prompt_tokens, precision)


def plan_memory(checkpoint: Checkpoint, config: PlanConfig) -> MemoryPlan:
    """Estimate GPU memory per precision and the largest batch / k that fit `config.gpu_memory`."""
    projector = 0
    if checkpoint.projector_path is not None:
        projector = sum(_product(s) for s in _header_shapes(checkpoint.projector_path).values())
    graphs = BuildGraphs(checkpoint.config, checkpoint.reranker_dir / "tokenizer.json", checkpoint.encoder_dim)
    builder = graphs.prompt_builder()
    ck = checkpoint.config
    return plan_models(ModelShape.from_dir(checkpoint.encoder_dir), ModelShape.from_dir(checkpoint.reranker_dir),
                       projector, ck.max_passage_tokens, lambda k: prompt_length(builder, ck.max_query_tokens, k),
                       ck.max_candidates, config)


# A Qwen3-shape checkpoint's reranker prompt (`build_qwen3_checkpoint`: the default template, 64
# query tokens), measured with the real Qwen3 tokenizer: 198 tokens at k = 10, 739 at k = 100.
QWEN3_PROMPT_FIXED, QWEN3_PROMPT_PER_SLOT = 139, 6
QWEN3_PASSAGE_TOKENS, QWEN3_MAX_CANDIDATES = 512, 100


def plan_qwen3_shape(encoder: ModelShape, reranker: ModelShape, config: PlanConfig) -> MemoryPlan:
    """The GPU plan of a released Qwen3 size without its checkpoint (`plan --qwen3-shape`), with the
    settings `qwen3-checkpoint` writes (512 passage tokens, 100 candidates)."""
    return plan_models(encoder, reranker, 0, QWEN3_PASSAGE_TOKENS,
                       lambda k: QWEN3_PROMPT_FIXED + QWEN3_PROMPT_PER_SLOT * k, QWEN3_MAX_CANDIDATES, config)


def plan_models(encoder: ModelShape, reranker: ModelShape, projector: int, passage_tokens: int, prompt_tokens,
                max_candidates: int, config: PlanConfig) -> MemoryPlan:
    """The plan of every precision for two backbones' shapes; `prompt_tokens(k)` bounds the reranker
    prompt of k candidates."""
    engine = config.engine
    k_max = engine.max_candidates or max_candidates
    fixed = engine.workspace_bytes + config.reserve_bytes

    def total(precision: str, batch: int, k: int) -> int:
        return sum(_footprint(encoder, reranker, projector, passage_tokens, prompt_tokens(k), precision, batch, k)) \
            + fixed

    plans = []
    for precision in PRECISIONS:
        weights, activations = _footprint(encoder, reranker, projector, passage_tokens, prompt_tokens(k_max),
                                          precision, engine.max_batch, k_max)
        needed = weights + activations + fixed
        plans.append(PrecisionPlan(
            precision=precision, weights=weights, activations=activations,
            workspace=engine.workspace_bytes, reserve=config.reserve_bytes, total=needed,
            fits=needed <= config.gpu_memory,
            largest_batch_at_max_k=_largest(lambda b, p=precision: total(p, b, k_max) <= config.gpu_memory, 4096),
            largest_k_at_batch_1=_largest(lambda k, p=precision: total(p, 1, k) <= config.gpu_memory, max_candidates)))
    return MemoryPlan(config.gpu_memory, engine.max_batch, k_max, encoder.parameters, reranker.parameters, plans)


def graph_weight_bytes(checkpoint: Checkpoint, precision: str) -> dict[str, int]:
    """Bytes of the weights the encoder and reranker ONNX graphs store at `precision` (the build's
    disk-space check; the projector is part of the reranker graph)."""
    projector = 0
    if checkpoint.projector_path is not None:
        projector = sum(_product(s) for s in _header_shapes(checkpoint.projector_path).values())
    return {"encoder": ModelShape.from_dir(checkpoint.encoder_dir).weight_bytes(precision),
            "reranker": ModelShape.from_dir(checkpoint.reranker_dir).weight_bytes(precision)
            + int(projector * precision_row(precision).other_weight_bytes)}


def _largest(fits, upper: int) -> int:
    """Largest n in 1..upper with fits(n) (fits is monotone: more rows never need less memory); 0 if none."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low



def plan_checkpoint(checkpoint_dir: Path | None, config: PlanConfig) -> MemoryPlan:
    """`resrank-export plan`: the memory plan of a checkpoint folder (default: the demo checkpoint)."""
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import default_checkpoint

    return plan_memory(load_checkpoint(checkpoint_dir or default_checkpoint()), config)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def render_plan(plan: MemoryPlan) -> str:
    """A small text table of the plan (the JSON form is `MemoryPlan.to_json`)."""
    head = (f"GPU memory {_gib(plan.gpu_memory)} GiB; encoder {plan.encoder_parameters:,} and reranker "
            f"{plan.reranker_parameters:,} parameters; planned for batch {plan.max_batch}, k {plan.max_candidates}")
    rows = [("precision", "weights GiB", "activations GiB", "workspace GiB", "reserve GiB", "total GiB", "fits",
             "max batch @k", "max k @batch 1")]
    rows += [(p.precision, _gib(p.weights), _gib(p.activations), _gib(p.workspace), _gib(p.reserve), _gib(p.total),
              "yes" if p.fits else "no", str(p.largest_batch_at_max_k), str(p.largest_k_at_batch_1))
             for p in plan.precisions]
    note = "estimate: one layer of activations live, eager attention scores materialised; 0 = does not fit"
    smaller = [f"{p.precision} up to k {p.largest_k_at_batch_1}" for p in plan.precisions if p.largest_k_at_batch_1]
    pick = (f"pick {plan.recommended}: the most faithful precision that fits (order: {', '.join(GPU_PREFERENCE)})"
            if plan.recommended else f"no precision fits both engines in {_gib(plan.gpu_memory)} GiB at batch "
            f"{plan.max_batch} and k {plan.max_candidates}; at batch 1: "
            + (", ".join(smaller) if smaller else "none either (a larger GPU, or one model per GPU)"))
    return "\n".join([head, render_table(rows), note, pick])


def render_table(rows: list[tuple[str, ...]]) -> str:
    """Right-aligned plain-text columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)
