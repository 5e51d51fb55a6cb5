"""The embedding path behind ``POST /v1/embeddings``: tokenise, ask the cache, admit into the
micro-batcher's queue, await the vectors, and map every failure to its HTTP answer.

::

    texts -> tokenise (on a thread above INLINE_TOKENIZE_CHARS), the call's prompt in front
          -> cache.get_many          hits fill their rows; only misses go on (keyed by the
                                     text and its prompt)
          -> MicroBatcher.submit     QueueFull -> 429 + Retry-After, PoolUnavailable -> 503
          -> await the future        timeout -> 503, ItemFailed -> 422 naming the input
          -> cache.put_many          the misses' vectors (whole)
          -> dimensions              the first N values, normalised again (Matryoshka)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from fastapi.concurrency import run_in_threadpool

from embedpool.batcher import MicroBatcher, SubmitExecutor, Ticket
from embedpool.errors import ItemFailed, PoolUnavailable, QueueFull
from embedpool.metrics import ServerMetrics
from embedpool.options import CallOptions, OptionError, resolve_options
from embedpool.server.openai import ApiError, EmbeddingCall, ServedModel, bad_request
from embedpool.server.settings import ServerSettings
from embedpool.tokenization import Encoded, TextTokenizer
from embedpool.types import Vectors

#: Requests with more characters than this are tokenised on a thread, not on the event loop:
#: below it, tokenising (~50 us) costs less than the thread hop.
INLINE_TOKENIZE_CHARS = 4096


class VectorCacheHook(Protocol):
    """What the server needs from a vector cache (``cache.BoundCache``).

    Keys are the input texts; the cache itself is bound to the model fingerprint.
    """

    def get_many(self, texts: Sequence[str], prompt: str = "") -> list[Vectors | None]: ...

    def put_many(self, texts: Sequence[str], vectors: Vectors, prompt: str = "") -> None: ...


@dataclass
class Runtime:
    """What the lifespan starts; None before startup and after shutdown."""

    executor: SubmitExecutor | None = None
    batcher: MicroBatcher | None = None
    started: float = field(default_factory=time.time)
    #: Why the executor could not be built (run_server raises it after uvicorn gives up).
    startup_error: BaseException | None = None

    def running_batcher(self) -> MicroBatcher:
        """The batcher, or a 503 while the server starts or stops."""
        if self.batcher is None:
            raise ApiError(503, "the server is starting or shutting down", type="server_error",
                           code="not_ready", headers={"Retry-After": "1"})
        return self.batcher


@dataclass(frozen=True)
class Embedded:
    """One request's answer: vectors in input order, tokens fed, truncated input indices."""

    vectors: Vectors
    tokens: int
    truncated: list[int]


def pool_unavailable(exc: PoolUnavailable) -> ApiError:
    return ApiError(503, str(exc), type="server_error", code="pool_unavailable",
                    headers={"Retry-After": "5"})


class EmbeddingService:
    """Embeds validated texts through the runtime's batcher (and the cache, when there is one)."""

    def __init__(self, settings: ServerSettings, tokenizer: TextTokenizer, served: ServedModel,
                 runtime: Runtime, metrics: ServerMetrics,
                 cache: VectorCacheHook | None) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.served = served
        self.runtime = runtime
        self.metrics = metrics
        self.cache = cache

    def options(self, call: EmbeddingCall | None = None) -> CallOptions:
        """The request's prompt and dimensions checked against the model (None: the model's
        default prompt, whole vectors); a 400 naming the field otherwise."""
        s = self.served
        try:
            return resolve_options(
                self.tokenizer, model=s.names[0], width=s.dim, matryoshka=s.matryoshka,
                normalize=s.normalize, prompt_name=call.prompt_name if call else None,
                input_type=call.input_type if call else None,
                dimensions=call.dimensions if call else None)
        except OptionError as exc:
            code = "unsupported_value" if exc.param == "dimensions" else "invalid_value"
            raise bad_request(str(exc), exc.param, code) from None

    def tokenize(self, texts: list[str], prompt: str = "") -> Encoded:
        return self.tokenizer.encode(texts, self.settings.long_text, prompt=prompt)

    async def embed(self, texts: list[str], options: CallOptions | None = None) -> Embedded:
        opts = options if options is not None else self.options()
        batcher = self.runtime.running_batcher()
        chars = sum(len(t) for t in texts)
        enc = (self.tokenize(texts, opts.prompt) if chars <= INLINE_TOKENIZE_CHARS
               else await run_in_threadpool(self.tokenize, texts, opts.prompt))
        tokens = sum(len(s) for s in enc.sequences)
        truncated = [i for i, t in enumerate(enc.truncated) if t]
        self.metrics.truncated_items.inc(len(truncated))
        out = np.empty((len(texts), self.served.dim), dtype=np.float32)
        todo = await self._from_cache(texts, out, opts.prompt)
        if todo:
            ticket = self._admit(batcher, enc, todo)
            vectors = await self._wait(ticket, todo)
            out[todo] = vectors
            if self.cache is not None:
                await run_in_threadpool(self.cache.put_many, [texts[i] for i in todo], vectors,
                                        opts.prompt)
        self.metrics.embedded_items.inc(len(texts))
        self.metrics.embedded_tokens.inc(tokens)
        return Embedded(opts.shape(out), tokens, truncated)

    async def _from_cache(self, texts: list[str], out: Vectors, prompt: str) -> list[int]:
        """Fill ``out``'s rows the cache knows; return the indices still to embed."""
        if self.cache is None:
            return list(range(len(texts)))
        cached = await run_in_threadpool(self.cache.get_many, texts, prompt)
        todo = []
        for i, vector in enumerate(cached):
            if vector is None:
                todo.append(i)
            else:
                out[i] = vector
        self.metrics.cache_hits.inc(len(texts) - len(todo))
        self.metrics.cache_misses.inc(len(todo))
        return todo

    def _admit(self, batcher: MicroBatcher, enc: Encoded, todo: list[int]) -> Ticket:
        """Queue the sequences of the items in ``todo`` (their windows too), or refuse."""
        where = {item: k for k, item in enumerate(todo)}
        rows = [j for j, o in enumerate(enc.owner) if o in where]
        try:
            return batcher.submit([enc.sequences[j] for j in rows],
                                  [where[enc.owner[j]] for j in rows], len(todo),
                                  enc.prompt_length)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except PoolUnavailable as exc:
            self.metrics.rejected.labels("pool_unavailable").inc()
            raise pool_unavailable(exc) from None

    async def _wait(self, ticket: Ticket, todo: list[int]) -> Vectors:
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ticket.future), timeout)
        except TimeoutError:
            raise ApiError(503, f"embedding did not finish within {timeout:g} s",
                           type="server_error", code="timeout") from None
        except ItemFailed as exc:
            index = todo[exc.index]
            raise ApiError(422, f"input[{index}] could not be embedded: {exc.reason}",
                           param=f"input[{index}]", code="input_failed") from None
        except PoolUnavailable as exc:
            raise pool_unavailable(exc) from None
