"""A real tritonserver (python backend, CPU) on the demo checkpoint and a 300-passage index of
the embedded corpus: both ensembles over HTTP and gRPC against the in-process pipeline,
concurrency, and bad requests. The server starts once per session."""

from __future__ import annotations

import concurrent.futures as cf
import random

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")
pytest.importorskip("faiss")

from resrank_export.data.default_corpus import SAMPLE_QUERIES  # noqa: E402
from resrank_export.triton.client import ResRankClient  # noqa: E402

pytestmark = pytest.mark.slow
SCORE_ATOL = 1e-4
LONG_QUERY = " ".join(["how do I parse JSON text into Python objects and read a CSV file"] * 30)
PROTOCOLS = ("http", "grpc")
PASSAGE_CHARS = 300  # rerank tests use passage heads: encoding 512-token passages on CPU is slow


@pytest.fixture
def server(triton_server):
    """The session server, checked to be still running after each test."""
    triton_server.check_running()
    yield triton_server
    triton_server.check_running()


def _client(server, protocol: str) -> ResRankClient:
    return ResRankClient(server.http_url if protocol == "http" else server.grpc_url, protocol)


def _assert_same(got, expected) -> None:
    assert got.ids == expected.ids
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_search_equals_pipeline(server, reference, protocol):
    cases = [(SAMPLE_QUERIES[0], 10), (SAMPLE_QUERIES[1], 1), (SAMPLE_QUERIES[2], 100), (LONG_QUERY, 5)]
    with _client(server, protocol) as client:
        for query, k in cases:
            got = client.search(query, k)
            assert len(got.ids) == k and np.all(np.diff(got.scores) <= 0)
            _assert_same(got, reference.search(query, k))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_request_with_several_rows_is_split_per_row(server, reference, protocol):
    """One request carrying 3 queries: every row is answered for its own query."""
    queries = [SAMPLE_QUERIES[1], LONG_QUERY, "json"]
    with _client(server, protocol) as client:
        out = client.infer("resrank", {"QUERY": np.array([[q.encode()] for q in queries], dtype=np.object_),
                                       "TOP_K": np.full((3, 1), 6, dtype=np.int32)}, ["DOC_IDS", "SCORES"])
    for row, query in enumerate(queries):
        expected = reference.search(query, 6)
        assert [v.decode() for v in out["DOC_IDS"][row]] == expected.ids
        np.testing.assert_allclose(out["SCORES"][row], expected.scores, rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_rerank_equals_pipeline(server, reference, triton_passages, protocol):
    with _client(server, protocol) as client:
        for query, start, k in ((SAMPLE_QUERIES[3], 0, 1), (SAMPLE_QUERIES[4], 40, 7), (LONG_QUERY, 100, 30)):
            passages = [p.text[:PASSAGE_CHARS] for p in triton_passages[start:start + k]]
            _assert_same(client.rerank(query, passages), reference.rerank(query, passages))


def test_concurrent_mixed_requests(server, reference, triton_passages):
    """8 clients x 50 requests of different kinds, k and query lengths, interleaved."""
    rng = random.Random(0)
    specs = [("search", q, k) for q, k in zip(SAMPLE_QUERIES + (LONG_QUERY, "json"), (1, 3, 8, 15, 10, 20, 12, 2))]
    specs += [("rerank", q, k) for q, k in ((SAMPLE_QUERIES[0], 4), (SAMPLE_QUERIES[5], 9), ("csv", 2))]
    passages = [p.text[:PASSAGE_CHARS] for p in triton_passages[200:209]]
    expected = [reference.search(q, k) if kind == "search" else reference.rerank(q, passages[:k])
                for kind, q, k in specs]

    def run(worker: int) -> int:
        picks = [rng.randrange(len(specs)) for _ in range(50)]  # drawn before threads start below
        with _client(server, PROTOCOLS[worker % 2]) as client:
            for pick in picks:
                kind, query, k = specs[pick]
                got = client.search(query, k) if kind == "search" else client.rerank(query, passages[:k])
                _assert_same(got, expected[pick])
        return len(picks)

    with cf.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(run, range(8))) == 400


def _raw(client: ResRankClient, model: str, inputs: dict) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, ["SCORES"])
    return info.value.message()


def _query(text) -> np.ndarray:
    return np.array([[text if isinstance(text, bytes) else text.encode()]], dtype=np.object_)


def _k(value, dtype=np.int32) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


BAD_REQUESTS = {
    "empty query": ("resrank", {"QUERY": _query(""), "TOP_K": _k(5)}, "QUERY[0] is empty or whitespace-only"),
    "whitespace query": ("resrank", {"QUERY": _query(" \t\n "), "TOP_K": _k(5)}, "QUERY[0] is empty"),
    "overlong query": ("resrank", {"QUERY": _query("a" * 70000), "TOP_K": _k(5)}, "at most 65536 are accepted"),
    "TOP_K 0": ("resrank", {"QUERY": _query("json"), "TOP_K": _k(0)}, "TOP_K is 0; expected 1..100"),
    "TOP_K negative": ("resrank", {"QUERY": _query("json"), "TOP_K": _k(-3)}, "TOP_K is -3; expected 1..100"),
    "TOP_K above max": ("resrank", {"QUERY": _query("json"), "TOP_K": _k(101)}, "TOP_K is 101; expected 1..100"),
    "missing input": ("resrank", {"QUERY": _query("json")}, "expected 2 inputs but got 1"),
    "wrong dtype": ("resrank", {"QUERY": _query("json"), "TOP_K": _k(5, np.float32)}, "TOP_K"),
    "invalid UTF-8": ("resrank", {"QUERY": _query(b"\xff\xfejson"), "TOP_K": _k(5)}, "QUERY[0] is not valid UTF-8"),
    "empty PASSAGES": ("resrank_rerank", {"QUERY": _query("json"), "PASSAGES": np.zeros((1, 0), dtype=np.object_)},
                       "PASSAGES"),
    "invalid UTF-8 passage": ("resrank_rerank", {"QUERY": _query("json"),
                                                 "PASSAGES": np.array([[b"ok", b"\xc3("]], dtype=np.object_)},
                              "PASSAGES[1] is not valid UTF-8"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_requests_are_refused_and_server_keeps_serving(server, reference, protocol):
    with _client(server, protocol) as client:
        for name, (model, inputs, message) in BAD_REQUESTS.items():
            assert message in _raw(client, model, inputs), name
        _assert_same(client.search(SAMPLE_QUERIES[0], 3), reference.search(SAMPLE_QUERIES[0], 3))
