"""`build`: checkpoint -> ONNX graphs -> parity report (later: precision, index, Triton), each a
stage recorded in the folder's manifest. The folder is replaced atomically: a failed build
leaves the previous one (or nothing) in place."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from resrank_export.build_precision import check_precision_inputs, run_precision_stages
from resrank_export.calibration import CalibrationConfig
from resrank_export.checkpoint import Checkpoint, load_checkpoint
from resrank_export.errors import ResRankExportError
from resrank_export.export import ExportConfig, export_onnx
from resrank_export.fidelity import FidelityConfig
from resrank_export.fs import atomic_dir, sha256_file, sha256_tree
from resrank_export.manifest import MANIFEST_FILE, StageRunner, library_versions, read_manifest
from resrank_export.parity import RUN_FILE, ParityConfig, check_parity
from resrank_export.precision import PrecisionConfig

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")
PARITY_FILE = "parity.json"


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    checkpoint: Path | None = None  # None: the cached demo checkpoint
    precision: str = "fp32"
    export: ExportConfig = field(default_factory=ExportConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)
    calibration: Path | None = None  # a calibration folder made by `calibrate`; None: build one
    calibration_set: CalibrationConfig = field(default_factory=CalibrationConfig)
    precision_graphs: PrecisionConfig = field(default_factory=PrecisionConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    force: bool = False


def _check_out_folder(out: Path) -> None:
    """Never replace a folder that is not a previous build: that would lose the user's files."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise ResRankExportError(
            f"{out}: exists and is not a resrank-export build folder (no {MANIFEST_FILE}); "
            "choose another --out or remove it")


def _files_under(folder: Path, *parts: str) -> list[Path]:
    return sorted(p for part in parts for p in (folder / part).rglob("*") if p.is_file()) \
        + [folder / p for p in parts if (folder / p).is_file()]


def _parity_data_identity(config: ParityConfig) -> dict:
    data = config.data_dir
    if data is None or not (data / RUN_FILE).is_file():
        return {"data": "embedded"}
    return {"data": str(data.resolve()), "run": sha256_file(data / RUN_FILE),
            "queries": sha256_file(data / "queries.jsonl")}


def run_build(config: BuildConfig) -> dict:
    """Run the build stages into `config.out`; returns the manifest."""
    if config.precision not in PRECISIONS:
        raise ResRankExportError(f"--precision {config.precision!r}: expected one of {', '.join(PRECISIONS)}")
    out = Path(config.out)
    _check_out_folder(out)
    if config.checkpoint is None:
        from resrank_export.demo import default_checkpoint

        log.info("no --checkpoint given: using the demo checkpoint")
        checkpoint_dir = default_checkpoint()
    else:
        checkpoint_dir = Path(config.checkpoint)
    checkpoint = load_checkpoint(checkpoint_dir)
    check_precision_inputs(checkpoint, config)
    inputs = {"checkpoint": {"path": str(checkpoint.root.resolve()), "sha256": sha256_tree(checkpoint.root)},
              "precision": config.precision}

    with atomic_dir(out, seed_from_target=True) as work:
        runner = StageRunner(work, read_manifest(work), force=config.force)
        _export_stage(runner, work, checkpoint, inputs, config)
        _parity_stage(runner, work, checkpoint, config)
        if config.precision != "fp32":
            run_precision_stages(runner, work, checkpoint, config)
        manifest = runner.write(inputs)
    return manifest


def _export_stage(runner: StageRunner, work: Path, checkpoint: Checkpoint, inputs: dict, config: BuildConfig) -> None:
    def export() -> dict:
        export_onnx(checkpoint, work, config.export)
        return {"outputs": _files_under(work, "onnx/fp32", "tokenizer", "resrank.json")}

    runner.run("export", {"checkpoint": inputs["checkpoint"]["sha256"], "opset": config.export.opset,
                          "external_data": config.export.external_data,
                          "versions": {k: v for k, v in library_versions().items()
                                       if k in ("torch", "transformers", "onnx", "onnxscript")}}, export)


def _parity_stage(runner: StageRunner, work: Path, checkpoint: Checkpoint, config: BuildConfig) -> None:
    def parity() -> dict:
        from resrank_export.model import ResRankReference

        graphs = {name: work / "onnx" / "fp32" / f"{name}.onnx" for name in ("encoder", "reranker")}
        report = check_parity(ResRankReference(checkpoint), graphs, config.parity)
        (work / PARITY_FILE).unlink(missing_ok=True)
        (work / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return {"outputs": [work / PARITY_FILE], "report": report}

    runner.run("parity", {"graphs": runner.output_hashes("export"), "atol": config.parity.atol,
                          "queries": config.parity.queries, **_parity_data_identity(config.parity)}, parity)
