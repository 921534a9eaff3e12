"""OpenAI embeddings (`POST /v1/embeddings`): the served encoder's vectors of passages or queries.
OpenAI's API has no input type; `input_type` (sent by the openai client as `extra_body`) names it
as Cohere (`search_query` / `search_document`) or Jina (`retrieval.query` / `retrieval.passage`)
do; passages by default, what an index stores."""

import base64
from typing import Literal

import numpy as np

from resrank_export.triton.gateway.limits import GatewayError, schema_types, text_field

QUERY_TYPES = ("query", "search_query", "retrieval.query")
PASSAGE_TYPES = ("passage", "document", "search_document", "retrieval.passage")


async def embed(context, texts: list[str], query: bool, dimensions: int | None) -> np.ndarray:
    """Vectors [n, D] of texts as the index (passages) or the retrieval path (queries) encodes
    them; `dimensions` (if given) must be D: the encoder's vectors are not truncated."""
    calls = context.triton()
    if query:
        vectors = await calls.embed_queries(texts, context.limits.passage_tokenizer)
    else:
        vectors = await calls.embed_passages(texts)
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise GatewayError(400, f"dimensions: the served encoder makes {vectors.shape[1]}-dimensional vectors; "
                                f"{dimensions} was asked")
    return vectors


def texts_of(value, limit: int, name: str) -> list[str]:
    """A string or a list of 1..limit strings, each checked as the models check text."""
    texts = [value] if isinstance(value, str) else list(value)
    for i, text in enumerate(texts):
        text_field(text, f"{name}[{i}]")
    if not 1 <= len(texts) <= limit:
        raise ValueError(f"{len(texts)} inputs; expected 1..{limit}")
    return texts


def add_routes(app, context) -> None:
    from pydantic import BaseModel, Field, field_validator

    Strict, Text, _ = schema_types()
    limit = context.limits.documents(context.config)

    class EmbeddingsRequest(Strict):
        input: Text | list[Text] = Field(description=f"A text or a list of 1..{limit} texts (token arrays are "
                                                     "not accepted: the tokenizer is the served one).")
        model: str | None = Field(None, description="Accepted for compatibility; the served encoder is used.")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: int | None = Field(None, ge=1, strict=True, description="Must equal the encoder's size if given.")
        user: str | None = Field(None, description="OpenAI's end-user id; accepted, not stored.")
        input_type: Literal[QUERY_TYPES + PASSAGE_TYPES] = Field(
            "passage", description="query or passage encoding (Cohere's and Jina's names accepted too).")

        @field_validator("input")
        @classmethod
        def _input(cls, value):
            return texts_of(value, limit, "input")

    class Embedding(BaseModel):
        object: Literal["embedding"] = "embedding"
        index: int
        embedding: list[float] | str

    class Usage(BaseModel):
        prompt_tokens: int
        total_tokens: int

    class EmbeddingsResponse(BaseModel):
        object: Literal["list"] = "list"
        data: list[Embedding]
        model: str
        usage: Usage

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse,
              responses={400: {"description": "input refused"}, 503: {"description": "Triton unavailable"}})
    async def embeddings(body: EmbeddingsRequest):
        """The encoder's vectors of `input` (OpenAI's embeddings shape)."""
        vectors = await embed(context, body.input, body.input_type in QUERY_TYPES, body.dimensions)
        tokens = sum(context.limits.passage_tokenizer.lengths(body.input))
        data = [{"index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        return {"data": data, "model": body.model or "encoder", "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
