"""Cohere/Jina rerank (`POST /v1/rerank`, and `/v2/rerank` where Cohere's v2 client sends it)
and the search API (`POST /v1/search`) over the resrank_rerank and resrank ensembles."""

import uuid
from typing import Literal

from resrank_export.triton.config import RERANK_ENSEMBLE
from resrank_export.triton.gateway.limits import GatewayError, refuse_overlong, schema_types, text_field

ERRORS = {400: {"description": "input refused"}, 401: {"description": "API key"},
          413: {"description": "body too large"}, 503: {"description": "Triton unavailable"}}


def add_routes(app, context) -> None:
    from pydantic import BaseModel, Field, field_validator

    limits = context.limits
    Strict, Text, Query = schema_types()

    class Document(Strict):
        text: Text

    class RerankRequest(Strict):
        model: str | None = Field(None, description="Accepted for compatibility; the served reranker is used.")
        query: Query
        documents: list[Text | Document] = Field(min_length=1, max_length=limits.documents(context.config))
        # strict: true, 2.0 or "2" are not numbers here, as they are not in the schema
        top_n: int | None = Field(None, ge=1, strict=True, description="Return the best top_n (default: all).")
        return_documents: bool = Field(False, strict=True)
        truncate: Literal["END", "NONE"] = Field(
            "END", description="END: cut over-long query/documents; NONE: refuse them with 400.")

        @field_validator("documents")
        @classmethod
        def _documents(cls, values: list) -> list:
            for i, value in enumerate(values):
                text_field(value if isinstance(value, str) else value.text, f"documents[{i}]")
            return values

        def texts(self) -> list[str]:
            return [d if isinstance(d, str) else d.text for d in self.documents]

    class RerankDocument(BaseModel):
        text: str

    class RerankResult(BaseModel):
        index: int
        relevance_score: float
        document: RerankDocument | None = None

    class RerankResponse(BaseModel):
        id: str
        model: str
        results: list[RerankResult]
        meta: dict

    class SearchRequest(Strict):
        query: Query
        top_k: int = Field(10, ge=1, le=limits.max_top_k or 1, strict=True,
                           description="How many passages to retrieve and rerank (top_n is rerank's name).")
        return_texts: bool = Field(False, strict=True)

    class SearchResult(BaseModel):
        id: str
        score: float
        text: str | None = None

    class SearchResponse(BaseModel):
        id: str
        results: list[SearchResult]

    async def rerank(body: RerankRequest):
        """Order `documents` by relevance to `query` (the resrank_rerank ensemble)."""
        texts = body.texts()
        if body.truncate == "NONE":
            refuse_overlong(limits, body.query, texts, "documents")
        order, scores = await context.triton().rerank(body.query, texts)
        results = [{"index": i, "relevance_score": s,
                    **({"document": {"text": texts[i]}} if body.return_documents else {})}
                   for i, s in zip(order, scores)][:body.top_n]
        return {"id": str(uuid.uuid4()), "model": body.model or RERANK_ENSEMBLE, "results": results,
                "meta": {"documents": len(texts)}}

    for path in ("/v1/rerank", "/v2/rerank"):
        app.post(path, response_model=RerankResponse, response_model_exclude_none=True, responses=ERRORS,
                 operation_id=f"rerank_{path[2]}")(rerank)

    @app.post("/v1/search", response_model=SearchResponse, response_model_exclude_none=True,
              responses={400: {"description": "input refused"}, 404: {"description": "no index served"}})
    async def search(body: SearchRequest):
        """Retrieve top_k passages from the served index and rerank them (the resrank ensemble)."""
        if limits.max_top_k is None:
            raise GatewayError(404, "the served repository has no index; only /v1/rerank is available")
        if body.return_texts and limits.retriever is None:
            raise GatewayError(400, "return_texts: the served index was built without passage texts")
        ids, scores = await context.triton().search(body.query, body.top_k)
        texts = limits.retriever.texts(ids) if body.return_texts else [None] * len(ids)
        return {"id": str(uuid.uuid4()), "results": [{"id": i, "score": s, "text": t}
                                                     for i, s, t in zip(ids, scores, texts)]}
