"""Builds that survive being killed: real `resrank-export build` subprocesses of a tiny checkpoint
stopped with SIGTERM (clean exit 143, no temp folder, finished stages kept and reused) and with
SIGKILL (the next run removes the dead process's temp folder and names the stage that did not
finish with its recorded peak RSS); the output lock, the owner check of temp folders, the
free-space refusal, and a stage's own peak RSS compared with the memory it allocated."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from resrank_export.build import BuildConfig, run_build
from resrank_export.errors import DiskSpaceError, OutputInUseError
from resrank_export.fs import FREE_BYTES_ENV, OWNER_FILE, atomic_dir, output_lock, read_owner, stale_temps
from resrank_export.interrupt import Interrupted
from resrank_export.manifest import MANIFEST_FILE, RUNNING, StageRunner, read_manifest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds a subprocess build may take to reach a stage on a loaded CI machine


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "COLUMNS": "1000"}  # rich would wrap long log lines (and fold paths) at 80 columns


def _build_process(checkpoint: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "resrank_export", "build", "--checkpoint", str(checkpoint),
                             "--out", str(out), "--triton-backend", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _index_process(build: Path, corpus: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "resrank_export", "index", "--build", str(build), "--corpus",
                             str(corpus), "--out", str(out), "--chunk-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def _wait_for_running(process: subprocess.Popen, out: Path, stage: str) -> Path:
    """The temp folder once its manifest says `stage` is running (and has a peak RSS sample)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for folder in _temps(out):
            entry = (read_manifest(folder) or {}).get("stages", {}).get(stage, {})
            if entry.get("status") == RUNNING and entry.get("peak_rss_bytes", 0) > 0:
                return folder
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"stage {stage} did not start within {TIMEOUT}s")


