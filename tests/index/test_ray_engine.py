"""`index --engine ray` on a real local Ray cluster (ray.init(num_cpus=2), 2 encoder actors)
against the single-process build of the same corpus: the same vectors (max |diff| <= 1e-6), ids,
texts and flat top-10; a parquet corpus; resuming after an interrupted single-process build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("faiss")

from resrank_export.errors import InputDataError, ResRankExportError  # noqa: E402
from resrank_export.index.config import IndexConfig  # noqa: E402
from resrank_export.index.retriever import Retriever  # noqa: E402
from resrank_export.index.stage import build_index  # noqa: E402
from resrank_export.index.ray_engine import RayIndexConfig, build_index_ray  # noqa: E402

pytestmark = pytest.mark.slow
CHUNK = 25
QUERIES = ("how do I parse JSON text", "read a CSV file row by row", "sort a list in place", "open a socket")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from resrank_export.data.default_corpus import stdlib_passages

    path = tmp_path_factory.mktemp("ray-corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": p.id, "text": p.text}) + "\n" for p in stdlib_passages(limit=110)))
    return path


@pytest.fixture(scope="module")
def single(tiny_build, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "index"
    build_index(IndexConfig(build=tiny_build, corpus=corpus, out=out, chunk_size=CHUNK))
    return out


def _assert_same_index(got: Path, expected: Path, build: Path) -> None:
    a, b = Retriever.load(got, build), Retriever.load(expected, build)
    assert a.ids == b.ids and a.info["count"] == b.info["count"] == 110
    assert float(np.max(np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)))) <= 1e-6
    assert (got / "texts.jsonl").read_text() == (expected / "texts.jsonl").read_text()
    queries = b.encoder.encode(list(QUERIES))
    assert a.search_vectors(queries, 10)[0] == b.search_vectors(queries, 10)[0]


def test_ray_build_equals_single_process(ray_cluster, tiny_build, corpus, single, tmp_path):
    out = tmp_path / "ray-index"
    info = build_index_ray(RayIndexConfig(IndexConfig(build=tiny_build, corpus=corpus, out=out, chunk_size=CHUNK),
                                          actors=2))
    assert info["count"] == 110 and info["kind"] == "flat"
    _assert_same_index(out, single, tiny_build)
    report = json.loads((out / "report.json").read_text())
    assert report["encoded_passages"] == 110
    assert not (tmp_path / ".ray-index.partial").exists()


def test_parquet_corpus(ray_cluster, tiny_build, corpus, single, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [r["_id"] for r in rows], "text": [r["text"] for r in rows]}), path)
    build_index_ray(RayIndexConfig(IndexConfig(build=tiny_build, corpus=path, out=tmp_path / "index", chunk_size=CHUNK)))
    _assert_same_index(tmp_path / "index", single, tiny_build)

    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputDataError, match="bad.parquet: parquet corpus lacks column.s. text; expected id and text"):
        build_index_ray(RayIndexConfig(IndexConfig(build=tiny_build, corpus=tmp_path / "bad.parquet",
                                                   out=tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_resumes_an_interrupted_build(ray_cluster, tiny_build, corpus, single, tmp_path):
    """Chunks finished by an interrupted single-process build are kept; Ray encodes the rest."""
    out = tmp_path / "index"

    def stop_after_two(chunks: int, passages: int) -> None:
        if chunks == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(IndexConfig(build=tiny_build, corpus=corpus, out=out, chunk_size=CHUNK), on_chunk=stop_after_two)
    assert len(list((tmp_path / ".index.partial").glob("*.npy"))) == 2
    build_index_ray(RayIndexConfig(IndexConfig(build=tiny_build, corpus=corpus, out=out, chunk_size=CHUNK)))
    assert json.loads((out / "report.json").read_text())["encoded_passages"] == 110 - 2 * CHUNK
    _assert_same_index(out, single, tiny_build)


def test_cli_engine_ray(ray_cluster, tiny_build, corpus, single, tmp_path):
    from click.testing import CliRunner

    from resrank_export.cli import main

    out = tmp_path / "index"
    result = CliRunner().invoke(main, ["index", "--build", str(tiny_build), "--corpus", str(corpus), "--out", str(out),
                                       "--chunk-size", str(CHUNK), "--engine", "ray", "--actors", "2"])
    assert result.exit_code == 0, result.output
    _assert_same_index(out, single, tiny_build)
    result = CliRunner().invoke(main, ["index", "--build", str(tiny_build), "--out", str(tmp_path / "x"),
                                       "--from-index", str(single), "--engine", "ray"])
    assert result.exit_code == 1 and "--from-index reuses vectors" in result.output


def test_bad_settings_are_refused(tiny_build, tmp_path):
    with pytest.raises(ResRankExportError, match="expected actors >= 1"):
        build_index_ray(RayIndexConfig(IndexConfig(build=tiny_build, corpus=None, out=tmp_path / "i"), actors=0))
