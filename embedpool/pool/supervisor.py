"""The adaptive process pool: one manager thread, N worker processes, nothing lost.

Data flow::

    caller threads                    manager thread (owns every pipe and all state)          workers
    --------------                    ----------------------------------------------          -------
    submit(WorkBatch) -> Future ─┐
    run(batches) ── submit ──────┤    inbox ─> dispatch: cut to the batch token budget
                                 └──> (deque)    into tasks ─ Embed(task) ───────────────────> worker_main
                       wakeup pipe ─────────>    wait(pipes + sentinels + wakeup, deadline)      engine.embed
                                                  ├ Result    -> handle_result: rows into the <─ Result
                                                  │              job; job complete -> Future.set_result
                                                  ├ TaskFailed-> bisect the task (isolate the bad item)
                                                  ├ Leaving   -> cooperative exit, not a crash
                                                  └ sentinel  -> handle_death: name the signal; retry
                                                                 the task, split in half after SIGKILL
                                                 check_deadlines: warn at 60%, kill a hung worker
                                                 apply_scaling:   Sampler reading -> scaling.decide()
                                                                  -> spawn / ask to Leave / budget
                                                 shutdown:        Leave to all, kill stragglers

Who does what:

- The facade (``Pool``) validates, wraps each ``WorkBatch`` in a ``Future`` and wakes the
  manager; ``run`` streams results with bounded look-ahead. It never touches a pipe.
- The manager thread is the only code that reads or writes worker pipes and pool state. It
  blocks on ``multiprocessing.connection.wait`` and never polls ``is_alive()``, so a death is
  seen the moment the kernel reaps it. Every step is a verb: ``dispatch``, ``handle_result``,
  ``handle_death``, ``check_deadlines``, ``apply_scaling``, ``shutdown``.
- Workers (``worker.worker_main``) embed one task at a time, so a crash is charged to exactly
  one task.

Faults (each costs a task retry, never the pool; every retry is bounded):

- death (sentinel fires, no ``Leaving``): ``worker_death`` names the exit (``SIGKILL(-9)``).
  The task is requeued at the front; after a SIGKILL from outside (most likely the OOM killer)
  it is split in half and the policy lowers the token budget; two OOM kills in a row put the
  policy in emergency mode (1 worker, small batches) until memory stays low.
- a task that fails again is bisected; a single input that kills ``1 + max_retries`` workers is
  poison: its row is zeros and ``BatchResult.failed`` names its key. A Python error in
  ``embed`` bisects at once and fails the single item without retry (it is deterministic).
- hung: a busy worker silent past ``hang_base_s + hang_per_token_s x padded tokens`` is warned
  about at 60% and SIGKILLed at 100%; its task is retried like any death.
- memory growth: after a result, a worker whose RSS is above the bound is asked to Leave and
  a fresh one is started.
- start failure: ``StartFailed`` carries the worker's traceback; before the first worker is
  ready it raises ``WorkerStartError`` from ``Pool()``; later, ``max_start_failures`` in a row
  with no worker alive break the pool: every pending future fails with ``PoolBroken``.

Workers are spawned only from the manager thread: PR_SET_PDEATHSIG fires when the *thread*
that forked a child exits, so a pool built on a short-lived thread would lose its workers.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import numpy as np

from embedpool import events
from embedpool.batching import plan_batches
from embedpool.errors import ConfigError, PoolBroken, PoolError, WorkerStartError
from embedpool.events import death_cause, exit_name, make_event
from embedpool.executor import BatchResult, WorkBatch
from embedpool.pool import resources, scaling
from embedpool.pool.config import PoolConfig
from embedpool.pool.protocol import (
    Embed,
    Leave,
    Leaving,
    Ready,
    Result,
    StartFailed,
    TaskFailed,
)
from embedpool.pool.worker import worker_main
from embedpool.types import Event, Precision

log = logging.getLogger(__name__)

WorkerState = Literal["starting", "idle", "busy", "leaving"]

#: Longest the manager sleeps when nothing is due: an upper bound on how late a deadline is
#: noticed if a timer computation is off, not a polling interval (events wake it at once).
MAX_WAIT_S = 1.0
#: Backoff between failed starts (doubles per failure up to the cap): a broken model file
#: must not become a fork bomb, a transient failure must not stall the pool for long.
START_BACKOFF_S = 0.25
START_BACKOFF_MAX_S = 10.0


# --- public value types ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: int
    pid: int | None
    state: WorkerState
    rss: int  # bytes, as last reported by the worker (0 before Ready)
    batches_done: int


@dataclass(frozen=True)
class PoolStats:
    workers: tuple[WorkerInfo, ...]
    target_workers: int
    threads: int
    batch_tokens: int
    emergency: bool
    queued: int  # batches submitted and not yet started
    batches_done: int
    sequences_done: int
    tokens_done: int
    deaths: int
    oom_kills: int
    retries: int
    splits: int
    recycles: int
    hung_kills: int
    poison_items: int
    start_failures: int


def pool_config_for(workers: int | str | None = "auto", threads: int | None = None,
                    batch_tokens: int | None = None, precision: Precision | None = None,
                    **options: Any) -> PoolConfig:
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


# --- manager-side records ------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """One submitted WorkBatch; complete when every position has a row or an error."""

    batch: WorkBatch
    future: Future[BatchResult]
    vectors: np.ndarray
    remaining: int
    failed: dict[int, str] = field(default_factory=dict)


@dataclass(eq=False)
class _Task:
    """A slice of one job's positions, sent to one worker at a time."""

    task_id: int
    job: _Job
    positions: tuple[int, ...]
    attempts: int = 0  # failures at this size
    last_error: str = ""

    @property
    def padded_tokens(self) -> int:
        seqs = self.job.batch.sequences
        return len(self.positions) * max(len(seqs[p]) for p in self.positions)

    @property
    def tokens(self) -> int:
        seqs = self.job.batch.sequences
        return sum(len(seqs[p]) for p in self.positions)

    def describe(self) -> dict[str, Any]:
        return {"batch_id": self.job.batch.batch_id, "items": len(self.positions),
                "tokens": self.tokens}


