"""The FastAPI app: routes, auth, the lifespan that starts and stops the pool, and uvicorn.

Each route is a small function of an :class:`_App` (the app's state: settings, runtime,
metrics, the embedding service); :func:`create_app` only wires them to paths.

Auth (when a key is set, by ``--api-key`` or ``EMBEDPOOL_API_KEY``): ``Authorization: Bearer
<key>``, compared in constant time, on the API (``/v1/embeddings``, ``/v1/models``, their
unprefixed aliases) and on ``/metrics`` (it tells traffic volumes and model names; Prometheus
sends the key with ``authorization: {credentials: ...}`` in its scrape config). ``/health`` and
``/ready`` stay open: orchestrators' probes carry no key, ``/health`` reads only in-process
state, and ``/ready``'s one real embedding is shared and rate limited (readiness.py), so an
open /ready cannot be used to get around the queue. ``/openapi.json`` and ``/docs`` are open.

Lifecycle: the lifespan builds the executor (the worker pool) and the micro-batcher and stops
both. :func:`run_server` runs uvicorn, whose SIGTERM handling stops accepting connections and
waits for requests in flight before the lifespan closes the pool.
"""

from __future__ import annotations

import hmac
import math
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedpool.metrics import CONTENT_TYPE, ServerMetrics
from embedpool.microbatcher import SubmitExecutor
from embedpool.models import ResolvedModel, find_known, resolve_model
from embedpool.models.crossencoder import refuse_cross_encoder
from embedpool.modelspec import INPUT_TYPE_PROMPTS
from embedpool.options import input_type_prompt, prompt_names
from embedpool.server.dialects import INLINE_RENDER_VALUES, read_body, render_error
from embedpool.server.ollama import ROUTES as OLLAMA_ROUTES
from embedpool.server.ollama import register_ollama
from embedpool.server.openai import (
    ERROR_RESPONSES,
    ApiError,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    ServedModel,
    embedding_request_schema,
    model_card,
    parse_embedding_request,
    parse_json,
    render_embeddings,
    truncation_headers,
)
from embedpool.server.readiness import STARTING, Readiness, SharedProbe, probe_once
from embedpool.server.registry import Member, ModelRegistry, ModelSetup, ModelSlot
from embedpool.server.rerank import ROUTES as RERANK_ROUTES
from embedpool.server.rerank import RerankerSetup, RerankService, register_rerank_routes
from embedpool.server.service import EmbeddingService, Runtime, VectorCacheHook
from embedpool.server.settings import ServerSettings
from embedpool.server.tei import ROUTES as TEI_ROUTES
from embedpool.server.tei import register_tei
from embedpool.tokenization import TextTokenizer
from embedpool.types import Precision

#: Routes counted by name in the request metrics; anything else counts as "other".
ROUTES = frozenset(
    {
        "/v1/embeddings",
        "/embeddings",
        "/v1/models",
        "/models",
        "/health",
        "/ready",
        "/metrics",
        *OLLAMA_ROUTES,
        *TEI_ROUTES,
        *RERANK_ROUTES,
    }
)

_bearer = HTTPBearer(
    auto_error=False, description="The key given by --api-key or EMBEDPOOL_API_KEY."
)
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class _MetricsMiddleware:
    """Counts every HTTP response by route and status, with its latency (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

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
        route = path if path in ROUTES else "/v1/models/{model}" if "/models/" in path else "other"
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(route, status, time.perf_counter() - start)


def reinstall_signal_handlers() -> None:
    """Put the Python handlers of SIGTERM and SIGINT (uvicorn's) back at the C level.

    Native code that an executor loads may install its own: Ray's core worker installs
    abseil's failure handler for SIGTERM, which logs a stack and chains to Python's handler,
    but aborted the server (exit -6, requests in flight cut) in 4 of 4 tries here. Setting a
    Python handler again is ``sigaction`` with Python's own, so uvicorn drains as it should.
    Only the main thread may set handlers; a server on another thread (tests) has none.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)


def default_executor_factory(
    model: ResolvedModel, precision: Precision
) -> Callable[[], SubmitExecutor]:
    """The engine in this process on the CPU (``embedpool serve`` passes its placement's),
    built by the one construction path (``placement.start_executor``)."""
    from embedpool.placement import executor_factory, place

    return executor_factory(model, place(model, device="cpu", precision=precision), workers=None)


