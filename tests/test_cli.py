"""The command line: help for every option, one-line errors with their exit codes and no output
left behind, and (slow) a full build of the demo checkpoint with parity on DL19."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from resrank_export.cli import main
from resrank_export.manifest import MANIFEST_FILE
from resrank_export.model.checkpoint import CONFIG_FILE

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="resrank-export")


def _flat(text: str) -> str:
    """Help text with click's line wrapping undone."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, cmd in sorted(group.commands.items()):
        paths += _command_paths(cmd, prefix + (name,)) if isinstance(cmd, click.Group) else [prefix + (name,)]
    return paths


def _resolve(path: tuple[str, ...]) -> click.Command:
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("command", _command_paths(main), ids=lambda p: " ".join(p) or "main")
def test_help_explains_every_option(command):
    result = _invoke(*command, "--help")
    assert result.exit_code == 0
    help_text = _flat(result.output)
    assert f"Usage: resrank-export {' '.join(command)}".strip() in help_text
    cmd = _resolve(command)
    for param in cmd.params:
        if isinstance(param, click.Argument):
            assert param.human_readable_name in help_text
            continue
        if getattr(param, "hidden", False):  # set by --config (its tables), not typed by a user
            continue
        assert param.help, f"option {param.opts} has no help text"
        for name in param.opts + param.secondary_opts:
            assert name in help_text
        assert _flat(param.help) in help_text
    for name in getattr(cmd, "commands", {}):
        assert name in help_text


def _broken(tiny_checkpoint, tmp_path, how: str) -> Path:
    root = tmp_path / "checkpoint"
    if how == "missing-folder":
        return root
    shutil.copytree(tiny_checkpoint().root, root)
    config = json.loads((root / CONFIG_FILE).read_text())
    if how == "malformed-json":
        (root / CONFIG_FILE).write_text("{")
    elif how == "unknown-pooling":
        (root / CONFIG_FILE).write_text(json.dumps({**config, "pooling": "max"}))
    elif how == "no-placeholder":
        (root / CONFIG_FILE).write_text(json.dumps({**config, "placeholder_token": "<|slot|>"}))
    elif how == "no-reranker":
        shutil.rmtree(root / "reranker")
    elif how == "corrupt-weights":  # found only when the export loads the model
        weights = root / "encoder" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    return root


BROKEN = {"missing-folder": "checkpoint folder not found", "malformed-json": "malformed JSON",
          "unknown-pooling": "'pooling' is 'max'", "no-placeholder": "'<|slot|>'",
          "no-reranker": "reranker: folder not found", "corrupt-weights": "encoder: cannot be loaded"}


@pytest.mark.parametrize("how", list(BROKEN))
def test_bad_checkpoint_is_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path, how):
    checkpoint = _broken(tiny_checkpoint, tmp_path, how)
    out = tmp_path / "builds" / "out"
    result = _invoke("build", "--checkpoint", str(checkpoint), "--out", str(out))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert BROKEN[how] in result.stderr
    assert not out.exists() and not any(out.parent.glob("*"))


def test_bad_checkpoint_via_python_m(tiny_checkpoint, tmp_path):
    """The real entry point: the error is the only thing on stderr."""
    checkpoint = _broken(tiny_checkpoint, tmp_path, "unknown-pooling")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "resrank_export", "build", "--checkpoint", str(checkpoint),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: {checkpoint / CONFIG_FILE}: field 'pooling' is 'max'; expected one of last, mean, cls"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_foreign_out_folder_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    result = _invoke("build", "--checkpoint", str(tiny_checkpoint().root), "--out", str(out))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "no manifest.json" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("alpha", ["0", "1.5"])
def test_smoothquant_alpha_outside_unit_interval_is_refused(tmp_path, alpha):
    result = _invoke("build", "--precision", "int8", "--int8-smoothquant-alpha", alpha, "--out", str(tmp_path / "b"))
    assert result.exit_code == 2 and "--int8-smoothquant-alpha" in result.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("size", ["12abc", "0"])
