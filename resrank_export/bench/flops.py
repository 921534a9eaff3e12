"""Physical limit: FLOPs per request from the model configs (2 x matmul parameters x tokens,
plus the attention score and weighted-sum terms), the achieved GFLOP/s of the encoder and
reranker rows timed in the same run, and the machine's matrix-multiply peaks measured now: float32
(numpy and torch) and bfloat16 (torch; AMX / AVX512-BF16 where the CPU has them), the ceilings of
FP32 kernels and of BF16 / INT8 ones. Embedding lookups, norms and softmax are left out: they
are small and not matmuls."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from resrank_export.bench.config import BenchConfig, BenchContext
from resrank_export.bench.timing import measure
from resrank_export.errors import CheckpointError

log = logging.getLogger(__name__)
# Families whose MLP is gated (gate, up, down projections: three matrices instead of two).
GATED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")


def transformer_shape(config_file: Path) -> dict:
    """The sizes the FLOP count needs, from a Hugging Face config.json."""
    cfg = json.loads(Path(config_file).read_text())
    try:
        d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        shape = {"model_type": cfg.get("model_type", "unknown"), "hidden": d, "layers": int(cfg["num_hidden_layers"]),
                 "heads": heads, "head_dim": int(cfg.get("head_dim") or d // heads),
                 "kv_heads": int(cfg.get("num_key_value_heads") or heads),
                 "intermediate": int(cfg["intermediate_size"])}
    except KeyError as exc:
        raise CheckpointError(f"{config_file}: field {exc.args[0]!r} missing; the FLOP count needs it") from None
    shape["gated_mlp"] = shape["model_type"] in GATED_MODEL_TYPES or cfg.get("hidden_act") in ("silu", "swiglu")
    return shape


def matmul_params_per_layer(shape: dict) -> int:
    d, q_width, kv_width = shape["hidden"], shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    attention = 2 * d * q_width + 2 * d * kv_width  # Q and O; K and V (grouped-query heads)
    mlp = (3 if shape["gated_mlp"] else 2) * d * shape["intermediate"]
    return attention + mlp


def forward_flops(shape: dict, tokens: float) -> dict:
    """FLOPs of one sequence of `tokens` tokens: linear layers and attention (QK^T and AV over
    the full square, as the kernels compute it)."""
    linear = 2 * shape["layers"] * matmul_params_per_layer(shape) * tokens
    attention = 4 * shape["layers"] * shape["heads"] * shape["head_dim"] * tokens ** 2
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def matmul_peak(size: int, warmup: int, repeats: int) -> dict:
    """float32 square matmul GFLOP/s with numpy and torch (the peak is the better of the two), and
    bfloat16 with torch. At least 3 warm-up and 10 timed products each: with 1 and 3, AMX's BF16
    product measured 1.35 TFLOP/s in one run and 2.1 in the next on a quiet machine."""
    import torch

    warmup, repeats = max(warmup, 3), max(repeats, 10)

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2.0 * size ** 3
    numpy_timing, _ = measure(lambda: a @ b, warmup, repeats)
    torch_timing, _ = measure(lambda: torch.mm(ta, tb), warmup, repeats)
    ta, tb = ta.bfloat16(), tb.bfloat16()
    bf16_timing, _ = measure(lambda: torch.mm(ta, tb), warmup, repeats)
    result = {"size": size, "flops": flops, "numpy": numpy_timing.to_json(), "torch": torch_timing.to_json(),
              "torch_bf16": bf16_timing.to_json(), "numpy_gflops": flops / numpy_timing.median_s / 1e9,
              "torch_gflops": flops / torch_timing.median_s / 1e9, "bf16_gflops": flops / bf16_timing.median_s / 1e9}
    result["peak_gflops"] = max(result["numpy_gflops"], result["torch_gflops"])
    return result


def _achieved(flops: float, seconds: float, peak: dict) -> dict:
    gflops = flops / seconds / 1e9
    return {"achieved_gflops": gflops, "fraction_of_peak": gflops / peak["peak_gflops"],
            "fraction_of_bf16_peak": gflops / peak["bf16_gflops"]}


def reranker_goal(rows: list[dict], peak: dict, k: int = 100, ratio: float = 10.0) -> dict | None:
    """What a graph `ratio` times faster than ResRank PyTorch at `k` candidates would have to
    sustain, against the measured peaks (issue 15's reranker goal)."""
    pytorch = next((r for r in rows if r["name"] == "resrank-pytorch" and r["k"] == k), None)
    if pytorch is None:
        return None
    needed = pytorch["achieved_gflops"] * ratio
    return {"k": k, "ratio": ratio, "needed_gflops": needed, "of_fp32_peak": needed / peak["peak_gflops"],
            "of_bf16_peak": needed / peak["bf16_gflops"]}


def bench_flops(config: BenchConfig, context: BenchContext, results: dict[str, dict]) -> dict:
    """FLOPs per request and achieved GFLOP/s of the rows in `results` (this run's encoder and
    reranker benchmarks); returns the result dict."""
    from resrank_export.model.reference import passage_tokenizer

    ck = context.checkpoint
    encoder_shape = transformer_shape(ck.encoder_dir / "config.json")
    reranker_shape = transformer_shape(ck.reranker_dir / "config.json")
    peak = matmul_peak(config.matmul_size, config.warmup, config.repeats)
    lengths = passage_tokenizer(ck).lengths(context.data.passages[:config.encoder_passages])
    per_passage = {key: float(np.mean([forward_flops(encoder_shape, n)[key] for n in lengths]))
                   for key in ("linear", "attention", "total")}
    encoder = {"shape": encoder_shape, "mean_tokens": float(np.mean(lengths)), "flops_per_passage": per_passage,
               "rows": []}
    if "encoder" in results:
        for row in results["encoder"]["rows"]:
            if row["status"] == "ok":
                seconds = row["time"]["median_s"] / results["encoder"]["passages"]
                encoder["rows"].append({"name": row["name"], **_achieved(per_passage["total"], seconds, peak)})
    else:
        encoder["note"] = "encoder benchmark not in this run: no achieved figures"
    reranker = {"shape": reranker_shape, "rows": []}
    if "reranker" in results:
        for row in results["reranker"]["rows"]:
            if row["status"] == "ok":
                flops = forward_flops(reranker_shape, row["tokens"])
                reranker["rows"].append({"name": row["name"], "k": row["k"], "tokens": row["tokens"],
                                         "flops_per_request": flops,
                                         **_achieved(flops["total"], row["time"]["median_s"], peak)})
        reranker["goal"] = reranker_goal(reranker["rows"], peak)
    else:
        reranker["note"] = "reranker benchmark not in this run: no achieved figures"
    return {"benchmark": "flops", "peak": peak, "encoder": encoder, "reranker": reranker,
            "method": "2 x matmul params x tokens + 4 x layers x heads x head_dim x tokens^2 per sequence; "
                      "reranker tokens are the mean prompt length of the timed requests"}
