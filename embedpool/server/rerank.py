"""Rerank on the server: ``POST /v1/rerank``, ``/v2/rerank`` and ``/rerank`` in the shape
Cohere, Jina, vLLM and llama.cpp share, and TEI's ``/rerank`` (also what TEI's ``POST /``
hands over), from the cross-encoders served beside the embedding models (``serve
--reranker``), each a member of the model registry (registry.py: loaded, unloaded and planned
in the server's one memory budget like an embedding model; every scoring runs inside its
``use``).

Shapes (told apart on ``/rerank`` by ``texts``, TEI's, against ``documents``):

* Cohere / Jina / vLLM: ``{model?, query, documents: [str | {"text": str}], top_n?,
  return_documents?}`` -> ``{id, model, results: [{index, relevance_score, document?:
  {text}}], usage: {total_tokens}, meta: {api_version, billed_units, tokens, warnings}}``,
  best first. ``return_documents`` defaults to false on ``/v2/rerank`` (Cohere v2) and true
  elsewhere (Cohere v1, Jina, vLLM). Errors ``{"message", "type", "code"}`` (Cohere reads
  ``message``; vLLM's shape has the same keys).
* TEI: ``{query, texts, raw_scores?, return_text?, truncate?, truncation_direction?}`` ->
  ``[{index, score, text?}]``, best first; errors in TEI's shape (``tei.py``).

Scores are ``CrossEncoder.predict``'s (the model's activation; TEI's ``raw_scores``: the
logits). A pair longer than the window loses the end of its document, never the query
(``embedpool.rerank``), and says so: ``meta.warnings`` and the ``X-Embedpool-Truncated``
headers; TEI's ``truncate: false`` makes it a 422 instead.

The path a pair takes is the embeddings': the same key, body and item limits, a
``MicroBatcher`` (token-budget batches across requests, admission by queued tokens: 429 +
``Retry-After``) over the reranker's own executor (``placement.start_executor``), the vector
cache keyed by query and document, the request metrics.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from embedpool.errors import InputError, ItemFailed, PoolUnavailable
from embedpool.metrics import ServerMetrics
from embedpool.microbatcher import MicroBatcher, SubmitExecutor
from embedpool.models import ResolvedModel, find_known
from embedpool.rerank import EncodedPairs, PairCache, PairTokenizer, activate, check_reranker
from embedpool.server.dialects import read_body, register_dialect, use_dialect
from embedpool.server.openai import (
    ApiError,
    bad_request,
    parse_json,
    truncation_headers,
    type_name,
)
from embedpool.server.service import INLINE_TOKENIZE_CHARS, Runtime, admit, pool_unavailable
from embedpool.server.settings import ServerSettings
from embedpool.types import Precision

#: The rerank routes (request metrics count them by name).
ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank")


def _render_error(err: ApiError) -> Response:
    return JSONResponse(
        {"message": err.message, "type": err.type, "code": err.code},
        status_code=err.status,
        headers=err.headers,
    )


register_dialect("rerank", _render_error, paths=ROUTES)


@dataclass(frozen=True)
class RerankerSetup:
    """What ``serve --reranker`` hands the app: the model, how to start its executor (when
    the server starts), and its cache (None: none)."""

    model: ResolvedModel
    factory: Callable[[], SubmitExecutor]
    cache: PairCache | None = None
    #: Names clients may send as ``model`` besides the model's own.
    aliases: tuple[str, ...] = ()
    #: Its planned memory (None: one worker's estimate, ``registry.planned_bytes``).
    planned_bytes: int | None = None
    #: The precision its placement chose (None: the server's).
    precision: Precision | None = None


@dataclass(frozen=True)
class Scored:
    """One request's logits (input order), tokens fed, and the documents that were cut."""

    logits: np.ndarray
    tokens: int
    truncated: list[int]


