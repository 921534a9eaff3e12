"""Tokenization shared by the reference model, the ONNX parity check, the index and the Triton
python models, so that all of them feed the graphs the same ids.

Only `tokenizers` and `numpy` are imported: the Triton python backend loads this module too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUERY_MARKER = "{query}"
PASSAGES_MARKER = "{passages}"
PASSAGE_MARKER = "{passage}"


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    # tokenizer.json files often carry a fixed padding/truncation (MiniLM's pads to 128);
    # we decide both here.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row (the graphs find the last real token on either side)."""
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _configured_pad_token(tokenizer_file: Path) -> str | None:
    """`pad_token` of the tokenizer_config.json beside tokenizer.json (a string or an AddedToken
    dict), the tokenizer's own choice (Qwen3: `<|endoftext|>`)."""
    config_file = Path(tokenizer_file).parent / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        token = json.loads(config_file.read_text(encoding="utf-8")).get("pad_token")
    except (ValueError, AttributeError):
        return None
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def _pad_id(tokenizer, tokenizer_file: Path) -> int:
    """The tokenizer config's pad token, else a conventional one. Padded positions are masked, so
    the choice never changes a result; it keeps the ids what the model's own tokenizer would give."""
    for token in (_configured_pad_token(tokenizer_file), "[PAD]", "<pad>", "<|endoftext|>", "</s>"):
        token_id = tokenizer.token_to_id(token) if token else None
        if token_id is not None:
            return token_id
    return 0


class PassageTokenizer:
    """Encoder-side tokenization of passages (`__call__`) and queries (`queries`): each text is
    formatted with its template (Qwen3-Embedding: an instruction before queries, documents bare),
    truncated so that it holds at most `max_tokens` ids with the tokenizer's special tokens and the
    appended `eos_token` (Qwen3-Embedding ends every text with `<|endoftext|>`), then right-padded."""

    def __init__(self, tokenizer_file: str | Path, max_tokens: int, query_template: str = QUERY_MARKER,
                 passage_template: str = PASSAGE_MARKER, eos_token: str | None = None):
        self.tokenizer = _load_tokenizer(Path(tokenizer_file))
        self.eos_id = None
        if eos_token is not None:
            self.eos_id = self.tokenizer.token_to_id(eos_token)
            if self.eos_id is None:
                raise ValueError(f"eos token {eos_token!r} is not in {tokenizer_file}")
        self.tokenizer.enable_truncation(max_tokens - (self.eos_id is not None))
        self.max_tokens = max_tokens
        self.query_template, self.passage_template = query_template, passage_template
        self.pad_id = _pad_id(self.tokenizer, Path(tokenizer_file))

    @classmethod
    def for_config(cls, tokenizer_file: str | Path, config) -> "PassageTokenizer":
        """With a checkpoint's ResRankConfig (its max_passage_tokens, templates and EOS)."""
        return cls(tokenizer_file, config.max_passage_tokens, config.query_template, config.passage_template,
                   config.eos_token if config.append_eos else None)

    def _ids(self, texts: list[str], template: str, marker: str) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch([template.replace(marker, t) for t in texts])
        return [e.ids + [self.eos_id] if self.eos_id is not None else e.ids for e in encodings]

    def _batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        ids, mask = _pad(rows, self.pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Encoder inputs of passages."""
        return self._batch(self._ids(list(texts), self.passage_template, PASSAGE_MARKER))

    def queries(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Encoder inputs of queries (retrieval)."""
        return self._batch(self._ids(list(texts), self.query_template, QUERY_MARKER))

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self._ids(list(texts), self.passage_template, PASSAGE_MARKER)]

    def truncated(self, texts: list[str]) -> list[bool]:
        """Which passages lose tokens to truncation (for callers that refuse instead)."""
        formatted = [self.passage_template.replace(PASSAGE_MARKER, t) for t in texts]
        return [bool(e.overflowing) for e in self.tokenizer.encode_batch(formatted)]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    slot_positions: list[int]


class PromptBuilder:
    """Builds the reranker prompt: the template with the (truncated) query and one placeholder
    token per candidate, and the positions of those placeholders."""

    def __init__(
        self,
        tokenizer_file: str | Path,
        template: str,
        placeholder_token: str,
        max_query_tokens: int,
        max_candidates: int,
    ):
        self.tokenizer = _load_tokenizer(Path(tokenizer_file))
        self.template = template
        self.placeholder = placeholder_token
        self.placeholder_id = self.tokenizer.token_to_id(placeholder_token)
        if self.placeholder_id is None:
            raise ValueError(f"placeholder token {placeholder_token!r} is not in {tokenizer_file}")
        self.max_query_tokens = max_query_tokens
        self.max_candidates = max_candidates
        self.pad_id = _pad_id(self.tokenizer, Path(tokenizer_file))

    def clean_query(self, query: str) -> str:
        """Remove placeholder tokens a user typed (they would add slots) and truncate the
        query to `max_query_tokens` tokens, cutting the text at a token boundary."""
        query, encoding = self._query_encoding(query)
        if len(encoding.ids) > self.max_query_tokens:
            query = query[: encoding.offsets[self.max_query_tokens - 1][1]]
        return query

    def _query_encoding(self, query: str):
        query = query.replace(self.placeholder, " ").strip()
        return query, self.tokenizer.encode(query, add_special_tokens=False)

    def query_tokens(self, query: str) -> int:
        """Tokens of the query as the prompt would hold it before truncation."""
        return len(self._query_encoding(query)[1].ids)

    def passages_block(self, k: int) -> str:
        return " ".join(f"[{i}] {self.placeholder}" for i in range(1, k + 1))

    def build(self, query: str, k: int) -> Prompt:
        if not 1 <= k <= self.max_candidates:
            raise ValueError(f"number of candidates must be in 1..{self.max_candidates}, got {k}")
        # Fill both markers in one pass: a query that contains "{passages}" stays text.
        query = self.clean_query(query)
        before, after = self.template.split(PASSAGES_MARKER)
        text = before.replace(QUERY_MARKER, query) + self.passages_block(k) + after.replace(QUERY_MARKER, query)
        ids = self.tokenizer.encode(text).ids
        slots = [i for i, token in enumerate(ids) if token == self.placeholder_id]
        if len(slots) != k:  # only a tokenizer that splits the placeholder gets here
            raise ValueError(f"prompt has {len(slots)} placeholder tokens, expected {k}")
        return Prompt(ids, slots)

    def batch(self, queries: list[str], k: int) -> dict[str, np.ndarray]:
        """Reranker graph inputs (except `passage_embeddings`) for queries with k candidates each."""
        prompts = [self.build(q, k) for q in queries]
        ids, mask = _pad([p.ids for p in prompts], self.pad_id)
        slots = np.asarray([p.slot_positions for p in prompts], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask, "slot_positions": slots}
