"""`run_build`: the build folder layout and manifest, skipping unchanged stages, rerunning changed
ones, and never leaving partial output or touching folders that are not builds."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from resrank_export.build import BuildConfig, run_build
from resrank_export.errors import CheckpointError, ParityError, ResRankExportError
from resrank_export.export.parity import ParityConfig
from resrank_export.fs import sha256_file, sha256_tree
from resrank_export.manifest import MANIFEST_FILE
from resrank_export.model.checkpoint import CONFIG_FILE

LAYOUT = ["resrank.json", "onnx/fp32/encoder.onnx", "onnx/fp32/reranker.onnx",
          "tokenizer/encoder/tokenizer.json", "tokenizer/reranker/tokenizer.json"]


@pytest.fixture(scope="module")
def first_build(tiny_checkpoint, tmp_path_factory):
    """(checkpoint folder, build folder, manifest) of one finished build of a tiny checkpoint."""
    root = tmp_path_factory.mktemp("build-module")
    checkpoint = root / "checkpoint"
    shutil.copytree(tiny_checkpoint().root, checkpoint)
    out = root / "builds" / "build"
    return checkpoint, out, run_build(BuildConfig(out=out, checkpoint=checkpoint))


@pytest.fixture
def build_copy(first_build, tmp_path):
    """A private copy of the finished build, in a folder of its own."""
    out = tmp_path / "builds" / "build"
    shutil.copytree(first_build[1], out)
    return out


def _status(manifest: dict) -> dict[str, str]:
    """Status of the stages this suite is about (later issues add stages after them)."""
    return {name: manifest["stages"][name]["status"] for name in ("export", "parity")}


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_first_build_layout_and_manifest(first_build):
    _, out, manifest = first_build
    assert _status(manifest) == {"export": "ran", "parity": "ran"}
    assert json.loads((out / MANIFEST_FILE).read_text()) == manifest
    export_outputs = manifest["stages"]["export"]["outputs"]
    assert set(LAYOUT) <= set(export_outputs)
    for stage in manifest["stages"].values():
        for rel, digest in stage["outputs"].items():
            assert sha256_file(out / rel) == digest
    report = manifest["stages"]["parity"]["report"]
    assert json.loads((out / "parity.json").read_text()) == report
    assert report["passed"] is True and report["reranker"]["max_abs_diff"] <= 1e-4
    assert _entries(out.parent) == ["build"]  # no temp folder left beside it


def test_rerun_with_unchanged_inputs_skips_every_stage(first_build, build_copy):
    checkpoint, _, first = first_build
    manifest = run_build(BuildConfig(out=build_copy, checkpoint=checkpoint))
    assert _status(manifest) == {"export": "skipped", "parity": "skipped"}
    assert {stage["status"] for stage in manifest["stages"].values()} == {"skipped"}
    assert manifest["stages"]["parity"]["report"] == first["stages"]["parity"]["report"]
    for name, stage in manifest["stages"].items():
        assert stage["outputs"] == first["stages"][name]["outputs"]
        for rel, digest in stage["outputs"].items():
            assert sha256_file(build_copy / rel) == digest
    assert json.loads((build_copy / MANIFEST_FILE).read_text()) == manifest
    assert _entries(build_copy.parent) == ["build"]


def test_changed_checkpoint_reruns_its_stages(first_build, build_copy, tmp_path):
    checkpoint, _, first = first_build
    changed = tmp_path / "changed-checkpoint"
    shutil.copytree(checkpoint, changed)
    config = json.loads((changed / CONFIG_FILE).read_text())
    (changed / CONFIG_FILE).write_text(json.dumps({**config, "residual_alpha": 0.5}))
    manifest = run_build(BuildConfig(out=build_copy, checkpoint=changed))
    assert _status(manifest) == {"export": "ran", "parity": "ran"}
    graph = "onnx/fp32/reranker.onnx"
    assert manifest["stages"]["export"]["outputs"][graph] != first["stages"]["export"]["outputs"][graph]
    assert json.loads((build_copy / CONFIG_FILE).read_text())["residual_alpha"] == 0.5
    assert manifest["stages"]["parity"]["report"]["passed"] is True


def test_failed_stage_keeps_the_previous_build(first_build, build_copy):
    """A stage that raises (here parity, given a tolerance nothing can meet) must leave the
    previous build exactly as it was and no temp folder."""
    checkpoint = first_build[0]
    before = sha256_tree(build_copy)
    with pytest.raises(ParityError):
        run_build(BuildConfig(out=build_copy, checkpoint=checkpoint, parity=ParityConfig(atol=-1.0)))
    assert sha256_tree(build_copy) == before
    assert _entries(build_copy.parent) == ["build"]


def _beir_without(folder: Path, missing: str) -> Path:
    folder.mkdir()
    for name in ("run.bm25.trec", "queries.jsonl", "corpus.jsonl"):
        if name != missing:
            (folder / name).write_text("")
    return folder


@pytest.mark.parametrize("how", ["missing-folder", "no-queries", "no-corpus"])
def test_bad_parity_data_on_a_rerun_fails_before_any_work(first_build, build_copy, tmp_path, how):
    """A rerun once skipped parity as unchanged (the embedded corpus' key) and recorded the bogus
    path; a run file without queries.jsonl was a FileNotFoundError traceback."""
    data = {"missing-folder": lambda: tmp_path / "nowhere",
            "no-queries": lambda: _beir_without(tmp_path / "beir", "queries.jsonl"),
            "no-corpus": lambda: _beir_without(tmp_path / "beir", "corpus.jsonl")}[how]()
    expected = {"missing-folder": f"{data}: parity data folder not found",
                "no-queries": f"{data / 'queries.jsonl'}: file not found",
                "no-corpus": f"{data / 'corpus.jsonl'}: file not found"}[how]
    before = sha256_tree(build_copy)
    with pytest.raises(ResRankExportError) as caught:
        run_build(BuildConfig(out=build_copy, checkpoint=first_build[0], parity=ParityConfig(data_dir=data)))
    assert str(caught.value).startswith(expected)
    assert sha256_tree(build_copy) == before
    assert _entries(build_copy.parent) == ["build"]


@pytest.mark.parametrize("how", ["under-a-file", "is-a-file"])
def test_an_out_path_that_cannot_be_written_is_one_error(first_build, tmp_path, how):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker / "build" if how == "under-a-file" else blocker
    with pytest.raises(ResRankExportError) as caught:
        run_build(BuildConfig(out=out, checkpoint=first_build[0]))
    assert str(caught.value).startswith(f"{out.absolute() if how == 'under-a-file' else out}: ")
    assert _entries(tmp_path) == ["blocker"] and blocker.read_text() == "a file, not a folder"


def test_relative_out_path(first_build, build_copy, monkeypatch):
    """`--out resrank-build` (relative, as `make demo` passes it): stages that run must record
    their outputs relative to the build folder."""
    monkeypatch.chdir(build_copy.parent)
    manifest = run_build(BuildConfig(out=Path(build_copy.name), checkpoint=first_build[0], force=True))
    assert manifest["stages"]["export"]["status"] == "ran"
    for rel, digest in manifest["stages"]["export"]["outputs"].items():
        assert sha256_file(build_copy / rel) == digest
    assert _entries(build_copy.parent) == ["build"]


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "previous-build"])
def test_bad_checkpoint_writes_nothing(first_build, tmp_path, existing):
    bad = tmp_path / "bad-checkpoint"
    shutil.copytree(first_build[0], bad)
    (bad / CONFIG_FILE).write_text('{"pooling": ')
    out = tmp_path / "builds" / "build"
    if existing:
        shutil.copytree(first_build[1], out)
    before = sha256_tree(out) if existing else None
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        run_build(BuildConfig(out=out, checkpoint=bad))
    if existing:
        assert sha256_tree(out) == before and _entries(out.parent) == ["build"]
    else:
        assert not out.exists() and not (tmp_path / "builds").exists()


def test_foreign_folder_is_refused_and_untouched(first_build, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ResRankExportError, match="not a resrank-export build folder"):
        run_build(BuildConfig(out=out, checkpoint=first_build[0]))
    assert _entries(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    assert _entries(tmp_path) == ["mine"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ResRankExportError, match="not a resrank-export build folder"):
        run_build(BuildConfig(out=a_file, checkpoint=first_build[0]))
    assert a_file.read_text() == "x"


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="triton extra not installed")
def test_build_writes_model_repository_and_reuses_it(tiny_checkpoint, tmp_path):
    from resrank_export.build import TRITON_REPOSITORY, BuildConfig, run_build
    from resrank_export.triton.repository import MARKER_FILE

    config = BuildConfig(out=tmp_path / "build", checkpoint=tiny_checkpoint().root)
    first = run_build(config)
    assert first["stages"]["triton"]["status"] == "ran"
    summary = json.loads((tmp_path / "build" / TRITON_REPOSITORY / MARKER_FILE).read_text())
    assert summary == first["stages"]["triton"]["report"]
    assert "resrank_rerank" in summary["models"] and "resrank" not in summary["models"]  # no index yet
    _check_auto_cpu_path(first, tmp_path / "build" / TRITON_REPOSITORY)
    second = run_build(config)
    assert second["stages"]["triton"]["status"] == "skipped"
    assert second["stages"]["triton"]["outputs"] == first["stages"]["triton"]["outputs"]
    # --ort-optimize on the same folder: only the fusion stage and the repository run, and the
    # repository serves the fused graphs (fusions themselves: tests/precision/test_ort_optimize.py)
    fused = run_build(dataclasses.replace(config, ort_optimize=True))
    assert {k: v["status"] for k, v in fused["stages"].items() if v["status"] == "ran"} == \
        {"ort_optimize": "ran", "triton": "ran"}
    report = fused["stages"]["ort_optimize"]["report"]["fp32"]
    assert report["parity"]["passed"] and report["graphs"]["encoder"]["fused_ops"].get("Attention", 0) > 0
    for name in ("encoder", "reranker"):
        served = tmp_path / "build" / TRITON_REPOSITORY / name / "1" / "model.onnx"
        assert served.read_bytes() == (tmp_path / "build" / "onnx" / "fp32" / f"{name}.ort.onnx").read_bytes()
    assert fused["stages"]["triton"]["report"]["cpu_path"]["runtime"] == "onnxruntime"  # fused graphs: ORT only


def _check_auto_cpu_path(manifest: dict, repository: Path) -> None:
    """--cpu-runtime auto (the default): the parity stage measured each faster path this machine
    offers against its compute type's gate, and the repository serves the fastest that passed
    (on a CPU without BF16: none measured, ONNX Runtime FP32, saying why)."""
    from resrank_export.export.parity import CPU_PATH_GATES
    from resrank_export.runtime import installed_cpu_runtimes, path_candidates, path_name, probe_cpu
    from resrank_export.triton.config import parse_config

    cpu = probe_cpu()
    measured = manifest["stages"]["parity"]["report"].get("cpu_paths", {})
    assert list(measured) == [path_name(*p) for p in path_candidates(cpu, installed_cpu_runtimes())]
    chosen = manifest["stages"]["triton"]["report"]["cpu_path"]
    for name, report in measured.items():
        gate = CPU_PATH_GATES[name.split("/")[1]]
        assert report["runtime"].startswith("OpenVINO") and report["gate"] == vars(gate)
        holds = all(report[graph]["min_cosine"] >= gate.min_cosine and report[graph]["max_abs_diff"] <= gate.atol
                    and report[graph]["top10_overlap"] >= gate.top10_overlap for graph in ("encoder", "reranker"))
        assert report["passed"] == holds
        # computed in BF16 for real: its rounding shows, far above the FP32 graphs' own difference
        parity = manifest["stages"]["parity"]["report"]
        assert report["encoder"]["max_abs_diff"] > 10 * max(parity["encoder"]["max_abs_diff"], 1e-7)
    passed = [name for name, report in measured.items() if report["passed"]]
    if passed:
        assert f"{chosen['runtime']}/{chosen['compute']}" == passed[0], chosen
    else:
        assert (chosen["runtime"], chosen["compute"]) == ("onnxruntime", "f32")
        assert cpu.bf16 or "this CPU has no native BF16" in chosen["reason"] or "not installed" in chosen["reason"]
    config = parse_config((repository / "reranker" / "config.pbtxt").read_text())
    assert config.parameters["CPU_RUNTIME"].string_value == chosen["runtime"]
    assert config.parameters["OPENVINO_COMPUTE"].string_value == chosen["compute"]


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
def test_half_export_dtype_needs_the_same_precision(first_build, tmp_path, precision):
    """--export-dtype fp16 makes the fp16 graphs themselves: any other --precision is refused
    before any work, naming both options, and nothing is written."""
    from resrank_export.export.onnx import ExportConfig

    out = tmp_path / "build"
    with pytest.raises(ResRankExportError, match=f"--export-dtype fp16 .* --precision fp16 \\(not {precision}"):
        run_build(BuildConfig(out=out, checkpoint=first_build[0], precision=precision, export=ExportConfig(dtype="fp16")))
    assert not out.exists()


def test_unknown_export_dtype_is_refused():
    from resrank_export.export.onnx import ExportConfig

    with pytest.raises(ResRankExportError, match="--export-dtype 'fp8': expected one of auto, fp32, fp16, bf16"):
        ExportConfig(dtype="fp8")


@pytest.fixture(scope="module")
def bf16_checkpoint(qwen3_tokenizer_dir, tmp_path_factory):
    """A tiny Qwen3-shaped checkpoint stored in BF16, as the releases are."""
    from resrank_export.model.demo import build_qwen3_checkpoint

    return build_qwen3_checkpoint(tmp_path_factory.mktemp("bf16") / "ck", qwen3_tokenizer_dir, shape="tiny",
                                  dtype="bf16", max_candidates=12)


@pytest.mark.parametrize(("stored", "precision", "exported"), [
    ("bf16", "fp16", "fp16"), ("bf16", "bf16", "bf16"), ("bf16", "int8", "fp32"), ("bf16", "fp32", "fp32"),
    ("fp32", "fp16", "fp32"), ("fp32", "bf16", "fp32")])
def test_export_dtype_auto_exports_a_half_target_from_half_weights(first_build, bf16_checkpoint, stored, precision,
                                                                   exported):
    """auto: a BF16 checkpoint built for fp16/bf16 is exported in that dtype (no FP32 copy); int8
    needs FP32 graphs, and an FP32 checkpoint keeps the FP32 export and its fidelity report."""
    from resrank_export.export.onnx import AUTO, ExportConfig
    from resrank_export.model.checkpoint import load_checkpoint, stored_dtype

    root = bf16_checkpoint if stored == "bf16" else first_build[0]
    checkpoint = load_checkpoint(root)
    assert stored_dtype(checkpoint.encoder_dir) == stored_dtype(checkpoint.reranker_dir) == stored
    assert ExportConfig(dtype=AUTO).for_precision(precision, checkpoint).dtype == exported
    assert ExportConfig(dtype="fp32").for_precision(precision, checkpoint).dtype == "fp32"  # an explicit choice stays


def test_default_fp16_build_of_a_bf16_checkpoint_exports_fp16_graphs(bf16_checkpoint, tmp_path):
    """`build --precision fp16` with default options on a BF16 checkpoint: FP16 graphs straight from
    the BF16 weights, parity against them computed in FP32 under the FP16 gate, no FP32 graph."""
    from resrank_export.export.parity import PARITY_GATES

    out = tmp_path / "build"
    manifest = run_build(BuildConfig(out=out, checkpoint=bf16_checkpoint, precision="fp16", triton_backend=None))
    assert manifest["stages"]["export"]["report"]["dtype"] == "fp16"
    assert manifest["config"]["export"]["dtype"] == "fp16"  # the manifest records what was resolved
    assert (out / "onnx" / "fp16" / "encoder.onnx").is_file() and not (out / "onnx" / "fp32").exists()
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["dtype"] == "fp16" and parity["gate"] == vars(PARITY_GATES["fp16"])
    assert 0 < parity["reranker"]["max_abs_diff"] <= PARITY_GATES["fp16"].atol
    assert "precision_fp16" not in manifest["stages"]


def test_device_cuda_without_a_gpu_is_refused_before_any_output(first_build, tmp_path):
    import torch

    from resrank_export.errors import NotAvailableError
    from resrank_export.export.onnx import ExportConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "build"
    with pytest.raises(NotAvailableError, match="--device cuda: PyTorch sees no CUDA GPU"):
        run_build(BuildConfig(out=out, checkpoint=first_build[0], export=ExportConfig(device="cuda")))
    assert not out.exists()
