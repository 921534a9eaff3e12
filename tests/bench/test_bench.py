"""Benchmarks in their smoke preset: structure, and every ratio/throughput consistent with the
timings recorded beside it. Speed is never asserted."""

from __future__ import annotations

import importlib.util
import json
import statistics

import numpy as np
import pytest

from resrank_export.bench.config import BenchConfig, BenchContext, load_bench_data
from resrank_export.bench.timing import apply_threads, machine_info, measure, percentile

SMOKE = BenchConfig.smoke()


def _close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-9)


@pytest.fixture(scope="module")
def context(demo_export):
    checkpoint, graphs = demo_export
    k = max(*SMOKE.reranker_ks, SMOKE.served_top_k)
    data = load_bench_data(None, max(SMOKE.encoder_passages, SMOKE.served_passages), SMOKE.reranker_queries, k)
    return BenchContext(graphs["encoder"].parents[2], checkpoint, data, machine_info(apply_threads(0)))


def _check_timing(row: dict, repeats: int) -> None:
    assert len(row["time"]["times_s"]) == repeats
    assert _close(row["time"]["median_s"], statistics.median(row["time"]["times_s"]))


def test_measure_runs_warmup_then_repeats_and_returns_last_result():
    calls = []
    timing, result = measure(lambda: calls.append(len(calls)) or len(calls), warmup=2, repeats=3)
    assert len(calls) == 5 and result == 5
    assert len(timing.times_s) == 3 and timing.median_s == statistics.median(timing.times_s)


def test_percentile_matches_numpy():
    values = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_dl19_data_follows_the_run_file(dl19_dir):
    from resrank_export.data.readers import iter_passages, read_queries, read_trec_run

    data = load_bench_data(dl19_dir, passages=5, queries=2, k=3)
    run, queries = read_trec_run(dl19_dir / "run.bm25.trec"), read_queries(dl19_dir)
    texts = {p.id: p.text for p in iter_passages(dl19_dir)}
    qids = sorted(q for q in run if q in queries)[:2]
    assert data.queries == [queries[q] for q in qids]
    assert data.candidates == [[texts[d] for d in run[q][:3]] for q in qids]
    assert data.passages == list(texts.values())[:5]


def test_encoder_benchmark_smoke(context):
    from resrank_export.bench.encoder import BASELINE, LABELS, bench_encoder, sentence_transformers_batches
    from resrank_export.model.reference import passage_tokenizer
    from resrank_export.runtime import length_batches

    result = bench_encoder(SMOKE, context)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == list(LABELS)
    baseline = rows[BASELINE]
    for row in rows.values():
        if row["status"] != "ok":
            assert row["reason"]
            continue
        _check_timing(row, SMOKE.repeats)
        assert _close(row["throughput_pps"], result["passages"] / row["time"]["median_s"])
        assert _close(row["ratio_vs_baseline"], baseline["time"]["median_s"] / row["time"]["median_s"])
    # Each library batches its own way: sentence-transformers by characters, ours by tokens.
    lengths = passage_tokenizer(context.checkpoint)(context.data.passages[:result["passages"]])["attention_mask"].sum(1)
    for how, batches in (("sentence-transformers (characters)", sentence_transformers_batches(
            context.data.passages[:result["passages"]], SMOKE.encoder_batch)),
            ("graphs and reference (tokens)", length_batches(lengths, SMOKE.encoder_batch))):
        counts = result["batching"][how]
        assert counts["real_tokens"] == lengths.sum()
        assert counts["computed_tokens"] == sum(len(rows) * lengths[rows].max() for rows in batches)
    # The FP32 graph and sentence-transformers compute the reference model's vectors.
    assert rows["onnx-fp32"]["mean_cosine_vs_pytorch"] > 0.99999
    assert rows[BASELINE]["mean_cosine_vs_pytorch"] > 0.99999
    has_optimum = importlib.util.find_spec("optimum") is not None
    assert (rows["sentence-transformers-onnx"]["status"] == "ok") == has_optimum
    for precision in ("fp16", "int8"):
        present = (context.build / "onnx" / precision / "encoder.onnx").is_file()
        assert (rows[f"onnx-{precision}"]["status"] == "ok") == present
    for row in rows.values():
        if row["status"] == "ok":
            assert row["min_cosine_vs_pytorch"] <= row["mean_cosine_vs_pytorch"]
    # OpenVINO rows: the FP32 graph computed in FP32 is the reference model; in BF16 close to it.
    has_openvino = importlib.util.find_spec("openvino") is not None
    assert (rows["openvino-fp32"]["status"] == "ok") == has_openvino, rows["openvino-fp32"].get("reason")
    if has_openvino:
        assert rows["openvino-fp32"]["min_cosine_vs_pytorch"] > 0.99999
        assert rows["openvino-fp32-as-bf16"]["min_cosine_vs_pytorch"] > 0.999


