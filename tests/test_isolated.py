"""isolated.run_isolated: a step in a fresh process returns its result or re-raises its error, a
killed child is a one-line error, and the stage's peak RSS counts the child's memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from resrank_export.errors import CheckpointError, ResRankExportError
from resrank_export.isolated import run_isolated


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def _fail(path: str) -> None:
    raise CheckpointError(f"{path}: cannot be loaded")


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _square_in_a_grandchild(x: int) -> tuple[int, int]:
    return run_isolated(_pid_and_square, x)


def test_result_comes_back_from_another_process():
    pid, square = run_isolated(_pid_and_square, 12)
    assert square == 144 and pid != os.getpid()


def test_an_isolated_step_may_isolate_its_own_steps():
    pid, square = run_isolated(_square_in_a_grandchild, 7)
    assert square == 49 and pid != os.getpid()


def test_the_childs_error_is_reraised_with_its_message():
    with pytest.raises(CheckpointError, match="ckpt/encoder: cannot be loaded"):
        run_isolated(_fail, "ckpt/encoder")


def test_a_killed_child_is_a_one_line_error_naming_the_signal():
    with pytest.raises(ResRankExportError, match=r"export of encoder: its process ended with exit code -9"):
        run_isolated(_killed, what="export of encoder")


def test_stage_peak_rss_counts_the_child(tmp_path):
    """Measured from a small parent process: Linux starts a child's high-water mark from its
    parent's when it execs, and this test process holds GBs."""
    (tmp_path / "holder.py").write_text(
        "def hold(megabytes):\n"
        "    block = bytearray(megabytes << 20)\n"
        "    block[::4096] = b'x' * len(block[::4096])\n"
        "    return len(block)\n")
    driver = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from holder import hold; "
              "from resrank_export.isolated import run_isolated; from resrank_export.manifest import PeakRss; "
              "peak = PeakRss(); peak.reset(); before = peak.bytes(); run_isolated(hold, 400); "
              "print(before, peak.bytes())")
    before, after = map(int, subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert after >= before + (400 << 20)  # the parent's part and the child's, alive at once
    nested = driver.replace("run_isolated(hold, 400)", "run_isolated(run_isolated, hold, 400)")
    before, after = map(int, subprocess.run([sys.executable, "-c", nested], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert after >= before + (400 << 20)  # a grandchild's peak reaches the stage through its parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_stopping_a_build_ends_the_childs_own_children(tmp_path):
    """SIGKILL of the process that ran an isolated step, whose child runs a step of its own (the
    INT8 stage's pieces): neither the child nor the grandchild outlives it."""
    (tmp_path / "steps.py").write_text(
        "import os, time\n"
        "from pathlib import Path\n"
        "from resrank_export.isolated import run_isolated\n"
        "def sleep_forever(folder):\n"
        "    Path(folder, 'grandchild').write_text(str(os.getpid()))\n"
        "    time.sleep(600)\n"
        "def run_grandchild(folder):\n"
        "    Path(folder, 'child').write_text(str(os.getpid()))\n"
        "    run_isolated(sleep_forever, folder)\n")
    driver = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                               "from steps import run_grandchild; from resrank_export.isolated import run_isolated; "
                               f"run_isolated(run_grandchild, {str(tmp_path)!r})"])
    deadline = time.monotonic() + 60
    while not (tmp_path / "grandchild").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int((tmp_path / name).read_text()) for name in ("child", "grandchild")]
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; its parent is gone or has not reaped it yet
