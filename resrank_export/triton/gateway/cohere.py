"""Cohere/Jina rerank (`POST /v1/rerank`, and `/v2/rerank` where Cohere's v2 client sends it)
and the search API (`POST /v1/search`) over the resrank_rerank and resrank ensembles."""

import uuid
from typing import Literal

import numpy as np

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

    class StoredDocument(Strict):
        id: str = Field(min_length=1, description="A passage id of the served index: its stored vector is ranked.")

    class RerankRequest(Strict):
        model: str | None = Field(None, description="Accepted for compatibility; the served reranker is used.")
        query: Query
        documents: list[Text | Document | StoredDocument] = Field(min_length=1,
                                                                  max_length=limits.documents(context.config))
        # strict: true, 2.0 or "2" are not numbers here, as they are not in the schema
        top_n: int | None = Field(None, ge=1, strict=True, description="Return the best top_n (default: all).")
        return_documents: bool = Field(False, strict=True)
        truncate: Literal["END", "NONE"] = Field(
            "END", description="END: cut an over-long query, and documents past max_chunks_per_doc passages; "
                               "NONE: refuse them with 400.")
        max_chunks_per_doc: int | None = Field(
            None, ge=1, strict=True, description="A document past max_passage_tokens is ranked by its best passage "
                                                 f"of at most this many (default {context.config.max_chunks_per_doc}).")

        @field_validator("documents")
        @classmethod
        def _documents(cls, values: list) -> list:
            for i, value in enumerate(values):
                if not isinstance(value, StoredDocument):
                    text_field(value if isinstance(value, str) else value.text, f"documents[{i}]")
            return values

        def texts(self) -> list[str]:
            """The documents' texts; a document by id: its stored text, if the index has texts."""
            ids = [d.id for d in self.documents if isinstance(d, StoredDocument)]
            stored = iter(limits.retriever.texts(ids) if ids and limits.has_texts else [""] * len(ids))
            return [d if isinstance(d, str) else d.text if isinstance(d, Document) else next(stored)
                    for d in self.documents]

        def ids(self) -> dict[int, str]:
            return {i: d.id for i, d in enumerate(self.documents) if isinstance(d, StoredDocument)}

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
        """Order `documents` by relevance to `query` (the resrank_rerank ensemble); a long
        document by its best passage."""
        stored = limits.stored_vectors(body.ids())  # by id: the index's vectors, no encoder work
        texts = body.texts()
        if body.truncate == "NONE":
            refuse_overlong(limits, body.query, [], "documents")
        passages, owners, meta = split_documents([t for i, t in enumerate(texts) if i not in stored],
                                                 [i for i in range(len(texts)) if i not in stored],
                                                 body.max_chunks_per_doc or context.config.max_chunks_per_doc,
                                                 body.truncate == "NONE")
        if len(passages) + len(stored) > limits.max_candidates:
            raise GatewayError(400, f"documents: {len(texts)} documents make {len(passages) + len(stored)} passages; "
                                    f"at most {limits.max_candidates} per request (send fewer, or lower "
                                    "max_chunks_per_doc)")
        if stored:
            encoded = list(await context.triton().embed_passages(passages)) if passages else []
            # slots in document order (a stable sort keeps a document's passages in order), as for texts
            slots = sorted([*zip(owners, encoded), *stored.items()], key=lambda slot: slot[0])
            owners = [document for document, _ in slots]
            order, scores = await context.triton().rank(body.query, np.stack([vector for _, vector in slots]))
            meta.update(documents=len(texts), by_id=len(stored))
        else:
            order, scores = await context.triton().rerank(body.query, passages)
        results, seen = [], set()
        for position, score in zip(order, scores):  # scores never increase down the list: a document's
            document = owners[position]              # first passage is its best
            if document not in seen:
                seen.add(document)
                results.append({"index": document, "relevance_score": score,
                                **({"document": {"text": texts[document]}} if body.return_documents else {})})
        return {"id": str(uuid.uuid4()), "model": body.model or RERANK_ENSEMBLE, "results": results[:body.top_n],
                "meta": meta}

    def split_documents(texts: list[str], positions: list[int], max_chunks: int,
                        refuse_cut: bool) -> tuple[list[str], list[int], dict]:
        """(passages, the document of each, meta) of the documents at `positions`: one past
        max_passage_tokens becomes passages of it (at most max_chunks; past them it is cut, or
        refused when refuse_cut)."""
        passages, owners, chunked, truncated = [], [], 0, 0
        tokenizer = limits.passage_tokenizer
        for document, text in zip(positions, texts):
            pieces, cut = tokenizer.chunks(text, context.config.chunk_overlap, max_chunks)
            if cut and refuse_cut:
                raise GatewayError(400, f"documents[{document}] does not fit {max_chunks} passages of "
                                        f"{tokenizer.chunk_tokens} tokens (max_chunks_per_doc); truncate=END cuts it")
            passages += pieces
            owners += [document] * len(pieces)
            chunked, truncated = chunked + (len(pieces) > 1), truncated + cut
        return passages, owners, {"documents": len(texts), "passages": len(passages), "chunked_documents": chunked,
                                  "truncated_documents": truncated}

    for path in ("/v1/rerank", "/v2/rerank"):
        app.post(path, response_model=RerankResponse, response_model_exclude_none=True, responses=ERRORS,
                 operation_id=f"rerank_{path[2]}")(rerank)

    @app.post("/v1/search", response_model=SearchResponse, response_model_exclude_none=True,
              responses={400: {"description": "input refused"}, 404: {"description": "no index served"}})
    async def search(body: SearchRequest):
        """Retrieve top_k passages from the served index and rerank them (the resrank ensemble)."""
        if limits.max_top_k is None:
            raise GatewayError(404, "the served repository has no index; only /v1/rerank is available")
        if body.return_texts and not limits.has_texts:
            raise GatewayError(400, "return_texts: the served index was built without passage texts")
        ids, scores = await context.triton().search(body.query, body.top_k)
        texts = limits.retriever.texts(ids) if body.return_texts else [None] * len(ids)
        return {"id": str(uuid.uuid4()), "results": [{"id": i, "score": s, "text": t}
                                                     for i, s, t in zip(ids, scores, texts)]}
