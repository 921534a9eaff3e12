"""The clock and the machine: warm-up then median of repeats (time.perf_counter), thread
settings applied once for torch and ONNX Runtime, and the machine description every result
carries (figures from different machines are not comparable)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_fp16")


@dataclass(frozen=True)
class Timing:
    times_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def to_json(self) -> dict:
        return {"median_s": self.median_s, "times_s": self.times_s}


def measure(run: Callable[[], T], warmup: int, repeats: int) -> tuple[Timing, T]:
    """Call `run` `warmup` times untimed, then `repeats` times timed; returns the timing and
    the last call's result (so results can be checked without an extra run)."""
    for _ in range(warmup):
        run()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return Timing(times), result


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without needing numpy here."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def apply_threads(threads: int) -> dict:
    """Set torch's intra-op threads (0 keeps its default) and return what each library uses."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return {"torch_intra_op": torch.get_num_threads(),
            "onnxruntime_intra_op": threads or "default (one per physical core)",
            "requested": threads or "library defaults"}


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in _CPU_FLAGS if flag in present]
    return []


def machine_info(threads: dict) -> dict:
    """CPU model, cores, ISA flags that matter for INT8/FP16 kernels, memory, library versions."""
    from resrank_export.lazy import require
    from resrank_export.manifest import library_versions

    psutil = require("psutil", "the machine record of the benchmarks")

    versions = library_versions()
    for name in ("sentence-transformers", "numpy", "matplotlib", "nvidia-pytriton", "optimum"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed: absent from the record
            continue
    return {"cpu": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "cpu_flags": _cpu_flags(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "threads": threads, "versions": versions,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
