"""What every API dialect of the server shares: the request body limit, and the choice of
the error shape a failure is answered in.

The server speaks OpenAI's embeddings API, Ollama's (``ollama.py``) and TEI's (``tei.py``). A
route's handler raises :class:`~embedpool.server.openai.ApiError` (status, message, code,
param, headers) wherever the failure comes from: the key check, the body limit, validation,
admission (429 + ``Retry-After``), the pool (503). The app's exception handlers hand it to
:func:`render_error`, which answers it in the shape of the dialect the request was made in:

* the dialect a route chose for itself (:func:`use_dialect`: a route whose body decides, such
  as ``/rerank`` in TEI's or Cohere's shape);
* else the one registered for the path (:func:`register_dialect`, by exact path or prefix);
* else OpenAI's (``{"error": {message, type, param, code}}``).

So one auth check, one set of limits and one admission policy hold for every route; only the
rendering differs. Routing errors (404, 405) of a dialect's paths come in its shape too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from embedpool.errors import ModelError
from embedpool.models import ResolvedModel
from embedpool.server.openai import ApiError, ServedModel, bad_request
from embedpool.server.service import EmbeddingService, Runtime
from embedpool.server.settings import ServerSettings

#: Responses with more floats than this are serialised on a thread.
INLINE_RENDER_VALUES = 64 * 384
#: ``request.scope`` key under which a route names the dialect its errors are answered in.
SCOPE_KEY = "embedpool.dialect"

ErrorRenderer = Callable[[ApiError], Response]

_renderers: dict[str, ErrorRenderer] = {"openai": lambda err: err.response()}
_paths: dict[str, str] = {}
_prefixes: list[tuple[str, str]] = []


class ModelContext(Protocol):
    """One served model, as a dialect's routes use it (``registry.ModelSlot`` has it)."""

    settings: ServerSettings
    model: ResolvedModel
    served: ServedModel
    service: EmbeddingService
    runtime: Runtime

    @property
    def state(self) -> str:
        """ "loaded", "loading", "unloaded" or "unloading" (registry.py)."""
        ...


class ServerContext(Protocol):
    """What a dialect's routes need of the app (``app._App`` has it): the default model's
    parts, and every served model (``serve --model A --model B``) by the name a request
    gives."""

    settings: ServerSettings
    model: ResolvedModel
    served: ServedModel
    service: EmbeddingService
    runtime: Runtime

    def model_context(self, name: str | None) -> ModelContext | None:
        """The model a request names (None or empty: the default); None if not served."""
        ...

    def model_slots(self) -> Sequence[ModelContext]:
        """Every served model, the default first."""
        ...


def register_dialect(
    name: str,
    renderer: ErrorRenderer,
    *,
    paths: tuple[str, ...] = (),
    prefixes: tuple[str, ...] = (),
) -> None:
    """Answer errors of ``paths`` (exact) and of paths under ``prefixes`` with ``renderer``."""
    _renderers[name] = renderer
    for path in paths:
        _paths[path] = name
    for prefix in prefixes:
        if (prefix, name) not in _prefixes:
            _prefixes.append((prefix, name))


def use_dialect(request: Request, name: str) -> None:
    """Answer this request's errors (from here on) in dialect ``name``'s shape."""
    if name not in _renderers:
        raise KeyError(f"unknown dialect {name!r}")
    request.scope[SCOPE_KEY] = name


def dialect_of(request: Request) -> str:
    chosen = request.scope.get(SCOPE_KEY)
    if isinstance(chosen, str) and chosen in _renderers:
        return chosen
    path = str(request.scope.get("path", ""))
    if path in _paths:
        return _paths[path]
    for prefix, name in _prefixes:
        if path.startswith(prefix):
            return name
    return "openai"


def render_error(request: Request, err: ApiError) -> Response:
    """``err`` in the shape of the request's dialect. A message that quotes what the client
    sent may hold lone surrogates (JSON's ``"\\ud800"``), which UTF-8 cannot encode: they
    are escaped, so that quoting a bad value never turns a 4xx into a 500."""
    try:
        err.message.encode("utf-8")
    except UnicodeEncodeError:
        err.message = err.message.encode("utf-8", "backslashreplace").decode("utf-8")
    return _renderers[dialect_of(request)](err)


def check_text(texts: Sequence[str], field: str, *, single: bool = False) -> None:
    """A 400 naming ``field[i]`` for a text that is not valid Unicode (a lone surrogate,
    which JSON can carry and the tokenizer cannot read), as the OpenAI route refuses it."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            where = field if single else f"{field}[{i}]"
            raise bad_request(
                f"{where} is not valid Unicode text ({exc.reason} at character {exc.start})",
                where,
                "invalid_text",
            ) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing with 413 by Content-Length first and by the bytes actually sent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad_request(
                f"Content-Length {declared[:40]!r} is not a number", None, "invalid_header"
            ) from None
        if size > limit:
            raise ApiError(
                413,
                f"request body is {size} bytes; the limit is {limit}: "
                "send fewer inputs per request",
                code="request_too_large",
            )
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(
                413,
                f"request body exceeds the limit of {limit} bytes: send fewer inputs per request",
                code="request_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class ModelFacts:
    """What the Ollama and TEI model listings say about the served model."""

    name: str
    family: str  # config.json's model_type ("bert", "xlm-roberta", ...)
    architecture: str
    parameters: int | None  # from the safetensors headers; None for a shipped ONNX graph
    size_bytes: int  # the weight files on disk
    digest: str  # sha256 of the weights
    pooling: str  # sentence-transformers' pooling modes, joined by "+"
    dtype: str  # the served precision: fp32, int8, fp16
    dim: int
    max_length: int


def model_facts(model: ResolvedModel, precision: str) -> ModelFacts:
    """The served model's facts, from its files' headers (no weights read)."""
    from embedpool.graph.weights import checkpoint_files, tensor_infos

    params: int | None
    try:
        params = sum(math.prod(info.shape) for info in tensor_infos(model.weights_path).values())
        files = checkpoint_files(model.weights_path)
    except (ModelError, OSError):
        params, files = None, [model.weights_path]
    size = sum(f.stat().st_size for f in files if f.is_file())
    family = str(model.config.get("model_type") or model.architecture or "unknown")
    return ModelFacts(
        model.name,
        family,
        model.architecture,
        params,
        size,
        model.weights_sha256,
        "+".join(model.head.pooling.modes),
        precision,
        model.dim,
        model.max_length,
    )


def parameter_size(count: int | None) -> str:
    """A parameter count as Ollama shows it (``22.7M``, ``567M``, ``1.5B``)."""
    if count is None:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(count)


async def json_body(
    body: Any, values: int, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``body`` as compact JSON; with more than INLINE_RENDER_VALUES floats, serialised on a
    thread (json.dumps of 2,048 x 384 floats takes ~0.5 s, which would stall every other
    connection)."""
    content = (
        _dumps(body) if values <= INLINE_RENDER_VALUES else await run_in_threadpool(_dumps, body)
    )
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
