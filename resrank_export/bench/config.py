"""`BenchConfig` (smoke and full presets) and the text the benchmarks read: DL19 passages and
queries with their BM25 candidates, or the embedded standard-library corpus when no data folder
is given (with a note saying so in every result)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from resrank_export.data.readers import iter_passages, read_queries, read_trec_run
from resrank_export.errors import InputDataError, ResRankExportError
from resrank_export.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)
BENCHMARKS = ("encoder", "reranker", "served", "flops")
RUN_FILE = "run.bm25.trec"


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how big. Use `BenchConfig.full()` or `BenchConfig.smoke()` and replace
    fields; times are medians of `repeats` runs after `warmup` runs."""

    out: Path = Path("results")
    build: Path | None = None  # None: the demo checkpoint's build, made once and cached
    checkpoint: Path | None = None  # None: from <build>/manifest.json, else the demo checkpoint
    data: Path | None = None  # BEIR folder (corpus.jsonl, queries.jsonl, run.bm25.trec)
    only: tuple[str, ...] = BENCHMARKS
    preset: str = "full"
    threads: int = 0  # intra-op threads for torch and ONNX Runtime; 0: each library's default
    warmup: int = 1
    repeats: int = 3
    encoder_passages: int = 1000
    encoder_batch: int = 32
    reranker_ks: tuple[int, ...] = (10, 20, 50, 100)
    reranker_queries: int = 3  # each query is timed `repeats` times at every k
    served_concurrency: tuple[int, ...] = (1, 4, 16)
    # Requests timed per concurrency level (after `warmup` per client): at least `served_requests`,
    # and at least `served_requests_per_client` per client; 4 requests each at 16 clients left the
    # throughput to the slowest few (2x apart between runs).
    served_requests: int = 64
    served_requests_per_client: int = 16
    served_top_k: int = 20  # candidates per request of both ensembles
    served_passages: int = 1000  # passages in the served index
    served_batch_sizes: tuple[int, ...] = (8, 1)  # Triton max_batch_size: with, without batching
    # which graphs the served repository runs, and on what (triton/config.py TritonConfig fields)
    served_precision: str = "fp32"
    served_runtime: str = "auto"  # the default a user gets (triton/config.py resolve_cpu_runtime)
    served_openvino_compute: str = "f32"
    matmul_size: int = 2048  # square float32 matmul measuring the peak

    @classmethod
    def full(cls, **overrides) -> "BenchConfig":
        return cls(**overrides)

    @classmethod
    def smoke(cls, **overrides) -> "BenchConfig":
        """Seconds per benchmark: keeps them from rotting in CI; the numbers mean nothing."""
        return dataclasses.replace(cls(
            preset="smoke", warmup=1, repeats=2, encoder_passages=16, encoder_batch=8, reranker_ks=(2, 4),
            reranker_queries=1, served_concurrency=(1, 2), served_requests=4, served_requests_per_client=3,
            served_top_k=3, served_passages=24, served_batch_sizes=(4, 1), matmul_size=256), **overrides)

    def served_level_requests(self, concurrency: int) -> int:
        """Requests timed at one concurrency level of the served benchmark."""
        return max(self.served_requests, self.served_requests_per_client * concurrency)

    def validate(self) -> None:
        unknown = sorted(set(self.only) - set(BENCHMARKS))
        if unknown:
            raise ResRankExportError(f"--only {','.join(unknown)}: expected names from {','.join(BENCHMARKS)}")
        for name in ("repeats", "encoder_passages", "encoder_batch", "reranker_queries", "served_requests",
                     "served_requests_per_client", "served_top_k", "served_passages", "matmul_size"):
            if getattr(self, name) < 1:
                raise ResRankExportError(f"{name} is {getattr(self, name)}; expected an integer >= 1")
        if self.warmup < 0 or self.threads < 0:
            raise ResRankExportError("warmup and threads must be >= 0")


@dataclass(frozen=True)
class BenchData:
    source: str  # what the text is, in words (goes into every result)
    passages: list[str]  # encoder benchmark and served index
    queries: list[str]
    candidates: list[list[str]] = field(repr=False)  # per query, best first (BM25 for DL19)


