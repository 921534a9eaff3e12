"""How much FP16/INT8 graphs change what the model returns, measured against the FP32 graphs on
ONNX Runtime CPU with real text: embedding cosines and exact-search nDCG@10 for the encoder
(a BEIR folder with qrels, e.g. SciFact), Kendall tau / top-10 overlap / score error for the
reranker on BM25 candidate lists (a BEIR folder with a TREC run, e.g. DL19)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resrank_export.data.evaluation import is_beir_folder, ndcg_at_10
from resrank_export.data.readers import iter_passages, read_qrels, read_queries
from resrank_export.errors import ResRankExportError
from resrank_export.export.parity import ParityConfig, _row_cosine, _top10, load_parity_data
from resrank_export.lazy import require
from resrank_export.model.checkpoint import Checkpoint, scaled_sample_size
from resrank_export.model.reference import passage_tokenizer, prompt_builder
from resrank_export.precision import HALF_PRECISIONS, precision_row
from resrank_export.runtime import (CPU_RUNTIMES, OPENVINO_COMPUTE, OpenVINOSession, encode_texts, graph_session,
                                    ort_session, path_name, run_session)

log = logging.getLogger(__name__)
RETRIEVAL_DEPTH = 100
EMBEDDED_PASSAGES = 500  # texts of the embedded corpus compared when no retrieval data is given (demo size)


@dataclass(frozen=True)
class FidelityConfig:
    retrieval_data: Path | None = None  # BEIR folder with qrels/test.tsv (SciFact)
    rerank_data: Path | None = None  # BEIR folder with run.bm25.trec (DL19)
    retrieval_other_docs: int | None = None  # None: full corpus; N: judged docs + N seeded others
    retrieval_queries: int | None = None  # None: every judged query
    rerank_queries: int | None = None  # None: every query of the run (embedded corpus: fewer past 50M parameters)
    rerank_candidates: int = 100
    seed: int = 0
    batch_size: int = 32
    # what runs the compared precisions' graphs (FP32, the reference, always ONNX Runtime):
    # "onnxruntime", or "openvino" computing in `openvino_compute` (runtime.OpenVINOSession)
    runtime: str = "onnxruntime"
    openvino_compute: str = "f32"

    def __post_init__(self):
        if self.runtime not in CPU_RUNTIMES:
            raise ResRankExportError(f"fidelity runtime {self.runtime!r}: expected one of {', '.join(CPU_RUNTIMES)}")
        if self.openvino_compute not in OPENVINO_COMPUTE:
            raise ResRankExportError(f"fidelity OpenVINO compute {self.openvino_compute!r}: expected one of "
                                     f"{', '.join(OPENVINO_COMPUTE)}")

    def compared_session(self, precision: str, path: Path):
        if precision != "fp32" and self.runtime == "openvino":
            return OpenVINOSession(path, compute=self.openvino_compute)
        return graph_session(path)

    @property
    def cpu_path(self) -> str:
        """The served CPU path (runtime.path_name) the compared graphs ran on."""
        return path_name(self.runtime, self.openvino_compute if self.runtime == "openvino" else "f32")

    @property
    def runtime_label(self) -> str:
        return "ONNX Runtime CPU" if self.runtime == "onnxruntime" else f"OpenVINO CPU, {self.openvino_compute} compute"


def _retrieval_data(config: FidelityConfig) -> tuple[dict, dict[str, str], list[str], list[str], str]:
    """(qrels, queries, doc ids, doc texts, description): the BEIR folder, subsampled if asked."""
    folder = Path(config.retrieval_data)
    qrels = read_qrels(folder)
    queries = {q: t for q, t in read_queries(folder).items() if q in qrels}
    rng = np.random.default_rng(config.seed)
    if config.retrieval_queries is not None and config.retrieval_queries < len(queries):
        keep = sorted(rng.choice(sorted(queries), size=config.retrieval_queries, replace=False))
        queries = {q: queries[q] for q in keep}
    qrels = {q: qrels[q] for q in queries}
    corpus = {p.id: p.text for p in iter_passages(folder)}
    ids = sorted(corpus)
    description = f"{folder.name}: {len(queries)} judged queries, full corpus ({len(ids)} passages)"
    if config.retrieval_other_docs is not None:
        judged = {d for docs in qrels.values() for d in docs if d in corpus}
        others = sorted(set(ids) - judged)
        picked = rng.choice(others, size=min(config.retrieval_other_docs, len(others)), replace=False)
        ids = sorted(judged | set(picked.tolist()))
        description = (f"{folder.name}: {len(queries)} judged queries, subsample of {len(ids)} passages "
                       f"(every judged passage + {len(picked)} others, seed {config.seed})")
    return qrels, queries, ids, [corpus[i] for i in ids], description


def _encoder_fidelity(checkpoint: Checkpoint, encoders: dict[str, Path], config: FidelityConfig) -> dict:
    tokenizer = passage_tokenizer(checkpoint)
    if config.retrieval_data is None:
        from resrank_export.data.default_corpus import SAMPLE_QUERIES, stdlib_passages

        qrels, queries, ids = None, {f"q{i}": q for i, q in enumerate(SAMPLE_QUERIES)}, []
        texts = [p.text for p in stdlib_passages(limit=scaled_sample_size(EMBEDDED_PASSAGES, checkpoint, 64))]
        description = "embedded standard-library corpus (no retrieval data: cosines only)"
    else:
        qrels, queries, ids, texts, description = _retrieval_data(config)
    vectors = {}
    for precision, path in encoders.items():
        log.info("fidelity: encoding %d texts with the %s encoder", len(texts) + len(queries), precision)
        session = config.compared_session(precision, path)
        vectors[precision] = np.concatenate([encode_texts(session, tokenizer, texts, config.batch_size),
                                             encode_texts(session, tokenizer.queries, list(queries.values()),
                                                          config.batch_size)])
        del session  # one graph alive at a time: freed before the next precision's loads
    report = {"data": description, "texts": len(texts) + len(queries), "precisions": {}}
    for precision, emb in vectors.items():
        cosine = _row_cosine(vectors["fp32"], emb)
        entry = {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}
        if qrels is not None:
            docs, qv = emb[: len(texts)], emb[len(texts):]
            scores = qv @ docs.T
            top = np.argsort(-scores, axis=1, kind="stable")[:, :RETRIEVAL_DEPTH]
            run = {q: {ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(queries)}
            entry["ndcg@10"] = ndcg_at_10(qrels, run)
        report["precisions"][precision] = entry
    for entry in report["precisions"].values():
        if "ndcg@10" in entry:
            entry["ndcg@10_delta"] = entry["ndcg@10"] - report["precisions"]["fp32"]["ndcg@10"]
    return report


def _kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    stats = require("scipy.stats", "Kendall tau in the fidelity report")
    return float(stats.kendalltau(a, b).statistic)


def _reranker_fidelity(checkpoint: Checkpoint, graphs: dict[str, dict[str, Path]], config: FidelityConfig) -> dict:
    k = min(config.rerank_candidates, checkpoint.config.max_candidates)
    queries = config.rerank_queries
    if queries is None and config.rerank_data is None:
        from resrank_export.data.default_corpus import SAMPLE_QUERIES

        queries = scaled_sample_size(len(SAMPLE_QUERIES), checkpoint, 2)
    data = load_parity_data(ParityConfig(data_dir=config.rerank_data, queries=queries or 10**9), k)
    encoder = ort_session(graphs["fp32"]["encoder"])
    texts = [t for cands in data.candidates for t in cands]
    slots = encode_texts(encoder, passage_tokenizer(checkpoint), texts, config.batch_size).reshape(len(data.queries), k, -1)
    del encoder  # freed before the rerankers load
    builder = prompt_builder(checkpoint)
    scores = {}
    for precision, paths in graphs.items():
        log.info("fidelity: reranking %d queries x %d candidates with the %s reranker", len(data.queries), k, precision)
        session = config.compared_session(precision, paths["reranker"])
        rows = []
        for i, query in enumerate(data.queries):
            inputs = builder.batch([query], k)
            inputs["passage_embeddings"] = slots[i:i + 1]
            rows.append(run_session(session, inputs)[0][0])
        scores[precision] = np.stack(rows)
        del session
    report = {"data": data.source, "queries": len(data.queries), "candidates": k, "precisions": {}}
    qrels = _rerank_qrels(config, data)
    for precision, got in scores.items():
        ref = scores["fp32"]
        identical, overlap = _top10(ref, got)
        entry = report["precisions"][precision] = {
            "kendall_tau": float(np.mean([_kendall_tau(r, g) for r, g in zip(ref, got)])),
            "top10_overlap": overlap, "top10_identical": identical,
            "score_mae": float(np.abs(ref - got).mean()), "score_max_abs_diff": float(np.abs(ref - got).max())}
        if qrels:
            run = {q: dict(zip(ids, map(float, row))) for q, ids, row in zip(data.query_ids, data.candidate_ids, got)}
            entry["ndcg@10"] = ndcg_at_10(qrels, run)
            entry["ndcg@10_delta"] = entry["ndcg@10"] - report["precisions"]["fp32"]["ndcg@10"]
    if qrels:
        report["judged_queries"] = len(qrels)
    return report


def _rerank_qrels(config: FidelityConfig, data) -> dict:
    """Judgements of the reranked queries when the rerank data has them (DL19: qrels/test.tsv)."""
    if data.query_ids is None or not is_beir_folder(config.rerank_data):
        return {}
    qrels = read_qrels(config.rerank_data)
    return {q: qrels[q] for q in data.query_ids if q in qrels}


def measure_fidelity(checkpoint: Checkpoint, graphs: dict[str, dict[str, Path]], config: FidelityConfig) -> dict:
    """`graphs`: {precision: {"encoder": path, "reranker": path}}, "fp32" included."""
    report = {
        "encoder": _encoder_fidelity(checkpoint, {p: g["encoder"] for p, g in graphs.items()}, config),
        "reranker": _reranker_fidelity(checkpoint, graphs, config),
        "runtime": config.runtime_label,
        "cpu_path": config.cpu_path,  # what `auto` may serve these graphs on, if their gates pass
    }
    report["gates"] = {p: gate_checks(report, p) for p in graphs if p != "fp32"}
    return report


def gate_checks(report: dict, precision: str) -> list[dict]:
    """The precision table's fidelity gates of `precision` against the measured report: one entry
    per gate the data allows (nDCG only with retrieval data), each with its limit, value and verdict."""
    row = precision_row(precision)
    encoder = report["encoder"]["precisions"][precision]
    reranker = report["reranker"]["precisions"][precision]
    checks = [("encoder min cosine", row.min_cosine, encoder["min_cosine"], "min"),
              ("encoder nDCG@10 drop", row.max_ndcg_drop, -encoder["ndcg@10_delta"] if "ndcg@10_delta" in encoder
               else None, "max"),
              ("reranker Kendall tau", row.min_kendall_tau, reranker["kendall_tau"], "min"),
              ("reranker nDCG@10 drop", row.max_rerank_ndcg_drop,
               -reranker["ndcg@10_delta"] if "ndcg@10_delta" in reranker else None, "max")]
    return [{"gate": name, "kind": kind, "limit": limit, "value": value,
             "passed": bool(value >= limit if kind == "min" else value <= limit)}
            for name, limit, value, kind in checks if limit is not None and value is not None]


def failed_gates(report: dict) -> list[str]:
    """One line per failed gate of a fidelity report, e.g. "int4_awq: encoder min cosine 0.93 < 0.95"."""
    return [f"{precision}: {c['gate']} {c['value']:.4f} {'<' if c['kind'] == 'min' else '>'} {c['limit']}"
            for precision, checks in report.get("gates", {}).items() for c in checks if not c["passed"]]


def _ndcg_cells(entry: dict) -> str:
    """"| nDCG@10 | Δ vs FP32" cells of a report row ("–" where the data had no judgements)."""
    ndcg = f"{entry['ndcg@10']:.4f}" if "ndcg@10" in entry else "–"
    delta = f"{entry['ndcg@10_delta']:+.4f}" if "ndcg@10_delta" in entry else "–"
    return f"| {ndcg} | {delta} "


def render_markdown(report: dict, title: str | None = None) -> str:
    enc, rr = report["encoder"], report["reranker"]
    runtime = report.get("runtime", "ONNX Runtime CPU")  # reports written before it was recorded: ORT
    title = f"{title} ({runtime})" if title else f"Precision fidelity vs FP32 ({runtime})"
    lines = [f"# {title}", "", f"## Encoder\n\nData: {enc['data']} ({enc['texts']} texts embedded).", "",
             "| precision | nDCG@10 | Δ vs FP32 | mean cosine | min cosine |", "|---|---|---|---|---|"]
    for precision, e in enc["precisions"].items():
        lines.append(f"| {precision} {_ndcg_cells(e)}| {e['mean_cosine']:.6f} | {e['min_cosine']:.6f} |")
    lines += ["", f"## Reranker\n\nData: {rr['data']}; {rr['queries']} queries x {rr['candidates']} candidates "
              "(slot vectors from the FP32 encoder).", "",
              "| precision | nDCG@10 | Δ vs FP32 | Kendall τ | top-10 overlap | top-10 identical | score MAE "
              "| max abs diff |", "|---|---|---|---|---|---|---|---|"]
    for precision, r in rr["precisions"].items():
        lines.append(f"| {precision} {_ndcg_cells(r)}| {r['kendall_tau']:.4f} | {r['top10_overlap']:.3f} "
                     f"| {r['top10_identical']:.3f} | {r['score_mae']:.2e} | {r['score_max_abs_diff']:.2e} |")
    if report.get("gates"):
        lines += ["", "## Gates (the precision table's, against FP32)", "", "| precision | gate | limit | value | |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p} | {c['gate']} | {c['limit']} | {c['value']:.4f} | {'passed' if c['passed'] else 'FAILED'} |"
                  for p, checks in report["gates"].items() for c in checks]
    if report.get("conversions"):
        lines += ["", "## What each conversion kept in FP32", ""]
        lines += [f"- {name}: {_conversion_summary(c)}" for name, c in report["conversions"].items()]
    return "\n".join(lines) + "\n"


def _conversion_summary(conversion: dict) -> str:
    """One line from a convert_half / quantize_int8 / quantize_weight_only / quantize_fp8 report."""
    if "nodes" in conversion:  # FP16 / BF16
        kept = ", ".join(f"{op} {n}" for op, n in conversion["nodes"]["fp32"].items()) or "nothing"
        half = {p: sum(conversion["nodes"].get(p, {}).values()) for p in HALF_PRECISIONS}
        made = "; ".join(f"{n} nodes {p.upper()}" for p, n in half.items() if n) or "no half-precision node"
        return f"{made}; FP32 kept: {kept}"
    if "bits" in conversion:  # weight-only
        block = f"blocks of {conversion['block_size']}" if conversion["block_size"] else "per output channel"
        awq = (f"AWQ on {conversion['awq_tokens']} rows per input (alphas {conversion['awq_alphas']})"
               if conversion["awq_alphas"] else "round to nearest")
        return (f"{conversion['gemms']} GEMM weights INT{conversion['bits']} {block}, {awq}; "
                f"{conversion['int8_per_channel_gemms']} FFN down-projections INT8; activations FP32; "
                f"embedding table {conversion['embedding']} ({len(conversion['embedding_tables'])})")
    if conversion.get("weights") == "fp8":
        return (f"{conversion['quantize_nodes']} FP8 Q/DQ pairs on GEMM inputs ({conversion['method']}, "
                f"{conversion['samples']} samples), FP8 weights; the rest {conversion['high_precision'].upper()}; "
                f"attention GEMMs {'FP8' if conversion['attention_qdq'] else conversion['high_precision'].upper()}; "
                f"embedding table FP16 "
                f"({len(conversion['embedding_tables'])}); exclusions: "
                f"{', '.join(conversion['exclude_ops'] + conversion['exclude_nodes']) or 'none'}")
    smooth = conversion.get("smoothquant")
    smooth_text = (f"SmoothQuant α {smooth['alpha']} on {smooth['gemms']} GEMMs ({smooth['inputs']} inputs)"
                   if smooth else "no SmoothQuant")
    return (f"{conversion['quantize_nodes']} Q/DQ pairs ({conversion['method']}, {conversion['samples']} samples); "
            f"{smooth_text}; FFN down-projections with FP32 activations (INT8 weight-only): "
            f"{len(conversion['ffn_output_gemms_kept_fp32'])}; "
            f"attention GEMMs {'INT8' if conversion['attention_qdq'] else 'FP32'}; exclusions: "
            f"{', '.join(conversion['exclude_ops'] + conversion['exclude_nodes']) or 'none'}")
