"""Weight-only INT8 / INT4 graphs (`int8_wo`, `int4_awq`): each constant MatMul weight stored as
INT8 or INT4 with a `DequantizeLinear` before its MatMul (opset 21; block-wise along the input
axis for INT4), activations untouched. TensorRT 10 runs that pattern as W4A16 / W8A16; ONNX
Runtime's CPU provider fuses it into `MatMulNBits`; and the weights on disk and in a session's
memory are 1/4 or 1/8 of FP32's. The token-embedding table is stored compactly as well (INT8
per row, gathered then scaled, or FP16): it is a quarter of a Qwen3 graph's weights.

AWQ (Lin et al., 2024): before rounding, each GEMM input channel j is scaled by s_j =
mean|x_j|^alpha (x / s on the GEMM's edge, the weight's rows times s: exact in FP32), so the
channels that carry large activations keep more of their weights' precision; alpha is searched
per input tensor on calibration activations to minimise the GEMM's output error (alpha 0 is plain
rounding, so the search never does worse than RTN on its sample).

Written here rather than through ModelOpt's `int4.quantize`: without CUDA its AWQ runs on numpy
at about 7 s a GEMM (253 s for the 22M-parameter demo encoder, days at 4B) and loads the whole
graph, and ONNX Runtime's `MatMulNBitsQuantizer` writes 8-bit weights only as its own
`MatMulNBits` contrib op, which TensorRT does not read. The rounding is block-wise RTN as in both
libraries, with positive scales and no zero point over the whole signed range (compact.py)."""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from resrank_export.errors import InputDataError, ResRankExportError
from resrank_export.export.half import save_graph
from resrank_export.lazy import require
from resrank_export.precision import BY_NAME
from resrank_export.precision.compact import (BLOCK_OPSET, EMBEDDING_STORAGE, compact_embeddings, dequantize_blocks,
                                              quantize_blocks, raise_opset, store_weights)
from resrank_export.precision.graphs import calibration_batches, ffn_output_gemms
from resrank_export.precision.smoothquant import probe_runs, scale_gemm_inputs, smoothable_groups
from resrank_export.progress import track

log = logging.getLogger(__name__)