def served_model(
    settings: ServerSettings, model: ResolvedModel, tokenizer: TextTokenizer
) -> ServedModel:
    """The names clients may use: the resolved name, the one asked for, the known model's
    name and hub id, then ``--served-model-name`` aliases; and what requests may ask of it
    (prompt names, input types, dimensions)."""
    names: list[str] = [model.name, settings.model]
    known = find_known(model.name)
    if known is not None:
        names += [known.name, known.hub_id]
    names += list(settings.served_model_names)
    unique = tuple(dict.fromkeys(n for n in names if n))
    return ServedModel(
        unique,
        model.dim,
        model.max_length,
        prompt_names=tuple(prompt_names(tokenizer)),
        input_types=tuple((t, input_type_prompt(tokenizer, t)) for t in sorted(INPUT_TYPE_PROMPTS)),
        matryoshka=model.matryoshka,
        normalize=model.normalize,
    )


class _App:
    """One app's state and its route handlers. ``settings``, ``model``, ``served``,
    ``service`` and ``runtime`` are the default (first) model's; ``registry`` holds every
    served model (``serve --model A --model B``, registry.py)."""

    def __init__(
        self,
        settings: ServerSettings,
        models: Sequence[ModelSetup],
        reranker: RerankerSetup | None = None,
        rerankers: Sequence[RerankerSetup] = (),
        session: Callable[[], Callable[[], None]] | None = None,
    ) -> None:
        self.settings = settings
        self.api_key = settings.resolved_api_key()
        rt = Runtime()  # the default model's, replaced by its slot's below
        self.metrics = ServerMetrics(
            lambda: rt.batcher.stats() if rt.batcher else None,
            lambda: rt.executor.stats() if rt.executor else None,
        )
        self.registry = ModelRegistry(
            settings,
            models,
            lambda s, m, t: served_model(s, m.model, t),
            self.metrics,
            [r for r in (reranker, *rerankers) if r is not None],
        )
        default = self.registry.default
        default.runtime = rt
        default.service.runtime = rt
        self.model: ResolvedModel = default.model
        self.served: ServedModel = default.served
        self.service: EmbeddingService = default.service
        self.runtime: Runtime = rt
        self.normalize = self.model.normalize
        self.probe = SharedProbe(self._probe, settings.ready_reuse_s)
        self.probe_input = default.tokenizer.encode(["ready"])
        #: ``serve --reranker``: the rerank routes' default model, a registry member (loaded,
        #: unloaded and planned in the one memory budget like the embedders).
        services = [r.service for r in self.registry.rerankers]
        self.reranker: RerankService | None = services[0] if services else None
        #: ``serve --reranker A --reranker B``: the rerankers after the first.
        self.more_rerankers = services[1:]
        #: What the server holds for its life around every model's executor (run on a worker
        #: thread before the first load; it returns what releases it at stop): the Ray of
        #: ``serve --backend ray`` (``on_ray.hold_ray``); None: nothing.
        self.session = session
        self.end_session: Callable[[], None] | None = None
        self.session_error: BaseException | None = None

    # ------------------------------------------------------------ lifespan
    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        if self.session is not None:  # e.g. the Ray every model's executor joins (on_ray.py)
            try:
                self.end_session = await run_in_threadpool(self.session)
            except Exception as exc:
                self.session_error = exc
                raise
        try:
            await self.registry.start()  # --preload's models, each on a worker thread
        except BaseException:
            await self._end_session()
            raise
        reinstall_signal_handlers()

    async def stop(self) -> None:
        # uvicorn has already waited for the requests in flight (graceful shutdown).
        try:
            await self.registry.stop()
        finally:
            await self._end_session()

    async def _end_session(self) -> None:
        end, self.end_session = self.end_session, None
        if end is not None:
            await run_in_threadpool(end)

    # ------------------------------------------------------------ models
    def model_context(self, name: str | None) -> ModelSlot | None:
        """The served model a request names (None or empty: the default); None if unknown."""
        return self.registry.default if not name else self.registry.find(name)

    def model_slots(self) -> list[ModelSlot]:
        return list(self.registry.slots)

    def members(self) -> list[Member]:
        """Every served model, embedders then rerankers."""
        return list(self.registry.members)

    def expires_in(self, member: Any) -> float:
        """Seconds until the idle ``member`` is unloaded (inf: not for idleness)."""
        return self.registry.expires_in(member)

    # ------------------------------------------------------------ auth
    def require_key(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """401 unless the bearer token equals the key (constant time); no-op without a key."""
        if self.api_key is None:
            return
        token = credentials.credentials.strip() if credentials is not None else ""
        if credentials is None or not hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "Missing or incorrect API key: send 'Authorization: Bearer "
                "<key>' (the key given by --api-key or EMBEDPOOL_API_KEY).",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # ------------------------------------------------------------ routes
    async def embeddings(self, request: Request) -> Response:
        s = self.settings
        body = parse_json(await read_body(request, s.max_request_bytes))
        name = body.get("model") if isinstance(body, dict) else None
        slot = self.model_context(name) if isinstance(name, str) else None
        if isinstance(name, str) and slot is None:
            raise self.registry.not_found(name)
        served, service = (slot.served, slot.service) if slot else (self.served, self.service)
        call = parse_embedding_request(body, served, s.max_items_per_request)
        done = await service.embed(call.texts, service.options(call))
        args = (done.vectors, call.encoding_format, call.model, done.tokens, done.truncated)
        content = (
            render_embeddings(*args)
            if done.vectors.size <= INLINE_RENDER_VALUES
            else await run_in_threadpool(render_embeddings, *args)
        )
        return Response(
            content, media_type="application/json", headers=truncation_headers(done.truncated)
        )

    async def list_models(self) -> Response:
        """Every name of every served model (rerankers too), with its state (loaded, loading,
        unloaded, unloading) and kind (embedding, rerank)."""
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {**model_card(n, m.runtime.started), "state": m.state, "kind": m.kind}
                    for m in self.registry.members
                    for n in m.names
                ],
            }
        )

    async def get_model(self, model_id: str) -> Response:
        member: Member | None = self.registry.find(model_id) or next(
            (r for r in self.registry.rerankers if model_id in r.names), None
        )
        if member is None:
            raise self.registry.not_found(model_id)
        return JSONResponse(
            {
                **model_card(model_id, member.runtime.started),
                "state": member.state,
                "kind": member.kind,
            }
        )

    async def health(self) -> Response:
        """Liveness: 200 unless a loaded model's pool is broken, its batcher died or its
        pool is hung (a model unloaded for idleness is not a fault)."""
        if not self.registry.started:
            return JSONResponse({"status": "starting"}, status_code=503)
        for slot in self.registry.slots:
            batcher = slot.runtime.batcher
            problem = batcher.health() if batcher is not None else None
            if problem is not None:
                if len(self.registry.slots) > 1:
                    problem = f"{slot.name}: {problem}"
                return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(self) -> Response:
        """Readiness: one real tiny embedding through the pool, shared by concurrent callers."""
        if self.registry.started and self.runtime.batcher is None:
            # several models: the default one unloaded for idleness loads on demand
            return JSONResponse({"status": "ready", "model": self.registry.default.state})
        answer = STARTING if self.runtime.batcher is None else await self.probe.check()
        return JSONResponse(answer.body, status_code=answer.status)

    async def _probe(self) -> Readiness:
        batcher = self.runtime.batcher
        if batcher is None:
            return STARTING
        self.metrics.ready_probes.inc()
        return await probe_once(
            batcher, self.probe_input, self.served.dim, self.settings.ready_timeout_s
        )

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return render_error(request, exc)  # in the shape of the route's dialect


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return render_error(
        request,
        ApiError(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            code=code,
            headers=getattr(exc, "headers", None),
        ),
    )


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    return render_error(
        request,
        ApiError(
            400,
            f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}",
            param=".".join(loc) or None,
            code="invalid_value",
        ),
    )


