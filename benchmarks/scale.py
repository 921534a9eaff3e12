"""Scale benchmark (issue 12): checkpoints of real Qwen3 shape (Qwen3-Embedding encoder + Qwen3
reranker of one size, the real tokenizer, seeded random weights saved as BF16 like the releases)
built with `resrank-export build --precision P` and otherwise default options. For each
(shape, precision): wall time and peak RSS of every stage (the build manifest's own records) and
of the whole build process (os.wait4), the exported dtype `--export-dtype auto` chose, the parity
figures, the graph bytes on disk against the planner's `graph_weight_bytes`, and each stage's
peak RSS against issue 12's bound (1.5 x the larger model's weights in the stage's dtype + 2 GiB).
Random weights say nothing of ranking quality: this measures cost.

    python benchmarks/scale.py RESULTS_DIR --shapes tiny,0.6b --precisions fp16,int8 \\
        [--work DIR] [--tokenizer ../shared/tokenizers/qwen3] [--timeout-min 90]

Rows accumulate: each finished (shape, precision) replaces its row in RESULTS_DIR/scale.json as
soon as it ends, and scale.md and scale.png are rewritten from all rows, so shapes can be
measured in separate runs. A build that passes --timeout-min is stopped with SIGTERM (the build
keeps its finished stages) and its row records how far it got. Checkpoints are made once per
shape under --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "resrank_export"]
# Options that change how long a build takes but not what it holds in memory: the planner's
# figures still apply (parity's peak is one token-budget batch whatever the number of queries).
PLAN_NEUTRAL_OPTIONS = ("--parity-queries",)


def run_measured(command: list[str], log_path: Path, timeout_s: float) -> dict:
    """Run `command` (output to `log_path`); wall seconds, peak RSS (the process's high-water mark
    from wait4: since its last reset, for a build; Linux starts it from this process's own at exec,
    about 0.2 GB here), exit code, and whether it was stopped at `timeout_s`."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline, stopped = start + timeout_s, False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if not stopped and time.perf_counter() > deadline:
                process.send_signal(signal.SIGTERM)  # the build keeps its finished stages
                stopped = True
            time.sleep(0.5)
    return {"command": " ".join(command[2:] if command[:2] == CLI[:2] else command),
            "wall_s": round(time.perf_counter() - start, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "exit_code": os.waitstatus_to_exitcode(status), "timed_out": stopped}


def make_checkpoint(shape: str, work: Path, tokenizer: Path, timeout_s: float) -> dict:
    folder = work / f"ckpt-{shape}"
    record = work / f"ckpt-{shape}.json"
    if folder.is_dir() and record.is_file():
        return json.loads(record.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    result = run_measured([*CLI, "qwen3-checkpoint", str(folder), "--shape", shape, "--tokenizer", str(tokenizer)],
                          work / f"ckpt-{shape}.log", timeout_s)
    if result["exit_code"] != 0:
        raise SystemExit(f"checkpoint {shape} failed: see {work / f'ckpt-{shape}.log'}")
    result["bytes"] = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    record.write_text(json.dumps(result, indent=2))
    return result


def _manifest(out: Path) -> dict:
    """The finished build's manifest, or the one an interrupted build kept in .<out>.partial."""
    for folder in (out, out.parent / f".{out.name}.partial"):
        if (folder / "manifest.json").is_file():
            return json.loads((folder / "manifest.json").read_text())
    return {}


def _graph_bytes(out: Path, precision: str) -> dict[str, int]:
    folder = out / "onnx" / precision
    return {name: sum(p.stat().st_size for p in folder.glob(f"{name}.onnx*") if ".ort." not in p.name)
            for name in ("encoder", "reranker") if (folder / f"{name}.onnx").is_file()}


def _stage_dtype(stage: str, exported: str) -> str:
    """The dtype of the weights a stage holds: the export's for export/parity, FP32 for the stages
    reading FP32 graphs (calibration makes slot vectors with the reference; precision/fidelity
    read the FP32 graphs) when the export was FP32, else the exported dtype."""
    return exported if stage in ("export", "parity") or exported != "fp32" else "fp32"


def build_row(shape: str, precision: str, work: Path, checkpoint: dict, timeout_s: float,
              options: tuple[str, ...] = (), keep: bool = False) -> dict:
    name = "-".join([f"build-{shape}-{precision}", *("".join(c for c in o if c.isalnum()) for o in options)])
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    load_before = os.getloadavg()
    result = run_measured([*CLI, "build", "--checkpoint", str(work / f"ckpt-{shape}"), "--precision", precision,
                           "--triton-backend", "none", "--out", str(out), *options],
                          work / f"{name}.log", timeout_s)
    row = measured_row(shape, precision, work, checkpoint, out, result, load_before, options)
    if result["exit_code"] != 0:
        row["error_tail"] = (work / f"{name}.log").read_text().strip().splitlines()[-5:]
    if not keep:  # graphs of GBs; the row keeps what was measured. With --keep, a build cut short
        # keeps its finished stages (.<name>.partial) too: rerun the build to resume, then --adopt it
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    return row


def adopted_row(shape: str, precision: str, work: Path, checkpoint: dict, out: Path) -> dict:
    """A row from a build folder this script did not run (one whose stages ran over several
    invocations, resumed by the build): wall time is the sum of the stage times the manifest
    recorded, the peak the largest stage peak; the folder is left as it is."""
    stages = _manifest(out).get("stages", {})
    if not stages:
        raise SystemExit(f"{out}: no build manifest to adopt")
    result = {"command": f"adopted {out}: stages recorded by the build, wall = their sum",
              "wall_s": round(sum(s.get("seconds") or 0 for s in stages.values()), 1), "peak_rss_bytes": 0,
              "exit_code": 0, "timed_out": False, "adopted": True}
    return measured_row(shape, precision, work, checkpoint, out, result, None, ())


def measured_row(shape: str, precision: str, work: Path, checkpoint: dict, out: Path, result: dict,
                 load_before: tuple | None, options: tuple[str, ...]) -> dict:
    from resrank_export.engine.plan import graph_weight_bytes
    from resrank_export.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(work / f"ckpt-{shape}")
    manifest = _manifest(out)
    stages = {name: {k: entry.get(k) for k in ("status", "seconds", "peak_rss_bytes")}
              for name, entry in manifest.get("stages", {}).items()}
    # The build resets the kernel's high-water mark at each stage start (manifest.PeakRss), so
    # wait4 sees only the last stage's peak: the build's peak is the largest of them all.
    result["peak_rss_bytes"] = max([result["peak_rss_bytes"], *(s["peak_rss_bytes"] or 0 for s in stages.values())])
    exported = (manifest.get("stages", {}).get("export", {}).get("report") or {}).get("dtype")
    weights = {p: graph_weight_bytes(ckpt, p) for p in ("fp32", "fp16")}
    for name, stage in stages.items():
        dtype = _stage_dtype(name, exported or "fp32")
        bound = 1.5 * max(weights["fp16" if dtype == "bf16" else dtype].values()) + 2 * GIB
        stage["rss_bound_bytes"] = int(bound)
        stage["within_bound"] = (stage["peak_rss_bytes"] or 0) <= bound
    graphs = {}
    for graph_precision in dict.fromkeys([exported, precision]):
        if graph_precision and (measured := _graph_bytes(out, graph_precision)):
            predicted = graph_weight_bytes(ckpt, "fp16" if graph_precision == "bf16" else graph_precision)
            graphs[graph_precision] = {name: {"bytes": size, "planned_bytes": predicted[name],
                                              "plan_error": round(predicted[name] / size - 1, 4)}
                                       for name, size in measured.items()}
    parity = (manifest.get("stages", {}).get("parity", {}).get("report") or {})
    row = {"shape": shape, "precision": precision, "options": list(options), "exported_dtype": exported, **result,
           "load_average_before": [round(x, 2) for x in load_before] if load_before else None,
           "load_average_after": [round(x, 2) for x in os.getloadavg()] if load_before else None,
           "checkpoint": checkpoint, "stages": stages, "graphs": graphs,
           "parity": {k: parity.get(k) for k in ("dtype", "passed", "gate")} | {
               "encoder_max_abs_diff": (parity.get("encoder") or {}).get("max_abs_diff"),
               "reranker_max_abs_diff": (parity.get("reranker") or {}).get("max_abs_diff")}}
    add_plan(row, work)
    return row


def add_plan(row: dict, work: Path) -> None:
    """The planner's predicted peak RSS beside each measured stage (engine/build_plan.py), and its
    error; rerun with --replan after the planner's factors change."""
    from resrank_export.engine.build_plan import build_plans

    if any(option.split("=")[0] not in PLAN_NEUTRAL_OPTIONS for option in row.get("options", [])):
        return  # the planner plans default options only
    plan = next(p for p in build_plans(work / f"ckpt-{row['shape']}")[1] if p.precision == row["precision"])
    planned = {s.stage: s.peak_rss for s in plan.stages}
    row["planned_peak_rss_bytes"] = plan.peak_rss
    for name, stage in row["stages"].items():
        key = "fidelity" if name.startswith("fidelity") else name
        if key in planned and stage["peak_rss_bytes"]:
            stage["planned_peak_rss_bytes"] = planned[key]
            stage["plan_error"] = round(planned[key] / stage["peak_rss_bytes"] - 1, 4)


def _active_s(record: dict) -> float:
    """Seconds of a build or stage record ("wall_s" or "seconds") without the time its processes
    were stopped with SIGSTOP ("paused_s", written by hand when a measurement was paused so that
    another one could run on a quiet machine)."""
    return (record.get("wall_s", record.get("seconds")) or 0) - record.get("paused_s", 0)


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def render_markdown(result: dict) -> str:
    lines = ["# Scale benchmark (benchmarks/scale.py)", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['logical_cores']} cores, "
             f"{result['machine']['memory_gib']} GiB. Load average before/after each build is in its row. "
             "Random weights: cost only.", "",
             "| shape | precision | exported | build wall (min) | build peak RSS (GiB) | parity | slowest stage | "
             "every stage within 1.5 x weights + 2 GiB |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        stages = row["stages"]
        slowest = max(stages, key=lambda n: stages[n]["seconds"] or 0) if stages else "-"
        status = "stopped (timeout)" if row["timed_out"] else ("ok" if row["exit_code"] == 0 else "failed")
        status += ", stage sum of a resumed build" if row.get("adopted") else ""
        status += f", {row['paused_s'] / 60:.0f} min stopped (SIGSTOP) not counted" if row.get("paused_s") else ""
        lines.append(f"| {row['shape']} | {' '.join([row['precision'], *row.get('options', [])])} | {row['exported_dtype']} | {_active_s(row) / 60:.1f} "
                     f"({status}) | {_gib(row['peak_rss_bytes'])} | "
                     f"{'passed' if row['parity'].get('passed') else row['parity'].get('passed')} | {slowest} | "
                     f"{all(s['within_bound'] for s in stages.values())} |")
    lines += ["", "Per stage (seconds / peak RSS GiB / bound GiB / planner's error on the peak):", ""]
    for row in result["rows"]:
        cells = ", ".join(f"{name} {_active_s(s):.0f} s / {_gib(s['peak_rss_bytes'])} / {_gib(s['rss_bound_bytes'])}"
                          + (f" / {s['plan_error']:+.0%}" if "plan_error" in s else "")
                          for name, s in row["stages"].items())
        lines.append(f"- **{row['shape']} {' '.join([row['precision'], *row.get('options', [])])}**: {cells}")
    lines += ["", "Graph bytes on disk against the planner (`engine/plan.py: graph_weight_bytes`):", ""]
    for row in result["rows"]:
        for precision, graphs in row["graphs"].items():
            cells = ", ".join(f"{name} {_gib(g['bytes'])} GiB (plan {g['plan_error']:+.1%})" for name, g in graphs.items())
            lines.append(f"- {row['shape']} {precision}: {cells}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['shape']}\n{' '.join([r['precision'], *r.get('options', [])])}" for r in rows]
    names = list(dict.fromkeys(n for r in rows for n in r["stages"]))
    bottom = [0.0] * len(rows)
    for name in names:
        minutes = [_active_s(r["stages"].get(name, {})) / 60 for r in rows]
        left.bar(labels, minutes, bottom=bottom, label=name)
        bottom = [b + m for b, m in zip(bottom, minutes)]
    left.set_ylabel("minutes")
    left.set_title("build wall time by stage")
    left.legend(fontsize=7)
    right.bar(labels, [r["peak_rss_bytes"] / GIB for r in rows])
    right.set_ylabel("GiB")
    right.set_title("build peak RSS")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--shapes", default="tiny")
    parser.add_argument("--precisions", default="fp32,fp16,bf16,int8")
    parser.add_argument("--work", type=Path, default=Path("scale-work"))
    parser.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "tokenizers" / "qwen3")
    parser.add_argument("--timeout-min", type=float, default=180.0)
    parser.add_argument("--replan", action="store_true",
                        help="only recompute the planner's predictions of the recorded rows (checkpoints under --work)")
    parser.add_argument("--adopt", type=Path,
                        help="record this existing build folder as the row of --shapes/--precisions (one each) "
                             "instead of running a build")
    parser.add_argument("--build-option", action="append", default=[],
                        help="extra `build` option, repeatable (e.g. --build-option=--export-dtype=fp32): a row of its own")
    parser.add_argument("--keep", action="store_true",
                        help="keep each build folder (to serve it: benchmarks/serve_scale.py) instead of removing it")
    args = parser.parse_args()
    from resrank_export.bench.timing import machine_info

    if args.adopt and ("," in args.shapes or "," in args.precisions):
        parser.error("--adopt records one build: give one --shapes and one --precisions")
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "scale.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    result["machine"] = machine_info({})
    if args.replan:
        for row in result["rows"]:
            add_plan(row, args.work)
        path.write_text(json.dumps(result, indent=2) + "\n")
        (args.results / "scale.md").write_text(render_markdown(result))
        return
    for shape in args.shapes.split(","):
        checkpoint = make_checkpoint(shape, args.work, args.tokenizer, args.timeout_min * 60)
        for precision in args.precisions.split(","):
            print(f"building {shape} {precision} ...", flush=True)
            options = () if args.adopt else tuple(args.build_option)
            row = (adopted_row(shape, precision, args.work, checkpoint, args.adopt) if args.adopt else
                   build_row(shape, precision, args.work, checkpoint, args.timeout_min * 60, options, args.keep))
            key = (shape, precision, list(options))
            result["rows"] = [r for r in result["rows"] if (r["shape"], r["precision"], r.get("options", [])) != key] + [row]
            path.write_text(json.dumps(result, indent=2) + "\n")
            (args.results / "scale.md").write_text(render_markdown(result))
            plot(result, args.results / "scale.png")
            print(f"  {row['wall_s'] / 60:.1f} min, peak RSS {_gib(row['peak_rss_bytes'])} GiB, exit {row['exit_code']}",
                  flush=True)


if __name__ == "__main__":
    main()