WEIGHT_ONLY_METHODS = ("awq", "rtn")
AWQ_ALPHAS = tuple(np.round(np.linspace(0, 1, 11), 2))
# Bounds that keep a config value from taking the machine down: a block pads every weight to a
# multiple of it, and the AWQ rows of every GEMM input are held at once.
MAX_BLOCK, MAX_AWQ_TOKENS = 4096, 8192


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Knobs of one weight-only precision (the build TOML's `[int4_awq]` / `[int8_wo]` tables)."""

    # weights per scale along the input axis; 0: one scale per output channel; None: by model size
    # (`default_block_size`)
    block_size: int | None
    method: str = "awq"  # "awq" (scales searched on the calibration set) or "rtn" (round to nearest)
    awq_tokens: int = 512  # activation rows sampled per GEMM input for the AWQ search
    embedding: str = "int8"  # how the token-embedding table is stored
    # INT4 only: the FFN down-projections (input: the activation's heavy-tailed output, the GEMMs
    # INT8 also leaves alone) stored as INT8 weight-only instead
    ffn_down_int8: bool = True

    @classmethod
    def from_table(cls, precision: str, table: dict, source: str) -> "WeightOnlyConfig":
        """The `[int4_awq]` / `[int8_wo]` table of a build TOML (keys as in `table_keys`), every value
        type-checked; InputDataError names `source` (the file), the table and the key."""
        default = DEFAULT_CONFIGS[precision]
        values = {}
        for key, value in table.items():
            field_name = key.replace("-", "_")
            if field_name not in TABLE_TYPES:
                raise InputDataError(f"{source}: [{precision}] unknown key {key!r}; expected "
                                     f"{', '.join(table_keys())}")
            expected = TABLE_TYPES[field_name]
            if field_name == "block_size" and value == "auto":
                value = None
            elif type(value) is not expected:  # bool is an int to isinstance: exact types only
                raise InputDataError(f"{source}: [{precision}] {key} = {value!r}: expected {expected.__name__}"
                                     + (' or "auto"' if field_name == "block_size" else ""))
            values[field_name] = value
        config = replace(default, **values)
        try:
            config.check(BY_NAME[precision].weight_bits)
        except ResRankExportError as exc:
            raise InputDataError(f"{source}: [{precision}] {exc}") from None
        return config

    def to_table(self) -> dict:
        return {key: ("auto" if value is None else value) for key, value in
                ((k.replace("_", "-"), v) for k, v in vars(self).items())}

    def check(self, bits: int) -> None:
        if self.method not in WEIGHT_ONLY_METHODS:
            raise ResRankExportError(f"weight-only method {self.method!r}: expected one of "
                                     f"{', '.join(WEIGHT_ONLY_METHODS)}")
        block = self.block_size
        if block is not None and (block < 0 or (block and (block < 16 or block > MAX_BLOCK or block & (block - 1)))):
            raise ResRankExportError(f"weight-only block size {self.block_size}: expected 0 (per output channel) or a "
                                     f"power of two from 16 to {MAX_BLOCK} (32, 64, 128 are usual)")
        if bits == 4 and self.block_size == 0:
            raise ResRankExportError("INT4 weights need a block size (one scale per 16-256 weights): per-channel "
                                     "INT4 loses too much; use 128, or int8_wo for per-channel weights")
        if not 16 <= self.awq_tokens <= MAX_AWQ_TOKENS:
            raise ResRankExportError(f"AWQ tokens {self.awq_tokens}: expected 16 to {MAX_AWQ_TOKENS} activation rows "
                                     "(512 is the default)")
        if self.embedding not in EMBEDDING_STORAGE:
            raise ResRankExportError(f"embedding storage {self.embedding!r}: expected one of "
                                     f"{', '.join(EMBEDDING_STORAGE)}")


# Defaults per precision, measured on the demo encoder (held-out SciFact passages, min cosine to
# FP32): int8_wo blocks of 128 with plain rounding, 0.9994 (per output channel, the layout
# TensorRT's INT8 weight-only kernels take, 0.9990: under the 0.999 gate; `block-size = 0` in the
# [int8_wo] table gives it), int4_awq blocks by model size.
DEFAULT_CONFIGS = {"int8_wo": WeightOnlyConfig(block_size=128, method="rtn"),
                   "int4_awq": WeightOnlyConfig(block_size=None, method="awq")}
SMALL_MODEL_HIDDEN = 1024  # below: the demo's 384-wide models


TABLE_TYPES = {"block_size": int, "method": str, "awq_tokens": int, "embedding": str, "ffn_down_int8": bool}


def table_keys() -> list[str]:
    return [name.replace("_", "-") for name in TABLE_TYPES]


def default_block_size(hidden: int) -> int:
    """INT4 block size by model width. Measured on the demo encoder (hidden 384, AWQ, FFN
    down-projections INT8; docs/precision.md): min cosine to FP32 0.944 at block 128, 0.958 at 64,
    0.960 at 32, so 32 below SMALL_MODEL_HIDDEN; from 1024 on, 128, the block ModelOpt and
    TensorRT-LLM use for LLMs (wider rows average more weights per block; the 0.6B figures are in
    docs/scale.md)."""
    return 32 if hidden < SMALL_MODEL_HIDDEN else 128


def awq_scale(samples: np.ndarray, weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, float]:
    """(per-input-channel factor s, chosen alpha) minimising |X W - X dq(q(W s)) / s|^2 over
    AWQ_ALPHAS, with s = mean|x|^alpha normalised to a geometric mean of 1; `samples` [T, K] are the
    GEMM input's calibration rows, `weight` [K, N] the weights of every GEMM reading it side by side."""
    reference = samples @ weight
    mean_abs = np.maximum(np.abs(samples).mean(axis=0), 1e-8)
    best = (np.inf, np.ones(weight.shape[0], dtype=np.float32), 0.0)
    for alpha in AWQ_ALPHAS:
        scale = (mean_abs ** alpha).astype(np.float32)
        scale /= np.sqrt(scale.max() * scale.min())
        q, step = quantize_blocks(weight * scale[:, None], bits, block_size)
        error = float(np.square(samples @ (dequantize_blocks(q, step, block_size) / scale[:, None]) - reference).sum())
        if error < best[0]:
            best = (error, scale, float(alpha))
    return best[1], best[2]


def gemm_input_samples(graph: Path, tensors: list[str], batches: list[dict[str, np.ndarray]], rows: int,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Up to `rows` rows (token positions) of each of `tensors`, sampled evenly from every
    calibration batch (`smoothquant.probe_runs`); rows of padding positions are skipped."""
    rng = np.random.default_rng(seed)
    per_batch = max(1, math.ceil(rows / max(len(batches), 1)))
    kept: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    runs = probe_runs(graph, tensors, batches, "weight-only quantization")
    for inputs, outputs in track(runs, f"AWQ activations of {Path(graph).stem}", total=len(batches)):
        real = inputs["attention_mask"].reshape(-1).astype(bool) if "attention_mask" in inputs else None
        for name, value in outputs.items():
            flat = value.reshape(-1, value.shape[-1])
            if real is not None and flat.shape[0] == real.size:
                flat = flat[real]
            pick = rng.choice(flat.shape[0], size=min(per_batch, flat.shape[0]), replace=False)
            kept[name].append(np.array(flat[np.sort(pick)], dtype=np.float32))
    return {name: np.concatenate(parts)[:rows] for name, parts in kept.items() if parts}


def _weight_formats(structure, groups: dict[str, list], bits: int, config: WeightOnlyConfig) -> dict[str, tuple]:
    """{weight name: (bits, block size)} of every weight to quantize: `bits` at the configured (or
    the model width's) block, the FFN down-projections INT8 per channel when `ffn_down_int8`."""
    shapes = {init.name: init.dims for init in structure.graph.initializer}
    names = [n.input[1] for nodes in groups.values() for n in nodes]
    block = config.block_size
    if block is None:
        block = default_block_size(min((shapes[name][0] for name in names), default=SMALL_MODEL_HIDDEN))
    down_projections = set(ffn_output_gemms(structure)) if bits == 4 and config.ffn_down_int8 else set()
    down = {n.input[1] for n in structure.graph.node if n.name in down_projections}
    return {name: (8, 0) if name in down else (bits, block) for name in names}


def _awq_scales(model, groups: dict[str, list], formats: dict[str, tuple], samples: dict[str, np.ndarray],
                what: str) -> tuple[dict, dict]:
    """({input tensor: s} for the inputs whose search chose alpha > 0, {input tensor: alpha})."""
    numpy_helper = require("onnx", "weight-only quantization").numpy_helper
    weights = {init.name: init for init in model.graph.initializer}
    scales, alphas = {}, {}
    for tensor, nodes in track(list(groups.items()), f"AWQ search of {what}", unit="inputs"):
        joined = np.concatenate([numpy_helper.to_array(weights[n.input[1]]) for n in nodes], axis=1)
        scale, alphas[tensor] = awq_scale(samples.pop(tensor), joined, *formats[nodes[0].input[1]])
        if alphas[tensor] > 0:
            scales[tensor] = scale
    return scales, alphas


def quantize_weight_only(src: Path, dst: Path, calibration: dict[str, np.ndarray], bits: int,
                         config: WeightOnlyConfig) -> dict:
    """The FP32 graph `src` with every constant 2-D MatMul weight stored in `bits` (AWQ-scaled
    first with method "awq") and its embedding table compacted, written to `dst`; returns the
    conversion report."""
    config.check(bits)
    onnx = require("onnx", "weight-only quantization")
    src, dst = Path(src), Path(dst)
    # the activations first, on ONNX Runtime, with only the graph's structure in this process; the
    # weights are loaded after the session is gone (at 0.6B both at once peaked at 11.5 GiB)
    structure = onnx.load(str(src), load_external_data=False)
    groups = smoothable_groups(structure, {n.name for n in structure.graph.node if n.op_type == "MatMul"})
    formats = _weight_formats(structure, groups, bits, config)
    del structure
    samples = (gemm_input_samples(src, list(groups), calibration_batches(calibration), config.awq_tokens)
               if config.method == "awq" and groups else {})
    model = onnx.load(str(src))
    groups = smoothable_groups(model, {n.name for nodes in groups.values() for n in nodes})
    scales, alphas = _awq_scales(model, groups, formats, samples, src.stem) if samples else ({}, {})
    scale_gemm_inputs(model, groups, scales, "awq")
    raise_opset(model, BLOCK_OPSET)
    store_weights(model, formats)
    embeddings = compact_embeddings(model, config.embedding)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_graph(model, dst)
    block = next((b for w, b in formats.values() if w == bits), None)
    report = {"bits": bits, "block_size": block, "method": config.method, "gemms": len(formats),
              "int8_per_channel_gemms": sum(1 for w, b in formats.values() if (w, b) == (8, 0)) if bits == 4 else 0,
              "inputs": len(groups), "awq_tokens": config.awq_tokens if alphas else None,
              "awq_alphas": dict(sorted(collections.Counter(f"{a:.1f}" for a in alphas.values()).items())) or None,
              "embedding": config.embedding, "embedding_tables": embeddings}
    log.info("int%d weight-only %s: %d GEMMs (%s, block %s), embedding tables %s: %s", bits, dst.name,
             report["gemms"], config.method, block or "per channel", config.embedding, embeddings or "none")
    return report
