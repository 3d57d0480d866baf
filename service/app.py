"""The HTTP service: routes over the live index, Prometheus metrics, the web page.

The OpenAPI document (/openapi.json, browsable at /docs) is the contract, and it is
exact: it declares every limit (k, the vector length and batch size of this index,
the upload size, the filter fields) and every error answer. Every failure a client
can cause is a 4xx with the body ``{"error": {"code": ..., "message": ...}}``; a 405
names the allowed methods in ``Allow``. Request bodies are refused past their limit
before they are parsed. Middleware is plain ASGI (no per-request task or copy), and
responses are serialised with orjson straight from the searcher's dicts (the
response models document them; validating every hit again cost more than faiss).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures'
# types, some of them made in create_app from this index's limits.

import asyncio
import importlib.resources
import os
import re
import time
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, create_model
from starlette.exceptions import HTTPException

from imgembed.service.batching import ImageBatcher, SearchBatcher
from imgembed.service.searcher import ImageQuery, LiveIndex, QueryError

# JSON bodies carry at most max_batch vectors of ~1024 numbers: 64 x 1024 x ~20 bytes.
MAX_JSON_BYTES = 2 * 2**20
# Multipart framing around an uploaded image.
MULTIPART_OVERHEAD = 64 * 1024
IMAGE_ROUTE = "/v1/search/image"
# Uploads a worker holds at once, per image thread: a batch being embedded and the next.
MAX_UPLOADS_PER_THREAD = 16
MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# A request body that stops arriving for this long is answered 408.
BODY_SECONDS = 30
ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
}
ERROR_CODES |= {415: "unsupported_media_type", 422: "bad_request", 503: "unavailable"}
FLOAT32_MAX = float(np.finfo(np.float32).max)


class OrjsonResponse(JSONResponse):
    """JSON by orjson, numpy values included. (FastAPI's ORJSONResponse does the same,
    but it is deprecated and warns on every response: 5% of the event loop's samples.)"""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


class ErrorDetail(BaseModel):
    code: str = Field(description="A short code a program can branch on.")
    message: str = Field(description="What went wrong, for people.")


class ErrorBody(BaseModel):
    error: ErrorDetail


def _json_number(value):
    """JSON Schema's integer is a number without a fraction (95.0 is one), never text or
    a boolean; pydantic's lax int would take "95" and True, its strict one not 95.0."""
    if isinstance(value, str | bytes | bool):
        raise ValueError("must be a JSON number")
    return value


JsonInteger = Annotated[int, BeforeValidator(_json_number)]


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> OrjsonResponse:
    return OrjsonResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def errors(*statuses: int) -> dict:
    descriptions = {
        400: "The request is well formed but cannot be answered (see error.code).",
        404: "No such image id, or no such route.",
        405: "The method is not allowed here; the Allow header names those that are.",
        413: "The body is over its limit.",
        415: "The body is not of the media type this route takes.",
        422: "The request does not match this document (a missing or malformed field, a value out of range).",
        503: "Image search is off (the index's model cannot be loaded), or the worker holds as many "
        "uploads as it takes (code busy; Retry-After says when to try again).",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


class Hit(BaseModel):
    id: str
    uri: str
    score: float = Field(
        description="Cosine similarity (higher is closer) or squared L2 distance (lower is)."
    )
    faiss_id: int
    cluster_id: int = Field(description="The near-duplicate cluster: the smallest FAISS id in it.")
    metadata: dict[str, Any] = Field(description="What the image's shard said about it (url, caption...).")


class Item(BaseModel):
    id: str
    uri: str
    sha256: str
    width: int
    height: int
    source: str = Field(description="The container the image came from, or its file's folder.")
    metadata: dict[str, Any]
    faiss_id: int
    cluster_id: int
    cluster_size: int


class Results(BaseModel):
    metric: str
    results: list[Hit]


class BatchResults(BaseModel):
    metric: str
    results: list[list[Hit]] = Field(description="One list of hits per query vector, in order.")


class Health(BaseModel):
    status: str
    count: int
    model: str | None
    metric: str
    dimension: int
    image_search: bool
    version: str
    filter_fields: list[str] = Field(description="The fields searches can filter on (field=value).")


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
            try:  # a body sent a byte at a time must not hold the connection for good
                message = await asyncio.wait_for(receive(), BODY_SECONDS)
            except TimeoutError:
                return await error_response(408, "body_too_slow", f"no body bytes for {BODY_SECONDS} s")(
                    scope, receive, send
                )
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


class RequestMetrics:
    """ASGI middleware: requests by route and status, and their latency."""

    def __init__(self, app, requests: Counter, latency: Histogram):
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            name = route.path if route is not None else "unmatched"
            self.requests.labels(name, scope["method"], str(status)).inc()
            self.latency.labels(name).observe(time.perf_counter() - started)


def _scraped(registry: CollectorRegistry) -> CollectorRegistry:
    """What one scrape reports: every worker's counts when the service runs several
    (prometheus_client's multiprocess mode: each worker writes its values to files
    in PROMETHEUS_MULTIPROC_DIR, set by `imgembed serve`, and they are summed here),
    else this process's own."""
    if not os.environ.get(MULTIPROCESS_VARIABLE):
        return registry
    from prometheus_client import multiprocess

    every_worker = CollectorRegistry()
    multiprocess.MultiProcessCollector(every_worker)
    return every_worker


class UploadGate:
    """ASGI middleware: at most ``limit`` image uploads in a worker at once; the next
    get 503 with Retry-After before their body is read, so a burst cannot run the
    worker out of memory (each holds its upload until it is answered)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.inside = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != IMAGE_ROUTE:
            return await self.app(scope, receive, send)
        if self.inside >= self.limit:
            busy = error_response(
                503,
                "busy",
                f"{self.limit} images are being searched in this worker; try again in a second",
                headers={"Retry-After": "1"},
            )
            return await busy(scope, receive, send)
        self.inside += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.inside -= 1


def _filters(pairs: list[str] | None, fields: list[str]) -> dict[str, str]:
    """``field=value`` query parameters -> a filter."""
    filters = {}
    for pair in pairs or []:
        field, equals, value = pair.partition("=")
        if not equals:
            raise QueryError(400, "bad_filter", f"a filter is field=value, got {pair!r}")
        filters[field] = value
    return filters


def create_app(live: LiveIndex) -> FastAPI:
    searcher = live.current
    limits = searcher.limits
    batcher = SearchBatcher()
    fields = searcher.filter_fields
    app = FastAPI(
        title="imgembed",
        description="Nearest-neighbour search over an imgembed index: by id, by vector, by image.",
        version="1",
        default_response_class=OrjsonResponse,
    )
    registry = CollectorRegistry()
    requests = Counter(
        "imgembed_http_requests", "HTTP requests", ["route", "method", "status"], registry=registry
    )
    latency = Histogram("imgembed_http_request_seconds", "Request latency", ["route"], registry=registry)
    error_count = Counter("imgembed_http_errors", "Error responses by code", ["code"], registry=registry)
    page = importlib.resources.files("imgembed.service").joinpath("page.html").read_text(encoding="utf-8")

    app.add_middleware(
        BodySizeLimit,
        limit_for=lambda path: (
            limits.max_upload_bytes + MULTIPART_OVERHEAD if path == IMAGE_ROUTE else MAX_JSON_BYTES
        ),
    )
    if searcher.images is not None and searcher.images.model is not None:
        app.add_middleware(UploadGate, limit=MAX_UPLOADS_PER_THREAD * searcher.images.threads)
    app.add_middleware(RequestMetrics, requests=requests, latency=latency)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, error: QueryError):
        error_count.labels(error.code).inc()
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        error_count.labels("bad_request").inc()
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        )
        return error_response(422, "bad_request", problems or "the request is malformed")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        error_count.labels("internal").inc()
        return error_response(500, "internal", f"{type(error).__name__}: {error}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        code = ERROR_CODES.get(error.status_code, "bad_request")
        error_count.labels(code).inc()
        return error_response(
            error.status_code, code, str(error.detail), headers=getattr(error, "headers", None)
        )

    # --- the contract's types, from this index's limits --------------------------

    K = Annotated[int, Query(ge=1, le=limits.max_k, description="Neighbours per query.")]
    Collapse = Annotated[bool, Query(description="One result per near-duplicate cluster.")]
    Filter = Annotated[
        list[Annotated[str, Field(pattern=rf"^({'|'.join(re.escape(field) for field in fields)})=")]] | None,
        Query(description=f"field=value, repeatable (all must hold); fields: {', '.join(fields)}."),
    ]
    examples = [row["id"] for row in searcher.items.describe([0], ("id",))] if searcher.count else []
    ImageId = Annotated[
        str,
        Field(
            pattern="^[0-9a-f]{32}$",
            description="An image id (from results or the embeddings).",
            examples=examples,
        ),
    ]
    Number = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]  # vectors are float32
    Vector = Annotated[list[Number], Field(min_length=searcher.dimension, max_length=searcher.dimension)]
    FilterValue = str | int | float | bool
    FilterBody = create_model(
        "Filter",
        __config__=ConfigDict(extra="forbid"),
        **{field: (FilterValue | None, Field(None)) for field in fields},
    )

    class VectorQuery(BaseModel):
        """One vector or several, in the space of the corpus embeddings (before any transform)."""

        model_config = ConfigDict(extra="forbid")
        vectors: list[Vector] = Field(
            min_length=1,
            max_length=limits.max_batch,
            description=f"Query vectors of {searcher.dimension} numbers.",
        )
        k: JsonInteger = Field(10, ge=1, le=limits.max_k, description="Neighbours per vector.")
        collapse_duplicates: StrictBool = Field(False, description="One result per near-duplicate cluster.")
        filter: FilterBody | None = Field(None, description="Equality on metadata fields; all must hold.")  # type: ignore[valid-type]

    def media_type(wanted: str):
        """A dependency: answers 415 before the body is parsed when it is not ``wanted``."""

        async def check(request: Request) -> None:  # async: no thread-pool hop per request
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != wanted:
                raise QueryError(
                    415, "unsupported_media_type", f"send {wanted}, not {media or 'no content type'}"
                )

        return [Depends(check)]

    # --- routes ----------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home():
        return page

    @app.api_route("/health", methods=["GET", "HEAD"], response_model=Health)
    async def health():
        current = live.current
        return {
            "status": "ok",
            "count": current.count,
            "model": current.model_name,
            "metric": current.metric.value,
            "dimension": current.dimension,
            "image_search": current.images is not None and current.images.model is not None,
            "version": current.version,
            "filter_fields": current.filter_fields,
        }

    @app.get("/v1/items/{image_id}", response_model=Item, responses=errors(404, 422))
    async def item(image_id: ImageId):
        return OrjsonResponse(live.current.item(image_id))

    @app.get(
        "/v1/items/{image_id}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."}}
        | errors(404, 422),
    )
    def thumbnail(image_id: ImageId):  # reads Parquet: in the thread pool
        data = live.current.thumbnail(image_id)
        if data is None:
            raise QueryError(404, "no_thumbnail", "embed with --thumbnail-size to store thumbnails")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @app.get("/v1/neighbors/{image_id}", response_model=Results, responses=errors(400, 404, 422))
    async def neighbours(
        image_id: ImageId, k: K = 10, collapse_duplicates: Collapse = False, filter: Filter = None
    ):
        current = live.current
        query = current.neighbours_query(image_id, k, collapse_duplicates, _filters(filter, fields))
        (hits,) = await batcher.answer(current, query)
        return OrjsonResponse({"metric": current.metric.value, "results": hits})

    @app.post(
        "/v1/search",
        response_model=BatchResults,
        responses=errors(400, 413, 415, 422),
        dependencies=media_type("application/json"),
    )
    async def search(query: VectorQuery):
        current = live.current
        filters = query.filter.model_dump(exclude_none=True) if query.filter else {}
        vectors = np.asarray(query.vectors, dtype=np.float32)
        prepared = current.vectors_query(vectors, query.k, query.collapse_duplicates, filters)
        results = await batcher.answer(current, prepared)
        return OrjsonResponse({"metric": current.metric.value, "results": results})

    # Offered only when the index's model is loaded: the document says what this
    # service answers (without a model, an image query is a 404 like any unknown route).
    if searcher.images is not None and searcher.images.model is not None:
        # Uploads wait for the model in the event loop, not in a thread pool (where
        # 32 of them handing the GIL around took a quarter of the worker's Python time).
        images = ImageBatcher(searcher.images.threads)

        @app.post(
            IMAGE_ROUTE,
            response_model=Results,
            responses=errors(400, 413, 415, 422, 503),
            dependencies=media_type("multipart/form-data"),
        )
        async def search_image(
            image: UploadFile = File(
                ...,
                description=f"An image file (JPEG, PNG, WebP...) of 1 to {limits.max_upload_bytes} bytes.",
                json_schema_extra={"minLength": 1, "maxLength": limits.max_upload_bytes},
            ),
            k: K = 10,
            collapse_duplicates: Collapse = False,
            filter: Filter = None,
        ):
            current = live.current
            data = await image.read(limits.max_upload_bytes + 1)
            upload = ImageQuery(data, k, collapse_duplicates, _filters(filter, fields))
            hits = await images.answer(current, upload)
            return OrjsonResponse({"metric": current.metric.value, "results": hits})

    @app.get("/metrics", include_in_schema=False)
    def metrics():  # reads every worker's files: in the thread pool
        return Response(generate_latest(_scraped(registry)), media_type=CONTENT_TYPE_LATEST)

    return app
