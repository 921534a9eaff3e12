"""Stage 2 (every precision past fp32): calibration sets from real text (`calibration`), FP16 and
BF16 (AutoCast), INT8 (ModelOpt Q/DQ, with `smoothquant` first) and weight-only INT4/INT8
(`weight_only`) graphs (`graphs`), how much they change the outputs (`fidelity`), and the build
stages that chain them (`stages`).

This module is the precision table: one row per precision, read by every stage (the CLI's
choices, the conversion recipe, the fidelity gates, the planner's bytes, the runtimes and Triton
flavours that take it, TensorRT's builder settings). It imports nothing, so the CLI can read it
at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    recipe: str  # how the graph is made: "export" (fp32), "autocast", "int8_qdq", "weight_only", "fp8_qdq"
    # Planner: bytes per weight of the transformer layers' matmuls and of the rest (embedding table,
    # norms) in the graph the build writes, and bytes per activation.
    matmul_weight_bytes: float
    other_weight_bytes: float
    activation_bytes: int
    # Fidelity gates against the FP32 graph (None: not gated): encoder embeddings' min cosine on the
    # compared texts, the encoder's nDCG@10 drop on the retrieval data, reranker Kendall tau, and
    # the reranker's nDCG@10 drop on the rerank data's judged queries (a ranking that gets worse,
    # which tau alone cannot tell from one that only reorders ties; meaningful on a trained reranker).
    min_cosine: float | None
    max_ndcg_drop: float | None
    min_kendall_tau: float | None
    max_rerank_ndcg_drop: float | None = None
    # `engines check`: TensorRT's scores within this max |diff| of ONNX Runtime's on the same graph,
    # and this share of the queries with an identical top 10
    engine_gate: tuple[float, float] = (1e-3, 1.0)
    # What runs it: the CPU runtimes (python flavour, fidelity), and whether a TensorRT engine needs
    # a GPU of compute capability >= this (fp8: 8.9, Ada/Hopper).
    cpu_runtimes: tuple[str, ...] = ("onnxruntime", "openvino")
    min_compute_capability: float = 0.0
    weight_bits: int = 0  # weight-only: bits of the stored layer weights
    summary: str = ""


# int4_awq's matmul bytes: INT4 blocks of 128 with an FP32 scale each (0.5 + 4 / 128) and the FFN
# down-projections, a fifth of a Qwen3 layer's matmul weights, INT8 (1 + 4 / rows): 0.63.
TABLE = (
    Precision("fp32", "export", 4, 4, 4, None, None, None, engine_gate=(1e-3, 1.0),
              summary="the exported graph, parity-checked"),
    Precision("fp16", "autocast", 2, 2, 2, 0.999, 0.002, 0.98, 0.002, engine_gate=(2e-2, 0.66),
              summary="AutoCast, norms and cosine in FP32"),
    Precision("bf16", "autocast", 2, 2, 2, 0.995, 0.002, 0.98, 0.002, engine_gate=(8e-2, 0.5), cpu_runtimes=(),
              summary="AutoCast; ONNX Runtime's CPU provider has no BF16 MatMul"),
    Precision("int8", "int8_qdq", 1, 1, 2, 0.99, 0.005, None, 0.005, engine_gate=(1e-1, 0.33),
              summary="ModelOpt INT8 Q/DQ (weights and activations), INT8 weights stored"),
    Precision("int8_wo", "weight_only", 1, 1, 4, 0.999, 0.005, None, 0.005, engine_gate=(2e-2, 0.66), weight_bits=8,
              summary="INT8 weight-only, per output channel: near-lossless, half of FP16's bytes"),
    Precision("int4_awq", "weight_only", 0.63, 1, 4, 0.95, 0.01, None, 0.01, engine_gate=(1e-1, 0.33), weight_bits=4,
              summary="INT4 weight-only, block-wise with AWQ scales (W4A16 on TensorRT)"),
    # FP8 E4M3 weights and GEMM inputs, FP32 elsewhere; the token table FP16. Checked on a CPU by ONNX
    # Runtime without its Q/DQ fusions (runtime.graph_session); no CPU runtime serves it.
    Precision("fp8", "fp8_qdq", 1, 2, 4, 0.99, 0.005, None, engine_gate=(1e-1, 0.33), cpu_runtimes=(),
              min_compute_capability=8.9,
              summary="ModelOpt FP8 E4M3 Q/DQ, FP8 weights stored; TensorRT on Ada/Hopper (compute capability 8.9+)"),
)
BY_NAME = {row.name: row for row in TABLE}
PRECISIONS = tuple(BY_NAME)
HALF_PRECISIONS = tuple(row.name for row in TABLE if row.recipe == "autocast")


def precision_row(name: str) -> Precision:
    """The table's row of `name`; a KeyError names the choices (callers check names at their edge)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"precision {name!r}: expected one of {', '.join(PRECISIONS)}") from None
