"""`index --engine ray` on a real local Ray cluster (ray.init(num_cpus=2), 2 encoder actors)
against the single-process build of the same corpus: the same vectors (max |diff| <= 1e-6), ids,
texts and flat top-10; a parquet corpus; resuming after an interrupted single-process build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("faiss")

from resrank_export.errors import InputDataError, ResRankExportError  # noqa: E402
from resrank_export.index.config import IndexConfig  # noqa: E402
from resrank_export.index.stage import build_index  # noqa: E402
from resrank_export.index.ray_engine import RayIndexConfig, build_index_ray  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_build_equals_single_process(ray_cluster, single_build, tmp_path):
    out = tmp_path / "ray-index"
    info = build_index_ray(RayIndexConfig(single_build.config(out), actors=2))
    assert info["count"] == 110 and info["kind"] == "flat"
    single_build.assert_same(out)
    report = json.loads((out / "report.json").read_text())
    assert report["encoded_passages"] == 110
    assert not (tmp_path / ".ray-index.partial").exists()


def test_parquet_corpus(ray_cluster, single_build, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in single_build.corpus.read_text().splitlines()]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [r["_id"] for r in rows], "text": [r["text"] for r in rows]}), path)
    build_index_ray(RayIndexConfig(single_build.config(tmp_path / "index", corpus=path)))
    single_build.assert_same(tmp_path / "index")

    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputDataError, match="bad.parquet: parquet corpus lacks column.s. text; expected id and text"):
        build_index_ray(RayIndexConfig(IndexConfig(build=single_build.build, corpus=tmp_path / "bad.parquet",
                                                   out=tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_resumes_an_interrupted_build(ray_cluster, single_build, tmp_path):
    """Chunks finished by an interrupted single-process build are kept; Ray encodes the rest."""
    out = tmp_path / "index"

    def stop_after_two(chunks: int, passages: int) -> None:
        if chunks == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(single_build.config(out), on_chunk=stop_after_two)
    assert len(list((tmp_path / ".index.partial").glob("*.npy"))) == 2
    build_index_ray(RayIndexConfig(single_build.config(out)))
    assert json.loads((out / "report.json").read_text())["encoded_passages"] == 110 - 2 * single_build.chunk
    single_build.assert_same(out)


def test_cli_engine_ray(ray_cluster, single_build, tmp_path):
    from click.testing import CliRunner

    from resrank_export.cli import main

    out = tmp_path / "index"
    result = CliRunner().invoke(main, ["index", "--build", str(single_build.build), "--corpus", str(single_build.corpus),
                                       "--out", str(out), "--chunk-size", str(single_build.chunk), "--engine", "ray",
                                       "--actors", "2"])
    assert result.exit_code == 0, result.output
    single_build.assert_same(out)
    result = CliRunner().invoke(main, ["index", "--build", str(single_build.build), "--out", str(tmp_path / "x"),
                                       "--from-index", str(single_build.index), "--engine", "ray"])
    assert result.exit_code == 1 and "--from-index reuses vectors" in result.output


def test_bad_settings_are_refused(tiny_build, tmp_path):
    with pytest.raises(ResRankExportError, match="expected actors >= 1"):
        build_index_ray(RayIndexConfig(IndexConfig(build=tiny_build, corpus=None, out=tmp_path / "i"), actors=0))
