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


def encode_texts(session, tokenizer, texts: list[str], batch_size: int) -> np.ndarray:
    """Encoder graph outputs [n, D] float32 in input order; `tokenizer(texts)` makes the inputs (a
    PassageTokenizer, or its `queries` method for queries). Batches hold texts of similar length
    (sorted by characters, a cheap proxy for tokens) so little compute goes to padding."""
    texts = list(texts)
    dim = session.get_outputs()[0].shape[-1]  # symbolic in some converted graphs: then from a batch
    vectors = np.empty((len(texts), dim), dtype=np.float32) if isinstance(dim, int) else None
    order = np.argsort([len(t) for t in texts], kind="stable")
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        batch = run_session(session, tokenizer([texts[i] for i in rows]))[0]
        if vectors is None:
            vectors = np.empty((len(texts), batch.shape[1]), dtype=np.float32)
        vectors[rows] = batch
    return vectors if vectors is not None else np.zeros((0, 0), dtype=np.float32)
