"""`index --engine ray`: the index stage with its corpus encoding spread over a Ray cluster.

The driver streams the corpus (JSONL/TSV/BEIR through resrank's readers, parquet with `id`/`text`
columns through `ray.data.read_parquet`) into the same resumable chunk files as the
single-process build (`<out>.partial/NNNNNN.jsonl`: id-keyed records). A Ray Data pipeline over
the unfinished chunks runs `map_batches` with `ChunkEncoder`, a callable class holding the ONNX
Runtime session of the build's encoder graph, in an actor pool (`--actors`, `--gpus-per-actor`;
CUDA provider when the actor has a GPU). Each actor writes its chunk's vectors beside the records
(`NNNNNN.npy`, renamed into place last, so a rerun skips finished chunks and a retried task
rewrites the same file). The vectors, index.json and report are then written by the index
module's own assembly, so the folder is the layout that `search`, `triton` and `serve` read; an
IVF/IVF-PQ index is trained once there and filled by Ray tasks whose indexes the driver merges
(`_faiss_on_ray`: in memory, or into on-disk inverted lists).

The chunk folder must be visible to every worker (one machine, or a shared file system).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from resrank_export.data.readers import Passage
from resrank_export.errors import InputDataError, ResRankExportError
from resrank_export.fs import refuse_foreign_folder
from resrank_export.index.config import IndexConfig
from resrank_export.index.encode import (OnnxEncoder, chunk_paths, chunks_of, corpus_identity, corpus_passages,
                                         encoder_graph, open_work_dir)
from resrank_export.index.faiss_index import IVF_KINDS, add_rows, index_info, trained_index, write_faiss
from resrank_export.index.layout import FAISS_FILE, INDEX_FILE, IVF_LISTS_FILE, VECTORS_FILE
from resrank_export.index.stage import write_index_from_chunks
from resrank_export.lazy import require
from resrank_export.runtime import ort_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayIndexConfig:
    """The index stage's config plus where and how wide to encode."""

    index: IndexConfig
    address: str | None = None  # None: the running cluster, else a new local one
    actors: int = 2
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    rows_per_add_task: int = 1_000_000  # ivf/ivfpq: vectors one Ray task adds to a copy of the trained index
    on_disk_lists: bool = False  # ivf/ivfpq: merge the inverted lists into index.ivfdata (mmapped), not RAM

    def validate(self) -> None:
        self.index.validate()
        if self.index.source_index is not None:
            raise ResRankExportError("--engine ray encodes a corpus; --from-index reuses vectors without encoding")
        if self.actors < 1 or self.gpus_per_actor < 0 or self.cpus_per_actor <= 0 or self.rows_per_add_task < 1:
            raise ResRankExportError(f"expected actors >= 1, gpus per actor >= 0, cpus per actor > 0, rows per add "
                                     f"task >= 1; got {self.actors}, {self.gpus_per_actor}, {self.cpus_per_actor}, "
                                     f"{self.rows_per_add_task}")
        if self.on_disk_lists and self.index.kind not in IVF_KINDS:
            raise ResRankExportError(f"on-disk inverted lists need --index ivf or ivfpq; got {self.index.kind}")


