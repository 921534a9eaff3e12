"""Half-precision (FP16 / BF16) graphs straight from PyTorch: `export --export-dtype fp16|bf16`
exports the modules in that dtype (no FP32 copy of the weights ever exists), then `keep_fp32`
puts the ops that lose precision in half back in FP32, the list AutoCast keeps in
precision/graphs.py, so both ways to a half graph keep the same ops in FP32."""

from __future__ import annotations

import collections
import os
from pathlib import Path

from resrank_export.lazy import require

# Protobuf caps a single ONNX file at 2 GiB; past this many parameter bytes weights go to a
# side file (`<graph>.onnx.data`).
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Op types kept in FP32 in every FP16 and BF16 graph (AutoCast's exclusions, and `keep_fp32`):
# reductions and normalisations overflow (FP16) or lose precision (both) in half precision
# (RMSNorm is exported as Pow/ReduceMean/Sqrt/Reciprocal; LayerNorm as LayerNormalization; the
# final L2-normalise/cosine as ReduceL2/ReduceSum/Sqrt/Div/Clip), and softmax over long prompts.
# Measured on the demo graphs: leaving these in FP32 keeps SciFact nDCG@10 within 0.002.
HALF_KEEP_FP32_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "ReduceMean", "Pow",
                      "Sqrt", "Reciprocal", "ReduceL2", "ReduceSum", "Div", "Clip")


def auto_export_dtype(precision: str, stored: list[str]) -> str:
    """`--export-dtype auto`: the half target itself when every backbone stores half weights (see
    export/onnx.py: ExportConfig.for_precision), else FP32."""
    return precision if precision in ("fp16", "bf16") and "fp32" not in stored else "fp32"


def _float_types(model) -> dict[str, int]:
    onnx = require("onnx", "half-precision graphs")
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def precision_by_op(model) -> dict[str, dict[str, int]]:
    """{"fp32": {op type: count}, "fp16": {...}, "bf16": {...}} of the non-Cast float nodes, by
    output type: the record of what a mixed-precision graph really kept in FP32."""
    onnx = require("onnx", "half-precision graphs")
    types = _float_types(model)
    by_type = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16", onnx.TensorProto.FLOAT: "fp32"}
    counts = {name: collections.Counter() for name in by_type.values()}
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        out_types = {types.get(o) for o in node.output}
        found = next((name for elem_type, name in by_type.items() if elem_type in out_types), None)
        if found is not None:
            counts[found][node.op_type] += 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def weight_bytes(model) -> int:
    """Bytes of the initializers held in the proto (protobuf cannot serialise 2 GiB)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def graph_file_bytes(path) -> int:
    """Bytes of a graph file on disk with its external-data side file, if any."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))


def external_data_files(path) -> list[Path]:
    """The side files a graph's initializers point at (its `location`s, beside the graph): what
    must travel with the graph file, e.g. into a Triton model's version folder."""
    onnx = require("onnx", "reading a graph")
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    structure = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in structure.graph.initializer if uses_external_data(t)}
    return [path.parent / location for location in sorted(locations)]


def save_graph(model, path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """onnx.save, with the weights in `<file>.data` beside the graph when they pass `threshold`
    (a precision graph of a 1.7B+ model passes protobuf's 2 GiB limit)."""
    onnx = require("onnx", "saving a graph")
    external = weight_bytes(model) > threshold
    if os.path.exists(f"{path}.data"):  # a previous graph's weights
        os.remove(f"{path}.data")
    onnx.save(model, str(path), save_as_external_data=external, location=f"{os.path.basename(path)}.data")


def keep_fp32(model, op_types: tuple[str, ...] = HALF_KEEP_FP32_OPS) -> int:
    """Run every node of `op_types` that computes in FP16/BF16 in FP32 instead: Casts to FP32 on its
    half inputs, and its half outputs cast back, so its neighbours are unchanged (what AutoCast
    does for its exclusions; written here because AutoCast only converts FP32 graphs). Returns the
    number of nodes moved."""
    onnx = require("onnx", "half-precision graphs")
    from onnx import helper

    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    types = _float_types(model)
    nodes, moved = [], 0
    for k, node in enumerate(model.graph.node):
        half_in = [name for name in node.input if name and types.get(name) in half]
        half_out = [name for name in node.output if types.get(name) in half]
        if node.op_type not in op_types or not (half_in or half_out):
            nodes.append(node)
            continue
        moved += 1
        for i, name in enumerate(node.input):
            if name in half_in:
                upcast = f"{name}__fp32_{k}"
                nodes.append(helper.make_node("Cast", [name], [upcast], to=onnx.TensorProto.FLOAT,
                                              name=f"{node.name or node.op_type}_in{i}_to_fp32"))
                node.input[i] = upcast
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name in half_out:
                wide = f"{name}__fp32"
                node.output[i] = wide
                nodes.append(helper.make_node("Cast", [wide], [name], to=types[name],
                                              name=f"{node.name or node.op_type}_out{i}_to_half"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # value_info of the moved outputs said half; shape inference re-derives them
    del model.graph.value_info[:]
    return moved
