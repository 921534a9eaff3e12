"""The index stage (`build_index`): the corpus is encoded once with the exported encoder graph, and
those vectors serve both first-stage retrieval (FAISS) and the reranker's slot inputs. Encoding
resumes from finished chunks (`encode`); the index folder is written atomically and only ever
appears complete (layout: docs/index.md)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from resrank_export.errors import InputDataError
from resrank_export.fs import atomic_dir, link_or_copy, refuse_foreign_folder
from resrank_export.interrupt import note_kept
from resrank_export.index.config import IndexConfig
from resrank_export.index.encode import (
    OnnxEncoder,
    ProgressHook,
    assemble_chunks,
    corpus_identity,
    corpus_passages,
    encode_chunks,
    open_work_dir,
)
from resrank_export.index.faiss_index import IVF_KINDS, check_nlist, write_faiss
from resrank_export.index.layout import IDS_FILE, INDEX_FILE, TEXTS_FILE, VECTORS_FILE, read_index_info
from resrank_export.index.report import index_report, write_report
from resrank_export.index.retriever import Retriever, check_encoder_matches
from resrank_export.lazy import require

log = logging.getLogger(__name__)
# (faiss, folder holding vectors.npy, config, count, dim) -> index.json's FAISS fields; writes index.faiss
FaissWriter = Callable[[Any, Path, IndexConfig, int, int], dict]


def build_index(config: IndexConfig, on_chunk: ProgressHook | None = None) -> dict:
    """Encode the corpus (resuming finished chunks) and write the index folder atomically;
    returns the index.json content. With `config.source_index`, reuse that index's vectors."""
    config.validate()
    if config.source_index is not None:
        return _reindex(Path(config.source_index), config)
    require("faiss", "building a FAISS index")  # fail before hours of encoding
    refuse_foreign_folder(config.out, INDEX_FILE, "an index folder")
    if config.kind in IVF_KINDS and config.nlist is not None:  # a pass over the corpus, not hours of encoding
        check_nlist(config, sum(1 for _ in corpus_passages(config.corpus)))
    encoder = OnnxEncoder(config.build, batch_size=config.batch_size, precision=config.precision,
                          providers=config.providers)
    work = config.work_dir or config.out.parent / f".{config.out.name}.partial"
    state = {"encoder_sha256": encoder.sha256, "corpus": corpus_identity(config.corpus),
             "chunk_size": config.chunk_size, "vector_dtype": config.vector_dtype}
    open_work_dir(work, state)
    start = time.perf_counter()
    try:
        chunks, encoded = encode_chunks(corpus_passages(config.corpus), encoder, work, config.chunk_size,
                                        config.vector_dtype, config.corpus, on_chunk)
        if not chunks:
            raise InputDataError(f"{config.corpus}: the corpus holds no passages")
    except BaseException as exc:
        if not any(work.glob("*.npy")):  # nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
        else:
            note_kept(exc, f"{len(list(work.glob('[0-9]*[0-9].npy')))} encoded chunks in {work}")
        raise
    timings = {"encode_seconds": time.perf_counter() - start, "encoded_passages": encoded}
    return write_index_from_chunks(work, chunks, config, encoder, timings, start)


def write_index_from_chunks(work: Path, chunks: int, config: IndexConfig, encoder: OnnxEncoder, timings: dict,
                            start: float, faiss_writer: FaissWriter = write_faiss) -> dict:
    """The index folder from the finished chunks in `work` (then removed); also used by the Ray
    engine, whose `faiss_writer` adds the vectors to IVF indexes in Ray tasks."""
    with atomic_dir(config.out) as tmp:
        count = assemble_chunks(work, chunks, tmp, config.store_texts, encoder.dim, config.vector_dtype)
        info = _finish_index(tmp, config, encoder, count, config.store_texts, timings, start, faiss_writer)
    shutil.rmtree(work, ignore_errors=True)
    return info


def _reindex(source: Path, config: IndexConfig) -> dict:
    """Another index kind (or parameters) over an existing index's stored vectors, ids and
    texts. `config.corpus` only matters for the report's nDCG; the vector dtype is the source's."""
    source_info = read_index_info(source)
    refuse_foreign_folder(config.out, INDEX_FILE, "an index folder")
    encoder = OnnxEncoder(config.build, batch_size=config.batch_size,
                          precision=source_info.get("encoder_precision", config.precision))
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
                  timings: dict, start: float, faiss_writer: FaissWriter = write_faiss) -> dict:
    """FAISS index, index.json and the report, next to the vectors already in `folder`."""
    info = faiss_writer(require("faiss", "building a FAISS index"), folder, config, count, encoder.dim)
    recorded_build = Path(config.recorded_build or config.build).resolve()
    info.update(encoder_sha256=encoder.sha256, encoder_precision=encoder.precision, build=str(recorded_build),
                has_texts=has_texts)
    (folder / INDEX_FILE).write_text(json.dumps(info, indent=2) + "\n")
    timings["build_seconds"] = time.perf_counter() - start
    write_report(folder, index_report(Retriever.load(folder, encoder=encoder), config, timings))
    log.info("index of %d passages (%s) written to %s in %.1fs", count, config.kind, config.out,
             timings["build_seconds"])
    return info
