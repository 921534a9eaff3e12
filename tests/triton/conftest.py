"""A real tritonserver on the demo build (python backend, CPU) and a 300-passage index of the
embedded corpus, started once per session for the server and gateway tests (the batching test
starts its own with other batching settings), with the in-process pipeline as their reference."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def triton_build(demo_export) -> Path:
    """The demo export is a build folder without manifest."""
    _, graphs = demo_export
    return graphs["encoder"].parents[2]


@pytest.fixture(scope="session")
def triton_passages() -> list:
    from resrank_export.data.default_corpus import stdlib_passages

    return stdlib_passages(limit=300)


@pytest.fixture(scope="session")
def triton_index(triton_build, triton_passages, tmp_path_factory) -> Path:
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.stage import build_index

    folder = tmp_path_factory.mktemp("triton-index")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": p.id, "text": p.text}) + "\n" for p in triton_passages))
    build_index(IndexConfig(build=triton_build, corpus=corpus, out=folder / "index"))
    return folder / "index"


@pytest.fixture(scope="session")
def reference(triton_build, triton_index):
    from resrank_export.index.pipeline import ResRankPipeline

    return ResRankPipeline(triton_build, triton_index)


@pytest.fixture(scope="session")
def serve_demo(triton_build, triton_index, tmp_path_factory):
    """Factory: `with serve_demo(**settings) as server` runs a real tritonserver on a repository of
    the demo build and index written with those TritonConfig settings; skipped where tritonclient
    or the nvidia-pytriton wheel is missing."""
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("pytriton")
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository
    from resrank_export.triton.server import ServerConfig, TritonServer

    @contextmanager
    def serve(**settings):
        repository = tmp_path_factory.mktemp("triton") / "model_repository"
        write_repository(TritonConfig(build=triton_build, out=repository, index=triton_index, max_batch_size=8,
                                      **settings))
        with TritonServer(ServerConfig(repository=repository)) as server:
            yield server

    return serve


@pytest.fixture(scope="session")
def triton_server(serve_demo):
    """The session's server, with the default batching settings."""
    with serve_demo() as server:
        yield server
