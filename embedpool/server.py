"""``embedpool serve``: an OpenAI-compatible embedding server (FastAPI under uvicorn).

Request path of ``POST /v1/embeddings``::

    auth (bearer, constant time) -> read body (Content-Length and real size <= max_request_bytes)
      -> JSON -> validate (every error names its field and input index, OpenAI error shape)
      -> tokenise (a thread for big requests) -> [cache hook: only misses go on]
      -> MicroBatcher.submit  (429 + Retry-After when the token queue is full)
      -> await vectors        (503 when the pool cannot embed, 422 naming a poison input)
      -> float or base64 JSON, truncated inputs listed in X-Embedpool-Truncated-Indices

Status codes: 400 invalid request, 401 bad or missing key, 404 unknown model or route,
413 body too large, 422 an input the model cannot embed, 429 queue full, 503 pool unavailable
or not ready. A 500 only ever means a bug in embedpool, never something a client sent.

Choices a client may notice:

* ``input`` as token-id arrays is refused with 400: the usual sender is LangChain's
  ``OpenAIEmbeddings``, which sends *tiktoken* ids that mean nothing to this model's vocabulary
  (set ``check_embedding_ctx_length=False`` there to send text).
* An empty string is embedded (as ``[CLS] [SEP]``), as the CLI does.
* ``dimensions`` is accepted only when it equals the model's own dimension.
* ``usage.prompt_tokens`` counts the tokens fed to the model (after truncation).

Lifecycle: the app's lifespan builds the executor (the worker pool) and the micro-batcher and
stops both. ``run_server`` runs uvicorn, whose SIGTERM handling stops accepting connections
and waits for requests in flight before the lifespan closes the pool.

FastAPI, Starlette and uvicorn are imported by this module only (``import embedpool`` does not
load them).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedpool.batching import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_ITEMS
from embedpool.config import env_str
from embedpool.engine import EngineSpec, usable_cores
from embedpool.errors import ConfigError, ItemFailed, PoolUnavailable, QueueFull
from embedpool.metrics import CONTENT_TYPE, ServerMetrics
from embedpool.microbatch import (
    DEFAULT_MAX_QUEUE_TOKENS,
    InProcessExecutor,
    MicroBatcher,
    SubmitExecutor,
)
from embedpool.models import ResolvedModel, find_known, resolve_model
from embedpool.tokenization import Encoded, TextTokenizer
from embedpool.types import LongTextMode, Precision, Vectors

#: OpenAI's own limit on inputs per request; clients (LangChain, LlamaIndex) chunk to it.
DEFAULT_MAX_ITEMS = 2048
#: Body size limit: 2,048 inputs of ~4 KB each, plus JSON overhead.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: Requests with more characters than this are tokenised on a thread, not on the event loop:
#: below it, tokenising (~50 us) costs less than the thread hop.
INLINE_TOKENIZE_CHARS = 4096
#: Responses with more floats than this are serialised on a thread (json.dumps of 2,048 x 384
#: floats takes ~0.5 s, which would stall every other connection).
INLINE_RENDER_VALUES = 64 * 384
#: Truncated indices listed in the header at most (the count header is always exact).
MAX_HEADER_INDICES = 512


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``embedpool serve`` takes; validated at construction."""

    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "all-MiniLM-L6-v2"
    precision: Precision = "int8"
    long_text: LongTextMode = "truncate"
    #: Bearer token; None falls back to EMBEDPOOL_API_KEY; empty string disables auth.
    api_key: str | None = None
    max_items_per_request: int = DEFAULT_MAX_ITEMS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_queue_tokens: int = DEFAULT_MAX_QUEUE_TOKENS
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS
    max_wait_ms: float = 2.0
    #: Batches kept in the executor; None = 2 per worker (from the executor's stats()).
    max_inflight_batches: int | None = None
    #: Extra names clients may send as ``model`` (e.g. "text-embedding-3-small").
    served_model_names: tuple[str, ...] = ()
    request_timeout_s: float = 600.0
    ready_timeout_s: float = 10.0
    #: SIGTERM: how long uvicorn waits for requests in flight before closing connections.
    graceful_timeout_s: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port", self.port),
            (self.precision in ("fp32", "int8"), "precision", self.precision),
            (self.long_text in ("truncate", "window"), "long_text", self.long_text),
            (self.max_items_per_request >= 1, "max_items_per_request", self.max_items_per_request),
            (self.max_request_bytes >= 1024, "max_request_bytes", self.max_request_bytes),
            (self.max_queue_tokens >= 1, "max_queue_tokens", self.max_queue_tokens),
            (self.batch_tokens >= 1, "batch_tokens", self.batch_tokens),
            (self.max_batch_items >= 1, "max_batch_items", self.max_batch_items),
            (0 <= self.max_wait_ms <= 1000, "max_wait_ms", self.max_wait_ms),
            (self.max_inflight_batches is None or self.max_inflight_batches >= 1,
             "max_inflight_batches", self.max_inflight_batches),
            (self.request_timeout_s > 0, "request_timeout_s", self.request_timeout_s),
            (self.ready_timeout_s > 0, "ready_timeout_s", self.ready_timeout_s),
            (self.graceful_timeout_s >= 0, "graceful_timeout_s", self.graceful_timeout_s),
        ]
        for ok, name, value in checks:
            if not ok:
                raise ConfigError(f"server setting {name}={value!r} is out of range")

    def resolved_api_key(self) -> str | None:
        """The key to require, or None for no auth (settings first, then EMBEDPOOL_API_KEY)."""
        key = self.api_key if self.api_key is not None else env_str("EMBEDPOOL_API_KEY")
        return key or None


