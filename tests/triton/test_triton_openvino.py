"""The demo repository served with `--cpu-runtime openvino` (f32 compute) by a real tritonserver:
searches and reranks equal the in-process ONNX Runtime pipeline, as the default server's do."""

from __future__ import annotations

import numpy as np
import pytest

from resrank_export.data.default_corpus import SAMPLE_QUERIES
from resrank_export.triton.client import ResRankClient

pytestmark = pytest.mark.slow
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module")
def openvino_server(triton_build, triton_index, tmp_path_factory):
    pytest.importorskip("openvino")
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("pytriton")
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository
    from resrank_export.triton.server import ServerConfig, TritonServer

    repository = tmp_path_factory.mktemp("triton-openvino") / "model_repository"
    write_repository(TritonConfig(build=triton_build, out=repository, index=triton_index, cpu_runtime="openvino"))
    with TritonServer(ServerConfig(repository=repository)) as server:
        yield server


def _loads_openvino(pid: int) -> bool:
    return "libopenvino" in open(f"/proc/{pid}/maps").read()


def test_openvino_served_search_and_rerank_equal_the_pipeline(openvino_server, reference, triton_passages):
    from resrank_export.triton.watchdog import live_stubs

    stubs = live_stubs(openvino_server.process.pid).values()
    # the graph models' stubs run OpenVINO; the tokenizers' and the lookup's do not load it
    assert {s.model for s in stubs if _loads_openvino(s.pid)} == {"encoder", "reranker"}
    with ResRankClient(openvino_server.grpc_url, "grpc") as client:
        for query, k in ((SAMPLE_QUERIES[0], 10), (SAMPLE_QUERIES[2], 100)):
            got, expected = client.search(query, k), reference.search(query, k)
            assert got.ids == expected.ids
            np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=SCORE_ATOL)
        passages = [p.text[:300] for p in triton_passages[40:47]]
        got, expected = client.rerank(SAMPLE_QUERIES[4], passages), reference.rerank(SAMPLE_QUERIES[4], passages)
        assert got.ids == expected.ids
        np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=SCORE_ATOL)
    openvino_server.check_running()


def test_auto_serves_openvino_bf16_where_the_build_gated_it(serve_demo, triton_build, reference):
    """`--cpu-runtime auto` on a build whose parity stage passed the OpenVINO BF16 gate: on a CPU
    with native BF16 the repository serves it (and says why), and the served searches keep the
    pipeline's ranking within BF16's rounding; elsewhere it stays on ONNX Runtime FP32, saying why."""
    pytest.importorskip("openvino")
    from resrank_export.runtime import probe_cpu
    from resrank_export.triton.config import TritonConfig, resolve_cpu_runtime

    gated = {"openvino/bf16": True}
    choice = resolve_cpu_runtime(TritonConfig(build=triton_build, out=triton_build / "unused", measured_gates=gated))
    if not probe_cpu().bf16:
        assert (choice.runtime, choice.compute) == ("onnxruntime", "f32")
        assert "this CPU has no native BF16" in choice.reason
        return
    assert (choice.runtime, choice.compute) == ("openvino", "bf16"), choice.reason
    with serve_demo(measured_gates=gated) as server, ResRankClient(server.grpc_url, "grpc") as client:
        for query in SAMPLE_QUERIES[:3]:
            got, expected = client.search(query, 10), reference.search(query, 10)
            assert len(set(got.ids) & set(expected.ids)) >= 9, query
            common = {i: s for i, s in zip(expected.ids, expected.scores)}
            assert max(abs(s - common[i]) for i, s in zip(got.ids, got.scores) if i in common) <= 2e-2
        server.check_running()
