"""Index shards for `triton --index-shards N`: one index folder (same layout as `resrank-export
index` writes) per contiguous slice of the rows, and the merge of the shards' top-k that the
`faiss_lookup` router model returns.

Each shard's FAISS index is the source index emptied (`reset`: an IVF/IVF-PQ index keeps its
trained quantizer and codebooks) and refilled with the shard's rows, in memory (also when the
source keeps its inverted lists on disk). Flat, IVF and IVF-PQ shards
therefore score every vector as the source does, and the merged top-k equals the source's: IVF
shards probe the same lists. HNSW graphs are rebuilt per shard, so their merge is as
approximate as HNSW itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from resrank_export.errors import ResRankExportError
from resrank_export.index.faiss_index import empty_copy, read_faiss
from resrank_export.index.layout import FAISS_FILE, IDS_FILE, INDEX_FILE, TEXTS_FILE, VECTORS_FILE, read_index_info
from resrank_export.lazy import require

_COPY_BLOCK = 65536  # rows copied between memory-mapped vector files at a time


def shard_model_name(number: int) -> str:
    return f"faiss_lookup_{number}"


def shard_bounds(count: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of `shards` contiguous slices, sizes differing by at most one."""
    if not 2 <= shards <= count:
        raise ResRankExportError(f"--index-shards {shards}: expected 2..{count} (the index holds {count} passages)")
    edges = [count * i // shards for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def split_index(source: Path, folders: list[Path]) -> list[dict]:
    """Write one shard index folder per entry of `folders`; returns their index.json contents.
    A shard's index.json records its slice under "shard"."""
    source = Path(source)
    info = read_index_info(source)
    bounds = shard_bounds(int(info["count"]), len(folders))
    faiss = require("faiss", "splitting a FAISS index")
    full = read_faiss(faiss, source, info)
    vectors = np.load(source / VECTORS_FILE, mmap_mode="r")
    ids = json.loads((source / IDS_FILE).read_text(encoding="utf-8"))
    in_memory_params = {k: v for k, v in info["params"].items() if k != "on_disk_lists"}  # shards hold their lists
    infos = []
    for number, (folder, (start, stop)) in enumerate(zip(folders, bounds)):
        folder.mkdir(parents=True, exist_ok=True)
        shard = np.lib.format.open_memmap(folder / VECTORS_FILE, mode="w+", dtype=vectors.dtype,
                                          shape=(stop - start, vectors.shape[1]))
        index = empty_copy(faiss, full, info)
        for row in range(start, stop, _COPY_BLOCK):
            block = vectors[row:min(stop, row + _COPY_BLOCK)]
            shard[row - start:row - start + len(block)] = block
            index.add(np.ascontiguousarray(block, dtype=np.float32))
        shard.flush()
        del shard
        faiss.write_index(index, str(folder / FAISS_FILE))
        (folder / IDS_FILE).write_text(json.dumps(ids[start:stop], ensure_ascii=False) + "\n", encoding="utf-8")
        shard_info = {**info, "count": stop - start, "params": in_memory_params,
                      "shard": {"number": number, "of": len(folders), "first_row": start, "source_count": info["count"]}}
        (folder / INDEX_FILE).write_text(json.dumps(shard_info, indent=2) + "\n")
        infos.append(shard_info)
    if info.get("has_texts"):
        _split_lines(source / TEXTS_FILE, [folder / TEXTS_FILE for folder in folders], bounds)
    return infos


def _split_lines(source: Path, targets: list[Path], bounds: list[tuple[int, int]]) -> None:
    """Copy line ranges of `source` (one passage per line) to the targets in one pass."""
    with open(source, "rb") as lines:
        for target, (start, stop) in zip(targets, bounds):
            with open(target, "wb") as handle:
                for _ in range(stop - start):
                    handle.write(lines.readline())


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int):
    """The top-k of several shards' answers to the same query rows. `parts` in shard order, each
    (ids [B, k_i], scores [B, k_i], slot vectors [B, k_i, D]) best first. Equal scores keep shard
    order, then rank within the shard: the row order of the unsharded index."""
    ids = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1)
    vectors = np.concatenate([p[2] for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # unfilled slots (-inf) sort last
    return (np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1),
            np.take_along_axis(vectors, order[..., None], axis=1))
