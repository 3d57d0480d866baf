"""The HTTP service: FastAPI routes over a Searcher, Prometheus metrics, the web page.

Every failure a client can cause is a 4xx with a JSON body
``{"error": {"code": ..., "message": ...}}``; request bodies are refused past
``Limits.max_upload_bytes`` before they are parsed. OpenAPI docs are at /docs.
"""

from __future__ import annotations

import importlib.resources
import time

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from imgembed.service.searcher import QueryError, Searcher

# JSON bodies carry at most max_batch vectors of ~1024 numbers: 64 x 1024 x ~20 bytes.
MAX_JSON_BYTES = 2 * 2**20


class VectorQuery(BaseModel):
    """One vector or several, in the space of the corpus embeddings (before any transform)."""

    vectors: list[list[float]] = Field(..., description="Query vectors, each of the index dimension.")
    k: int = Field(10, description="Neighbours per vector.")
    collapse_duplicates: bool = Field(False, description="One result per near-duplicate cluster.")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class BodySizeLimit:
    """ASGI middleware: refuses bodies over a byte limit with 413, whatever their
    Content-Length says, reading at most limit + 1 bytes."""

    def __init__(self, app, limit_for):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await error_response(413, "body_too_large", f"request body over {limit} bytes")(
                scope, receive, send
            )
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await error_response(413, "body_too_large", f"request body over {limit} bytes")(
                    scope, receive, send
                )
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def create_app(searcher: Searcher) -> FastAPI:
    app = FastAPI(
        title="imgembed",
        description="Nearest-neighbour search over an imgembed index: by id, by vector, by image.",
        version="1",
    )
    limits = searcher.limits
    registry = CollectorRegistry()
    requests = Counter(
        "imgembed_http_requests", "HTTP requests", ["route", "method", "status"], registry=registry
    )
    latency = Histogram("imgembed_http_request_seconds", "Request latency", ["route"], registry=registry)
    errors = Counter("imgembed_http_errors", "Error responses by code", ["code"], registry=registry)
    page = importlib.resources.files("imgembed.service").joinpath("page.html").read_text(encoding="utf-8")

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = route.path if route is not None else "unmatched"
        requests.labels(name, request.method, str(response.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - started)
        return response

    app.add_middleware(
        BodySizeLimit,
        limit_for=lambda path: (
            limits.max_upload_bytes + 64 * 1024 if path.endswith("/image") else MAX_JSON_BYTES
        ),
    )

    @app.exception_handler(QueryError)
    async def query_error(request: Request, error: QueryError):
        errors.labels(error.code).inc()
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        errors.labels("bad_request").inc()
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        )
        return error_response(422, "bad_request", problems or "the request is malformed")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        errors.labels(code).inc()
        return error_response(error.status_code, code, str(error.detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home():
        return page

    @app.get("/health")
    def health():
        return {
            "status": "ok",
            "count": searcher.count,
            "model": searcher.loaded.manifest["model"]["name"],
            "metric": searcher.metric.value,
            "dimension": searcher.dimension,
            "image_search": searcher.model is not None,
        }

    @app.get("/v1/items/{image_id}")
    def item(image_id: str):
        return searcher.item(image_id)

    @app.get("/v1/items/{image_id}/thumbnail", responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(image_id: str):
        data = searcher.thumbnail(image_id)
        if data is None:
            raise QueryError(404, "no_thumbnail", "embed with --thumbnail-size to store thumbnails")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @app.get("/v1/neighbors/{image_id}")
    def neighbours(image_id: str, k: int = Query(10), collapse_duplicates: bool = Query(False)):
        return {
            "query": {"id": image_id},
            "metric": searcher.metric.value,
            "results": searcher.neighbours(image_id, k, collapse_duplicates),
        }

    @app.post("/v1/search")
    def search(query: VectorQuery):
        results = searcher.search_vectors(query.vectors, query.k, query.collapse_duplicates)
        return {"metric": searcher.metric.value, "results": results}

    @app.post("/v1/search/image")
    def search_image(
        image: UploadFile = File(..., description="An image file (JPEG, PNG, WebP, ...)."),
        k: int = Query(10),
        collapse_duplicates: bool = Query(False),
    ):
        data = image.file.read(limits.max_upload_bytes + 1)
        return {
            "metric": searcher.metric.value,
            "results": searcher.search_image(data, k, collapse_duplicates),
        }

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