class RerankService:
    """Scores a query against documents through the reranker's batcher (and cache)."""

    def __init__(
        self, settings: ServerSettings, setup: RerankerSetup, metrics: ServerMetrics
    ) -> None:
        check_reranker(setup.model)
        assert setup.model.classifier is not None
        self.settings = settings
        self.setup = setup
        self.model = setup.model
        self.classifier = setup.model.classifier
        self.tokenizer = PairTokenizer.for_model(setup.model)
        self.metrics = metrics
        #: Its member's runtime in the registry (registry.RerankerSlot sets it).
        self.runtime = Runtime()
        #: What every scoring runs inside (registry.ModelRegistry.use: the model loaded and
        #: counted in flight); None: the runtime as it is.
        self.guard: Callable[[], AbstractAsyncContextManager[None]] | None = None
        known = find_known(setup.model.name)
        names = [
            setup.model.name,
            *setup.aliases,
            *((known.name, known.hub_id) if known is not None else ()),
        ]
        self.names = tuple(dict.fromkeys(n for n in names if n))

    # ------------------------------------------------------------ scoring
    def check_model(self, name: Any) -> None:
        """404 when a request names a model this server does not rerank with."""
        if name is None:
            return
        if not isinstance(name, str):
            raise bad_request(f"model must be a string, got {type_name(name)}", "model")
        if name not in self.names:
            raise ApiError(
                404,
                f"the model {name!r} is not served for rerank; this server "
                f"reranks with {', '.join(repr(n) for n in self.names)}",
                param="model",
                code="model_not_found",
            )

    def encode(self, query: str, documents: list[str]) -> EncodedPairs:
        try:
            return self.tokenizer.encode([(query, d) for d in documents])
        except InputError as exc:
            raise bad_request(str(exc), "query", "query_too_long") from None

    async def score(self, query: str, documents: list[str], *, truncate: bool = True) -> Scored:
        """The documents' logits against ``query`` (n, num_labels); ``truncate=False``: a 422
        naming the first pair longer than the window instead of cutting it."""
        if self.guard is None:
            return await self._score(query, documents, truncate)
        async with self.guard():
            return await self._score(query, documents, truncate)

    async def _score(self, query: str, documents: list[str], truncate: bool) -> Scored:
        batcher = self.runtime.running_batcher()
        chars = len(query) * len(documents) + sum(len(d) for d in documents)
        enc = (
            self.encode(query, documents)
            if chars <= INLINE_TOKENIZE_CHARS
            else await run_in_threadpool(self.encode, query, documents)
        )
        truncated = [i for i, t in enumerate(enc.truncated) if t]
        if truncated and not truncate:
            i = truncated[0]
            raise ApiError(
                422,
                f"the query with document {i} is {enc.n_tokens[i]} tokens; the "
                f"model's window is {self.tokenizer.max_length} (truncate: true "
                "cuts the document's end)",
                param=f"texts[{i}]",
                code="too_long",
            )
        self.metrics.truncated_items.inc(len(truncated))
        out = np.zeros((len(documents), self.classifier.num_labels), dtype=np.float32)
        todo = list(range(len(documents)))
        cache = self.setup.cache
        if cache is not None and documents:
            cached = await run_in_threadpool(cache.get_many, query, documents)
            todo = [i for i, v in enumerate(cached) if v is None]
            for i, v in enumerate(cached):
                if v is not None:
                    out[i] = v
            self.metrics.cache_hits.inc(len(documents) - len(todo))
            self.metrics.cache_misses.inc(len(todo))
        if todo:
            logits = await self._run(batcher, enc, todo)
            out[todo] = logits
            if cache is not None:
                await run_in_threadpool(cache.put_many, query, [documents[i] for i in todo], logits)
        tokens = sum(len(s) for s in enc.sequences)
        self.metrics.reranked_pairs.inc(len(documents))
        self.metrics.reranked_tokens.inc(tokens)
        return Scored(out, tokens, truncated)

    async def _run(self, batcher: MicroBatcher, enc: EncodedPairs, todo: list[int]) -> np.ndarray:
        ticket = admit(
            self.metrics,
            lambda: batcher.submit(
                [enc.sequences[i] for i in todo],
                list(range(len(todo))),
                len(todo),
                prompt_lengths=[enc.segments[i] for i in todo]
                if self.classifier.token_types
                else None,
            ),
        )
        timeout = self.settings.request_timeout_s
        try:
            rows = await asyncio.wait_for(asyncio.wrap_future(ticket.future), timeout)
        except TimeoutError:
            raise ApiError(
                503,
                f"rerank did not finish within {timeout:g} s",
                type="server_error",
                code="timeout",
            ) from None
        except ItemFailed as exc:
            index = todo[exc.index]
            raise ApiError(
                422,
                f"documents[{index}] could not be scored: {exc.reason}",
                param=f"documents[{index}]",
                code="input_failed",
            ) from None
        except PoolUnavailable as exc:
            raise pool_unavailable(exc) from None
        return np.asarray(rows, dtype=np.float32)


