"""Weights stored compactly in an FP32 graph, the pieces every quantized precision shares:
MatMul weights as INT8 / INT4 levels with a DequantizeLinear before the MatMul (per output
channel, or block-wise along the input axis: TensorRT's weight-only layouts, which ONNX Runtime's
CPU provider fuses into MatMulNBits), and token-embedding tables as INT8 rows or FP16."""

from __future__ import annotations

import collections
import math

import numpy as np

from resrank_export.lazy import require

BLOCK_OPSET = 21  # DequantizeLinear's block_size and the INT4 type
EMBEDDING_STORAGE = ("int8", "fp16", "fp32")


def _scales(weight: np.ndarray, levels: int, axis: int) -> np.ndarray:
    """Positive scales using the whole signed range [-levels - 1, levels]: the largest positive
    weight maps to at most `levels`, the most negative to at most -levels - 1 (INT4: 16 levels
    instead of a symmetric 15, measured on the demo encoder's INT4 RTN: min cosine 0.929 -> see
    docs/precision.md)."""
    scale = np.maximum(weight.max(axis=axis) / levels, -weight.min(axis=axis) / (levels + 1))
    scale[scale == 0] = 1.0
    return scale.astype(np.float32)


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest of a [K, N] MatMul weight with positive scales and no zero point (what
    TensorRT's weight-only kernels take): (int8 array of the levels, FP32 scales
    [ceil(K / block), N], or [N] for block 0). The DequantizeLinear of the pair along axis 0
    (axis 1 per channel) gives the weight back within half a step."""
    levels = 2 ** (bits - 1) - 1  # 7 or 127
    k, n = weight.shape
    if block_size == 0:
        scale = _scales(weight, levels, 0)
        return np.clip(np.rint(weight / scale), -levels - 1, levels).astype(np.int8), scale
    blocks = math.ceil(k / block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = weight
    grouped = padded.reshape(blocks, block_size, n)
    scale = _scales(grouped, levels, 1)
    q = np.clip(np.rint(grouped / scale[:, None, :]), -levels - 1, levels).astype(np.int8)
    return q.reshape(-1, n)[:k], scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """What DequantizeLinear computes from `quantize_blocks`' pair (FP32)."""
    if block_size == 0:
        return q.astype(np.float32) * scale
    return q.astype(np.float32) * np.repeat(scale, block_size, axis=0)[: q.shape[0]]


def _dq_weight(model, name: str, q: np.ndarray, scale: np.ndarray, bits: int, block_size: int):
    """Initializers `<name>_q` (INT4 packed two to a byte, or INT8) and `<name>_scale`, and the
    DequantizeLinear node giving `<name>` back in FP32."""
    onnx = require("onnx", "weight-only quantization")
    if bits == 4:
        flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        stored = onnx.helper.make_tensor(f"{name}_q", onnx.TensorProto.INT4, q.shape, packed.tobytes(), raw=True)
    else:
        stored = onnx.numpy_helper.from_array(q, f"{name}_q")
    model.graph.initializer.extend([stored, onnx.numpy_helper.from_array(scale, f"{name}_scale")])
    attributes = {"axis": 1} if block_size == 0 else {"axis": 0, "block_size": block_size}
    return onnx.helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale"], [name],
                                 name=f"{name}_DequantizeLinear", **attributes)


def compact_embeddings(model, storage: str) -> list[str]:
    """Token-embedding tables (the 2-D initializer of a Gather whose indices are a graph input, the
    token ids, read by that Gather alone; position and token-type tables stay) stored as
    `storage`: "int8" one symmetric scale per row, the rows gathered as INT8 then cast and multiplied by their gathered scale (exact per row, and only
    the looked-up rows are widened; a DequantizeLinear before the Gather would widen the whole
    table on every run); "fp16" the table in FP16 and the gathered rows cast to FP32. Rewrites
    `model` in place; returns the tables changed."""
    if storage == "fp32":
        return []
    onnx = require("onnx", "weight-only quantization")
    numpy_helper, helper = onnx.numpy_helper, onnx.helper
    initializers = {init.name: init for init in model.graph.initializer}
    users = collections.Counter(name for node in model.graph.node for name in node.input)
    inputs = {value.name for value in model.graph.input}
    changed, nodes = [], []
    for node in model.graph.node:
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if (table is None or len(table.dims) != 2 or node.input[1] not in inputs
                or users[table.name] != 1 or table.data_type != onnx.TensorProto.FLOAT
                or next((a.i for a in node.attribute if a.name == "axis"), 0) != 0):
            nodes.append(node)
            continue
        values = numpy_helper.to_array(table)
        name, out = table.name, node.output[0]
        if storage == "fp16":
            table.CopyFrom(numpy_helper.from_array(values.astype(np.float16), name))
            nodes += [helper.make_node("Gather", [name, node.input[1]], [f"{out}_fp16"], name=node.name, axis=0),
                      helper.make_node("Cast", [f"{out}_fp16"], [out], name=f"{node.name}_to_fp32",
                                       to=onnx.TensorProto.FLOAT)]
        else:
            scale = np.abs(values).max(axis=1, keepdims=True) / 127
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
            table.CopyFrom(numpy_helper.from_array(q, name))
            model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_row_scale"))
            nodes += [helper.make_node("Gather", [name, node.input[1]], [f"{out}_int8"], name=node.name, axis=0),
                      helper.make_node("Cast", [f"{out}_int8"], [f"{out}_widened"], name=f"{node.name}_to_fp32",
                                       to=onnx.TensorProto.FLOAT),
                      helper.make_node("Gather", [f"{name}_row_scale", node.input[1]], [f"{out}_scale"],
                                       name=f"{node.name}_row_scale", axis=0),
                      helper.make_node("Mul", [f"{out}_widened", f"{out}_scale"], [out], name=f"{node.name}_scaled")]
        changed.append(name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return changed


def store_weights(model, formats: dict[str, tuple[int, int]]) -> None:
    """Each initializer named in `formats` ({name: (bits, block size)}, a 2-D MatMul weight) replaced
    by its quantized levels and scales, with a DequantizeLinear right before the MatMul reading it;
    the FP32 bytes are dropped. Rewrites `model` in place."""
    numpy_helper = require("onnx", "compact weights").numpy_helper
    dequantize = {}
    for init in [i for i in model.graph.initializer if i.name in formats]:
        q, scale = quantize_blocks(numpy_helper.to_array(init), *formats[init.name])
        dequantize[init.name] = _dq_weight(model, init.name, q, scale, *formats[init.name])
    kept = [init for init in model.graph.initializer if init.name not in formats]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in dequantize:
            nodes.append(dequantize.pop(node.input[1]))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def float_matmul_weights(model) -> list[str]:
    """Names of the 2-D FP32 initializers that MatMuls read as their weight (and nothing else reads)."""
    onnx = require("onnx", "compact weights")
    initializers = {init.name: init for init in model.graph.initializer}
    users = collections.Counter(name for node in model.graph.node for name in node.input)
    return [node.input[1] for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in initializers and users[node.input[1]] == 1
            and len(initializers[node.input[1]].dims) == 2
            and initializers[node.input[1]].data_type == onnx.TensorProto.FLOAT]


def raise_opset(model, version: int) -> None:
    """The default domain relabelled to `version`: the ops these graphs use kept their semantics
    from opset 18 to 21 (what onnx's version converter does for them, without its 2 GB limit)."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, version)


