"""Full-corpus precision fidelity report: FP16 and INT8 graphs of a checkpoint against its FP32
graphs on ONNX Runtime CPU, on every SciFact passage and query and every DL19 query (the CI
gates in tests/test_fidelity.py run a documented subsample of the same measurement).

    python benchmarks/fidelity_report.py RESULTS_DIR [--checkpoint DIR] [--reranker distilled|qwen3|minilm]
        [--retrieval-data ../shared/data/scifact] [--rerank-data ../shared/data/dl19]
        [--calibration-corpus ../shared/data/dl19] [--precisions fp16,int8,int8_wo,int4_awq]
        [--runtime openvino --openvino-compute bf16]

Without --checkpoint the demo checkpoint is used: its distilled reranker (which ranks, so the
reranker's nDCG@10 drop on DL19 means something), or an untrained one (--reranker qwen3: the small
seeded Qwen3; minilm: initialised from the MiniLM weights, pretrained activation statistics). Writes
RESULTS_DIR/fidelity.json and RESULTS_DIR/fidelity.md. About 25 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--reranker", choices=["distilled", "qwen3", "minilm"], default="distilled")
    parser.add_argument("--retrieval-data", type=Path, default=SHARED / "scifact")
    parser.add_argument("--rerank-data", type=Path, default=SHARED / "dl19")
    parser.add_argument("--calibration-corpus", type=Path, default=SHARED / "dl19")
    parser.add_argument("--retrieval-queries", type=int, help="subsample (default: every judged query)")
    parser.add_argument("--retrieval-other-docs", type=int, help="subsample (default: the full corpus)")
    parser.add_argument("--rerank-queries", type=int, help="subsample (default: every query of the run)")
    parser.add_argument("--precisions", default="fp16,int8",
                        help="comma-separated (bf16 needs --runtime openvino: ONNX Runtime's CPU provider has no "
                             "BF16 MatMul)")
    parser.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                        help="what runs the FP16/INT8 graphs (FP32, the reference, always runs on ONNX Runtime)")
    parser.add_argument("--openvino-compute", choices=["f32", "bf16"], default="f32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from resrank_export.export.onnx import export_onnx
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import build_demo_checkpoint, cache_dir, default_checkpoint
    from resrank_export.precision.calibration import CalibrationConfig
    from resrank_export.precision.fidelity import FidelityConfig, render_markdown
    from resrank_export.precision.graphs import PrecisionConfig
    from resrank_export.precision.stages import compare_precisions

    if args.checkpoint is not None:
        path = args.checkpoint
    elif args.reranker == "distilled":
        path = default_checkpoint()
    else:
        path = cache_dir() / f"demo-checkpoint-{args.reranker}-reranker"
        if not (path / "resrank.json").is_file():
            build_demo_checkpoint(path, reranker=args.reranker)
    checkpoint = load_checkpoint(path)
    config = FidelityConfig(retrieval_data=args.retrieval_data, rerank_data=args.rerank_data,
                            retrieval_queries=args.retrieval_queries, retrieval_other_docs=args.retrieval_other_docs,
                            rerank_queries=args.rerank_queries, runtime=args.runtime,
                            openvino_compute=args.openvino_compute)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        graphs = export_onnx(checkpoint, Path(work) / "fp32")
        report = compare_precisions(checkpoint, {k: graphs[k] for k in ("encoder", "reranker")}, Path(work),
                                    CalibrationConfig(corpus=args.calibration_corpus), PrecisionConfig(), config,
                                    tuple(args.precisions.split(",")))
    report["run"] = {"checkpoint": str(Path(path).resolve()), "seconds": round(time.perf_counter() - started),
                     "machine": platform.platform(), "python": sys.version.split()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "fidelity.md").write_text(render_markdown(report, f"Precision fidelity vs FP32: {Path(path).name}"))
    print((args.out / "fidelity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
