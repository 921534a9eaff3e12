"""The passage index: the corpus is encoded once with the exported encoder graph on ONNX Runtime,
and those vectors serve both first-stage retrieval (FAISS) and the reranker's slot inputs.

Encoding streams the corpus in chunks saved to a partial folder beside the index, so memory stays
bounded and an interrupted build resumes without re-encoding finished chunks. The index folder
itself is written atomically and only ever appears complete (layout: docs/index.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from resrank_export.checkpoint import CONFIG_FILE, ResRankConfig
from resrank_export.data import Passage, iter_passages
from resrank_export.errors import IndexFormatError, InputDataError, ResRankExportError
from resrank_export.fs import atomic_dir, link_or_copy, refuse_foreign_folder, sha256_file
from resrank_export.lazy import require
from resrank_export.runtime import encode_texts, ort_session
from resrank_export.text import PassageTokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("flat", "ivf", "hnsw", "ivfpq")
VECTOR_DTYPES = ("float32", "float16")
INDEX_FILE = "index.json"
FAISS_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.json"
TEXTS_FILE = "texts.jsonl"
PROGRESS_FILE = "progress.json"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
_RECALL_K = (10, 100)
_ADD_BLOCK = 65536  # rows copied from the memory-mapped vectors into FAISS at a time


def encoder_graph(build_dir: Path) -> Path:
    return Path(build_dir) / "onnx" / "fp32" / "encoder.onnx"


class OnnxEncoder:
    """The exported encoder graph on ONNX Runtime: the same graph and tokenization that serving
    uses, so index vectors and query vectors come from one model."""

    def __init__(self, build_dir: str | Path, batch_size: int = 32, threads: int = 0):
        build_dir = Path(build_dir)
        graph = encoder_graph(build_dir)
        tokenizer_file = build_dir / "tokenizer" / "encoder" / "tokenizer.json"
        config_file = build_dir / CONFIG_FILE
        for path in (graph, tokenizer_file, config_file):
            if not path.is_file():
                raise ResRankExportError(f"{path}: file not found; expected a build folder from "
                                         "'resrank-export build'")
        config = ResRankConfig.from_json(json.loads(config_file.read_text(encoding="utf-8")), config_file)
        self.build_dir = build_dir
        self.batch_size = batch_size
        self.tokenizer = PassageTokenizer(tokenizer_file, config.max_passage_tokens)
        self.session = ort_session(graph, threads=threads)
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.sha256 = sha256_file(graph)

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, D] float32 in input order, batched by length."""
        return encode_texts(self.session, self.tokenizer, texts, self.batch_size)


@dataclass(frozen=True)
class IndexConfig:
    """What to index and how. Unset kind parameters are derived from the corpus size."""

    build: Path
    corpus: Path | None  # None: the embedded standard-library corpus
    out: Path
    kind: str = "flat"
    vector_dtype: str = "float32"
    store_texts: bool = True
    chunk_size: int = 4096  # passages encoded and saved per resumable chunk
    batch_size: int = 32
    nlist: int | None = None  # ivf, ivfpq: default ~4*sqrt(N)
    nprobe: int | None = None  # ivf, ivfpq: default max(32, nlist/8)
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    pq_m: int | None = None  # ivfpq: sub-quantizers, default D/4 (a divisor of D)
    train_size: int = 100_000  # ivf, ivfpq: vectors sampled for training
    work_dir: Path | None = None  # partial chunks; default: .<out>.partial beside out
    source_index: Path | None = None  # reuse this index's vectors, ids and texts: no encoding
    recorded_build: Path | None = None  # build path for index.json when `build` is a temp folder
    eval_queries: int = 1000  # stored vectors used as queries for recall vs exact search


ProgressHook = Callable[[int, int], None]  # (chunks done, passages done)