# ----------------------------------------------------------------------------- parsing
def _query(body: dict[str, Any]) -> str:
    query = body.get("query")
    if query is None:
        raise bad_request(
            "query is required: the text the documents are ranked against", "query", "missing_field"
        )
    if not isinstance(query, str):
        raise bad_request(f"query must be a string, got {type_name(query)}", "query")
    return query


def _flag(body: dict[str, Any], field: str, default: bool) -> bool:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{field} must be true or false, got {type_name(value)}", field)
    return value


def _documents(value: Any, field: str, max_items: int, *, objects: bool) -> list[str]:
    """Strings (or ``{"text": str}`` objects where ``objects``), each named by its index
    when it is not one."""
    if value is None:
        raise bad_request(f"{field} is required: the texts to rank", field, "missing_field")
    if not isinstance(value, list):
        raise bad_request(f"{field} must be an array of strings, got {type_name(value)}", field)
    if len(value) > max_items:
        raise bad_request(
            f"{field} has {len(value)} items; at most {max_items} per request",
            field,
            "too_many_inputs",
        )
    out: list[str] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(item)
        elif objects and isinstance(item, dict) and isinstance(item.get("text"), str):
            out.append(item["text"])
        else:
            shape = 'a string or {"text": string}' if objects else "a string"
            raise bad_request(
                f"{field}[{i}] must be {shape}, got {type_name(item)}", f"{field}[{i}]"
            )
    return out


def _top_n(body: dict[str, Any], field: str = "top_n") -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{field} must be a positive integer, got {value!r}"[:200], field)
    return value


