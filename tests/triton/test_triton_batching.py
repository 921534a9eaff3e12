"""Merged batching of the python-backend graph models: requests of different sequence lengths and
candidate counts padded into one run give each request what running it alone gives (real ONNX
Runtime on the tiny export); the token budget splits runs; and on the real tritonserver,
concurrent requests of all-different lengths share encoder and reranker executions (Triton's own
statistics) while every answer equals the in-process pipeline."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from resrank_export.model.reference import ResRankReference
from resrank_export.runtime import ort_session, run_session
from resrank_export.triton.models.batching import merge_encoder, merge_reranker, merger, plan_runs

ATOL = 1e-5  # padding changes only summation order
BATCHING_WAIT_US = 1_000_000  # generous: 16 client threads' requests reach a model well within it of each other
TEXTS = [["fleas"], ["The quick brown fox jumps over the lazy dog near the river bank.", "a b"],
         [" ".join(["Dense retrieval encodes passages into vectors."] * 6)], ["x y z"]]
QUERIES = [(["how long do fleas live"], 3), (["x"], 1), (["what is dense retrieval and why rerank", "q"], 7),
           (["a much longer query about reranking with embedding slots in a decoder prompt"], 2)]


def _alone(session, members):
    return [run_session(session, member)[0] for member in members]


def _merged(session, merge, members):
    run = merge(members)
    return [own[0] for own in run.split(run_session(session, run.inputs))]


@pytest.fixture(scope="module")
def tiny(tiny_export):
    checkpoint, graphs = tiny_export()
    return ResRankReference(checkpoint), {name: ort_session(path) for name, path in graphs.items()}


def test_merged_encoder_run_equals_each_request_alone(tiny):
    reference, sessions = tiny
    members = [reference.passage_tokenizer(texts) for texts in TEXTS]
    assert len({m["input_ids"].shape[1] for m in members}) == len(members)  # all lengths differ
    merged, alone = _merged(sessions["encoder"], merge_encoder, members), _alone(sessions["encoder"], members)
    for got, expected in zip(merged, alone):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_merged_reranker_run_equals_each_request_alone(tiny):
    reference, sessions = tiny
    rng = np.random.default_rng(0)
    members = []
    for queries, k in QUERIES:
        inputs = reference.prompt_builder.batch(queries, k)
        inputs["passage_embeddings"] = rng.standard_normal(
            (len(queries), k, reference.checkpoint.encoder_dim)).astype(np.float32)
        members.append(inputs)
    run = merge_reranker(members)
    for row in run.inputs["slot_positions"]:  # every slot has its own position in the row
        assert len(set(row.tolist())) == len(row)
    got = _merged(sessions["reranker"], merge_reranker, members)
    for mine, expected in zip(got, _alone(sessions["reranker"], members)):
        assert mine.shape == expected.shape
        np.testing.assert_allclose(mine, expected, rtol=0, atol=ATOL)


def test_merger_is_chosen_by_the_graph_inputs():
    assert merger(["input_ids", "attention_mask", "passage_embeddings", "slot_positions"]) is merge_reranker
    assert merger(["input_ids", "attention_mask"]) is merge_encoder


@pytest.mark.parametrize("budget", [1, 40, 100, 10_000])
def test_runs_cover_every_request_once_within_the_budget(budget):
    rng = np.random.default_rng(budget)
    widths, rows = rng.integers(1, 30, 25).tolist(), rng.integers(1, 4, 25).tolist()
    runs = plan_runs(widths, rows, budget)
    assert sorted(p for run in runs for p in run) == list(range(25))
    for run in runs:
        cost = sum(rows[p] for p in run) * max(widths[p] for p in run)
        assert len(run) == 1 or cost <= budget
    if budget == 10_000:
        assert len(runs) == 1
    if budget == 1:
        assert len(runs) == 25


# --- the real server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batching_server(serve_demo):
    """A server whose batched models wait up to BATCHING_WAIT_US for more requests: concurrent
    requests then merge whenever they reach a model within that bound of each other, not only when
    they happen to queue while it runs (the default wait, 0, leaves that to thread timing)."""
    with serve_demo(max_queue_delay_us=BATCHING_WAIT_US) as server:
        yield server


def _stats(client, model: str) -> tuple[int, int]:
    """(requests answered, executions) of a model, from Triton's statistics (a request of the
    passage encoder carries many rows, so rows would not do)."""
    stats = client.client.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]
    requests = stats.get("inference_stats", {}).get("success", {}).get("count", 0)
    return int(requests), int(stats.get("execution_count", 0))


@pytest.mark.slow
def test_requests_of_different_lengths_share_executions(batching_server, reference, triton_passages):
    """48 searches and 24 reranks, every one with its own query length (and k), from 16 clients:
    a batcher that merged only equal shapes could never merge two of them."""
    pytest.importorskip("tritonclient.grpc")
    from resrank_export.triton.client import ResRankClient

    words = "json csv parse file socket thread queue regex path date time http".split()
    searches = [(" ".join(words[i % len(words)] for i in range(n)), 1 + n % 9) for n in range(1, 49)]
    passages = [p.text[:200] for p in triton_passages[:12]]
    reranks = [(" ".join(reversed(words))[:4 * n], passages[:1 + n % 12]) for n in range(1, 25)]
    expected = [reference.search(q, k) for q, k in searches] + [reference.rerank(q, p) for q, p in reranks]
    calls = [("search", args) for args in searches] + [("rerank", args) for args in reranks]

    with ResRankClient(batching_server.grpc_url, "grpc") as probe:
        before = {m: _stats(probe, m) for m in ("encoder", "reranker")}

        def call(item):
            kind, args = item
            with ResRankClient(batching_server.grpc_url, "grpc") as client:
                return getattr(client, kind)(*args)

        with cf.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(call, calls))
        after = {m: _stats(probe, m) for m in ("encoder", "reranker")}
    for mine, theirs in zip(got, expected):
        assert mine.ids == theirs.ids
        np.testing.assert_allclose(mine.scores, theirs.scores, rtol=0, atol=1e-4)
    for model in ("encoder", "reranker"):
        requests, executions = (a - b for a, b in zip(after[model], before[model]))
        assert executions < requests, (model, requests, executions)