def build_index(config: IndexConfig, on_chunk: ProgressHook | None = None) -> dict:
    """Encode the corpus (resuming finished chunks) and write the index folder atomically;
    returns the index.json content. With `config.source_index`, reuse that index's vectors."""
    _check_config(config)
    if config.source_index is not None:
        return _reindex(Path(config.source_index), config)
    require("faiss", "building a FAISS index")  # fail before hours of encoding
    refuse_foreign_folder(config.out, INDEX_FILE, "an index folder")
    encoder = OnnxEncoder(config.build, batch_size=config.batch_size)
    work = config.work_dir or config.out.parent / f".{config.out.name}.partial"
    state = {"encoder_sha256": encoder.sha256, "corpus": corpus_identity(config.corpus),
             "chunk_size": config.chunk_size, "vector_dtype": config.vector_dtype}
    _open_work_dir(work, state)
    start = time.perf_counter()
    try:
        chunks, encoded = _encode_chunks(_passages(config.corpus), encoder, work, config, on_chunk)
        if not chunks:
            raise InputDataError(f"{config.corpus}: the corpus holds no passages")
    except BaseException:
        if not any(work.glob("*.npy")):  # nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
        raise
    timings = {"encode_seconds": time.perf_counter() - start, "encoded_passages": encoded}
    return write_index_from_chunks(work, chunks, config, encoder, timings, start)


def write_index_from_chunks(work: Path, chunks: int, config: IndexConfig, encoder: OnnxEncoder, timings: dict,
                            start: float) -> dict:
    """The index folder from the finished chunks in `work` (then removed); also used by the Ray engine."""
    with atomic_dir(config.out) as tmp:
        count = _assemble(work, chunks, tmp, config.store_texts, encoder.dim, config.vector_dtype)
        info = _finish_index(tmp, config, encoder, count, config.store_texts, timings, start)
    shutil.rmtree(work, ignore_errors=True)
    return info


def _reindex(source: Path, config: IndexConfig) -> dict:
    """Another index kind (or parameters) over an existing index's stored vectors, ids and
    texts. `config.corpus` only matters for the report's nDCG; the vector dtype is the source's."""
    source_info = read_index_info(source)
    refuse_foreign_folder(config.out, INDEX_FILE, "an index folder")
    encoder = OnnxEncoder(config.build, batch_size=config.batch_size)
    check_encoder_matches(source_info, encoder, source)
    start = time.perf_counter()
    has_texts = source_info["has_texts"] and config.store_texts
    with atomic_dir(config.out) as tmp:
        for name in (VECTORS_FILE, IDS_FILE) + ((TEXTS_FILE,) if has_texts else ()):
            link_or_copy(str(source / name), str(tmp / name))
        config = replace(config, vector_dtype=source_info["vector_dtype"])
        timings = {"encode_seconds": 0.0, "encoded_passages": 0}
        return _finish_index(tmp, config, encoder, source_info["count"], has_texts, timings, start)


def _finish_index(folder: Path, config: IndexConfig, encoder: OnnxEncoder, count: int, has_texts: bool,
                  timings: dict, start: float) -> dict:
    """FAISS index, index.json and the report, next to the vectors already in `folder`."""
    info = _write_faiss(require("faiss", "building a FAISS index"), folder, config, count, encoder.dim)
    recorded_build = Path(config.recorded_build or config.build).resolve()
    info.update(encoder_sha256=encoder.sha256, build=str(recorded_build), has_texts=has_texts)
    (folder / INDEX_FILE).write_text(json.dumps(info, indent=2) + "\n")
    timings["build_seconds"] = time.perf_counter() - start
    write_report(folder, index_report(Retriever.load(folder, encoder=encoder), config, timings))
    log.info("index of %d passages (%s) written to %s in %.1fs", count, config.kind, config.out,
             timings["build_seconds"])
    return info


def _check_config(config: IndexConfig) -> None:
    if config.kind not in KINDS:
        raise ResRankExportError(f"index kind {config.kind!r}: expected one of {', '.join(KINDS)}")
    if config.vector_dtype not in VECTOR_DTYPES:
        raise ResRankExportError(f"vector dtype {config.vector_dtype!r}: expected one of {', '.join(VECTOR_DTYPES)}")
    if config.chunk_size < 1 or config.batch_size < 1:
        raise ResRankExportError("chunk size and batch size must be positive integers")


def corpus_identity(corpus: Path | None) -> str:
    """What a resumed build must match: the corpus file's content hash."""
    if corpus is None:
        return f"stdlib-docstrings:python-{sys.version.split()[0]}"
    path = Path(corpus)
    path = path / "corpus.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise InputDataError(f"{path}: corpus file not found")
    return f"{path.resolve()}:{sha256_file(path)}"


