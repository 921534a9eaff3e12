"""Encoder throughput (passages/s): the same texts, batch size and pooling through Hugging Face
PyTorch eager, sentence-transformers (PyTorch; its ONNX backends when `optimum` is installed)
and our exported graph on ONNX Runtime (FP32, FP16, INT8) and OpenVINO. Every run goes from texts
to vectors (tokenization included, as sentence-transformers' encode does), each the way its
library encodes: sentence-transformers batches texts sorted by characters, our graphs and the
reference model by token count (`runtime.encode_texts`, what the index stage runs); the padding
each way computes is recorded. Ratios are to sentence-transformers PyTorch timed in the same run."""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from resrank_export.bench.config import (GRAPH_VARIANTS, OPENVINO_VARIANTS, BenchConfig, BenchContext, graph_file,
                                         openvino_session_or_reason)
from resrank_export.bench.timing import measure
from resrank_export.lazy import require

log = logging.getLogger(__name__)
BASELINE = "sentence-transformers"
# Published figures on a 2-core AVX2 machine (issue 7), passages/s; shown beside unavailable rows.
REFERENCE_PPS = {"sentence-transformers": 32.9, "sentence-transformers-onnx": 34.6,
                 "sentence-transformers-onnx-int8": 56.2}

Encode = Callable[[list[str]], np.ndarray]


def sentence_transformers_batches(texts: list[str], batch_size: int) -> list[np.ndarray]:
    """Row indices per batch as sentence-transformers' encode makes them: longest texts, in
    characters, first."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(texts), batch_size)]


def padding(lengths: np.ndarray, batches: list[np.ndarray]) -> dict:
    """Tokens computed (each batch padded to its longest row) against real tokens."""
    real, computed = int(lengths.sum()), int(sum(len(rows) * lengths[rows].max() for rows in batches))
    return {"real_tokens": real, "computed_tokens": computed, "padding_share": 1 - real / computed}


def _pytorch_encoder(context: BenchContext, batch_size: int) -> Encode:
    from resrank_export.model.reference import ResRankReference

    return partial(ResRankReference(context.checkpoint).encode, batch_size=batch_size)


def onnx_encoder(graph: Path, context: BenchContext, batch_size: int) -> Encode:
    from resrank_export.runtime import ort_session

    return session_encoder(ort_session(graph, threads=context.threads), context, batch_size)


def session_encoder(session, context: BenchContext, batch_size: int) -> Encode:
    """Texts -> vectors through an ONNX Runtime or OpenVINO session of the encoder graph."""
    from resrank_export.model.reference import passage_tokenizer
    from resrank_export.runtime import encode_texts

    return partial(encode_texts, session, passage_tokenizer(context.checkpoint), batch_size=batch_size)


def sentence_transformer_folder(context: BenchContext, out: Path) -> Path:
    """The checkpoint's encoder as a sentence-transformers model folder with the same pooling,
    normalisation and truncation as the exported graph."""
    st = require("sentence_transformers", "the sentence-transformers encoder baseline")
    st_modules = require("sentence_transformers.models", "the sentence-transformers encoder baseline")
    ck = context.checkpoint
    transformer = st_modules.Transformer(str(ck.encoder_dir), max_seq_length=ck.config.max_passage_tokens)
    mode = {"mean": "mean", "cls": "cls", "last": "lasttoken"}[ck.config.pooling]
    modules = [transformer, st_modules.Pooling(ck.encoder_dim, pooling_mode=mode)]
    if ck.config.normalize:
        modules.append(st_modules.Normalize())
    st.SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def _st_encoder(folder: Path, batch_size: int, **kwargs) -> Encode:
    st = require("sentence_transformers", "the sentence-transformers encoder baseline")
    model = st.SentenceTransformer(str(folder), device="cpu", **kwargs)
    return lambda texts: model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                      show_progress_bar=False).astype(np.float32)


def _st_onnx_encoders(folder: Path, batch_size: int, cpu_flags: list[str]) -> dict[str, Encode | str]:
    """sentence-transformers' ONNX backend (FP32 and its dynamic INT8), or why not."""
    if importlib.util.find_spec("optimum") is None:
        reason = ("needs the 'optimum' package (pip install 'sentence-transformers[onnx]'), not installed here; "
                  "showing the published figure")
        return {"sentence-transformers-onnx": reason, "sentence-transformers-onnx-int8": reason}
    st = require("sentence_transformers", "the sentence-transformers ONNX backend")
    try:
        onnx_model = st.SentenceTransformer(str(folder), device="cpu", backend="onnx")
        onnx_model.save(str(folder))
        config = "avx512_vnni" if "avx512_vnni" in cpu_flags else "avx2"
        st.export_dynamic_quantized_onnx_model(onnx_model, config, str(folder))
        return {"sentence-transformers-onnx": _st_encoder(folder, batch_size, backend="onnx"),
                "sentence-transformers-onnx-int8": _st_encoder(
                    folder, batch_size, backend="onnx",
                    model_kwargs={"file_name": f"onnx/model_qint8_{config}.onnx"})}
    except Exception as exc:  # optimum/ST version mismatches surface as many exception types
        reason = f"sentence-transformers ONNX backend failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return {"sentence-transformers-onnx": reason, "sentence-transformers-onnx-int8": reason}


