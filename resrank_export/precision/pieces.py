"""A large graph cut into pieces of consecutive nodes, each quantized on its own, then joined.

ModelOpt's ONNX INT8 path holds about four copies of the graph it is given (its preprocessing
load, symbolic shape inference, a session to detect GEMVs, the calibrator) and ONNX Runtime's
calibrator keeps every quantized tensor of every calibration run until it builds the histograms:
at Qwen3-0.6B (2.4 GB of FP32 weights) the INT8 stage passed 23 GiB. Per-tensor calibration is
local, so a piece calibrated on the FP32 values that reach its inputs gets the ranges the whole
graph would; the pieces' inputs come from running the pieces before it (ONNX Runtime, FP32) on
the same calibration runs. ModelOpt offers no such split, hence this module.

Cuts fall where few computed tensors cross (between layers, or between attention and FFN), never
inside an attention block (ModelOpt detects MatMul-Softmax-MatMul to leave it unquantized) nor
between GEMMs that read one tensor (they share a Q/DQ pair and a SmoothQuant factor).
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from resrank_export.errors import ResRankExportError
from resrank_export.lazy import require

log = logging.getLogger(__name__)

# How far past the byte target a cut may move to find the fewest crossing tensors (a layer
# boundary lies within any half-layer window).
CUT_WINDOW = 1.5


@dataclass(frozen=True)
class Piece:
    start: int  # node indices [start, stop) of the whole graph
    stop: int
    inputs: tuple[str, ...]  # graph inputs or tensors from earlier pieces
    outputs: tuple[str, ...]  # graph outputs or tensors later pieces read
    weight_bytes: int


def _tensor_bytes(tensor) -> int:
    helper = require("onnx", "INT8 quantization").helper
    return math.prod(tensor.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def plan_pieces(structure, piece_bytes: int) -> list[Piece]:
    """Cut `structure` (a model loaded without its external data) into pieces of about
    `piece_bytes` of initializers: each cut goes, among the nodes where a piece reaches
    `piece_bytes` and up to CUT_WINDOW times it, where the fewest computed tensors cross."""
    graph = structure.graph
    nodes = list(graph.node)
    sizes = {init.name: _tensor_bytes(init) for init in graph.initializer}
    if any(attr.type in (attr.GRAPH, attr.GRAPHS) for node in nodes for attr in node.attribute):
        if sum(sizes.values()) > piece_bytes:  # a subgraph reads outer tensors this cut does not follow
            log.warning("INT8: the graph has control-flow subgraphs (If/Loop); it is quantized whole")
        piece_bytes = sum(sizes.values()) + 1
    counted, weight = set(), [0] * len(nodes)  # an initializer's bytes count at its first user
    for k, node in enumerate(nodes):
        for name in node.input:
            if name in sizes and name not in counted:
                counted.add(name)
                weight[k] += sizes[name]
    last_use = {}
    for k, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = k
    for output in graph.output:
        last_use[output.name] = len(nodes)
    allowed = _allowed_cuts(nodes, sizes)
    produced, crossing, live = {}, [], set()
    for k, node in enumerate(nodes):
        for name in node.output:
            if name:
                produced[name] = k
                live.add(name)
        live = {name for name in live if last_use.get(name, -1) > k}
        crossing.append(len(live))  # computed tensors alive across a cut after node k
    cuts, start = [], 0
    while True:
        total, reach, window_end = 0, None, len(nodes) - 2
        for k in range(start, len(nodes) - 1):
            total += weight[k]
            if reach is None and total >= piece_bytes:
                reach = k
            if reach is not None and total >= CUT_WINDOW * piece_bytes:
                window_end = k
                break
        if reach is None:
            break
        window = [k for k in range(reach, window_end + 1) if allowed[k]]
        later = [k for k in range(window_end + 1, len(nodes) - 1) if allowed[k]][:1]
        if not window and not later:
            break
        start = min(window, key=lambda k: (crossing[k], k)) + 1 if window else later[0] + 1
        cuts.append(start)
    pieces = []
    for start, stop in zip([0, *cuts], [*cuts, len(nodes)]):
        inside = nodes[start:stop]
        made = {name for node in inside for name in node.output if name}
        inputs = dict.fromkeys(name for node in inside for name in node.input
                               if name and name not in made and name not in sizes)
        outputs = dict.fromkeys(name for name in made if last_use.get(name, -1) >= stop)
        pieces.append(Piece(start, stop, tuple(inputs), tuple(sorted(outputs, key=produced.get)),
                            sum(weight[start:stop])))
    return pieces


def _allowed_cuts(nodes: list, weights: dict) -> list[bool]:
    """allowed[k]: may a piece end after node k? Not inside an attention block (from the GEMM
    before a Softmax to the GEMM after it, both reading computed tensors only), nor between the
    first and last GEMM reading the same tensor."""
    allowed = [True] * len(nodes)
    gemm = [n.op_type in ("MatMul", "Gemm") for n in nodes]
    activation_gemms = [k for k, n in enumerate(nodes) if gemm[k] and not any(i in weights for i in n.input)]
    spans = []
    for k, node in enumerate(nodes):
        if node.op_type == "Softmax":
            before = [g for g in activation_gemms if g < k]
            after = [g for g in activation_gemms if g > k]
            spans.append((before[-1] if before else k, after[0] if after else k))
    readers = collections.defaultdict(list)
    for k, node in enumerate(nodes):
        if gemm[k]:
            for name in node.input:
                if name not in weights:
                    readers[name].append(k)
    spans += [(ks[0], ks[-1]) for ks in readers.values() if len(ks) > 1]
    for first, last in spans:
        for k in range(first, last):
            allowed[k] = False
    return allowed


def piece_model(structure, piece: Piece, base_dir: Path):
    """The piece as a model of its own, its initializers read from `structure`'s external data in
    `base_dir` (only these: one piece's weights in memory)."""
    onnx = require("onnx", "INT8 quantization")
    from onnx import external_data_helper

    graph = structure.graph
    nodes = graph.node[piece.start:piece.stop]
    used = {name for node in nodes for name in node.input}
    types = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    missing = [name for name in (*piece.inputs, *piece.outputs) if name not in types]
    if missing:
        raise ResRankExportError(f"INT8 in pieces: no type recorded for {', '.join(missing[:5])} in the graph; "
                                 "it cannot be cut there")
    initializers = []
    for init in graph.initializer:
        if init.name in used:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(init)
            if external_data_helper.uses_external_data(tensor):
                tensor.raw_data = _external_bytes(tensor, Path(base_dir))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            initializers.append(tensor)
    piece_graph = onnx.helper.make_graph(
        list(nodes), f"{graph.name}_piece_{piece.start}", [types[name] for name in piece.inputs],
        [types[name] for name in piece.outputs], initializers,
        value_info=[v for v in graph.value_info if v.name not in piece.inputs and v.name not in piece.outputs])
    model = onnx.helper.make_model(piece_graph, opset_imports=list(structure.opset_import),
                                   ir_version=structure.ir_version)
    model.functions.extend(structure.functions)
    return model


def _external_bytes(tensor, base_dir: Path) -> bytes:
    """A tensor's bytes from its external-data file. Not onnx's load_external_data_for_tensor: it
    refuses a file with more than one hard link, and a rebuild's folder starts as hard links to
    the previous build's graphs (fs.atomic_dir), so every rebuild of a large graph failed there."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    path = (base_dir / info.location).resolve()
    if base_dir.resolve() not in path.parents:
        raise ResRankExportError(f"{base_dir}: the graph's weights {tensor.name} point outside its folder "
                                 f"({info.location})")
    with open(path, "rb") as data:
        data.seek(info.offset or 0)
        raw = data.read(info.length) if info.length else data.read()
    if info.length and len(raw) != info.length:
        raise ResRankExportError(f"{path}: {tensor.name} needs {info.length} bytes at offset {info.offset or 0}, "
                                 f"the file has {len(raw)} there (truncated?)")
    return raw


def release_memory() -> None:
    """Give what a piece's ModelOpt run freed back to the OS (glibc keeps freed heap pages, and the
    next piece's peak then stacks on them); a no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CarriedValues:
    """The tensors that cross the cuts, per calibration run: starts as the runs' graph inputs,
    gains each piece's outputs, and drops what no later piece reads."""

    def __init__(self, runs: list[dict[str, np.ndarray]]):
        self.runs = [dict(run) for run in runs]

    def feeds(self, piece: Piece) -> list[dict[str, np.ndarray]]:
        return [{name: run[name] for name in piece.inputs} for run in self.runs]

    def advance(self, session, piece: Piece, later: list[Piece]) -> None:
        """Run `piece` (an ONNX Runtime session of its FP32 graph) on every run; keep what later
        pieces read."""
        from resrank_export.runtime import run_session

        needed = {name for other in later for name in other.inputs}
        names = [o.name for o in session.get_outputs()]
        for run in self.runs:
            run.update(zip(names, run_session(session, run)))
            for name in [name for name in run if name not in needed]:
                del run[name]


def join_pieces(structure, pieces: Iterable) -> tuple:
    """One model from the quantized pieces (in order; an iterable, so each can be loaded when its
    turn comes and freed after: the joined model and one piece are alive at a time), with
    `structure`'s inputs, outputs, opsets and metadata. A name two pieces both made inside
    themselves (a constant each kept, a Q/DQ tensor of a value both quantized) is renamed in the
    later one; an initializer identical to an earlier one of the same name is dropped. Returns
    (model, renamed count)."""
    onnx = require("onnx", "INT8 quantization")
    joined = onnx.ModelProto(ir_version=structure.ir_version)
    graph = joined.graph
    graph.name = structure.graph.name
    graph.input.extend(structure.graph.input)
    graph.output.extend(structure.graph.output)
    seen_tensors = {v.name for v in graph.input}
    seen_nodes: set[str] = set()
    initializer_at: dict[str, int] = {}
    value_names: set[str] = set()
    renamed = 0
    opsets: dict[str, int] = {}
    for index, model in enumerate(pieces):
        boundary = {v.name for v in [*model.graph.input, *model.graph.output]}
        rename, duplicate = {}, set()
        for init in model.graph.initializer:
            if init.name in initializer_at:
                if graph.initializer[initializer_at[init.name]].SerializeToString() == init.SerializeToString():
                    duplicate.add(init.name)
                else:
                    rename[init.name] = f"{init.name}__piece{index}"
        for node in model.graph.node:
            for name in node.output:
                if name and name not in boundary and name in seen_tensors:
                    rename[name] = f"{name}__piece{index}"
        renamed += len(rename)
        for init in model.graph.initializer:
            if init.name not in duplicate:
                init.name = rename.get(init.name, init.name)
                initializer_at[init.name] = len(graph.initializer)
                graph.initializer.append(init)
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                node.input[k] = rename.get(name, name)
            for k, name in enumerate(node.output):
                node.output[k] = rename.get(name, name)
                seen_tensors.add(node.output[k])
            if node.name in seen_nodes:
                node.name = f"{node.name}__piece{index}"
            seen_nodes.add(node.name)
            graph.node.append(node)
        for value in model.graph.value_info:
            value.name = rename.get(value.name, value.name)
            if value.name not in value_names:
                value_names.add(value.name)
                graph.value_info.append(value)
        for opset in model.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
        joined.ir_version = max(joined.ir_version, model.ir_version)
        del model
    joined.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    joined.functions.extend(structure.functions)
    joined.metadata_props.extend(structure.metadata_props)
    return joined, renamed


def merged_reports(reports: list[dict | None]) -> dict | None:
    """The pieces' SmoothQuant reports as one (sums of counts, the largest factor)."""
    reports = [r for r in reports if r]
    if not reports:
        return None
    total = collections.Counter()
    for report in reports:
        total.update({k: report[k] for k in ("gemms", "inputs")})
    return {"alpha": reports[0]["alpha"], **total, "max_scale": max(r.get("max_scale", 0.0) for r in reports)}