def test_sentence_transformers_batches_follow_its_encode_order():
    """Longest texts in characters first, ties in input order: sentence-transformers' own sort."""
    from resrank_export.bench.encoder import padding, sentence_transformers_batches

    texts = ["bb", "a", "dddd", "cc", "eee"]
    assert [b.tolist() for b in sentence_transformers_batches(texts, 2)] == [[2, 4], [0, 3], [1]]
    counts = padding(np.array([2, 1, 4, 2, 3]), [np.array([2, 4]), np.array([0, 1, 3])])
    assert counts == {"real_tokens": 12, "computed_tokens": 14, "padding_share": 1 - 12 / 14}


def test_fulltext_prompt_holds_each_truncated_passage(context):
    from resrank_export.bench.reranker import FullTextPrompts

    prompts = FullTextPrompts(context)
    passages = ["alpha beta gamma", "delta " * 400 + "omega"]
    inputs = prompts.build("which letter", passages)
    ids, ends = inputs["input_ids"][0].tolist(), inputs["passage_ends"][0].tolist()
    tokenizer = prompts.tokenizer
    assert tokenizer.decode([ids[ends[0]]]) == "gamma"
    second = ids[ends[0] + 1:ends[1] + 1]
    # "[2]" marker, then the passage cut at max_passage_tokens tokens: "omega" is gone.
    assert second.count(tokenizer.token_to_id("delta")) == prompts.max_tokens
    assert tokenizer.token_to_id("omega") not in ids


def test_reranker_benchmark_smoke(context):
    from resrank_export.bench.reranker import BASELINE, bench_reranker
    from resrank_export.model.reference import prompt_builder

    result = bench_reranker(SMOKE, context)
    assert result["ks"] == list(SMOKE.reranker_ks)
    builder = prompt_builder(context.checkpoint)
    for k in result["ks"]:
        rows = {r["name"]: r for r in result["rows"] if r["k"] == k}
        baseline, pytorch = rows[BASELINE], rows["resrank-pytorch"]
        expected_tokens = np.mean([len(builder.build(q, k).ids) for q in context.data.queries[:SMOKE.reranker_queries]])
        assert pytorch["tokens"] == expected_tokens
        assert baseline["tokens"] > pytorch["tokens"]
        for row in rows.values():
            if row["status"] != "ok":
                continue
            _check_timing(row, SMOKE.repeats * result["queries"])
            assert _close(row["latency_ratio_vs_fulltext"], baseline["time"]["median_s"] / row["time"]["median_s"])
            assert _close(row["latency_ratio_vs_pytorch"], pytorch["time"]["median_s"] / row["time"]["median_s"])
            assert _close(row["token_ratio_vs_fulltext"], baseline["tokens"] / row["tokens"])
        assert rows["resrank-onnx-fp32"]["max_abs_score_diff_vs_pytorch"] < 1e-4
        if importlib.util.find_spec("openvino") is not None:
            assert rows["resrank-openvino-fp32"]["max_abs_score_diff_vs_pytorch"] < 1e-4


def test_flop_formula_counts_the_models_matmul_weights(context):
    """The per-layer count from config.json equals the Linear weights inside the layers."""
    import torch
    from transformers import AutoModel

    from resrank_export.bench.flops import matmul_params_per_layer, transformer_shape

    for model_dir in (context.checkpoint.encoder_dir, context.checkpoint.reranker_dir):
        shape = transformer_shape(model_dir / "config.json")
        model = AutoModel.from_pretrained(model_dir)
        weights = sum(m.weight.numel() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".layer" in f".{name}")
        assert matmul_params_per_layer(shape) * shape["layers"] == weights


