"""``InProcessExecutor``: the engine on one background thread of this process, behind the
executor contract (``executor``), drawing from the same ``WorkQueue`` and taking failures
through the same ``faults`` as the pool and Ray.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future

from embedpool import events, executor
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

    def __init__(self, engine: EngineRecipe | Callable[[], EmbeddingEngine],
                 on_event: EventCallback | None = None) -> None:
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
        self._thread = threading.Thread(target=self._run, name="embedpool-engine", daemon=True)
        self._thread.start()

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        if self._closed:
            raise PoolUnavailable("the in-process executor is closed")
        return self._work.submit(batch)

    def stats(self) -> ExecutorStats:
        from embedpool.proc import rss_bytes

        worker = WorkerInfo(0, _own_pid(), "busy" if self._busy else "idle", rss_bytes() or 0,
                            self._work.counters.batches_done)
        return ExecutorStats.of(self._work.counters, backend="in-process", workers=(worker,),
                                target_workers=1, max_workers=1, threads=self._threads,
                                batch_tokens=0, queued=self._work.queued_batches)

    @property
    def broken(self) -> str | None:
        if self._work.broken is not None:
            return str(self._work.broken)
        if not self._closed and not self._thread.is_alive():
            return "the in-process engine's thread is gone"
        return None

    def run(self, batches: Iterable[WorkBatch], max_pending: int | None = None
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

    def _run(self) -> None:
        from embedpool.faults import engine_error_kind

        while True:
            with self._cond:
                task = self._work.next_task(None)
                while task is None and not self._closed:
                    self._cond.wait()
                    task = self._work.next_task(None)
                if task is None:
                    return
                self._busy = True
            try:
                rows = embed_sequences(self.engine, task.sequences, task.prompt_lengths)
            except Exception as exc:
                decision = self._work.fail(task, engine_error_kind(exc),
                                           f"{type(exc).__name__}: {exc}")
                if decision.action == "fall_back":  # the GPU is gone: no engine left here
                    self._work.break_(DeviceLost(
                        f"{getattr(self.engine, 'device', 'the device')} was lost ({exc}); run "
                        "with device='cpu', or with workers='auto', whose pool falls back to "
                        "the CPU by itself"))
                    return
            else:
                self._work.complete(task, rows)
            finally:
                self._busy = False


def _own_pid() -> int:
    import os

    return os.getpid()