def dynamic_int8_graph(fp32_graph: Path, out: Path) -> Path:
    """ONNX Runtime dynamic INT8 of our FP32 graph: the quantization sentence-transformers'
    INT8 ONNX backend applies (via optimum), made without optimum."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_graph), str(out), weight_type=QuantType.QInt8)
    return out


LABELS = {
    "pytorch": "Hugging Face PyTorch eager (reference model)",
    "sentence-transformers": "sentence-transformers, PyTorch (baseline)",
    "sentence-transformers-onnx": "sentence-transformers, ONNX backend",
    "sentence-transformers-onnx-int8": "sentence-transformers, dynamic INT8 ONNX",
    "onnx-fp32": "exported graph, ONNX Runtime FP32",
    "onnx-fp32-fused": "exported graph, ONNX Runtime FP32, ORT-fused (--ort-optimize)",
    "onnx-fp16": "exported graph, ONNX Runtime FP16 (precision stage)",
    "onnx-int8": "exported graph, ONNX Runtime INT8 (precision stage, ModelOpt Q/DQ)",
    "onnx-int8-fused": "exported graph, ONNX Runtime INT8 (ModelOpt Q/DQ), ORT-fused (--ort-optimize)",
    "onnx-dynamic-int8": "exported graph, ONNX Runtime dynamic INT8 (quantize_dynamic)",
    "openvino-fp32": "exported graph, OpenVINO CPU, FP32",
    "openvino-fp32-as-bf16": "exported graph (FP32), OpenVINO CPU computing in BF16 (AMX / AVX512-BF16)",
    "openvino-int8": "INT8 graph (ModelOpt Q/DQ), OpenVINO CPU, INT8 GEMMs, other ops FP32",
    "openvino-int8-bf16": "INT8 graph (ModelOpt Q/DQ), OpenVINO CPU, INT8 GEMMs, other ops BF16",
}


def _encoders(config: BenchConfig, context: BenchContext, work: Path) -> dict[str, Encode | str]:
    """name -> encode function, or the reason it is not available; in report order."""
    batch = config.encoder_batch
    st_folder = sentence_transformer_folder(context, work / "sentence-transformers")
    encoders: dict[str, Encode | str] = {
        "pytorch": _pytorch_encoder(context, batch),
        "sentence-transformers": _st_encoder(st_folder, batch),
        **_st_onnx_encoders(st_folder, batch, context.machine["cpu_flags"]),
    }
    for suffix, precision, fused in GRAPH_VARIANTS:
        graph, reason = graph_file(context.build, precision, "encoder", fused)
        encoders[f"onnx-{suffix}"] = onnx_encoder(graph, context, batch) if graph else reason
    fp32_graph, reason = graph_file(context.build, "fp32", "encoder")
    encoders["onnx-dynamic-int8"] = (
        onnx_encoder(dynamic_int8_graph(fp32_graph, work / "encoder.int8-dynamic.onnx"), context, batch)
        if fp32_graph else reason)
    for suffix, precision, compute in OPENVINO_VARIANTS:
        session = openvino_session_or_reason(context.build, precision, "encoder", compute, context.threads)
        encoders[f"openvino-{suffix}"] = session if isinstance(session, str) else session_encoder(session, context, batch)
    return encoders


def bench_encoder(config: BenchConfig, context: BenchContext) -> dict:
    """Throughput of every encoder backend on the same passages; returns the result dict."""
    from resrank_export.model.reference import passage_tokenizer
    from resrank_export.runtime import length_batches

    texts = context.data.passages[:config.encoder_passages]
    lengths = passage_tokenizer(context.checkpoint)(texts)["attention_mask"].sum(1)
    batching = {"sentence-transformers (characters)": padding(lengths, sentence_transformers_batches(
                    texts, config.encoder_batch)),
                "graphs and reference (tokens)": padding(lengths, length_batches(lengths, config.encoder_batch))}
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="resrank-bench-encoder-") as tmp:
        for name, encode in _encoders(config, context, Path(tmp)).items():
            row = {"name": name, "label": LABELS[name], "reference_pps": REFERENCE_PPS.get(name)}
            if isinstance(encode, str):
                log.info("encoder %s: not available (%s)", name, encode)
                rows.append({**row, "status": "not available", "reason": encode})
                continue
            for _ in range(config.warmup):  # one batch warms every backend up
                encode(texts[:config.encoder_batch])
            timing, vectors = measure(lambda: encode(texts), 0, config.repeats)
            reference = vectors if reference is None else reference
            cosine = (vectors * reference).sum(1) / np.maximum(
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
            rows.append({**row, "status": "ok", "time": timing.to_json(),
                         "throughput_pps": len(texts) / timing.median_s,
                         "mean_cosine_vs_pytorch": float(cosine.mean()), "min_cosine_vs_pytorch": float(cosine.min())})
            log.info("encoder %s: %.1f passages/s", name, rows[-1]["throughput_pps"])
    baseline = next(r for r in rows if r["name"] == BASELINE)
    for row in rows:
        if row["status"] == "ok":
            row["ratio_vs_baseline"] = baseline["time"]["median_s"] / row["time"]["median_s"]
    return {"benchmark": "encoder", "baseline": BASELINE, "default_path": context.default_path,
            "default_row": context.default_path.get("row"), "passages": len(texts), "batch_size": config.encoder_batch,
            "max_tokens": context.checkpoint.config.max_passage_tokens, "data": context.data.source,
            "timed": "texts -> vectors, tokenization included; one run = all passages; warm-up = one batch",
            "batching": batching, "warmup": config.warmup, "repeats": config.repeats, "rows": rows}
