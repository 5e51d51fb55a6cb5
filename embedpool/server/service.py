"""The embedding path behind every dialect's embeddings route: prepare, admit into the
micro-batcher's queue, await the vectors, assemble, and map every failure to its HTTP answer.

::

    texts -> prepare.prepare         the job's prepare step: dedupe, cache lookup (keyed by
                                     the text and its prompt), tokenise, the call's prompt in
                                     front (on a thread with a cache or above
                                     INLINE_TOKENIZE_CHARS); every input tokenised for usage
          -> MicroBatcher.submit     the misses' sequences; QueueFull -> 429 + Retry-After,
                                     PoolUnavailable -> 503
          -> await the future        timeout -> 503, ItemFailed -> 422 naming the input;
                                     windows averaged by the batcher's prepare.Assembly
          -> Prepared.fill/store     the misses' vectors, written to the cache (whole)
          -> Prepared.rows           one row per input (the dedupe undone)
          -> dimensions              the first N values, normalised again (Matryoshka)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from fastapi.concurrency import run_in_threadpool

from embedpool.errors import ItemFailed, OptionError, PoolUnavailable, QueueFull
from embedpool.metrics import ServerMetrics
from embedpool.microbatcher import MicroBatcher, SubmitExecutor, Ticket
from embedpool.options import CallOptions, resolve_options
from embedpool.prepare import Prepared, VectorCacheHook, prepare
from embedpool.server.openai import ApiError, EmbeddingCall, ServedModel, bad_request
from embedpool.server.settings import ServerSettings
from embedpool.tokenization import Encoded, TextTokenizer
from embedpool.types import Vectors

__all__ = [
    "Embedded",
    "EmbeddingService",
    "Runtime",
    "VectorCacheHook",
    "admit",
    "pool_unavailable",
]

#: Requests with more characters than this are tokenised on a thread, not on the event loop:
#: below it, tokenising (~50 us) costs less than the thread hop.
INLINE_TOKENIZE_CHARS = 4096


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
            raise ApiError(
                503,
                "the server is starting or shutting down",
                type="server_error",
                code="not_ready",
                headers={"Retry-After": "1"},
            )
        return self.batcher

    async def start(
        self,
        factory: Callable[[], SubmitExecutor],
        settings: ServerSettings,
        metrics: ServerMetrics,
        *,
        normalize_windows: bool,
    ) -> None:
        """Build the executor (on a worker thread, which on_ray.py relies on: Ray leaves
        SIGTERM to uvicorn) and the micro-batcher in front of it; a build error is kept in
        ``startup_error`` and raised."""
        try:
            self.executor = await run_in_threadpool(factory)
        except Exception as exc:
            self.startup_error = exc
            raise
        s = settings
        self.batcher = MicroBatcher(
            self.executor,
            batch_tokens=s.batch_tokens,
            max_batch_items=s.max_batch_items,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue_tokens=s.max_queue_tokens,
            max_inflight=s.max_inflight_batches,
            on_batch=lambda b: metrics.batch_tokens.observe(b.padded_tokens),
            normalize_windows=normalize_windows,
        )

    async def stop_batcher(self, graceful_timeout_s: float) -> None:
        """Take no more work, wait (bounded) for what is queued, close the batcher."""
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            await run_in_threadpool(batcher.wait_idle, graceful_timeout_s)
            batcher.close()

    async def close_executor(self) -> None:
        executor, self.executor = self.executor, None
        if executor is not None:
            await run_in_threadpool(executor.close)


def admit(metrics: ServerMetrics, submit: Callable[[], Ticket]) -> Ticket:
    """``submit()`` into the micro-batcher's queue, or the refusal: 429 + Retry-After when the
    queue is full, 503 when the pool cannot take work."""
    try:
        return submit()
    except QueueFull as exc:
        metrics.rejected.labels("queue_full").inc()
        raise ApiError(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    except PoolUnavailable as exc:
        metrics.rejected.labels("pool_unavailable").inc()
        raise pool_unavailable(exc) from None


@dataclass(frozen=True)
class Embedded:
    """One request's answer: vectors in input order, tokens fed, truncated input indices."""

    vectors: Vectors
    tokens: int
    truncated: list[int]


def pool_unavailable(exc: PoolUnavailable) -> ApiError:
    return ApiError(
        503, str(exc), type="server_error", code="pool_unavailable", headers={"Retry-After": "5"}
    )


