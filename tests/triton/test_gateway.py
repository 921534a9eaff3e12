"""`resrank-export gateway` as a real uvicorn process in front of the real session tritonserver:
Cohere/Jina-format /v1/rerank and /v1/search against the ensembles (tritonclient over gRPC) and
the in-process pipeline, truncate=NONE, the limits (documents, top_k, body size), the API key,
/health and /metrics; and schemathesis against the gateway's own OpenAPI document: no 5xx for
any schema-valid or schema-invalid body (a bounded number of examples)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from resrank_export.data.default_corpus import SAMPLE_QUERIES  # noqa: E402
from resrank_export.triton.client import ResRankClient  # noqa: E402
from resrank_export.triton.server import free_port  # noqa: E402

pytestmark = pytest.mark.slow
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 64 * 1024
FUZZ_EXAMPLES = 25  # per operation and generation mode (each valid rerank encodes up to MAX_DOCUMENTS texts)
MAX_DOCUMENTS = 8
SCORE_ATOL = 1e-4


@dataclass(frozen=True)
class Gateway:
    url: str
    process: subprocess.Popen


def start_gateway(repository: Path, triton_grpc: str, *extra: str) -> Gateway:
    """`python -m resrank_export gateway` on a free loopback port, waited for until it answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would block the gateway
    process = subprocess.Popen([sys.executable, "-m", "resrank_export", "gateway", "--repository", str(repository),
                                "--triton", triton_grpc, "--port", str(port), *extra], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                raise AssertionError(f"gateway exited with {process.returncode}: {log.read()[-2000:].decode()}")
            try:
                if requests.get(f"{url}/openapi.json", timeout=10).status_code == 200:
                    return Gateway(url, process)
            except requests.RequestException:  # not listening yet, or slow on a loaded machine
                time.sleep(0.3)
        raise AssertionError("gateway did not answer within 120 s")
    except BaseException:
        stop_gateway(Gateway(url, process))
        raise


def stop_gateway(gateway: Gateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(20)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()


@pytest.fixture(scope="module")
def gateway(triton_server):
    started = start_gateway(triton_server.config.repository, triton_server.grpc_url, "--api-key", API_KEY,
                            "--max-body-bytes", str(MAX_BODY), "--max-documents", str(MAX_DOCUMENTS))
    yield started
    stop_gateway(started)


@pytest.fixture(scope="module")
def passages(triton_passages) -> list[str]:
    return [p.text[:300] for p in triton_passages[60:60 + MAX_DOCUMENTS]]


def _post(gateway, path: str, body, headers=AUTH, **kwargs):
    return requests.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def test_rerank_equals_the_rerank_ensemble(gateway, triton_server, reference, passages):
    """Cohere format (strings and {text} documents): results sorted by relevance_score, in the
    resrank_rerank ensemble's order with its scores; top_n and return_documents."""
    documents = [p if i % 2 else {"text": p} for i, p in enumerate(passages)]
    body = {"model": "rerank-v3.5", "query": SAMPLE_QUERIES[2], "documents": documents, "top_n": 5,
            "return_documents": True}
    answer = _post(gateway, "/v1/rerank", body)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    with ResRankClient(triton_server.grpc_url, "grpc") as client:
        ensemble = client.rerank(SAMPLE_QUERIES[2], passages)
    assert [r["index"] for r in results] == [int(i) for i in ensemble.ids[:5]]
    np.testing.assert_allclose([r["relevance_score"] for r in results], ensemble.scores[:5], rtol=0, atol=1e-6)
    assert [r["document"]["text"] for r in results] == [passages[r["index"]] for r in results]
    expected = reference.rerank(SAMPLE_QUERIES[2], passages)
    assert [str(r["index"]) for r in results] == expected.ids[:5]
    everything = _post(gateway, "/v1/rerank", {"query": SAMPLE_QUERIES[2], "documents": passages}).json()["results"]
    assert len(everything) == len(passages) and all("document" not in r for r in everything)
    scores = [r["relevance_score"] for r in everything]
    assert scores == sorted(scores, reverse=True)


def test_search_equals_the_search_ensemble(gateway, triton_server, reference):
    answer = _post(gateway, "/v1/search", {"query": SAMPLE_QUERIES[0], "top_k": 7, "return_texts": True})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    expected = reference.search(SAMPLE_QUERIES[0], 7)
    assert [r["id"] for r in results] == expected.ids
    np.testing.assert_allclose([r["score"] for r in results], expected.scores, rtol=0, atol=SCORE_ATOL)
    assert [r["text"] for r in results] == reference.retriever.texts(expected.ids)


def test_truncate_none_refuses_what_end_cuts(gateway, passages):
    long_document = " ".join(["passage words that go on and on"] * 200)
    body = {"query": "json", "documents": [passages[0], long_document]}
    assert _post(gateway, "/v1/rerank", body).status_code == 200  # truncate=END by default
    refused = _post(gateway, "/v1/rerank", {**body, "truncate": "NONE"})
    assert refused.status_code == 400 and "documents[1] is over 256 tokens" in refused.json()["message"]
    long_query = {"query": " ".join(["why"] * 200), "documents": [passages[0]], "truncate": "NONE"}
    refused = _post(gateway, "/v1/rerank", long_query)
    assert refused.status_code == 400 and "query has 200 tokens; at most 64" in refused.json()["message"]


BAD_BODIES = {
    "no documents": ({"query": "json", "documents": []}, 422, "documents"),
    "too many documents": ({"query": "json", "documents": ["a"] * (MAX_DOCUMENTS + 1)}, 422,
                           f"documents: List should have at most {MAX_DOCUMENTS} items"),
    "blank document": ({"query": "json", "documents": ["ok", "  "]}, 422, "documents.1: is empty or whitespace-only"),
    "blank {text}": ({"query": "json", "documents": [{"text": "\t"}]}, 422, "documents.0.text: is empty"),
    "blank query": ({"query": " ", "documents": ["ok"]}, 422, "query: is empty or whitespace-only"),
    "lone surrogate": ('{"query": "\\ud800 json", "documents": ["ok"]}', 422, "query: "),  # pydantic or our check
    "top_n 0": ({"query": "json", "documents": ["ok"], "top_n": 0}, 422, "top_n"),
    "bad truncate": ({"query": "json", "documents": ["ok"], "truncate": "START"}, 422, "truncate"),
    "not JSON": ("{", 422, "JSON decode error"),
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_bad_rerank_bodies_get_4xx_naming_the_field(gateway, name):
    body, status, message = BAD_BODIES[name]
    if isinstance(body, str):
        answer = requests.post(f"{gateway.url}/v1/rerank", data=body, timeout=30,
                               headers={**AUTH, "Content-Type": "application/json"})
    else:
        answer = _post(gateway, "/v1/rerank", body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["message"]


def test_search_limits(gateway):
    assert _post(gateway, "/v1/search", {"query": "json", "top_k": 101}).status_code == 422
    assert _post(gateway, "/v1/search", {"query": "json", "top_k": 0}).status_code == 422


def test_body_limit_by_length_and_while_streaming(gateway):
    big = {"query": "json", "documents": ["x" * 1000] * 70}  # > 64 KiB
    assert _post(gateway, "/v1/rerank", big).status_code == 413
    chunks = (b"x" * 8192 for _ in range(10))  # chunked: no Content-Length to check up front
    answer = requests.post(f"{gateway.url}/v1/rerank", data=chunks, timeout=30,
                           headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 413


def test_api_key_is_required_on_v1_only(gateway):
    body = {"query": "json", "documents": ["ok"]}
    assert _post(gateway, "/v1/rerank", body, headers={}).status_code == 401
    assert _post(gateway, "/v1/rerank", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(gateway, "/v1/rerank", body, headers={"X-API-Key": API_KEY}).status_code == 200
    assert requests.get(f"{gateway.url}/health", timeout=30).status_code == 200


def test_health_and_metrics(gateway):
    health = requests.get(f"{gateway.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    _post(gateway, "/v1/rerank", {"query": "json", "documents": ["ok"]}, headers={})  # a 401
    text = requests.get(f"{gateway.url}/metrics", timeout=30).text
    assert 'gateway_requests_total{route="/v1/rerank",status="401"}' in text
    assert "gateway_triton_ready 1.0" in text
    assert "gateway_request_seconds_bucket" in text


def test_health_says_not_ready_without_triton(triton_server):
    """A gateway pointed at a port where no Triton listens: 503 on /health and on requests."""
    lonely = start_gateway(triton_server.config.repository, f"127.0.0.1:{free_port()}", "--timeout", "5")
    try:
        assert requests.get(f"{lonely.url}/health", timeout=30).status_code == 503
        answer = requests.post(f"{lonely.url}/v1/rerank", json={"query": "json", "documents": ["ok"]}, timeout=30)
        assert answer.status_code == 503 and "unavailable" in answer.json()["message"]
    finally:
        stop_gateway(lonely)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz_never_gets_5xx(gateway, mode):
    """Schema-valid (positive) and schema-invalid (negative) bodies from the gateway's own
    OpenAPI document: every answer is below 500."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    statuses: list[int] = []
    for path in ("/v1/rerank", "/v1/search"):
        operation = schema[path]["POST"]

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        def check(case):
            response = case.call(base_url=gateway.url, headers=AUTH, timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.body, response.status_code, response.text[:300])

        check()
    assert statuses and (mode == "negative" or 200 in statuses)


# --- bounded load: 16 clients of mixed good and bad requests, through the gateway and Triton ---

LOAD_SECONDS = float(os.environ.get("RESRANK_LOAD_SECONDS", "20"))  # the 60 s: set it to 60
LOAD_CLIENTS = 16  # half through the gateway, half straight to Triton's HTTP endpoint


def _percentiles(values: list[float]) -> dict:
    return {"count": len(values), "p50_ms": float(np.percentile(values, 50) * 1e3) if values else None,
            "p99_ms": float(np.percentile(values, 99) * 1e3) if values else None}


def test_load_mixed_good_and_bad_requests(gateway, triton_server, reference, passages):
    """Every good request answered correctly (equal to the pipeline), every bad one refused with
    a 4xx and a message, for LOAD_SECONDS; p50/p99 per path printed (and written to
    $RESRANK_LOAD_REPORT as JSON when set)."""
    import json
    import random
    import threading

    from tritonclient.utils import InferenceServerException

    good_searches = [(q, k) for q, k in zip(SAMPLE_QUERIES, (3, 5, 8, 4, 6, 2))]
    good_reranks = [(q, passages[i:i + 4]) for i, q in enumerate(SAMPLE_QUERIES[:4])]
    expected = {("search", q, k): reference.search(q, k).ids for q, k in good_searches}
    expected.update({("rerank", q, tuple(p)): reference.rerank(q, p).ids for q, p in good_reranks})
    bad_gateway = [({"query": " ", "documents": ["ok"]}, "/v1/rerank", AUTH),
                   ({"query": "json", "documents": ["a"] * (MAX_DOCUMENTS + 1)}, "/v1/rerank", AUTH),
                   ({"query": "json", "top_k": 0}, "/v1/search", AUTH),
                   ({"query": "json", "documents": ["word " * 400], "truncate": "NONE"}, "/v1/rerank", AUTH),
                   ({"query": "json", "documents": ["ok"]}, "/v1/rerank", {"X-API-Key": "wrong"})]
    bad_triton = [("", 5), ("json", 0), ("json", 101)]
    stop_at = time.monotonic() + LOAD_SECONDS
    latencies: dict[str, list[float]] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def record(path: str, seconds: float, failure: str | None) -> None:
        with lock:
            latencies.setdefault(path, []).append(seconds)
            if failure:
                failures.append(f"{path}: {failure}")

    def via_gateway(seed: int) -> None:
        rng, session = random.Random(seed), requests.Session()
        while time.monotonic() < stop_at:
            roll, begin = rng.random(), time.perf_counter()
            if roll < 0.3:
                body, path, headers = rng.choice(bad_gateway)
                answer = session.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=60)
                ok = 400 <= answer.status_code < 500 and answer.json().get("message")
                record("gateway bad", time.perf_counter() - begin, None if ok else f"{answer.status_code} {body}")
            elif roll < 0.65:
                query, k = rng.choice(good_searches)
                answer = session.post(f"{gateway.url}/v1/search", json={"query": query, "top_k": k},
                                      headers=AUTH, timeout=60)
                ok = answer.status_code == 200 and [r["id"] for r in answer.json()["results"]] == \
                    expected[("search", query, k)]
                record("gateway search", time.perf_counter() - begin, None if ok else f"{answer.status_code}")
            else:
                query, docs = rng.choice(good_reranks)
                answer = session.post(f"{gateway.url}/v1/rerank", json={"query": query, "documents": docs},
                                      headers=AUTH, timeout=60)
                ok = answer.status_code == 200 and [str(r["index"]) for r in answer.json()["results"]] == \
                    expected[("rerank", query, tuple(docs))]
                record("gateway rerank", time.perf_counter() - begin, None if ok else f"{answer.status_code}")
        session.close()

    def via_triton(seed: int) -> None:
        rng = random.Random(seed)
        with ResRankClient(triton_server.http_url) as client:
            while time.monotonic() < stop_at:
                roll, begin = rng.random(), time.perf_counter()
                if roll < 0.3:
                    query, k = rng.choice(bad_triton)
                    try:
                        client.search(query, k)
                        failure = f"accepted {query!r} k={k}"
                    except InferenceServerException as exc:
                        failure = None if str(exc.status()).startswith("4") else f"status {exc.status()}"
                    record("triton bad", time.perf_counter() - begin, failure)
                elif roll < 0.65:
                    query, k = rng.choice(good_searches)
                    ok = client.search(query, k).ids == expected[("search", query, k)]
                    record("triton search", time.perf_counter() - begin, None if ok else "wrong ids")
                else:
                    query, docs = rng.choice(good_reranks)
                    ok = client.rerank(query, docs).ids == expected[("rerank", query, tuple(docs))]
                    record("triton rerank", time.perf_counter() - begin, None if ok else "wrong order")

    def guarded(target, seed: int) -> None:
        try:
            target(seed)
        except Exception as exc:  # a good request that raised: a failure, not a crashed thread
            record("client error", 0.0, f"{type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=guarded, args=(via_gateway if i % 2 else via_triton, i))
               for i in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + 120)
    report = {"seconds": LOAD_SECONDS, "clients": LOAD_CLIENTS, "failures": len(failures),
              "paths": {path: _percentiles(values) for path, values in sorted(latencies.items())}}
    print(json.dumps(report, indent=2))
    if os.environ.get("RESRANK_LOAD_REPORT"):
        Path(os.environ["RESRANK_LOAD_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert not failures, failures[:5]
    for path in ("gateway bad", "gateway search", "gateway rerank", "triton bad", "triton search", "triton rerank"):
        assert latencies.get(path), f"no {path} requests ran"
