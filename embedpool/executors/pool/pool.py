"""The adaptive process pool's facade: one manager thread, N worker processes, nothing lost.

::

    caller threads                 WorkQueue              manager thread (manager.py)        workers
    --------------                 ---------              ---------------------------        -------
    submit(WorkBatch) -> Future ─> inbox ──wake pipe──>   dispatch: next_task(budget) ─Embed─> worker_main
    run(batches) (executor.run)      │                    wait(pipes, sentinels, wakeup)       engine.embed
                                     │ tasks, retries  <─ Result / TaskFailed / death ───────  Result
                                     └ Future.set_result  check_deadlines, apply_scaling (Autoscaler)

What happens on a result, a death, a hang, a failed start and at shutdown is the manager's
(``manager.py``, whose docstring draws it); what a failure *means* (split, retry, give up,
lower the budget) is ``faults.py``'s, shared with the Ray backend and the in-process
executor; how many workers and how big a task is ``scaling.py``'s. This facade only validates,
hands batches to the ``WorkQueue``, waits for the first worker and reports ``stats()``.

Faults, in short (each costs a task retry, never the pool; every retry is bounded):

- a death (sentinel fires, no ``Leaving``) is named (``SIGKILL(-9)``) and classified from
  evidence: a SIGKILL while the worker's cgroup ``oom_kill`` counter rose is an OOM kill (the
  task is split and the token budget halved, never restored to the killed size; two in a row
  put the scaling policy in emergency mode), any other SIGKILL an external kill (split or
  retried), anything else a crash;
- a worker silent past ``hang_base_s + hang_per_token_s x padded tokens`` is warned about at
  60% and killed at 100%, and its task retried as hung;
- a single input that keeps failing is given up with a per-item error (``BatchResult.failed``);
- a worker whose RSS grew past its bound is asked to leave after its task and replaced;
- a failed start carries the worker's traceback: before the first worker is ready it raises
  ``WorkerStartError`` from ``Pool()``; later, ``max_start_failures`` in a row with no worker
  alive break the pool (``broken``, every pending future fails with ``PoolBroken``).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import pickle
import threading
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future
from typing import Any

from embedpool import events, executor
from embedpool.errors import ConfigError, WorkerStartError
from embedpool.executor import BatchResult, EngineRecipe, ExecutorStats, WorkBatch
from embedpool.executors.pool.config import PoolConfig
from embedpool.executors.pool.manager import Manager, Waker
from embedpool.executors.pool.memory import ModelMemory
from embedpool.types import Event, Precision
from embedpool.workqueue import WorkQueue

log = logging.getLogger("embedpool.executors.pool")


def pool_config_for(
    workers: int | str | None = "auto",
    threads: int | None = None,
    batch_tokens: int | None = None,
    precision: Precision | None = None,
    **options: Any,
) -> PoolConfig:
    """A PoolConfig from CLI-style values: ``workers`` is ``"auto"``/None or a count;
    other keyword arguments are PoolConfig fields."""
    if precision is not None:
        options["precision"] = precision
    count: int | None
    if workers is None or workers == "auto":
        count = None
    elif isinstance(workers, int) or (isinstance(workers, str) and workers.isdigit()):
        count = int(workers)
    else:
        raise ConfigError(f"workers={workers!r} must be 'auto' or a positive integer")
    try:
        return PoolConfig(workers=count, threads=threads, batch_tokens=batch_tokens, **options)
    except TypeError as exc:
        raise ConfigError(f"unknown pool option: {exc}") from None


def engine_memory(spec: EngineRecipe) -> ModelMemory | None:
    """The memory shape of the model an EngineSpec runs, its runtime's included (None for
    other engine specs): what the pool and ``doctor`` assume per worker until measured."""
    model, precision = getattr(spec, "model", None), getattr(spec, "precision", None)
    if model is None or precision is None:
        return None
    from embedpool.graph.families.catalog import model_memory

    return model_memory(model, precision, getattr(spec, "runtime", "onnxruntime"))


class Pool:
    """Adaptive process pool running one engine per worker (see the module docstring)."""

    def __init__(
        self,
        spec: EngineRecipe,
        config: PoolConfig | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        cfg = config or PoolConfig()
        if cfg.model_memory is None:
            cfg = dataclasses.replace(cfg, model_memory=engine_memory(spec))
        self.config = cfg
        try:
            spec_blob = pickle.dumps(spec)
        except Exception as exc:
            raise ConfigError(
                f"the engine spec {spec!r} cannot be pickled for the workers: {exc}"
            ) from exc
        emit = events.Emitter(on_event, log)
        waker = Waker()
        self._work = WorkQueue(waker.wake, emit, cfg.fault_policy)
        self._manager = m = Manager(
            spec_blob, cfg, self._work, emit, waker, multiprocessing.get_context(cfg.start_method)
        )
        self.threads = m.threads
        self._thread = threading.Thread(target=m.run, name="embedpool-pool-manager", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        if not m.first_ready.wait(cfg.start_timeout_s + 10.0):  # the manager's own timer
            self.close(grace_s=0)  # fires first; this is the backstop if it is stuck
            raise WorkerStartError(f"no worker became ready within {cfg.start_timeout_s:.0f} s")
        if m.start_error is not None:
            self._thread.join(cfg.leave_timeout_s + 5.0)
            atexit.unregister(self._atexit)
            raise m.start_error

    @property
    def dim(self) -> int:
        return self._manager.dim

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        """Queue one batch; thread-safe. The future fails with PoolBroken if the pool breaks.
        Raises ``PoolBroken`` when it is broken, ``IntakeClosed`` after ``stop_intake``."""
        return self._work.submit(batch)

    def run(
        self, batches: Iterable[WorkBatch], max_pending: int | None = None
    ) -> Generator[BatchResult, None, None]:
        """``executor.run`` over this pool (bounded look-ahead, any order)."""
        limit = max_pending or self.config.pending_per_worker * max(
            1, self._manager.scaler.max_workers
        )
        return executor.run(self, batches, limit)

    def stats(self) -> ExecutorStats:
        s = self._manager.scaler
        return ExecutorStats.of(
            self._work.counters,
            backend="pool",
            workers=self._manager.snapshot,
            target_workers=s.target_workers,
            max_workers=s.max_workers,
            threads=self.threads,
            batch_tokens=s.batch_tokens,
            emergency=s.emergency,
            queued=self._work.queued_batches,
        )

    @property
    def broken(self) -> str | None:
        """Why the pool can no longer embed (no worker can be started, its manager died), or
        None. Noticed while idle too: a server's /health reads it."""
        exc = self._work.broken
        if exc is not None:
            return str(exc)
        if not self._thread.is_alive() and not self._manager.closing:
            return "the pool's manager thread is gone"
        return None

    def stop_intake(self) -> None:
        """No new batches from now on (submit raises); batches already submitted finish."""
        self._work.close_intake()

    def close(self, grace_s: float = 10.0) -> None:
        """Finish submitted batches within ``grace_s``, then stop the workers. Idempotent.
        Batches still unfinished after the grace period fail with PoolError."""
        m = self._manager
        self._work.close_intake()
        if not m.closing:
            m.grace_deadline = time.monotonic() + grace_s
            m.closing = True
        m.waker.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(grace_s + self.config.leave_timeout_s + 10.0)
        if self._thread.is_alive():  # pragma: no cover - manager stuck: last resort
            log.error("embedpool pool manager did not stop in time; killing its workers")
            m.kill_all()
        atexit.unregister(self._atexit)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _atexit(self) -> None:
        self.close(grace_s=0)