class EmbeddingService:
    """Embeds validated texts through the runtime's batcher (and the cache, when there is one)."""

    def __init__(
        self,
        settings: ServerSettings,
        tokenizer: TextTokenizer,
        served: ServedModel,
        runtime: Runtime,
        metrics: ServerMetrics,
        cache: VectorCacheHook | None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.served = served
        self.runtime = runtime
        self.metrics = metrics
        self.cache = cache
        #: What every embedding runs inside, given the request's keep-alive
        #: (registry.ModelRegistry.use: the model loaded and counted in flight); None: the
        #: runtime as it is.
        self.guard: Callable[[float | None], AbstractAsyncContextManager[None]] | None = None

    def options(self, call: EmbeddingCall | None = None) -> CallOptions:
        """The request's prompt and dimensions checked against the model (None: the model's
        default prompt, whole vectors); a 400 naming the field otherwise."""
        s = self.served
        try:
            return resolve_options(
                self.tokenizer,
                model=s.names[0],
                width=s.dim,
                matryoshka=s.matryoshka,
                normalize=s.normalize,
                prompt_name=call.prompt_name if call else None,
                input_type=call.input_type if call else None,
                dimensions=call.dimensions if call else None,
            )
        except OptionError as exc:
            code = "unsupported_value" if exc.param == "dimensions" else "invalid_value"
            raise bad_request(str(exc), exc.param, code) from None

    def tokenize(self, texts: list[str], prompt: str = "") -> Encoded:
        return self.tokenizer.encode(texts, self.settings.long_text, prompt=prompt)

    def prepare(self, texts: list[str], prompt: str = "") -> Prepared:
        """The shared prepare step (``prepare.prepare``) for one request: every input
        tokenised (its usage), only the cache's misses left to run."""
        return prepare(
            texts,
            self.tokenizer,
            self.settings.long_text,
            self.served.dim,
            prompt=prompt,
            cache=self.cache,
            tokenize_all=True,
        )

    async def embed(
        self,
        texts: list[str],
        options: CallOptions | None = None,
        *,
        keep_alive_s: float | None = None,
    ) -> Embedded:
        """The texts' vectors; ``keep_alive_s``: how long the model stays loaded idle after
        this request (Ollama's ``keep_alive``; None: the server's, registry.py)."""
        if self.guard is None:
            return await self._embed(texts, options)
        async with self.guard(keep_alive_s):
            return await self._embed(texts, options)

    async def _embed(self, texts: list[str], options: CallOptions | None) -> Embedded:
        opts = options if options is not None else self.options()
        batcher = self.runtime.running_batcher()
        chars = sum(len(t) for t in texts)
        prep = (
            self.prepare(texts, opts.prompt)
            if self.cache is None and chars <= INLINE_TOKENIZE_CHARS
            else await run_in_threadpool(self.prepare, texts, opts.prompt)
        )
        truncated = prep.truncated_inputs()
        self.metrics.truncated_items.inc(len(truncated))
        if self.cache is not None:
            hits = prep.hits()
            self.metrics.cache_hits.inc(hits)
            self.metrics.cache_misses.inc(len(texts) - hits)
        if prep.missing:
            ticket = self._admit(batcher, prep.encoded, len(prep.missing))
            prep.fill(await self._wait(ticket, prep))
            if self.cache is not None:
                await run_in_threadpool(prep.store, self.cache, range(len(prep.missing)))
        tokens = prep.input_tokens()
        self.metrics.embedded_items.inc(len(texts))
        self.metrics.embedded_tokens.inc(tokens)
        return Embedded(opts.shape(prep.rows()), tokens, truncated)

    def _admit(self, batcher: MicroBatcher, enc: Encoded, n_items: int) -> Ticket:
        """Queue the sequences of the texts still to embed (their windows too), or refuse."""
        return admit(
            self.metrics,
            lambda: batcher.submit(enc.sequences, enc.owner, n_items, enc.prompt_length),
        )

    async def _wait(self, ticket: Ticket, prep: Prepared) -> Vectors:
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ticket.future), timeout)
        except TimeoutError:
            raise ApiError(
                503,
                f"embedding did not finish within {timeout:g} s",
                type="server_error",
                code="timeout",
            ) from None
        except ItemFailed as exc:
            index = prep.first_input(prep.missing[exc.index])
            raise ApiError(
                422,
                f"input[{index}] could not be embedded: {exc.reason}",
                param=f"input[{index}]",
                code="input_failed",
            ) from None
        except PoolUnavailable as exc:
            raise pool_unavailable(exc) from None
