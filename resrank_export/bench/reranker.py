"""Reranker latency vs k: the exported one-token-per-passage graph (ONNX Runtime FP32, FP16,
INT8) and PyTorch eager of the same model, against the full-text listwise baseline: the same
backbone reading every candidate's text (each truncated to max_passage_tokens) in one forward
pass, the cost ResRank removes. Batch 1 (one request); graph inputs are prepared before the
clock starts, so only the forward pass is timed."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from resrank_export.bench.config import (GRAPH_VARIANTS, OPENVINO_VARIANTS, BenchConfig, BenchContext, graph_file,
                                         openvino_session_or_reason)
from resrank_export.bench.encoder import onnx_encoder
from resrank_export.bench.timing import Timing, measure
from resrank_export.model.text import PASSAGES_MARKER, QUERY_MARKER

log = logging.getLogger(__name__)
BASELINE = "fulltext-pytorch"
LABELS = {
    "resrank-pytorch": "ResRank, PyTorch eager (SDPA attention)",
    "resrank-onnx-fp32": "ResRank graph, ONNX Runtime FP32",
    "resrank-onnx-fp32-fused": "ResRank graph, ONNX Runtime FP32, ORT-fused",
    "resrank-onnx-fp16": "ResRank graph, ONNX Runtime FP16 (precision stage)",
    "resrank-onnx-int8": "ResRank graph, ONNX Runtime INT8 (precision stage)",
    "resrank-onnx-int8-fused": "ResRank graph, ONNX Runtime INT8, ORT-fused",
    "resrank-openvino-fp32": "ResRank graph, OpenVINO CPU, FP32",
    "resrank-openvino-fp32-as-bf16": "ResRank graph (FP32), OpenVINO CPU computing in BF16",
    "resrank-openvino-int8": "ResRank INT8 graph, OpenVINO CPU, INT8 GEMMs, other ops FP32",
    "resrank-openvino-int8-bf16": "ResRank INT8 graph, OpenVINO CPU, INT8 GEMMs, other ops BF16",
    "fulltext-pytorch": "full-text listwise, same backbone, PyTorch eager, SDPA (baseline)",
}
Score = Callable[[dict], np.ndarray]  # prepared inputs of one request -> scores [k]


def load_torch_backbone(model_dir):
    """The reranker backbone for both PyTorch rows, with PyTorch's fused attention (SDPA): the
    strongest PyTorch baseline for the long full-text prompts, and the same for ResRank."""
    import torch
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


class FullTextPrompts:
    """The listwise prompt with every candidate's text where ResRank puts one slot token, and
    the position of each passage's last token (its representation for scoring)."""

    def __init__(self, context: BenchContext):
        from resrank_export.model.reference import prompt_builder

        self.builder = prompt_builder(context.checkpoint)
        self.tokenizer = self.builder.tokenizer
        self.max_tokens = context.checkpoint.config.max_passage_tokens

    def truncate(self, text: str) -> str:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= self.max_tokens:
            return text
        return text[: encoding.offsets[self.max_tokens - 1][1]]

    def build(self, query: str, passages: list[str]) -> dict:
        before, after = self.builder.template.replace(QUERY_MARKER, self.builder.clean_query(query)) \
            .split(PASSAGES_MARKER)
        text, ends = before, []
        for number, passage in enumerate(passages, 1):
            text += f"{' ' if number > 1 else ''}[{number}] {self.truncate(passage)}"
            ends.append(len(text) - 1)
        encoding = self.tokenizer.encode(text + after)
        return {"input_ids": np.asarray([encoding.ids], dtype=np.int64),
                "passage_ends": np.asarray([[encoding.char_to_token(end) for end in ends]], dtype=np.int64)}


def _fulltext_scorer(backbone) -> Score:
    import torch

    from resrank_export.model.reference import _backbone_kwargs

    @torch.inference_mode()
    def score(inputs: dict) -> np.ndarray:
        ids = torch.from_numpy(inputs["input_ids"])
        hidden = backbone(input_ids=ids, attention_mask=torch.ones_like(ids),
                          **_backbone_kwargs(backbone)).last_hidden_state
        passages = hidden[0, torch.from_numpy(inputs["passage_ends"][0])]
        return torch.nn.functional.cosine_similarity(hidden[0, -1:], passages, dim=-1).numpy()

    return score


def _resrank_pytorch_scorer(context: BenchContext) -> Score:
    import torch

    from resrank_export.model.reference import load_reranker

    model = load_reranker(context.checkpoint)
    model.backbone = load_torch_backbone(context.checkpoint.reranker_dir)
    names = ("input_ids", "attention_mask", "passage_embeddings", "slot_positions")

    @torch.inference_mode()
    def score(inputs: dict) -> np.ndarray:
        return model(*(torch.from_numpy(inputs[n]) for n in names)).numpy()[0]

    return score


def _onnx_scorer(graph, threads: int) -> Score:
    from resrank_export.runtime import ort_session

    return _session_scorer(ort_session(graph, threads=threads))