@dataclass(eq=False)
class _Worker:
    worker_id: int
    process: BaseProcess
    conn: Connection
    started: float
    state: WorkerState = "starting"
    pid: int | None = None
    conn_open: bool = True
    task: _Task | None = None
    task_started: float = 0.0
    deadline: float = 0.0
    warned: bool = False
    rss: int = 0
    ready_rss: int = 0
    batches_done: int = 0
    leave_reason: str | None = None  # set when asked to leave
    leave_asked_at: float = 0.0
    said_leaving: bool = False
    kill_reason: str | None = None  # set when the pool killed it
    start_failure: StartFailed | None = None


@dataclass
class _Counters:
    batches_done: int = 0
    sequences_done: int = 0
    tokens_done: int = 0
    deaths: int = 0
    oom_kills: int = 0
    retries: int = 0
    splits: int = 0
    recycles: int = 0
    hung_kills: int = 0
    poison_items: int = 0
    start_failures: int = 0


# --- the pool --------------------------------------------------------------------------------


class Pool:
    """Adaptive process pool running one engine per worker (see the module docstring)."""

    def __init__(self, spec: Any, config: PoolConfig | None = None,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.config = cfg = config or PoolConfig()
        self._on_event = on_event
        try:
            self._spec_blob = pickle.dumps(spec)
        except Exception as exc:
            raise ConfigError(f"the engine spec {spec!r} cannot be pickled for the workers: "
                              f"{exc}") from exc
        self._ctx = multiprocessing.get_context(cfg.start_method)
        self._policy = _Policy(cfg)
        self.threads = self._policy.threads
        self.dim = 0

        self._lock = threading.Lock()  # guards _inbox, _intake_open, _broken, _closing, wakeup fds
        self._inbox: deque[_Job] = deque()
        self._intake_open = True
        self._closing = False
        self._grace_deadline = float("inf")
        self._broken: PoolBroken | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._wake_closed = False
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

        # manager-only state
        self._workers: dict[int, _Worker] = {}
        self._tasks: deque[_Task] = deque()
        self._jobs: set[_Job] = set()
        self._worker_ids = itertools.count()
        self._task_ids = itertools.count()
        self._counters = _Counters()
        self._first_ready = threading.Event()
        self._start_error: BaseException | None = None
        self._start_failures_in_row = 0
        self._spawn_not_before = 0.0
        self._next_sample = 0.0
        self._next_status = 0.0
        self._status_mark = (time.monotonic(), 0)
        self._finished = False
        self._snapshot: tuple[WorkerInfo, ...] = ()

        self._thread = threading.Thread(target=self._manage, name="embedpool-supervisor",
                                        daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        if not self._first_ready.wait(cfg.start_timeout_s + 10.0):  # the manager's own timer
            self.close(grace_s=0)  # fires first; this is the backstop if it is stuck
            raise WorkerStartError(f"no worker became ready within {cfg.start_timeout_s:.0f} s")
        if self._start_error is not None:
            self._thread.join(cfg.leave_timeout_s + 5.0)
            atexit.unregister(self._atexit)
            raise self._start_error

    # -- facade -----------------------------------------------------------------------------

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        """Queue one batch; thread-safe. The future fails with PoolBroken if the pool breaks."""
        fut: Future[BatchResult] = Future()
        n = len(batch.sequences)
        job = _Job(batch, fut, np.zeros((n, self.dim), dtype=np.float32), n)
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if not self._intake_open:
                raise PoolError("the pool is stopping and takes no new batches")
            if n == 0:
                fut.set_running_or_notify_cancel()
                fut.set_result(BatchResult(batch.batch_id, job.vectors))
                return fut
            self._inbox.append(job)
        self._wakeup()
        return fut

    def run(self, batches: Iterable[WorkBatch], max_pending: int | None = None
            ) -> Generator[BatchResult, None, None]:
        """Stream results as batches finish (any order). At most ``max_pending`` batches are
        submitted and unfinished at a time, so ``batches`` is consumed lazily. After
        ``stop_intake()`` no more batches are taken and the ones in flight are still yielded.
        Closing the generator early cancels what has not started."""
        limit = max_pending or self.config.pending_per_worker * max(1, self._policy.max_workers)
        done: queue.SimpleQueue[Future[BatchResult]] = queue.SimpleQueue()
        pending: set[Future[BatchResult]] = set()
        source = iter(batches)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < limit and self._intake_open:
                    try:
                        batch = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    fut = self.submit(batch)
                    pending.add(fut)
                    fut.add_done_callback(done.put)
                if not pending:
                    return
                fut = self._next_done(done)
                pending.discard(fut)
                yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()

    def _next_done(self, done: queue.SimpleQueue[Future[BatchResult]]) -> Future[BatchResult]:
        while True:
            try:
                return done.get(timeout=MAX_WAIT_S)
            except queue.Empty:
                # The manager completes every future, even when it dies (see _manage); this
                # guards against a bug there turning into a silent hang here.
                if not self._thread.is_alive():
                    with contextlib.suppress(queue.Empty):
                        return done.get(timeout=MAX_WAIT_S)
                    raise PoolBroken("the pool's supervisor thread is gone") from None

    def stats(self) -> PoolStats:
        c = self._counters
        return PoolStats(workers=self._snapshot, target_workers=self._policy.target_workers,
                         threads=self.threads, batch_tokens=self._policy.batch_tokens,
                         emergency=self._policy.emergency, queued=len(self._inbox),
                         batches_done=c.batches_done, sequences_done=c.sequences_done,
                         tokens_done=c.tokens_done, deaths=c.deaths, oom_kills=c.oom_kills,
                         retries=c.retries, splits=c.splits, recycles=c.recycles,
                         hung_kills=c.hung_kills, poison_items=c.poison_items,
                         start_failures=c.start_failures)

    def stop_intake(self) -> None:
        """No new batches from now on (submit raises); batches already submitted finish."""
        with self._lock:
            self._intake_open = False
        self._wakeup()

    def close(self, grace_s: float = 10.0) -> None:
        """Finish submitted batches within ``grace_s``, then stop the workers. Idempotent.
        Batches still unfinished after the grace period fail with PoolError."""
        with self._lock:
            self._intake_open = False
            if not self._closing:
                self._closing = True
                self._grace_deadline = time.monotonic() + grace_s
        self._wakeup()
        if threading.current_thread() is not self._thread:
            self._thread.join(grace_s + self.config.leave_timeout_s + 10.0)
        if self._thread.is_alive():  # pragma: no cover - manager stuck: last resort
            log.error("embedpool supervisor did not stop in time; killing its workers")
            for w in list(self._workers.values()):
                _kill(w.process)
        atexit.unregister(self._atexit)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _atexit(self) -> None:
        self.close(grace_s=0)

    def _wakeup(self) -> None:
        with self._lock:  # never write to a closed (and perhaps reused) descriptor
            if self._wake_closed:
                return
            with contextlib.suppress(BlockingIOError, OSError):  # full pipe: already awake
                os.write(self._wake_w, b"x")

    # -- manager thread -----------------------------------------------------------------------

    def _manage(self) -> None:
        try:
            self.apply_scaling(force=True)
            while not self._finished:
                self.dispatch()
                ready = wait(self._wait_objects(), timeout=self._wait_timeout())
                self._handle_ready(ready)
                self.check_deadlines()
                self.apply_scaling()
                self._maybe_status()
                self._maybe_shutdown()
                self._publish()
        except BaseException as exc:
            log.exception("embedpool supervisor crashed")
            self._break(PoolBroken(f"the pool's supervisor failed: {exc!r}\n"
                                   f"{traceback.format_exc()}"))
            self.shutdown()
        finally:
            self._first_ready.set()  # never leave Pool() waiting
            with self._lock:
                self._wake_closed = True
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _wait_objects(self) -> list[Any]:
        objs: list[Any] = [self._wake_r]
        for w in self._workers.values():
            if w.conn_open:
                objs.append(w.conn)
            objs.append(w.process.sentinel)
        return objs

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        due = [self._next_sample, self._grace_deadline]
        if self._spawn_not_before > now:  # a respawn backoff is running (0.0: none is);
            # an expired one must not count, or wait() gets timeout 0 and this thread spins
            due.append(self._spawn_not_before)
        if self.config.status_interval_s:
            due.append(self._next_status)
        for w in self._workers.values():
            if w.state == "busy":
                total = w.deadline - w.task_started
                due.append(w.deadline if w.warned else
                           w.task_started + total * self.config.hang_warn_fraction)
            elif w.state == "starting":
                due.append(w.started + self.config.start_timeout_s)
            elif w.state == "leaving":
                due.append(w.leave_asked_at + self.config.leave_timeout_s)
        return min(MAX_WAIT_S, max(0.0, min(due) - now))

    def _handle_ready(self, ready: list[Any]) -> None:
        by_conn = {id(w.conn): w for w in self._workers.values()}
        by_sentinel = {w.process.sentinel: w for w in self._workers.values()}
        dead: list[_Worker] = []
        for obj in ready:
            if obj == self._wake_r:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._wake_r, 4096):
                        pass
            elif id(obj) in by_conn:
                self._receive(by_conn[id(obj)])
            elif obj in by_sentinel:
                dead.append(by_sentinel[obj])
        # messages first, deaths after: a worker's last Result or Leaving is in its pipe
        # before its sentinel fires, and must not be mistaken for a crash.
        for w in dead:
            self.handle_death(w)

    def _receive(self, w: _Worker) -> None:
        """Read every message the worker has sent so far."""
        while w.conn_open:
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                w.conn_open = False  # the sentinel tells how it ended
                return
            if isinstance(msg, Result):
                self.handle_result(w, msg)
            elif isinstance(msg, Ready):
                self._on_ready(w, msg)
            elif isinstance(msg, TaskFailed):
                self._on_task_failed(w, msg)
            elif isinstance(msg, Leaving):
                w.said_leaving = True
            elif isinstance(msg, StartFailed):
                w.start_failure = msg

    # -- verbs ----------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Give every idle worker a task, cutting new jobs to the current token budget."""
        for w in self._workers.values():
            if w.state != "idle" or w.leave_reason is not None:
                continue
            task = self._next_task()
            if task is None:
                return
            try:
                w.conn.send(Embed(task.task_id, tuple(task.job.batch.sequences[p]
                                                      for p in task.positions)))
            except (OSError, ValueError):  # it just died; the sentinel will say how
                w.conn_open = False
                self._tasks.appendleft(task)
                continue
            now = time.monotonic()
            w.state, w.task, w.task_started, w.warned = "busy", task, now, False
            w.deadline = now + self.config.hang_deadline_s(task.padded_tokens)
        self._publish()

    def _next_task(self) -> _Task | None:
        while not self._tasks:
            with self._lock:
                if not self._inbox:
                    return None
                job = self._inbox.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            self._jobs.add(job)
            self._tasks.extend(self._cut(job))
        task = self._tasks.popleft()
        if len(task.positions) > 1 and task.padded_tokens > self._policy.batch_tokens:
            # Cut before the budget was lowered (an OOM kill, memory pressure, emergency):
            # sending it whole would repeat the kill the lower budget is there to avoid.
            parts = self._recut(task)
            self._tasks.extendleft(reversed(parts[1:]))
            task = parts[0]
        return task

    def _cut(self, job: _Job) -> list[_Task]:
        """Tasks within the current budget; a batch that fits stays whole, in its order."""
        seqs = job.batch.sequences
        budget = self._policy.batch_tokens
        if job.batch.padded_tokens <= budget:
            groups = [tuple(range(len(seqs)))]
        else:
            groups = [b.indices for b in plan_batches([len(s) for s in seqs], budget,
                                                      max_items=len(seqs))]
        return [_Task(next(self._task_ids), job, g) for g in groups]

    def _recut(self, task: _Task) -> list[_Task]:
        """A queued task cut again to the current budget (its order kept)."""
        seqs = task.job.batch.sequences
        groups = plan_batches([len(seqs[p]) for p in task.positions], self._policy.batch_tokens,
                              max_items=len(task.positions))
        return [_Task(next(self._task_ids), task.job, tuple(task.positions[i] for i in g.indices))
                for g in groups]

    def handle_result(self, w: _Worker, msg: Result) -> None:
        task = w.task
        if task is None or task.task_id != msg.task_id:  # pragma: no cover - protocol bug
            log.error("worker %s sent a result for task %s it was not given", w.worker_id,
                      msg.task_id)
            return
        w.task, w.state, w.rss = None, "idle", msg.rss
        job = task.job
        if msg.vectors.shape != (len(task.positions), self.dim):  # a broken engine, not a crash
            self._task_failed(task, f"engine returned shape {msg.vectors.shape}, expected "
                              f"{(len(task.positions), self.dim)}", split=True, retry_single=False)
            return
        w.batches_done += 1
        job.vectors[list(task.positions)] = msg.vectors
        c = self._counters
        c.sequences_done += len(task.positions)
        c.tokens_done += task.tokens
        self._policy.on_success(w.task_started)
        self._complete(job, len(task.positions))
        self._maybe_recycle(w)
        if w.leave_reason is not None:  # asked to leave while busy
            self._ask_leave(w, w.leave_reason)

    def _on_task_failed(self, w: _Worker, msg: TaskFailed) -> None:
        task = w.task
        w.task, w.state = None, "idle"
        if task is None:  # pragma: no cover - protocol bug
            return
        task.last_error = msg.error
        log.warning("worker %s: embed raised %s\n%s", w.worker_id, msg.error, msg.traceback)
        self._task_failed(task, msg.error, split=True, retry_single=False)
        if w.leave_reason is not None:
            self._ask_leave(w, w.leave_reason)

    def handle_death(self, w: _Worker) -> None:
        """The sentinel fired: find out how it ended and make good the damage."""
        if self._workers.get(w.worker_id) is not w:
            return  # already reaped (shutdown ran in this same round)
        self._receive(w)  # a last Result / Leaving / StartFailed still in the pipe
        w.process.join(timeout=1.0)
        code = w.process.exitcode
        del self._workers[w.worker_id]
        w.conn.close()
        with contextlib.suppress(ValueError):
            w.process.close()
        if w.said_leaving or (w.leave_reason is not None and w.task is None
                              and w.state != "starting"):
            self._emit(events.WORKER_EXIT, worker_id=w.worker_id, pid=w.pid,
                       reason=w.leave_reason or "asked", exit=exit_name(code))
            self._publish()
            return
        if w.state == "starting":
            self._on_start_failure(w, code)
            return
        c = self._counters
        c.deaths += 1
        oom = code == -signal.SIGKILL and w.kill_reason is None
        task = w.task
        self._emit(events.WORKER_DEATH, worker_id=w.worker_id, pid=w.pid, exit=exit_name(code),
                   exitcode=code, cause=death_cause(code, killed_by_pool=w.kill_reason),
                   **(task.describe() if task else {"items": 0, "tokens": 0}))
        if oom:
            c.oom_kills += 1
            multi = task is not None and len(task.positions) > 1
            self._apply(self._policy.on_oom_kill(task.padded_tokens if task and multi else None))
        if task is not None:
            self._task_failed(task, f"worker pid {w.pid} died: {exit_name(code)}", split=oom)
        self._publish()

    def check_deadlines(self) -> None:
        """Hung workers, workers that never became ready, workers that never left."""
        now = time.monotonic()
        cfg = self.config
        for w in list(self._workers.values()):
            if w.kill_reason is not None:
                continue
            if w.state == "busy" and w.task is not None:
                silent = now - w.task_started
                total = w.deadline - w.task_started
                if not w.warned and silent >= total * cfg.hang_warn_fraction:
                    w.warned = True
                    self._emit(events.WORKER_HUNG_WARNING, worker_id=w.worker_id, pid=w.pid,
                               silent_s=round(silent, 2), deadline_s=round(total, 2),
                               **w.task.describe())
                if now >= w.deadline:
                    self._counters.hung_kills += 1
                    self._emit(events.WORKER_HUNG_KILL, worker_id=w.worker_id, pid=w.pid,
                               silent_s=round(silent, 2), deadline_s=round(total, 2),
                               **w.task.describe())
                    self._kill_worker(w, f"hung: silent {silent:.1f} s, deadline {total:.1f} s")
            elif w.state == "starting" and now - w.started >= cfg.start_timeout_s:
                self._kill_worker(w, f"not ready within start_timeout_s={cfg.start_timeout_s}")
            elif w.state == "leaving" and now - w.leave_asked_at >= cfg.leave_timeout_s:
                self._kill_worker(w, f"did not leave within {cfg.leave_timeout_s} s")

    def apply_scaling(self, force: bool = False) -> None:
        """Once per sample interval: read resources, ask the policy, apply its answer."""
        now = time.monotonic()
        if not force and now < self._next_sample:
            self._ensure_workers()
            return
        self._next_sample = now + self.config.sample_interval_s
        if self.dim:  # readings only make sense once workers run
            live = [w for w in self._workers.values() if w.pid is not None]
            queued = len(self._tasks) + len(self._inbox) + sum(
                1 for w in live if w.state == "busy")
            self._apply(self._policy.sample([w.pid for w in live if w.pid is not None],
                                            queued, self._counters.sequences_done))
        self._ensure_workers()

    def shutdown(self) -> None:
        """Fail what is left, ask every worker to leave, kill the ones that do not."""
        self._finished = True
        for job in list(self._jobs):
            self._fail_job(job, PoolError(
                f"the pool closed with batch {job.batch.batch_id} unfinished "
                f"({job.remaining} of {len(job.batch.sequences)} items left)"))
        with self._lock:
            leftover = list(self._inbox)
            self._inbox.clear()
        for job in leftover:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(self._broken or PoolError("the pool closed"))
        self._tasks.clear()
        for w in self._workers.values():
            if w.state == "idle" and w.conn_open:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(Leave("shutdown"))
            else:
                _kill(w.process)
        deadline = time.monotonic() + self.config.leave_timeout_s
        procs = [w.process for w in self._workers.values()]
        while procs and time.monotonic() < deadline:
            wait([p.sentinel for p in procs], timeout=deadline - time.monotonic())
            procs = [p for p in procs if p.exitcode is None]
        for p in procs:
            _kill(p)
        for w in self._workers.values():
            w.process.join(timeout=5.0)
            w.conn.close()
        self._workers.clear()
        self._publish()
        self._emit(events.POOL_STOP, **{k: v for k, v in vars(self._counters).items()})

    # -- helpers of the verbs -----------------------------------------------------------------

    def _spawn(self) -> None:
        wid = next(self._worker_ids)
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        cfg = self.config
        gc_bound = cfg.recycle_rss_bytes
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_main, name=f"embedpool-worker-{wid}", daemon=True,
            args=(child_conn, self._spec_blob, wid, self.threads, os.getpid(), gc_bound))
        proc.start()
        child_conn.close()  # ours is closed so that the worker's death gives us EOF
        self._workers[wid] = _Worker(wid, proc, parent_conn, time.monotonic(), pid=proc.pid)
        self._publish()

    def _ensure_workers(self) -> None:
        if self._finished or self._closing or self._broken is not None:
            return
        staying = [w for w in self._workers.values() if w.leave_reason is None]
        missing = self._policy.target_workers - len(staying)
        if missing > 0 and time.monotonic() >= self._spawn_not_before:
            # before the first Ready, start one: a bad spec then fails once, not N times
            for _ in range(missing if self.dim else min(missing, 1 if not staying else 0)):
                self._spawn()
        elif missing < 0:
            for w in sorted(staying, key=lambda w: (w.state != "idle", -w.worker_id)):
                if missing >= 0:
                    break
                self._ask_leave(w, "scale-down")
                missing += 1

    def _on_ready(self, w: _Worker, msg: Ready) -> None:
        w.state, w.pid, w.rss, w.ready_rss = "idle", msg.pid, msg.rss, msg.rss
        self._start_failures_in_row = 0
        self._spawn_not_before = 0.0
        self._emit(events.WORKER_READY, worker_id=w.worker_id, pid=msg.pid, rss=msg.rss,
                   seconds=round(time.monotonic() - w.started, 3))
        if not self.dim:
            self.dim = msg.dim
            self._emit(events.POOL_START, workers=self._policy.target_workers,
                       threads=self.threads, batch_tokens=self._policy.batch_tokens,
                       start_method=self.config.start_method, **self._policy.describe())
            self._first_ready.set()
            self._ensure_workers()  # now start the rest
        elif msg.dim != self.dim:  # pragma: no cover - a spec that is not deterministic
            raise PoolError(f"worker {w.worker_id} reports dim {msg.dim}, pool has {self.dim}")
        self._publish()

    def _on_start_failure(self, w: _Worker, code: int | None) -> None:
        self._counters.start_failures += 1
        self._start_failures_in_row += 1
        sf = w.start_failure
        if sf is not None:
            error, tb = sf.error, sf.traceback
        else:
            error = (f"worker died while starting: {exit_name(code)}"
                     + (f" ({w.kill_reason})" if w.kill_reason else ""))
            tb = ""
        self._emit(events.WORKER_START_FAILED, worker_id=w.worker_id, pid=w.pid, error=error,
                   exit=exit_name(code), traceback=tb)
        message = (f"worker {w.worker_id} (pid {w.pid}) failed to load its engine: {error}"
                   + (f"\n\nworker traceback:\n{tb}" if tb else ""))
        if not self.dim:
            self._start_error = WorkerStartError(message)
            self._break(PoolBroken(message))
            self.shutdown()
            self._first_ready.set()
            return
        backoff = min(START_BACKOFF_MAX_S, START_BACKOFF_S * 2 ** (self._start_failures_in_row - 1))
        self._spawn_not_before = time.monotonic() + backoff
        alive = any(x.state in ("idle", "busy") for x in self._workers.values())
        if not alive and self._start_failures_in_row >= self.config.max_start_failures:
            self._break(PoolBroken(f"no worker could be started ({self._start_failures_in_row} "
                                   f"failures in a row); last: {message}"))
            self.shutdown()

    def _task_failed(self, task: _Task, reason: str, *, split: bool,
                     retry_single: bool = True) -> None:
        """Requeue a failed task: bisect it, retry it, or give up on its single item."""
        task.last_error = reason
        n = len(task.positions)
        if n > 1 and (split or task.attempts >= 1):
            mid = n // 2
            halves = [_Task(next(self._task_ids), task.job, task.positions[:mid]),
                      _Task(next(self._task_ids), task.job, task.positions[mid:])]
            self._counters.splits += 1
            self._emit(events.SPLIT, batch_id=task.job.batch.batch_id, items=n,
                       halves=[mid, n - mid], reason=reason)
            self._tasks.extendleft(reversed(halves))
            return
        task.attempts += 1
        if n == 1 and (not retry_single or task.attempts > self.config.max_retries):
            self._give_up(task, reason)
            return
        self._counters.retries += 1
        self._emit(events.RETRY, attempt=task.attempts, reason=reason, **task.describe())
        self._tasks.appendleft(task)

    def _give_up(self, task: _Task, reason: str) -> None:
        job = task.job
        pos = task.positions[0]
        keys = job.batch.keys
        key = keys[pos] if pos < len(keys) else f"batch {job.batch.batch_id} item {pos}"
        tries = task.attempts
        message = (f"input {key!r} ({len(job.batch.sequences[pos])} tokens) could not be "
                   f"embedded: {reason}; given up after {tries} tr{'y' if tries == 1 else 'ies'}"
                   f" (a poison input: it kills or breaks every worker that embeds it)")
        job.failed[pos] = message
        job.vectors[pos] = 0.0
        self._counters.poison_items += 1
        self._emit(events.POISON_ITEM, batch_id=job.batch.batch_id, position=pos, key=key,
                   error=message)
        self._complete(job, 1)

    def _complete(self, job: _Job, items: int) -> None:
        job.remaining -= items
        if job.remaining > 0:
            return
        self._jobs.discard(job)
        self._counters.batches_done += 1
        self._publish()  # before the caller can wake up and call stats()
        job.future.set_result(BatchResult(job.batch.batch_id, job.vectors, dict(job.failed)))

    def _fail_job(self, job: _Job, exc: BaseException) -> None:
        self._jobs.discard(job)
        if not job.future.done():
            job.future.set_exception(exc)

    def _maybe_recycle(self, w: _Worker) -> None:
        cfg = self.config
        limit: int | None = None
        if cfg.recycle_rss_bytes is not None:
            limit = cfg.recycle_rss_bytes
        if cfg.recycle_growth_bytes is not None:
            # The arena legitimately keeps one batch's activations: growth beyond that counts.
            grown = (w.ready_rss + cfg.recycle_growth_bytes
                     + scaling.ACTIVATION_PER_TOKEN * self._policy.policy.batch_tokens)
            limit = grown if limit is None else min(limit, grown)
        if limit is None or w.rss <= limit or w.leave_reason is not None:
            return
        self._counters.recycles += 1
        self._emit(events.RECYCLE, worker_id=w.worker_id, pid=w.pid, rss=w.rss, limit=limit,
                   ready_rss=w.ready_rss)
        self._ask_leave(w, "recycle")

    def _ask_leave(self, w: _Worker, reason: str) -> None:
        w.leave_reason = reason
        if w.state == "busy":
            return  # it leaves after its current task (see handle_result)
        if w.state == "starting":
            self._kill_worker(w, reason)
            return
        w.state, w.leave_asked_at = "leaving", time.monotonic()
        try:
            w.conn.send(Leave(reason))
        except (OSError, ValueError):
            w.conn_open = False
        self._publish()

    def _kill_worker(self, w: _Worker, reason: str) -> None:
        w.kill_reason = reason
        _kill(w.process)

    def _apply(self, change: dict[str, Any] | None) -> None:
        """Emit the events for a policy change (the policy already holds the new values)."""
        if not change:
            return
        for name, fields in change.get("events", ()):
            self._emit(name, **fields)
        self._ensure_workers()

    def _break(self, exc: PoolBroken) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = exc
            self._intake_open = False
        self._emit(events.POOL_BROKEN, error=str(exc))
        for job in list(self._jobs):
            self._fail_job(job, exc)

    def _maybe_shutdown(self) -> None:
        if not self._closing or self._finished:
            return
        idle = (not self._inbox and not self._tasks and not self._jobs)
        if idle or time.monotonic() >= self._grace_deadline:
            self.shutdown()

    def _maybe_status(self) -> None:
        interval = self.config.status_interval_s
        now = time.monotonic()
        if not interval or now < self._next_status or not self.dim:
            return
        self._next_status = now + interval
        t0, n0 = self._status_mark
        done = self._counters.sequences_done
        self._status_mark = (now, done)
        self._emit(events.STATUS, batches_done=self._counters.batches_done,
                   sequences_done=done, seq_per_s=round((done - n0) / max(now - t0, 1e-9), 2),
                   workers=len(self._workers), target_workers=self._policy.target_workers,
                   batch_tokens=self._policy.batch_tokens, emergency=self._policy.emergency,
                   supervisor_rss=_own_rss(),
                   worker_rss={str(w.pid): w.rss for w in self._workers.values()})

    def _publish(self) -> None:
        """Refresh the snapshot that stats() reads from other threads (one atomic store)."""
        self._snapshot = tuple(WorkerInfo(w.worker_id, w.pid, w.state, w.rss, w.batches_done)
                               for w in self._workers.values())

    def _emit(self, name: str, **fields: Any) -> None:
        event = make_event(name, **fields)
        level = logging.WARNING if name in _WARN_EVENTS else logging.DEBUG
        log.log(level, "%s %s", name, fields)
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # a broken callback must not break the pool
            log.exception("embedpool on_event callback failed for %s", name)


