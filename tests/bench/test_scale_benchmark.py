"""benchmarks/scale.py: what it measures of a child process (wall time, peak RSS, a stop at the
timeout) against known allocations, and the table it renders from rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_rss_of_a_child_is_its_own_high_water_mark(tmp_path):
    """A child that holds 300 MB then frees it: the measured peak includes the 300 MB, and a child
    holding 30 MB measures well below it. Measured from a small parent process: Linux starts a
    child's high-water mark from its parent's when it execs, and this test process holds GBs."""
    code = "import time; b = bytearray({n} * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.3); del b"
    driver = (f"import json, sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import scale; "
              f"print(json.dumps([scale.run_measured([sys.executable, '-c', {code!r}.format(n=n)], "
              f"__import__('pathlib').Path({str(tmp_path)!r}) / f'{{n}}.log', 60) for n in (300, 30)]))")
    big, small = json.loads(subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True,
                                           check=True).stdout)
    assert big["exit_code"] == small["exit_code"] == 0 and not big["timed_out"]
    assert big["peak_rss_bytes"] >= 300 * 2**20
    assert big["peak_rss_bytes"] - small["peak_rss_bytes"] >= 200 * 2**20
    assert big["wall_s"] >= 0.3


def test_a_child_past_the_timeout_is_stopped_with_sigterm(scale, tmp_path):
    result = scale.run_measured([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "slow.log",
                                timeout_s=1)
    assert result["timed_out"] and result["exit_code"] == -15 and result["wall_s"] < 30


def test_stage_dtype_and_markdown_rows(scale):
    assert scale._stage_dtype("export", "fp16") == "fp16"
    assert scale._stage_dtype("precision_int8", "fp32") == "fp32"
    assert scale._stage_dtype("calibration", "bf16") == "bf16"
    stage = {"status": "ran", "seconds": 90.0, "peak_rss_bytes": 3 * 2**30, "rss_bound_bytes": 4 * 2**30,
             "within_bound": True}
    row = {"shape": "0.6b", "precision": "fp16", "exported_dtype": "fp16", "wall_s": 600.0, "exit_code": 0,
           "timed_out": False, "peak_rss_bytes": 3 * 2**30, "parity": {"passed": True},
           "stages": {"export": stage, "parity": {**stage, "seconds": 200.0}},
           "graphs": {"fp16": {"encoder": {"bytes": 2**30, "planned_bytes": 2**30, "plan_error": 0.0}}}}
    text = scale.render_markdown({"machine": {"cpu": "x", "logical_cores": 2, "memory_gib": 24}, "rows": [row]})
    assert "| 0.6b | fp16 | fp16 | 10.0 (ok) | 3.00 | passed | parity | True |" in text
    assert "export 90 s / 3.00 / 4.00" in text and "encoder 1.00 GiB (plan +0.0%)" in text


def test_an_adopted_build_becomes_a_row_from_its_manifest(scale, tiny_checkpoint, tmp_path):
    """--adopt: a build folder made (and resumed) outside the script gives the row of its stages:
    wall time their sum, the peak the largest, the graphs on disk against the planner."""
    from resrank_export.build import BuildConfig, run_build

    checkpoint = tiny_checkpoint()
    (tmp_path / "ckpt-tiny").symlink_to(checkpoint.root)
    out = tmp_path / "build"
    manifest = run_build(BuildConfig(out=out, checkpoint=checkpoint.root, triton_backend=None))
    row = scale.adopted_row("tiny", "fp32", tmp_path, {}, out)
    stages = manifest["stages"]
    assert row["adopted"] and row["stages"].keys() == stages.keys()
    assert row["wall_s"] == round(sum(s["seconds"] for s in stages.values()), 1)
    assert row["peak_rss_bytes"] == max(s["peak_rss_bytes"] for s in stages.values())
    written = sum(p.stat().st_size for p in (out / "onnx" / "fp32").glob("encoder.onnx*"))
    assert row["graphs"]["fp32"]["encoder"]["bytes"] == written and row["parity"]["passed"]
    assert (out / "manifest.json").is_file()  # left as it was
    assert "stage sum of a resumed build" in scale.render_markdown({"machine": {"cpu": "x", "logical_cores": 2,
                                                                                 "memory_gib": 24}, "rows": [row]})