def _passages(corpus: Path | None) -> Iterator[Passage]:
    if corpus is None:
        from resrank_export.default_corpus import stdlib_passages

        return iter(stdlib_passages())
    return iter_passages(corpus)


def _open_work_dir(work: Path, state: dict) -> None:
    """Keep finished chunks only if they came from the same corpus, encoder and chunking."""
    progress = work / PROGRESS_FILE
    if progress.is_file():
        try:
            previous = json.loads(progress.read_text())
        except json.JSONDecodeError:
            previous = None
        if previous == state:
            log.info("resuming the interrupted index build in %s", work)
            return
        log.info("discarding %s: it was made from another corpus, encoder or chunk size", work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    progress.write_text(json.dumps(state, indent=2) + "\n")


def _chunks_of(passages: Iterable[Passage], size: int) -> Iterator[list[Passage]]:
    chunk: list[Passage] = []
    for passage in passages:
        chunk.append(passage)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _chunk_paths(work: Path, number: int) -> tuple[Path, Path]:
    return work / f"{number:06d}.npy", work / f"{number:06d}.jsonl"


def _encode_chunks(passages: Iterator[Passage], encoder: OnnxEncoder, work: Path, config: IndexConfig,
                   on_chunk: ProgressHook | None) -> tuple[int, int]:
    """Encode and save each chunk not saved yet; returns (chunks, passages encoded now). A chunk's
    vectors file is renamed into place last, so it marks the chunk as finished."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    done = encoded = 0
    columns = (TextColumn("encoding corpus"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("encode", total=_estimated_count(config.corpus))
        number = -1
        for number, chunk in enumerate(_chunks_of(passages, config.chunk_size)):
            vectors_path, records_path = _chunk_paths(work, number)
            if not vectors_path.is_file():
                with open(records_path, "w", encoding="utf-8") as handle:
                    for passage in chunk:
                        handle.write(json.dumps({"id": passage.id, "text": passage.text}, ensure_ascii=False) + "\n")
                vectors = encoder.encode([p.text for p in chunk]).astype(config.vector_dtype)
                partial = vectors_path.with_suffix(".tmp.npy")
                np.save(partial, vectors)
                os.replace(partial, vectors_path)
                encoded += len(chunk)
            done += len(chunk)
            progress.update(task, completed=done)
            if on_chunk is not None:
                on_chunk(number + 1, done)
    return number + 1, encoded


def _estimated_count(corpus: Path | None) -> int | None:
    """Line count of the corpus file (an upper bound of the passages) for the progress bar."""
    if corpus is None:
        return None
    path = Path(corpus) / "corpus.jsonl" if Path(corpus).is_dir() else Path(corpus)
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))


def _assemble(work: Path, chunks: int, out: Path, store_texts: bool, dim: int, dtype: str) -> int:
    """Concatenate the chunks into vectors.npy, ids.json and texts.jsonl without holding the
    vectors in memory; returns the passage count."""
    counts = [np.load(_chunk_paths(work, n)[0], mmap_mode="r").shape[0] for n in range(chunks)]
    total = sum(counts)
    vectors = np.lib.format.open_memmap(out / VECTORS_FILE, mode="w+", dtype=dtype, shape=(total, dim))
    ids: list[str] = []
    texts = open(out / TEXTS_FILE, "w", encoding="utf-8") if store_texts else None
    try:
        row = 0
        for number, count in enumerate(counts):
            vectors_path, records_path = _chunk_paths(work, number)
            vectors[row:row + count] = np.load(vectors_path)
            row += count
            with open(records_path, encoding="utf-8") as handle:
                for line in handle:
                    ids.append(json.loads(line)["id"])
                    if texts is not None:
                        texts.write(line)
    finally:
        if texts is not None:
            texts.close()
    vectors.flush()
    del vectors
    (out / IDS_FILE).write_text(json.dumps(ids, ensure_ascii=False) + "\n", encoding="utf-8")
    return total


def _kind_params(config: IndexConfig, count: int, dim: int) -> dict:
    if config.kind == "flat":
        return {}
    if config.kind == "hnsw":
        return {"M": config.hnsw_m, "efConstruction": config.ef_construction, "efSearch": config.ef_search}
    nlist = config.nlist or max(1, min(round(4 * math.sqrt(count)), count // 39))
    # SciFact/MiniLM (nlist 132): nprobe 16 gives recall@10 0.91 against exact search, 32 gives 0.97.
    nprobe = min(nlist, config.nprobe or max(32, nlist // 8))
    params = {"nlist": nlist, "nprobe": nprobe, "train_size": min(count, config.train_size)}
    if config.kind == "ivfpq":
        pq_m = config.pq_m or max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
        if dim % pq_m:
            raise ResRankExportError(f"pq_m {pq_m} must divide the vector dimension {dim}")
        # FAISS needs at least one training vector per centroid (2**bits per sub-quantizer).
        bits = int(min(8, math.floor(math.log2(max(2, params["train_size"])))))
        params.update(pq_m=pq_m, pq_bits=bits)
    return params


def _write_faiss(faiss, out: Path, config: IndexConfig, count: int, dim: int) -> dict:
    params = _kind_params(config, count, dim)
    vectors = np.load(out / VECTORS_FILE, mmap_mode="r")
    index = _new_index(faiss, config.kind, dim, params)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(count, size=params["train_size"], replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    for start in range(0, count, _ADD_BLOCK):
        index.add(np.ascontiguousarray(vectors[start:start + _ADD_BLOCK], dtype=np.float32))
    faiss.write_index(index, str(out / FAISS_FILE))
    return {"format_version": FORMAT_VERSION, "complete": True, "kind": config.kind, "dim": dim,
            "count": count, "vector_dtype": config.vector_dtype, "metric": "inner_product",
            "params": params}


def _new_index(faiss, kind: str, dim: int, params: dict):
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], metric)
        index.hnsw.efConstruction = params["efConstruction"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], metric)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["pq_bits"], metric)
        # Small corpora train 256 centroids per sub-quantizer on fewer than FAISS's advised 39
        # points each; that is accepted (and reported as recall), not warned about once per sub-quantizer.
        index.pq.cp.min_points_per_centroid = 1
    return index


def _apply_search_params(faiss, index, kind: str, params: dict) -> None:
    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    elif kind == "hnsw":
        index.hnsw.efSearch = params["efSearch"]


@dataclass(frozen=True)
class SearchResult:
    ids: list[str]
    scores: np.ndarray  # [k] float32, descending
    vectors: np.ndarray  # [k, D] float32: the stored slot vectors of the hits


class Retriever:
    """A loaded index: FAISS search plus the stored slot vectors and ids; with a build folder
    it also encodes queries (checked to be the encoder that made the index)."""

    def __init__(self, folder: Path, info: dict, index, vectors: np.ndarray, ids: list[str],
                 encoder: OnnxEncoder | None):
        self.folder = folder
        self.info = info
        self.index = index
        self.vectors = vectors
        self.ids = ids
        self.encoder = encoder
        self._text_offsets: dict[str, int] | None = None

    @classmethod
    def load(cls, index_dir: str | Path, build_dir: str | Path | None = None,
             encoder: OnnxEncoder | None = None) -> "Retriever":
        """`build_dir` (or an already loaded `encoder`) enables search by text."""
        folder = Path(index_dir)
        info = read_index_info(folder)
        faiss = require("faiss", "loading a FAISS index")
        index = faiss.read_index(str(folder / FAISS_FILE))
        _apply_search_params(faiss, index, info["kind"], info["params"])
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
        ids = json.loads((folder / IDS_FILE).read_text(encoding="utf-8"))
        if index.ntotal != info["count"] or vectors.shape != (info["count"], info["dim"]) or len(ids) != info["count"]:
            raise IndexFormatError(f"{folder}: index.faiss ({index.ntotal}), vectors.npy {vectors.shape} and "
                                   f"ids.json ({len(ids)}) disagree with {INDEX_FILE} (count {info['count']})")
        if encoder is None and build_dir is not None:
            encoder = OnnxEncoder(build_dir)
        if encoder is not None:
            check_encoder_matches(info, encoder, folder)
        return cls(folder, info, index, vectors, ids, encoder)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def search(self, query: str, k: int) -> SearchResult:
        return self.search_texts([query], k)[0]

    def search_texts(self, queries: list[str], k: int) -> list[SearchResult]:
        """Encode the queries (one batch) and search; hits an approximate index could not fill
        are left out."""
        if self.encoder is None:
            raise ResRankExportError(f"{self.folder}: searching by text needs the build folder "
                                     "(Retriever.load(index_dir, build_dir))")
        ids, scores, vectors = self.search_vectors(self.encoder.encode(list(queries)), k)
        results = []
        for row_ids, row_scores, row_vectors in zip(ids, scores, vectors):
            found = len([i for i in row_ids if i])
            results.append(SearchResult(row_ids[:found], row_scores[:found], row_vectors[:found]))
        return results

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
        """Top-k for a batch of query vectors: ids [B][k], scores [B, k], slot vectors [B, k, D].
        k is capped at the corpus size; a slot an approximate index could not fill (rare, small
        nprobe) has id "", score -inf and a zero vector."""
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ResRankExportError(f"query vectors have shape {queries.shape}; expected [batch, {self.dim}]")
        if k < 1:
            raise ResRankExportError(f"k must be at least 1, got {k}")
        k = min(k, len(self.ids))
        scores, rows = self.index.search(queries, k)
        missing = rows < 0
        vectors = np.asarray(self.vectors[np.where(missing, 0, rows).ravel()], dtype=np.float32)
        vectors = vectors.reshape(len(queries), k, self.dim)
        vectors[missing] = 0.0
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        ids = [[self.ids[r] if r >= 0 else "" for r in row] for row in rows]
        return ids, scores, vectors

    def texts(self, ids: list[str]) -> list[str]:
        """Stored passage texts (display); read by seeking, so the texts stay on disk."""
        if not self.info.get("has_texts"):
            raise ResRankExportError(f"{self.folder}: the index was built without passage texts")
        if self._text_offsets is None:
            offsets, position = {}, 0
            with open(self.folder / TEXTS_FILE, "rb") as handle:
                for line, passage_id in zip(handle, self.ids):
                    offsets[passage_id] = position
                    position += len(line)
            self._text_offsets = offsets
        texts = []
        with open(self.folder / TEXTS_FILE, "rb") as handle:
            for passage_id in ids:
                if passage_id not in self._text_offsets:
                    raise ResRankExportError(f"{self.folder}: unknown passage id {passage_id!r}")
                handle.seek(self._text_offsets[passage_id])
                texts.append(json.loads(handle.readline())["text"])
        return texts


@dataclass(frozen=True)
class SearchConfig:
    index: Path
    query: str | None = None  # one query text (its query_id is None) ...
    queries_file: Path | None = None  # ... or a queries.jsonl ({_id|id, text}) / BEIR folder
    top_k: int = 10
    build: Path | None = None  # encoder for the queries; default: the build recorded in index.json
    batch_size: int = 64


@dataclass(frozen=True)
class QueryHits:
    query_id: str | None
    query: str
    result: SearchResult
    texts: list[str] | None  # stored passage texts of the hits, when the index has them


def run_search(config: SearchConfig) -> Iterator[QueryHits]:
    """Search every query of `config`, encoding them in batches; yields results in query order."""
    if (config.query is None) == (config.queries_file is None):
        raise ResRankExportError("give exactly one of a query text (--query) or a queries file (--queries)")
    from resrank_export.data import read_queries

    queries = [(None, config.query)] if config.query is not None else list(read_queries(config.queries_file).items())
    info = read_index_info(Path(config.index))
    retriever = Retriever.load(config.index, config.build or info["build"])
    for start in range(0, len(queries), config.batch_size):
        batch = queries[start:start + config.batch_size]
        for (query_id, query), result in zip(batch, retriever.search_texts([q for _, q in batch], config.top_k)):
            texts = retriever.texts(result.ids) if info["has_texts"] else None
            yield QueryHits(query_id, query, result, texts)


def read_index_info(folder: Path) -> dict:
    """index.json of a complete index, or IndexFormatError saying what is wrong."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        partial = folder.parent / f".{folder.name}.partial"
        hint = (f"; {partial} holds an interrupted build: rerun the index build to resume it"
                if partial.is_dir() else "")
        raise IndexFormatError(f"{path}: not found, {folder} is not a complete index{hint}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IndexFormatError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION or info.get("complete") is not True:
        raise IndexFormatError(f"{path}: expected format_version {FORMAT_VERSION} and complete true")
    for name in (FAISS_FILE, VECTORS_FILE, IDS_FILE) + ((TEXTS_FILE,) if info.get("has_texts") else ()):
        if not (folder / name).is_file():
            raise IndexFormatError(f"{folder / name}: file not found; the index is incomplete")
    return info


def check_encoder_matches(info: dict, encoder: OnnxEncoder, folder: Path) -> None:
    """Query vectors must come from the encoder that made the index, else scores are meaningless."""
    if info["dim"] != encoder.dim:
        raise IndexFormatError(f"{folder / INDEX_FILE}: index dim {info['dim']} does not match the encoder "
                               f"dim {encoder.dim} of {encoder_graph(encoder.build_dir)}")
    if info["encoder_sha256"] != encoder.sha256:
        raise IndexFormatError(f"{folder / INDEX_FILE}: encoder_sha256 {info['encoder_sha256'][:12]}... does "
                               f"not match {encoder_graph(encoder.build_dir)} ({encoder.sha256[:12]}...); "
                               "rebuild the index with this build's encoder")


def index_report(retriever: Retriever, config: IndexConfig, timings: dict) -> dict:
    """Build time, bytes per passage, recall@10/@100 of an approximate index against exact search
    and, when the corpus is a BEIR folder with judged queries, nDCG@10. Recall queries are those
    BEIR queries, else a seeded sample of stored passage vectors."""
    from resrank_export.evaluation import evaluate_beir, is_beir_folder, judged_queries, recall_against_exact

    info, count = retriever.info, retriever.info["count"]
    report = {
        "kind": info["kind"], "count": count, "dim": info["dim"], "vector_dtype": info["vector_dtype"],
        "params": info["params"], "build_seconds": round(timings["build_seconds"], 3),
        "encode_seconds": round(timings["encode_seconds"], 3), "encoded_passages": timings["encoded_passages"],
        "passages_per_second": round(timings["encoded_passages"] / max(timings["encode_seconds"], 1e-9), 1),
        "bytes_per_passage": {name: round((retriever.folder / name).stat().st_size / count, 1)
                              for name in (FAISS_FILE, VECTORS_FILE)},
    }
    if is_beir_folder(config.corpus):
        _, queries = judged_queries(Path(config.corpus))
        query_vectors = retriever.encoder.encode(list(queries.values()))
        report["ndcg@10"] = round(evaluate_beir(retriever, Path(config.corpus))["ndcg@10"], 4)
        report["queries"] = f"{len(queries)} judged queries of {config.corpus}"
    else:
        rows = np.sort(np.random.default_rng(0).choice(count, size=min(count, config.eval_queries), replace=False))
        query_vectors = np.asarray(retriever.vectors[rows], dtype=np.float32)
        report["queries"] = f"{len(rows)} stored passage vectors (seeded sample)"
    if info["kind"] != "flat":
        ids, _, _ = retriever.search_vectors(query_vectors, max(_RECALL_K))
        exact = _exact_ids(retriever, query_vectors, max(_RECALL_K))
        report.update({f"recall@{k}": round(recall_against_exact(ids, exact, k), 4) for k in _RECALL_K})
    return report


def _exact_ids(retriever: Retriever, query_vectors: np.ndarray, k: int) -> list[list[str]]:
    faiss = require("faiss", "exact search")
    exact = faiss.IndexFlatIP(retriever.dim)
    for start in range(0, len(retriever.ids), _ADD_BLOCK):
        exact.add(np.ascontiguousarray(retriever.vectors[start:start + _ADD_BLOCK], dtype=np.float32))
    _, rows = exact.search(np.ascontiguousarray(query_vectors), min(k, len(retriever.ids)))
    return [[retriever.ids[r] for r in row if r >= 0] for row in rows]


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Index report", "", "| figure | value |", "|---|---|"]
    for key, value in report.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        lines.append(f"| {key} | {shown} |")
    (folder / REPORT_MD).write_text("\n".join(lines) + "\n")
