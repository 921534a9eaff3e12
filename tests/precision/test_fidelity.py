"""Precision gates on real data (CI subsample, documented in docs/precision.md): the demo
checkpoint's FP16/INT8 graphs against its FP32 graphs on ONNX Runtime CPU.

Subsample: SciFact, 100 seeded judged queries, corpus = every passage judged for them + 200
seeded others; DL19 BM25 top-100 lists of 6 queries. Full-corpus figures are in
docs/fidelity-report.md."""

from __future__ import annotations

import pytest

from resrank_export.precision.calibration import CalibrationConfig
from resrank_export.precision.fidelity import FidelityConfig, render_markdown
from resrank_export.precision.graphs import PrecisionConfig
from resrank_export.precision.stages import compare_precisions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(demo_export, scifact_dir, dl19_dir, tmp_path_factory):
    checkpoint, graphs = demo_export
    config = FidelityConfig(retrieval_data=scifact_dir, rerank_data=dl19_dir, retrieval_queries=100,
                            retrieval_other_docs=200, rerank_queries=6)
    result = compare_precisions(checkpoint, graphs, tmp_path_factory.mktemp("fidelity"),
                                CalibrationConfig(corpus=dl19_dir, encoder_samples=64, reranker_queries=16),
                                PrecisionConfig(), config)
    print(render_markdown(result))
    return result


def test_encoder_fp16_keeps_ndcg(report):
    encoder = report["encoder"]["precisions"]
    assert abs(encoder["fp16"]["ndcg@10"] - encoder["fp32"]["ndcg@10"]) <= 0.002


def test_encoder_int8_keeps_ndcg(report):
    encoder = report["encoder"]["precisions"]
    assert abs(encoder["int8"]["ndcg@10"] - encoder["fp32"]["ndcg@10"]) <= 0.005


def test_encoder_int8_keeps_min_embedding_cosine(report):
    assert report["encoder"]["precisions"]["int8"]["min_cosine"] >= 0.99


def test_reranker_fp16_keeps_order(report):
    assert report["reranker"]["precisions"]["fp16"]["kendall_tau"] >= 0.98


def test_report_compares_against_fp32_itself(report):
    """The FP32 row is the reference: identical by construction; INT8 must differ from it."""
    fp32 = report["reranker"]["precisions"]["fp32"]
    assert fp32["kendall_tau"] == 1.0 and fp32["score_mae"] == 0.0
    assert report["reranker"]["precisions"]["int8"]["score_mae"] > 0


def test_markdown_lists_what_each_conversion_kept_fp32(report):
    markdown = render_markdown(report)
    kept = report["conversions"]["fp16/reranker"]["nodes"]["fp32"]
    assert kept.get("Softmax") and f"Softmax {kept['Softmax']}" in markdown.split("- fp16/reranker:")[1].splitlines()[0]
    assert "- int8/encoder:" in markdown and "SmoothQuant α 0.5" in markdown