def create_app(
    settings: ServerSettings,
    executor_factory: Callable[[], SubmitExecutor] | None = None,
    *,
    model: ResolvedModel | None = None,
    cache: VectorCacheHook | None = None,
    reranker: RerankerSetup | None = None,
    models: Sequence[ModelSetup] = (),
    planned_bytes: int | None = None,
    rerankers: Sequence[RerankerSetup] = (),
    session: Callable[[], Callable[[], None]] | None = None,
) -> FastAPI:
    """Build the app. The executor is created by the lifespan (on startup), not here.
    ``reranker``: a cross-encoder served on the rerank routes (server/rerank.py).
    ``models``: more embedding models beside the default one (registry.py);
    ``planned_bytes``: the default model's planned memory (None: one worker's estimate);
    ``rerankers``: more cross-encoders beside ``reranker``, picked by a request's ``model``;
    ``session``: held for the server's life around every executor (``on_ray.hold_ray``)."""
    if rerankers and reranker is None:
        reranker, rerankers = rerankers[0], rerankers[1:]
    resolved = model if model is not None else resolve_model(settings.model)
    refuse_cross_encoder(resolved)
    for extra in models:
        refuse_cross_encoder(extra.model)
    factory = executor_factory or default_executor_factory(resolved, settings.precision)
    a = _App(
        settings,
        [ModelSetup(resolved, factory, cache, planned_bytes), *models],
        reranker,
        rerankers,
        session,
    )
    app = FastAPI(
        title="embedpool",
        version="0.1.0",
        lifespan=a.lifespan,
        description="OpenAI-compatible embeddings on a local worker pool.",
    )
    app.add_middleware(_MetricsMiddleware, metrics=a.metrics)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)

    async def keyed(credentials: _Credentials) -> None:
        a.require_key(credentials)

    # Only a server with a key documents (and enforces) it in the schema.
    auth: list[Any] = [Depends(keyed)] if a.api_key is not None else []
    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": embedding_request_schema(a.served, settings.max_items_per_request)
                }
            },
        }
    }
    for prefix in ("/v1", ""):
        listed = prefix == "/v1"  # the unprefixed aliases work but stay out of the schema
        app.add_api_route(
            f"{prefix}/embeddings",
            a.embeddings,
            methods=["POST"],
            dependencies=auth,
            response_model=EmbeddingResponse,
            responses=ERROR_RESPONSES,
            openapi_extra=body_doc,
            summary="Create embeddings",
            include_in_schema=listed,
        )
        app.add_api_route(
            f"{prefix}/models",
            a.list_models,
            methods=["GET"],
            dependencies=auth,
            response_model=ModelList,
            responses=ERROR_RESPONSES,
            include_in_schema=listed,
        )
        app.add_api_route(
            f"{prefix}/models/{{model_id}}",
            a.get_model,
            methods=["GET"],
            dependencies=auth,
            response_model=ModelCard,
            responses=ERROR_RESPONSES,
            include_in_schema=listed,
        )
    app.add_api_route(
        "/health",
        a.health,
        methods=["GET"],
        responses={503: {"description": "the pool is broken or hung"}},
    )
    app.add_api_route(
        "/ready",
        a.ready,
        methods=["GET"],
        responses={503: {"description": "a probe embedding failed or timed out"}},
    )
    app.add_api_route(
        "/metrics", a.prometheus, methods=["GET"], dependencies=auth, response_class=Response
    )
    # The Ollama and TEI dialects: the same key, limits and admission, their error shapes.
    register_ollama(app, a, auth)
    register_tei(app, a, auth)
    if a.reranker is not None:
        register_rerank_routes(app, a.reranker, settings, auth, a.more_rerankers)
    app.state.metrics = a.metrics  # for tests
    app.state.runtime = a.runtime
    app.state.registry = a.registry
    app.state.rerank_startup_error = lambda: (
        a.session_error
        or next(
            (
                r.runtime.startup_error
                for r in ([a.reranker] if a.reranker else []) + a.more_rerankers
                if r.runtime.startup_error is not None
            ),
            None,
        )
    )
    return app


def run_server(
    settings: ServerSettings,
    executor_factory: Callable[[], SubmitExecutor] | None = None,
    *,
    cache: VectorCacheHook | None = None,
    reranker: RerankerSetup | None = None,
    models: Sequence[ModelSetup] = (),
    planned_bytes: int | None = None,
    rerankers: Sequence[RerankerSetup] = (),
    session: Callable[[], Callable[[], None]] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn drains requests in flight, then the lifespan closes
    the pool. If the executor cannot be built, its error is raised here (uvicorn only logs
    it), so that the command line can exit with its code."""
    import uvicorn

    app = create_app(
        settings,
        executor_factory,
        cache=cache,
        reranker=reranker,
        models=models,
        planned_bytes=planned_bytes,
        rerankers=rerankers,
        session=session,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s),
    )
    try:
        uvicorn.Server(config).run()
    except SystemExit:  # uvicorn's exit 3 after a failed startup
        error = app.state.runtime.startup_error or app.state.rerank_startup_error()
        if error is not None:
            raise error from None
        raise
