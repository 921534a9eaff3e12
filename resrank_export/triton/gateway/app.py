"""The gateway's ASGI application: FastAPI on uvicorn in front of the Triton server serving the
repository, speaking the API shapes of its sibling modules (cohere: rerank and search; openai:
embeddings; tei: /rerank and /embed). Requests are checked here against the repository's own
limits (candidate count, top_k, token lengths), so a bad request gets a 4xx naming its field, and
a failure of Triton a 502/503/504 saying so; /health mirrors Triton's readiness, /metrics is
Prometheus text.

No `from __future__ import annotations` in this package: FastAPI reads the endpoints'
annotations, and the request models are local to the route builders, where string annotations
cannot be resolved."""

import json
import logging
import secrets
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from resrank_export.errors import ResRankExportError
from resrank_export.lazy import require
from resrank_export.triton.gateway import cohere, openai, tei
from resrank_export.triton.gateway.limits import (
    SHAPE_ERRORS,
    GatewayConfig,
    GatewayError,
    RepositoryLimits,
    error_field,
    error_reason,
    union_branch,
)
from resrank_export.triton.gateway.triton_calls import TritonCalls

log = logging.getLogger(__name__)
API_SHAPES = (cohere, openai, tei)  # each adds its routes: add_routes(app, context)
API_PREFIXES = ("/v1/", "/v2/", "/rerank", "/embed")  # what --api-key guards (not /health, /metrics)


@dataclass
class GatewayContext:
    """What the routes share: settings, the repository's limits, the Triton client (made in
    the server's event loop, at startup)."""

    config: GatewayConfig
    limits: RepositoryLimits
    calls: dict = field(default_factory=dict)

    def triton(self) -> TritonCalls:
        return self.calls["triton"]


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


def create_app(config: GatewayConfig, limits: RepositoryLimits | None = None):
    """The ASGI application (FastAPI) for `config`."""
    fastapi = require("fastapi", "the gateway (pip install 'resrank-export[gateway]')")
    prometheus = require("prometheus_client", "the gateway (pip install 'resrank-export[gateway]')")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    config.validate()
    context = GatewayContext(config, limits or RepositoryLimits.read(Path(config.repository)))
    registry = prometheus.CollectorRegistry()
    requests_total = prometheus.Counter("gateway_requests", "HTTP requests by route and status",
                                        ["route", "status"], registry=registry)
    latency = prometheus.Histogram("gateway_request_seconds", "Request latency by route", ["route"],
                                   registry=registry)
    triton_ready = prometheus.Gauge("gateway_triton_ready", "1 when Triton and both ensembles are ready",
                                    registry=registry)

    @asynccontextmanager
    async def lifespan(app):
        context.calls["triton"] = TritonCalls(config.triton_url, config.timeout_s)  # in the server's event loop
        yield
        await context.triton().client.close()

    app = fastapi.FastAPI(title="resrank-export gateway", version="1", lifespan=lifespan,
                          description="Cohere/Jina-compatible rerank and search, OpenAI embeddings and TEI "
                                      "rerank/embed over the ResRank Triton models.")
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.middleware("http")
    async def measure(request, call_next):
        route, begin = request.url.path, time.perf_counter()
        if config.api_key and route.startswith(API_PREFIXES) and not _authorized(request.headers, config.api_key):
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
        fields = request_fields.get(request.url.path, [])
        raw = exc.errors()
        errors = [{"loc": error_field(e), "msg": error_reason(e, fields), "type": str(e.get("type"))}
                  for e in raw]  # without the inputs: they may hold text JSON cannot carry (lone surrogates)
        # A document that fits no shape (string, {text}, {id}) reports every shape; the shape mismatch is the
        # lesser news, and of the shapes the one with the fewest errors is the one meant.
        branches: dict[tuple, list] = {}
        for error, details in zip(errors, raw):
            if error["type"] not in SHAPE_ERRORS:
                branches.setdefault(union_branch(details), []).append(error)
        telling = min(branches.values(), key=len) if branches else errors or [{"loc": "body", "msg": "invalid"}]
        return JSONResponse({"message": f"{telling[0]['loc']}: {telling[0]['msg']}", "errors": errors}, 422)

    for shape in API_SHAPES:
        shape.add_routes(app, context)
    request_fields = {route.path: list(route.body_field.field_info.annotation.model_fields)
                      for route in app.routes if getattr(route, "body_field", None) is not None}

    @app.get("/health", responses={503: {"description": "Triton or an ensemble not ready"}})
    async def health():
        """Ready when Triton and both ensembles are (for load balancers and Kubernetes)."""
        ready = await context.triton().ready()
        triton_ready.set(1 if ready else 0)
        return JSONResponse({"status": "ready" if ready else "not ready", "triton": config.triton_url},
                            200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(prometheus.generate_latest(registry), media_type=prometheus.CONTENT_TYPE_LATEST)

    return app


def _json_content(content_type: str | None) -> bool:
    """No Content-Type (FastAPI reads JSON then), application/json or application/*+json."""
    if content_type is None:
        return True
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _authorized(headers, key: str) -> bool:
    given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
    return secrets.compare_digest(given.encode(), key.encode())


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
