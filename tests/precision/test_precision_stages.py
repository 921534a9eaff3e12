"""`build --precision fp16|int8` on a tiny checkpoint: stages recorded, reruns skipped, bad
calibration input rejected with a typed error."""

from __future__ import annotations

import numpy as np
import pytest

from resrank_export.build import BuildConfig, run_build
from resrank_export.errors import InputDataError, ResRankExportError
from resrank_export.export.onnx import graph_specs
from resrank_export.precision.calibration import CalibrationConfig, load_calibration
from resrank_export.runtime import ort_session, run_session

SMALL = CalibrationConfig(encoder_samples=16, reranker_queries=8, retrieval_pool=100)


@pytest.fixture(scope="module")
def int8_build(tiny_checkpoint, tmp_path_factory):
    checkpoint = tiny_checkpoint()
    out = tmp_path_factory.mktemp("b") / "build"
    config = BuildConfig(out=out, checkpoint=checkpoint.root, precision="int8", calibration_set=SMALL)
    return checkpoint, config, run_build(config)


def test_int8_build_records_stages_and_graphs_run(int8_build):
    checkpoint, config, manifest = int8_build
    stages = manifest["stages"]
    assert [s for s in stages][:5] == ["export", "parity", "calibration", "precision_int8", "fidelity_int8"]
    assert all(s["status"] == "ran" for s in stages.values())
    if "triton" in stages:  # the repository serves the INT8 graphs, not the FP32 ones
        for name in ("encoder", "reranker"):
            served = config.out / "model_repository" / name / "1" / "model.onnx"
            assert served.read_bytes() == (config.out / "onnx" / "int8" / f"{name}.onnx").read_bytes()
    assert stages["precision_int8"]["report"]["encoder"]["quantize_nodes"] > 0
    spec = graph_specs(checkpoint)[1]
    calibration = load_calibration(config.out / "calibration", spec)
    fp32 = run_session(ort_session(config.out / "onnx/fp32/reranker.onnx"), calibration)[0]
    int8 = run_session(ort_session(config.out / "onnx/int8/reranker.onnx"), calibration)[0]
    assert np.abs(fp32 - int8).max() > 0
    # the fidelity stage's INT8 rows (its FP32 rows compare FP32 with itself): the encoder at the
    # fidelity gate (min cosine >= 0.99, tests/precision/test_fidelity.py), reranker scores that differ
    fidelity = stages["fidelity_int8"]["report"]
    assert fidelity["encoder"]["precisions"]["int8"]["min_cosine"] >= 0.99
    reranker = fidelity["reranker"]["precisions"]["int8"]
    assert 0 < reranker["score_mae"] <= reranker["score_max_abs_diff"]
    markdown = (config.out / "fidelity.md").read_text()
    assert markdown.count("| int8 |") == 3  # encoder, reranker, and its gate's row
    assert "| int8 | encoder min cosine | 0.99 |" in markdown
    quantized = stages["precision_int8"]["report"]["reranker"]["quantize_nodes"]
    assert f"- int8/reranker: {quantized} Q/DQ pairs" in markdown


def test_rerun_with_same_inputs_skips_every_stage(int8_build):
    _, config, first = int8_build
    again = run_build(config)
    assert {k: v["status"] for k, v in again["stages"].items()} == {k: "skipped" for k in first["stages"]}
    assert again["stages"]["precision_int8"]["outputs"] == first["stages"]["precision_int8"]["outputs"]


def test_changed_int8_setting_reruns_precision_and_later_stages(int8_build, tmp_path):
    """Turning SmoothQuant off is a different graph: precision and fidelity rerun, export does not.
    On a copy of the build: the module's build stays as the other tests expect it."""
    import dataclasses
    import shutil

    from resrank_export.precision.graphs import PrecisionConfig

    _, config, first = int8_build
    assert first["stages"]["precision_int8"]["report"]["encoder"]["smoothquant"]["gemms"] > 0
    shutil.copytree(config.out, tmp_path / "build")
    plain = dataclasses.replace(config, out=tmp_path / "build",
                                precision_graphs=PrecisionConfig(int8_smoothquant_alpha=None))
    again = run_build(plain)["stages"]
    assert again["export"]["status"] == "skipped" and again["calibration"]["status"] == "skipped"
    assert again["precision_int8"]["status"] == "ran" and again["fidelity_int8"]["status"] == "ran"
    assert again["precision_int8"]["report"]["encoder"]["smoothquant"] is None


