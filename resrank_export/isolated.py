"""Run a memory-heavy step in a fresh Python process, so what it leaves allocated goes back to
the OS when that process exits. Measured on a Qwen3-0.6B-shape checkpoint: after
`torch.onnx.export` returns and the module is deleted and garbage-collected, its weights stay
resident (1.8 of the process's 1.8 GiB; malloc_trim frees 40 MB of it), so a build that exported
both graphs in one process began parity holding 3.8 GiB more than its base. A spawned child
(`multiprocessing`'s "spawn": no copy of the parent's memory) is the one reliable way to hand it
back. The parent stops the child when it is itself interrupted, and keeps each finished child's
peak RSS (as the child measured it) for the stage that ran it (manifest.PeakRss)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from resrank_export.errors import ResRankExportError

log = logging.getLogger(__name__)

# For each child run_isolated waited for, in order: this process's resident bytes when it started
# the child (it only waits meanwhile) plus the child's peak, as the child read it itself:
# getrusage(RUSAGE_CHILDREN) keeps only the largest child ever reaped, any child (a test suite's
# servers and builds included), so a stage could be charged another's process.
finished_child_peaks: list[int] = []


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None without /proc."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def _own_rss_now() -> int:
    """Resident bytes of this process now (Linux); elsewhere its peak, an upper bound."""
    now = _status_bytes("VmRSS")
    return own_peak_rss() if now is None else now


def own_peak_rss() -> int:
    """This process's peak RSS in bytes: the kernel's high-water mark of its memory map (which
    starts afresh at exec), else getrusage's (which Linux carries over from the parent at exec)."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def peak_with_children(since: int = 0) -> int:
    """The peak of this process together with the children it ran through run_isolated (those
    after the first `since`): its own peak, or what it held while a child ran plus that child's
    peak, whichever is larger."""
    return max([own_peak_rss(), *finished_child_peaks[since:]])


def _end_with_parent() -> None:
    """SIGTERM ends this child through SystemExit, so run_isolated's `finally` stops any child of
    its own; on Linux the kernel sends it SIGTERM when the parent dies, even by SIGKILL (an INT8
    piece's ModelOpt run otherwise went on, 2.9 GB, after its build was stopped)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above
            sys.exit(128 + signal.SIGTERM)


def _child(connection, level: int, fn: Callable, args: tuple) -> None:
    logging.basicConfig(level=level, format="%(message)s")
    _end_with_parent()
    try:
        result = fn(*args)
        connection.send(("ok", result, peak_with_children()))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        try:
            connection.send(("error", exc, peak_with_children()))
        except Exception:  # an exception that does not pickle: its text
            connection.send(("error", ResRankExportError(f"{type(exc).__name__}: {exc}"), peak_with_children()))


def run_isolated(fn: Callable, *args: Any, what: str = "step") -> Any:
    """fn(*args) in a spawned process; its result, or its exception re-raised here. `fn` and
    `args` must pickle (module-level functions, dataclasses, paths)."""
    context = multiprocessing.get_context("spawn")
    held = _own_rss_now()
    receive, send = context.Pipe(duplex=False)
    # not a daemon: a daemonic process may not start children, and an isolated step may run its
    # own (the INT8 stage quantizes each piece of a large graph in a process of its own); the
    # `finally` below stops the child when this process is interrupted
    process = context.Process(target=_child, args=(send, logging.getLogger().getEffectiveLevel(), fn, args))
    process.start()
    send.close()
    try:
        while not receive.poll(0.5) and process.is_alive():
            pass
        try:
            status, value, peak = receive.recv()
        except EOFError:  # the child died without a word
            process.join()
            raise ResRankExportError(
                f"{what}: its process ended with exit code {process.exitcode} before returning (a negative "
                f"code is the signal that killed it; -9 is often the kernel's out-of-memory killer)") from None
        process.join()
        finished_child_peaks.append(held + peak)
    finally:
        if process.is_alive():  # the parent was interrupted, or the child hung up
            process.terminate()
            process.join()
    if status == "error":
        raise value
    return value
