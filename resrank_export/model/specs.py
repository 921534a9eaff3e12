"""One declarative spec per exported graph: names, dtypes and symbolic dims are defined here
once and drive export, dummy inputs, parity checks, calibration files, TensorRT profiles and
Triton configs. Triton configs depend on these names: keep them stable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[str | int, ...]  # str = symbolic (dynamic) axis, int = fixed size


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for tensor in self.inputs + self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(name)

    def resolve(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for the given symbolic sizes (TensorRT profiles, dummies)."""
        return {
            t.name: tuple(sizes[d] if isinstance(d, str) else d for d in t.dims) for t in self.inputs
        }


BATCH, SEQUENCE, CANDIDATES = "batch", "sequence", "candidates"


def encoder_spec(dim: int) -> GraphSpec:
    return GraphSpec(
        name="encoder",
        inputs=(
            TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
            TensorSpec("attention_mask", "int64", (BATCH, SEQUENCE)),
        ),
        outputs=(TensorSpec("embeddings", "float32", (BATCH, dim)),),
    )


def reranker_spec(encoder_dim: int) -> GraphSpec:
    return GraphSpec(
        name="reranker",
        inputs=(
            TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
            TensorSpec("attention_mask", "int64", (BATCH, SEQUENCE)),
            TensorSpec("passage_embeddings", "float32", (BATCH, CANDIDATES, encoder_dim)),
            TensorSpec("slot_positions", "int64", (BATCH, CANDIDATES)),
        ),
        outputs=(TensorSpec("scores", "float32", (BATCH, CANDIDATES)),),
    )


def numpy_dtype(tensor: TensorSpec) -> np.dtype:
    return np.dtype(tensor.dtype)