class ChunkEncoder:
    """Ray Data callable class: one ONNX Runtime session per actor, one chunk per call."""

    def __init__(self, build: str, work: str, batch_size: int, vector_dtype: str, threads: int, gpu: bool):
        self.encoder = OnnxEncoder(build, batch_size=batch_size, threads=threads)
        if gpu:
            self.encoder.session = ort_session(encoder_graph(Path(build)),
                                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        self.work, self.vector_dtype = Path(work), vector_dtype

    def __call__(self, batch: dict) -> dict:
        rows = []
        for number in batch["chunk"].tolist():
            vectors_path, records_path = chunk_paths(self.work, number)
            with open(records_path, encoding="utf-8") as handle:
                texts = [json.loads(line)["text"] for line in handle]
            vectors = self.encoder.encode(texts).astype(self.vector_dtype)
            partial = vectors_path.with_name(f"{vectors_path.stem}.{os.getpid()}.tmp.npy")
            np.save(partial, vectors)
            os.replace(partial, vectors_path)
            rows.append(len(texts))
        return {"chunk": batch["chunk"], "rows": np.array(rows, dtype=np.int64)}


def _add_shard(trained: np.ndarray, vectors_file: str, start: int, stop: int, out: str, threads: int) -> str:
    """Ray task: rows [start, stop) added to a copy of the trained empty index, written to `out`
    (renamed into place, so a retried task rewrites the same file)."""
    faiss = require("faiss", "adding vectors to a FAISS index")
    faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(trained)
    add_rows(index, np.load(vectors_file, mmap_mode="r"), start, stop)
    written = f"{out}.{os.getpid()}.tmp"
    faiss.write_index(index, written)
    os.replace(written, out)
    return out


def _faiss_on_ray(config: RayIndexConfig, faiss, folder: Path, index_config: IndexConfig, count: int,
                  dim: int) -> dict:
    """`write_faiss` with the adding spread over Ray tasks (ivf, ivfpq): the quantizer is trained
    once on a sample, each task adds `rows_per_add_task` rows to a copy and writes it, and the
    driver merges the copies in row order (`merge_from`, or `merge_ondisk` into IVF_LISTS_FILE).
    The lists then hold the rows in the order one process adds them: the same index. Flat indexes
    are one copy of the vectors and HNSW graphs do not merge, so those are written as by one process."""
    if index_config.kind not in IVF_KINDS:
        return write_faiss(faiss, folder, index_config, count, dim)
    ray = _connect(config)  # not connected yet when every chunk was encoded by an earlier run
    index, params = trained_index(faiss, np.load(folder / VECTORS_FILE, mmap_mode="r"), index_config, count, dim)
    shards = folder / "faiss-shards"
    shards.mkdir()
    threads = max(1, int(config.cpus_per_actor))
    add = ray.remote(num_cpus=config.cpus_per_actor, max_retries=-1)(_add_shard)
    trained = ray.put(faiss.serialize_index(index))
    paths = ray.get([add.remote(trained, str((folder / VECTORS_FILE).resolve()), first,
                                min(count, first + config.rows_per_add_task),
                                str((shards / f"{number:06d}.faiss").resolve()), threads)
                     for number, first in enumerate(range(0, count, config.rows_per_add_task))])
    if config.on_disk_lists:
        from faiss.contrib.ondisk import merge_ondisk

        merge_ondisk(index, paths, str((folder / IVF_LISTS_FILE).resolve()))
    else:
        for path in paths:
            index.merge_from(faiss.read_index(path), 0)
    faiss.write_index(index, str(folder / FAISS_FILE))
    shutil.rmtree(shards)
    return index_info(index_config, count, dim, {**params, "on_disk_lists": True} if config.on_disk_lists else params)


def _parquet_passages(path: Path) -> Iterator[Passage]:
    """`id`/`text` rows of a parquet corpus, read by Ray Data in file order; the checks of the
    other readers (non-empty text, unique ids)."""
    ray_data = require("ray.data", "reading a parquet corpus")
    try:
        dataset = ray_data.read_parquet(str(path))
        columns = set(dataset.schema().names)
    except Exception as exc:  # pyarrow says why the file cannot be read
        raise InputDataError(f"{path}: not a readable parquet file ({exc})") from None
    if not {"id", "text"} <= columns:
        raise InputDataError(f"{path}: parquet corpus lacks column(s) {', '.join(sorted({'id', 'text'} - columns))}; "
                             "expected id and text")
    dataset = dataset.select_columns(["id", "text"])
    seen: set[str] = set()
    for row_number, row in enumerate(dataset.iter_rows(), 1):
        passage = Passage(str(row["id"]), str(row["text"] or "").strip())
        if not passage.text:
            raise InputDataError(f"{path}: row {row_number}: passage {passage.id!r} has empty text")
        if passage.id in seen:
            raise InputDataError(f"{path}: row {row_number}: duplicate passage id {passage.id!r}")
        seen.add(passage.id)
        yield passage


def _write_records(config: IndexConfig, work: Path) -> tuple[int, list[int]]:
    """Records of every chunk (kept when its vectors exist); returns (chunks, unfinished chunk numbers)."""
    corpus = config.corpus
    passages = _parquet_passages(Path(corpus)) if corpus and Path(corpus).suffix == ".parquet" else corpus_passages(corpus)
    pending, number = [], -1
    for number, chunk in enumerate(chunks_of(passages, config.chunk_size)):
        vectors_path, records_path = chunk_paths(work, number)
        if vectors_path.is_file():
            continue
        with open(records_path, "w", encoding="utf-8") as handle:
            for passage in chunk:
                handle.write(json.dumps({"id": passage.id, "text": passage.text}, ensure_ascii=False) + "\n")
        pending.append(number)
    return number + 1, pending


def _connect(config: RayIndexConfig):
    """The `ray` module, connected to the configured cluster (or the running one)."""
    ray = require("ray", "index --engine ray")
    if not ray.is_initialized():
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
    return ray


def _encode_on_ray(config: RayIndexConfig, work: Path, pending: list[int]) -> int:
    """Run the actor pool over the unfinished chunks; returns the passages encoded."""
    data = require("ray.data", "encoding on Ray")
    _connect(config)
    context = data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = data.from_items([{"chunk": n} for n in pending], override_num_blocks=len(pending))
    # Fault tolerance comes from Ray Data's actor pool defaults, max_restarts=-1 and
    # max_task_retries=-1: an actor whose process or node dies is restarted, and the chunks it
    # held are resubmitted, without limit (a resubmitted chunk rewrites the same file). They are
    # not passed here because map_batches takes them only through `**ray_remote_args`, deprecated
    # in Ray 2.60 and removed in 2.64; tests/index/test_ray_engine_faults.py fails if they change.
    # An exception raised by the encoder is not retried (no retry_exceptions): it would fail again.
    encoded = dataset.map_batches(
        ChunkEncoder, batch_size=1, compute=data.ActorPoolStrategy(size=min(config.actors, len(pending))),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        fn_constructor_kwargs={"build": str(Path(config.index.build).resolve()), "work": str(work.resolve()),
                               "batch_size": config.index.batch_size, "vector_dtype": config.index.vector_dtype,
                               "threads": max(1, int(config.cpus_per_actor)), "gpu": config.gpus_per_actor > 0})
    return int(sum(row["rows"] for row in encoded.take_all()))


def build_index_ray(config: RayIndexConfig) -> dict:
    """`build_index` with the encoding on Ray; returns the index.json content."""
    config.validate()
    index = config.index
    require("faiss", "building a FAISS index")  # fail before hours of encoding
    refuse_foreign_folder(index.out, INDEX_FILE, "an index folder")
    encoder = OnnxEncoder(index.build, batch_size=index.batch_size)  # checks the build; reports use it
    work = index.work_dir or index.out.parent / f".{index.out.name}.partial"
    open_work_dir(work, {"encoder_sha256": encoder.sha256, "corpus": corpus_identity(index.corpus),
                          "chunk_size": index.chunk_size, "vector_dtype": index.vector_dtype})
    start = time.perf_counter()
    chunks, pending = _write_records(index, work)
    if not chunks:
        shutil.rmtree(work, ignore_errors=True)
        raise InputDataError(f"{index.corpus}: the corpus holds no passages")
    log.info("encoding %d of %d chunks on Ray with %d actor(s)", len(pending), chunks, config.actors)
    encoded = _encode_on_ray(config, work, pending) if pending else 0
    missing = [n for n in range(chunks) if not chunk_paths(work, n)[0].is_file()]
    if missing:
        raise ResRankExportError(f"{work}: chunks {missing[:5]} have no vectors after the Ray run; rerun to resume")
    timings = {"encode_seconds": time.perf_counter() - start, "encoded_passages": encoded}
    return write_index_from_chunks(work, chunks, index, encoder, timings, start, partial(_faiss_on_ray, config))
