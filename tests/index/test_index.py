"""Index build, resume and search on tiny seeded exports; the SciFact acceptance run is slow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from resrank_export.data.default_corpus import stdlib_passages
from resrank_export.errors import IndexFormatError, InputDataError, ResRankExportError
from resrank_export.index.config import IndexConfig
from resrank_export.index.encode import OnnxEncoder
from resrank_export.index.retriever import Retriever, check_encoder_matches
from resrank_export.index.stage import build_index
from resrank_export.runtime import ort_session, run_session


def _build_dir(export) -> Path:
    _, graphs = export
    return graphs["encoder"].parents[2]


@pytest.fixture(scope="module")
def tiny_build(tiny_export) -> Path:
    return _build_dir(tiny_export())


@pytest.fixture(scope="module")
def corpus_passages():
    return stdlib_passages(limit=90)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus_passages) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "text": p.text}) + "\n" for p in corpus_passages))
    return path


@pytest.fixture(scope="module")
def flat_index(tiny_build, corpus_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flat") / "index"
    build_index(IndexConfig(build=tiny_build, corpus=corpus_file, out=out, chunk_size=25))
    return out


def _reference_vectors(build: Path, texts: list[str]) -> np.ndarray:
    """One text per graph call: no batching, no padding, no reordering."""
    encoder = OnnxEncoder(build)
    session = ort_session(build / "onnx" / "fp32" / "encoder.onnx")
    return np.concatenate([run_session(session, encoder.tokenizer([t]))[0] for t in texts])


def test_stored_vectors_are_the_encoder_outputs_in_corpus_order(flat_index, tiny_build, corpus_passages):
    retriever = Retriever.load(flat_index)
    assert retriever.ids == [p.id for p in corpus_passages]
    expected = _reference_vectors(tiny_build, [p.text for p in corpus_passages])
    np.testing.assert_allclose(np.asarray(retriever.vectors), expected, atol=1e-5)


def test_flat_search_matches_brute_force(flat_index, tiny_build, corpus_passages):
    retriever = Retriever.load(flat_index, tiny_build)
    stored = np.asarray(retriever.vectors, dtype=np.float32)
    query = "parse a JSON document into Python objects"
    query_vector = _reference_vectors(tiny_build, [query])[0]
    exact = stored @ query_vector
    top = np.argsort(-exact, kind="stable")[:7]
    result = retriever.search(query, 7)
    assert result.ids == [corpus_passages[i].id for i in top]
    np.testing.assert_allclose(result.scores, exact[top], atol=1e-5)
    np.testing.assert_allclose(result.vectors, stored[top], atol=0)
    assert retriever.texts(result.ids[:2]) == [corpus_passages[i].text for i in top[:2]]


def test_search_vectors_batches_and_caps_k(flat_index, corpus_passages):
    retriever = Retriever.load(flat_index)
    stored = np.asarray(retriever.vectors, dtype=np.float32)
    ids, scores, vectors = retriever.search_vectors(stored[[3, 40]], 500)
    assert scores.shape == (2, len(corpus_passages)) and vectors.shape == (2, len(corpus_passages), stored.shape[1])
    for row, source in enumerate((3, 40)):
        order = np.argsort(-(stored @ stored[source]), kind="stable")
        assert ids[row][:5] == [corpus_passages[i].id for i in order[:5]]
        np.testing.assert_allclose(vectors[row], stored[[retriever.ids.index(i) for i in ids[row]]])


def test_interrupted_build_does_not_load_and_resumes_without_reencoding(tiny_build, corpus_file, tmp_path,
                                                                        monkeypatch):
    calls: list[int] = []
    original = OnnxEncoder.encode

    def counting_encode(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(OnnxEncoder, "encode", counting_encode)

    class Interrupt(Exception):
        pass

    def interrupt_after_two(chunks_done: int, passages_done: int) -> None:
        if chunks_done == 2:
            raise Interrupt

    out = tmp_path / "index"
    config = IndexConfig(build=tiny_build, corpus=corpus_file, out=out, chunk_size=20)
    with pytest.raises(Interrupt):
        build_index(config, on_chunk=interrupt_after_two)
    assert calls == [20, 20]
    with pytest.raises(IndexFormatError, match="interrupted build"):
        Retriever.load(out)

    calls.clear()
    info = build_index(config)
    assert calls == [20, 20, 10]  # 90 passages: chunks 3..5 only
    assert info["count"] == 90
    reference = _reference_vectors(tiny_build, [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()])
    np.testing.assert_allclose(np.asarray(Retriever.load(out).vectors), reference, atol=1e-5)


def test_index_from_another_encoder_is_refused(flat_index, tiny_build, tmp_path):
    import onnx

    other = tmp_path / "other-build"
    shutil.copytree(tiny_build, other)
    graph = onnx.load(other / "onnx" / "fp32" / "encoder.onnx")
    onnx.helper.set_model_props(graph, {"re-exported": "yes"})  # same dims, other file
    onnx.save(graph, other / "onnx" / "fp32" / "encoder.onnx")
    with pytest.raises(IndexFormatError, match="encoder_sha256"):
        Retriever.load(flat_index, other)
    info = dict(Retriever.load(flat_index).info, dim=48)
    with pytest.raises(IndexFormatError, match="index dim 48 does not match the encoder dim 32"):
        check_encoder_matches(info, OnnxEncoder(other), flat_index)


@pytest.mark.parametrize("lines, message", [
    ('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n', r"corpus.jsonl:2: malformed JSON"),
    ('{"id": "a", "text": "fine"}\n{"id": "b", "text": "  "}\n', r"corpus.jsonl:2: passage 'b' has empty text"),
    ('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n', r"corpus.jsonl:2: duplicate passage id 'a'"),
])
def test_bad_corpus_is_a_typed_error_and_writes_nothing(tiny_build, tmp_path, lines, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(lines)
    with pytest.raises(InputDataError, match=message):
        build_index(IndexConfig(build=tiny_build, corpus=corpus, out=tmp_path / "index"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_kinds_find_the_exact_neighbours(kind, tiny_build, corpus_file, flat_index, tmp_path):
    info = build_index(IndexConfig(build=tiny_build, corpus=corpus_file, out=tmp_path / kind, kind=kind,
                                   vector_dtype="float16"))
    approx = Retriever.load(tmp_path / kind)
    exact = Retriever.load(flat_index)
    assert approx.info == info and approx.vectors.dtype == np.float16
    queries = np.asarray(exact.vectors[:30], dtype=np.float32)
    exact_ids, _, _ = exact.search_vectors(queries, 10)
    approx_ids, _, approx_vectors = approx.search_vectors(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_ids, exact_ids)])
    assert recall >= (0.6 if kind == "ivfpq" else 0.95)
    found = approx_ids[0][0]
    np.testing.assert_allclose(approx_vectors[0, 0], exact.vectors[exact.ids.index(found)], atol=2e-3)


def test_search_cli_prints_one_json_object_per_query(flat_index, tiny_build, tmp_path):
    from click.testing import CliRunner

    from resrank_export.cli import main

    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "parse JSON"}\n{"_id": "q2", "text": "temporary directory"}\n')
    result = CliRunner().invoke(main, ["search", "--index", str(flat_index), "--queries", str(queries),
                                       "--top-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    retriever = Retriever.load(flat_index, tiny_build)
    for line, (qid, text) in zip(lines, [("q1", "parse JSON"), ("q2", "temporary directory")]):
        expected = retriever.search(text, 4)
        assert line["query_id"] == qid and line["ids"] == expected.ids
        np.testing.assert_allclose(line["scores"], expected.scores, atol=1e-5)
    assert len(lines) == 2


def test_index_cli_reports_bad_input_on_one_line(tiny_build, tmp_path):
    from click.testing import CliRunner

    from resrank_export.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "fine"}\n\n{"id": "b", "text": "broken"\n')
    result = CliRunner().invoke(main, ["index", "--build", str(tiny_build), "--corpus", str(corpus),
                                       "--out", str(tmp_path / "index")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {corpus}:3: malformed JSON (Expecting ',' delimiter)"]


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_more_lists_than_passages_is_refused_before_encoding(tiny_build, tmp_path, kind):
    """FAISS cannot train more lists than vectors: refused on one line, no index and no .partial."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": f"passage number {i}"}) + "\n" for i in range(5)))
    with pytest.raises(InputDataError, match=r"--nlist 6: more inverted lists than the 5 vectors"):
        build_index(IndexConfig(build=tiny_build, corpus=corpus, out=tmp_path / "index", kind=kind, nlist=6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_search_refuses_an_empty_query(flat_index):
    from resrank_export.index.retriever import SearchConfig, run_search

    with pytest.raises(ResRankExportError, match="--query is empty or whitespace-only"):
        list(run_search(SearchConfig(index=flat_index, query=" \t")))


def test_build_index_stage_records_the_final_build_and_is_skipped_on_rerun(tiny_checkpoint, corpus_file, tmp_path):
    from resrank_export.build import BuildConfig, run_build

    checkpoint = tiny_checkpoint()
    config = BuildConfig(out=tmp_path / "build", checkpoint=checkpoint.root, corpus=corpus_file)
    manifest = run_build(config)
    assert manifest["stages"]["index"]["status"] == "ran"
    retriever = Retriever.load(tmp_path / "build" / "index", tmp_path / "build")
    assert retriever.info["build"] == str((tmp_path / "build").resolve()) and retriever.info["count"] == 90
    assert manifest["stages"]["index"]["report"]["count"] == 90
    rerun = run_build(config)
    assert rerun["stages"]["index"]["status"] == "skipped"
    assert Retriever.load(tmp_path / "build" / "index", tmp_path / "build").ids == retriever.ids


@pytest.mark.slow
def test_scifact_flat_ndcg_matches_sentence_transformers_and_approximate_recall(demo_export, scifact_dir,
                                                                                tmp_path):
    """Acceptance: the exported FP32 MiniLM encoder + flat index reproduce the published
    sentence-transformers nDCG@10 on SciFact; ivf/hnsw at defaults keep recall@10 >= 0.95."""
    from resrank_export.data.evaluation import judged_queries, recall_against_exact
    from resrank_export.index.report import evaluate_beir

    build = _build_dir(demo_export)
    info = build_index(IndexConfig(build=build, corpus=scifact_dir, out=tmp_path / "flat"))
    assert info["count"] == 5183 and info["dim"] == 384
    flat = Retriever.load(tmp_path / "flat", build)
    ndcg = evaluate_beir(flat, scifact_dir)["ndcg@10"]
    assert ndcg == pytest.approx(0.6451, abs=0.002)
    report = json.loads((tmp_path / "flat" / "report.json").read_text())
    assert report["ndcg@10"] == pytest.approx(ndcg, abs=1e-4)

    _, queries = judged_queries(scifact_dir)
    query_vectors = flat.encoder.encode(list(queries.values()))
    exact_ids, _, _ = flat.search_vectors(query_vectors, 10)
    for kind in ("ivf", "hnsw"):
        build_index(IndexConfig(build=build, corpus=scifact_dir, out=tmp_path / kind, kind=kind,
                                source_index=tmp_path / "flat"))
        approx_ids, _, _ = Retriever.load(tmp_path / kind).search_vectors(query_vectors, 10)
        assert recall_against_exact(approx_ids, exact_ids, 10) >= 0.95, kind
        report = json.loads((tmp_path / kind / "report.json").read_text())
        assert report["recall@10"] >= 0.95


def test_index_encodes_with_the_requested_precision_graph_and_queries_follow(tiny_build, corpus_file, corpus_passages,
                                                                            tmp_path):
    """--precision fp16: the corpus is encoded by onnx/fp16/encoder.onnx (its vectors, not the FP32
    graph's), index.json records it, and a Retriever loaded from the build encodes queries with the
    same graph. A provider that cannot start here is a one-line error."""
    from resrank_export.errors import NotAvailableError
    from resrank_export.model.specs import encoder_spec
    from resrank_export.precision.graphs import PrecisionConfig, convert_half

    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    spec = encoder_spec(OnnxEncoder(build).dim)
    texts = [p.text for p in corpus_passages[:16]]
    tokens = OnnxEncoder(build).tokenizer(texts)  # AutoCast's range check runs real inputs
    convert_half(build / "onnx" / "fp32" / "encoder.onnx", build / "onnx" / "fp16" / "encoder.onnx",
                 {name: tokens[name] for name in spec.input_names}, PrecisionConfig())
    info = build_index(IndexConfig(build=build, corpus=corpus_file, out=tmp_path / "index", precision="fp16"))
    assert info["encoder_precision"] == "fp16"
    stored = np.asarray(Retriever.load(tmp_path / "index").vectors)
    fp16 = run_session(ort_session(build / "onnx" / "fp16" / "encoder.onnx"), OnnxEncoder(build).tokenizer(texts[:1]))[0]
    np.testing.assert_allclose(stored[:1], fp16, atol=1e-5)
    assert np.abs(stored[:1] - _reference_vectors(build, texts[:1])).max() > 1e-6  # not the FP32 graph's vectors
    retriever = Retriever.load(tmp_path / "index", build)
    assert retriever.encoder.graph == build / "onnx" / "fp16" / "encoder.onnx"
    assert retriever.search(corpus_passages[3].text, 1).ids[0] == corpus_passages[3].id
    with pytest.raises(NotAvailableError, match="--providers cuda: .*(did not start|has no CUDAExecutionProvider)"):
        build_index(IndexConfig(build=build, corpus=corpus_file, out=tmp_path / "gpu", providers="cuda"))
    assert not (tmp_path / "gpu").exists()