class VectorCacheHook(Protocol):
    """What the server needs from a vector cache (wired by the lead when the cache lands).

    Keys are the input texts; the cache itself is bound to the model fingerprint.
    """

    def get_many(self, texts: Sequence[str]) -> list[Vectors | None]: ...

    def put_many(self, texts: Sequence[str], vectors: Vectors) -> None: ...


# ----------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param,
                              code=self.code, headers=self.headers)


def error_response(status: int, message: str, *, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------- schemas
class EmbeddingRequest(BaseModel):
    """OpenAI's request body (documentation; the handler validates by hand to name indices)."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage
    truncated_indices: list[int] | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}


# ----------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class EmbeddingCall:
    """A validated request."""

    texts: list[str]
    model: str
    encoding_format: Literal["float", "base64"]


@dataclass(frozen=True)
class ServedModel:
    names: tuple[str, ...]  # names[0] is the canonical one, echoed in responses
    dim: int
    max_length: int

    def lookup(self, name: str) -> str | None:
        if name in self.names:
            return self.names[0]
        low = name.lower()
        return self.names[0] if any(n.lower() == low for n in self.names) else None


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_embedding_request(body: Any, served: ServedModel, max_items: int) -> EmbeddingCall:
    """Validate an OpenAI embeddings body; every error names the field and input index."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {_type_name(body)}", None,
                   "invalid_type")
    model_name = body.get("model")
    if model_name is None:
        model = served.names[0]
    elif not isinstance(model_name, str):
        raise _bad(f"'model' must be a string, got {_type_name(model_name)}", "model", "invalid_type")
    else:
        found = served.lookup(model_name)
        if found is None:
            raise ApiError(404, f"The model '{model_name}' does not exist on this server. "
                           f"Served models: {', '.join(served.names)}.",
                           param="model", code="model_not_found")
        model = found
    if "input" not in body:
        raise _bad("'input' is required: a string or an array of strings", "input",
                   "missing_required_parameter")
    texts = _parse_input(body["input"], max_items)
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}"[:300],
                   "encoding_format")
    dims = body.get("dimensions")
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, int):
            raise _bad(f"'dimensions' must be an integer, got {_type_name(dims)}", "dimensions",
                       "invalid_type")
        if dims != served.dim:
            raise _bad(f"model '{model}' produces {served.dim}-dimensional vectors and does not "
                       f"support 'dimensions' (only {served.dim} is accepted); omit it",
                       "dimensions", "unsupported_value")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad(f"'user' must be a string, got {_type_name(user)}", "user", "invalid_type")
    return EmbeddingCall(texts, model, "base64" if fmt == "base64" else "float")


