"""`triton --index-shards N`: shard index folders against the source index (rows, search), the
merge against unsharded search, the repository's configs, and (slow) a real tritonserver on the
2-shard repository answering exactly as the unsharded repository on another real server."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")
pytest.importorskip("faiss")

from resrank_export.errors import ResRankExportError  # noqa: E402
from resrank_export.index.config import IndexConfig  # noqa: E402
from resrank_export.index.encode import OnnxEncoder  # noqa: E402
from resrank_export.index.retriever import Retriever  # noqa: E402
from resrank_export.index.stage import build_index  # noqa: E402
from resrank_export.triton.config import TritonConfig, parse_config  # noqa: E402
from resrank_export.triton.repository import write_repository  # noqa: E402
from resrank_export.triton.shards import merge_top_k, split_index  # noqa: E402

SCORE_ATOL = 1e-5
QUERIES = ("how do I parse JSON text", "read a CSV file row by row", "sort a list in place", "open a socket")


@pytest.fixture(scope="module")
def corpus(tiny_build, tmp_path_factory) -> Path:
    """150 passages of the embedded corpus whose vectors are all distinct: equal scores would
    leave the order among them to FAISS's heap, in sharded and unsharded search alike."""
    from resrank_export.data.default_corpus import stdlib_passages

    passages = stdlib_passages(limit=200)
    vectors = OnnxEncoder(tiny_build).encode([p.text for p in passages])
    _, first = np.unique(vectors, axis=0, return_index=True)
    kept = [passages[i] for i in sorted(first)][:150]
    path = tmp_path_factory.mktemp("shard-corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"_id": p.id, "text": p.text}) + "\n" for p in kept))
    return path


@pytest.fixture(scope="module")
def indexes(tiny_build, corpus, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shard-index")
    out = {}
    for kind in ("flat", "ivf"):
        build_index(IndexConfig(build=tiny_build, corpus=corpus, out=folder / kind, kind=kind, nlist=8, nprobe=3))
        out[kind] = folder / kind
    return out


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("shards", [2, 3])
def test_shards_hold_the_rows_and_merge_to_the_same_search(tiny_build, indexes, tmp_path, kind, shards):
    source = Retriever.load(indexes[kind], tiny_build)
    folders = [tmp_path / f"shard_{i}" for i in range(shards)]
    infos = split_index(indexes[kind], folders)
    loaded = [Retriever.load(folder) for folder in folders]
    assert [info["shard"]["first_row"] for info in infos] == list(np.cumsum([0] + [r.info["count"] for r in loaded])[:-1])
    np.testing.assert_array_equal(np.concatenate([np.asarray(r.vectors) for r in loaded]), np.asarray(source.vectors))
    assert sum((r.ids for r in loaded), []) == source.ids
    texts = "".join((folder / "texts.jsonl").read_text() for folder in folders)
    assert texts == (indexes[kind] / "texts.jsonl").read_text()

    queries = source.encoder.encode(list(QUERIES))
    for k in (1, 10, 20, source.info["count"]):
        expected_ids, expected_scores, expected_vectors = source.search_vectors(queries, k)
        parts = []
        for shard in loaded:
            ids, scores, vectors = shard.search_vectors(queries, min(k, shard.info["count"]))
            parts.append((np.array(ids, dtype=object), scores, vectors))
        ids, scores, vectors = merge_top_k(parts, k)
        assert ids.tolist() == expected_ids
        np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=SCORE_ATOL)
        np.testing.assert_array_equal(vectors, expected_vectors)


def test_merge_puts_unfilled_slots_last_and_keeps_shard_order_on_ties():
    dim = 2
    first = (np.array([["a", "b"]], dtype=object), np.array([[0.9, 0.5]], np.float32), np.ones((1, 2, dim), np.float32))
    second = (np.array([["c", ""]], dtype=object), np.array([[0.9, -np.inf]], np.float32), np.zeros((1, 2, dim), np.float32))
    ids, scores, vectors = merge_top_k([first, second], 4)
    assert ids.tolist() == [["a", "c", "b", ""]]
    np.testing.assert_array_equal(scores, np.array([[0.9, 0.9, 0.5, -np.inf]], np.float32))
    np.testing.assert_array_equal(vectors[0, :, 0], [1, 0, 1, 0])


def _configs(repo: Path) -> dict:
    return {p.parent.name: parse_config(p.read_text()) for p in repo.glob("*/config.pbtxt")}


def test_sharded_repository_configs(tiny_build, indexes, tmp_path):
    write_repository(TritonConfig(build=tiny_build, out=tmp_path / "one", index=indexes["flat"]))
    plain = _configs(tmp_path / "one")
    summary = write_repository(TritonConfig(build=tiny_build, out=tmp_path / "three", index=indexes["flat"],
                                            index_shards=3))
    sharded = _configs(tmp_path / "three")
    assert set(sharded) == set(plain) | {"faiss_lookup_0", "faiss_lookup_1", "faiss_lookup_2"}
    assert summary["index_shards"] == 3 and summary["max_top_k"] == 20
    assert sharded["resrank"] == plain["resrank"]  # the ensemble is unchanged
    router = {k: v.string_value for k, v in sharded["faiss_lookup"].parameters.items()}
    assert router["RESRANK_MODEL"] == "faiss_router" and router["SHARDS"] == "faiss_lookup_0,faiss_lookup_1,faiss_lookup_2"
    assert router["SHARD_MAX_TOP_K"] == "20,20,20"
    for number in range(3):
        shard = sharded[f"faiss_lookup_{number}"]
        assert list(shard.input) == list(plain["faiss_lookup"].input)
        assert list(shard.output) == list(plain["faiss_lookup"].output)
        info = json.loads((tmp_path / "three" / f"faiss_lookup_{number}" / "1" / "index" / "index.json").read_text())
        assert info["count"] == 50 and info["shard"]["number"] == number
    assert not (tmp_path / "three" / "faiss_lookup" / "1" / "index").exists()


def test_bad_shard_counts_are_refused(tiny_build, indexes, tmp_path):
    with pytest.raises(ResRankExportError, match="--index-shards 151: expected 2..150"):
        write_repository(TritonConfig(build=tiny_build, out=tmp_path / "r", index=indexes["flat"], index_shards=151))
    with pytest.raises(ResRankExportError, match="needs --index"):
        write_repository(TritonConfig(build=tiny_build, out=tmp_path / "r", index_shards=2))
    assert not (tmp_path / "r").exists()


def _answers(repository: Path, embeddings: np.ndarray, check_probes: bool = True) -> tuple[list, list]:
    """(resrank ensemble answers, faiss_lookup answers) of a real server on `repository`; also
    checks the k8s probe paths on it (not for loopback shard addresses, which k8s refuses)."""
    from resrank_export.triton.client import ResRankClient
    from resrank_export.triton.server import ServerConfig, TritonServer

    ensemble, lookup = [], []
    with TritonServer(ServerConfig(repository=repository)) as server:
        with ResRankClient(server.grpc_url, "grpc") as client:
            for k in (1, 7, 20):
                ensemble += [client.search(query, k) for query in QUERIES]
                out = client.infer("faiss_lookup", {"embeddings": embeddings,
                                                    "TOP_K": np.full((len(embeddings), 1), k, np.int32)},
                                   ["candidate_ids", "retrieval_scores", "passage_embeddings"])
                lookup.append(out)
            from tritonclient.utils import InferenceServerException

            # An out-of-range TOP_K is refused by the router as by the plain model.
            with pytest.raises(InferenceServerException, match="TOP_K is 21; expected 1..20"):
                client.infer("faiss_lookup", {"embeddings": embeddings[:1], "TOP_K": np.full((1, 1), 21, np.int32)},
                    ["candidate_ids"])
        if check_probes:
            _check_k8s_probes(repository, server)
        server.check_running()
    return ensemble, lookup


def _check_k8s_probes(repository: Path, server) -> None:
    """The probe paths of the generated Deployment answer 200 on the running server."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("kubernetes_validate")
    from resrank_export.triton.k8s import K8sConfig, write_manifests

    out = repository.parent / "k8s"
    write_manifests(K8sConfig(repository=repository, out=out))
    (container,) = yaml.safe_load((out / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        with urllib.request.urlopen(f"http://{server.http_url}{container[probe]['httpGet']['path']}", timeout=5) as r:
            assert r.status == 200


def _shard_only_repository(sharded: Path, out: Path) -> Path:
    """The shard models of a sharded repository, as one shard server's repository."""
    import shutil

    from resrank_export.triton.repository import MARKER_FILE

    out.mkdir(parents=True)
    shutil.copy2(sharded / MARKER_FILE, out / MARKER_FILE)
    for model in sharded.glob("faiss_lookup_*"):
        shutil.copytree(model, out / model.name)
    return out


def _assert_same(got_answers: tuple, expected_answers: tuple) -> None:
    for got, expected in zip(*(answers[0] for answers in (got_answers, expected_answers))):
        assert got.ids == expected.ids and len(got.ids) > 0
        np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=1e-4)
    for got, expected in zip(got_answers[1], expected_answers[1]):
        assert got["candidate_ids"].tolist() == expected["candidate_ids"].tolist()
        np.testing.assert_allclose(got["retrieval_scores"], expected["retrieval_scores"], rtol=0, atol=SCORE_ATOL)
        np.testing.assert_array_equal(got["passage_embeddings"], expected["passage_embeddings"])


