"""FP16, BF16 and INT8 graphs made on the CPU with NVIDIA ModelOpt. TensorRT 10 deprecated (and 11
removed) its builder precision flags and implicit INT8 calibrators, so the precision lives in
the ONNX graph: FP16 and BF16 by AutoCast (mixed precision, I/O types kept), INT8 by explicit Q/DQ
nodes whose scales come from a calibration set run through ONNX Runtime on the CPU."""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from resrank_export.errors import ResRankExportError
from resrank_export.lazy import require
from resrank_export.export.half import (EXTERNAL_DATA_THRESHOLD, HALF_KEEP_FP32_OPS, graph_file_bytes, precision_by_op,
                                        save_graph)
from resrank_export.export.onnx import ISOLATE_BYTES
from resrank_export.isolated import run_isolated
from resrank_export.precision import HALF_PRECISIONS
from resrank_export.precision.compact import compact_embeddings, float_matmul_weights, store_weights
from resrank_export.precision.pieces import (CarriedValues, join_pieces, merged_reports, piece_model, plan_pieces,
                                             release_memory)
from resrank_export.progress import track
from resrank_export.precision.smoothquant import channel_absmax, smooth_gemm_inputs, smoothable_groups

log = logging.getLogger(__name__)

# ModelOpt's INT8 calibration methods ("percentile" is not offered for INT8 by ModelOpt 0.4x).
INT8_METHODS = ("entropy", "max")
CALIBRATION_BATCH = 8  # samples per ONNX Runtime run during calibration
MODELOPT_MIN_OPSET = 19  # modelopt.onnx.utils.BASE_MIN_OPSET: what its INT8 Q/DQ path needs
CALIBRATION_RUN_BYTES = 2**30  # activations kept from one calibration run (calibration_tokens_per_run)
SEQUENCE_INPUTS = ("input_ids", "attention_mask")  # the [batch, sequence] inputs (model/specs.py), right-padded
# Only the GEMMs are quantized (where TensorRT's INT8 speed-up is); elementwise Adds carry the
# attention mask's -inf and the residual stream, whose per-tensor ranges INT8 cannot hold.
INT8_QUANTIZE_OPS = ("MatMul", "Gemm")
# Activations whose output feeds the FFN down-projection: measured on all-MiniLM-L6-v2, that
# GEMM's input (GELU output, heavy-tailed) costs most of INT8's embedding error (mean cosine
# 0.983 -> 0.992 when it stays FP32).
FFN_ACTIVATION_OPS = ("Erf", "Gelu", "FastGelu", "Sigmoid", "Tanh")


@dataclass(frozen=True)
class PrecisionConfig:
    calibration_method: str = "entropy"
    half_keep_fp32_ops: tuple[str, ...] = HALF_KEEP_FP32_OPS
    int8_exclude_ops: tuple[str, ...] = ()  # op types left unquantized, e.g. ("Gather",)
    int8_exclude_nodes: tuple[str, ...] = ()  # node-name regexes left unquantized
    int8_keep_ffn_output_fp32: bool = True  # leave GEMMs fed by the FFN activation unquantized
    int8_attention_qdq: bool = False  # quantize the attention score/value GEMMs too
    int8_smoothquant_alpha: float | None = 0.5  # SmoothQuant migration strength; None: no smoothing
    autocast_samples: int = 8  # calibration samples AutoCast's range check runs
    # For ONNX Runtime's CPU integer kernels: GEMMs sharing an input merged (else ORT dequantizes
    # them) and 7-bit weights (ORT's non-VNNI x86 kernels saturate on 8). Off by default: on the
    # SciFact fidelity gate it costs ΔnDCG@10 0.00504 (> 0.005), and TensorRT only loses the 8th bit.
    int8_cpu_integer_kernels: bool = False
    calibration_device: str = "cpu"  # cuda: ModelOpt's INT8 calibration runs on ONNX Runtime's CUDA provider
    # Graphs with more weights than this are quantized a piece of about this size at a time
    # (precision/pieces.py): ModelOpt and ONNX Runtime's calibrator held about 10x a piece's FP32
    # weights at Qwen3-0.6B (5.6 GiB for a 540 MiB piece). 256 MiB keeps the demo graphs whole
    # (90 MB) and cuts each Qwen3-0.6B graph (2.4 GB) into eight.
    int8_piece_bytes: int = 256 << 20