def test_given_calibration_with_wrong_dims_is_rejected(int8_build, tmp_path):
    checkpoint, config, _ = int8_build
    bad = tmp_path / "calib"
    bad.mkdir()
    for spec in graph_specs(checkpoint):
        arrays = load_calibration(config.out / "calibration", spec)
        if "passage_embeddings" in arrays:
            arrays["passage_embeddings"] = arrays["passage_embeddings"][..., :5]
        np.savez(bad / f"{spec.name}.npz", **arrays)
    with pytest.raises(InputDataError, match="'passage_embeddings' dim 2 is 5"):
        run_build(BuildConfig(out=tmp_path / "b", checkpoint=checkpoint.root, precision="int8", calibration=bad))
    assert not (tmp_path / "b").exists()


def test_unknown_method_fails_before_any_work(tiny_checkpoint, tmp_path):
    from resrank_export.precision.graphs import PrecisionConfig

    with pytest.raises(ResRankExportError, match="'percentile'"):
        run_build(BuildConfig(out=tmp_path / "b", checkpoint=tiny_checkpoint().root, precision="int8",
                              precision_graphs=PrecisionConfig(calibration_method="percentile")))
    assert not (tmp_path / "b").exists()


def test_large_graphs_are_converted_in_a_process_of_their_own(int8_build, monkeypatch, tmp_path):
    """Past ISOLATE_BYTES each graph is quantized in a child process (what the calibration stage
    left allocated stays out of the INT8 stage's memory): the same graphs as in this process."""
    import resrank_export.isolated as isolated
    import resrank_export.precision.stages as stages
    from resrank_export.precision.graphs import PrecisionConfig

    checkpoint, config, _ = int8_build
    fp32 = {spec.name: config.out / "onnx" / "fp32" / spec.filename for spec in graph_specs(checkpoint)}
    calibration = config.out / "calibration"
    children = len(isolated.finished_child_peaks)
    here = stages.make_precision_graphs(checkpoint, fp32, calibration, "int8", tmp_path / "here", PrecisionConfig())
    assert len(isolated.finished_child_peaks) == children
    monkeypatch.setattr(stages, "ISOLATE_BYTES", 0)
    apart = stages.make_precision_graphs(checkpoint, fp32, calibration, "int8", tmp_path / "apart", PrecisionConfig())
    assert len(isolated.finished_child_peaks) == children + 2  # one child per graph, each measured
    assert apart == here
    for spec in graph_specs(checkpoint):
        feeds = load_calibration(calibration, spec)
        np.testing.assert_array_equal(run_session(ort_session(tmp_path / "apart" / spec.filename), feeds)[0],
                                      run_session(ort_session(tmp_path / "here" / spec.filename), feeds)[0])


def test_planned_int8_graph_bytes_match_the_written_graphs(int8_build):
    """The planner (free-space check, `plan`) against the INT8 graphs the stage wrote: one byte a
    weight (INT8 matmuls and embedding table), plus what it does not count: a 4-byte scale per row
    of the table and per output channel (4 / hidden of the weights: 12.5% at this tiny size's 32,
    0.4% at Qwen3-0.6B's 1024), FP32 norms (3 bytes more each: 5% here) and the graph's structure
    (20% in all here, measured)."""
    from resrank_export.engine.plan import ModelShape, graph_weight_bytes

    checkpoint, config, _ = int8_build
    for name, planned in graph_weight_bytes(checkpoint, "int8").items():
        hidden = ModelShape.from_dir(checkpoint.root / name).hidden
        written = sum(p.stat().st_size for p in (config.out / "onnx" / "int8").glob(f"{name}.onnx*"))
        assert planned <= written <= (1 + 4 / hidden + 0.1) * planned, (name, planned, written)
