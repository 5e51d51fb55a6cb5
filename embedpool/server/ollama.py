"""Ollama's API on the embedpool server: ``/api/embed``, ``/api/embeddings``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/version``, so that the ``ollama`` client, LangChain's
``OllamaEmbeddings`` and the editor tools that index code through Ollama work unchanged.

Shapes and codes follow Ollama's server (``server/routes.go``, ``api/types.go``):

* errors are ``{"error": "<message>"}``: 400 for a bad body, 404 ``model '<name>' not
  found``; the server's own limits as on every route (401 key, 413 body, 429 + Retry-After
  queue full, 503 pool unavailable);
* ``/api/embed``: ``input`` a string or a list of strings (an empty string or list embeds
  nothing: ``embeddings: []``); ``truncate`` true (the default) leaves a long input to the
  server's ``--long-text`` mode (cut to the window, or windows), false refuses an input
  longer than the model's window with 400 ``the input length exceeds the context length``;
  ``dimensions`` keeps the first N values (a model trained for it; other models: their own
  width, as on every route); vectors are L2-normalised, as Ollama's are; ``keep_alive`` (a
  Go duration string or seconds, refused as Ollama refuses a bad one) is honoured as in
  Ollama: how long the model stays loaded idle after this request, until its next request
  sets its own (none: the server's ``--keep-alive``); ``0`` unloads it once its requests are
  done, a negative value keeps it loaded; within the server's memory budget either way (an
  idle model is unloaded when another needs its memory); ``options`` is accepted and
  ignored; ``prompt_eval_count`` counts the tokens fed to the model; durations are
  nanoseconds;
* ``/api/embeddings`` (the older route): ``prompt`` -> ``embedding``, the model's own vector
  (not normalised again, as in Ollama);
* model names: the served names, each also with Ollama's default tag ``:latest``, and
  Ollama's library names of the same models (``all-minilm``, ``nomic-embed-text``,
  ``mxbai-embed-large``, ``bge-m3``); a request without ``model`` gets the served model
  (Ollama requires one; embedpool serves one);
* ``/api/tags`` lists the served models (embedders and rerankers) as ``<name>:latest`` with
  their weights' size, sha256 digest, family and parameter count; ``/api/ps`` the loaded ones,
  with ``expires_at`` when the idle model is unloaded (the far future where it is kept);
  ``/api/show`` adds ``model_info``
  (``<family>.embedding_length``, ``<family>.context_length``) and ``capabilities:
  ["embedding"]``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import embedpool
from embedpool.models import ResolvedModel
from embedpool.server.dialects import (
    ModelContext,
    ModelFacts,
    ServerContext,
    check_text,
    json_body,
    model_facts,
    parameter_size,
    read_body,
    register_dialect,
)
from embedpool.server.openai import (
    ApiError,
    EmbeddingCall,
    parse_json,
    truncation_headers,
    type_name,
)
from embedpool.server.service import Runtime
from embedpool.server.settings import ServerSettings
from embedpool.vectors import l2_normalize

#: The Ollama release whose API these routes follow (reported by /api/version).
OLLAMA_API_VERSION = "0.33.0"
#: The tag Ollama gives a model name without one.
DEFAULT_TAG = ":latest"
#: Paths counted by name in the request metrics.
ROUTES = ("/api/embed", "/api/embeddings", "/api/tags", "/api/show", "/api/ps", "/api/version")
#: Ollama library names of the models embedpool knows (without a tag: ``:latest``), so a
#: tool configured for Ollama's model finds the same model here.
OLLAMA_NAMES = {
    "all-minilm": "all-MiniLM-L6-v2",
    "all-minilm:l6": "all-MiniLM-L6-v2",
    "all-minilm:22m": "all-MiniLM-L6-v2",
    "all-minilm:l12": "all-MiniLM-L12-v2",
    "all-minilm:33m": "all-MiniLM-L12-v2",
    "nomic-embed-text": "nomic-embed-text-v1.5",
    "nomic-embed-text:v1.5": "nomic-embed-text-v1.5",
    "mxbai-embed-large": "mxbai-embed-large-v1",
    "mxbai-embed-large:335m": "mxbai-embed-large-v1",
    "bge-m3": "bge-m3",
    "bge-m3:567m": "bge-m3",
}
#: /api/ps's ``expires_at`` of a model kept loaded (no idle unload).
NEVER = "9999-12-31T23:59:59Z"
#: Ollama's message for truncate=false and an input longer than the model's window.
TOO_LONG = "the input length exceeds the context length"


class Listed(Protocol):
    """A served model as /api/tags and /api/ps list it (``registry.Member``: embedders and
    rerankers)."""

    settings: ServerSettings
    model: ResolvedModel
    runtime: Runtime
    kind: str

    @property
    def names(self) -> tuple[str, ...]: ...

    @property
    def state(self) -> str: ...


class OllamaContext(ServerContext, Protocol):
    """What the Ollama routes need of the app beyond a dialect's (``app._App`` has it)."""

    def members(self) -> Sequence[Listed]:
        """Every served model: the embedders, then the rerankers."""
        ...

    def expires_in(self, member: Any) -> float:
        """Seconds until the idle ``member`` is unloaded (inf: not for idleness)."""
        ...


