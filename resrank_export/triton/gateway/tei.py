"""Hugging Face text-embeddings-inference shapes: `POST /rerank` and `POST /embed`, as TEI's
clients (LangChain's and LlamaIndex's TEI classes, huggingface_hub) send them. Like TEI, inputs
are not truncated unless `truncate` is true."""

from typing import Literal

import numpy as np

from resrank_export.triton.gateway.limits import refuse_overlong, schema_types
from resrank_export.triton.gateway.openai import embed, texts_of


def add_routes(app, context) -> None:
    from pydantic import BaseModel, Field, field_validator

    Strict, Text, Query = schema_types()
    limits, limit = context.limits, context.limits.documents(context.config)

    class RerankRequest(Strict):
        query: Query
        texts: list[Text] = Field(min_length=1, max_length=limit)
        raw_scores: bool = Field(False, strict=True, description="true: ResRank's cosine in [-1, 1]; false: "
                                                                 "mapped to [0, 1] as (1 + cosine) / 2, same order.")
        return_text: bool = Field(False, strict=True)
        truncate: bool = Field(False, strict=True, description="false (TEI's default): over-long inputs get 400.")
        truncation_direction: Literal["Right", "right"] = Field("Right", description="Only Right is served.")

        @field_validator("texts")
        @classmethod
        def _texts(cls, values: list[str]) -> list[str]:
            return texts_of(values, limit, "texts")

    class Rank(BaseModel):
        index: int
        score: float
        text: str | None = None

    class EmbedRequest(Strict):
        inputs: Text | list[Text]
        normalize: bool = Field(True, strict=True)
        truncate: bool = Field(False, strict=True)
        truncation_direction: Literal["Right", "right"] = "Right"
        prompt_name: Literal["query", "passage"] | None = Field(
            None, description="query: the query encoding of the retrieval path; passage or none: passages.")
        dimensions: int | None = Field(None, ge=1, strict=True, description="Must equal the encoder's size if given.")

        @field_validator("inputs")
        @classmethod
        def _inputs(cls, value):
            return texts_of(value, limit, "inputs")

    @app.post("/rerank", response_model=list[Rank], response_model_exclude_none=True,
              responses={400: {"description": "input refused"}})
    async def rerank(body: RerankRequest):
        """`texts` by relevance to `query`, best first (TEI's rerank shape)."""
        if not body.truncate:
            refuse_overlong(limits, body.query, body.texts, "texts")
        order, scores = await context.triton().rerank(body.query, body.texts)
        return [{"index": i, "score": s if body.raw_scores else (1 + s) / 2,
                 "text": body.texts[i] if body.return_text else None} for i, s in zip(order, scores)]

    @app.post("/embed", response_model=list[list[float]], responses={400: {"description": "input refused"}})
    async def embed_route(body: EmbedRequest):
        """The encoder's vectors of `inputs` (TEI's embed shape)."""
        if not body.truncate:
            refuse_overlong(limits, None, body.inputs, "inputs")
        vectors = await embed(context, body.inputs, body.prompt_name == "query", body.dimensions)
        if body.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.tolist()
