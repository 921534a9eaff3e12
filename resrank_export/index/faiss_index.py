"""The FAISS index over the stored vectors: kind parameters derived from the corpus size, training
on a seeded sample, adding from the memory-mapped vectors in blocks, and the search parameters a
loaded index needs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from resrank_export.errors import InputDataError, ResRankExportError
from resrank_export.index.config import IndexConfig
from resrank_export.index.layout import FAISS_FILE, FORMAT_VERSION, VECTORS_FILE

ADD_BLOCK = 65536  # rows copied from the memory-mapped vectors into FAISS at a time


def _kind_params(config: IndexConfig, count: int, dim: int) -> dict:
    if config.kind == "flat":
        return {}
    if config.kind == "hnsw":
        return {"M": config.hnsw_m, "efConstruction": config.ef_construction, "efSearch": config.ef_search}
    check_nlist(config, count)
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


IVF_KINDS = ("ivf", "ivfpq")  # kinds whose inverted lists merge (per-shard adds on Ray, on-disk lists)


def check_nlist(config: IndexConfig, count: int) -> None:
    """IVF training needs a vector per list (FAISS raises inside `train` otherwise)."""
    trained = min(count, config.train_size)
    if config.kind in IVF_KINDS and config.nlist is not None and config.nlist > trained:
        raise InputDataError(f"--nlist {config.nlist}: more inverted lists than the {trained} vectors the index "
                             f"trains on ({count} passages); expected at most {trained}")


def trained_index(faiss, vectors: np.ndarray, config: IndexConfig, count: int, dim: int) -> tuple:
    """(empty index of `config.kind`, its parameters), IVF/IVF-PQ trained on a seeded sample of `vectors`."""
    params = _kind_params(config, count, dim)
    index = _new_index(faiss, config.kind, dim, params)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(count, size=params["train_size"], replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    return index, params


def add_rows(index, vectors: np.ndarray, start: int, stop: int) -> None:
    """Add rows [start, stop) of the (memory-mapped) vectors in blocks; FAISS ids are the row
    numbers, so shards added separately merge into the index one process would have built."""
    for first in range(start, stop, ADD_BLOCK):
        block = np.ascontiguousarray(vectors[first:min(stop, first + ADD_BLOCK)], dtype=np.float32)
        if first == index.ntotal:  # add() numbers rows from ntotal: always so in one process
            index.add(block)
        else:
            index.add_with_ids(block, np.arange(first, first + len(block), dtype=np.int64))


def index_info(config: IndexConfig, count: int, dim: int, params: dict) -> dict:
    """The index.json content describing the FAISS index (the index stage adds the encoder)."""
    return {"format_version": FORMAT_VERSION, "complete": True, "kind": config.kind, "dim": dim,
            "count": count, "vector_dtype": config.vector_dtype, "metric": "inner_product",
            "params": params}


def write_faiss(faiss, out: Path, config: IndexConfig, count: int, dim: int) -> dict:
    vectors = np.load(out / VECTORS_FILE, mmap_mode="r")
    index, params = trained_index(faiss, vectors, config, count, dim)
    add_rows(index, vectors, 0, count)
    faiss.write_index(index, str(out / FAISS_FILE))
    return index_info(config, count, dim, params)


def read_faiss(faiss, folder: Path, info: dict):
    """The folder's FAISS index; on-disk inverted lists are opened (memory-mapped) from the
    folder's own IVF_LISTS_FILE, wherever the folder was moved since it was written."""
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if info["params"].get("on_disk_lists") else 0
    return faiss.read_index(str(Path(folder) / FAISS_FILE), flags)


def empty_copy(faiss, index, info: dict):
    """An empty in-memory index with `index`'s trained quantizer and codebooks (shards of a split)."""
    if info["params"].get("on_disk_lists"):  # on-disk lists cannot be cloned: swap in empty memory lists
        ivf = faiss.extract_index_ivf(index)
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns and frees the lists now, not Python
        index.ntotal = ivf.ntotal = 0
    copy = faiss.clone_index(index)
    copy.reset()
    return copy


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


def apply_search_params(faiss, index, kind: str, params: dict) -> None:
    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    elif kind == "hnsw":
        index.hnsw.efSearch = params["efSearch"]