class _Policy:
    """The supervisor's seam to ``resources`` (readings) and ``scaling`` (decisions).

    Holds the values in force (target workers, batch token budget, emergency) and turns each
    decision into events: every change returns ``{"events": [(name, fields), ...]}``.
    """

    def __init__(self, cfg: PoolConfig) -> None:
        self.limits = resources.detect_limits(max_memory=cfg.max_memory_bytes,
                                              profile=cfg.profile)
        self.plan = scaling.plan(self.limits, workers=cfg.workers, threads=cfg.threads,
                                 batch_tokens=cfg.batch_tokens, precision=cfg.precision,
                                 mem_used=resources.memory_used(self.limits),
                                 pool_used=resources.own_rss())
        policy = self.plan.policy
        if cfg.emergency_exit_s is not None:
            policy = dataclasses.replace(policy, emergency_exit_s=cfg.emergency_exit_s)
        self.policy = policy
        self.state = scaling.PolicyState(workers=policy.start_workers,
                                         batch_tokens=policy.batch_tokens)
        self.sampler = resources.Sampler(self.limits)
        self.history: deque[resources.Reading] = deque(maxlen=HISTORY_READINGS)
        self.threads = policy.threads_per_worker
        self.max_workers = policy.max_workers

    @property
    def target_workers(self) -> int:
        return self.state.workers

    @property
    def batch_tokens(self) -> int:
        return self.state.batch_tokens

    @property
    def emergency(self) -> bool:
        return self.state.emergency

    def describe(self) -> dict[str, Any]:
        return {"profile": self.limits.profile, "cpus": self.limits.cpus,
                "memory_limit": self.limits.memory_bytes,
                "memory_source": self.limits.memory_source,
                "max_workers": self.max_workers, "plan": list(self.plan.reasons)}

    def on_success(self, started_at: float) -> None:
        self.state = scaling.on_batch_success(self.state, started_at)

    def on_oom_kill(self, killed_tokens: int | None) -> dict[str, Any]:
        return self._adopt(scaling.on_oom_kill(self.state, self.policy, time.monotonic(),
                                               killed_tokens))

    def sample(self, pids: list[int], queued: int, done: int) -> dict[str, Any]:
        self.history.append(self.sampler.read(pids, queued, done))
        return self._adopt(scaling.decide(list(self.history), self.state, self.policy,
                                          time.monotonic()))

    def _adopt(self, d: scaling.Decision) -> dict[str, Any]:
        old = self.state
        self.state = d.state
        evs: list[tuple[str, dict[str, Any]]] = []
        reading = _reading_dict(self.history[-1] if self.history else None)
        if d.emergency != old.emergency:
            evs.append((events.EMERGENCY, {"on": d.emergency, "reason": d.reason,
                                           "reading": reading}))
        if (d.target_workers, d.batch_tokens) != (old.workers, old.batch_tokens):
            evs.append((events.SCALE, {
                "action": d.action, "workers_from": old.workers, "workers_to": d.target_workers,
                "batch_tokens_from": old.batch_tokens, "batch_tokens_to": d.batch_tokens,
                "reason": d.reason, "reading": reading}))
        return {"events": evs}


#: Readings kept for the policy: its trend window is 5 and its throughput learning looks at
#: the last two; 30 s of history is plenty and costs nothing.
HISTORY_READINGS = 30


def _reading_dict(reading: Any) -> dict[str, Any] | None:
    if reading is None:
        return None
    return {"cpu_percent": round(reading.cpu_percent, 1), "mem_used": reading.mem_used,
            "mem_limit": reading.mem_limit, "mem_fraction": round(reading.mem_fraction, 3),
            "pool_cpu_percent": round(reading.pool_cpu_percent, 1), "mem_scope": reading.mem_scope,
            "worker_rss": list(reading.worker_rss), "workers": reading.workers,
            "queue_depth": reading.queue_depth, "throughput": round(reading.throughput, 2)}


_WARN_EVENTS = frozenset({events.WORKER_DEATH, events.WORKER_HUNG_WARNING,
                          events.WORKER_HUNG_KILL, events.WORKER_START_FAILED,
                          events.POISON_ITEM, events.POOL_BROKEN, events.EMERGENCY})


def _kill(proc: BaseProcess) -> None:
    with contextlib.suppress(Exception):
        if proc.exitcode is None:
            proc.kill()


def _own_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)
