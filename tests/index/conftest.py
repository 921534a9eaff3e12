"""The Ray engine tests' shared reference: a 110-passage corpus of the embedded docstrings and
its single-process flat build on the tiny export, made once per session for test_ray_engine.py
and test_ray_engine_faults.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from resrank_export.data.default_corpus import SAMPLE_QUERIES


@dataclass(frozen=True)
class SingleProcessBuild:
    corpus: Path
    index: Path
    build: Path
    chunk: int  # passages per chunk: the Ray builds under test use the same chunking

    def config(self, out: Path, **settings):
        """The reference's build, corpus and chunking, written to `out`."""
        from resrank_export.index.config import IndexConfig

        return IndexConfig(**{"build": self.build, "corpus": self.corpus, "out": out, "chunk_size": self.chunk,
                              **settings})

    def assert_same(self, got: Path, count: int = 110) -> None:
        """`got` holds the same vectors (max |diff| <= 1e-6), ids, texts and flat top-10."""
        from resrank_export.index.retriever import Retriever

        a, b = Retriever.load(got, self.build), Retriever.load(self.index, self.build)
        assert a.ids == b.ids and a.info["count"] == b.info["count"] == count
        assert float(np.max(np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)))) <= 1e-6
        assert (got / "texts.jsonl").read_text() == (self.index / "texts.jsonl").read_text()
        queries = b.encoder.encode(list(SAMPLE_QUERIES))
        assert a.search_vectors(queries, 10)[0] == b.search_vectors(queries, 10)[0]


@pytest.fixture(scope="session")
def single_build(tiny_build, stdlib_corpus, tmp_path_factory) -> SingleProcessBuild:
    pytest.importorskip("faiss")
    from resrank_export.index.stage import build_index

    reference = SingleProcessBuild(stdlib_corpus(110), tmp_path_factory.mktemp("single") / "index", tiny_build,
                                   chunk=25)
    build_index(reference.config(reference.index))
    return reference
