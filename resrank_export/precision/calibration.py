"""INT8 calibration sets built from real text. TensorRT 10+ no longer calibrates: the scales are
decided in the ONNX graph (Q/DQ), so the data the scales come from is an artifact of its own,
stored as one `.npz` per graph (keyed by graph input names) and a JSON card saying where it
came from, so a quantized graph can be traced back to the text it was calibrated on."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resrank_export.data.readers import Passage, iter_passages, read_queries, read_trec_run
from resrank_export.errors import InputDataError
from resrank_export.export.parity import RUN_FILE
from resrank_export.fs import atomic_dir, sha256_file
from resrank_export.model.checkpoint import Checkpoint, scaled_sample_size
from resrank_export.model.reference import passage_tokenizer, prompt_builder
from resrank_export.model.specs import GraphSpec, numpy_dtype

log = logging.getLogger(__name__)
CARD_FILE = "card.json"
PSEUDO_QUERY_WORDS = 12
RETRIEVAL_POOL = 2000  # the default pool at demo size
ENCODE_ROWS = 32  # rows per encoder run (batches are also bounded by runtime.BATCH_TOKENS)


@dataclass(frozen=True)
class CalibrationConfig:
    corpus: Path | None = None  # BEIR folder, JSONL/TSV/text passages; None = embedded corpus
    encoder_samples: int = 64
    reranker_queries: int = 16
    candidates: int | None = None  # per reranker query; None = the checkpoint's max_candidates
    # passages searched for candidates when there is no run file; None: 2000, fewer for models past
    # 50M parameters (model.checkpoint.scaled_sample_size), never fewer than the candidates
    retrieval_pool: int | None = None
    seed: int = 0
    device: str = "cpu"  # where the slot vectors are made (cuda: the reference or the FP32 graph on the GPU)


def _reservoir(passages, n: int, rng: np.random.Generator) -> tuple[list[Passage], int]:
    """Uniform seeded sample of n passages in one pass (keeps the corpus length distribution
    without holding the corpus); returns (sample in corpus order, corpus size)."""
    sample: list[tuple[int, Passage]] = []
    count = 0
    for count, passage in enumerate(passages, 1):
        if len(sample) < n:
            sample.append((count, passage))
        else:
            j = int(rng.integers(0, count))
            if j < n:
                sample[j] = (count, passage)
    return [p for _, p in sorted(sample, key=lambda x: x[0])], count


def _source_passages(config: CalibrationConfig):
    if config.corpus is None:
        from resrank_export.data.default_corpus import stdlib_passages

        return "embedded standard-library corpus", iter(stdlib_passages())
    return str(Path(config.corpus).resolve()), iter_passages(config.corpus)


def _length_stats(lengths: list[int]) -> dict:
    values = np.asarray(lengths)
    return {"min": int(values.min()), "mean": round(float(values.mean()), 2),
            "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "max": int(values.max())}


def _queries(config: CalibrationConfig, pool: list[Passage], rng: np.random.Generator) -> tuple[list[str], list[str], str]:
    """(query ids, texts, kind): the corpus' queries.jsonl when it has one, the embedded sample
    queries for the embedded corpus, else pseudo-queries (the first words of pool passages)."""
    folder = Path(config.corpus) if config.corpus is not None else None
    if folder is not None and folder.is_dir() and (folder / "queries.jsonl").is_file():
        queries = read_queries(folder)
        if (folder / RUN_FILE).is_file():
            run = read_trec_run(folder / RUN_FILE)
            queries = {q: t for q, t in queries.items() if q in run}
        kind = "queries.jsonl"
    elif folder is None:
        from resrank_export.data.default_corpus import SAMPLE_QUERIES

        queries = {f"sample-{i}": q for i, q in enumerate(SAMPLE_QUERIES)}
        kind = "embedded sample queries"
    else:
        queries = {f"pseudo-{p.id}": " ".join(p.text.split()[:PSEUDO_QUERY_WORDS]) for p in pool}
        kind = f"pseudo-queries (first {PSEUDO_QUERY_WORDS} words of corpus passages)"
    qids = sorted(queries)
    chosen = sorted(rng.choice(len(qids), size=min(config.reranker_queries, len(qids)), replace=False))
    return [qids[i] for i in chosen], [queries[qids[i]] for i in chosen], kind


def _candidates(config: CalibrationConfig, qids: list[str], query_vectors: np.ndarray, pool: list[Passage],
                pool_vectors: np.ndarray, k: int) -> tuple[list[list[str]], str]:
    """Candidate passage ids per query: the run file's top-k, else exact search in the pool."""
    folder = Path(config.corpus) if config.corpus is not None else None
    if folder is not None and folder.is_dir() and (folder / RUN_FILE).is_file():
        run = read_trec_run(folder / RUN_FILE)
        return [run[q][:k] for q in qids], f"{RUN_FILE} top-{k}"
    order = np.argsort(-(query_vectors @ pool_vectors.T), axis=1, kind="stable")[:, :k]
    return [[pool[i].id for i in row] for row in order], f"FP32 exact search top-{k} over {len(pool)} sampled passages"


