"""The build stages after parity for --precision fp16|bf16|int8|int8_wo|int4_awq|fp8: calibration set -> precision graphs
-> fidelity report, chained inside a build folder by `build.py`."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from resrank_export.export.half import graph_file_bytes
from resrank_export.export.onnx import ISOLATE_BYTES, graph_specs
from resrank_export.fs import sha256_file, sha256_tree
from resrank_export.isolated import run_isolated
from resrank_export.manifest import StageRunner
from resrank_export.model.checkpoint import Checkpoint
from resrank_export.model.specs import GraphSpec
from resrank_export.precision import precision_row
from resrank_export.precision.calibration import CARD_FILE, CalibrationConfig, build_calibration_set, load_calibration
from resrank_export.precision.fidelity import FidelityConfig, failed_gates, measure_fidelity, render_markdown
from resrank_export.precision.graphs import (PrecisionConfig, check_int8_config, convert_half, quantize_fp8,
                                             quantize_int8)
from resrank_export.precision.weight_only import DEFAULT_CONFIGS, WeightOnlyConfig, quantize_weight_only

log = logging.getLogger(__name__)
CALIBRATION_DIR = "calibration"
FIDELITY_JSON, FIDELITY_MD = "fidelity.json", "fidelity.md"


@dataclass(frozen=True)
class PrecisionStagesConfig:
    """What the stages after parity need for --precision fp16|bf16|int8 (`build.BuildConfig` composes it)."""

    precision: str
    calibration: Path | None = None  # a calibration folder made by `calibrate`; None: build one
    calibration_set: CalibrationConfig = field(default_factory=CalibrationConfig)
    graphs: PrecisionConfig = field(default_factory=PrecisionConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    # the weight-only precision's knobs (the build TOML's [int4_awq] / [int8_wo] table); None: its defaults
    weight_only: WeightOnlyConfig | None = None

    @property
    def weight_only_config(self) -> WeightOnlyConfig:
        return self.weight_only or DEFAULT_CONFIGS[self.precision]

    def settings(self) -> dict:
        """What the precision stage's graphs depend on besides the FP32 graphs and calibration set."""
        recipe = precision_row(self.precision).recipe
        if recipe in ("int8_qdq", "fp8_qdq"):
            return vars(self.graphs)
        if recipe == "weight_only":
            return vars(self.weight_only_config)
        return {"half_keep_fp32_ops": self.graphs.half_keep_fp32_ops, "autocast_samples": self.graphs.autocast_samples}


def _data_identity(path: Path | None) -> dict:
    """What a stage's result depends on in a user's data folder or file: path and content hashes."""
    if path is None:
        return {"data": "embedded"}
    path = Path(path)
    if path.is_file():
        return {"data": str(path.resolve()), "sha256": sha256_file(path)}
    return {"data": str(path.resolve()), "sha256": sha256_tree(path) if path.is_dir() else None}


def check_precision_inputs(checkpoint: Checkpoint, config: PrecisionStagesConfig) -> None:
    """Fail before the export on what can be checked up front: method name, given calibration."""
    recipe = precision_row(config.precision).recipe
    if recipe in ("int8_qdq", "fp8_qdq"):
        check_int8_config(config.graphs)
    if recipe == "weight_only":
        config.weight_only_config.check(precision_row(config.precision).weight_bits)
    if config.precision != "fp32" and config.calibration is not None:
        for spec in graph_specs(checkpoint):
            load_calibration(config.calibration, spec)


def _convert_graph(src: Path, dst: Path, calibration_dir: Path, spec: GraphSpec, precision: str,
                   config: PrecisionConfig, weight_only: WeightOnlyConfig | None) -> dict:
    calibration = load_calibration(calibration_dir, spec)
    row = precision_row(precision)
    if row.recipe == "autocast":
        return convert_half(src, dst, calibration, config, precision)
    if row.recipe == "weight_only":
        return quantize_weight_only(src, dst, calibration, row.weight_bits, weight_only)
    if row.recipe == "fp8_qdq":
        return quantize_fp8(src, dst, calibration, config)
    return quantize_int8(src, dst, calibration, config)


def make_precision_graphs(checkpoint: Checkpoint, fp32_graphs: dict[str, Path], calibration_dir: Path,
                          precision: str, out: Path, config: PrecisionConfig,
                          weight_only: WeightOnlyConfig | None = None) -> dict[str, dict]:
    """Each graph of `fp32_graphs` converted to `precision` as out/<graph file>; {graph: conversion report}.
    A graph past ISOLATE_BYTES is converted in a process of its own (isolated.py): measured at
    Qwen3-0.6B, the build process began the INT8 stage holding 2.8 GiB that the calibration
    stage's ONNX Runtime session had left allocated."""
    reports = {}
    weight_only = weight_only or DEFAULT_CONFIGS.get(precision)
    for spec in graph_specs(checkpoint):
        src = Path(fp32_graphs[spec.name])
        args = (src, out / spec.filename, calibration_dir, spec, precision, config, weight_only)
        if graph_file_bytes(src) > ISOLATE_BYTES:
            reports[spec.name] = run_isolated(_convert_graph, *args, what=f"{precision} graph of {spec.name}")
        else:
            reports[spec.name] = _convert_graph(*args)
    return reports


