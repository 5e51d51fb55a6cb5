"""TEI's API (Hugging Face text-embeddings-inference) on the embedpool server: ``POST /``,
``/embed``, ``/similarity``, ``/tokenize``, ``/decode``, ``GET /info``, so that
``huggingface_hub.InferenceClient(base_url=...)`` (``feature_extraction``,
``sentence_similarity``), LangChain's ``HuggingFaceEndpointEmbeddings`` and LlamaIndex's
``TextEmbeddingsInference`` work unchanged. ``/rerank`` lives with the rerankers
(``rerank.py``); ``POST /`` hands it TEI's rerank bodies (:func:`register_rerank`).

Shapes and codes follow TEI's router (``router/src/http/server.rs``, ``types.rs``):

* errors are ``{"error": "<message>", "error_type": "<kind>"}``: 400 ``Empty`` (no inputs),
  422 ``Validation`` (a bad field, too many inputs, too long with ``truncate: false``), 422
  ``Tokenizer``, 413 (body limit), 424 ``Backend`` (an input the model failed on), 429
  ``Overloaded`` (+ Retry-After), 503 ``Unhealthy``; 401 ``Unauthorized`` (TEI answers it
  with no body);
* ``GET /`` is TEI's health check (and answers Ollama's "is it running" probe): 200, or 503
  ``Unhealthy``; open like ``/health``;
* ``POST /`` dispatches by the body: ``{"inputs": {"source_sentence", "sentences"}}`` is a
  similarity (what ``sentence_similarity`` posts), ``{"query", "texts"}`` a rerank, anything
  else an embedding (what ``feature_extraction`` posts);
* ``inputs``: a string or a list of strings; token-id inputs are refused (422), as on the
  OpenAI route; ``truncate``: omitted or true -> the server's ``--long-text`` mode (cut or
  windows; TEI's ``auto_truncate``, which ``/info`` reports true), false -> 422 for an input longer than the
  model's window; ``truncation_direction`` ``right`` only (422 for ``left``);
  ``normalize`` (default true) L2-normalises; false returns the model's own vectors
  (normalised anyway when the model ends in a Normalize module, as sentence-transformers
  returns them); ``prompt_name`` and ``dimensions`` as on every route;
* ``/tokenize``: every token of ``prompt + text`` (not truncated) with its id, text,
  ``special`` and ``start``/``stop`` as UTF-8 byte offsets into ``prompt + text`` (null for
  special tokens), TEI's convention; the model's default prompt applies when no
  ``prompt_name`` is given, as when embedding;
* ``/embed_all``, ``/embed_sparse``, ``/predict`` are refused with 422 naming the route
  (embedpool's engines return pooled vectors, and it serves no classifier).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from tokenizers import Encoding

import embedpool
from embedpool.options import CallOptions
from embedpool.server.dialects import (
    ModelFacts,
    ServerContext,
    check_text,
    json_body,
    model_facts,
    read_body,
    register_dialect,
    use_dialect,
)
from embedpool.server.openai import (
    ApiError,
    EmbeddingCall,
    parse_json,
    truncation_headers,
    type_name,
)
from embedpool.server.service import INLINE_TOKENIZE_CHARS
from embedpool.types import Vectors
from embedpool.vectors import l2_normalize

#: Paths counted by name in the request metrics (``/`` included).
ROUTES = ("/", "/embed", "/similarity", "/tokenize", "/decode", "/info")
#: TEI routes embedpool does not serve, refused in TEI's shape (422) with the reason.
REFUSED = {
    "/embed_all": "per-token embeddings: embedpool's engines return pooled vectors only; "
    "use /embed",
    "/embed_sparse": "sparse (SPLADE) embeddings: embedpool serves dense embedders",
    "/predict": "sequence classification: embedpool serves no classifier (rerankers: /rerank)",
}
_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
#: ApiError codes of an empty batch (TEI's 400 ``Empty``).
_EMPTY = ("empty_input", "empty")
#: error_type by status, for errors raised outside this module (auth, limits, the pool).
_TYPES = {
    400: "Empty",
    401: "Unauthorized",
    404: "NotFound",
    405: "NotFound",
    413: "Validation",
    422: "Validation",
    424: "Backend",
    429: "Overloaded",
    503: "Unhealthy",
}

#: A handler of TEI's rerank body (``query``, ``texts``) posted to ``/``: the rerank routes'
#: (rerank.py registers it). Called after the key check, with the parsed body.
RerankHandler = Callable[[Request, dict[str, Any]], Awaitable[Response]]
_rerank: list[RerankHandler] = []


def register_rerank(handler: RerankHandler) -> None:
    """Let ``POST /`` hand TEI's rerank bodies to ``handler``."""
    _rerank[:] = [handler]


