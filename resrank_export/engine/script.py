"""`build_engines.sh`: the `trtexec` commands equivalent to the Python engine build, written
next to the graphs from the same profiles, for an operator building plans on the target."""

from __future__ import annotations

import shlex
from pathlib import Path

from resrank_export.engine.profiles import LEVELS, EngineConfig, Profile

SCRIPT_NAME = "build_engines.sh"
_FLAG_OF = {"min": "--minShapes", "opt": "--optShapes", "max": "--maxShapes"}


def shapes_argument(profile: Profile, level: str) -> str:
    """trtexec's `name:AxBxC,...` form of one profile level."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(shapes, level))}" for name, shapes in profile.items())


def trtexec_command(graph: str, profile: Profile, workspace_bytes: int) -> list[str]:
    """One trtexec invocation; $ENGINES, $SM and $STRONGLY_TYPED are filled in by the script."""
    return ["trtexec", f"--onnx={graph}.onnx", f'--saveEngine="$ENGINES/{graph}.$SM.plan"',
            *(f"{_FLAG_OF[level]}={shapes_argument(profile, level)}" for level in LEVELS),
            '--timingCacheFile="$ENGINES/timing.$SM.cache"',
            f"--memPoolSize=workspace:{max(1, workspace_bytes >> 20)}M",
            '${STRONGLY_TYPED:+"$STRONGLY_TYPED"}', "--skipInference"]


def render_build_script(profiles: dict[str, Profile], config: EngineConfig, precision: str) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# Builds the {precision} TensorRT plans of this folder's graphs on THIS machine's GPU, with the",
        "# same optimisation profiles as `resrank-export build --backend tensorrt`. Plans only load in the",
        "# TensorRT release and on the GPU architecture that built them. Written by resrank-export.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        f'ENGINES="${{ENGINES:-../../engines/{precision}}}"',
        'SM="${SM:-sm$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d \'.\')}"',
        "# TensorRT 10: graph dtypes decide precision; TensorRT 11 is always strongly typed and",
        "# TensorRT 8 has no such flag: set STRONGLY_TYPED= there (and add --fp16/--int8).",
        'STRONGLY_TYPED="${STRONGLY_TYPED---stronglyTyped}"',
        'mkdir -p "$ENGINES"',
    ]
    for graph, profile in profiles.items():
        command = trtexec_command(graph, profile, config.workspace_bytes)
        quoted = [part if "$" in part else shlex.quote(part) for part in command]
        lines.append(" \\\n    ".join(quoted))
    lines.append('echo "plans written to $ENGINES"')
    return "\n".join(lines) + "\n"


def write_build_script(graphs_dir: Path, profiles: dict[str, Profile], config: EngineConfig, precision: str) -> Path:
    path = Path(graphs_dir) / SCRIPT_NAME
    path.unlink(missing_ok=True)  # may be a hard link into the previous build
    path.write_text(render_build_script(profiles, config, precision))
    path.chmod(0o755)
    return path
