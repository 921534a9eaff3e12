"""The engine manifest (`engines/<precision>/engines.json`): for every plan, the TensorRT
version and GPU it was built on, its profile and the hash of its source graph. A plan runs
only where TensorRT version and compute capability match, so every load and every serving
start checks the manifest first and refuses (or rebuilds) with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resrank_export.errors import EngineError

MANIFEST_NAME = "engines.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GpuRuntime:
    """Where a plan would run: TensorRT version and the GPU's name and compute capability."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.9"

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


@dataclass(frozen=True)
class EngineEntry:
    graph: str  # encoder | reranker
    precision: str
    plan: str  # file name inside the engines folder
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    source_sha256: str
    profile: dict[str, dict[str, list[int]]]  # input -> {min, opt, max}
    strongly_typed: bool
    workspace_bytes: int
    build_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def plan_filename(graph: str, runtime: GpuRuntime) -> str:
    """One plan per graph and GPU architecture, so several can sit side by side (Triton's
    cc_model_filenames picks the one for the GPU it runs on)."""
    return f"{graph}.{runtime.sm}.plan"


def _version_key(version: str) -> tuple[str, ...]:
    """major.minor.patch: a plan is tied to the TensorRT release it was built with
    (the fourth, build component differs between packagings of one release)."""
    return tuple(version.split("+")[0].split(".")[:3])


@dataclass(frozen=True)
class Compatibility:
    ok: bool
    reason: str


def check_compatible(entry: EngineEntry | None, runtime: GpuRuntime, source_sha256: str | None = None) -> Compatibility:
    """May this plan be loaded here? Refused on another TensorRT release, another compute
    capability, or a source graph that changed since the build."""
    if entry is None:
        return Compatibility(False, "no plan recorded for this graph")
    what = f"{entry.plan} (built with TensorRT {entry.tensorrt_version} on {entry.gpu_name}, " \
           f"compute capability {entry.compute_capability})"
    if _version_key(entry.tensorrt_version) != _version_key(runtime.tensorrt_version):
        return Compatibility(False, f"{what}: this machine has TensorRT {runtime.tensorrt_version}; "
                                    "plans only load in the TensorRT release that built them")
    if entry.compute_capability != runtime.compute_capability:
        return Compatibility(False, f"{what}: this GPU ({runtime.gpu_name}) has compute capability "
                                    f"{runtime.compute_capability}; plans are bound to one GPU architecture")
    if source_sha256 is not None and entry.source_sha256 != source_sha256:
        return Compatibility(False, f"{what}: its source graph changed since the plan was built")
    note = "" if entry.gpu_name == runtime.gpu_name else \
        f" (built on {entry.gpu_name}, same architecture as {runtime.gpu_name}; tactics may be less tuned)"
    return Compatibility(True, f"{what}: compatible{note}")


def read_engine_manifest(folder: Path) -> list[EngineEntry]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return [EngineEntry(**entry) for entry in data["engines"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EngineError(f"{path}: not a valid engine manifest ({exc}); delete it to rebuild the plans") from None


def write_engine_manifest(folder: Path, entries: list[EngineEntry]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    ordered = sorted(entries, key=lambda e: (e.graph, e.compute_capability))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, "engines": [asdict(e) for e in ordered]},
                              indent=2) + "\n")
    tmp.replace(path)
    return path


def find_entry(entries: list[EngineEntry], graph: str, compute_capability: str) -> EngineEntry | None:
    return next((e for e in entries if e.graph == graph and e.compute_capability == compute_capability), None)


def cc_model_filenames(entries: list[EngineEntry], graph: str) -> dict[str, str]:
    """Triton `cc_model_filenames` for one graph: compute capability -> plan file."""
    return {e.compute_capability: e.plan for e in entries if e.graph == graph}


def detect_gpu() -> tuple[str, str]:
    """(name, compute capability) of GPU 0, from nvidia-smi; EngineError when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise EngineError("no NVIDIA GPU found (nvidia-smi is not on PATH)")
    result = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                            capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        raise EngineError(f"nvidia-smi found no usable GPU: {(result.stderr or result.stdout).strip()[:200]}")
    name, cc = (part.strip() for part in lines[0].rsplit(",", 1))
    return name, cc
