"""Corpus encoding with the exported encoder graph on ONNX Runtime, streamed in chunks saved to a
partial folder beside the index: memory stays bounded and an interrupted build resumes without
re-encoding finished chunks. The chunks are then assembled into the index folder's vectors, ids
and texts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from resrank_export.data.readers import Passage, iter_passages
from resrank_export.errors import InputDataError, ResRankExportError
from resrank_export.fs import sha256_file
from resrank_export.index.layout import IDS_FILE, TEXTS_FILE, VECTORS_FILE
from resrank_export.model.checkpoint import CONFIG_FILE, ResRankConfig
from resrank_export.model.text import PassageTokenizer
from resrank_export.runtime import encode_texts, ort_session

log = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"
ProgressHook = Callable[[int, int], None]  # (chunks done, passages done)


def encoder_graph(build_dir: Path) -> Path:
    """The exported encoder: onnx/fp32/, or the half graph of a build exported in FP16/BF16
    (`build --export-dtype`), which has no FP32 graph."""
    for dtype in ("fp32", "fp16", "bf16"):
        graph = Path(build_dir) / "onnx" / dtype / "encoder.onnx"
        if graph.is_file():
            return graph
    return Path(build_dir) / "onnx" / "fp32" / "encoder.onnx"  # missing: the caller names it


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
        self.tokenizer = PassageTokenizer.for_config(tokenizer_file, config)
        self.session = ort_session(graph, threads=threads)
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.sha256 = sha256_file(graph)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Passage vectors [n, D] float32 in input order, batched by length."""
        return encode_texts(self.session, self.tokenizer, texts, self.batch_size)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Query vectors [n, D] float32 (the checkpoint's query template applied)."""
        return encode_texts(self.session, self.tokenizer.queries, texts, self.batch_size)


def corpus_identity(corpus: Path | None) -> str:
    """What a resumed build must match: the corpus file's content hash."""
    if corpus is None:
        return f"stdlib-docstrings:python-{sys.version.split()[0]}"
    path = Path(corpus)
    path = path / "corpus.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise InputDataError(f"{path}: corpus file not found")
    return f"{path.resolve()}:{sha256_file(path)}"


def corpus_passages(corpus: Path | None) -> Iterator[Passage]:
    if corpus is None:
        from resrank_export.data.default_corpus import stdlib_passages

        return iter(stdlib_passages())
    return iter_passages(corpus)


def open_work_dir(work: Path, state: dict) -> None:
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


def chunks_of(passages: Iterable[Passage], size: int) -> Iterator[list[Passage]]:
    chunk: list[Passage] = []
    for passage in passages:
        chunk.append(passage)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def chunk_paths(work: Path, number: int) -> tuple[Path, Path]:
    return work / f"{number:06d}.npy", work / f"{number:06d}.jsonl"


def encode_chunks(passages: Iterator[Passage], encoder: OnnxEncoder, work: Path, chunk_size: int, vector_dtype: str,
                  corpus: Path | None, on_chunk: ProgressHook | None) -> tuple[int, int]:
    """Encode and save each chunk not saved yet; returns (chunks, passages encoded now). A chunk's
    vectors file is renamed into place last, so it marks the chunk as finished."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    done = encoded = 0
    columns = (TextColumn("encoding corpus"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("encode", total=_estimated_count(corpus))
        number = -1
        for number, chunk in enumerate(chunks_of(passages, chunk_size)):
            vectors_path, records_path = chunk_paths(work, number)
            if not vectors_path.is_file():
                with open(records_path, "w", encoding="utf-8") as handle:
                    for passage in chunk:
                        handle.write(json.dumps({"id": passage.id, "text": passage.text}, ensure_ascii=False) + "\n")
                vectors = encoder.encode([p.text for p in chunk]).astype(vector_dtype)
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


def assemble_chunks(work: Path, chunks: int, out: Path, store_texts: bool, dim: int, dtype: str) -> int:
    """Concatenate the chunks into vectors.npy, ids.json and texts.jsonl without holding the
    vectors in memory; returns the passage count."""
    counts = [np.load(chunk_paths(work, n)[0], mmap_mode="r").shape[0] for n in range(chunks)]
    total = sum(counts)
    vectors = np.lib.format.open_memmap(out / VECTORS_FILE, mode="w+", dtype=dtype, shape=(total, dim))
    ids: list[str] = []
    texts = open(out / TEXTS_FILE, "w", encoding="utf-8") if store_texts else None
    try:
        row = 0
        for number, count in enumerate(counts):
            vectors_path, records_path = chunk_paths(work, number)
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
