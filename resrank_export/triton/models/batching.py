"""Merging the requests of one `execute` call into padded graph runs. Triton's dynamic batcher
hands the python models requests of different shapes (their variable inputs allow ragged
batches); the graph models pad them to the longest request, run the graph once per run and cut
every request's outputs back out. Only numpy here, so the merging is tested without a server.

Right padding is exact for both graphs: padded positions have attention_mask 0 and sit after
every real token, and the graphs read the last real token at sum(mask)-1. The reranker's extra
candidate slots point at padded positions of their own row, so the scattered zero vectors land
where no real token attends; their scores are dropped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_BATCH_TOKENS = 16384  # rows x padded sequence length of one graph run


def plan_runs(widths: list[int], rows: list[int], max_tokens: int) -> list[list[int]]:
    """Request positions grouped into runs: by width (so little compute goes to padding), each
    run's rows x longest width within `max_tokens`; a request above the budget runs alone."""
    runs: list[list[int]] = []
    current: list[int] = []
    current_rows = current_width = 0
    for position in sorted(range(len(widths)), key=lambda i: widths[i]):
        width, total = max(current_width, widths[position]), current_rows + rows[position]
        if current and total * width > max_tokens:
            runs.append(current)
            current, width, total = [], widths[position], rows[position]
        current.append(position)
        current_rows, current_width = total, width
    if current:
        runs.append(current)
    return runs


def _pad(array: np.ndarray, axis: int, size: int, value=0) -> np.ndarray:
    if array.shape[axis] == size:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    return np.pad(array, widths, constant_values=value)


@dataclass(frozen=True)
class MergedRun:
    """One graph run's inputs and how to cut its outputs back into the requests' outputs."""

    inputs: dict[str, np.ndarray]
    rows: list[int]  # rows of each request, in run order
    candidates: list[int] | None  # reranker: each request's candidate count (outputs' axis 1)

    def split(self, outputs: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Per request, its slice of every output (candidate axis trimmed to its own count)."""
        pieces, start = [], 0
        for member, rows in enumerate(self.rows):
            own = [out[start:start + rows] for out in outputs]
            if self.candidates is not None:
                own = [out[:, :self.candidates[member]] for out in own]
            pieces.append(own)
            start += rows
        return pieces


def merge_encoder(members: list[dict[str, np.ndarray]]) -> MergedRun:
    """input_ids / attention_mask [rows, L_i] right-padded to the longest L."""
    width = max(m["input_ids"].shape[1] for m in members)
    inputs = {name: np.concatenate([_pad(m[name], 1, width) for m in members])
              for name in ("input_ids", "attention_mask")}
    return MergedRun(inputs, [m["input_ids"].shape[0] for m in members], None)


def merge_reranker(members: list[dict[str, np.ndarray]]) -> MergedRun:
    """Candidates padded to the most (zero vectors), prompts to the longest; request i's extra
    slots take the distinct padded positions L_i, L_i+1, ... of its rows, so the width is
    max(L_i + extra_i) and no two slots of a row share a position."""
    counts = [m["slot_positions"].shape[1] for m in members]
    most = max(counts)
    width = max(m["input_ids"].shape[1] + most - k for m, k in zip(members, counts))
    columns: dict[str, list[np.ndarray]] = {"input_ids": [], "attention_mask": [], "passage_embeddings": [],
                                            "slot_positions": []}
    for member, k in zip(members, counts):
        rows, length = member["input_ids"].shape
        extra = np.broadcast_to(np.arange(length, length + most - k, dtype=member["slot_positions"].dtype),
                                (rows, most - k))
        columns["input_ids"].append(_pad(member["input_ids"], 1, width))
        columns["attention_mask"].append(_pad(member["attention_mask"], 1, width))
        columns["passage_embeddings"].append(_pad(member["passage_embeddings"], 1, most))
        columns["slot_positions"].append(np.concatenate([member["slot_positions"], extra], axis=1))
    inputs = {name: np.concatenate(arrays) for name, arrays in columns.items()}
    return MergedRun(inputs, [m["input_ids"].shape[0] for m in members], counts)


def merger(input_names: list[str]):
    """The reranker is the graph with slot positions; every other graph is an encoder."""
    return merge_reranker if "slot_positions" in input_names else merge_encoder
