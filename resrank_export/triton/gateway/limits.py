"""What every API shape of the gateway shares: its settings, the served repository's limits,
the error answer, and the strict request model (an unknown or misplaced field is a 422 naming
it, never silently dropped)."""

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated

import numpy as np

from resrank_export.errors import ResRankExportError

API_KEY_ENV = "RESRANK_GATEWAY_API_KEY"
MAX_QUERY_BYTES = 65536  # the python models' own limit (triton/models/common.py)


@dataclass(frozen=True)
class GatewayConfig:
    repository: Path  # the model repository Triton serves: limits, tokenizers, passage texts
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # required as `Authorization: Bearer KEY` or `X-API-Key` on the APIs
    max_body_bytes: int = 16 << 20  # larger request bodies get 413 (1,000 documents of a few KiB fit)
    max_documents: int | None = None  # per rerank request; None: the repository's max_candidates
    timeout_s: float = 60.0  # per Triton call; past it the client gets 504
    max_chunks_per_doc: int = 10  # a rerank document past max_passage_tokens: passages of it ranked (Cohere's name)
    chunk_overlap: int = 32  # tokens consecutive passages of one document share

    def validate(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ResRankExportError(f"--api-key / ${API_KEY_ENV} is set but empty (an unset variable in a script?): "
                                     "that would serve /v1/* without authentication; give a key, or neither")
        if not 1 <= self.port <= 65535:
            raise ResRankExportError(f"--port {self.port}: expected 1 to 65535")
        if self.max_body_bytes < 1 or (self.max_documents is not None and self.max_documents < 1):
            raise ResRankExportError("--max-body-bytes and --max-documents must be >= 1")
        if self.max_chunks_per_doc < 1 or self.chunk_overlap < 0:
            raise ResRankExportError("--max-chunks-per-doc must be >= 1 and --chunk-overlap >= 0")
        if self.timeout_s <= 0:
            raise ResRankExportError(f"--timeout {self.timeout_s}: expected seconds > 0")


@dataclass(frozen=True)
class RepositoryLimits:
    """What the served repository accepts, read from its files (never guessed)."""

    max_candidates: int  # per rerank request (the deployment's ceiling; several reranker passes past one)
    max_top_k: int | None  # None: the repository has no index, so no /v1/search
    passage_tokenizer: object  # PassageTokenizer of the passage encoder
    prompt_builder: object  # PromptBuilder of the reranker
    retriever: object | None  # Retriever of the served index: stored slot vectors and texts (None: no index)

    @classmethod
    def read(cls, repository: Path) -> "RepositoryLimits":
        from resrank_export.index.pipeline import load_prompt_builder, read_resrank_config
        from resrank_export.model.checkpoint import CONFIG_FILE
        from resrank_export.model.text import PassageTokenizer
        from resrank_export.triton.repository import MARKER_FILE

        marker = repository / MARKER_FILE
        if not marker.is_file():
            raise ResRankExportError(f"{marker}: not found; --repository must be a folder written by "
                                     "`resrank-export triton`")
        summary = json.loads(marker.read_text())
        encoder, prompts = repository / "passage_encoder" / "1", repository / "rank_passes" / "1"
        for path in (encoder / "tokenizer.json", encoder / CONFIG_FILE, prompts / "tokenizer.json"):
            if not path.is_file():
                raise ResRankExportError(f"{path}: not found; rewrite the repository with `resrank-export triton`")
        settings = read_resrank_config(encoder / CONFIG_FILE)
        retriever = None
        index = repository / "faiss_lookup" / "1" / "index"
        if summary.get("max_top_k") and index.is_dir():
            from resrank_export.index.retriever import Retriever

            retriever = Retriever.load(index)
        return cls(summary.get("max_candidates", settings.max_candidates), summary.get("max_top_k"),
                   PassageTokenizer.for_config(encoder / "tokenizer.json", settings),
                   load_prompt_builder(prompts / "tokenizer.json", settings), retriever)

    @property
    def has_texts(self) -> bool:
        return self.retriever is not None and bool(self.retriever.info.get("has_texts"))

    @cached_property
    def rows(self) -> dict[str, int]:
        """Row of every passage id of the index."""
        return {passage_id: row for row, passage_id in enumerate(self.retriever.ids)} if self.retriever else {}

    def stored_vectors(self, ids: dict[int, str]) -> dict[int, np.ndarray]:
        """The index's slot vectors of documents given by id ({position: id}): no encoder work."""
        if ids and self.retriever is None:
            raise GatewayError(400, f"documents[{next(iter(ids))}].id: the served repository has no index; "
                                    "send the document's text")
        vectors = {}
        for position, passage_id in ids.items():
            if passage_id not in self.rows:
                raise GatewayError(400, f"documents[{position}].id: {passage_id!r} is not a passage of the served index")
            vectors[position] = np.asarray(self.retriever.vectors[self.rows[passage_id]], dtype=np.float32)
        return vectors

    def documents(self, config: GatewayConfig) -> int:
        """Documents (or inputs) per request: the repository's ceiling, or less by --max-documents."""
        return min(self.max_candidates, config.max_documents or self.max_candidates)


class GatewayError(Exception):
    """An HTTP error answer: status and one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def text_field(value: str, name: str) -> str:
    """Text the python models accept: valid UTF-8 (no lone surrogates), at most MAX_QUERY_BYTES."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid UTF-8 (character {exc.start})") from None
    if size > MAX_QUERY_BYTES:
        raise ValueError(f"{name} has {size} bytes; at most {MAX_QUERY_BYTES} are accepted")
    return value


