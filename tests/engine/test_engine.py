"""Engine stage on CPU: profiles from the build's maxima against real prompts, manifest
compatibility decisions, build_engines.sh against the profiles (executed with a recording
trtexec), plan installation into a Triton config, and the no-TensorRT error path."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from resrank_export.engine.manifest import (
    EngineEntry,
    GpuRuntime,
    check_compatible,
    plan_filename,
    read_engine_manifest,
    write_engine_manifest,
)
from resrank_export.engine.profiles import QUERY_BOUNDARY_SLACK, BuildGraphs, EngineConfig, engine_profiles
from resrank_export.engine.script import write_build_script
from resrank_export.engine.stage import (check_gpu_supports, engines_dir, ensure_engines, install_plans,
                                         plan_engine_actions, source_hash)
from resrank_export.engine.tensorrt import check_tensorrt_layout, load_engine, typing_mode
from resrank_export.errors import EngineError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
RUNTIME = GpuRuntime("10.13.3.9", "NVIDIA L4", "8.9")


def _build_folder(graphs: dict[str, Path]) -> Path:
    return graphs["encoder"].parent.parent.parent


@pytest.fixture(scope="module")
def tiny_build(tiny_export):
    checkpoint, graphs = tiny_export()
    return checkpoint, _build_folder(graphs)


def _graphs(build: Path) -> BuildGraphs:
    return BuildGraphs.from_build(build, build / "onnx" / "fp32")


def test_profiles_follow_the_declared_maxima(tiny_build):
    checkpoint, build = tiny_build
    ck = checkpoint.config
    profiles = engine_profiles(_graphs(build), EngineConfig(max_batch=5, max_candidates=ck.max_candidates - 3))
    k = ck.max_candidates - 3
    encoder, reranker = profiles["encoder"], profiles["reranker"]
    assert encoder["input_ids"].max == (max(5, k), ck.max_passage_tokens)
    assert encoder["attention_mask"] == encoder["input_ids"]
    assert reranker["passage_embeddings"].max == (5, k, checkpoint.encoder_dim)
    assert reranker["passage_embeddings"].min == (1, 1, checkpoint.encoder_dim)
    assert reranker["slot_positions"].max == (5, k)
    for profile in profiles.values():
        for shapes in profile.values():
            assert all(lo <= mid <= hi for lo, mid, hi in zip(shapes.min, shapes.opt, shapes.max))


def test_reranker_sequence_bounds_every_real_prompt(tiny_build):
    """The max sequence admits every prompt the PromptBuilder makes (long, short, empty
    queries; k from 1 to max) and is tight: at most the boundary slack above the longest."""
    from resrank_export.data.default_corpus import SAMPLE_QUERIES, stdlib_passages
    from resrank_export.model.reference import prompt_builder

    checkpoint, build = tiny_build
    builder = prompt_builder(checkpoint)
    profile = engine_profiles(_graphs(build), EngineConfig(max_batch=2))["reranker"]["input_ids"]
    texts = list(SAMPLE_QUERIES) + [p.text for p in stdlib_passages(limit=20)] + ["", "?"]
    rng = np.random.default_rng(0)
    queries = texts + [" ".join(rng.choice(texts, size=5)) for _ in range(20)]
    k_max = checkpoint.config.max_candidates
    lengths = [len(builder.build(q, k).ids) for q in queries for k in (1, k_max // 2, k_max)]
    assert max(lengths) <= profile.max[1]
    assert min(lengths) >= profile.min[1]
    longest = max(len(builder.build(q, k_max).ids) for q in queries)
    occurrences = checkpoint.config.prompt_template.count("{query}")
    assert profile.max[1] - longest <= 2 * QUERY_BOUNDARY_SLACK * occurrences


@pytest.mark.parametrize("setting, match", [
    ({"max_candidates": 10_000}, "max_candidates"),
    ({"max_query_tokens": 1}, "max_query_tokens"),
    ({"max_passage_tokens": 2}, "max_passage_tokens"),
    ({"max_batch": 4, "opt_batch": 5}, "opt_batch"),
])
def test_profiles_reject_maxima_the_serving_code_would_exceed(tiny_build, setting, match):
    _, build = tiny_build
    with pytest.raises(EngineError, match=match):
        engine_profiles(_graphs(build), EngineConfig(**setting))


def _entry(build: Path, graph: str, runtime: GpuRuntime = RUNTIME, **changes) -> EngineEntry:
    entry = EngineEntry(graph=graph, precision="fp32", plan=plan_filename(graph, runtime),
                        tensorrt_version=runtime.tensorrt_version, gpu_name=runtime.gpu_name,
                        compute_capability=runtime.compute_capability,
                        source_sha256=source_hash(build, "fp32", graph), profile={}, strongly_typed=True,
                        workspace_bytes=1 << 30)
    return replace(entry, **changes)


@pytest.mark.parametrize("runtime, ok, reason", [
    (RUNTIME, True, "compatible"),
    (GpuRuntime("10.13.3.9.post1", "NVIDIA L4", "8.9"), True, "compatible"),  # same release, other packaging
    (GpuRuntime("10.13.3.9", "NVIDIA RTX 4090", "8.9"), True, "same architecture"),
    (GpuRuntime("10.14.1.48", "NVIDIA L4", "8.9"), False, "this machine has TensorRT 10.14.1.48"),
    (GpuRuntime("10.13.3.9", "NVIDIA H100", "9.0"), False, "compute capability 9.0"),
])
def test_compatibility_decisions(tiny_build, runtime, ok, reason):
    _, build = tiny_build
    verdict = check_compatible(_entry(build, "encoder"), runtime, source_hash(build, "fp32", "encoder"))
    assert verdict.ok is ok
    assert reason in verdict.reason


def test_a_changed_graph_or_a_missing_entry_is_not_compatible(tiny_build):
    _, build = tiny_build
    assert "source graph changed" in check_compatible(_entry(build, "encoder", source_sha256="0" * 64),
                                                      RUNTIME, source_hash(build, "fp32", "encoder")).reason
    assert not check_compatible(None, RUNTIME).ok


def test_loading_an_incompatible_plan_is_refused_before_tensorrt(tiny_build, tmp_path):
    _, build = tiny_build
    entry = _entry(build, "reranker", tensorrt_version="10.9.0.34")
    with pytest.raises(EngineError, match="refusing to load reranker.sm89.plan.*TensorRT 10.9.0.34"):
        load_engine(tmp_path, entry, RUNTIME)


def _fake_engines(build: Path, tmp_path: Path, entries: list[EngineEntry]) -> Path:
    """A copy of the build folder with a manifest and placeholder plan files."""
    copy = tmp_path / "build"
    shutil.copytree(build, copy)
    folder = engines_dir(copy, "fp32")
    folder.mkdir(parents=True)
    for entry in entries:
        (folder / entry.plan).write_bytes(b"plan " + entry.compute_capability.encode())
    write_engine_manifest(folder, entries)
    return copy


def test_engine_actions_keep_compatible_plans_and_rebuild_the_rest(tiny_build, tmp_path):
    _, build = tiny_build
    build = _fake_engines(build, tmp_path, [_entry(build, "encoder"), _entry(build, "reranker", tensorrt_version="10.9.0.34")])
    actions = {a.graph: a for a in plan_engine_actions(build, "fp32", RUNTIME)}
    assert actions["encoder"].action == "keep"
    assert actions["reranker"].action == "build" and "TensorRT 10.9.0.34" in actions["reranker"].reason
    (engines_dir(build, "fp32") / "encoder.sm89.plan").unlink()
    assert plan_engine_actions(build, "fp32", RUNTIME)[0].action == "build"
    other_gpu = GpuRuntime("10.13.3.9", "NVIDIA H100", "9.0")
    assert [a.action for a in plan_engine_actions(build, "fp32", other_gpu)] == ["build", "build"]


def _run_build_script(script: Path, tmp_path: Path, **env) -> list[list[str]]:
    """Run build_engines.sh with a trtexec and nvidia-smi that only record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "trtexec.log"
    (bin_dir / "trtexec").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {log}\necho --- >> {log}\n')
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 8.9\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    subprocess.run(["bash", str(script)], check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env})
    calls = log.read_text().split("---\n")
    return [call.splitlines() for call in calls if call.strip()]


