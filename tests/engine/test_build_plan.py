"""engine/build_plan.py: which stages a default build runs for each precision and stored dtype,
the dtype each holds, the peak it predicts from the measured factors, and `plan --qwen3-shape`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from resrank_export.engine.build_plan import (HOST_BASE_BYTES, INT8_JOIN_FACTOR, INT8_PIECE_FACTOR,
                                              ORT_HALF_SESSION_FACTOR, ORT_SESSION_FACTOR, QWEN3_VOCAB,
                                              REFERENCE_ACTIVATION_FACTOR, STAGE_FACTORS, plan_build)
from resrank_export.runtime import BATCH_TOKENS
from resrank_export.engine.plan import ModelShape
from resrank_export.model.demo import QWEN3_SHAPES

SHAPE = asdict(QWEN3_SHAPES["0.6b"])
MEASURED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "scale" / "scale.json"


@pytest.mark.parametrize(("precision", "stored", "stages"), [
    ("fp16", "bf16", [("export", "fp16"), ("parity", "fp16")]),
    ("bf16", "bf16", [("export", "bf16"), ("parity", "bf16")]),
    ("int8", "bf16", [("export", "fp32"), ("parity", "fp32"), ("calibration", "fp32"), ("precision_int8", "fp32"),
                      ("fidelity", "fp32")]),
    ("fp16", "fp32", [("export", "fp32"), ("parity", "fp32"), ("calibration", "fp32"), ("precision_fp16", "fp32"),
                      ("fidelity", "fp32")]),
    ("fp32", "bf16", [("export", "fp32"), ("parity", "fp32")])])
def test_stages_and_their_weights_dtype_follow_export_dtype_auto(precision, stored, stages):
    encoder, reranker = ModelShape.qwen3(**SHAPE, vocab=QWEN3_VOCAB), ModelShape.qwen3(**SHAPE, vocab=QWEN3_VOCAB + 1)
    plan = plan_build(encoder, reranker, precision, stored)
    assert [(s.stage, s.weights_dtype) for s in plan.stages] == stages
    weights = {dtype: reranker.parameters * width for dtype, width in (("fp32", 4), ("fp16", 2), ("bf16", 2))}
    activations = int(REFERENCE_ACTIVATION_FACTOR * reranker.heads * BATCH_TOKENS * 512 * 4)
    exported = plan.exported_dtype
    expected = {"export": weights[stored] + weights[exported],  # the file as stored beside the converted module
                "parity": max(weights[exported if exported != "fp32" else stored] + activations,
                              int((ORT_HALF_SESSION_FACTOR if exported == "fp16" else ORT_SESSION_FACTOR)
                                  * weights[exported])),
                "calibration": int(ORT_SESSION_FACTOR * weights["fp32"]),  # the FP32 encoder graph
                # the joined Q/DQ graph (FP32 weights), or one 384 MiB piece (256 MiB x the cut window)
                "precision_int8": int(max(INT8_JOIN_FACTOR * weights["fp32"], INT8_PIECE_FACTOR * (384 << 20))),
                **{name: int(factor * weights["fp32"]) for name, factor in STAGE_FACTORS.items()}}
    for stage in plan.stages:  # the larger model (the reranker, one placeholder id more)
        assert stage.peak_rss == HOST_BASE_BYTES + expected[stage.stage]
    assert plan.peak_rss == max(s.peak_rss for s in plan.stages)
    assert plan.graph_bytes[plan.exported_dtype] == encoder.weight_bytes(plan.exported_dtype) \
        + reranker.weight_bytes(plan.exported_dtype)


def test_plan_command_for_a_released_qwen3_size(tmp_path):
    """`plan --qwen3-shape 4b --json`: no checkpoint needed; the FP16 build writes 2 bytes per
    parameter of both 4B models, and exports FP16 straight from the BF16 weights."""
    from click.testing import CliRunner

    from resrank_export.cli import main

    result = CliRunner().invoke(main, ["plan", "--qwen3-shape", "4b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    fp16 = next(p for p in data["build"] if p["precision"] == "fp16")
    params = sum(ModelShape.qwen3(**asdict(QWEN3_SHAPES["4b"]), vocab=v).parameters for v in (QWEN3_VOCAB, QWEN3_VOCAB + 1))
    assert 3.9e9 < params / 2 < 4.1e9  # Qwen3-4B's published size
    assert fp16["exported_dtype"] == "fp16" and fp16["graph_bytes"] == {"fp16": 2 * params}
    refused = CliRunner().invoke(main, ["plan", "--qwen3-shape", "4b", "--checkpoint", str(tmp_path)])
    assert refused.exit_code != 0 and "--qwen3-shape plans" in refused.output


def test_gpu_plan_of_a_released_qwen3_size_names_what_serves_it():
    """`plan --qwen3-shape 4b --gpu-memory ...`: the engines' weights per precision are the parameters
    of both 4B models at the table's bytes (2 for FP16; 0.63 / 1 for INT4's layer matmuls / the
    rest); every `fits` is total <= the GPU; the pick is the most faithful precision that fits; on
    16 GiB (4 GiB workspace) none fits batch 8 x k 100 and the answer names what serves at batch 1;
    on 8 GiB nothing does."""
    from click.testing import CliRunner

    from resrank_export.cli import main
    from resrank_export.engine.plan import GPU_PREFERENCE

    encoder, reranker = (ModelShape.qwen3(**asdict(QWEN3_SHAPES["4b"]), vocab=v) for v in (QWEN3_VOCAB, QWEN3_VOCAB + 1))
    layers = encoder.layer_matmul_parameters + reranker.layer_matmul_parameters
    rest = encoder.parameters + reranker.parameters - layers

    def plan(*options):
        result = CliRunner().invoke(main, ["plan", "--qwen3-shape", "4b", *options])
        assert result.exit_code == 0, result.output
        return result.output

    for memory in ("16GiB", "24GiB"):
        data = json.loads(plan("--gpu-memory", memory, "--json"))
        rows = {p["precision"]: p for p in data["precisions"]}
        assert rows["fp16"]["weights"] == 2 * (encoder.parameters + reranker.parameters) > 14 * 2**30
        assert abs(rows["int4_awq"]["weights"] - (0.63 * layers + rest)) <= 2
        for row in rows.values():
            assert row["fits"] == (row["total"] <= data["gpu_memory"])
        fitting = [p for p in GPU_PREFERENCE if rows[p]["fits"]]
        assert data["recommended"] == (fitting[0] if fitting else None)
    assert data["recommended"] == "int8_wo"  # 24 GiB: FP16's 15 GiB of weights leave too little room
    text = plan("--gpu-memory", "16GiB")
    assert "no precision fits both engines in 16.00 GiB at batch 8 and k 100; at batch 1: int8 up to k" in text
    assert "int4_awq up to k" in text
    assert "at batch 1: none either" in plan("--gpu-memory", "8GiB")


def test_planner_predicts_the_measured_builds_within_15_percent():
    """Issue 12: the planner's build peak against every build of a released Qwen3 size measured by
    benchmarks/scale.py (benchmarks/results/scale/scale.json: 0.6B fp16 and int8, 1.7B and 4B fp16)."""
    rows = [r for r in json.loads(MEASURED.read_text())["rows"] if r["shape"] != "tiny" and r["exit_code"] == 0]
    assert {(r["shape"], r["precision"]) for r in rows} >= {("0.6b", "fp16"), ("0.6b", "int8"), ("1.7b", "fp16"), ("4b", "fp16")}
    for row in rows:
        shape = asdict(QWEN3_SHAPES[row["shape"]])
        plan = plan_build(ModelShape.qwen3(**shape, vocab=QWEN3_VOCAB), ModelShape.qwen3(**shape, vocab=QWEN3_VOCAB + 1),
                          row["precision"], "bf16")
        measured = max(s["peak_rss_bytes"] for s in row["stages"].values())
        assert abs(plan.peak_rss / measured - 1) <= 0.15, (row["shape"], row["precision"], plan.peak_rss, measured)