def compare_precisions(checkpoint: Checkpoint, fp32_graphs: dict[str, Path], work: Path,
                       calibration: CalibrationConfig, precision_config: PrecisionConfig, config: FidelityConfig,
                       precisions: tuple[str, ...] = ("fp16", "int8")) -> dict:
    """Makes each precision's graphs in `work` (one calibration set for all) and measures them in one
    report, FP32 embeddings computed once: the full-corpus study and the CI gates, where a build
    compares one precision per folder."""
    card = build_calibration_set(checkpoint, Path(work) / CALIBRATION_DIR, calibration, fp32_graphs["encoder"])
    graphs, conversions = {"fp32": dict(fp32_graphs)}, {}
    for precision in precisions:
        made = make_precision_graphs(checkpoint, fp32_graphs, Path(work) / CALIBRATION_DIR, precision,
                                     Path(work) / precision, precision_config)
        graphs[precision] = {spec.name: Path(work) / precision / spec.filename for spec in graph_specs(checkpoint)}
        conversions.update({f"{precision}/{name}": report for name, report in made.items()})
    return {**measure_fidelity(checkpoint, graphs, config), "calibration": card, "conversions": conversions}


def run_precision_stages(runner: StageRunner, work: Path, checkpoint: Checkpoint, config: PrecisionStagesConfig) -> None:
    _calibration_stage(runner, work, checkpoint, config)
    _precision_stage(runner, work, checkpoint, config)
    _fidelity_stage(runner, work, checkpoint, config)


def _calibration_stage(runner: StageRunner, work: Path, checkpoint: Checkpoint, config: PrecisionStagesConfig) -> None:
    """A given calibration folder is validated against the graphs and copied in (the build then
    holds everything its graphs were made from); otherwise one is built from the corpus, its slot
    vectors made by the parity-checked FP32 encoder graph. FP16 uses it too: AutoCast's range
    check runs real inputs."""
    target = work / CALIBRATION_DIR
    encoder = work / "onnx" / "fp32" / graph_specs(checkpoint)[0].filename

    def calibrate() -> dict:
        if target.exists():
            shutil.rmtree(target)
        if config.calibration is not None:
            for spec in graph_specs(checkpoint):
                load_calibration(config.calibration, spec)
            target.mkdir()
            for name in ("encoder.npz", "reranker.npz", CARD_FILE):
                if (Path(config.calibration) / name).is_file():
                    shutil.copy2(Path(config.calibration) / name, target / name)
            card = json.loads((target / CARD_FILE).read_text()) if (target / CARD_FILE).is_file() else {}
        else:
            card = build_calibration_set(checkpoint, target, config.calibration_set, encoder)
        return {"outputs": sorted(target.iterdir()), "report": card}

    if config.calibration is not None:
        inputs = {"given": _data_identity(Path(config.calibration))}
    else:
        inputs = {"corpus": _data_identity(config.calibration_set.corpus),
                  "config": {k: v for k, v in vars(config.calibration_set).items() if k != "corpus"},
                  "encoder": runner.output_hashes("export")[encoder.relative_to(work).as_posix()]}
    runner.run("calibration", {**inputs, "checkpoint": sha256_tree(checkpoint.root)}, calibrate)


def _precision_stage(runner: StageRunner, work: Path, checkpoint: Checkpoint, config: PrecisionStagesConfig) -> None:
    precision = config.precision

    def convert() -> dict:
        fp32 = {spec.name: work / "onnx" / "fp32" / spec.filename for spec in graph_specs(checkpoint)}
        report = make_precision_graphs(checkpoint, fp32, work / CALIBRATION_DIR, precision, work / "onnx" / precision,
                                       config.graphs, config.weight_only)
        return {"outputs": [work / "onnx" / precision / spec.filename for spec in graph_specs(checkpoint)],
                "report": report}

    runner.run(f"precision_{precision}", {"graphs": runner.output_hashes("export"),
                                          "calibration": runner.output_hashes("calibration"),
                                          "settings": config.settings()}, convert)


def _fidelity_stage(runner: StageRunner, work: Path, checkpoint: Checkpoint, config: PrecisionStagesConfig) -> None:
    precision = config.precision

    def fidelity() -> dict:
        graphs = {p: {spec.name: work / "onnx" / p / spec.filename for spec in graph_specs(checkpoint)}
                  for p in ("fp32", precision)}
        report = measure_fidelity(checkpoint, graphs, config.fidelity)
        for failure in failed_gates(report):
            log.warning("fidelity gate FAILED: %s (see %s)", failure, work / FIDELITY_MD)
        report["conversions"] = {f"{precision}/{name}": conversion
                                 for name, conversion in runner.stages[f"precision_{precision}"]["report"].items()}
        for name in (FIDELITY_JSON, FIDELITY_MD):
            (work / name).unlink(missing_ok=True)
        (work / FIDELITY_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (work / FIDELITY_MD).write_text(render_markdown(report))
        return {"outputs": [work / FIDELITY_JSON, work / FIDELITY_MD], "report": report}

    fc = config.fidelity
    runner.run(f"fidelity_{precision}", {
        "graphs": {**runner.output_hashes("export"), **runner.output_hashes(f"precision_{precision}")},
        "retrieval": _data_identity(fc.retrieval_data), "rerank": _data_identity(fc.rerank_data),
        "config": {k: v for k, v in vars(fc).items() if k not in ("retrieval_data", "rerank_data")}}, fidelity)