def check_int8_config(config: PrecisionConfig) -> None:
    if config.calibration_method not in INT8_METHODS:
        raise ResRankExportError(f"calibration method {config.calibration_method!r}: expected one of "
                                 f"{', '.join(INT8_METHODS)} (ModelOpt INT8 offers no percentile method)")
    alpha = config.int8_smoothquant_alpha
    if alpha is not None and not 0 < alpha <= 1:
        raise ResRankExportError(f"SmoothQuant alpha {alpha}: expected a number in (0, 1] (0.5 is the usual choice)")
    if config.int8_piece_bytes <= 0:
        raise ResRankExportError(f"INT8 piece size {config.int8_piece_bytes} bytes: expected a positive size "
                                 "(pieces of a few hundred MiB keep ModelOpt's memory bounded)")


def _drop_placeholder_dims(model) -> None:
    """AutoCast (ModelOpt 0.47) renames every value_info dim to one symbol "unk"; dims that shape
    inference cannot re-derive (GQA's reshaped q vs k/v) keep it, and ONNX Runtime then treats
    them as equal and fails ("Shape mismatch attempting to re-use buffer"). Unknown is correct."""
    for value in [*model.graph.value_info, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "unk":
                dim.Clear()


@contextlib.contextmanager
def _private_copy(src: Path) -> Iterator[Path]:
    """ModelOpt rewrites the graph it is given in place (it names unnamed nodes): hand it a copy
    (with any external-data side file) so the FP32 graph, and its recorded hash, stay as built."""
    src = Path(src)
    with tempfile.TemporaryDirectory() as tmp:
        for path in src.parent.glob(f"{src.name}*"):
            shutil.copyfile(path, Path(tmp) / path.name)
        yield Path(tmp) / src.name


def _first_samples(calibration: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {name: array[:n] for name, array in calibration.items()}


def convert_half(src: Path, dst: Path, calibration: dict[str, np.ndarray], config: PrecisionConfig,
                 precision: str = "fp16") -> dict:
    """Mixed FP16 or BF16 (`precision`) graph with FP32 inputs/outputs; nodes of
    `half_keep_fp32_ops`, and any node whose values on real calibration inputs exceed the type's
    safe range, stay FP32."""
    if precision not in HALF_PRECISIONS:
        raise ResRankExportError(f"half precision {precision!r}: expected one of {', '.join(HALF_PRECISIONS)}")
    autocast = require("modelopt.onnx.autocast", f"{precision.upper()} conversion")
    with _private_copy(src) as copy:
        sample = copy.parent / "autocast.npz"
        np.savez(sample, **_first_samples(calibration, config.autocast_samples))
        model = autocast.convert_to_mixed_precision(
            onnx_path=str(copy), low_precision_type=precision, keep_io_types=True,
            op_types_to_exclude=list(config.half_keep_fp32_ops), calibration_data=str(sample),
            providers=["cpu"])
    _drop_placeholder_dims(model)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_graph(model, dst)
    report = {"keep_fp32_op_types": list(config.half_keep_fp32_ops), "nodes": precision_by_op(model)}
    log.info("%s %s: %d %s nodes, fp32 kept: %s", precision, Path(dst).name, sum(report["nodes"][precision].values()),
             precision, report["nodes"]["fp32"])
    return report


def calibration_batches(calibration: dict[str, np.ndarray], batch: int = CALIBRATION_BATCH,
                        max_tokens: int | None = None) -> list[dict[str, np.ndarray]]:
    """The calibration set as runs of at most `batch` samples (and `max_tokens` tokens, padding
    included; one sample at least) of similar token length, longest first, each cut to its longest
    sample. A set is stored right-padded to its longest text: at Qwen3-0.6B 442 columns for a mean
    of 82 tokens, so fixed slices spent 80% of the calibration compute on padding, held five times
    the activations, and let padding positions into the activation ranges."""
    if "attention_mask" not in calibration:  # not a text graph: slices as stored
        samples = next(iter(calibration.values())).shape[0]
        return [{name: array[start:start + batch] for name, array in calibration.items()}
                for start in range(0, samples, batch)]
    lengths = calibration["attention_mask"].sum(1)
    order = np.argsort(-lengths, kind="stable")  # longest first: ONNX Runtime's arena is sized once, then reused
    batches, start = [], 0
    while start < len(order):
        width = int(lengths[order[start]])  # the run's longest sample
        rows = max(1, min(batch, (max_tokens or width * batch) // max(width, 1)))
        rows, start = np.sort(order[start:start + rows]), start + rows
        batches.append({name: np.ascontiguousarray(array[rows, :width] if name in SEQUENCE_INPUTS else array[rows])
                        for name, array in calibration.items()})
    return batches


def calibration_tokens_per_run(model, nodes=None) -> int:
    """Tokens per calibration run such that the GEMM activations ModelOpt keeps from one run (every
    quantized GEMM's input and output, FP32) stay within CALIBRATION_RUN_BYTES: at Qwen3-0.6B
    about 2.5 MB a token (3.6 measured with the rest it keeps), so 8 samples of 442 tokens held
    12 GiB; all-MiniLM-L6-v2 keeps 8 x 256 tokens a run. `model` needs no weights, only their
    shapes; `nodes` (default: all) are the ones quantized together."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    per_token = sum(sum(shapes[n.input[1]][-2:]) for n in (model.graph.node if nodes is None else nodes)
                    if n.op_type in INT8_QUANTIZE_OPS and len(shapes.get(n.input[1], [])) >= 2)
    return max(1, CALIBRATION_RUN_BYTES // max(4 * per_token, 1))


def _calibration_reader(batches: list[dict[str, np.ndarray]]):
    """`batches` (longest first) as a calibration data reader: get_next, plus get_first and rewind
    as ModelOpt's own CalibrationDataProvider has (that provider cuts fixed slices, and its
    constructor loads the whole model, weights included, to read the input names)."""
    quantization = require("onnxruntime.quantization", "INT8 quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._batches, None)

        def get_first(self):  # ModelOpt's shape probe (one run with every MatMul output kept): the smallest run
            return batches[-1]

        def rewind(self):
            self._batches = iter(batches)

    return Reader()


def ffn_output_gemms(model, depth: int = 4) -> list[str]:
    """Names of MatMul/Gemm nodes whose input comes (within `depth` producers) from an FFN
    activation: the down-projections."""
    producer = {out: node for node in model.graph.node for out in node.output}

    def fed_by_activation(tensor: str, left: int) -> bool:
        node = producer.get(tensor)
        if node is None or left == 0:
            return False
        return node.op_type in FFN_ACTIVATION_OPS or any(fed_by_activation(i, left - 1) for i in node.input)

    return [n.name for n in model.graph.node if n.op_type in INT8_QUANTIZE_OPS and fed_by_activation(n.input[0], depth)]


def _quantized_gemm_names(model, config: PrecisionConfig, kept_fp32: list[str]) -> set[str]:
    """The GEMMs ModelOpt will quantize under `config` (same regex rule as ModelOpt: re.match)."""
    patterns = [re.compile(p) for p in config.int8_exclude_nodes]
    return {n.name for n in model.graph.node
            if n.op_type in INT8_QUANTIZE_OPS and n.op_type not in config.int8_exclude_ops
            and n.name not in kept_fp32 and not any(p.match(n.name) for p in patterns)}


def _prepare_copy(path: Path, gemms: set[str], runs: list[dict[str, np.ndarray]], alpha: float | None,
                  merge: bool) -> tuple:
    """SmoothQuant (when `alpha`) then GEMM merging (when `merge`) on the private copy ModelOpt will
    quantize, saved at ModelOpt's minimum opset; (smoothing report or None, {merged node: members})."""
    onnx = require("onnx", "INT8 quantization")
    amax = {}
    if alpha is not None:  # measured on the graph on disk before the weights are loaded: one copy at a time
        structure = onnx.load(str(path), load_external_data=False)
        tensors = list(smoothable_groups(structure, gemms))
        amax = channel_absmax(path, tensors, runs) if tensors else {}
    model = onnx.load(str(path))
    side_files = list(path.parent.glob(f"{path.name}.*"))  # the private copy's external data, if any
    smoothing = smooth_gemm_inputs(model, gemms, amax, alpha) if alpha is not None else None
    merged = merge_shared_input_gemms(model, gemms) if merge else {}
    # ModelOpt runs onnx.version_converter on a graph below its minimum opset, which cannot parse a
    # graph past 2 GB (at 0.6B: a 9.9 GiB peak, then its fallback), and saves one more clone. The
    # fallback only relabels the default domain, as here: the ops used gained no semantics from 18 to 19.
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, MODELOPT_MIN_OPSET)
    for side_file in side_files:
        side_file.unlink()
    onnx.save(model, str(path), save_as_external_data=bool(side_files), location=f"{path.name}.data")
    return smoothing, merged


def unshare_dequantized_activations(model) -> int:
    """ModelOpt (through ONNX Runtime's quantize_static) puts one Q/DQ pair on a tensor and points
    every consumer at the DQ output, quantized or not. In post-LN BERT the LayerNorm output feeding
    the QKV GEMMs is also the residual stream, so the residual Add would carry INT8 rounding (step
    0.22 on all-MiniLM-L6-v2; min embedding cosine 0.979 instead of 0.989). Unquantized consumers
    read the FP32 tensor again; returns how many inputs were rewired."""
    producer = {out: node for node in model.graph.node for out in node.output}
    rewired = 0
    for node in model.graph.node:
        if node.op_type in (*INT8_QUANTIZE_OPS, "QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                rewired += 1
    return rewired


def merge_shared_input_gemms(model, gemm_names: set[str]) -> dict[str, list[str]]:
    """One MatMul (weights side by side) + Split for each group of the named GEMMs that read the
    same tensor (Q/K/V projections; Qwen3's gate/up). ModelOpt gives such a group one shared
    Q/DQ pair, and ONNX Runtime's CPU EP turns Q/DQ + MatMul into an integer kernel
    (MatMulIntegerToFloat) only where the quantized activation has one consumer: measured on
    all-MiniLM-L6-v2, 12 of its 30 INT8 GEMMs fused, the QKV GEMMs ran as dequantize + FP32
    MatMul. Exact in FP32; INT8 scales are unchanged too (per output channel for the weight, one
    per-tensor scale for the shared input). Rewrites `model` in place; {merged node: members}."""
    onnx = require("onnx", "INT8 quantization")
    numpy_helper = onnx.numpy_helper
    weights = {init.name: init for init in model.graph.initializer}
    groups = {nodes[0].name: nodes for nodes in smoothable_groups(model, gemm_names).values() if len(nodes) > 1}
    members = {node.name for nodes in groups.values() for node in nodes}
    merged, ordered = {}, []
    for node in model.graph.node:
        if node.name not in members:
            ordered.append(node)
            continue
        nodes = groups.get(node.name)
        if nodes is None:  # a later member: its output now comes from the first member's Split
            continue
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        name = f"{node.name}_merged"
        model.graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{name}_weight"))
        model.graph.initializer.append(numpy_helper.from_array(
            np.array([a.shape[1] for a in arrays], dtype=np.int64), f"{name}_split"))
        ordered.append(onnx.helper.make_node("MatMul", [node.input[0], f"{name}_weight"], [f"{name}_output"], name=name))
        ordered.append(onnx.helper.make_node("Split", [f"{name}_output", f"{name}_split"],
                                             [n.output[0] for n in nodes], name=f"{name}_split", axis=-1))
        merged[name] = [n.name for n in nodes]
    kept = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(kept, ordered):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    old = {w for nodes in groups.values() for n in nodes for w in n.input[1:2]}
    kept_weights = [init for init in model.graph.initializer if init.name not in old]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_weights)
    return merged


def restore_value_shapes(model, fp32_graph) -> int:
    """ModelOpt's symbolic shape inference renames every dim of the tensors it keeps ('batch' ->
    'unk__19', a different symbol on each tensor), so onnxscript's ORT fusions, which check that
    q, k and v share batch, heads and sequence, did not fire on INT8 graphs (attention and rotary
    embeddings stayed unfused under --ort-optimize). Quantizing changes no tensor's shape: the
    FP32 graph's shapes replace ModelOpt's for every tensor both graphs compute, with the same type.
    Returns how many tensors carry the FP32 graph's shape."""
    def elem_type(value) -> int:
        return value.type.tensor_type.elem_type

    produced = {name for node in model.graph.node for name in node.output}
    present = {v.name: v for v in model.graph.value_info}
    restored = {v.name: v for v in fp32_graph.graph.value_info if v.name in produced
                and (v.name not in present or elem_type(present[v.name]) == elem_type(v))}
    kept = [v for v in model.graph.value_info if v.name not in restored]
    del model.graph.value_info[:]
    model.graph.value_info.extend([*kept, *restored.values()])
    return len(restored)


def seven_bit_weights(model) -> int:
    """Doubles the scale of every constant weight's Q/DQ pair, so INT8 weights span [-64, 64].
    ONNX Runtime's x86 CPU kernels for the fused Q/DQ GEMMs (u8 activations x s8 weights) add
    pairs of products in int16 without VNNI (AVX2 vpmaddubsw), saturating past 2 x 255 x 64: on
    all-MiniLM-L6-v2, running the QKV GEMMs as integer kernels dropped the min embedding cosine
    from 0.998 to 0.986, and 7-bit weights bring it back to 0.998 (ONNX Runtime's own quantizer
    calls this reduce_range). Per-channel weight scales keep the cost to one bit of weight
    precision; returns the number of weights changed."""
    numpy_helper = require("onnx", "INT8 quantization").numpy_helper
    initializers = {init.name: init for init in model.graph.initializer}
    scales = {node.input[1] for node in model.graph.node
              if node.op_type == "QuantizeLinear" and node.input[0] in initializers}
    for name in scales:
        scale = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array((scale * 2).astype(scale.dtype), name))
    return len(scales)


def quantize_int8(src: Path, dst: Path, calibration: dict[str, np.ndarray], config: PrecisionConfig) -> dict:
    """INT8 Q/DQ graph (TensorRT's explicit quantization); scales calibrated on the CPU with
    ONNX Runtime; unquantized ops stay FP32. A graph past `int8_piece_bytes` of weights is
    quantized a piece at a time (precision/pieces.py) and joined."""
    check_int8_config(config)
    onnx = require("onnx", "INT8 quantization")
    src = Path(src)
    samples = next(iter(calibration.values())).shape[0]
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    fp32_graph = onnx.load(str(src), load_external_data=False)
    down_projections = ffn_output_gemms(fp32_graph)
    kept_fp32 = down_projections if config.int8_keep_ffn_output_fp32 else []
    exclude_nodes = [*config.int8_exclude_nodes, *(f"^{re.escape(name)}$" for name in kept_fp32)]
    settings = _modelopt_settings("int8", config, exclude_nodes, "fp32")
    # never the FFN down-projections: measured on all-MiniLM-L6-v2, smoothing the GELU output
    # and quantizing them drops the min embedding cosine to 0.83
    gemms = _quantized_gemm_names(fp32_graph, config, down_projections)
    # the down-projections kept off INT8 activations that no exclusion names: INT8 weight-only
    weight_only = set(kept_fp32) & _quantized_gemm_names(fp32_graph, config, [])
    runs, pieces = _calibration_runs(fp32_graph, calibration, config)
    model, smoothing, merged, renamed = _modelopt_quantize(src, fp32_graph, pieces, gemms, runs, config, settings)
    restored = restore_value_shapes(model, fp32_graph)
    del fp32_graph
    rewired = unshare_dequantized_activations(model)
    seven_bit = seven_bit_weights(model) if config.int8_cpu_integer_kernels else 0
    model, stored = _store_compactly(model, weight_only)
    save_graph(model, dst)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    report = {"method": config.calibration_method, "samples": int(samples),
              "exclude_ops": list(config.int8_exclude_ops), "exclude_nodes": list(config.int8_exclude_nodes),
              "ffn_output_gemms_kept_fp32": kept_fp32, "attention_qdq": config.int8_attention_qdq,
              "smoothquant": smoothing, "fp32_consumers_rewired": rewired,
              "merged_gemms": merged, "seven_bit_weights": seven_bit, "value_shapes_restored": restored,
              "pieces": len(pieces), "piece_bytes": config.int8_piece_bytes, "names_renamed_in_join": renamed,
              "quantize_nodes": ops["QuantizeLinear"], "dequantize_nodes": ops["DequantizeLinear"], **stored}
    log.info("int8 %s: %d Q/DQ pairs (%s, %d piece%s)", Path(dst).name, ops["QuantizeLinear"],
             config.calibration_method, len(pieces), "" if len(pieces) == 1 else "s")
    return report


def _modelopt_settings(mode: str, config: PrecisionConfig, exclude_nodes: list[str], high_precision: str) -> dict:
    """ModelOpt `quantize` arguments of a Q/DQ precision (`mode` "int8" or "fp8"): GEMMs only."""
    return dict(quantize_mode=mode, calibration_method=config.calibration_method,
                calibration_eps=["cuda:0", "cpu"] if config.calibration_device == "cuda" else ["cpu"],
                op_types_to_quantize=list(INT8_QUANTIZE_OPS), op_types_to_exclude=list(config.int8_exclude_ops) or None,
                nodes_to_exclude=exclude_nodes or None, disable_mha_qdq=not config.int8_attention_qdq,
                high_precision_dtype=high_precision, log_level="WARNING")


def _calibration_runs(fp32_graph, calibration: dict[str, np.ndarray], config: PrecisionConfig) -> tuple[list, list]:
    """(calibration runs, pieces): one set of runs for SmoothQuant's maxima and ModelOpt's ranges
    (merging GEMMs later does not change what a run keeps: the tokens per run are read off the
    FP32 graph, its largest piece)."""
    pieces = plan_pieces(fp32_graph, config.int8_piece_bytes)
    runs = calibration_batches(calibration, max_tokens=min(
        calibration_tokens_per_run(fp32_graph, fp32_graph.graph.node[p.start:p.stop]) for p in pieces))
    return runs, pieces


def _modelopt_quantize(src: Path, fp32_graph, pieces: list, gemms: set[str], runs: list[dict[str, np.ndarray]],
                       config: PrecisionConfig, settings: dict) -> tuple:
    """ModelOpt's Q/DQ graph of `src` (whole on a private copy, or a piece at a time past
    `int8_piece_bytes`); (model, smoothing report, merged GEMMs, names renamed in the join)."""
    onnx = require("onnx", "quantization")
    if len(pieces) > 1:
        return _quantize_in_pieces(src, fp32_graph, pieces, gemms, runs, config, settings)
    with _private_copy(src) as copy:
        smoothing, merged = _prepare_copy(copy, gemms, runs, config.int8_smoothquant_alpha,
                                          config.int8_cpu_integer_kernels)
        # written beside the private copy: ModelOpt's external data (`<output>_data`) must not be
        # left in the build folder beside the compact graph saved later
        quantized = copy.with_name("quantized.onnx")
        require("modelopt.onnx.quantization", "quantization").quantize(
            onnx_path=str(copy), calibration_data_reader=_calibration_reader(runs),
            use_external_data_format=any(src.parent.glob(f"{src.name}.*")), output_path=str(quantized),
            **settings)
        return onnx.load(str(quantized)), smoothing, merged, 0


def quantize_fp8(src: Path, dst: Path, calibration: dict[str, np.ndarray], config: PrecisionConfig) -> dict:
    """FP8 E4M3 Q/DQ graph (ModelOpt `quantize_mode="fp8"`, what TensorRT runs on compute capability
    8.9+): every GEMM's input and weight in FP8, the rest FP32, the weights stored as FP8
    (`qdq_to_dq`) and the token table as FP16. Calibrated on the CPU as INT8 is, a piece at a time
    past `int8_piece_bytes`. FP32 rather than ModelOpt's default FP16 outside the GEMMs: its
    AutoCast of separately quantized pieces declares the tensors at their boundaries in both
    types, and the joined graph does not load; one graph whatever the piece size. No SmoothQuant
    and every GEMM quantized, the FFN down-projections too: E4M3's exponent holds the heavy-tailed
    activation output that INT8 cannot (demo encoder, held-out texts: min cosine 0.994 to FP32)."""
    check_int8_config(config)
    onnx = require("onnx", "FP8 quantization")
    src = Path(src)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    fp32_graph = onnx.load(str(src), load_external_data=False)
    fp8_config = replace(config, int8_smoothquant_alpha=None, int8_cpu_integer_kernels=False)
    gemms = _quantized_gemm_names(fp32_graph, fp8_config, [])
    settings = _modelopt_settings("fp8", config, list(config.int8_exclude_nodes), "fp32")
    runs, pieces = _calibration_runs(fp32_graph, calibration, fp8_config)
    model, _, _, renamed = _modelopt_quantize(src, fp32_graph, pieces, gemms, runs, fp8_config, settings)
    del fp32_graph
    model = require("modelopt.onnx.quantization.qdq_utils", "FP8 quantization").qdq_to_dq(model)
    unused = drop_unused_initializers(model)
    embeddings = compact_embeddings(model, "fp16")
    save_graph(model, dst)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    report = {"method": config.calibration_method, "samples": int(next(iter(calibration.values())).shape[0]),
              "exclude_ops": list(config.int8_exclude_ops), "exclude_nodes": list(config.int8_exclude_nodes),
              "attention_qdq": config.int8_attention_qdq, "high_precision": "fp32", "weights": "fp8",
              "pieces": len(pieces), "piece_bytes": config.int8_piece_bytes, "names_renamed_in_join": renamed,
              "quantize_nodes": ops["QuantizeLinear"], "dequantize_nodes": ops["DequantizeLinear"],
              "unused_initializers_dropped": unused, "embedding_tables": embeddings}
    log.info("fp8 %s: %d Q/DQ pairs (%s, %d piece%s)", Path(dst).name, ops["QuantizeLinear"],
             config.calibration_method, len(pieces), "" if len(pieces) == 1 else "s")
    return report


def drop_unused_initializers(model) -> int:
    """Initializers no node reads (`qdq_to_dq` leaves the folded QuantizeLinears' scales), removed:
    ONNX Runtime warns of each and a session would map them. Returns how many."""
    used = {name for node in model.graph.node for name in node.input} | {v.name for v in model.graph.output}
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    return len(unused)


def _store_compactly(model, weight_only_gemms: set[str]) -> tuple:
    """The Q/DQ graph with its weights stored as INT8 (ModelOpt's `qdq_to_dq`: each weight's
    QuantizeLinear folded into INT8 levels, what `quantize(dq_only=True)` does), the GEMMs whose
    activations stay FP32 (`weight_only_gemms`, the FFN down-projections) INT8 weight-only per
    output channel, and the token-embedding table INT8 per row: no FP32 copy of a weight is left
    for a session to hold (the Q/DQ graph was the FP32 graph's size, 2.38 GB at Qwen3-0.6B).
    Returns (model, report entries)."""
    model = require("modelopt.onnx.quantization.qdq_utils", "INT8 quantization").qdq_to_dq(model)
    floats = set(float_matmul_weights(model))
    formats = {n.input[1]: (8, 0) for n in model.graph.node if n.name in weight_only_gemms and n.input[1] in floats}
    store_weights(model, formats)
    embeddings = compact_embeddings(model, "int8")
    return model, {"weights": "int8", "weight_only_gemms": len(formats), "embedding_tables": embeddings}


def _quantize_piece(structure, weights_dir: Path, piece, path: Path, out: Path, gemms: set[str],
                    feeds: list[dict[str, np.ndarray]], config: PrecisionConfig, settings: dict) -> tuple:
    """One piece with its own weights only (read from `weights_dir`): written to `path`, prepared
    (SmoothQuant, merging) on `feeds`, and quantized by ModelOpt to `out` when it holds GEMMs to
    quantize; (smoothing report, merged GEMMs)."""
    save_graph(piece_model(structure, piece, weights_dir), path)
    report, merged = _prepare_copy(path, gemms, feeds, config.int8_smoothquant_alpha, config.int8_cpu_integer_kernels)
    if gemms:
        require("modelopt.onnx.quantization", "INT8 quantization").quantize(
            onnx_path=str(path), calibration_data_reader=_calibration_reader(feeds),
            use_external_data_format=piece.weight_bytes > EXTERNAL_DATA_THRESHOLD, output_path=str(out), **settings)
    return report, merged


def _quantize_in_pieces(src: Path, structure, pieces: list, gemms: set[str], runs: list[dict[str, np.ndarray]],
                        config: PrecisionConfig, settings: dict) -> tuple:
    """Each piece quantized on the FP32 values that reach it (`_quantize_piece`), then run in FP32
    on the calibration runs to give the next pieces theirs; then the pieces joined. (model,
    smoothing report, merged GEMMs, renamed). For a graph past ISOLATE_BYTES each piece is
    quantized in a process of its own: measured at Qwen3-0.6B in one process, what ModelOpt and
    ONNX Runtime kept after each piece grew by about 0.3 GiB a piece (2.0 to 3.8 GiB over 8)."""
    onnx = require("onnx", "INT8 quantization")
    from resrank_export.runtime import ort_session

    isolate = graph_file_bytes(src) > ISOLATE_BYTES
    carried = CarriedValues(runs)
    smoothing, merged, quantized = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for k, piece in enumerate(track(pieces, f"int8 {src.stem} pieces", unit="pieces")):
            path, out = Path(tmp) / f"piece{k}.onnx", Path(tmp) / f"piece{k}.int8.onnx"
            inside = {n.name for n in structure.graph.node[piece.start:piece.stop]} & gemms
            args = (structure, src.parent, piece, path, out, inside, carried.feeds(piece), config, settings)
            report, merged_here = (run_isolated(_quantize_piece, *args, what=f"INT8 piece {k + 1} of {src.stem}")
                                   if isolate else _quantize_piece(*args))
            smoothing.append(report)
            merged.update(merged_here)
            if k + 1 < len(pieces):  # the prepared FP32 piece: exact, so the next pieces see FP32 values
                carried.advance(ort_session(path), piece, pieces[k + 1:])
            if not inside:  # nothing quantized here (embeddings, the final norm): the piece as it is
                out = path
            _check_piece_io(out, piece)
            quantized.append(out)
            log.info("int8 %s: piece %d/%d (nodes %d-%d, %.0f MiB of weights, %d GEMMs quantized)", src.stem,
                     k + 1, len(pieces), piece.start, piece.stop - 1, piece.weight_bytes / 2**20, len(inside))
            release_memory()
        del carried  # the last piece's inputs
        release_memory()
        model, renamed = join_pieces(structure, (onnx.load(str(path)) for path in quantized))
    report = merged_reports(smoothing) if config.int8_smoothquant_alpha is not None else None
    return model, report, merged, renamed


def _check_piece_io(path: Path, piece) -> None:
    onnx = require("onnx", "INT8 quantization")
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    found = ([v.name for v in graph.input if v.name not in weights], [v.name for v in graph.output])
    if sorted(found[0]) != sorted(piece.inputs) or sorted(found[1]) != sorted(piece.outputs):
        raise ResRankExportError(f"INT8 in pieces: ModelOpt changed the inputs/outputs of nodes {piece.start}-"
                                 f"{piece.stop - 1} (got {found}, expected {piece.inputs}, {piece.outputs}); "
                                 "quantize the graph whole with a larger --int8-piece-size")
