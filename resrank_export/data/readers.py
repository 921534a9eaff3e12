"""Readers for the text a user brings: BEIR folders (corpus.jsonl, queries.jsonl, qrels, TREC
runs), JSONL, TSV and plain-text passage files. Errors name the file and line."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from resrank_export.errors import InputDataError


@dataclass(frozen=True)
class Passage:
    id: str
    text: str


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputDataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise InputDataError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, obj
        except UnicodeDecodeError:
            raise InputDataError(f"{path}: not UTF-8 text") from None


def _field(obj: dict, names: tuple[str, ...], path: Path, lineno: int, kinds: tuple = (str, int)) -> str:
    """The first of `names` present, as text. Ids may be numbers; texts must be strings (a list or
    object would otherwise be indexed as its Python repr)."""
    for name in names:
        if name in obj and obj[name] is not None:
            value = obj[name]
            if not isinstance(value, kinds) or isinstance(value, bool):
                expected = "a string" if kinds == (str,) else "a string or an integer"
                raise InputDataError(f"{path}:{lineno}: field {name!r} must be {expected}, got "
                                     f"{type(value).__name__} {json.dumps(value)[:60]}")
            return str(value)
    raise InputDataError(f"{path}:{lineno}: missing field; expected one of {', '.join(names)}")


def _text(obj: dict, names: tuple[str, ...], path: Path, lineno: int) -> str:
    return _field(obj, names, path, lineno, (str,))


def _passage_text(obj: dict, path: Path, lineno: int) -> str:
    """BEIR joins title and text with a space (as sentence-transformers' BEIR evaluation does)."""
    text = _text(obj, ("text", "contents", "passage"), path, lineno)
    title = _text(obj, ("title",), path, lineno).strip() if obj.get("title") else ""
    return f"{title} {text}".strip() if title else text.strip()


def iter_passages(path: str | Path) -> Iterator[Passage]:
    """Passages of a corpus file or BEIR folder, in file order. Formats: BEIR corpus.jsonl
    (_id, title, text), JSONL (id/text), TSV (id<TAB>text, optional header) and plain text (one
    passage per line, id = line number). Empty texts and duplicate ids are errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise InputDataError(f"{path}: corpus file not found")
    seen: set[str] = set()
    for lineno, passage in _read_passages(path):
        if not passage.text.strip():
            raise InputDataError(f"{path}:{lineno}: passage {passage.id!r} has empty text")
        if passage.id in seen:
            raise InputDataError(f"{path}:{lineno}: duplicate passage id {passage.id!r}")
        seen.add(passage.id)
        yield passage


def _read_passages(path: Path) -> Iterator[tuple[int, Passage]]:
    try:
        yield from _parse_passages(path)
    except UnicodeDecodeError as exc:
        raise InputDataError(f"{path}: not UTF-8 text ({exc.reason}: {exc.object[exc.start:exc.end]!r})") from None


def _parse_passages(path: Path) -> Iterator[tuple[int, Passage]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for lineno, obj in iter_jsonl(path):
            yield lineno, Passage(_field(obj, ("_id", "id", "docid", "pid"), path, lineno),
                                  _passage_text(obj, path, lineno))
    elif suffix == ".tsv":
        with open(path, encoding="utf-8", newline="") as handle:
            for lineno, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row or (lineno == 1 and [c.lower() for c in row[:2]] in (["id", "text"], ["_id", "text"])):
                    continue
                if len(row) < 2:
                    raise InputDataError(f"{path}:{lineno}: expected 'id<TAB>text', got {len(row)} column(s)")
                yield lineno, Passage(row[0], "\t".join(row[1:]).strip())
    else:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    yield lineno, Passage(str(lineno), line.strip())


def read_queries(path: str | Path) -> dict[str, str]:
    """BEIR queries.jsonl ({_id, text}) -> {query id: text}. A duplicate id or an empty text is an
    error naming the line (a dict would keep one of two queries silently)."""
    path = Path(path)
    if path.is_dir():
        path = path / "queries.jsonl"
    queries: dict[str, str] = {}
    for n, obj in iter_jsonl(path):
        qid, text = _field(obj, ("_id", "id", "qid"), path, n), _text(obj, ("text", "query"), path, n)
        if qid in queries:
            raise InputDataError(f"{path}:{n}: duplicate query id {qid!r}")
        if not text.strip():
            raise InputDataError(f"{path}:{n}: query {qid!r} has empty text")
        queries[qid] = text
    return queries


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV with header (query-id, corpus-id, score) or TREC qrels (qid iter docid
    grade) -> {qid: {docid: grade}}."""
    path = Path(path)
    if path.is_dir():
        path = path / "qrels" / "test.tsv"
    if not path.is_file():
        raise InputDataError(f"{path}: qrels file not found")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            cols = line.split()
            if not cols or (lineno == 1 and not cols[-1].lstrip("-").isdigit()):
                continue
            if len(cols) < 3 or not cols[-1].lstrip("-").isdigit():
                raise InputDataError(
                    f"{path}:{lineno}: expected 'query-id corpus-id score' with an integer score")
            qrels.setdefault(cols[0], {})[cols[-2]] = int(cols[-1])
    return qrels


def read_trec_run(path: str | Path) -> dict[str, list[str]]:
    """TREC run (qid Q0 docid rank score tag) -> {qid: [docid, ...] by rank}."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: run file not found")
    ranked: dict[str, list[tuple[int, str]]] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) < 6 or not cols[3].isdigit():
                raise InputDataError(f"{path}:{lineno}: expected 'qid Q0 docid rank score tag'")
            ranked.setdefault(cols[0], []).append((int(cols[3]), cols[2]))
    return {qid: [doc for _, doc in sorted(rows)] for qid, rows in ranked.items()}