def test_flops_benchmark_uses_this_runs_timings(context):
    from resrank_export.bench.flops import bench_flops, forward_flops

    timing = {"median_s": 0.5, "times_s": [0.5]}
    results = {"encoder": {"passages": 10, "rows": [{"name": "onnx-fp32", "status": "ok", "time": timing}]},
               "reranker": {"rows": [{"name": "resrank-onnx-fp32", "status": "ok", "k": 4, "tokens": 40.0,
                                      "time": timing},
                                     {"name": "resrank-pytorch", "status": "ok", "k": 100, "tokens": 400.0,
                                      "time": {"median_s": 0.25, "times_s": [0.25]}}]}}
    result = bench_flops(SMOKE, context, results)
    peak, bf16 = result["peak"]["peak_gflops"], result["peak"]["bf16_gflops"]
    assert peak == max(result["peak"]["numpy_gflops"], result["peak"]["torch_gflops"])
    assert _close(bf16, result["peak"]["flops"] / result["peak"]["torch_bf16"]["median_s"] / 1e9)
    encoder_row = result["encoder"]["rows"][0]
    per_passage = result["encoder"]["flops_per_passage"]["total"]
    assert _close(encoder_row["achieved_gflops"], per_passage / (0.5 / 10) / 1e9)
    reranker_row, pytorch_row = result["reranker"]["rows"]
    assert reranker_row["flops_per_request"] == forward_flops(result["reranker"]["shape"], 40.0)
    assert _close(reranker_row["fraction_of_peak"], reranker_row["achieved_gflops"] / peak)
    assert _close(reranker_row["fraction_of_bf16_peak"], reranker_row["achieved_gflops"] / bf16)
    # The reranker goal (10x ResRank PyTorch at k = 100) as a rate to sustain against both peaks.
    goal = result["reranker"]["goal"]
    needed = forward_flops(result["reranker"]["shape"], 400.0)["total"] / (0.25 / 10) / 1e9
    assert _close(goal["needed_gflops"], needed)
    assert _close(goal["of_fp32_peak"], needed / peak) and _close(goal["of_bf16_peak"], needed / bf16)


@pytest.mark.slow
def test_served_benchmark_smoke(context):
    from resrank_export.bench.served import ENSEMBLES, bench_served, missing_pieces

    result = bench_served(SMOKE, context)
    missing = missing_pieces()
    if missing:
        assert result["status"] == "not available" and result["reason"] == "; ".join(missing)
        return
    assert result["status"] == "ok", result.get("reason")
    first = str(SMOKE.served_batch_sizes[0])
    for ensemble in ENSEMBLES:
        assert result["in_process"][ensemble]["requests"] == SMOKE.served_level_requests(1)
        for batch in map(str, SMOKE.served_batch_sizes):
            for concurrency in map(str, SMOKE.served_concurrency):
                stats = result["served"][batch][ensemble][concurrency]
                assert stats["requests"] == SMOKE.served_level_requests(int(concurrency))
                assert stats["p50_s"] <= stats["p95_s"] <= stats["p99_s"]
                assert _close(stats["throughput_rps"], stats["requests"] / stats["wall_s"])
        assert _close(result["overhead_at_concurrency_1"][ensemble],
                      result["served"][first][ensemble]["1"]["p50_s"] / result["in_process"][ensemble]["p50_s"] - 1)


def test_run_bench_writes_what_it_returns(context, tmp_path):
    from resrank_export.bench.run import run_bench

    out = tmp_path / "results"
    config = BenchConfig.smoke(out=out, build=context.build, checkpoint=context.checkpoint.root, only=("flops",))
    results = run_bench(config)
    written = json.loads((out / "flops.json").read_text())
    assert written.pop("machine") == json.loads((out / "machine.json").read_text())
    assert written == json.loads(json.dumps(results["flops"]))
    summary = (out / "summary.md").read_text()
    assert f"{results['flops']['peak']['peak_gflops']:.1f} GFLOP/s" in summary
    assert f"bfloat16 (torch): {results['flops']['peak']['bf16_gflops']:.1f} GFLOP/s" in summary


