"""Host memory and disk of a `build` with default options, before running it: which stages run,
the dtype of the weights each holds, its predicted peak RSS, and the graph bytes written. For a
checkpoint folder (its safetensors headers) or a released Qwen3 size without one
(`plan --qwen3-shape 4b`), so a user learns what machine a 4B + 4B build needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from resrank_export.engine.plan import ModelShape, render_table
from resrank_export.engine.profiles import GIB
from resrank_export.export.half import auto_export_dtype
from resrank_export.precision.graphs import PrecisionConfig
from resrank_export.precision.pieces import CUT_WINDOW
from resrank_export.runtime import BATCH_TOKENS

# Peak RSS of a stage, from what it holds (one model copy alive at a time, the larger model's
# bytes), with the constants measured by benchmarks/scale.py on the Qwen3-0.6B-shape checkpoint
# (docs/scale.md, "Planner"):
# - every stage: HOST_BASE_BYTES, a process with torch, transformers and ONNX Runtime imported and
#   the 151k-id tokenizers loaded (0.37 GiB measured);
# - export (a process per graph): the weights as stored beside the module converted to the export
#   dtype (FP16 from BF16: 2.59 GiB measured, 2.62 planned; FP32: 3.70 measured, 3.73 planned);
# - parity: the PyTorch reference (weights in the graph's half dtype, else as stored) plus its
#   FP32 activations, which grow with heads x batch tokens x the longest text (eager attention's
#   scores), then one ONNX Runtime session of ORT_SESSION_FACTOR x its graph, or of
#   ORT_HALF_SESSION_FACTOR x an FP16 graph (fitted at 4B: 19.48 GiB for 7.50 GiB of FP16
#   weights; sampled, 16.2 GiB while the encoder graph ran and 19.5 GiB once the reranker's session
#   loaded after it, so part of the first session's memory is not returned; at 0.6B one FP16
#   session measured 1.3x, below the reference's peak there);
# - calibration: one ONNX Runtime session of the FP32 encoder graph;
# - precision_int8 (precision/pieces.py): the larger of joining the pieces (INT8_JOIN_FACTOR x the
#   FP32 weights: the Q/DQ graph keeps FP32 weights; 3.6 GiB measured at 0.6B) and one piece's
#   ModelOpt run beside the process that carries the values between pieces (INT8_PIECE_FACTOR x
#   the largest piece, CUT_WINDOW x the piece size: 6.3 GiB for 336 MiB pieces at 0.6B, with the
#   embedded calibration set's 5,250 encoder tokens: ONNX Runtime's calibrator keeps every
#   calibrated tensor of every run, so this part grows with the calibration tokens);
# - fidelity: 2.5 x the FP32 weights, one ONNX Runtime session at a time, the INT8 one the
#   larger (its Q/DQ graph keeps FP32 weights; 5.87 GiB measured at 0.6B INT8);
# - precision_fp16/bf16 (AutoCast): 3.0, NOT measured at a size past 2 GB;
# - weight-only (precision_int8_wo, precision_int4_awq): WEIGHT_ONLY_FACTOR x the FP32 weights, fitted
#   on the 0.6B int4_awq build (11.52 GiB for 2.22 GiB of FP32 weights), measured while the stage
#   still held the loaded weights beside the AWQ probe's ONNX Runtime session and its GEMM inputs;
#   it loads them after the session since (commit d41cee8), so this is an upper bound until re-measured.
HOST_BASE_BYTES = int(0.4 * GIB)
ORT_SESSION_FACTOR = 1.3  # the FP16 0.6B encoder: 1.80 GiB process for 1.11 GiB of weights
ORT_HALF_SESSION_FACTOR = 2.55  # FP16 graphs on the CPU provider, parity at 4B: (19.48 - 0.4) / 7.50 GiB
REFERENCE_ACTIVATION_FACTOR = 4.5  # x heads x batch tokens x longest text x 4 bytes (0.6B FP16 parity: 3.95 GiB)
WEIGHT_ONLY_FACTOR = 5.0
STAGE_FACTORS = {"precision_fp16": 3.0, "precision_bf16": 3.0, "precision_int8_wo": WEIGHT_ONLY_FACTOR,
                 "precision_int4_awq": WEIGHT_ONLY_FACTOR, "fidelity": 2.5}
INT8_JOIN_FACTOR = 1.6
INT8_PIECE_FACTOR = 16.7
QWEN3_VOCAB = 151_669  # the real Qwen3 tokenizer's ids; the reranker adds its placeholder token


@dataclass(frozen=True)
class StagePlan:
    stage: str
    weights_dtype: str  # of the weights the stage holds
    peak_rss: int


@dataclass(frozen=True)
class BuildPlan:
    precision: str
    exported_dtype: str
    stages: list[StagePlan]
    peak_rss: int
    peak_stage: str
    graph_bytes: dict[str, int]  # written graphs (both models), per graph precision

    def to_json(self) -> dict:
        return asdict(self)


def _stage_peak(stage: str, model: ModelShape, stored: str, exported: str, max_tokens: int) -> int:
    activations = int(REFERENCE_ACTIVATION_FACTOR * model.heads * BATCH_TOKENS * max_tokens * 4)
    reference = model.weight_bytes(exported if exported != "fp32" else stored) + activations
    if stage == "export":
        held = model.weight_bytes(stored) + model.weight_bytes(exported)
    elif stage == "parity":
        factor = ORT_HALF_SESSION_FACTOR if exported == "fp16" else ORT_SESSION_FACTOR
        held = max(reference, int(factor * model.weight_bytes(exported)))
    elif stage == "calibration":  # the FP32 encoder graph in one session makes the slot vectors
        held = int(ORT_SESSION_FACTOR * model.weight_bytes("fp32"))
    elif stage in ("precision_int8", "precision_fp8"):  # both ModelOpt Q/DQ, a piece at a time
        held = int(max(INT8_JOIN_FACTOR * model.weight_bytes("fp32"), INT8_PIECE_FACTOR * int8_piece(model)))
    else:
        held = int(STAGE_FACTORS[stage] * model.weight_bytes("fp32"))
    return HOST_BASE_BYTES + held


def int8_piece(model: ModelShape) -> int:
    """FP32 weights of the largest piece the INT8 stage quantizes at once with default options."""
    return min(model.weight_bytes("fp32"), int(CUT_WINDOW * PrecisionConfig.int8_piece_bytes))


def plan_build(encoder: ModelShape, reranker: ModelShape, precision: str, stored: str = "bf16",
               max_tokens: int = 512) -> BuildPlan:
    """Stages of a default-options build of `precision` from weights stored in `stored` (texts up to
    `max_tokens`), each with its predicted peak RSS; the build's peak is the largest."""
    exported = auto_export_dtype(precision, [stored])
    model = max(encoder, reranker, key=lambda m: m.parameters)
    stages = [("export", exported), ("parity", exported)]
    if precision != exported:  # half or INT8 graphs made from the FP32 ones
        stages += [("calibration", "fp32"), (f"precision_{precision}", "fp32"), ("fidelity", "fp32")]
    planned = [StagePlan(name, dtype, _stage_peak(name, model, stored, exported, max_tokens)) for name, dtype in stages]
    peak = max(planned, key=lambda s: s.peak_rss)
    graphs = {p: encoder.weight_bytes(p) + reranker.weight_bytes(p) for p in dict.fromkeys((exported, precision))}
    return BuildPlan(precision, exported, planned, peak.peak_rss, peak.stage, graphs)


