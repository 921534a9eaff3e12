"""A repository of compact graphs whose weights sit in external-data files (as every graph past
1 GiB does at real sizes) served by a real tritonserver: the side files travel with model.onnx
(the 0.6B repository failed to load without them), the INT4 weight-only graphs run in the python
flavour, and the rerank ensemble equals the in-process pipeline on the same graphs."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from resrank_export.data.default_corpus import SAMPLE_QUERIES
from resrank_export.triton.client import ResRankClient

pytestmark = pytest.mark.slow
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module")
def external_int4_build(triton_build, demo_checkpoint, tmp_path_factory):
    """The demo build with its FP32 and int4_awq graphs saved with every weight in `<graph>.onnx.data`."""
    from resrank_export.export.half import save_graph
    from resrank_export.export.onnx import graph_specs
    from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration
    from resrank_export.precision.weight_only import DEFAULT_CONFIGS, quantize_weight_only

    build = tmp_path_factory.mktemp("external") / "build"
    shutil.copytree(triton_build, build, ignore=shutil.ignore_patterns("*.onnx*"))
    checkpoint = demo_checkpoint  # the checkpoint of triton_build's graphs
    calibration = build / "calibration"
    build_calibration_set(checkpoint, calibration, CalibrationConfig(encoder_samples=16, reranker_queries=2),
                          triton_build / "onnx" / "fp32" / "encoder.onnx")
    for spec in graph_specs(checkpoint):
        fp32 = build / "onnx" / "fp32" / spec.filename
        fp32.parent.mkdir(parents=True, exist_ok=True)
        save_graph(onnx.load(str(triton_build / "onnx" / "fp32" / spec.filename)), fp32, threshold=0)
        int4 = build / "onnx" / "int4_awq" / spec.filename
        quantize_weight_only(fp32, int4, load_calibration(calibration, spec), 4, DEFAULT_CONFIGS["int4_awq"])
        save_graph(onnx.load(str(int4)), int4, threshold=0)
        assert (int4.parent / f"{spec.filename}.data").is_file()
    return build


@pytest.fixture(scope="module")
def int4_server(external_int4_build, tmp_path_factory):
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("pytriton")
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository
    from resrank_export.triton.server import ServerConfig, TritonServer

    repository = tmp_path_factory.mktemp("triton-int4") / "model_repository"
    write_repository(TritonConfig(build=external_int4_build, out=repository, precision="int4_awq"))
    assert (repository / "encoder" / "1" / "encoder.onnx.data").is_file()
    with TritonServer(ServerConfig(repository=repository)) as server:
        yield server


def test_external_data_int4_repository_serves_the_pipeline_rerank(int4_server, external_int4_build, triton_passages):
    from resrank_export.index.pipeline import ResRankPipeline

    reference = ResRankPipeline(external_int4_build, precision="int4_awq")
    fp32 = ResRankPipeline(external_int4_build)
    passages = [p.text[:400] for p in triton_passages[60:80]]
    with ResRankClient(int4_server.grpc_url, "grpc") as client:
        for query in SAMPLE_QUERIES[:2]:
            got, expected = client.rerank(query, passages), reference.rerank(query, passages)
            assert got.ids == expected.ids
            np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=SCORE_ATOL)
            # the INT4 graphs, not the FP32 ones, answered: close to FP32's scores, not equal
            assert not np.allclose(got.scores, fp32.rerank(query, passages).scores, rtol=0, atol=SCORE_ATOL)
    int4_server.check_running()
