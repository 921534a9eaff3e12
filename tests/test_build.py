"""The build's triton stage: <build>/model_repository is written, recorded and reused."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")


def test_build_writes_model_repository_and_reuses_it(tiny_checkpoint, tmp_path):
    from resrank_export.build import TRITON_REPOSITORY, BuildConfig, run_build
    from resrank_export.triton.repository import MARKER_FILE

    config = BuildConfig(out=tmp_path / "build", checkpoint=tiny_checkpoint().root)
    first = run_build(config)
    assert first["stages"]["triton"]["status"] == "ran"
    summary = json.loads((tmp_path / "build" / TRITON_REPOSITORY / MARKER_FILE).read_text())
    assert summary == first["stages"]["triton"]["report"]
    assert "resrank_rerank" in summary["models"] and "resrank" not in summary["models"]  # no index yet
    second = run_build(config)
    assert second["stages"]["triton"]["status"] == "skipped"
    assert second["stages"]["triton"]["outputs"] == first["stages"]["triton"]["outputs"]
