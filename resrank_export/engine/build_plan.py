"""Host memory and disk of a `build` with default options, before running it: which stages run,
the dtype of the weights each holds, its predicted peak RSS, and the graph bytes written. For a
checkpoint folder (its safetensors headers) or a released Qwen3 size without one
(`plan --qwen3-shape 4b`), so a user learns what machine a 4B + 4B build needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from resrank_export.engine.plan import ModelShape, render_table
from resrank_export.export.half import auto_export_dtype
from resrank_export.engine.profiles import GIB

# Peak RSS of a stage = HOST_BASE_BYTES + factor x the larger model's weight bytes in the dtype
# the stage holds (one model copy alive at a time). Measured with benchmarks/scale.py on this
# project's 2-core machine (docs/scale.md): the base is a tiny Qwen3-shaped build's peak (torch,
# transformers, ONNX Runtime, ModelOpt and the 151k-token tokenizers loaded); the factors come
# from the Qwen3-0.6B-shape builds (export: the dynamo exporter's program beside the module and
# the graph being written; parity: the reference's weights, then one ORT session whose CPU
# provider also holds FP32 copies of FP16 weights it casts; INT8: ModelOpt's model, its
# calibration session and the quantized graph).
HOST_BASE_BYTES = int(0.75 * GIB)
HOST_STAGE_FACTORS = {"export": 2.9, "parity": 3.3, "calibration": 1.2, "precision_fp16": 3.0, "precision_bf16": 3.0,
                      "precision_int8": 3.0, "fidelity": 2.2}
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
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


def plan_build(encoder: ModelShape, reranker: ModelShape, precision: str, stored: str = "bf16") -> BuildPlan:
    """Stages of a default-options build of `precision` from weights stored in `stored`, each with
    its predicted peak RSS (`HOST_STAGE_FACTORS`); the build's peak is the largest."""
    exported = auto_export_dtype(precision, [stored])
    largest = max(encoder.parameters, reranker.parameters)
    stages = [("export", exported), ("parity", exported)]
    if precision != exported:  # half or INT8 graphs made from the FP32 ones
        stages += [("calibration", stored), (f"precision_{precision}", "fp32"), ("fidelity", "fp32")]
    planned = [StagePlan(name, dtype, int(HOST_BASE_BYTES + HOST_STAGE_FACTORS[name] * largest * _BYTES[dtype]))
               for name, dtype in stages]
    peak = max(planned, key=lambda s: s.peak_rss)
    graphs = {p: encoder.onnx_weight_bytes(p) + reranker.onnx_weight_bytes(p) for p in dict.fromkeys((exported, precision))}
    return BuildPlan(precision, exported, planned, peak.peak_rss, peak.stage, graphs)


def render_build_plans(plans: list[BuildPlan], stored: str) -> str:
    rows = [("precision", "exported", "peak RSS GiB", "at stage", "graphs written GiB")]
    rows += [(p.precision, p.exported_dtype, f"{p.peak_rss / GIB:.1f}", p.peak_stage,
              " + ".join(f"{size / GIB:.1f} ({name})" for name, size in p.graph_bytes.items())) for p in plans]
    note = (f"host memory of `build --precision P` with default options, weights stored in {stored}: base "
            f"{HOST_BASE_BYTES / GIB:.2f} GiB + a per-stage factor x the larger model's weights (measured, docs/scale.md)")
    return "\n".join([render_table(rows), note])


def build_plans(checkpoint_dir=None, qwen3_shape: str | None = None) -> tuple[str, list[BuildPlan]]:
    """(stored dtype, a plan per precision) of a checkpoint folder (default: the demo checkpoint),
    or of a released Qwen3 size stored in BF16 (the real tokenizer's 151,669 ids)."""
    from resrank_export.precision import PRECISIONS

    if qwen3_shape is not None:
        from resrank_export.model.demo import QWEN3_SHAPES

        shape = asdict(QWEN3_SHAPES[qwen3_shape])
        encoder, reranker = ModelShape.qwen3(**shape, vocab=QWEN3_VOCAB), ModelShape.qwen3(**shape, vocab=QWEN3_VOCAB + 1)
        stored = "bf16"
    else:
        from resrank_export.model.checkpoint import load_checkpoint, stored_dtype
        from resrank_export.model.demo import default_checkpoint

        checkpoint = load_checkpoint(checkpoint_dir or default_checkpoint())
        encoder, reranker = ModelShape.from_dir(checkpoint.encoder_dir), ModelShape.from_dir(checkpoint.reranker_dir)
        stored = stored_dtype(checkpoint.encoder_dir)
    return stored, [plan_build(encoder, reranker, p, stored) for p in PRECISIONS]
