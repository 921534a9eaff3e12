"""Rendering: results/<benchmark>.json, results/machine.json, results/summary.md and PNG plots
(reranker latency vs k, served throughput vs concurrency, encoder throughput), all from the
result dicts. Goals are reported, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

from resrank_export.bench.encoder import REFERENCE_PPS
from resrank_export.lazy import require

SUMMARY_FILE = "summary.md"
FP32_ARITHMETIC_ROWS = ("onnx-fp32-fused", "openvino-fp32")
INT8_ROWS = ("onnx-int8", "onnx-int8-fused", "openvino-int8", "openvino-int8-bf16")
INT8_MIN_COSINE = 0.99
SERVED_BASELINE_RPS = 33.8  # issue 15: the served search ensemble's throughput when it was filed
MACHINE_FILE = "machine.json"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def default_first(rows: list[dict], default: str | None) -> list[dict]:
    """The rows with the default path's (`default`, a row name) first, marked; the others in order."""
    first = [{**r, "label": f"**default path:** {r['label']}"} for r in rows if r["name"] == default]
    return first + [r for r in rows if r["name"] != default]


def default_vs_best(result: dict, rows: list[dict], speed: str, unit: str, among: tuple[str, ...] = ()) -> list[str]:
    """One line: the default path's row (what a user gets without flags) beside the fastest row
    (by `speed`, higher is faster; only names starting with `among` when given), so a slow
    default shows. Results written before the default path was recorded: no line."""
    path = result.get("default_path")
    if not path:
        return []
    ok = [r for r in rows if r["status"] == "ok" and (not among or r["name"].startswith(among))]
    default = next((r for r in ok if r["name"] == result.get("default_row")), None)
    best = max(ok, key=lambda r: r[speed]) if ok else None
    said = f"Default path (no runtime flags): {path['reason']}."
    if default is None or best is None:
        return [said + " Its row was not measured in this run.", ""]
    return [said + f" Default row: {default['name']} {default[speed]:.2f} {unit}; best row: {best['name']} "
            f"{best[speed]:.2f} {unit} (default / best = {default[speed] / best[speed]:.2f}).", ""]


def _encoder_section(result: dict) -> list[str]:
    lines = [f"## Encoder throughput ({result['passages']} passages, batch {result['batch_size']}, "
             f"max {result['max_tokens']} tokens)", "", f"Data: {result['data']}. Timed: {result['timed']}; "
             f"median of {result['repeats']}.", "",
             *default_vs_best(result, result["rows"], "throughput_pps", "passages/s"),
             "| backend | passages/s | × sentence-transformers PyTorch | mean / min cosine vs PyTorch | published p/s |",
             "|---|---:|---:|---:|---:|"]
    for row in default_first(result["rows"], result.get("default_row")):
        published = "" if row.get("reference_pps") is None else f"{row['reference_pps']:.1f}"
        if row["status"] == "ok":
            lines.append(f"| {row['label']} | {row['throughput_pps']:.1f} | {row['ratio_vs_baseline']:.2f}× | "
                         f"{row['mean_cosine_vs_pytorch']:.5f} / {row['min_cosine_vs_pytorch']:.5f} | {published} |")
        else:
            lines.append(f"| {row['label']} | not available: {row['reason']} | | | {published} |")
    lines.append("")
    for how, counts in result["batching"].items():
        lines.append(f"- batches by {how}: {counts['computed_tokens']} tokens computed for "
                     f"{counts['real_tokens']} real ({counts['padding_share'] * 100:.0f}% padding)")
    return lines


def _reranker_section(result: dict) -> list[str]:
    lines = [f"## Reranker latency vs k (batch 1, {result['queries']} queries)", "",
             f"Data: {result['data']}. Timed: {result['timed']}. Full-text passages truncated to "
             f"{result['max_passage_tokens']} tokens.", "",
             *default_vs_best(result, [r for r in result["rows"] if r["k"] == max(result["ks"], default=0)],
                              "latency_ratio_vs_pytorch", f"× ResRank PyTorch at k = {max(result['ks'], default=0)}",
                              among=("resrank-onnx", "resrank-openvino")),
             "| k | backend | tokens | latency ms | × faster than full text | × faster than ResRank PyTorch |"
             " max score diff vs PyTorch |", "|---:|---|---:|---:|---:|---:|---:|"]
    for row in [r for k in result["ks"] for r in default_first([r for r in result["rows"] if r["k"] == k],
                                                                 result.get("default_row"))]:
        if row["status"] != "ok":
            lines.append(f"| {row['k']} | {row['label']} | not available: {row['reason']} | | | | |")
            continue
        diff = row.get("max_abs_score_diff_vs_pytorch")
        lines.append(f"| {row['k']} | {row['label']} | {row['tokens']:.0f} | {_ms(row['time']['median_s'])} | "
                     f"{row['latency_ratio_vs_fulltext']:.2f}× | {row['latency_ratio_vs_pytorch']:.2f}× | "
                     f"{'' if diff is None else f'{diff:.1e}'} |")
    for k, reason in result.get("skipped_ks", {}).items():
        lines.append(f"\nk={k} skipped: {reason}.")
    return lines


