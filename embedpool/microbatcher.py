"""Dynamic batching across HTTP requests: many small requests in, token-budget batches out.

How a request flows::

    handler ──submit(sequences)──> MicroBatcher ── admission: queued tokens + these
      ^                              │               > max_queue_tokens ?  -> QueueFull (429)
      │                              v
      │                        pending FIFO of (request, sequence)   <- every request's sequences
      │                              │
      │              batcher thread: │ take a window (FIFO, about batch_tokens x free slots),
      │                              │ plan_batches() over it (length-sorted, padded-token budget)
      │                              v
      │                 executor.submit(WorkBatch) -> Future[BatchResult]   (any Executor)
      │                              │
      │        done callback (pool's │ thread): scatter rows into each owning request;
      │                              v  poison row -> ItemFailed, batch error -> PoolUnavailable
      └──── Future[Vectors] <── last row of a request: prepare.Assembly (the job's too:
                                  windows averaged per item by vectors.combine_windows)

Why this shape:

* One FIFO shared by all requests, cut into batches by *padded tokens* (not items), so 32
  clients sending one text each share a batch, and one client sending 2,048 texts is spread
  over every worker instead of one.
* The batcher keeps at most ``max_inflight`` batches in the executor. Everything else stays
  here, where later arrivals are still sorted together with it, and where a cancelled request
  (client gone, timeout) is dropped before costing any compute.
* Length sorting happens inside a window that is taken FIFO, so a request is never starved by
  later ones, and short texts batch with short texts.
* When the executor is idle and fewer tokens than one batch are pending, the batcher waits up
  to ``max_wait_s`` for company: a few milliseconds of latency for much fuller batches.
* Admission counts tokens, not requests, so a 429 means "the server is really behind", and
  ``Retry-After`` is the backlog divided by the recently measured throughput.
* Health (``health()``): a broken executor (``Executor.broken``, which a pool sets when no
  worker can be started, even while idle), a dead batcher thread, or no batch finished for
  ``STALL_TIMEOUT_S`` while some are in flight.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedpool.batching import plan_batches
from embedpool.budget import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_ITEMS
from embedpool.errors import ItemFailed, PoolBroken, PoolUnavailable, QueueFull
from embedpool.executor import BatchResult, Executor, WorkBatch
from embedpool.prepare import Assembly
from embedpool.types import TokenIds, Vectors

#: Gather window: how long an idle batcher waits for more requests before sending a partial
#: batch. 2 ms is below the cost of embedding one short text on a CPU (~5-10 ms) yet long
#: enough for concurrent clients' requests to meet.
DEFAULT_MAX_WAIT_S = 0.002
#: Queue limit in tokens (pending + in flight). About 1.5 minutes of work for MiniLM int8 on
#: 2 cores (~25k tokens/s): a deeper queue only turns a 429 into a client-side timeout.
DEFAULT_MAX_QUEUE_TOKENS = 2_000_000
#: Batches kept in the executor per worker: 2 lets a worker start its next batch while the
#: supervisor returns the previous result, without committing work that could still be sorted.
INFLIGHT_PER_WORKER = 2
#: Throughput for Retry-After is measured over this many recent seconds.
THROUGHPUT_WINDOW_S = 10.0
#: Retry-After bounds: at least a second (HTTP's unit), at most a minute (beyond that a client
#: should rather fail over than wait).
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 60
#: No batch finished for this long while some were in flight: the pool is hung, not slow
#: (a 2,048-token batch takes well under a second; Infinity #544 stayed "healthy" forever).
STALL_TIMEOUT_S = 120.0


#: What the batcher needs from an executor: the executor contract (``executor.Executor``).
SubmitExecutor = Executor


def stats_dict(stats: Any) -> dict[str, Any]:
    """An executor's ``stats()`` as a dict, whether it is a mapping, a dataclass or an object."""
    if stats is None:
        return {}
    if isinstance(stats, Mapping):
        return dict(stats)
    if hasattr(stats, "__dataclass_fields__"):
        return {name: getattr(stats, name) for name in stats.__dataclass_fields__}
    if hasattr(stats, "__dict__"):
        return dict(vars(stats))
    return {}


