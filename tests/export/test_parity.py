"""Parity check: passes for a faithful export on real DL19 text, and its gate raises for graphs
that do not reproduce the reference (another checkpoint's graphs)."""

from __future__ import annotations

import json

import pytest

from resrank_export.errors import InputDataError, ParityError
from resrank_export.export.parity import RUN_FILE, ParityConfig, check_parity, load_parity_data
from resrank_export.model.reference import ResRankReference


@pytest.fixture(scope="module")
def exported(tiny_export):
    checkpoint, graphs = tiny_export()
    return ResRankReference(checkpoint), graphs


def test_parity_on_dl19_passes_and_reports_every_shape(exported, dl19_dir):
    reference, graphs = exported
    k_max = reference.checkpoint.config.max_candidates
    report = check_parity(reference, graphs, ParityConfig(data_dir=dl19_dir, queries=2))
    assert json.loads(json.dumps(report)) == report  # the report is plain JSON data
    assert str(dl19_dir) in report["source"]
    assert report["passed"] is True
    assert report["encoder"]["texts"] == 2 * k_max + 2
    assert report["encoder"]["max_abs_diff"] <= 1e-4 and report["encoder"]["mean_cosine"] > 0.9999
    cases = report["reranker"]["cases"]
    assert {c["k"] for c in cases} >= {1, k_max}
    assert any(c["batch"] > 1 for c in cases)
    long_case = next(c for c in cases if c["name"].startswith("long query"))
    same_k = [c for c in cases if c["k"] == long_case["k"] and c is not long_case]
    assert all(long_case["prompt_tokens"] > c["prompt_tokens"] for c in same_k)
    for case in cases:
        assert case["max_abs_diff"] <= 1e-4
        assert case["top10_identical"] == 1.0
        assert case["mean_cosine"] > 0.9999


def test_gate_raises_for_graphs_of_another_checkpoint(exported, tiny_checkpoint):
    reference, graphs = exported
    # positive control on the same (embedded) data: the matching reference passes
    assert check_parity(reference, graphs, ParityConfig())["passed"] is True
    other = ResRankReference(tiny_checkpoint(seed=1))
    with pytest.raises(ParityError) as caught:
        check_parity(other, graphs, ParityConfig())
    assert "\n" not in str(caught.value) and "max |diff|" in str(caught.value)
    report = check_parity(other, graphs, ParityConfig(), gate=False)
    assert report["passed"] is False
    assert report["reranker"]["max_abs_diff"] > 1e-4
    # The top-10 order is gated on its own: with a tolerance no score diff can exceed
    # (cosines differ by at most 2), the reordering alone fails the check.
    loose = check_parity(other, graphs, ParityConfig(atol=2.0), gate=False)
    assert loose["reranker"]["max_abs_diff"] <= 2.0
    assert loose["reranker"]["top10_identical"] is False
    assert loose["passed"] is False


def _beir_folder(root, run_rows: list[str], corpus_ids: list[str]):
    root.mkdir()
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "fleas"}\n')
    (root / "corpus.jsonl").write_text("".join(f'{{"_id": "{d}", "text": "text {d}"}}\n' for d in corpus_ids))
    (root / RUN_FILE).write_text("".join(f"{row}\n" for row in run_rows))
    return root


def test_parity_data_from_a_beir_folder(tmp_path):
    folder = _beir_folder(tmp_path / "beir", ["q1 Q0 d2 1 9.0 bm25", "q1 Q0 d1 2 8.0 bm25", "q1 Q0 d3 3 7.0 bm25"],
                          ["d1", "d2", "d3"])
    data = load_parity_data(ParityConfig(data_dir=folder), k=2)
    assert data.queries == ["fleas"]
    assert data.candidates == [["text d2", "text d1"]]  # run order, cut at k


def test_parity_data_needs_k_candidates(tmp_path):
    folder = _beir_folder(tmp_path / "beir", ["q1 Q0 d1 1 9.0 bm25"], ["d1"])
    with pytest.raises(InputDataError, match="no query with 5 candidates"):
        load_parity_data(ParityConfig(data_dir=folder), k=5)


def test_parity_data_run_passage_missing_from_corpus(tmp_path):
    folder = _beir_folder(tmp_path / "beir", ["q1 Q0 d1 1 9.0 bm25", "q1 Q0 d9 2 8.0 bm25"], ["d1"])
    with pytest.raises(InputDataError, match="corpus.jsonl: 1 run passages missing, e.g. d9"):
        load_parity_data(ParityConfig(data_dir=folder), k=2)


def test_parity_data_folder_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(InputDataError, match="not found"):
        load_parity_data(ParityConfig(data_dir=tmp_path / "typo"), k=2)


def test_parity_data_without_run_file_uses_embedded_corpus(tmp_path):
    folder = tmp_path / "no-run"
    folder.mkdir()
    data = load_parity_data(ParityConfig(data_dir=folder, queries=2), k=3)
    assert "embedded" in data.source and RUN_FILE in data.source
    assert len(data.queries) == 2 and [len(c) for c in data.candidates] == [3, 3]
    assert len({t for c in data.candidates for t in c}) == 6