def _parse_input(value: Any, max_items: int) -> list[str]:
    if isinstance(value, str):
        items: list[Any] = [value]
        single = True
    elif isinstance(value, list):
        items, single = value, False
    else:
        raise _bad(f"'input' must be a string or an array of strings, got {_type_name(value)}",
                   "input", "invalid_type")
    if not items:
        raise _bad("'input' is an empty array: send at least one string", "input", "empty_input")
    if not single and len(items) > max_items:
        raise _bad(f"'input' has {len(items)} items; this server accepts at most {max_items} "
                   "per request: split it into several requests", "input", "too_many_inputs")
    first = items[0]
    if not single and (isinstance(first, list) or (isinstance(first, int)
                                                   and not isinstance(first, bool))):
        raise _bad("'input' is token ids, which this server does not accept: it embeds text "
                   "with its own tokenizer, and token arrays usually come from tiktoken "
                   "(LangChain's OpenAIEmbeddings: set check_embedding_ctx_length=False). "
                   "Send the texts instead.", "input", "unsupported_token_input")
    for i, item in enumerate(items):
        where = "input" if single else f"input[{i}]"
        if not isinstance(item, str):
            raise _bad(f"{where} must be a string, got {_type_name(item)}", where, "invalid_type")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _bad(f"{where} is not valid Unicode text ({exc.reason} at character "
                       f"{exc.start})", where, "invalid_text") from None
    return list(items)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing with 413 by Content-Length first and by the bytes actually sent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _bad(f"Content-Length {declared[:40]!r} is not a number", None,
                       "invalid_header") from None
        if size > limit:
            raise ApiError(413, f"request body is {size} bytes; the limit is {limit}: "
                           "send fewer inputs per request", code="request_too_large")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes: "
                           "send fewer inputs per request", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------------------- rendering