def test_bench_refuses_a_folder_it_did_not_write(tmp_path):
    from click.testing import CliRunner

    from resrank_export.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["bench", "--smoke", "--out", str(tmp_path), "--only", "flops"])
    assert result.exit_code == 1
    assert "is not a benchmark results folder" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
    result = CliRunner().invoke(main, ["bench", "--smoke", "--out", str(tmp_path / "x"), "--only", "flops,speed"])
    assert result.exit_code == 1 and "--only speed" in result.output


def test_goals_name_the_best_row_and_count_int8_only_at_its_fidelity():
    from resrank_export.bench.report import goals

    def row(name, ratio, low=1.0):
        return {"name": name, "status": "ok", "ratio_vs_baseline": ratio, "mean_cosine_vs_pytorch": 1.0,
                "min_cosine_vs_pytorch": low, "time": {"median_s": 1 / ratio}}

    encoder = {"rows": [row("sentence-transformers", 1.0), row("onnx-fp32-fused", 1.1), row("openvino-fp32", 1.35),
                        row("onnx-int8", 2.5, 0.995), row("openvino-int8-bf16", 3.3, 0.98)]}
    reranker = {"rows": [{"name": n, "status": "ok", "k": 100, "latency_ratio_vs_pytorch": p,
                          "latency_ratio_vs_fulltext": f} for n, p, f in
                         (("resrank-onnx-fp32", 0.9, 47.0), ("resrank-openvino-int8-bf16", 3.0, 165.0))]}
    served = {"status": "ok", "served": {"8": {"search": {"16": {"throughput_rps": 60.0}}}}}
    lines = "\n".join(goals({"encoder": encoder, "reranker": reranker, "served": served}))
    assert "encoder FP32 arithmetic (ORT-fused or OpenVINO f32) ≥ 1.3× sentence-transformers PyTorch " \
           "(best: openvino-fp32): 1.35× — met" in lines
    # 3.3x at min cosine 0.98 does not count: the best INT8 row at its fidelity is onnx-int8
    assert "encoder INT8 with min cosine ≥ 0.99 ≥ 3× sentence-transformers PyTorch (best: onnx-int8): 2.50× — not met" in lines
    assert "encoder INT8 with min cosine ≥ 0.99 ≥ 2× sentence-transformers PyTorch (best: onnx-int8): 2.50× — met" in lines
    assert "lower latency than ResRank PyTorch eager (best: resrank-openvino-int8-bf16): 3.0× — not met" in lines
    assert "lower latency than full-text listwise (best: resrank-openvino-int8-bf16): 165.0× — met" in lines
    assert "16 clients, max batch 8 ≥ 1.5 × 33.8 req/s (issue 15's figure, measured on another machine; " \
           "compare runs of the same machine): 60.0 req/s — met" in lines


def test_summary_puts_the_default_path_first_beside_the_best_row():
    from resrank_export.bench.report import _encoder_section

    def row(name, pps):
        return {"name": name, "label": name, "status": "ok", "throughput_pps": pps, "ratio_vs_baseline": pps / 10,
                "mean_cosine_vs_pytorch": 1.0, "min_cosine_vs_pytorch": 1.0, "reference_pps": None}

    result = {"passages": 8, "batch_size": 4, "max_tokens": 64, "data": "d", "timed": "t", "repeats": 2,
              "batching": {}, "rows": [row("sentence-transformers", 10.0), row("onnx-fp32", 9.7),
                                       row("openvino-fp32-as-bf16", 46.2)],
              "default_path": {"runtime": "onnxruntime", "compute": "f32", "reason": "onnxruntime/f32: why"},
              "default_row": "onnx-fp32"}
    lines = _encoder_section(result)
    table = [line for line in lines if line.startswith("| ") and "passages/s" not in line]
    assert table[0].startswith("| **default path:** onnx-fp32 | 9.7 |")
    assert [line.split(" | ")[0] for line in table[1:]] == ["| sentence-transformers", "| openvino-fp32-as-bf16"]
    assert ("Default path (no runtime flags): onnxruntime/f32: why. Default row: onnx-fp32 9.70 "
            "passages/s; best row: openvino-fp32-as-bf16 46.20 passages/s (default / best = 0.21).") in lines