def _served_graphs(result: dict) -> str:
    graphs = result.get("graphs")  # results written before the served graphs were recorded: FP32 on ORT
    if not graphs:
        return "Served graphs: fp32 on ONNX Runtime; in-process: fp32 on ONNX Runtime."
    path = graphs.get("cpu_path")  # what the repository ran: the runtime asked for, or what auto picked
    if path:
        asked = "no runtime flags, the default path" if graphs["runtime"] == "auto" else "asked for"
        return (f"Served graphs: {graphs['precision']} on {path['runtime']} ({path['compute']} compute; {asked}: "
                f"{path['reason']}); in-process: fp32 on ONNX Runtime.")
    runtime = graphs["runtime"] + (f" ({graphs['openvino_compute']} compute)" if graphs["runtime"] == "openvino" else "")
    return f"Served graphs: {graphs['precision']} on {runtime}; in-process: fp32 on ONNX Runtime."


def _served_section(result: dict) -> list[str]:
    lines = ["## Served pipeline (Triton, tritonclient HTTP from a separate process)", ""]
    if result["status"] != "ok":
        return lines + [f"{result['status']}: {result['reason']}"]
    requests = ", ".join(f"{n} at concurrency {c}" for c, n in result["requests_per_level"].items())
    lines += [f"Top-k {result['top_k']}, requests per level: {requests}; index of "
              f"{result['index_passages']} passages; {result['ort_threads']} intra-op thread(s) in both. "
              f"{_served_graphs(result)}", "",
              "| ensemble | where | max batch | concurrency | p50 ms | p95 ms | p99 ms | req/s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for ensemble, stats in result["in_process"].items():
        lines.append(f"| {ensemble} | in-process | - | 1 | {_ms(stats['p50_s'])} | {_ms(stats['p95_s'])} | "
                     f"{_ms(stats['p99_s'])} | {stats['throughput_rps']:.1f} |")
    for batch, ensembles in result["served"].items():
        for ensemble, levels in ensembles.items():
            for concurrency, stats in levels.items():
                if "error" in stats:
                    lines.append(f"| {ensemble} | Triton | {batch} | {concurrency} | error: {stats['error']} | | | |")
                    continue
                lines.append(f"| {ensemble} | Triton | {batch} | {concurrency} | {_ms(stats['p50_s'])} | "
                             f"{_ms(stats['p95_s'])} | {_ms(stats['p99_s'])} | {stats['throughput_rps']:.1f} |")
    lines.append("")
    for ensemble, value in result["overhead_at_concurrency_1"].items():
        lines.append(f"- serving overhead at concurrency 1, {ensemble}: {value * 100:+.1f}% (p50 served vs in-process)")
    for ensemble, value in result["dynamic_batching_gain"].items():
        lines.append(f"- dynamic-batching gain, {ensemble}: {value:.2f}× throughput "
                     f"({result['dynamic_batching_compared']})")
    return lines


def _flops_section(result: dict) -> list[str]:
    peak = result["peak"]
    enc = result["encoder"]
    lines = ["## Physical limit", "",
             f"Measured float32 matmul ({peak['size']}²): numpy {peak['numpy_gflops']:.1f} GFLOP/s, torch "
             f"{peak['torch_gflops']:.1f} GFLOP/s; peak used: {peak['peak_gflops']:.1f} GFLOP/s; "
             f"bfloat16 (torch): {peak['bf16_gflops']:.1f} GFLOP/s. Method: {result['method']}.",
             "", f"Encoder: {enc['flops_per_passage']['total'] / 1e9:.3f} GFLOP per passage "
             f"(mean {enc['mean_tokens']:.0f} tokens).", "",
             "| model | backend | k | GFLOP/request | achieved GFLOP/s | % of FP32 peak | % of BF16 peak |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def cells(row: dict) -> str:
        return (f"{row['achieved_gflops']:.1f} | {row['fraction_of_peak'] * 100:.0f}% | "
                f"{row['fraction_of_bf16_peak'] * 100:.0f}% |")

    for row in enc["rows"]:
        lines.append(f"| encoder | {row['name']} | - | {enc['flops_per_passage']['total'] / 1e9:.3f} | {cells(row)}")
    for row in result["reranker"]["rows"]:
        lines.append(f"| reranker | {row['name']} | {row['k']} | {row['flops_per_request']['total'] / 1e9:.3f} | "
                     f"{cells(row)}")
    goal = result["reranker"].get("goal")
    if goal:
        lines.append(f"\nA reranker graph {goal['ratio']:g}× faster than ResRank PyTorch at k = {goal['k']} would "
                     f"sustain {goal['needed_gflops']:.0f} GFLOP/s: {goal['of_fp32_peak']:.1f}× the FP32 peak, "
                     f"{goal['of_bf16_peak'] * 100:.0f}% of the BF16 peak.")
    for part in ("encoder", "reranker"):
        if "note" in result[part]:
            lines.append(f"\n{result[part]['note']}.")
    return lines


def goals(results: dict[str, dict]) -> list[str]:
    """The project's performance goals, each with this run's figure (met / not met / not measured)."""
    lines = []

    def status(value, target, fmt):
        if value is None:
            return "not measured in this run"
        return f"{fmt(value)} — {'met' if value >= target else 'not met'}"

    enc = {r["name"]: r for r in results.get("encoder", {}).get("rows", []) if r["status"] == "ok"}
    st_onnx = enc.get("sentence-transformers-onnx")
    if "onnx-fp32" in enc:
        if st_onnx:
            value = st_onnx["time"]["median_s"] / enc["onnx-fp32"]["time"]["median_s"]
            basis = "measured sentence-transformers ONNX"
        else:
            published = REFERENCE_PPS["sentence-transformers-onnx"] / REFERENCE_PPS["sentence-transformers"]
            value = enc["onnx-fp32"]["ratio_vs_baseline"] / published
            basis = (f"sentence-transformers ONNX not measured here: this run's ratio to sentence-transformers "
                     f"PyTorch over the published ONNX/PyTorch ratio {published:.3f}")
        lines.append(f"- encoder FP32 ≥ 1.2× sentence-transformers ONNX ({basis}): "
                     f"{status(value, 1.2, lambda v: f'{v:.2f}×')}")
    else:
        lines.append(f"- encoder FP32 ≥ 1.2× sentence-transformers ONNX: {status(None, 0, str)}")
    # issue 15's goals: the best row of each kind, naming it; INT8 rows only count at min cosine >= 0.99
    int8 = f"encoder INT8 with min cosine ≥ {INT8_MIN_COSINE}"
    for names, min_cosine, target, what in (
            (FP32_ARITHMETIC_ROWS, 0.0, 1.3, "encoder FP32 arithmetic (ORT-fused or OpenVINO f32)"),
            (INT8_ROWS, INT8_MIN_COSINE, 3.0, int8), (INT8_ROWS, INT8_MIN_COSINE, 2.0, int8)):
        rows = [enc[n] for n in names if n in enc and enc[n].get("min_cosine_vs_pytorch", 0) >= min_cosine]
        row = max(rows, key=lambda r: r["ratio_vs_baseline"]) if rows else None
        lines.append(f"- {what} ≥ {target:g}× sentence-transformers PyTorch" + (f" (best: {row['name']})" if row else "")
                     + ": " + status(row and row["ratio_vs_baseline"], target, lambda v: f"{v:.2f}×"))
    rer = [r for r in results.get("reranker", {}).get("rows", []) if r["status"] == "ok" and r["k"] == 100
           and r["name"].startswith(("resrank-onnx", "resrank-openvino"))]
    for key, target, against in (("latency_ratio_vs_pytorch", 10.0, "ResRank PyTorch eager"),
                                 ("latency_ratio_vs_fulltext", 40.0, "full-text listwise")):
        best = max(rer, key=lambda r: r[key]) if rer else None
        lines.append(f"- reranker at k=100 ≥ {target:g}× lower latency than {against}"
                     + (f" (best: {best['name']})" if best else "") + ": "
                     + status(best and best[key], target, lambda v: f"{v:.1f}×"))
    served = results.get("served", {}) if results.get("served", {}).get("status") == "ok" else {}
    searched = served.get("served", {}).get("8", {}).get("search", {}).get("16", {})
    lines.append(f"- served search ensemble, 16 clients, max batch 8 ≥ 1.5 × {SERVED_BASELINE_RPS} req/s (issue 15's "
                 "figure, measured on another machine; compare runs of the same machine): "
                 + status(searched.get("throughput_rps"), 1.5 * SERVED_BASELINE_RPS, lambda v: f"{v:.1f} req/s"))
    overhead = served.get("overhead_at_concurrency_1", {})
    worst = max(overhead.values()) if overhead else None
    lines.append("- Triton overhead ≤ 15% at concurrency 1 (worst ensemble): " + (
        "not measured in this run" if worst is None
        else f"{worst * 100:+.1f}% — {'met' if worst <= 0.15 else 'not met'}"))
    return lines


def render_summary(results: dict[str, dict], machine: dict, command: str) -> str:
    threads = machine["threads"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(machine["versions"].items()))
    lines = ["# resrank-export benchmarks", "",
             f"Command: `{command}`", "",
             f"Machine: {machine['cpu']}, {machine['physical_cores']} physical / {machine['logical_cores']} "
             f"logical cores, {machine['memory_gib']} GiB; flags: {', '.join(machine['cpu_flags']) or 'none found'}; "
             f"{machine['os']}; 1-min load average at start {machine['load_average_1m']}.",
             f"Threads: torch {threads['torch_intra_op']}, ONNX Runtime {threads['onnxruntime_intra_op']}.",
             f"Versions: {versions}.", "", "## Goals (reported, not asserted)", "", *goals(results)]
    sections = {"encoder": _encoder_section, "reranker": _reranker_section, "served": _served_section,
                "flops": _flops_section}
    for name, section in sections.items():
        if name in results:
            lines += ["", *section(results[name])]
    return "\n".join(lines) + "\n"


def _plot_reranker(result: dict, path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = dict.fromkeys(r["name"] for r in result["rows"] if r["status"] == "ok")
    for name in names:
        rows = [r for r in result["rows"] if r["name"] == name and r["status"] == "ok"]
        ax.plot([r["k"] for r in rows], [r["time"]["median_s"] * 1e3 for r in rows], marker="o",
                label=rows[0]["label"])
    ax.set(xlabel="candidates k", ylabel="latency (ms, median)", xscale="log", yscale="log",
           title="Reranker latency vs k (batch 1)")
    _save_log_x(fig, ax, result["ks"], path, plt)


def _save_log_x(fig, ax, ticks: list, path: Path, plt) -> None:
    """Label the measured x values on a log axis (no minor ticks), add the legend, save."""
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_served(result: dict, path: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"search": "tab:blue", "rerank": "tab:orange"}
    styles = ["-", ":", "-."]
    for number, (batch, ensembles) in enumerate(result["served"].items()):
        for ensemble, levels in ensembles.items():
            points = [(int(c), s["throughput_rps"]) for c, s in levels.items() if "throughput_rps" in s]
            ax.plot(*zip(*points), marker="o", color=colors[ensemble], linestyle=styles[number % len(styles)],
                    label=f"{ensemble}, Triton max batch {batch}")
    for ensemble, stats in result["in_process"].items():
        ax.axhline(stats["throughput_rps"], linestyle="--", linewidth=1, color=colors[ensemble],
                   label=f"{ensemble}, in-process (c=1)")
    ax.set(xlabel="concurrency", ylabel="throughput (requests/s)", xscale="log", title="Served throughput vs concurrency")
    _save_log_x(fig, ax, result["concurrency"], path, plt)


def _plot_encoder(result: dict, path: Path, plt) -> None:
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.barh([r["name"] for r in rows], [r["throughput_pps"] for r in rows])
    ax.set(xlabel="passages/s", title=f"Encoder throughput (batch {result['batch_size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(results: dict[str, dict], out: Path) -> list[str]:
    """PNG files written under `out`; returns their names."""
    matplotlib = require("matplotlib", "benchmark plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "reranker" in results:
        _plot_reranker(results["reranker"], out / "reranker_latency_vs_k.png", plt)
        written.append("reranker_latency_vs_k.png")
    if results.get("served", {}).get("status") == "ok":
        _plot_served(results["served"], out / "served_throughput_vs_concurrency.png", plt)
        written.append("served_throughput_vs_concurrency.png")
    if "encoder" in results:
        _plot_encoder(results["encoder"], out / "encoder_throughput.png", plt)
        written.append("encoder_throughput.png")
    return written


def write_results(results: dict[str, dict], machine: dict, command: str, out: Path) -> list[str]:
    """Everything into `out` (a fresh folder the caller moves into place); returns file names."""
    files = []
    for name, result in results.items():
        (out / f"{name}.json").write_text(json.dumps({**result, "machine": machine}, indent=2) + "\n")
        files.append(f"{name}.json")
    (out / MACHINE_FILE).write_text(json.dumps(machine, indent=2) + "\n")
    (out / SUMMARY_FILE).write_text(render_summary(results, machine, command))
    return files + [MACHINE_FILE, SUMMARY_FILE] + write_plots(results, out)