def worker_count(stats: Any) -> int:
    """Workers an executor has or aims for (``target_workers``, or ``workers`` as a count or a
    list of records); 2 when it does not say."""
    d = stats_dict(stats)
    for key in ("target_workers", "workers"):
        value = d.get(key)
        if isinstance(value, list | tuple):
            value = len(value)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 2


# ----------------------------------------------------------------------------- requests
@dataclass(eq=False)
class _Request:
    """One client request's sequences and the rows filled so far."""

    rid: int
    sequences: list[TokenIds]
    owner: list[int]
    n_items: int
    future: Future[Vectors] = field(default_factory=Future)
    prompt_length: int = 0  # of every sequence: one request has one prompt
    #: Per sequence instead (a rerank request: each pair's first segment, rerank.py).
    prompt_lengths: list[int] | None = None
    #: The rows so far, folded into one vector per input (``prepare.Assembly``).
    assembly: Assembly | None = None

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass(frozen=True)
class Ticket:
    """A handle on an admitted request: ``future`` resolves to its (n_items, dim) vectors."""

    rid: int
    future: Future[Vectors]
    tokens: int


@dataclass(frozen=True)
class BatcherStats:
    queued_tokens: int  # pending + in flight
    pending_sequences: int
    inflight_batches: int
    tokens_per_s: float
    batches_done: int
    batches_failed: int
    broken: str | None  # why the executor is considered broken, else None


def _settle(
    fut: Future[Vectors], *, result: Vectors | None = None, error: BaseException | None = None
) -> None:
    """Resolve a request future unless it is already done (cancelled by its client)."""
    if fut.done():
        return
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            assert result is not None
            fut.set_result(result)
    except InvalidStateError:  # cancelled between the check and the set
        pass


