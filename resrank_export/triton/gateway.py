"""`resrank-export gateway`: an HTTP front end (FastAPI on uvicorn) that speaks the
Cohere/Jina rerank format and a search API, and talks gRPC to the Triton server serving the
repository. Requests are checked here against the repository's own limits (candidate count,
top_k, token lengths) so that a bad request gets a 4xx naming its field, and a failure of Triton
a 502/503/504 saying so; /health mirrors Triton's readiness, /metrics is Prometheus text.

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, and the
request models are local to create_app, where string annotations cannot be resolved."""

import json
import logging
import os
import secrets
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from resrank_export.errors import ResRankExportError
from resrank_export.lazy import require
from resrank_export.triton.config import RERANK_ENSEMBLE, RETRIEVE_ENSEMBLE

log = logging.getLogger(__name__)
API_KEY_ENV = "RESRANK_GATEWAY_API_KEY"
MAX_QUERY_BYTES = 65536  # the python models' own limit (triton/models/common.py)


@dataclass(frozen=True)
class GatewayConfig:
    repository: Path  # the model repository Triton serves: limits, tokenizers, passage texts
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # required as `Authorization: Bearer KEY` or `X-API-Key` on /v1/*
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_documents: int | None = None  # per rerank request; None: the repository's max_candidates
    timeout_s: float = 60.0  # per Triton call; past it the client gets 504

    def validate(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ResRankExportError(f"--api-key / ${API_KEY_ENV} is set but empty (an unset variable in a script?): "
                                     "that would serve /v1/* without authentication; give a key, or neither")
        if not 1 <= self.port <= 65535:
            raise ResRankExportError(f"--port {self.port}: expected 1 to 65535")
        if self.max_body_bytes < 1 or (self.max_documents is not None and self.max_documents < 1):
            raise ResRankExportError("--max-body-bytes and --max-documents must be >= 1")
        if self.timeout_s <= 0:
            raise ResRankExportError(f"--timeout {self.timeout_s}: expected seconds > 0")


@dataclass(frozen=True)
class RepositoryLimits:
    """What the served repository accepts, read from its files (never guessed)."""

    max_candidates: int
    max_top_k: int | None  # None: the repository has no index, so no /v1/search
    passage_tokenizer: object  # PassageTokenizer of the passage encoder
    prompt_builder: object  # PromptBuilder of the reranker
    retriever: object | None  # Retriever of the index, for passage texts (None: no texts stored)

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
        encoder, prompts = repository / "passage_encoder" / "1", repository / "prompt_builder" / "1"
        for path in (encoder / "tokenizer.json", encoder / CONFIG_FILE, prompts / "tokenizer.json"):
            if not path.is_file():
                raise ResRankExportError(f"{path}: not found; rewrite the repository with `resrank-export triton`")
        settings = read_resrank_config(encoder / CONFIG_FILE)
        retriever = None
        index = repository / "faiss_lookup" / "1" / "index"
        if summary.get("max_top_k") and index.is_dir():
            from resrank_export.index.retriever import Retriever

            loaded = Retriever.load(index)
            retriever = loaded if loaded.info.get("has_texts") else None
        return cls(settings.max_candidates, summary.get("max_top_k"),
                   PassageTokenizer.for_config(encoder / "tokenizer.json", settings),
                   load_prompt_builder(prompts / "tokenizer.json", settings), retriever)


class GatewayError(Exception):
    """An HTTP error answer: status and one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _models(limits: RepositoryLimits, config: GatewayConfig):
    """The request and response schemas, sized by the repository's limits (they are the
    OpenAPI document)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    max_documents = min(limits.max_candidates, config.max_documents or limits.max_candidates)

    def text_field(value: str, name: str) -> str:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name} is not valid UTF-8 (character {exc.start})") from None
        if size > MAX_QUERY_BYTES:
            raise ValueError(f"{name} has {size} bytes; at most {MAX_QUERY_BYTES} are accepted")
        return value

    # In the schema too (so generated clients and fuzzers know): some non-space character.
    Text = Annotated[str, Field(pattern=r"\S", max_length=MAX_QUERY_BYTES)]

    class Document(BaseModel):
        text: Text

    class RerankRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = Field(None, description="Accepted for compatibility; the served reranker is used.")
        query: Text
        documents: list[Text | Document] = Field(min_length=1, max_length=max_documents)
        # strict: true, 2.0 or "2" are not numbers here, as they are not in the schema
        top_n: int | None = Field(None, ge=1, strict=True, description="Return the best top_n (default: all).")
        return_documents: bool = Field(False, strict=True)
        truncate: Literal["END", "NONE"] = Field(
            "END", description="END: cut over-long query/documents; NONE: refuse them with 400.")

        @field_validator("query")
        @classmethod
        def _query(cls, value: str) -> str:
            return text_field(value, "query")

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

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        query: Text
        top_k: int = Field(10, ge=1, le=limits.max_top_k or 1, strict=True)
        return_texts: bool = Field(False, strict=True)

        @field_validator("query")
        @classmethod
        def _query(cls, value: str) -> str:
            return text_field(value, "query")

    class SearchResult(BaseModel):
        id: str
        score: float
        text: str | None = None

    class SearchResponse(BaseModel):
        id: str
        results: list[SearchResult]

    return RerankRequest, RerankResponse, SearchRequest, SearchResponse


