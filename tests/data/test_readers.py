"""Readers of user text: every format parses to the same passages, and every malformed input is
an InputDataError naming the file and line."""

from __future__ import annotations

import pytest

from resrank_export.data.readers import Passage, iter_passages, read_qrels, read_queries, read_trec_run
from resrank_export.errors import InputDataError

PASSAGES = [Passage("d1", "Fleas live up to a year."), Passage("d2", "Dense retrieval uses vectors.")]


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, text, expected", [
    ("corpus.jsonl",
     '{"_id": "d1", "title": "", "text": "Fleas live up to a year."}\n\n'
     '{"_id": "d2", "text": "Dense retrieval uses vectors."}\n', PASSAGES),
    ("plain.jsonl", '{"id": "d1", "contents": "Fleas live up to a year."}\n'
                    '{"docid": "d2", "passage": "Dense retrieval uses vectors."}\n', PASSAGES),
    ("titled.jsonl", '{"_id": "d1", "title": "Fleas", "text": "live up to a year."}\n',
     [Passage("d1", "Fleas live up to a year.")]),
    ("with-header.tsv", "id\ttext\nd1\tFleas live up to a year.\nd2\tDense retrieval uses vectors.\n", PASSAGES),
    ("no-header.tsv", 'd1\tFleas live up to a year.\nd2\tDense "retrieval"\tuses vectors.\n',
     [PASSAGES[0], Passage("d2", 'Dense "retrieval"\tuses vectors.')]),
    ("lines.txt", "Fleas live up to a year.\n\n  Dense retrieval uses vectors.  \n",
     [Passage("1", "Fleas live up to a year."), Passage("3", "Dense retrieval uses vectors.")]),
])
def test_passage_formats(tmp_path, name, text, expected):
    assert list(iter_passages(_write(tmp_path / name, text))) == expected


def test_beir_folder_reads_corpus_jsonl(tmp_path):
    _write(tmp_path / "corpus.jsonl", '{"_id": "d1", "text": "Fleas live up to a year."}\n')
    assert list(iter_passages(tmp_path)) == PASSAGES[:1]