def _vector_encoder(checkpoint: Checkpoint, config: CalibrationConfig, encoder_graph: Path | None, tokenizer):
    """(encode passages, encode queries, description): the build's FP32 encoder graph when there is
    one (parity has checked it against the reference; ONNX Runtime runs it about twice as fast as
    PyTorch on a CPU), else the PyTorch reference computing in FP32."""
    if encoder_graph is None:
        from resrank_export.model.reference import ResRankReference

        reference = ResRankReference(checkpoint, device=config.device)
        return reference.encode, reference.encode_queries, "the PyTorch reference encoder (FP32 arithmetic)"
    from resrank_export.runtime import encode_texts, execution_providers, graph_session

    session = graph_session(encoder_graph, execution_providers("cuda") if config.device == "cuda" else None)
    return (lambda texts: encode_texts(session, tokenizer, texts, ENCODE_ROWS),
            lambda texts: encode_texts(session, tokenizer.queries, texts, ENCODE_ROWS),
            f"the FP32 encoder graph {Path(encoder_graph).name}")


def build_calibration_set(checkpoint: Checkpoint, out: Path, config: CalibrationConfig,
                          encoder_graph: Path | None = None) -> dict:
    """Write `<out>/encoder.npz`, `<out>/reranker.npz` and `<out>/card.json`; returns the card.
    Slot vectors come from `encoder_graph` (an FP32 graph) when given, else from the PyTorch
    reference encoder (FP32 arithmetic)."""
    from resrank_export.export.onnx import graph_specs

    if config.encoder_samples < 1 or config.reranker_queries < 1:
        raise InputDataError("calibration sizes must be >= 1 (encoder_samples, reranker_queries)")
    rng = np.random.default_rng(config.seed)
    source, passages = _source_passages(config)
    k = min(config.candidates or checkpoint.config.max_candidates, checkpoint.config.max_candidates)
    pool_size = max(config.encoder_samples, config.retrieval_pool or scaled_sample_size(RETRIEVAL_POOL, checkpoint, k))
    pool, corpus_size = _reservoir(passages, pool_size, rng)
    if corpus_size == 0:
        raise InputDataError(f"{source}: corpus is empty; calibration needs real passages")
    if corpus_size < config.encoder_samples:
        raise InputDataError(f"{source}: corpus has {corpus_size} passages, fewer than the "
                             f"{config.encoder_samples} encoder calibration samples requested")
    picked = sorted(rng.choice(len(pool), size=config.encoder_samples, replace=False))
    encoder_texts = [pool[i].text for i in picked]

    tokenizer = passage_tokenizer(checkpoint)  # one load of the (151k-id at Qwen3) tokenizer
    encode, encode_queries, vector_source = _vector_encoder(checkpoint, config, encoder_graph, tokenizer)
    encoder_inputs = tokenizer(encoder_texts)
    lengths = [int(n) for n in encoder_inputs["attention_mask"].sum(1)]

    qids, query_texts, query_kind = _queries(config, pool, rng)
    folder = Path(config.corpus) if config.corpus is not None else None
    has_run = folder is not None and folder.is_dir() and (folder / RUN_FILE).is_file()
    if has_run:
        pool_vectors = np.zeros((0, checkpoint.encoder_dim), dtype=np.float32)
    else:
        k = min(k, len(pool))
        pool_vectors = encode([p.text for p in pool])
    query_vectors = encode_queries(query_texts)
    candidate_ids, candidate_kind = _candidates(config, qids, query_vectors, pool, pool_vectors, k)
    short = [q for q, ids in zip(qids, candidate_ids) if len(ids) < k]
    if short:
        raise InputDataError(f"{source}: query {short[0]!r} has fewer than {k} candidates in the run")
    if has_run:  # each run passage encoded once, however many queries list it
        wanted = {d for ids in candidate_ids for d in ids}
        texts_by_id = {p.id: p.text for p in iter_passages(folder) if p.id in wanted}
        missing = sorted(wanted - set(texts_by_id))
        if missing:
            raise InputDataError(f"{source}: run passage {missing[0]!r} is not in the corpus")
        vectors_by_id = dict(zip(texts_by_id, encode(list(texts_by_id.values()))))
    else:  # the candidates are pool passages, encoded above
        vectors_by_id = {p.id: vector for p, vector in zip(pool, pool_vectors)}
    slot_vectors = np.stack([[vectors_by_id[d] for d in ids] for ids in candidate_ids])
    reranker_inputs = prompt_builder(checkpoint).batch(query_texts, k)
    reranker_inputs["passage_embeddings"] = slot_vectors.astype(np.float32)

    encoder_graph, reranker_graph = graph_specs(checkpoint)
    with atomic_dir(Path(out)) as work:
        np.savez(work / "encoder.npz", **{n: encoder_inputs[n] for n in encoder_graph.input_names})
        np.savez(work / "reranker.npz", **{n: reranker_inputs[n] for n in reranker_graph.input_names})
        card = {
            "source": source,
            "seed": config.seed,
            "corpus_passages": corpus_size,
            "encoder": {"samples": len(encoder_texts), "token_lengths": _length_stats(lengths),
                        "max_passage_tokens": checkpoint.config.max_passage_tokens,
                        "sha256": sha256_file(work / "encoder.npz")},
            "reranker": {"queries": len(query_texts), "query_source": query_kind, "candidates": k,
                         "candidate_source": candidate_kind, "slot_vectors": vector_source,
                         "prompt_tokens": _length_stats([int(n) for n in reranker_inputs["attention_mask"].sum(1)]),
                         "query_ids": qids, "sha256": sha256_file(work / "reranker.npz")},
        }
        (work / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log.info("calibration set: %d encoder samples, %d reranker queries x %d candidates -> %s",
             len(encoder_texts), len(query_texts), k, out)
    return card


def calibrate_checkpoint(checkpoint_dir: Path | None, out: Path, config: CalibrationConfig) -> dict:
    """`calibrate` command: the checkpoint folder (default: the demo one) -> calibration set."""
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import default_checkpoint

    if Path(out).exists():
        raise InputDataError(f"{out}: already exists; choose a new --out folder")
    return build_calibration_set(load_checkpoint(checkpoint_dir or default_checkpoint()), out, config)


def load_calibration(path: Path, spec: GraphSpec) -> dict[str, np.ndarray]:
    """Arrays of `<path>/<graph>.npz` (or the .npz itself), checked against the graph's input
    names, dtypes and fixed dims so a mismatch fails here, not deep inside ONNX Runtime."""
    path = Path(path)
    file = path / f"{spec.name}.npz" if path.is_dir() else path
    if not file.is_file():
        raise InputDataError(f"{file}: calibration file not found")
    try:
        with np.load(file) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{file}: not a readable .npz file ({exc})") from None
    missing = [n for n in spec.input_names if n not in arrays]
    extra = sorted(set(arrays) - set(spec.input_names))
    if missing or extra:
        raise InputDataError(f"{file}: inputs {sorted(arrays)} do not match the {spec.name} graph; expected "
                             f"{spec.input_names}" + (f" (missing {missing})" if missing else "")
                             + (f" (unexpected {extra})" if extra else ""))
    sizes: dict[str, tuple[str, int]] = {}  # symbolic dim -> (first input holding it, size)
    for name in spec.input_names:
        tensor, array = spec.tensor(name), arrays[name]
        if array.ndim != len(tensor.dims):
            raise InputDataError(f"{file}: '{name}' has {array.ndim} dims {array.shape}, expected "
                                 f"{len(tensor.dims)} {tensor.dims}")
        for axis, (dim, size) in enumerate(zip(tensor.dims, array.shape)):
            if isinstance(dim, int) and dim != size:
                raise InputDataError(f"{file}: '{name}' dim {axis} is {size}, expected {dim}")
            first, seen = sizes.setdefault(str(dim), (name, size))
            if seen != size:
                raise InputDataError(f"{file}: '{name}' dim {axis} ({dim}) is {size} but '{first}' has {seen}")
        if array.dtype != numpy_dtype(tensor):
            raise InputDataError(f"{file}: '{name}' has dtype {array.dtype}, expected {tensor.dtype}")
    return arrays