@pytest.mark.slow
def test_two_shard_servers_answer_like_the_unsharded_one(tiny_build, indexes, tmp_path):
    """Unsharded vs 2 shards on the same server (BLS) vs 2 shards on another server (--shard-url)."""
    import shutil

    from resrank_export.triton.server import ServerConfig, TritonServer, free_port

    embeddings = OnnxEncoder(tiny_build).encode(list(QUERIES))
    one = write_repository(TritonConfig(build=tiny_build, out=tmp_path / "one" / "repo", index=indexes["flat"]))
    two = write_repository(TritonConfig(build=tiny_build, out=tmp_path / "two" / "repo", index=indexes["flat"],
                                        index_shards=2))
    assert "faiss_lookup_1" in two["models"] and "faiss_lookup_1" not in one["models"]
    expected = _answers(tmp_path / "one" / "repo", embeddings)
    _assert_same(_answers(tmp_path / "two" / "repo", embeddings), expected)

    shard_port = free_port()
    front = tmp_path / "front" / "repo"
    write_repository(TritonConfig(build=tiny_build, out=front, index=indexes["flat"], index_shards=2,
                                  shard_urls=(f"127.0.0.1:{shard_port}",) * 2))
    shards = _shard_only_repository(front, tmp_path / "shards" / "repo")
    for model in front.glob("faiss_lookup_*"):  # the front server holds no shard: answers must come from the other
        shutil.rmtree(model)
    with TritonServer(ServerConfig(repository=shards, grpc_port=shard_port)) as shard_server:
        _assert_same(_answers(front, embeddings, check_probes=False), expected)
        shard_server.check_running()