def best_first(scores: np.ndarray, top_n: int | None = None) -> list[int]:
    """Indices by descending score, ties in input order, at most ``top_n``."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[:top_n]]


# ----------------------------------------------------------------------------- routes
class RerankRoutes:
    """The handlers; ``tei.register_rerank`` gets :meth:`tei_body` for TEI's ``POST /``."""

    def __init__(
        self, settings: ServerSettings, service: RerankService, more: Sequence[RerankService] = ()
    ) -> None:
        self.settings = settings
        self.service = service
        #: ``serve --reranker A --reranker B``: every reranker; a request picks one by its
        #: ``model`` (none: the first).
        self.services = [service, *more]

    def pick(self, name: Any) -> RerankService:
        """The reranker a request's ``model`` names (None: the first); 404 listing every
        reranker's names otherwise."""
        if isinstance(name, str):
            for svc in self.services:
                if name in svc.names:
                    return svc
            if len(self.services) > 1:
                names = [n for svc in self.services for n in svc.names]
                raise ApiError(
                    404,
                    f"the model {name!r} is not served for rerank; this "
                    f"server reranks with {', '.join(repr(n) for n in names)}",
                    param="model",
                    code="model_not_found",
                )
        self.service.check_model(name)
        return self.service

    async def _body(self, request: Request) -> dict[str, Any]:
        body = parse_json(await read_body(request, self.settings.max_request_bytes))
        if not isinstance(body, dict):
            raise bad_request(
                f"the request body must be a JSON object, got {type_name(body)}", None
            )
        return body

    async def v1(self, request: Request) -> Response:
        return await self._cohere(await self._body(request), return_documents=True)

    async def v2(self, request: Request) -> Response:
        return await self._cohere(await self._body(request), return_documents=False, version="2")

    async def any_shape(self, request: Request) -> Response:
        """``/rerank``: TEI's body (``texts``) or Cohere's (``documents``)."""
        body = await self._body(request)
        if "texts" in body and "documents" not in body:
            return await self.tei_body(request, body)
        return await self._cohere(body, return_documents=True)

    async def _cohere(
        self, body: dict[str, Any], *, return_documents: bool, version: str = "1"
    ) -> Response:
        svc = self.pick(body.get("model"))
        query = _query(body)
        documents = _documents(
            body.get("documents"), "documents", self.settings.max_items_per_request, objects=True
        )
        top_n = _top_n(body)
        give_docs = _flag(body, "return_documents", return_documents)
        per_doc = body.get("max_tokens_per_doc")
        if per_doc is not None and (
            isinstance(per_doc, bool)
            or not isinstance(per_doc, int)
            or per_doc < svc.tokenizer.max_length
        ):
            raise bad_request(
                f"max_tokens_per_doc {per_doc!r} is below the model's window of "
                f"{svc.tokenizer.max_length} tokens; embedpool cuts documents to "
                "the window only",
                "max_tokens_per_doc",
                "unsupported_value",
            )
        if body.get("relevant_spans"):
            raise bad_request(
                "relevant_spans: embedpool scores whole documents, it finds no spans",
                "relevant_spans",
                "unsupported_value",
            )
        scored = await svc.score(query, documents)
        scores = activate(scored.logits[:, 0], svc.classifier.activation)
        results = []
        for i in best_first(scores, top_n):
            item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if give_docs:
                item["document"] = {"text": documents[i]}
            results.append(item)
        warnings = (
            [
                f"documents {', '.join(map(str, scored.truncated[:20]))}"
                f"{' and more' if len(scored.truncated) > 20 else ''} were cut to the "
                f"model's window of {svc.tokenizer.max_length} tokens (the query is never "
                "cut)"
            ]
            if scored.truncated
            else []
        )
        answer = {
            "id": str(uuid.uuid4()),
            "model": svc.names[0],
            "results": results,
            "usage": {"total_tokens": scored.tokens},
            "meta": {
                "api_version": {"version": version},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": scored.tokens},
                "warnings": warnings,
            },
        }
        return JSONResponse(answer, headers=truncation_headers(scored.truncated))

    async def tei_body(self, request: Request, body: dict[str, Any]) -> Response:
        """TEI's rerank: ``[{index, score, text?}]`` best first, errors in TEI's shape."""
        use_dialect(request, "tei")
        svc = self.service
        query = _query(body)
        texts = _documents(
            body.get("texts"), "texts", self.settings.max_items_per_request, objects=False
        )
        if not texts:
            raise ApiError(400, "`texts` cannot be empty", code="empty")
        raw = _flag(body, "raw_scores", False)
        give_text = _flag(body, "return_text", False)
        truncate = _flag(body, "truncate", True)
        direction = body.get("truncation_direction", "right")
        if not isinstance(direction, str) or direction.lower() != "right":
            raise ApiError(
                422,
                f"truncation_direction {direction!r}: embedpool cuts the end "
                "of the document (right)",
                param="truncation_direction",
            )
        scored = await svc.score(query, texts, truncate=truncate)
        scores = activate(scored.logits[:, 0], "identity" if raw else svc.classifier.activation)
        out: list[dict[str, Any]] = []
        for i in best_first(scores):
            item: dict[str, Any] = {"index": i, "score": float(scores[i])}
            if give_text:
                item["text"] = texts[i]
            out.append(item)
        return JSONResponse(out, headers=truncation_headers(scored.truncated))


def register_rerank_routes(
    app: FastAPI,
    service: RerankService,
    settings: ServerSettings,
    dependencies: Sequence[Any],
    more: Sequence[RerankService] = (),
) -> None:
    """Add the rerank routes (``dependencies``: the app's auth; ``more``: rerankers beside
    ``service``, picked by the request's ``model``); TEI's ``POST /`` of this app hands its
    rerank bodies to them (``tei_root``)."""
    r = RerankRoutes(settings, service, more)
    deps = list(dependencies)
    for path, handler in (("/v1/rerank", r.v1), ("/v2/rerank", r.v2), ("/rerank", r.any_shape)):
        app.add_api_route(
            path,
            handler,
            methods=["POST"],
            dependencies=deps,
            summary="Rerank documents against a query",
            include_in_schema=True,
        )
    app.state.rerank_routes = r


async def tei_root(request: Request, body: dict[str, Any]) -> Response:
    """TEI's ``POST /`` with a rerank body: the rerank routes of the app it reached (one
    process may hold several apps, e.g. tests), or TEI's 422 when that app has no reranker."""
    routes = getattr(request.app.state, "rerank_routes", None)
    if not isinstance(routes, RerankRoutes):
        use_dialect(request, "tei")
        raise ApiError(
            422,
            "this body is a rerank (`query`, `texts`), and this server serves "
            "no reranker (start it with serve --reranker)",
            code="no_reranker",
        )
    return await routes.tei_body(request, body)


def _register_tei_root() -> None:
    from embedpool.server.tei import register_rerank

    register_rerank(tei_root)


_register_tei_root()