def render_embeddings(vectors: Vectors, fmt: str, model: str, prompt_tokens: int,
                      truncated: Sequence[int]) -> bytes:
    """The response body. base64 is little-endian float32, as the openai client decodes it."""
    data: list[dict[str, Any]] = []
    if fmt == "base64":
        le = vectors.astype("<f4", copy=False)
        for i in range(le.shape[0]):
            data.append({"object": "embedding", "index": i,
                         "embedding": base64.b64encode(le[i].tobytes()).decode("ascii")})
    else:
        for i, row in enumerate(vectors.tolist()):
            data.append({"object": "embedding", "index": i, "embedding": row})
    body: dict[str, Any] = {"object": "list", "data": data, "model": model,
                            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    if truncated:
        body["truncated_indices"] = list(truncated)
    return json.dumps(body, separators=(",", ":")).encode()


def truncation_headers(truncated: Sequence[int]) -> dict[str, str]:
    headers = {"X-Embedpool-Truncated": str(len(truncated))}
    if truncated:
        shown = ",".join(str(i) for i in truncated[:MAX_HEADER_INDICES])
        headers["X-Embedpool-Truncated-Indices"] = shown
    return headers


# ----------------------------------------------------------------------------- the app
@dataclass
class _Runtime:
    """What the lifespan starts; None before startup and after shutdown."""

    executor: SubmitExecutor | None = None
    batcher: MicroBatcher | None = None
    started: float = field(default_factory=time.time)


class _MetricsMiddleware:
    """Counts every HTTP response by route and status, with its latency (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        path = str(scope.get("path", ""))
        route = path if path in self.routes else "/v1/models/{model}" if "/models/" in path else "other"
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(route, status, time.perf_counter() - start)


def default_executor_factory(model: ResolvedModel, precision: Precision) -> Callable[[], SubmitExecutor]:
    """The engine in-process on one thread (until the lead wires the worker pool here)."""
    spec = EngineSpec(model, precision, threads=usable_cores())
    return lambda: InProcessExecutor(spec.build)


def served_model(settings: ServerSettings, model: ResolvedModel) -> ServedModel:
    names: list[str] = [model.name, settings.model]
    known = find_known(model.name)
    if known is not None:
        names += [known.name, known.hub_id]
    names += list(settings.served_model_names)
    unique = tuple(dict.fromkeys(n for n in names if n))
    return ServedModel(unique, model.dim, model.max_length)


def create_app(settings: ServerSettings,
               executor_factory: Callable[[], SubmitExecutor] | None = None, *,
               model: ResolvedModel | None = None,
               cache: VectorCacheHook | None = None) -> FastAPI:
    """Build the app. The executor is created by the lifespan (on startup), not here."""
    resolved = model if model is not None else resolve_model(settings.model)
    tokenizer = TextTokenizer(resolved.tokenizer_path, resolved.max_length)
    served = served_model(settings, resolved)
    factory = executor_factory or default_executor_factory(resolved, settings.precision)
    api_key = settings.resolved_api_key()
    rt = _Runtime()
    metrics = ServerMetrics(lambda: rt.batcher.stats() if rt.batcher else None,
                            lambda: rt.executor.stats() if rt.executor else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt.executor = await run_in_threadpool(factory)
        rt.batcher = MicroBatcher(
            rt.executor, batch_tokens=settings.batch_tokens,
            max_batch_items=settings.max_batch_items, max_wait_s=settings.max_wait_ms / 1000,
            max_queue_tokens=settings.max_queue_tokens,
            max_inflight=settings.max_inflight_batches,
            on_batch=lambda b: metrics.batch_tokens.observe(b.padded_tokens))
        try:
            yield
        finally:
            # uvicorn has already waited for the requests in flight (graceful shutdown).
            batcher, executor = rt.batcher, rt.executor
            rt.batcher = None
            await run_in_threadpool(batcher.wait_idle, settings.graceful_timeout_s)
            batcher.close()
            await run_in_threadpool(executor.close)
            rt.executor = None

    app = FastAPI(title="embedpool", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible embeddings on a local worker pool.")
    routes = frozenset({"/v1/embeddings", "/embeddings", "/v1/models", "/models", "/health",
                        "/ready", "/metrics"})
    app.add_middleware(_MetricsMiddleware, metrics=metrics, routes=routes)

    # ------------------------------------------------------------ exception handlers
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        return error_response(400, f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}",
                              param=".".join(loc) or None, code="invalid_value")

    # ------------------------------------------------------------ helpers
    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("utf-8", "surrogateescape"), api_key.encode()):
            raise ApiError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>' "
                           "(the key given by --api-key or EMBEDPOOL_API_KEY).",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def running_batcher() -> MicroBatcher:
        if rt.batcher is None:
            raise ApiError(503, "the server is starting or shutting down", type="server_error",
                           code="not_ready", headers={"Retry-After": "1"})
        return rt.batcher

    def tokenize(texts: list[str]) -> Encoded:
        return tokenizer.encode(texts, settings.long_text)

    async def embed(texts: list[str]) -> tuple[Vectors, int, list[int]]:
        """(vectors, tokens fed to the model, truncated indices) for validated texts."""
        batcher = running_batcher()
        chars = sum(len(t) for t in texts)
        enc = tokenize(texts) if chars <= INLINE_TOKENIZE_CHARS else await run_in_threadpool(tokenize, texts)
        tokens = sum(len(s) for s in enc.sequences)
        truncated = [i for i, t in enumerate(enc.truncated) if t]
        metrics.truncated_items.inc(len(truncated))
        out = np.empty((len(texts), served.dim), dtype=np.float32)
        todo = list(range(len(texts)))
        if cache is not None:
            cached = await run_in_threadpool(cache.get_many, texts)
            todo = [i for i, v in enumerate(cached) if v is None]
            for i, v in enumerate(cached):
                if v is not None:
                    out[i] = v
            metrics.cache_hits.inc(len(texts) - len(todo))
            metrics.cache_misses.inc(len(todo))
        if todo:
            where = {item: k for k, item in enumerate(todo)}
            rows = [j for j, o in enumerate(enc.owner) if o in where]
            try:
                ticket = batcher.submit([enc.sequences[j] for j in rows],
                                        [where[enc.owner[j]] for j in rows], len(todo))
            except QueueFull as exc:
                metrics.rejected.labels("queue_full").inc()
                raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(exc.retry_after)}) from None
            except PoolUnavailable as exc:
                metrics.rejected.labels("pool_unavailable").inc()
                raise ApiError(503, str(exc), type="server_error", code="pool_unavailable",
                               headers={"Retry-After": "5"}) from None
            try:
                vectors = await asyncio.wait_for(asyncio.wrap_future(ticket.future),
                                                 settings.request_timeout_s)
            except TimeoutError:
                raise ApiError(503, f"embedding did not finish within {settings.request_timeout_s:g} s",
                               type="server_error", code="timeout") from None
            except ItemFailed as exc:
                index = todo[exc.index]
                raise ApiError(422, f"input[{index}] could not be embedded: {exc.reason}",
                               param=f"input[{index}]", code="input_failed") from None
            except PoolUnavailable as exc:
                raise ApiError(503, str(exc), type="server_error", code="pool_unavailable",
                               headers={"Retry-After": "5"}) from None
            out[todo] = vectors
            if cache is not None:
                await run_in_threadpool(cache.put_many, [texts[i] for i in todo], vectors)
        metrics.embedded_items.inc(len(texts))
        metrics.embedded_tokens.inc(tokens)
        return out, tokens, truncated

    # ------------------------------------------------------------ routes
    async def embeddings(request: Request) -> Response:
        check_auth(request)
        raw = await read_body(request, settings.max_request_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise _bad(f"the request body is not valid JSON: {exc}"[:300], None, "invalid_json") from None
        call = parse_embedding_request(body, served, settings.max_items_per_request)
        vectors, tokens, truncated = await embed(call.texts)
        args = (vectors, call.encoding_format, call.model, tokens, truncated)
        content = (render_embeddings(*args) if vectors.size <= INLINE_RENDER_VALUES
                   else await run_in_threadpool(render_embeddings, *args))
        return Response(content, media_type="application/json", headers=truncation_headers(truncated))

    body_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": EmbeddingRequest.model_json_schema()}}}}
    for path in ("/v1/embeddings", "/embeddings"):
        app.add_api_route(path, embeddings, methods=["POST"], response_model=EmbeddingResponse,
                          responses=_ERRORS, openapi_extra=body_doc, summary="Create embeddings",
                          include_in_schema=path.startswith("/v1"))

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(rt.started), "owned_by": "embedpool"}

    async def list_models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card(n) for n in served.names]})

    async def get_model(request: Request, model_id: str) -> Response:
        check_auth(request)
        if served.lookup(model_id) is None:
            raise ApiError(404, f"The model '{model_id}' does not exist on this server. "
                           f"Served models: {', '.join(served.names)}.",
                           param="model", code="model_not_found")
        return JSONResponse(model_card(model_id))

    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/models", list_models, methods=["GET"], response_model=ModelList,
                          responses=_ERRORS, include_in_schema=prefix == "/v1")
        app.add_api_route(f"{prefix}/models/{{model_id}}", get_model, methods=["GET"],
                          response_model=ModelCard, responses=_ERRORS,
                          include_in_schema=prefix == "/v1")

    @app.get("/health", responses={503: {"description": "the pool is broken or hung"}})
    async def health() -> Response:
        """Liveness: 200 unless the pool is broken, the batcher died or the pool is hung."""
        if rt.batcher is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        problem = rt.batcher.health()
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", responses={503: {"description": "a probe embedding failed or timed out"}})
    async def ready() -> Response:
        """Readiness: one real tiny embedding through the pool, bypassing the queue."""
        batcher = rt.batcher
        if batcher is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        start = time.perf_counter()
        try:
            fut = batcher.probe(tokenize(["ready"]).sequences)
            result = await asyncio.wait_for(asyncio.wrap_future(fut), settings.ready_timeout_s)
            vec = result.vectors
            if result.failed or vec.shape != (1, served.dim) or not np.isfinite(vec).all():
                raise PoolUnavailable(f"probe returned a bad vector (failed={result.failed})")
        except TimeoutError:
            return JSONResponse({"status": "unready", "reason":
                                 f"probe embedding took over {settings.ready_timeout_s:g} s"},
                                status_code=503)
        except Exception as exc:
            return JSONResponse({"status": "unready",
                                 "reason": f"{type(exc).__name__}: {exc}"[:500]}, status_code=503)
        return JSONResponse({"status": "ready", "probe_ms": round((time.perf_counter() - start) * 1e3, 2)})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.state.metrics = metrics  # for tests and the lead's cache wiring
    app.state.runtime = rt
    return app


def run_server(settings: ServerSettings,
               executor_factory: Callable[[], SubmitExecutor] | None = None, *,
               cache: VectorCacheHook | None = None) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn drains requests in flight, then the lifespan closes
    the pool."""
    import uvicorn

    app = create_app(settings, executor_factory, cache=cache)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on",
                            log_level=settings.log_level,
                            timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s))
    uvicorn.Server(config).run()