def _shapes(argument: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in dims.split("x"))
            for name, dims in (item.split(":") for item in argument.split(","))}


def test_build_script_matches_the_profiles(tiny_build, linter, tmp_path):
    _, build = tiny_build
    config = EngineConfig(max_batch=3, workspace_bytes=2 << 30)
    profiles = engine_profiles(_graphs(build), config)
    graphs_dir = tmp_path / "onnx" / "fp32"
    graphs_dir.mkdir(parents=True)
    script = write_build_script(graphs_dir, profiles, config, "fp32")
    calls = _run_build_script(script, tmp_path)
    assert len(calls) == 2
    for call, (graph, profile) in zip(calls, profiles.items()):
        args = dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in call)
        assert args["--onnx"] == f"{graph}.onnx"
        assert args["--saveEngine"] == f"../../engines/fp32/{graph}.sm89.plan"
        assert args["--timingCacheFile"] == "../../engines/fp32/timing.sm89.cache"
        assert args["--memPoolSize"] == "workspace:2048M"
        assert "--stronglyTyped" in args
        for flag, level in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            assert _shapes(args[flag]) == {name: getattr(s, level) for name, s in profile.items()}
    (tmp_path / "weak").mkdir()
    weak = _run_build_script(script, tmp_path / "weak", STRONGLY_TYPED="")  # TensorRT 8: no such flag
    assert len(weak) == 2 and all("--stronglyTyped" not in call for call in weak)
    result = subprocess.run([linter("shellcheck"), str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("bits,block,refused", [(8, 128, True), (8, 0, False), (4, 32, False)])
def test_block_wise_int8_weights_are_refused_before_tensorrt(tmp_path, bits, block, refused):
    """TensorRT reads block-wise DequantizeLinear weights in INT4 only: int8_wo's CPU default (INT8
    blocks of 128) is refused in one line naming the file and the [int8_wo] setting to change."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from resrank_export.precision.compact import BLOCK_OPSET, store_weights

    weight = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [numpy_helper.from_array(weight, "w")]),
        opset_imports=[helper.make_opsetid("", BLOCK_OPSET)])
    store_weights(model, {"w": (bits, block)})
    onnx.save(model, str(tmp_path / "g.onnx"))
    if refused:
        with pytest.raises(EngineError, match=r"g\.onnx: 1 INT8 weights stored in blocks .*block-size = 0"):
            check_tensorrt_layout(tmp_path / "g.onnx")
    else:
        check_tensorrt_layout(tmp_path / "g.onnx")


@pytest.mark.parametrize("precision, gpu, refused", [
    ("fp8", GpuRuntime("10.13.3.9", "Tesla T4", "7.5"), True),
    ("fp8", GpuRuntime("10.13.3.9", "NVIDIA A100", "8.0"), True),
    ("fp8", GpuRuntime("10.13.3.9", "NVIDIA L4", "8.9"), False),
    ("fp8", GpuRuntime("10.13.3.9", "NVIDIA H100", "9.0"), False),
    ("int8", GpuRuntime("10.13.3.9", "Tesla T4", "7.5"), False),
])
def test_fp8_engines_need_ada_or_hopper(tiny_build, precision, gpu, refused):
    """The precision table's minimum compute capability, checked before any TensorRT work (even a
    dry run of `engines ensure` stops there)."""
    _, build = tiny_build
    if refused:
        match = f"fp8 engines need .* 8.9 or newer.*{gpu.gpu_name} is {gpu.compute_capability}"
        with pytest.raises(EngineError, match=match):
            check_gpu_supports(precision, gpu)
        with pytest.raises(EngineError, match=match):
            ensure_engines(build, precision, EngineConfig(), gpu, dry_run=True)
    else:
        check_gpu_supports(precision, gpu)


def test_typing_mode_follows_the_tensorrt_release():
    assert typing_mode("10.13.3.9") == "flag"
    assert typing_mode("11.4.0.106") == "always"
    assert typing_mode("8.6.1") == "builder_flags"


def test_install_plans_sets_cc_model_filenames(tiny_build, tmp_path):
    from google.protobuf import text_format

    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    _, build = tiny_build
    hopper = GpuRuntime("10.13.3.9", "NVIDIA H100", "9.0")
    entries = [_entry(build, g, r) for g in ("encoder", "reranker") for r in (RUNTIME, hopper)]
    build = _fake_engines(build, tmp_path, entries)
    repository = tmp_path / "repository"
    for graph in ("encoder", "reranker"):
        (repository / graph).mkdir(parents=True)
        config = model_config_pb2.ModelConfig(name=graph, platform="tensorrt_plan", max_batch_size=0)
        config.cc_model_filenames["7.5"] = "stale.plan"
        (repository / graph / "config.pbtxt").write_text(text_format.MessageToString(config))
    install_plans(build, "fp32", repository)
    for graph in ("encoder", "reranker"):
        config = text_format.Parse((repository / graph / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert dict(config.cc_model_filenames) == {"8.9": f"{graph}.sm89.plan", "9.0": f"{graph}.sm90.plan"}
        assert config.platform == "tensorrt_plan" and config.name == graph
        assert (repository / graph / "1" / f"{graph}.sm90.plan").read_bytes() == b"plan 9.0"
    assert read_engine_manifest(engines_dir(build, "fp32")) == sorted(entries, key=lambda e: (e.graph, e.compute_capability))


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the no-TensorRT path cannot be exercised")
def test_build_with_tensorrt_backend_without_tensorrt_exits_2(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from resrank_export.cli import main

    checkpoint = tiny_checkpoint()
    out = tmp_path / "build"
    result = CliRunner().invoke(main, ["build", "--checkpoint", str(checkpoint.root), "--out", str(out),
                                       "--backend", "tensorrt"])
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("error: --backend tensorrt needs TensorRT") and "\n" not in message
    assert "--backend onnxruntime" in message and "docker" in message
    assert not out.exists()


@pytest.mark.slow
def test_build_writes_the_engine_script_from_the_same_profiles(tiny_checkpoint, tmp_path):
    from resrank_export.build import BuildConfig, run_build
    from resrank_export.engine.script import render_build_script
    from resrank_export.engine.stage import build_profiles

    config = BuildConfig(out=tmp_path / "build", checkpoint=tiny_checkpoint().root, engine=EngineConfig(max_batch=2))
    manifest = run_build(config)
    assert manifest["stages"]["engine-script"]["status"] == "ran"
    script = tmp_path / "build" / "onnx" / "fp32" / "build_engines.sh"
    expected = render_build_script(build_profiles(tmp_path / "build", "fp32", config.engine), config.engine, "fp32")
    assert script.read_text() == expected and os.access(script, os.X_OK)
    assert run_build(config)["stages"]["engine-script"]["status"] == "skipped"
    changed = run_build(replace(config, engine=EngineConfig(max_batch=3)))
    assert changed["stages"]["engine-script"]["status"] == "ran" and "--maxShapes=input_ids:3x" in script.read_text()
