"""``InProcessExecutor``: the engine on one background thread of this process, behind the
executor contract (``executor``), drawing from the same ``WorkQueue`` and taking failures
through the same ``faults`` as the pool and Ray.

Batches run as submitted until an out-of-memory error (``MemoryError``, or ONNX Runtime's
CUDA allocation failure on a GPU): from then on the budget is the one rule's
(``faults.TimedBudget``, as on Ray): halved from the size that failed, not below one
full-length sequence, emergency mode at the floor after two in a row, doubled back after
``faults.BUDGET_CALM_S`` without one, never to a size that failed. A lost GPU breaks it with
``DeviceLost``: no engine is left in this process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future

from embedpool import events, executor, faults
from embedpool.budget import MIN_BATCH_TOKENS
from embedpool.errors import DeviceLost, PoolUnavailable
from embedpool.executor import (
    BatchResult,
    EmbeddingEngine,
    EngineRecipe,
    ExecutorStats,
    WorkBatch,
    WorkerInfo,
    embed_sequences,
)
from embedpool.types import EventCallback
from embedpool.workqueue import WorkQueue

log = logging.getLogger("embedpool.executor")


class InProcessExecutor:
    """The engine on one background thread of this process, behind the executor contract.

    For ``--workers 0``, scripts that must not start processes, and tests. A batch whose
    engine raises is bisected like a pool's (``faults``), so one bad input comes back in
    ``BatchResult.failed`` and the others are embedded.
    """

    def __init__(
        self,
        engine: EngineRecipe | Callable[[], EmbeddingEngine],
        on_event: EventCallback | None = None,
    ) -> None:
        build = engine.build if hasattr(engine, "build") else engine
        self.engine: EmbeddingEngine = build()
        self.dim = int(self.engine.dim)
        self._threads = int(getattr(self.engine, "threads", 1) or 1)
        self._cond = threading.Condition()
        self._emit = events.Emitter(on_event, log, backend="in-process")
        self._work = WorkQueue(self._wake, self._emit)
        self._work.dim = self.dim
        self._closed = False
        self._busy = False
        #: The budget after an out-of-memory error; None before the first (batches as planned).
        self._oom_budget: faults.TimedBudget | None = None
        self._thread = threading.Thread(target=self._run, name="embedpool-engine", daemon=True)
        self._thread.start()

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        if self._closed:
            raise PoolUnavailable("the in-process executor is closed")
        return self._work.submit(batch)

    def stats(self) -> ExecutorStats:
        from embedpool.proc import rss_bytes

        budget = self._oom_budget
        worker = WorkerInfo(
            0,
            _own_pid(),
            "busy" if self._busy else "idle",
            rss_bytes() or 0,
            self._work.counters.batches_done,
        )
        return ExecutorStats.of(
            self._work.counters,
            backend="in-process",
            workers=(worker,),
            target_workers=1,
            max_workers=1,
            threads=self._threads,
            batch_tokens=budget.tokens if budget else 0,
            queued=self._work.queued_batches,
            emergency=budget.state.emergency if budget else False,
        )

    @property
    def broken(self) -> str | None:
        if self._work.broken is not None:
            return str(self._work.broken)
        if not self._closed and not self._thread.is_alive():
            return "the in-process engine's thread is gone"
        return None

    def run(
        self, batches: Iterable[WorkBatch], max_pending: int | None = None
    ) -> Generator[BatchResult, None, None]:
        return executor.run(self, batches, max_pending)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._work.close_intake()
            self._cond.notify_all()
        self._thread.join(30.0)
        self._work.cancel_unstarted()

    def __enter__(self) -> InProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _budget(self) -> int | None:
        budget = self._oom_budget
        if budget is None:
            return None
        for name, fields in budget.after_time(time.monotonic(), 1):
            self._emit(name, **fields)
        return budget.tokens

    def _run(self) -> None:
        while True:
            with self._cond:
                task = self._work.next_task(self._budget())
                while task is None and not self._closed:
                    self._cond.wait()
                    task = self._work.next_task(self._budget())
                if task is None:
                    return
                self._busy = True
            started = time.monotonic()
            try:
                rows = embed_sequences(self.engine, task.sequences, task.prompt_lengths)
            except Exception as exc:
                kind = faults.engine_error_kind(exc)
                padded = task.padded_tokens
                decision = self._work.fail(task, kind, f"{type(exc).__name__}: {exc}")
                if decision.lower_budget:
                    if self._oom_budget is None:  # from the size that ran out of memory
                        self._oom_budget = faults.TimedBudget.of(padded, MIN_BATCH_TOKENS)
                    for name, fields in self._oom_budget.after_oom(
                        kind, decision.forbid_tokens, time.monotonic(), 1
                    ):
                        self._emit(name, **fields)
                if decision.action == "fall_back":  # the GPU is gone: no engine left here
                    self._work.break_(
                        DeviceLost(
                            f"{getattr(self.engine, 'device', 'the device')} was lost ({exc}); run "
                            "with device='cpu', or with workers='auto', whose pool falls back to "
                            "the CPU by itself"
                        )
                    )
                    return
            else:
                if self._work.complete(task, rows) and self._oom_budget is not None:
                    self._oom_budget.after_success(started)
            finally:
                self._busy = False


def _own_pid() -> int:
    import os

    return os.getpid()
