"""What the index stage builds: the index kinds and vector dtypes it offers, and its config.
Light (no numpy, no FAISS): the CLI imports the choices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resrank_export.errors import ResRankExportError

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
VECTOR_DTYPES = ("float32", "float16")


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
    precision: str | None = None  # encoder graph onnx/<precision>/; None: the exported one (fp32)
    providers: str = "cpu"  # ONNX Runtime provider for the encoding: cpu, cuda or tensorrt

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ResRankExportError(f"index kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.vector_dtype not in VECTOR_DTYPES:
            raise ResRankExportError(f"vector dtype {self.vector_dtype!r}: expected one of {', '.join(VECTOR_DTYPES)}")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ResRankExportError("chunk size and batch size must be positive integers")