def load_bench_data(data_dir: Path | None, passages: int, queries: int, k: int) -> BenchData:
    """`passages` corpus texts in file order, and `queries` queries with k candidates each."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not (data_dir / RUN_FILE).is_file():
            raise InputDataError(f"{data_dir / RUN_FILE}: file not found; --data must be a BEIR folder with "
                                 "corpus.jsonl, queries.jsonl and a BM25 run (e.g. TREC DL19)")
        run = read_trec_run(data_dir / RUN_FILE)
        texts_of_query = read_queries(data_dir)
        qids = [q for q in sorted(run) if q in texts_of_query and len(run[q]) >= k][:queries]
        if len(qids) < queries:
            raise InputDataError(f"{data_dir / RUN_FILE}: {len(qids)} queries have {k} candidates; need {queries}")
        wanted = {doc for q in qids for doc in run[q][:k]}
        corpus, texts = [], {}
        for passage in iter_passages(data_dir):
            if len(corpus) < passages:
                corpus.append(passage.text)
            if passage.id in wanted:
                texts[passage.id] = passage.text
        missing = wanted - set(texts)
        if missing:
            raise InputDataError(f"{data_dir / 'corpus.jsonl'}: run passage {sorted(missing)[0]} not in the corpus")
        if len(corpus) < passages:
            raise InputDataError(f"{data_dir / 'corpus.jsonl'}: {len(corpus)} passages; the benchmark needs {passages}")
        return BenchData(f"{data_dir.name} ({data_dir}): first {passages} corpus passages; {queries} queries "
                         f"with BM25 top-{k}", corpus, [texts_of_query[q] for q in qids],
                         [[texts[d] for d in run[q][:k]] for q in qids])
    from resrank_export.data.default_corpus import SAMPLE_QUERIES, stdlib_passages

    log.warning("bench: no --data folder; using the embedded standard-library corpus (not DL19)")
    pool = [p.text for p in stdlib_passages()]
    needed = max(passages, queries * k)
    if len(pool) < needed:
        raise InputDataError(f"embedded corpus has {len(pool)} passages; the benchmark needs {needed}")
    chosen = [SAMPLE_QUERIES[i % len(SAMPLE_QUERIES)] for i in range(queries)]
    return BenchData("embedded standard-library corpus (no --data given; figures are not DL19's)",
                     pool[:passages], chosen, [pool[i * k:(i + 1) * k] for i in range(queries)])


@dataclass(frozen=True)
class BenchContext:
    """What every benchmark reads: the build folder, its checkpoint, the text, the machine."""

    build: Path
    checkpoint: Checkpoint
    data: BenchData
    machine: dict
    threads: int = 0
    # the served path a user gets without flags (`triton --cpu-runtime auto` on this build and CPU):
    # runtime, compute, reason and `row`, the graph-row suffix the benchmarks report it under
    default_path: dict = field(default_factory=dict)


PRECISIONS = ("fp32", "fp16", "int8")
# Graph rows of the encoder and reranker benchmarks: (row suffix, precision, ORT-fused graph).
GRAPH_VARIANTS = (("fp32", "fp32", False), ("fp32-fused", "fp32", True), ("fp16", "fp16", False),
                  ("int8", "int8", False), ("int8-fused", "int8", True))


# OpenVINO rows (runtime.OpenVINOSession): (row suffix, precision of the graph, OpenVINO compute).
OPENVINO_VARIANTS = (("fp32", "fp32", "f32"), ("fp32-as-bf16", "fp32", "bf16"), ("int8", "int8", "f32"),
                     ("int8-bf16", "int8", "bf16"))


def default_path(build: Path, precision: str) -> dict:
    """What `triton` serves `precision` on without flags here (triton.config.resolve_cpu_runtime),
    with the graph-row suffix of the encoder and reranker benchmarks that runs the same way."""
    from resrank_export.triton.config import TritonConfig, resolve_cpu_runtime

    choice = resolve_cpu_runtime(TritonConfig(build=Path(build), out=Path(build) / "model_repository",
                                              precision=precision))
    if choice.runtime == "openvino":
        suffixes = [f"openvino-{s}" for s, p, compute in OPENVINO_VARIANTS if p == precision and compute == choice.compute]
    else:
        suffixes = [f"onnx-{s}" for s, p, fused in GRAPH_VARIANTS if p == precision and not fused]
    return {**choice.to_json(), "precision": precision, "row": suffixes[0] if suffixes else None}


def openvino_session_or_reason(build: Path, precision: str, name: str, compute: str, threads: int):
    """An OpenVINOSession of <build>/onnx/<precision>/<name>.onnx, or why there is none (no graph,
    OpenVINO not installed, or not able to load it)."""
    from resrank_export.errors import MissingDependencyError, NotAvailableError
    from resrank_export.runtime import OpenVINOSession

    graph, reason = graph_file(build, precision, name)
    if graph is None:
        return reason
    try:
        return OpenVINOSession(graph, threads=threads, compute=compute)
    except (MissingDependencyError, NotAvailableError) as exc:
        return str(exc)


def graph_file(build: Path, precision: str, name: str, fused: bool = False) -> tuple[Path | None, str]:
    """(<build>/onnx/<precision>/<name>[.ort].onnx, "") or (None, why it is not available)."""
    path = Path(build) / "onnx" / precision / f"{name}{'.ort' if fused else ''}.onnx"
    if path.is_file():
        return path, ""
    options = ([f"--precision {precision}"] if precision != "fp32" else []) + (["--ort-optimize"] if fused else [])
    hint = f" (made by `resrank-export build {' '.join(options)}`)" if options else ""
    return None, f"{path} not found{hint}"
