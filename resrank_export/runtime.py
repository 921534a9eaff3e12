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


# Encoder batches are sized by tokens, not rows: rows x longest row stays under this (32 rows of
# 512 tokens), so long texts of a large model cannot blow up activation memory.
BATCH_TOKENS = 16384


def length_batches(lengths, max_rows: int, max_tokens: int = BATCH_TOKENS) -> list[np.ndarray]:
    """Row indices grouped shortest first: each group holds at most `max_rows` rows and its row count
    times its longest length is at most `max_tokens` (a single longer row forms a group of its own)."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < max_rows and (end - start + 1) * lengths[order[end]] <= max_tokens:
            end += 1
        groups.append(order[start:end])
        start = end
    return groups


def encode_texts(session, tokenizer, texts: list[str], batch_size: int, max_batch_tokens: int = BATCH_TOKENS) -> np.ndarray:
    """Encoder graph outputs [n, D] float32 in input order; `tokenizer(texts)` makes the right-padded
    inputs (a PassageTokenizer, or its `queries` method for queries). Batches hold texts of similar
    token length (little compute goes to padding), at most `batch_size` rows and `max_batch_tokens`
    tokens each."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    inputs = tokenizer(texts)
    lengths = inputs["attention_mask"].sum(1)
    vectors = None
    for rows in length_batches(lengths, batch_size, max_batch_tokens):
        width = int(lengths[rows].max())  # right padding: the columns past it are padding only
        batch = run_session(session, {name: array[rows, :width] for name, array in inputs.items()})[0]
        if vectors is None:
            vectors = np.empty((len(texts), batch.shape[1]), dtype=np.float32)
        vectors[rows] = batch
    return vectors