@pytest.mark.parametrize("name, text, where, words", [
    ("c.jsonl", '{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n', ":2:", "malformed JSON"),
    ("c.jsonl", '{"_id": "d1", "text": "ok"}\n["d2", "text"]\n', ":2:", "expected a JSON object"),
    ("c.jsonl", '{"_id": "d1", "text": "ok"}\n\n{"_id": "d1", "text": "again"}\n', ":3:",
     "duplicate passage id 'd1'"),
    ("c.jsonl", '{"_id": "d1", "title": "", "text": "  "}\n', ":1:", "empty text"),
    ("c.jsonl", '{"_id": "d1", "body": "x"}\n', ":1:", "expected one of text, contents, passage"),
    ("c.jsonl", '{"text": "x"}\n', ":1:", "expected one of _id, id, docid, pid"),
    ("c.tsv", "d1\tok\nd2\n", ":2:", "expected 'id<TAB>text'"),
    ("c.tsv", "d1\tok\nd1\tagain\n", ":2:", "duplicate passage id"),
    ("c.tsv", "d1\t   \n", ":1:", "empty text"),
    # A text that is not a string would be indexed as its Python repr ("5", "['a']", "{...}").
    ("c.jsonl", '{"_id": "d1", "text": 5}\n', ":1:", "field 'text' must be a string, got int 5"),
    ("c.jsonl", '{"_id": "d1", "text": ["a", "b"]}\n', ":1:", "field 'text' must be a string, got list"),
    ("c.jsonl", '{"_id": "d1", "text": {"en": "a"}}\n', ":1:", "field 'text' must be a string, got dict"),
    ("c.jsonl", '{"_id": "d1", "title": 3, "text": "ok"}\n', ":1:", "field 'title' must be a string"),
    ("c.jsonl", '{"_id": ["d1"], "text": "ok"}\n', ":1:", "field '_id' must be a string or an integer"),
])
def test_malformed_passages_name_file_and_line(tmp_path, name, text, where, words):
    path = _write(tmp_path / name, text)
    with pytest.raises(InputDataError) as caught:
        list(iter_passages(path))
    message = str(caught.value)
    assert message.startswith(f"{path}{where}") and words in message and "\n" not in message


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(InputDataError, match="corpus file not found"):
        list(iter_passages(tmp_path / "none.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"_id": "d1", "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InputDataError, match="not UTF-8"):
        list(iter_passages(tmp_path / "latin1.jsonl"))


@pytest.mark.parametrize("name, line", [("latin1.tsv", "d1\tcaf\xe9\n"), ("latin1.txt", "caf\xe9\n")])
def test_non_utf8_tsv_and_text_name_the_file(tmp_path, name, line):
    path = tmp_path / name
    path.write_bytes(("d0\tfine\n" if name.endswith(".tsv") else "fine\n").encode() + line.encode("latin-1"))
    with pytest.raises(InputDataError) as caught:
        list(iter_passages(path))
    assert str(caught.value).startswith(f"{path}: not UTF-8")


def test_queries(tmp_path):
    _write(tmp_path / "queries.jsonl", '{"_id": "q1", "text": "fleas"}\n{"qid": 7, "query": "retrieval"}\n')
    assert read_queries(tmp_path) == {"q1": "fleas", "7": "retrieval"}
    _write(tmp_path / "queries.jsonl", '{"_id": "q1"}\n')
    with pytest.raises(InputDataError, match=r"queries.jsonl:1: missing field"):
        read_queries(tmp_path)


@pytest.mark.parametrize("text, where, words", [
    ('{"_id": "q1", "text": "fleas"}\n{"_id": "q1", "text": "ticks"}\n', ":2:", "duplicate query id 'q1'"),
    ('{"_id": "q1", "text": " "}\n', ":1:", "query 'q1' has empty text"),
    ('{"_id": "q1", "text": 42}\n', ":1:", "field 'text' must be a string"),
])
def test_malformed_queries_name_file_and_line(tmp_path, text, where, words):
    path = _write(tmp_path / "queries.jsonl", text)
    with pytest.raises(InputDataError) as caught:
        read_queries(path)
    assert str(caught.value).startswith(f"{path}{where}") and words in str(caught.value)


def test_trec_run_is_ordered_by_rank(tmp_path):
    path = _write(tmp_path / "run.trec", "q1 Q0 d3 3 1.0 bm25\nq1 Q0 d1 1 3.0 bm25\n\nq2 Q0 d9 1 2.0 bm25\n"
                                         "q1 Q0 d2 2 2.0 bm25\n")
    assert read_trec_run(path) == {"q1": ["d1", "d2", "d3"], "q2": ["d9"]}


@pytest.mark.parametrize("line", ["q1 Q0 d1 1 3.0", "q1 Q0 d1 first 3.0 bm25"])
def test_malformed_trec_run_names_line(tmp_path, line):
    path = _write(tmp_path / "run.trec", f"q1 Q0 d0 1 3.0 bm25\n{line}\n")
    with pytest.raises(InputDataError, match=f"{path}:2: expected 'qid Q0 docid rank score tag'"):
        read_trec_run(path)
    with pytest.raises(InputDataError, match="run file not found"):
        read_trec_run(tmp_path / "none.trec")


def test_qrels_with_and_without_header(tmp_path):
    (tmp_path / "qrels").mkdir()
    _write(tmp_path / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td1\t1\n")
    assert read_qrels(tmp_path) == {"q1": {"d1": 2, "d2": 0}, "q2": {"d1": 1}}
    trec_style = _write(tmp_path / "qrels.txt", "q1 0 d1 3\n")  # TREC qrels: qid iter docid grade
    assert read_qrels(trec_style) == {"q1": {"d1": 3}}


@pytest.mark.parametrize("line", ["q1\td2", "q1\td2\trelevant"])
def test_malformed_qrels_name_line(tmp_path, line):
    path = _write(tmp_path / "qrels.tsv", f"query-id\tcorpus-id\tscore\nq1\td1\t1\n{line}\n")
    with pytest.raises(InputDataError) as caught:
        read_qrels(path)
    assert str(caught.value).startswith(f"{path}:3:")
    with pytest.raises(InputDataError, match="qrels file not found"):
        read_qrels(tmp_path / "none.tsv")


def test_real_dl19_files_parse(dl19_dir):
    passages = list(iter_passages(dl19_dir))
    run = read_trec_run(dl19_dir / "run.bm25.trec")
    queries = read_queries(dl19_dir)
    qrels = read_qrels(dl19_dir)
    assert len(queries) == 43 and set(run) == set(queries) and set(qrels) == set(queries)
    assert {d for docs in run.values() for d in docs} <= {p.id for p in passages}