def _render_error(err: ApiError) -> Response:
    status = err.status
    if err.code == "input_failed":  # an input the model failed on: TEI's backend error
        status = 424
    elif status == 400 and err.code not in (*_EMPTY, "invalid_json"):
        status = 422  # TEI answers a body it cannot use with 422 Validation
    kind = (
        "Tokenizer"
        if err.code == "tokenizer"
        else "Validation"
        if status == 400 and err.code not in _EMPTY
        else _TYPES.get(status, "Validation")
    )
    return JSONResponse(
        {"error": err.message, "error_type": kind}, status_code=status, headers=err.headers
    )


register_dialect("tei", _render_error, paths=(*ROUTES, *REFUSED))


def _invalid(message: str) -> ApiError:
    return ApiError(422, message, code="invalid_value")


def _empty(what: str = "inputs") -> ApiError:
    return ApiError(400, f"`{what}` cannot be empty", code="empty_input")


class TeiRoutes:
    """The handlers, over the app's state (auth is the app's dependency on every route)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    @cached_property
    def facts(self) -> ModelFacts:
        return model_facts(self.ctx.model, self.ctx.settings.precision)

    # ------------------------------------------------------------ parsing
    async def _body(self, request: Request) -> dict[str, Any]:
        body = parse_json(await read_body(request, self.ctx.settings.max_request_bytes))
        if not isinstance(body, dict):
            raise _invalid(f"the request body must be a JSON object, got {type_name(body)}")
        return body

    def _texts(self, value: Any, field: str = "inputs") -> list[str]:
        if value is None:
            raise _invalid(f"`{field}` is required: a string or a list of strings")
        if isinstance(value, str):
            check_text([value], field, single=True)
            return [value]
        if not isinstance(value, list):
            raise _invalid(
                f"`{field}` must be a string or a list of strings, got {type_name(value)}"
            )
        if not value:
            raise _empty(field)
        limit = self.ctx.settings.max_items_per_request
        if len(value) > limit:
            raise _invalid(f"batch size {len(value)} > maximum allowed batch size {limit}")
        for i, item in enumerate(value):
            if isinstance(item, int | list) and not isinstance(item, bool):
                raise _invalid(
                    f"`{field}` holds token ids ({field}[{i}]), which embedpool "
                    "does not accept: it tokenises text itself; send the texts"
                )
            if not isinstance(item, str):
                raise _invalid(f"{field}[{i}] must be a string, got {type_name(item)}")
        check_text(value, field)
        return list(value)

    @staticmethod
    def _flag(body: dict[str, Any], field: str, default: bool | None) -> bool | None:
        value = body.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _invalid(f"`{field}` must be a boolean, got {type_name(value)}")
        return value

    @staticmethod
    def _string(body: dict[str, Any], field: str) -> str | None:
        value = body.get(field)
        if value is not None and not isinstance(value, str):
            raise _invalid(f"`{field}` must be a string, got {type_name(value)}")
        return value

    def _options(self, body: dict[str, Any], dims: Any = None) -> CallOptions:
        """The body's ``prompt_name`` and ``dimensions``, checked against the model."""
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
            raise _invalid(f"`dimensions` must be an integer, got {type_name(dims)}")
        call = EmbeddingCall(
            [],
            self.ctx.served.names[0],
            "float",
            prompt_name=self._string(body, "prompt_name"),
            dimensions=dims,
        )
        return self.ctx.service.options(call)

    def _truncation(self, body: dict[str, Any], texts: Sequence[str], prompt: str) -> None:
        """``truncation_direction`` right only; ``truncate: false``: 422 for a long input."""
        direction = self._string(body, "truncation_direction")
        if direction is not None and direction.lower() != "right":
            raise _invalid(
                f"truncation_direction {direction!r} is not supported: embedpool "
                "keeps the start of a text (right)"
            )
        if self._flag(body, "truncate", None) is False:
            tokenizer = self.ctx.service.tokenizer
            for i, n in enumerate(tokenizer.count(texts, prompt=prompt)):
                if n > tokenizer.max_length:
                    raise _invalid(
                        f"Input validation error: `inputs` must have less than "
                        f"{tokenizer.max_length} tokens. Given: {n} (inputs[{i}]; "
                        "send truncate: true to cut it)"
                    )

    # ------------------------------------------------------------ embeddings
    async def _vectors(self, body: dict[str, Any], texts: list[str]) -> tuple[Vectors, list[int]]:
        opts = self._options(body, body.get("dimensions"))
        normalize = self._flag(body, "normalize", True)
        self._truncation(body, texts, opts.prompt)
        done = await self.ctx.service.embed(texts, opts)
        vectors = done.vectors
        if normalize and not self.ctx.model.normalize:
            vectors = l2_normalize(vectors)
        return vectors, done.truncated

    async def embed(self, request: Request) -> Response:
        body = await self._body(request)
        return await self._embed(body)

    async def _embed(self, body: dict[str, Any]) -> Response:
        vectors, truncated = await self._vectors(body, self._texts(body.get("inputs")))
        return await json_body(
            vectors.tolist(), vectors.size, headers=truncation_headers(truncated)
        )

    async def similarity(self, request: Request) -> Response:
        return await self._similarity(await self._body(request))

    async def _similarity(self, body: dict[str, Any]) -> Response:
        inputs = body.get("inputs")
        if not isinstance(inputs, dict):
            raise _invalid(
                "`inputs` must be an object {source_sentence, sentences}, got "
                f"{type_name(inputs)}"
            )
        source = inputs.get("source_sentence")
        if not isinstance(source, str):
            raise _invalid(f"`inputs.source_sentence` must be a string, got {type_name(source)}")
        check_text([source], "inputs.source_sentence", single=True)
        sentences = self._texts(inputs.get("sentences"), "inputs.sentences")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise _invalid(f"`parameters` must be an object, got {type_name(params)}")
        if len(sentences) + 1 > self.ctx.settings.max_items_per_request:
            raise _invalid(
                f"batch size {len(sentences) + 1} > maximum allowed batch size "
                f"{self.ctx.settings.max_items_per_request}"
            )
        vectors, truncated = await self._vectors(
            {**params, "normalize": True}, [source, *sentences]
        )
        scores = vectors[1:] @ vectors[0]  # cosine: the vectors are unit length
        return await json_body(
            [float(s) for s in scores], len(sentences), headers=truncation_headers(truncated)
        )

    async def root(self, request: Request) -> Response:
        """TEI's ``POST /``: by the body, a similarity, a rerank or an embedding."""
        body = await self._body(request)
        if isinstance(body.get("inputs"), dict):
            return await self._similarity(body)
        if "query" in body and "texts" in body:
            if not _rerank:
                raise _invalid(
                    "this body is a rerank (`query`, `texts`), and this server serves no reranker"
                )
            use_dialect(request, "tei")
            return await _rerank[0](request, body)
        return await self._embed(body)

    # ------------------------------------------------------------ tokens
    async def tokenize(self, request: Request) -> Response:
        body = await self._body(request)
        texts = self._texts(body.get("inputs"))
        special = self._flag(body, "add_special_tokens", True)
        prompt = self._options(body).prompt
        chars = sum(len(t) for t in texts)
        args = (texts, prompt, bool(special))
        tokens = (
            _tokens(self.ctx, *args)
            if chars <= INLINE_TOKENIZE_CHARS
            else await run_in_threadpool(_tokens, self.ctx, *args)
        )
        return await json_body(tokens, sum(len(t) for t in tokens))

    async def decode(self, request: Request) -> Response:
        body = await self._body(request)
        ids = body.get("ids")
        if isinstance(ids, list) and ids and all(isinstance(i, list) for i in ids):
            batch: list[Any] = ids
        elif isinstance(ids, list) and ids:
            batch = [ids]
        else:
            raise (
                _empty("ids")
                if ids == []
                else _invalid(
                    f"`ids` must be a list of token ids or a list of such lists, got "
                    f"{type_name(ids)}"
                )
            )
        if len(batch) > self.ctx.settings.max_items_per_request:
            raise _invalid(
                f"batch size {len(batch)} > maximum allowed batch size "
                f"{self.ctx.settings.max_items_per_request}"
            )
        skip = bool(self._flag(body, "skip_special_tokens", True))
        tokenizer = self.ctx.service.tokenizer
        texts = []
        for k, row in enumerate(batch):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in row):
                raise _invalid(f"ids[{k}] must be a list of integers")
            try:
                texts.append(tokenizer.decode(row, skip_special_tokens=skip))
            except (ValueError, OverflowError) as exc:
                raise ApiError(422, f"ids[{k}]: {exc}", code="tokenizer") from None
        return JSONResponse(texts)

    # ------------------------------------------------------------ info
    async def info(self) -> Response:
        s, f = self.ctx.settings, self.facts
        return JSONResponse(
            {
                "model_id": self.ctx.served.names[0],
                "model_sha": None,
                "model_dtype": _DTYPES.get(f.dtype, f.dtype),
                "served_model_name": self.ctx.served.names[0],
                "model_type": {"embedding": {"pooling": f.pooling}},
                # full-window requests the token queue holds (embedpool admits by tokens)
                "max_concurrent_requests": max(1, s.max_queue_tokens // f.max_length),
                "max_input_length": f.max_length,
                "max_batch_tokens": s.batch_tokens,
                "max_batch_requests": s.max_batch_items,
                "max_client_batch_size": s.max_items_per_request,
                "auto_truncate": True,
                "tokenization_workers": 1,
                "version": embedpool.__version__,
                "sha": None,
                "docker_label": None,
            }
        )

    async def health(self) -> Response:
        """TEI's ``GET /`` (and Ollama's): 200 while the server can embed, else 503."""
        batcher = self.ctx.runtime.batcher
        problem = "starting" if batcher is None else batcher.health()
        if problem is not None:
            raise ApiError(
                503, f"unhealthy: {problem}", code="unhealthy", headers={"Retry-After": "1"}
            )
        return Response("embedpool is running", media_type="text/plain")

    async def refused(self, request: Request) -> Response:
        path = request.url.path
        raise _invalid(f"POST {path} is not served by embedpool ({REFUSED.get(path, '')})")


def _tokens(
    ctx: ServerContext, texts: list[str], prompt: str, add_special_tokens: bool
) -> list[list[dict[str, Any]]]:
    encodings = ctx.service.tokenizer.encodings(
        texts, prompt=prompt, add_special_tokens=add_special_tokens
    )
    return [_simple_tokens(enc, prompt + text) for enc, text in zip(encodings, texts, strict=True)]


def _simple_tokens(enc: Encoding, text: str) -> list[dict[str, Any]]:
    """TEI's SimpleToken list: offsets in UTF-8 bytes, the text of the bytes they span."""
    data = text.encode("utf-8")
    if len(data) == len(text):
        byte_at = None  # ASCII: character offsets are byte offsets
    else:
        byte_at = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
    out: list[dict[str, Any]] = []
    for tid, (start, stop), special, token in zip(
        enc.ids, enc.offsets, enc.special_tokens_mask, enc.tokens, strict=True
    ):
        if special:
            out.append({"id": tid, "text": token, "special": True, "start": None, "stop": None})
            continue
        if byte_at is not None:
            start, stop = int(byte_at[start]), int(byte_at[stop])
        out.append(
            {
                "id": tid,
                "text": data[start:stop].decode("utf-8", "replace"),
                "special": False,
                "start": start,
                "stop": stop,
            }
        )
    return out


def register_tei(app: FastAPI, ctx: ServerContext, dependencies: Sequence[Any]) -> None:
    """Add the TEI routes (``dependencies``: the app's auth), out of /openapi.json."""
    r = TeiRoutes(ctx)
    deps = list(dependencies)
    for path, handler in (
        ("/", r.root),
        ("/embed", r.embed),
        ("/similarity", r.similarity),
        ("/tokenize", r.tokenize),
        ("/decode", r.decode),
        *((p, r.refused) for p in REFUSED),
    ):
        app.add_api_route(
            path, handler, methods=["POST"], dependencies=deps, include_in_schema=False
        )
    app.add_api_route("/info", r.info, methods=["GET"], dependencies=deps, include_in_schema=False)
    # open, as /health is: probes carry no key
    app.add_api_route("/", r.health, methods=["GET", "HEAD"], include_in_schema=False)
