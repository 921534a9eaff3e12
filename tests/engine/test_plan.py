"""Memory planner: parameter counts from safetensors headers against the real models, bytes per
precision, the fit decision at its boundary, size parsing and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from resrank_export.engine.plan import ModelShape, PlanConfig, parse_size, plan_memory
from resrank_export.engine.profiles import GIB, EngineConfig
from resrank_export.errors import InputDataError
from resrank_export.model.reference import load_backbone
from resrank_export.precision import PRECISIONS


def _layer_linear_parameters(model: torch.nn.Module) -> int:
    """Reference for the INT8 share: weights of the Linear layers inside the transformer blocks."""
    return sum(module.weight.numel() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and (".layer." in f".{name}" or "layers." in name))


@pytest.mark.parametrize("reranker", ["qwen3", "bert"])
def test_parameter_count_matches_the_real_model(tiny_checkpoint, reranker):
    checkpoint = tiny_checkpoint(reranker=reranker)
    for model_dir in (checkpoint.encoder_dir, checkpoint.reranker_dir):
        model = load_backbone(model_dir)
        shape = ModelShape.from_dir(model_dir)
        real = sum(p.numel() for p in model.parameters())
        assert shape.parameters == real
        assert shape.layer_matmul_parameters == _layer_linear_parameters(model) > 0
        assert shape.weight_bytes("fp32") == 4 * real
        assert shape.weight_bytes("fp16") == 2 * real
        assert shape.weight_bytes("int8") == real  # INT8 weights and embedding table (the norms are a rounding)
        rest = real - shape.layer_matmul_parameters
        assert shape.weight_bytes("int4_awq") == int(0.63 * shape.layer_matmul_parameters + rest)
        assert (shape.hidden, shape.layers) == (model.config.hidden_size, model.config.num_hidden_layers)


def test_fit_decision_at_its_boundary(tiny_checkpoint):
    checkpoint = tiny_checkpoint(projector="linear")
    engine = EngineConfig(max_batch=4, workspace_bytes=GIB // 4)
    probe = plan_memory(checkpoint, PlanConfig(gpu_memory=64 * GIB, engine=engine))
    fp16 = {p.precision: p for p in probe.precisions}["fp16"]
    assert fp16.total == fp16.weights + fp16.activations + fp16.workspace + fp16.reserve
    exact = {p.precision: p for p in plan_memory(checkpoint, PlanConfig(fp16.total, engine)).precisions}
    assert exact["fp16"].fits and exact["fp16"].largest_batch_at_max_k >= 4
    assert not exact["fp32"].fits and exact["fp32"].largest_batch_at_max_k < 4
    short = {p.precision: p for p in plan_memory(checkpoint, PlanConfig(fp16.total - 1, engine)).precisions}
    assert not short["fp16"].fits and short["fp16"].largest_batch_at_max_k == 3
    nothing = plan_memory(checkpoint, PlanConfig(GIB, engine)).precisions  # below workspace + reserve
    assert all(p.largest_batch_at_max_k == 0 and p.largest_k_at_batch_1 == 0 for p in nothing)


def test_precisions_order_their_totals(tiny_checkpoint):
    plan = plan_memory(tiny_checkpoint(), PlanConfig(16 * GIB))
    totals = {p.precision: p.total for p in plan.precisions}
    assert list(totals) == list(PRECISIONS)
    assert totals["fp32"] > totals["fp16"] == totals["bf16"] > totals["int8"]  # BF16 and FP16: 2 bytes a value
    weights = {p.precision: p.weights for p in plan.precisions}
    assert weights["fp16"] > weights["int8"] == weights["int8_wo"] > weights["int4_awq"]


@pytest.mark.parametrize("text, expected", [("16GiB", 16 << 30), ("24GB", 24 * 10**9), ("1.5 GiB", 3 << 29),
                                            ("512MiB", 512 << 20), ("1000", 1000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "16 GiBs", "lots", "-1GiB", "9" * 400 + "GiB", "2000000000GiB"])
def test_parse_size_rejects(text):
    with pytest.raises(InputDataError, match="--gpu-memory"):
        parse_size(text)


def test_plan_command_prints_json(tiny_checkpoint):
    from click.testing import CliRunner

    from resrank_export.cli import main

    checkpoint = tiny_checkpoint()
    result = CliRunner().invoke(main, ["plan", "--gpu-memory", "16GiB", "--checkpoint", str(checkpoint.root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["gpu_memory"] == 16 << 30
    assert data["encoder_parameters"] == ModelShape.from_dir(checkpoint.encoder_dir).parameters
    assert [p["precision"] for p in data["precisions"]] == list(PRECISIONS)


def test_qwen3_shape_from_its_config_numbers_matches_a_written_checkpoint(qwen3_tokenizer_dir, tmp_path):
    """ModelShape.qwen3 (the released sizes without a checkpoint) counts what a written Qwen3
    checkpoint's safetensors hold, and finds its FFN down-projections."""
    from dataclasses import asdict

    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import QWEN3_SHAPES, build_qwen3_checkpoint

    checkpoint = load_checkpoint(build_qwen3_checkpoint(tmp_path / "ck", qwen3_tokenizer_dir, shape="tiny"))
    for folder in (checkpoint.encoder_dir, checkpoint.reranker_dir):
        config = json.loads((folder / "config.json").read_text())
        written = ModelShape.from_dir(folder)
        assert written == ModelShape.qwen3(**asdict(QWEN3_SHAPES["tiny"]), vocab=config["vocab_size"])
        assert written.weight_bytes("int8") == written.parameters  # INT8 weights and embedding table stored