def test_bad_int8_piece_size_is_one_line_naming_the_option(tmp_path, size):
    result = _invoke("build", "--precision", "int8", "--int8-piece-size", size, "--out", str(tmp_path / "b"))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert ("--int8-piece-size '12abc'" if size == "12abc" else "INT8 piece size 0 bytes") in result.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, option", [
    (["build", "--opset", "99999"], "--opset"),  # was onnx's ValidationError after the export
    (["build", "--opset", "16"], "--opset"),
    (["calibrate", "--encoder-samples", "0"], "--encoder-samples"),
    (["calibrate", "--reranker-queries", "-1"], "--reranker-queries"),
    (["serve", "--http-port", "70000"], "--http-port"),
])
def test_out_of_range_options_exit_2_before_any_work(tmp_path, args, option):
    result = _invoke(*args, "--out" if args[0] != "serve" else "--repository", str(tmp_path / "out"))
    assert result.exit_code == 2 and option in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())


def test_opset_range_is_what_the_exporter_writes():
    """MAX_OPSET (the CLI's bound, kept free of imports) within torch.onnx's and onnx's own newest."""
    import onnx
    from torch.onnx._constants import ONNX_MAX_OPSET

    from resrank_export.export import MAX_OPSET

    assert MAX_OPSET <= min(ONNX_MAX_OPSET, onnx.defs.onnx_opset_version())


def test_plan_of_a_huge_max_candidates_is_one_line(tiny_checkpoint, tmp_path):
    """It once allocated a prompt of 10^12 slots until the kernel killed it."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint().root, checkpoint)
    config = json.loads((checkpoint / CONFIG_FILE).read_text())
    (checkpoint / CONFIG_FILE).write_text(json.dumps({**config, "max_candidates": 10**12}))
    result = _invoke("plan", "--checkpoint", str(checkpoint), "--gpu-memory", "16GiB")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {checkpoint / CONFIG_FILE}: field 'max_candidates'")


def test_demo_checkpoint_refuses_existing_folder(tmp_path):
    result = _invoke("demo-checkpoint", str(tmp_path))
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_build_demo_checkpoint_with_dl19_parity(demo_checkpoint, dl19_dir, tmp_path):
    """End to end, the slowest test: real MiniLM encoder, DL19 text, 100 candidates."""
    out = tmp_path / "build"
    result = _invoke("build", "--checkpoint", str(demo_checkpoint.root), "--parity-data", str(dl19_dir),
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    parity = manifest["stages"]["parity"]["report"]
    assert str(dl19_dir) in parity["source"]
    assert parity["reranker"]["max_abs_diff"] <= 1e-4 and parity["reranker"]["top10_identical"] is True
    assert parity["encoder"]["max_abs_diff"] <= 1e-4 and parity["encoder"]["top10_identical"] == 1.0
    assert {c["k"] for c in parity["reranker"]["cases"]} >= {1, demo_checkpoint.config.max_candidates}
    assert parity["passed"] is True and "parity passed" in result.stdout
    # the default repository (`--cpu-runtime auto`): OpenVINO BF16 where the CPU has it natively and
    # its parity on DL19 holds the gate; the command's last line says which path and why
    from resrank_export.runtime import installed_cpu_runtimes, probe_cpu

    served = manifest["stages"]["triton"]["report"]["cpu_path"]
    assert f"serves the graphs on {served['reason']}" in result.stdout
    if probe_cpu().bf16 and "openvino" in installed_cpu_runtimes():
        bf16 = parity["cpu_paths"]["openvino/bf16"]
        assert bf16["passed"] and min(bf16["encoder"]["min_cosine"], bf16["reranker"]["min_cosine"]) >= 0.999
        assert (served["runtime"], served["compute"]) == ("openvino", "bf16")
    else:
        assert (served["runtime"], served["compute"]) == ("onnxruntime", "f32")