def _stop(process: subprocess.Popen, signum: int) -> tuple[int, str, str]:
    """(exit code, log lines (rich writes them to stdout), stderr)."""
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_killed_builds_clean_up_and_resume(tiny_checkpoint, tmp_path, caplog):
    checkpoint = tiny_checkpoint().root
    out = tmp_path / "builds" / "build"

    # SIGTERM mid-export: exit 143, one line saying nothing was kept, no temp folder, no lock left.
    process = _build_process(checkpoint, out)
    _wait_for_running(process, out, "export")
    code, _, stderr = _stop(process, signal.SIGTERM)
    assert code == 143, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted by SIGTERM: temp folders removed, nothing to resume"
    assert not out.parent.exists()  # not even the parent folder the run created

    # SIGKILL mid-export: the temp folder stays, owned by the dead pid; while it ran, a second
    # build into the same --out was refused.
    process = _build_process(checkpoint, out)
    killed = _wait_for_running(process, out, "export")
    with pytest.raises(OutputInUseError, match=f"pid {process.pid} "):
        run_build(BuildConfig(out=out, checkpoint=checkpoint, triton_backend=None))
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)
    assert _temps(out) == [killed] and read_owner(killed)["pid"] == process.pid
    killed_pid = process.pid
    last_record = read_manifest(killed)["stages"]["export"]

    # The next build names the killed stage and its last peak RSS, removes the folder; SIGTERM
    # during parity keeps the finished export stage in .build.partial.
    process = _build_process(checkpoint, out)
    _wait_for_running(process, out, "parity")
    code, logs, stderr = _stop(process, signal.SIGTERM)
    assert code == 143, stderr
    flat = " ".join(logs.split())
    peak = f"{last_record['peak_rss_bytes'] / (1 << 20):.1f} MiB"
    assert f"stage export (started {last_record['started']}) did not finish; its last recorded peak RSS was {peak}" in flat
    assert f"removed {killed}, " in flat and f"left by process {killed_pid} on " in flat
    partial = out.parent / ".build.partial"
    assert stderr.strip().splitlines()[-1] == (f"interrupted by SIGTERM: temp folders removed; kept finished stages "
                                               f"(export) in {partial}; rerun the same command to resume")
    assert sorted(p.name for p in out.parent.iterdir()) == [".build.partial"]
    kept = read_manifest(partial)["stages"]
    assert list(kept) == ["export"]
    kept_files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
    assert kept_files == sorted([*kept["export"]["outputs"], MANIFEST_FILE])  # no partial parity file

    # The rerun reuses the export, finishes, and removes the partial folder.
    with caplog.at_level(logging.INFO, logger="resrank_export"):
        manifest = run_build(BuildConfig(out=out, checkpoint=checkpoint, triton_backend=None))
    assert f"resuming the interrupted build kept in {partial}" in caplog.text
    assert manifest["stages"]["export"]["status"] == "skipped"
    assert manifest["stages"]["export"]["outputs"] == kept["export"]["outputs"]
    assert manifest["stages"]["parity"]["status"] == "ran" and manifest["stages"]["parity"]["report"]["passed"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["build"]

    # `index` stopped with SIGTERM between chunks keeps the finished chunks and says how many; the
    # rerun resumes from them (no chunk encoded twice) and indexes every passage.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"passage {i} about topic {i % 17}\n" for i in range(3000)))
    index_out = tmp_path / "idx"
    partial = tmp_path / ".idx.partial"
    process = _index_process(out, corpus, index_out)
    deadline = time.monotonic() + TIMEOUT
    while not (partial / "000002.npy").is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    code, _, stderr = _stop(process, signal.SIGTERM)
    assert code == 143, stderr
    chunks = len(list(partial.glob("[0-9]*[0-9].npy")))
    assert 3 <= chunks < 3000
    assert stderr.strip().splitlines()[-1] == (f"interrupted by SIGTERM: temp folders removed; kept {chunks} encoded "
                                               f"chunks in {partial}; rerun the same command to resume")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")) == [".idx.partial"]
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.stage import build_index

    info = build_index(IndexConfig(build=out, corpus=corpus, out=index_out, chunk_size=1))
    report = json.loads((index_out / "report.json").read_text())
    assert info["count"] == 3000 and report["encoded_passages"] == 3000 - chunks and not partial.exists()

    # The free-space estimate the build checks is within 15% of the graphs it wrote.
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.engine.plan import graph_weight_bytes

    estimate = graph_weight_bytes(load_checkpoint(checkpoint), "fp32")
    for graph, size in estimate.items():
        written = sum(p.stat().st_size for p in (out / "onnx" / "fp32").glob(f"{graph}.onnx*"))
        assert abs(written - size) / written < 0.15, (graph, written, size)


def test_free_space_refusal_names_bytes_needed_and_available(tiny_checkpoint, tmp_path, monkeypatch):
    """The needed figure is the fp32 weights of both graphs, read here from the safetensors
    tensors themselves (an independent count of the same bytes)."""
    from safetensors import safe_open

    checkpoint = tiny_checkpoint().root
    needed = 0
    for part in ("encoder", "reranker"):
        with safe_open(str(checkpoint / part / "model.safetensors"), "np") as handle:
            needed += sum(handle.get_tensor(k).astype(np.float32).nbytes for k in handle.keys()
                          if not k.startswith("lm_head."))
    out = tmp_path / "build"
    monkeypatch.setenv(FREE_BYTES_ENV, str(needed - 1))
    with pytest.raises(DiskSpaceError) as error:
        run_build(BuildConfig(out=out, checkpoint=checkpoint, triton_backend=None))
    message = str(error.value)
    assert f"needs about {needed:,} bytes" in message and f"has {needed - 1:,} bytes" in message
    assert "export encoder (fp32)" in message and "export reranker (fp32)" in message
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_temp_folder_of_a_live_process_is_never_removed(tmp_path):
    target = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with atomic_dir(target) as tmp:  # a real owner record, then rewritten for the sleeper
            owner = {**read_owner(tmp), "pid": sleeper.pid}
            start = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
            owner["process_start"] = start
            foreign = tmp_path / ".out.sleeper.tmp"
            foreign.mkdir()
            (foreign / OWNER_FILE).write_text(json.dumps(owner))
            (foreign / "graph.onnx").write_bytes(b"x" * 1000)
        assert stale_temps(target) == []
        with atomic_dir(target):
            pass
        assert (foreign / "graph.onnx").is_file()
        # The same pid with another start time is a reused pid: the owner is gone.
        (foreign / OWNER_FILE).write_text(json.dumps({**owner, "process_start": str(int(start) - 1)}))
        assert stale_temps(target) == [foreign]
        (foreign / OWNER_FILE).write_text(json.dumps(owner))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert stale_temps(target) == [foreign]
    with atomic_dir(target):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_lock_refuses_a_second_process(tmp_path):
    target = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from resrank_export.fs import output_lock\n"
                               f"with output_lock({str(target)!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUseError, match=f"pid {holder.pid} "):
            with output_lock(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(target):  # the kernel released the dead holder's lock
        with output_lock(target):  # re-entrant within one process
            pass
    assert list(tmp_path.iterdir()) == []


def test_interrupted_stages_keep_only_finished_outputs(tmp_path):
    """StageRunner + atomic_dir without a build: a forced rerun of a finished two-stage build is
    interrupted in its second stage; that stage's partial file and its previous entry go, the
    rerun first stage and its manifest entry move to the resume folder, and a runner seeded
    from it skips that stage."""
    target, resume = tmp_path / "out", tmp_path / ".out.partial"
    interrupt = [False]

    def first() -> dict:
        (work / "a.txt").write_text("finished")
        return {"outputs": [work / "a.txt"]}

    def second() -> dict:
        (work / "sub").mkdir(exist_ok=True)
        (work / "sub" / "b.txt").write_text("half" if interrupt[0] else "whole")
        if interrupt[0]:
            raise Interrupted(signal.SIGINT)
        return {"outputs": [work / "sub" / "b.txt"]}

    with atomic_dir(target) as work:
        runner = StageRunner(work, None)
        runner.run("first", {"v": 1}, first)
        runner.run("second", {"v": 2}, second)
        runner.write()
    interrupt[0] = True
    with pytest.raises(Interrupted) as stop:
        with atomic_dir(target, seed_from=target, keep_on_interrupt=resume) as work:
            runner = StageRunner(work, read_manifest(work), force=True)
            runner.run("first", {"v": 1}, first)
            try:
                runner.run("second", {"v": 2}, second)
            except Interrupted:
                assert runner.keep_finished() == ["first"]
                raise
    assert stop.value.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "out"]
    assert sorted(str(p.relative_to(resume)) for p in resume.rglob("*")) == ["a.txt", MANIFEST_FILE]
    assert (target / "sub" / "b.txt").read_text() == "whole"  # the previous build is untouched
    with atomic_dir(target, seed_from=resume) as work:
        runner = StageRunner(work, read_manifest(work))
        assert runner.run("first", {"v": 1}, first)["status"] == "skipped"


def _numbers_printed_by(driver: str, folder: Path) -> list[int]:
    """Run `driver` in a fresh Python (a small process: a child's high-water mark starts from its
    parent's at exec, and the suite's process holds GBs) with `folder` as argument."""
    return [int(word) for word in subprocess.run([sys.executable, "-c", driver, str(folder)], capture_output=True,
                                                 text=True, check=True).stdout.split()]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-stage peak RSS needs Linux /proc")
def test_each_stage_records_its_own_peak_rss(tmp_path):
    """In a small process of its own: the suite's process carries its history (a lifetime peak
    above this test's 256 MiB, children it reaped), which is what a build process does not."""
    driver = (
        "import numpy as np, sys; from pathlib import Path; from resrank_export.manifest import StageRunner\n"
        "size = 256 << 20\n"
        "def allocate():\n"
        "    block = np.ones(size, dtype=np.uint8)  # touched: resident\n"
        "    assert block.sum() == size\n"
        "    return {'outputs': []}\n"
        "runner = StageRunner(Path(sys.argv[1]), None)\n"
        "big = runner.run('big', {}, allocate)['peak_rss_bytes']\n"
        "small = runner.run('small', {}, lambda: {'outputs': []})['peak_rss_bytes']\n"
        "print(big, small)\n")
    big, small = _numbers_printed_by(driver, tmp_path)
    assert big - small >= (256 << 20) * 0.9  # the second stage's peak does not carry the first one's


def test_stage_peak_counts_only_the_children_it_ran(tmp_path):
    """A child the stage waited for through run_isolated counts in that stage alone; a process
    reaped meanwhile that the stage did not run (a server, another build) counts in none."""
    (tmp_path / "holder.py").write_text(
        "def hold(megabytes):\n"
        "    block = bytearray(megabytes << 20)\n"
        "    block[::4096] = b'x' * len(block[::4096])\n"
        "    return len(block)\n")
    driver = (
        f"import subprocess, sys; sys.path.insert(0, {str(tmp_path)!r}); from pathlib import Path; from holder import hold\n"
        "from resrank_export.isolated import run_isolated; from resrank_export.manifest import StageRunner\n"
        "runner = StageRunner(Path(sys.argv[1]), None)\n"
        "child = runner.run('child', {}, lambda: run_isolated(hold, 400) and {'outputs': []})['peak_rss_bytes']\n"
        "other = 'b = bytearray(500 << 20); b[::4096] = bytes(len(b[::4096]))'\n"
        "after = runner.run('after', {}, lambda: subprocess.run([sys.executable, '-c', other], check=True) and {'outputs': []})\n"
        "print(child, after['peak_rss_bytes'])\n")
    child, after = _numbers_printed_by(driver, tmp_path)
    assert child >= 400 << 20 > after


def test_temp_folder_without_owner_record_is_only_reported(tmp_path, caplog):
    """A folder from before owner records (or another tool) cannot be told from a live build's."""
    old = tmp_path / ".out.k2j4abcd.tmp"
    old.mkdir()
    (old / "encoder.onnx").write_bytes(b"x" * (3 << 20))
    with caplog.at_level(logging.WARNING, logger="resrank_export"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert f"{old}: left alone, it has no owner record" in caplog.text and "3.0 MiB" in caplog.text
    assert (old / "encoder.onnx").stat().st_size == 3 << 20