def schema_types():
    """(Strict, Text, Query): the base of every request model (unknown fields refused),
    non-blank text (in the schema too, so generated clients and fuzzers know) and a query (text
    the models accept)."""
    from pydantic import AfterValidator, BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    text = Annotated[str, Field(pattern=r"\S", max_length=MAX_QUERY_BYTES)]
    return Strict, text, Annotated[text, AfterValidator(lambda value: text_field(value, "query"))]


SHAPE_ERRORS = {"string_type", "model_type", "model_attributes_type", "dict_type", "list_type"}
UNION_BRANCHES = {"body", "constrained-str", "str", "Document", "StoredDocument",  # pydantic's labels, not fields
                  "list[constrained-str]", "list[str]"}


def error_field(error: dict) -> str:
    """The field of a pydantic error as the user wrote it: `documents.1.text`."""
    return ".".join(str(p) for p in error.get("loc", ()) if p not in UNION_BRANCHES) or "body"


def union_branch(error: dict) -> tuple:
    """Which shape of a union field an error is about (pydantic's labels in its location)."""
    return tuple(p for p in error.get("loc", ()) if p in UNION_BRANCHES)


def error_reason(error: dict, fields: list[str]) -> str:
    """Pydantic's message, in the words of this API: `fields` are the request's own."""
    if error.get("type") == "string_pattern_mismatch":  # the Text pattern \S
        return "is empty or whitespace-only"
    if error.get("type") == "extra_forbidden":
        return f"unknown field; this request takes {', '.join(fields)}" if len(error.get("loc", ())) <= 2 \
            else "unknown field"
    return str(error.get("msg"))


def api_key_setting(option: str | None) -> str | None:
    """--api-key, else $RESRANK_GATEWAY_API_KEY. A variable set to "" stays "" (and `validate`
    refuses it): click drops empty variables, which would switch authentication off unnoticed."""
    return option if option is not None else os.environ.get(API_KEY_ENV)


def refuse_overlong(limits: RepositoryLimits, query: str | None, texts: list[str], name: str) -> None:
    """truncate NONE / false: 400 naming the first input the models would have cut."""
    builder = limits.prompt_builder
    if query is not None and builder.query_tokens(query) > builder.max_query_tokens:
        raise GatewayError(400, f"query has {builder.query_tokens(query)} tokens; at most "
                                f"{builder.max_query_tokens} without truncation")
    for i, cut in enumerate(limits.passage_tokenizer.truncated(texts)):
        if cut:
            raise GatewayError(400, f"{name}[{i}] is over {limits.passage_tokenizer.max_tokens} tokens; "
                                    "truncation is off")