def _render_error(err: ApiError) -> Response:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


register_dialect("ollama", _render_error, prefixes=("/api/",))


_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def keep_alive_s(value: Any) -> float | None:
    """Ollama's ``keep_alive`` in seconds (None: not given; ``inf``: forever): a number of
    seconds, or a Go duration string (``"5m"``, ``"1h30m"``, ``"-1"`` is refused by Go and by
    Ollama, ``"-1m"`` means forever); a 400 as Ollama's for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _bad(f"json: keep_alive: Unsupported type: '{type_name(value)}'")
    if not isinstance(value, str):
        return math.inf if value < 0 else float(value)
    text = value.strip()
    sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    if rest == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(rest):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if not rest or pos != len(rest):
        raise _bad(f'time: invalid duration "{value}"')
    return math.inf if sign < 0 else total


def _canonical(name: str) -> str:
    """A model name without Ollama's default tag, Ollama's library names mapped to
    embedpool's (``nomic-embed-text`` -> ``nomic-embed-text-v1.5``)."""
    bare = name.removesuffix(DEFAULT_TAG)
    return OLLAMA_NAMES.get(bare.lower(), bare)


def _bad(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_value")


class OllamaRoutes:
    """The handlers, over the app's state (auth is the app's dependency on every route)."""

    def __init__(self, ctx: OllamaContext) -> None:
        self.ctx = ctx
        self._facts: dict[str, ModelFacts] = {}

    def facts(self, model: ModelContext | Listed | None = None) -> ModelFacts:
        """A served model's facts (the default's), read once."""
        m = model if model is not None else self.ctx
        key = m.names[0] if hasattr(m, "names") else m.served.names[0]
        if key not in self._facts:
            self._facts[key] = model_facts(m.model, m.settings.precision)
        return self._facts[key]

    # ------------------------------------------------------------ parsing
    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await read_body(request, self.ctx.settings.max_request_bytes)
        if not raw.strip():
            raise _bad("missing request body")
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise _bad(f"the request body must be a JSON object, got {type_name(body)}")
        for field in ("options",):
            if body.get(field) is not None and not isinstance(body[field], dict):
                raise _bad(f"'{field}' must be an object, got {type_name(body[field])}")
        keep_alive_s(body.get("keep_alive"))  # checked as Ollama checks it, on every route
        return body

    def _model(self, body: dict[str, Any], field: str = "model") -> tuple[str, ModelContext]:
        """The model name as the request gave it (echoed back) and the served model it
        names (none: the default); 404 if not served."""
        name = body.get(field)
        if name is None or name == "":
            return self.ctx.served.names[0], self._default()
        if not isinstance(name, str):
            raise _bad(f"'{field}' must be a string, got {type_name(name)}")
        found = self.ctx.model_context(_canonical(name))
        if found is None:
            raise ApiError(404, f"model '{name}' not found", param="model", code="model_not_found")
        return name, found

    def _default(self) -> ModelContext:
        found = self.ctx.model_context(None)
        assert found is not None
        return found

    def _texts(self, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            check_text([value], "input", single=True)
            return [value] if value else []
        if not isinstance(value, list):
            raise _bad(
                f"invalid input type: 'input' must be a string or an array of "
                f"strings, got {type_name(value)}"
            )
        limit = self.ctx.settings.max_items_per_request
        if len(value) > limit:
            raise _bad(
                f"'input' has {len(value)} items; this server accepts at most {limit} "
                "per request: split it into several requests"
            )
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _bad(
                    f"invalid input type: input[{i}] must be a string, got {type_name(item)}"
                )
        check_text(value, "input")
        return list(value)

    @staticmethod
    def _check_lengths(ctx: ModelContext, texts: Sequence[str], prompt: str) -> None:
        """truncate=false: 400 for an input longer than the model's window (Ollama's rule)."""
        tokenizer = ctx.service.tokenizer
        for i, n in enumerate(tokenizer.count(texts, prompt=prompt)):
            if n > tokenizer.max_length:
                raise _bad(
                    f"{TOO_LONG}: input[{i}] is {n} tokens, the model's context length "
                    f"is {tokenizer.max_length} (send truncate: true to cut it)"
                )

    # ------------------------------------------------------------ embeddings
    async def embed(self, request: Request) -> Response:
        start = time.perf_counter_ns()
        body = await self._body(request)
        model, ctx = self._model(body)
        texts = self._texts(body.get("input"))
        truncate = body.get("truncate")
        if truncate is not None and not isinstance(truncate, bool):
            raise _bad(f"'truncate' must be a boolean, got {type_name(truncate)}")
        dims = body.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
            raise _bad(f"'dimensions' must be an integer, got {type_name(dims)}")
        service = ctx.service
        opts = service.options(EmbeddingCall([], model, "float", dimensions=dims or None))
        loaded = time.perf_counter_ns()
        if not texts:
            return JSONResponse({"model": model, "embeddings": []})
        if truncate is False:
            self._check_lengths(ctx, texts, opts.prompt)
        done = await service.embed(texts, opts, keep_alive_s=keep_alive_s(body.get("keep_alive")))
        vectors = done.vectors if ctx.model.normalize else l2_normalize(done.vectors)
        answer = {
            "model": model,
            "embeddings": vectors.tolist(),
            "total_duration": time.perf_counter_ns() - start,
            "load_duration": loaded - start,
            "prompt_eval_count": done.tokens,
        }
        return await json_body(answer, vectors.size, headers=truncation_headers(done.truncated))

    async def embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        model, ctx = self._model(body)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise _bad(f"'prompt' must be a string, got {type_name(prompt)}")
        if not prompt:
            return JSONResponse({"embedding": []})
        check_text([prompt], "prompt", single=True)
        service = ctx.service
        done = await service.embed(
            [prompt],
            service.options(EmbeddingCall([], model, "float")),
            keep_alive_s=keep_alive_s(body.get("keep_alive")),
        )
        return await json_body(
            {"embedding": done.vectors[0].tolist()},
            done.vectors.size,
            headers=truncation_headers(done.truncated),
        )

    # ------------------------------------------------------------ models
    def _details(self, m: ModelContext | Listed) -> dict[str, Any]:
        f = self.facts(m)
        return {
            "parent_model": "",
            "format": "onnx",
            "family": f.family,
            "families": [f.family],
            "parameter_size": parameter_size(f.parameters),
            "quantization_level": f.dtype.upper(),
        }

    def _listing(self, m: Listed) -> dict[str, Any]:
        name = m.names[0] + DEFAULT_TAG
        f = self.facts(m)
        return {
            "name": name,
            "model": name,
            "size": f.size_bytes,
            "digest": f.digest,
            "details": self._details(m),
            "state": m.state,
        }

    @staticmethod
    def _started(m: ModelContext | Listed) -> str:
        return datetime.fromtimestamp(m.runtime.started, UTC).isoformat()

    async def tags(self) -> Response:
        return JSONResponse(
            {
                "models": [
                    {**self._listing(m), "modified_at": self._started(m)}
                    for m in self.ctx.members()
                ]
            }
        )

    def _expires_at(self, m: Listed) -> str:
        left = self.ctx.expires_in(m)
        if math.isinf(left):
            return NEVER
        return datetime.fromtimestamp(time.time() + left, UTC).isoformat()

    async def ps(self) -> Response:
        """The loaded (and loading) models, with when each is unloaded if left idle."""
        models = [
            {
                **self._listing(m),
                "expires_at": self._expires_at(m),
                "size_vram": 0,
                "context_length": self.facts(m).max_length,
            }
            for m in self.ctx.members()
            if m.state in ("loaded", "loading")
        ]
        return JSONResponse({"models": models})

    async def show(self, request: Request) -> Response:
        body = await self._body(request)
        if not body.get("model") and not body.get("name"):
            raise _bad("model is required")
        _, m = self._model(body, "model" if body.get("model") else "name")
        f = self.facts(m)
        info: dict[str, Any] = {
            "general.architecture": f.family,
            "general.basename": f.name,
            f"{f.family}.embedding_length": f.dim,
            f"{f.family}.context_length": f.max_length,
            f"{f.family}.pooling_type": f.pooling,
        }
        if f.parameters is not None:
            info["general.parameter_count"] = f.parameters
        return JSONResponse(
            {
                "license": "",
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": self._details(m),
                "model_info": info,
                "capabilities": ["embedding"],
                "modified_at": self._started(m),
            }
        )

    async def version(self) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION, "embedpool": embedpool.__version__})


def register_ollama(app: FastAPI, ctx: OllamaContext, dependencies: Sequence[Any]) -> None:
    """Add the Ollama routes (``dependencies``: the app's auth), out of /openapi.json."""
    r = OllamaRoutes(ctx)
    deps = list(dependencies)
    for path, handler, methods in (
        ("/api/embed", r.embed, ["POST"]),
        ("/api/embeddings", r.embeddings, ["POST"]),
        ("/api/show", r.show, ["POST"]),
        ("/api/tags", r.tags, ["GET", "HEAD"]),
        ("/api/ps", r.ps, ["GET"]),
        ("/api/version", r.version, ["GET", "HEAD"]),
    ):
        app.add_api_route(
            path, handler, methods=methods, dependencies=deps, include_in_schema=False
        )