class BodyLimit:
    """ASGI middleware: 413 for bodies above `limit` bytes, by Content-Length or as they stream
    (a chunked body has no length to check up front)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"message": f"request body over {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(BaseException):
    """Not an Exception: FastAPI turns any Exception raised while reading a body into a 400."""


class TritonCalls:
    """The two ensembles over gRPC (tritonclient's asyncio client), errors turned into
    GatewayError: Triton refusing the input -> 400, unreachable -> 503, timeout -> 504."""

    def __init__(self, url: str, timeout_s: float):
        self.grpc = require("tritonclient.grpc", "the gateway (pip install 'resrank-export[gateway]')")
        self.aio = require("tritonclient.grpc.aio", "the gateway (pip install 'resrank-export[gateway]')")
        self.utils = require("tritonclient.utils", "the gateway")
        self.client = self.aio.InferenceServerClient(url)
        self.url, self.timeout_s = url, timeout_s

    def _input(self, name: str, array: np.ndarray):
        tensor = self.grpc.InferInput(name, list(array.shape), self.utils.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        return tensor

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        try:
            result = await self.client.infer(model, [self._input(n, a) for n, a in inputs.items()],
                                             outputs=[self.grpc.InferRequestedOutput(n) for n in outputs],
                                             client_timeout=self.timeout_s)
        except self.utils.InferenceServerException as exc:
            status, message = str(exc.status() or ""), (exc.message() or str(exc)).splitlines()[0]
            if "INVALID_ARGUMENT" in status:
                raise GatewayError(400, message) from None
            if "DEADLINE_EXCEEDED" in status:
                raise GatewayError(504, f"Triton did not answer within {self.timeout_s:g} s") from None
            if "UNAVAILABLE" in status:
                raise GatewayError(503, f"Triton at {self.url} is unavailable: {message}") from None
            raise GatewayError(502, f"Triton failed: {message}") from None
        return {name: result.as_numpy(name) for name in outputs}

    async def ready(self) -> bool:
        try:
            return (await self.client.is_server_ready(client_timeout=5)
                    and all([await self.client.is_model_ready(m, client_timeout=5)
                             for m in (RETRIEVE_ENSEMBLE, RERANK_ENSEMBLE)]))
        except Exception:  # any failure to answer is "not ready"
            return False


def create_app(config: GatewayConfig, limits: RepositoryLimits | None = None):
    """The ASGI application (FastAPI) for `config`."""
    fastapi = require("fastapi", "the gateway (pip install 'resrank-export[gateway]')")
    prometheus = require("prometheus_client", "the gateway (pip install 'resrank-export[gateway]')")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    config.validate()
    limits = limits or RepositoryLimits.read(Path(config.repository))
    RerankRequest, RerankResponse, SearchRequest, SearchResponse = _models(limits, config)
    registry = prometheus.CollectorRegistry()
    requests_total = prometheus.Counter("gateway_requests", "HTTP requests by route and status",
                                        ["route", "status"], registry=registry)
    latency = prometheus.Histogram("gateway_request_seconds", "Request latency by route", ["route"],
                                   registry=registry)
    triton_ready = prometheus.Gauge("gateway_triton_ready", "1 when Triton and both ensembles are ready",
                                    registry=registry)
    calls: dict[str, TritonCalls] = {}

    @asynccontextmanager
    async def lifespan(app):
        calls["triton"] = TritonCalls(config.triton_url, config.timeout_s)  # in the server's event loop
        yield
        await calls["triton"].client.close()

    app = fastapi.FastAPI(title="resrank-export gateway", version="1", lifespan=lifespan,
                          description="Cohere/Jina-compatible rerank and search over the ResRank Triton ensembles.")
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.middleware("http")
    async def measure(request, call_next):
        route, begin = request.url.path, time.perf_counter()
        if config.api_key and route.startswith("/v1/") and not _authorized(request.headers, config.api_key):
            response = JSONResponse({"message": "missing or wrong API key (Authorization: Bearer KEY)"}, 401)
        elif request.method == "POST" and not _json_content(request.headers.get("content-type")):
            response = JSONResponse({"message": f"Content-Type {request.headers['content-type']!r}: expected "
                                                "application/json"}, 415)
        else:
            response = await call_next(request)
        known = route if route in {r.path for r in app.routes} else "other"
        requests_total.labels(known, str(response.status_code)).inc()
        latency.labels(known).observe(time.perf_counter() - begin)
        return response

    @app.exception_handler(GatewayError)
    async def gateway_error(request, exc: GatewayError):
        return JSONResponse({"message": str(exc)}, exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        """FastAPI's own answers (a body that is not UTF-8, 404, 405) in the same {"message"} shape."""
        message = "body is not UTF-8 JSON" if exc.detail == "There was an error parsing the body" else exc.detail
        return JSONResponse({"message": str(message)}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = [{"loc": _field(e), "msg": _reason(e), "type": str(e.get("type"))}
                  for e in exc.errors()]  # without the inputs: they may hold text JSON cannot carry (lone surrogates)
        # A string-or-{text} document that fits neither reports both; the shape mismatch is the lesser news.
        telling = [e for e in errors if e["type"] not in SHAPE_ERRORS] or errors or [{"loc": "body", "msg": "invalid"}]
        return JSONResponse({"message": f"{telling[0]['loc']}: {telling[0]['msg']}", "errors": errors}, 422)

    @app.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True,
              responses={400: {"description": "input refused"}, 401: {"description": "API key"},
                         413: {"description": "body too large"}, 503: {"description": "Triton unavailable"}})
    async def rerank(body: RerankRequest):
        """Order `documents` by relevance to `query` (the resrank_rerank ensemble)."""
        texts = body.texts()
        if body.truncate == "NONE":
            _refuse_overlong(limits, body.query, texts)
        out = await calls["triton"].infer(RERANK_ENSEMBLE, {
            "QUERY": np.array([[body.query.encode()]], dtype=np.object_),
            "PASSAGES": np.array([[t.encode() for t in texts]], dtype=np.object_)}, ["ORDER", "SCORES"])
        order, scores = out["ORDER"][0].tolist(), out["SCORES"][0].tolist()
        results = [{"index": int(i), "relevance_score": float(s),
                    **({"document": {"text": texts[int(i)]}} if body.return_documents else {})}
                   for i, s in zip(order, scores)][:body.top_n]
        return {"id": str(uuid.uuid4()), "model": body.model or RERANK_ENSEMBLE, "results": results,
                "meta": {"documents": len(texts)}}

    @app.post("/v1/search", response_model=SearchResponse, response_model_exclude_none=True,
              responses={400: {"description": "input refused"}, 404: {"description": "no index served"}})
    async def search(body: SearchRequest):
        """Retrieve top_k passages from the served index and rerank them (the resrank ensemble)."""
        if limits.max_top_k is None:
            raise GatewayError(404, "the served repository has no index; only /v1/rerank is available")
        if body.return_texts and limits.retriever is None:
            raise GatewayError(400, "return_texts: the served index was built without passage texts")
        out = await calls["triton"].infer(RETRIEVE_ENSEMBLE, {
            "QUERY": np.array([[body.query.encode()]], dtype=np.object_),
            "TOP_K": np.array([[body.top_k]], dtype=np.int32)}, ["DOC_IDS", "SCORES"])
        ids = [v.decode() for v in out["DOC_IDS"][0]]
        texts = limits.retriever.texts(ids) if body.return_texts else [None] * len(ids)
        return {"id": str(uuid.uuid4()), "results": [{"id": i, "score": float(s), "text": t}
                                                     for i, s, t in zip(ids, out["SCORES"][0].tolist(), texts)]}

    @app.get("/health", responses={503: {"description": "Triton or an ensemble not ready"}})
    async def health():
        """Ready when Triton and both ensembles are (for load balancers and Kubernetes)."""
        ready = await calls["triton"].ready()
        triton_ready.set(1 if ready else 0)
        return JSONResponse({"status": "ready" if ready else "not ready", "triton": config.triton_url},
                            200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(prometheus.generate_latest(registry), media_type=prometheus.CONTENT_TYPE_LATEST)

    return app


SHAPE_ERRORS = {"string_type", "model_type", "model_attributes_type", "dict_type"}
UNION_BRANCHES = {"body", "constrained-str", "str", "Document"}  # pydantic's labels, not fields


def _field(error: dict) -> str:
    """The field of a pydantic error as the user wrote it: `documents.1.text`."""
    return ".".join(str(p) for p in error.get("loc", ()) if p not in UNION_BRANCHES) or "body"


def _reason(error: dict) -> str:
    if error.get("type") == "string_pattern_mismatch":  # the Text pattern \S
        return "is empty or whitespace-only"
    return str(error.get("msg"))


def _json_content(content_type: str | None) -> bool:
    """No Content-Type (FastAPI reads JSON then), application/json or application/*+json."""
    if content_type is None:
        return True
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _authorized(headers, key: str) -> bool:
    given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
    return secrets.compare_digest(given.encode(), key.encode())


def _refuse_overlong(limits: RepositoryLimits, query: str, texts: list[str]) -> None:
    """truncate=NONE: 400 naming the first input the models would have cut."""
    builder = limits.prompt_builder
    if builder.query_tokens(query) > builder.max_query_tokens:
        raise GatewayError(400, f"query has {builder.query_tokens(query)} tokens; at most "
                                f"{builder.max_query_tokens} without truncation (truncate=END cuts it)")
    for i, cut in enumerate(limits.passage_tokenizer.truncated(texts)):
        if cut:
            raise GatewayError(400, f"documents[{i}] is over {limits.passage_tokenizer.max_tokens} tokens; "
                                    "truncate=END cuts it")


def api_key_setting(option: str | None) -> str | None:
    """--api-key, else $RESRANK_GATEWAY_API_KEY. A variable set to "" stays "" (and `validate`
    refuses it): click drops empty variables, which would switch authentication off unnoticed."""
    return option if option is not None else os.environ.get(API_KEY_ENV)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the gateway says where it serves: an address this
    machine does not have, or a port in use, is one line naming it."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ResRankExportError(f"--host {host!r}: not an address to listen on ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ResRankExportError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def run_gateway(config: GatewayConfig) -> None:
    """`resrank-export gateway`: serve until Ctrl-C (uvicorn handles the signals)."""
    uvicorn = require("uvicorn", "the gateway (pip install 'resrank-export[gateway]')")
    config.validate()
    sock = listen(config.host, config.port)
    try:
        app = create_app(config)
        log.info("gateway on http://%s:%d -> Triton gRPC %s", config.host, config.port, config.triton_url)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()