class MicroBatcher:
    """Shared queue + batcher thread between request handlers and a ``SubmitExecutor``."""

    def __init__(
        self,
        executor: SubmitExecutor,
        *,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        max_queue_tokens: int = DEFAULT_MAX_QUEUE_TOKENS,
        max_inflight: int | None = None,
        on_batch: Callable[[WorkBatch], None] | None = None,
        normalize_windows: bool = True,
    ) -> None:
        if batch_tokens < 1 or max_batch_items < 1 or max_queue_tokens < 1 or max_wait_s < 0:
            raise ValueError(
                "batch_tokens, max_batch_items, max_queue_tokens must be >= 1 and max_wait_s >= 0"
            )
        self.executor = executor
        self.normalize_windows = normalize_windows  # the model has Normalize (window mode)
        self.batch_tokens = batch_tokens
        self.max_batch_items = max_batch_items
        self.max_wait_s = max_wait_s
        self.max_queue_tokens = max_queue_tokens
        if max_inflight is None:
            max_inflight = INFLIGHT_PER_WORKER * worker_count(executor.stats())
        self.max_inflight = max(1, max_inflight)
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._pending: deque[tuple[_Request, int]] = deque()
        self._pending_tokens = 0
        self._inflight_tokens = 0
        self._inflight = 0
        self._ids = itertools.count()
        self._batch_ids = itertools.count()
        self._completions: deque[tuple[float, int]] = deque()
        self._last_progress = time.monotonic()
        self._batches_done = 0
        self._batches_failed = 0
        self._broken: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="embedpool-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public facade
    def submit(
        self,
        sequences: Sequence[TokenIds],
        owner: Sequence[int],
        n_items: int,
        prompt_length: int = 0,
        prompt_lengths: Sequence[int] | None = None,
    ) -> Ticket:
        """Queue one request's sequences, each starting with a prompt of ``prompt_length``
        tokens (``tokenization.Encoded.prompt_length``), or of ``prompt_lengths[i]`` tokens
        each (a rerank request's pairs: ``WorkBatch.prompt_lengths``); raises ``QueueFull``
        or ``PoolUnavailable``."""
        if prompt_lengths is not None and len(prompt_lengths) != len(sequences):
            raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(sequences)} sequences")
        tokens = sum(len(s) for s in sequences)
        fut: Future[Vectors] = Future()
        with self._cond:
            if self._closed:
                raise PoolUnavailable("the server is shutting down")
            broken = self._broken or self.executor.broken
            if broken:
                raise PoolUnavailable(f"the worker pool is broken: {broken}")
            queued = self._pending_tokens + self._inflight_tokens
            # A request larger than the whole limit is still admitted into an empty queue;
            # otherwise it could never be served at all.
            if queued > 0 and queued + tokens > self.max_queue_tokens:
                raise QueueFull(queued, tokens, self.max_queue_tokens, self._retry_after(queued))
            req = _Request(
                next(self._ids),
                list(sequences),
                list(owner),
                n_items,
                fut,
                prompt_length=prompt_length,
                prompt_lengths=None if prompt_lengths is None else list(prompt_lengths),
            )
            if not sequences:
                _settle(fut, result=np.zeros((0, 0), dtype=np.float32))
                return Ticket(req.rid, fut, 0)
            self._pending.extend((req, i) for i in range(len(sequences)))
            self._pending_tokens += tokens
            self._cond.notify_all()
        return Ticket(req.rid, fut, tokens)

    def probe(self, sequences: Sequence[TokenIds]) -> Future[BatchResult]:
        """Send one tiny batch straight to the executor (readiness check), bypassing the queue."""
        return self.executor.submit(WorkBatch(next(self._batch_ids), tuple(sequences), ("probe",)))

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(
                self._pending_tokens + self._inflight_tokens,
                len(self._pending),
                self._inflight,
                self._throughput(),
                self._batches_done,
                self._batches_failed,
                self._broken,
            )

    def health(self) -> str | None:
        """None when healthy, else why not (broken pool, dead batcher, stalled executor)."""
        with self._cond:
            if self._broken is not None:
                return f"worker pool broken: {self._broken}"
            if self._closed:
                return "shutting down"
            if not self._thread.is_alive():
                return "batcher thread died"
            stalled = time.monotonic() - self._last_progress
            if self._inflight and stalled > STALL_TIMEOUT_S:
                return (
                    f"no batch finished for {stalled:.0f} s while {self._inflight} "
                    "are in flight: the pool looks hung"
                )
        broken = self.executor.broken  # noticed while idle, not only by a failed batch
        if broken:
            return f"worker pool broken: {broken}"
        return None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the batcher; requests still pending fail with ``PoolUnavailable``."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._pending_tokens = 0
            self._cond.notify_all()
        for req, _ in pending:
            _settle(
                req.future, error=PoolUnavailable("the server shut down before this request ran")
            )
        self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending or in flight (graceful shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending_tokens + self._inflight_tokens > 0 or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # ------------------------------------------------------------------ batcher thread
    def _run(self) -> None:
        while True:
            with self._cond:
                window = self._take_window()
                if window is None:
                    return
            self._dispatch(window)

    def _take_window(self) -> list[tuple[_Request, int]] | None:
        """Wait (holding the lock) until there is work and room, then take a FIFO window."""
        while True:
            if self._closed:
                return None
            self._drop_cancelled_head()
            free = self.max_inflight - self._inflight
            if self._pending and free > 0:
                if self._inflight == 0 and self._pending_tokens < self.batch_tokens:
                    self._gather()  # idle executor, partial batch: wait briefly for company
                    if self._closed:
                        return None
                break
            self._cond.wait(1.0)
        budget = self.batch_tokens * free
        window: list[tuple[_Request, int]] = []
        taken = 0
        while self._pending and taken < budget:
            req, i = self._pending.popleft()
            n = len(req.sequences[i])
            self._pending_tokens -= n
            if req.done:  # cancelled or failed: never costs compute
                continue
            window.append((req, i))
            taken += n
        return window

    def _gather(self) -> None:
        deadline = time.monotonic() + self.max_wait_s
        while not self._closed and self._pending_tokens < self.batch_tokens:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _drop_cancelled_head(self) -> None:
        while self._pending and self._pending[0][0].done:
            req, i = self._pending.popleft()
            self._pending_tokens -= len(req.sequences[i])

    def _dispatch(self, window: list[tuple[_Request, int]]) -> None:
        lengths = [len(req.sequences[i]) for req, i in window]
        for plan in plan_batches(lengths, self.batch_tokens, self.max_batch_items):
            slots = [window[j] for j in plan.indices]
            # requests with different prompts share batches: a prompt length per sequence
            plens = tuple(
                req.prompt_length if req.prompt_lengths is None else req.prompt_lengths[i]
                for req, i in slots
            )
            batch = WorkBatch(
                next(self._batch_ids),
                tuple(req.sequences[i] for req, i in slots),
                tuple(f"request {req.rid} input {req.owner[i]}" for req, i in slots),
                prompt_lengths=plens if any(plens) else (),
            )
            tokens = batch.tokens
            with self._cond:
                self._inflight += 1
                self._inflight_tokens += tokens
            try:
                fut = self.executor.submit(batch)
            except Exception as exc:
                self._finish(slots, tokens, None, exc)
                continue
            if self._on_batch is not None:
                self._on_batch(batch)
            fut.add_done_callback(lambda f, s=slots, t=tokens: self._on_done(f, s, t))  # type: ignore[misc]

    def _on_done(
        self, fut: Future[BatchResult], slots: list[tuple[_Request, int]], tokens: int
    ) -> None:
        try:
            result: BatchResult | None = fut.result()
            error: BaseException | None = None
        except BaseException as exc:  # includes CancelledError from a closing pool
            result, error = None, exc
        self._finish(slots, tokens, result, error)

    def _finish(
        self,
        slots: list[tuple[_Request, int]],
        tokens: int,
        result: BatchResult | None,
        error: BaseException | None,
    ) -> None:
        """Account for one finished batch and scatter its rows (runs on the executor's thread)."""
        now = time.monotonic()
        with self._cond:
            self._inflight -= 1
            self._inflight_tokens -= tokens
            self._last_progress = now
            if error is None:
                self._batches_done += 1
                self._completions.append((now, tokens))
            else:
                self._batches_failed += 1
                if isinstance(error, PoolBroken):
                    self._broken = self._broken or str(error)
            self._cond.notify_all()
        if error is not None or result is None:
            why = f"{type(error).__name__}: {error}" if error is not None else "no result"
            for req, _ in slots:
                _settle(
                    req.future,
                    error=PoolUnavailable(
                        f"the worker pool could not embed a batch of this request ({why})"
                    ),
                )
            return
        for pos, (req, i) in enumerate(slots):
            if req.done:
                continue
            if pos in result.failed:
                _settle(req.future, error=ItemFailed(req.owner[i], result.failed[pos]))
                continue
            self._fill(req, i, result.vectors[pos], self.normalize_windows)

    @staticmethod
    def _fill(req: _Request, i: int, row: Vectors, normalize: bool) -> None:
        # Batches of one request can finish on different pool threads at once.
        with _FILL_LOCK:
            if req.assembly is None:
                req.assembly = Assembly(req.owner, req.n_items, normalize)
            req.assembly.put(i, row)
            last = req.assembly.complete
        if last:
            assert req.assembly is not None
            _settle(req.future, result=req.assembly.vectors())

    # ------------------------------------------------------------------ throughput
    def _throughput(self) -> float:
        """Tokens per second over the last THROUGHPUT_WINDOW_S (0.0 when unknown)."""
        now = time.monotonic()
        while self._completions and now - self._completions[0][0] > THROUGHPUT_WINDOW_S:
            self._completions.popleft()
        if len(self._completions) < 2:
            return 0.0
        span = max(now - self._completions[0][0], 1e-3)
        return sum(t for _, t in self._completions) / span

    def _retry_after(self, queued: int) -> int:
        rate = self._throughput()
        if rate <= 0:
            return RETRY_AFTER_MIN_S
        return int(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(queued / rate))))


#: Guards the per-request row counters, updated from whichever thread finishes a batch.
_FILL_LOCK = threading.Lock()
