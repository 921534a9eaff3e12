"""GPU check: run the built plans and ONNX Runtime (CPU) on the same graphs and real text,
compare scores and embeddings with the fidelity gates, and time both. Needs TensorRT, a GPU
and torch with CUDA (used only for device buffers)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from resrank_export.engine.manifest import find_entry, read_engine_manifest
from resrank_export.engine.stage import engines_dir, graphs_dir
from resrank_export.engine.tensorrt import detect_runtime, load_engine, tensorrt_module
from resrank_export.precision import precision_row

log = logging.getLogger(__name__)
TIMING_RUNS = 20


class TrtRunner:
    """Runs one plan with torch CUDA tensors as device buffers."""

    def __init__(self, engine):
        import torch

        self.trt = tensorrt_module("running TensorRT plans")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        buffers = {}
        for name in self.inputs:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=self._dtype(name))).cuda()
            self.context.set_input_shape(name, tuple(buffers[name].shape))
        for name in self.outputs:
            torch_dtype = torch.from_numpy(np.empty(0, self._dtype(name))).dtype
            buffers[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch_dtype, device="cuda")
        for name, tensor in buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        torch.cuda.current_stream().synchronize()
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return [buffers[name].float().cpu().numpy() for name in self.outputs]


@dataclass(frozen=True)
class GraphCheck:
    precision: str
    graph: str
    max_abs_diff: float
    top10_identical: float
    tensorrt_ms: float
    onnxruntime_ms: float
    passed: bool


def _median_ms(fn, feeds) -> float:
    fn(feeds)  # warm-up
    times = []
    for _ in range(TIMING_RUNS):
        start = time.perf_counter()
        fn(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _top10_identical(ref: np.ndarray, new: np.ndarray) -> float:
    return float(np.mean([np.array_equal(np.argsort(-a, kind="stable")[:10], np.argsort(-b, kind="stable")[:10])
                          for a, b in zip(ref, new)]))


def check_build(build: Path, precision: str, queries: int = 3) -> list[GraphCheck]:
    """Compare this GPU's plans of one build folder with ONNX Runtime on the same graphs."""
    from resrank_export.engine.profiles import BuildGraphs
    from resrank_export.export.parity import ParityConfig, load_parity_data
    from resrank_export.model.text import PassageTokenizer
    from resrank_export.runtime import graph_session, run_session

    runtime = detect_runtime()
    graphs = BuildGraphs.from_build(build, graphs_dir(build, precision))
    ck = graphs.config
    entries = read_engine_manifest(engines_dir(build, precision))
    runners = {}
    for graph in ("encoder", "reranker"):
        entry = find_entry(entries, graph, runtime.compute_capability)
        runners[graph] = TrtRunner(load_engine(engines_dir(build, precision), entry, runtime))
    data = load_parity_data(ParityConfig(queries=queries), ck.max_candidates)
    tokenizer = PassageTokenizer.for_config(build / "tokenizer" / "encoder" / "tokenizer.json", ck)
    texts = [t for cands in data.candidates for t in cands]
    encoder_max_batch = runners["encoder"].engine.get_tensor_profile_shape("input_ids", 0)[2][0]
    passages = tokenizer(texts[:encoder_max_batch])
    encoder_ort = graph_session(graphs_dir(build, precision) / "encoder.onnx")
    reranker_ort = graph_session(graphs_dir(build, precision) / "reranker.onnx")

    ref_emb = run_session(encoder_ort, passages)[0]
    new_emb = runners["encoder"](passages)[0]
    feeds = graphs.prompt_builder().batch(data.queries, ck.max_candidates)
    slots = run_session(encoder_ort, tokenizer(texts))[0]
    feeds["passage_embeddings"] = slots.reshape(len(data.queries), ck.max_candidates, -1).astype(np.float32)
    ref_scores = run_session(reranker_ort, feeds)[0]
    new_scores = runners["reranker"](feeds)[0]

    atol, top10 = precision_row(precision).engine_gate
    results = []
    for graph, ref, new, feed, session in (("encoder", ref_emb, new_emb, passages, encoder_ort),
                                           ("reranker", ref_scores, new_scores, feeds, reranker_ort)):
        diff = float(np.abs(ref - new).max())
        identical = _top10_identical(ref, new) if graph == "reranker" else 1.0
        results.append(GraphCheck(precision, graph, diff, identical, _median_ms(runners[graph], feed),
                                  _median_ms(lambda f, s=session: run_session(s, f), feed),
                                  diff <= atol and identical >= top10))
    return results


def check_builds(builds: list[tuple[Path, str]], report: Path | None = None) -> list[GraphCheck]:
    """`resrank-export engines check`: every (build folder, precision); optionally a JSON report."""
    results = [r for build, precision in builds for r in check_build(Path(build), precision)]
    if report is not None:
        report.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return results


def render_checks(results: list[GraphCheck]) -> str:
    from resrank_export.engine.plan import render_table

    return render_table([("precision", "graph", "max |diff|", "top-10 same", "TensorRT ms", "ORT CPU ms", "gate")]
                        + [(r.precision, r.graph, f"{r.max_abs_diff:.2e}", f"{r.top10_identical:.2f}",
                            f"{r.tensorrt_ms:.2f}", f"{r.onnxruntime_ms:.2f}", "pass" if r.passed else "FAIL")
                           for r in results])
