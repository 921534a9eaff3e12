"""Index scale benchmark: peak memory while indexing should grow with the index (vectors, ids),
not with the corpus file, because the corpus is streamed in chunks.

Generates seeded passages, exports a tiny seeded checkpoint (fast encoder), indexes each corpus
size in a fresh process and records that process's peak RSS and passages/s.

    python benchmarks/index_scale.py RESULTS_DIR [--sizes 50000 200000] [--kind flat]

Writes RESULTS_DIR/index_scale.json and RESULTS_DIR/index_scale.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("index_scale")


def write_corpus(path: Path, count: int, seed: int = 0) -> int:
    """`count` passages of 30-80 words drawn from the standard-library docstring vocabulary."""
    from resrank_export.data.default_corpus import stdlib_passages

    vocabulary = sorted({w for p in stdlib_passages(limit=2000) for w in p.text.split() if w.isalpha()})
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            words = rng.choices(vocabulary, k=rng.randint(30, 80))
            handle.write(json.dumps({"id": f"p{i}", "text": " ".join(words)}) + "\n")
    return path.stat().st_size


def export_tiny_build(folder: Path) -> Path:
    from resrank_export.export.onnx import export_onnx
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import build_tiny_checkpoint

    export_onnx(load_checkpoint(build_tiny_checkpoint(folder / "checkpoint")), folder / "build")
    return folder / "build"


def _memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def index_in_this_process(build: Path, corpus: Path, out: Path, kind: str) -> dict:
    """Child side: RSS after imports and a warm-up encode, then the peak while indexing (the
    peak counter is reset after the warm-up, so start-up spikes do not hide the growth)."""
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.encode import OnnxEncoder
    from resrank_export.index.stage import build_index

    OnnxEncoder(build).encode(["warm up the session and the imports"])
    startup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline = _memory_mib("VmRSS")
    start = time.perf_counter()
    info = build_index(IndexConfig(build=build, corpus=corpus, out=out, kind=kind))
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return {"passages": info["count"], "seconds": round(seconds, 2),
            "passages_per_second": round(info["count"] / seconds, 1),
            "encode_passages_per_second": report["passages_per_second"],
            "startup_peak_rss_mib": round(startup_peak, 1), "baseline_rss_mib": round(baseline, 1),
            "peak_rss_mib": round(_memory_mib("VmHWM"), 1),
            "index_bytes": sum(p.stat().st_size for p in out.iterdir())}


def run(results: Path, sizes: list[int], kind: str) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="index-scale-") as tmp:
        work = Path(tmp)
        log.info("exporting a tiny seeded checkpoint")
        build = export_tiny_build(work)
        for size in sizes:
            corpus = work / f"corpus-{size}.jsonl"
            corpus_bytes = write_corpus(corpus, size)
            log.info("indexing %d passages (%.1f MiB corpus file)", size, corpus_bytes / 2**20)
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(build), str(corpus), str(work / f"index-{size}"), kind],
                check=True, capture_output=True, text=True)
            row = {"corpus_file_mib": round(corpus_bytes / 2**20, 1), **json.loads(child.stdout.splitlines()[-1])}
            row["index_mib"] = round(row.pop("index_bytes") / 2**20, 1)
            row["rss_growth_mib"] = round(row["peak_rss_mib"] - row["baseline_rss_mib"], 1)
            rows.append(row)
    import faiss
    import onnxruntime

    result = {"benchmark": "index_scale", "kind": kind, "encoder": "tiny seeded BERT (2 layers, dim 32, 64 tokens)",
              "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "faiss": faiss.__version__,
                          "onnxruntime": onnxruntime.__version__},
              "rows": rows}
    (results / "index_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "index_scale.md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict) -> str:
    columns = ["passages", "corpus_file_mib", "index_mib", "startup_peak_rss_mib", "baseline_rss_mib", "peak_rss_mib",
               "rss_growth_mib", "passages_per_second", "encode_passages_per_second", "seconds"]
    lines = [f"# Index scale ({result['kind']}, {result['encoder']}, {result['machine']['cpus']} CPUs)", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in result["rows"]]
    lines += ["", "rss_growth_mib = peak RSS while indexing minus RSS after loading the encoder (peak "
              "counter reset there); it should follow index_mib, not corpus_file_mib."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        build, corpus, out, kind = sys.argv[2:6]
        print(json.dumps(index_in_this_process(Path(build), Path(corpus), Path(out), kind)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder for index_scale.json and index_scale.md")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--kind", default="flat")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.results, args.sizes, args.kind)
    print(render_markdown(result))


if __name__ == "__main__":
    main()