def _session_scorer(session) -> Score:
    from resrank_export.runtime import run_session

    return lambda inputs: run_session(session, inputs)[0][0]


def _scorers(context: BenchContext) -> dict[str, Score | str]:
    scorers: dict[str, Score | str] = {"resrank-pytorch": _resrank_pytorch_scorer(context)}
    for suffix, precision, fused in GRAPH_VARIANTS:
        graph, reason = graph_file(context.build, precision, "reranker", fused)
        scorers[f"resrank-onnx-{suffix}"] = _onnx_scorer(graph, context.threads) if graph else reason
    for suffix, precision, compute in OPENVINO_VARIANTS:
        session = openvino_session_or_reason(context.build, precision, "reranker", compute, context.threads)
        scorers[f"resrank-openvino-{suffix}"] = session if isinstance(session, str) else _session_scorer(session)
    scorers[BASELINE] = _fulltext_scorer(load_torch_backbone(context.checkpoint.reranker_dir))
    return scorers


class Requests:
    """Prepared inputs per query at k: ResRank graph inputs (slot vectors from the FP32 encoder
    graph) and full-text prompts."""

    def __init__(self, config: BenchConfig, context: BenchContext):
        from resrank_export.model.reference import prompt_builder

        self.encode = onnx_encoder(graph_file(context.build, "fp32", "encoder")[0], context,
                                   config.encoder_batch)
        self.builder, self.fulltext = prompt_builder(context.checkpoint), FullTextPrompts(context)
        self.pairs = list(zip(context.data.queries[:config.reranker_queries], context.data.candidates))

    def at(self, k: int) -> dict[str, list[dict]]:
        resrank, full = [], []
        for query, candidates in self.pairs:
            inputs = self.builder.batch([query], k)
            inputs["passage_embeddings"] = self.encode(candidates[:k])[None]
            resrank.append(inputs)
            full.append(self.fulltext.build(query, candidates[:k]))
        return {"resrank": resrank, "fulltext": full}


def bench_reranker(config: BenchConfig, context: BenchContext) -> dict:
    """Latency of each backend at each k; returns the result dict."""
    ks = [k for k in config.reranker_ks if k <= context.checkpoint.config.max_candidates]
    skipped = sorted(set(config.reranker_ks) - set(ks))
    scorers, prepared = _scorers(context), Requests(config, context)
    rows = []
    for k in ks:
        requests = prepared.at(k)
        reference_scores = None
        for name, score in scorers.items():
            row = {"name": name, "label": LABELS[name], "k": k}
            if isinstance(score, str):
                rows.append({**row, "status": "not available", "reason": score})
                continue
            batch = requests["fulltext" if name == BASELINE else "resrank"]
            times, scores = [], []
            for inputs in batch:
                timing, result = measure(lambda: score(inputs), config.warmup, config.repeats)
                times.extend(timing.times_s)
                scores.append(result)
            row.update(status="ok", time=Timing(times).to_json(),
                       tokens=float(np.mean([inputs["input_ids"].shape[1] for inputs in batch])))
            if name != BASELINE:
                reference_scores = scores if reference_scores is None else reference_scores
                row["max_abs_score_diff_vs_pytorch"] = float(max(
                    np.abs(a - b).max() for a, b in zip(scores, reference_scores)))
            rows.append(row)
            log.info("reranker %s k=%d: %.2f ms, %d tokens", name, k, row["time"]["median_s"] * 1e3, row["tokens"])
        _add_ratios([r for r in rows if r["k"] == k])
    row = context.default_path.get("row")
    return {"benchmark": "reranker", "baseline": BASELINE, "default_path": context.default_path,
            "default_row": row and f"resrank-{row}", "ks": ks, "batch_size": 1,
            "queries": min(config.reranker_queries, len(context.data.queries)),
            "max_passage_tokens": context.checkpoint.config.max_passage_tokens, "data": context.data.source,
            "timed": "one forward pass on prepared inputs (tokenization and encoding excluded); "
                     "median over queries x repeats",
            "skipped_ks": {str(k): f"above max_candidates ({context.checkpoint.config.max_candidates})"
                           for k in skipped},
            "warmup": config.warmup, "repeats": config.repeats, "rows": rows}


def _add_ratios(rows: list[dict]) -> None:
    """Latency and token ratios of each row against the full-text baseline and ResRank PyTorch."""
    ok = {r["name"]: r for r in rows if r["status"] == "ok"}
    baseline, pytorch = ok[BASELINE], ok["resrank-pytorch"]
    for row in ok.values():
        row["latency_ratio_vs_fulltext"] = baseline["time"]["median_s"] / row["time"]["median_s"]
        row["latency_ratio_vs_pytorch"] = pytorch["time"]["median_s"] / row["time"]["median_s"]
        row["token_ratio_vs_fulltext"] = baseline["tokens"] / row["tokens"]
