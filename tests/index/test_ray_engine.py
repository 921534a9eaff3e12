"""`index --engine ray` on a real local Ray cluster (ray.init(num_cpus=2), 2 encoder actors)
against the single-process build of the same corpus: the same vectors (max |diff| <= 1e-6), ids,
texts and flat top-10; a parquet corpus; resuming after an interrupted single-process build."""

from __future__ import annotations

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("faiss")

from resrank_export.data.default_corpus import SAMPLE_QUERIES  # noqa: E402
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


def _inverted_lists(index) -> list[tuple[list[int], bytes]]:
    """(ids, codes) of every inverted list, in list order."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    out = []
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        ids = faiss.rev_swig_ptr(lists.get_ids(number), size).tolist() if size else []
        codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size).tobytes() if size else b""
        out.append((ids, codes))
    return out


@pytest.mark.parametrize("kind, on_disk", [("ivf", False), ("ivfpq", True)])
def test_faiss_added_by_ray_tasks(ray_cluster, single_build, kind, on_disk, tmp_path):
    """IVF lists added by 4 Ray tasks (30 rows each) and merged equal one process's: the same
    trained quantizer, the same rows in every list in the same order, the same search answers;
    on-disk lists (index.ivfdata) read back after the folder moved, and split into shards alike."""
    from resrank_export.index.retriever import Retriever
    from resrank_export.triton.shards import split_index

    expected = tmp_path / "single"
    build_index(IndexConfig(build=single_build.build, corpus=None, out=expected, kind=kind, nlist=4,
                            source_index=single_build.index))
    got = tmp_path / "ray"
    info = build_index_ray(RayIndexConfig(single_build.config(got, kind=kind, nlist=4), rows_per_add_task=30,
                                          on_disk_lists=on_disk))
    assert info["params"].get("on_disk_lists", False) is on_disk
    assert (got / "index.ivfdata").is_file() is on_disk and not (got / "faiss-shards").exists()
    a, b = Retriever.load(got, single_build.build), Retriever.load(expected, single_build.build)
    assert a.index.ntotal == b.index.ntotal == 110
    assert _inverted_lists(a.index) == _inverted_lists(b.index)
    queries = b.encoder.encode(list(SAMPLE_QUERIES))
    (ids_a, scores_a, _), (ids_b, scores_b, _) = a.search_vectors(queries, 10), b.search_vectors(queries, 10)
    assert ids_a == ids_b and np.array_equal(scores_a, scores_b)
    if on_disk:  # shards of an on-disk index hold their lists in memory and search alike
        split_index(got, [tmp_path / "ray-0", tmp_path / "ray-1"])
        split_index(expected, [tmp_path / "single-0", tmp_path / "single-1"])
        for number in (0, 1):
            shard_a, shard_b = Retriever.load(tmp_path / f"ray-{number}"), Retriever.load(tmp_path / f"single-{number}")
            assert _inverted_lists(shard_a.index) == _inverted_lists(shard_b.index)
            assert shard_a.search_vectors(queries, 10)[0] == shard_b.search_vectors(queries, 10)[0]


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
    with pytest.raises(ResRankExportError, match="on-disk inverted lists need --index ivf or ivfpq; got flat"):
        build_index_ray(RayIndexConfig(IndexConfig(build=tiny_build, corpus=None, out=tmp_path / "i"),
                                       on_disk_lists=True))
    assert not (tmp_path / "i").exists()


def test_cli_passes_the_faiss_options(tiny_build, tmp_path):
    from click.testing import CliRunner

    from resrank_export.cli import main

    args = ["index", "--build", str(tiny_build), "--out", str(tmp_path / "i"), "--engine", "ray"]
    result = CliRunner().invoke(main, [*args, "--on-disk-lists"])
    assert result.exit_code == 1 and "error: on-disk inverted lists need --index ivf or ivfpq; got flat" in result.output
    result = CliRunner().invoke(main, [*args, "--index", "ivf", "--rows-per-add-task", "0"])
    assert result.exit_code == 2 and "--rows-per-add-task" in result.output
