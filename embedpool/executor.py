"""The one contract between a job and whatever runs the model: the work types, the engine
protocols, ``run`` and ``Executor``. A leaf: it imports no implementation (``workqueue`` and
``faults`` import it; the executors live in their own modules).

::

    job / batcher ──submit(WorkBatch)──> Executor ──> Future[BatchResult]   (any order)
    run(executor, batches): submit lazily, at most max_pending unfinished, yield as they finish

    Executor            where the engine runs                    module
    InProcessExecutor   this process, one background thread      executors/inprocess.py
    Pool                local worker processes                   executors/pool/pool.py
    DeviceExecutor      one pool per GPU plus the CPU            executors/devices.py
    RayExecutor         Ray actors                               executors/ray/executor.py

Every executor draws its work from a ``workqueue.WorkQueue`` and takes every failure through
``faults.decide``, so a poison input, a death or a hang means the same thing everywhere. Each
reports the same typed ``ExecutorStats`` and says when it can no longer embed (``broken``:
the reason, or None), which a server's /health reads. Per-item failures (a given-up input)
come back in ``BatchResult.failed``: one bad text never costs the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, cast

from embedpool.errors import IntakeClosed, PoolBroken
from embedpool.types import TokenIds, Vectors

log = logging.getLogger(__name__)

#: How long run() waits for a result before it asks whether the executor broke: a bound on
#: how late a dead manager is noticed, not a polling interval (results wake it at once).
RESULT_POLL_S = 1.0
#: Default look-ahead of run(): batches in flight or queued per worker. Two keep a worker busy
#: while its last result travels back, without committing work that could still be sorted.
PENDING_PER_WORKER = 2


@dataclass(frozen=True)
class WorkBatch:
    """Token sequences to embed together, with the ids of their items for error messages."""

    batch_id: int
    sequences: tuple[TokenIds, ...]
    item_ids: tuple[str, ...] = ()
    #: Per sequence, its prompt's length in tokens (``tokenization.Encoded.prompt_length``),
    #: which a model whose Pooling leaves the prompt out needs; () when none has a prompt.
    prompt_lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt_lengths and len(self.prompt_lengths) != len(self.sequences):
            raise ValueError(
                f"batch {self.batch_id}: {len(self.prompt_lengths)} prompt "
                f"lengths for {len(self.sequences)} sequences"
            )

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def padded_tokens(self) -> int:
        return len(self.sequences) * max((len(s) for s in self.sequences), default=0)


@dataclass
class BatchResult:
    batch_id: int
    vectors: Vectors  # (len(sequences), dim); rows listed in ``failed`` are zeros
    failed: dict[int, str] = field(default_factory=dict)  # position in batch -> error
    #: The precision that computed it, where it is not the job's own (the CPU workers of a
    #: device executor next to an fp16 GPU run fp32, executors/devices.py); None: the job's.
    precision: str | None = None


WorkerState = Literal["starting", "idle", "busy", "leaving"]


@dataclass(frozen=True)
class WorkerInfo:
    """One worker (a pool process, a Ray actor, or the in-process engine's thread)."""

    worker_id: int
    pid: int | None
    state: WorkerState
    rss: int  # bytes, as last reported (0 before it is ready, or where not known)
    batches_done: int
    node: str = ""  # the Ray node it runs on; "" for local workers


@dataclass
class Counters:
    """What an executor counts as it runs (the mutable half of ``ExecutorStats``)."""

    batches_done: int = 0
    sequences_done: int = 0
    tokens_done: int = 0
    #: Workers that died without being asked to (every kind below included).
    deaths: int = 0
    #: Deaths confirmed as OOM kills (a cgroup's oom_kill counter, Ray's OutOfMemoryError).
    oom_kills: int = 0
    #: SIGKILLs from outside that no evidence ties to the OOM killer.
    external_sigkills: int = 0
    retries: int = 0
    splits: int = 0
    recycles: int = 0
    hung_kills: int = 0
    poison_items: int = 0
    start_failures: int = 0


@dataclass(kw_only=True)
class ExecutorStats(Counters):
    """A snapshot of an executor, the same fields for every backend: its ``Counters`` and
    these."""

    backend: Literal["in-process", "pool", "ray"]
    workers: tuple[WorkerInfo, ...]
    target_workers: int
    max_workers: int
    threads: int  # intra-op threads per worker
    batch_tokens: int  # the padded-token budget in force; 0 = batches run as submitted
    emergency: bool = False
    queued: int  # batches submitted and not yet started

    @classmethod
    def of(
        cls,
        counters: Counters,
        *,
        backend: Literal["in-process", "pool", "ray"],
        workers: tuple[WorkerInfo, ...],
        target_workers: int,
        max_workers: int,
        threads: int,
        batch_tokens: int,
        queued: int,
        emergency: bool = False,
    ) -> ExecutorStats:
        return cls(
            backend=backend,
            workers=workers,
            target_workers=target_workers,
            max_workers=max_workers,
            threads=threads,
            batch_tokens=batch_tokens,
            emergency=emergency,
            queued=queued,
            **dataclasses.asdict(counters),
        )


class EmbeddingEngine(Protocol):
    """What every executor runs: ``embed`` token sequences into the model's vectors
    (``engine.Engine``, or a test engine). ``prompt_lengths`` (per sequence) is passed only
    when some sequence has a prompt (``embed_sequences``), so an engine for models without
    prompts may take ``sequences`` alone."""

    dim: int

    def embed(
        self, sequences: Sequence[TokenIds], prompt_lengths: Sequence[int] | None = None
    ) -> Vectors: ...


def embed_sequences(
    engine: EmbeddingEngine, sequences: Sequence[TokenIds], prompt_lengths: Sequence[int] | None
) -> Vectors:
    """``engine.embed``, with the prompt lengths only when there are any (see EmbeddingEngine):
    the one call every backend makes."""
    if prompt_lengths is None:
        return engine.embed(sequences)
    return engine.embed(sequences, prompt_lengths)


class EngineRecipe(Protocol):
    """A picklable recipe that builds an engine where it runs (``engine.EngineSpec``)."""

    def build(self) -> EmbeddingEngine: ...


class Executor(Protocol):
    """Runs batches (see the module docstring). ``submit`` is thread-safe; a batch's future
    fails with ``PoolBroken`` if the executor breaks, ``PoolError`` if it closes first."""

    @property
    def dim(self) -> int: ...

    def submit(self, batch: WorkBatch) -> Future[BatchResult]: ...

    def stats(self) -> ExecutorStats: ...

    @property
    def broken(self) -> str | None: ...

    def close(self) -> None: ...


_Recipe = TypeVar("_Recipe", bound=EngineRecipe)


def with_threads(spec: _Recipe, threads: int) -> _Recipe:
    """The spec with ``threads`` intra-op threads where it has such a field (``EngineSpec``,
    the test specs), else the spec itself."""
    fields: Any = spec
    if (
        dataclasses.is_dataclass(fields)
        and not isinstance(fields, type)
        and any(f.name == "threads" for f in dataclasses.fields(fields))
    ):
        return cast(_Recipe, dataclasses.replace(fields, threads=threads))
    return spec


def run(
    executor: Executor, batches: Iterable[WorkBatch], max_pending: int | None = None
) -> Generator[BatchResult, None, None]:
    """Stream results as batches finish (any order). At most ``max_pending`` batches are
    submitted and unfinished at a time (default: two per worker), so ``batches`` is consumed
    lazily. When the executor stops taking batches (``IntakeClosed``), the ones in flight are
    still yielded. Closing the generator early cancels what has not started (fastembed #669:
    an early-closed parallel iterator hung)."""
    limit = max_pending or PENDING_PER_WORKER * max(1, executor.stats().max_workers)
    done: queue.SimpleQueue[Future[BatchResult]] = queue.SimpleQueue()
    pending: set[Future[BatchResult]] = set()
    source = iter(batches)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < limit:
                batch = next(source, None)
                if batch is None:
                    exhausted = True
                    break
                try:
                    fut = executor.submit(batch)
                except IntakeClosed:
                    exhausted = True
                    break
                pending.add(fut)
                fut.add_done_callback(done.put)
            if not pending:
                return
            fut = _next_done(executor, done)
            pending.discard(fut)
            yield fut.result()
    finally:
        for fut in pending:
            fut.cancel()


def _next_done(
    executor: Executor, done: queue.SimpleQueue[Future[BatchResult]]
) -> Future[BatchResult]:
    while True:
        try:
            return done.get(timeout=RESULT_POLL_S)
        except queue.Empty:
            # An executor completes every future, even when it breaks; this guards against a
            # bug there turning into a silent hang here.
            broken = executor.broken
            if broken:
                with contextlib.suppress(queue.Empty):
                    return done.get(timeout=RESULT_POLL_S)
                raise PoolBroken(broken) from None
