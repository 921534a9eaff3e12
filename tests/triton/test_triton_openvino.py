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