def render_build_plans(plans: list[BuildPlan], stored: str) -> str:
    rows = [("precision", "exported", "peak RSS GiB", "at stage", "graphs written GiB")]
    rows += [(p.precision, p.exported_dtype, f"{p.peak_rss / GIB:.1f}", p.peak_stage,
              " + ".join(f"{size / GIB:.1f} ({name})" for name, size in p.graph_bytes.items())) for p in plans]
    note = (f"host memory of `build --precision P` with default options, weights stored in {stored}: what each "
            "stage holds of the larger model, with constants measured at 0.6B and 4B (docs/scale.md, 'Planner')")
    return "\n".join([render_table(rows), note])


def qwen3_shapes(size: str) -> tuple[ModelShape, ModelShape]:
    """(encoder, reranker) shapes of a released Qwen3 size with the real tokenizer's ids (the
    reranker has one more: its placeholder token)."""
    from resrank_export.model.demo import QWEN3_SHAPES

    shape = asdict(QWEN3_SHAPES[size])
    return ModelShape.qwen3(**shape, vocab=QWEN3_VOCAB), ModelShape.qwen3(**shape, vocab=QWEN3_VOCAB + 1)


def build_plans(checkpoint_dir=None, qwen3_shape: str | None = None) -> tuple[str, list[BuildPlan]]:
    """(stored dtype, a plan per precision) of a checkpoint folder (default: the demo checkpoint),
    or of a released Qwen3 size stored in BF16 (the real tokenizer's 151,669 ids)."""
    from resrank_export.precision import PRECISIONS

    if qwen3_shape is not None:
        encoder, reranker = qwen3_shapes(qwen3_shape)
        stored, max_tokens = "bf16", 512  # build_qwen3_checkpoint's max_passage_tokens
    else:
        from resrank_export.model.checkpoint import load_checkpoint, stored_dtype
        from resrank_export.model.demo import default_checkpoint

        checkpoint = load_checkpoint(checkpoint_dir or default_checkpoint())
        encoder, reranker = ModelShape.from_dir(checkpoint.encoder_dir), ModelShape.from_dir(checkpoint.reranker_dir)
        stored, max_tokens = stored_dtype(checkpoint.encoder_dir), checkpoint.config.max_passage_tokens
    return stored, [plan_build(encoder, reranker, p, stored, max_tokens) for p in PRECISIONS]
