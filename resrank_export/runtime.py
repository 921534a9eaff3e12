"""ONNX Runtime sessions, created one way everywhere (parity, index, Triton python models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ort_session(path: str | Path, providers: list[str] | None = None, threads: int = 0):
    """A CPU session unless other providers are asked for; `threads` 0 = ORT's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def run_session(session, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Feed only the inputs the graph declares (callers may carry extra arrays)."""
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: inputs[name] for name in names})
