"""The work every executor draws from: submitted batches, their tasks, and what a failure does.

::

    any thread        submit(batch) -> Future ──> inbox ──┐   (wake() tells the manager)
    manager thread    next_task(budget) <─────────────────┘   retries first, then the next batch,
                        cut to the token budget (faults.cut_to_budget)
                      complete(task, rows)   rows into the batch's Assembly; whole -> result
                      fail(task, kind, error) faults.decide: split / retry / give up / fall
                                              back, with the event and the counter; returns
                                              the Decision so the transport can lower its
                                              budget or leave a lost device
                      requeue(task, reason)  back to the front, not blamed (it never ran)
                      deliver(task, result)  an inner executor's BatchResult (device executor)
                      fail_batch(task, exc)  the whole batch fails with an inner executor's error
                      break_(exc) / fail_unfinished(exc) / cancel_unstarted()

So a backend only moves bytes: it picks a worker, sends ``task.sequences``, and reports what
came back (rows, an exception, a death, a hang) in these words. Everything but ``submit``,
``close_intake`` and the read-only properties runs on the executor's one manager thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from embedpool import events, faults
from embedpool.errors import IntakeClosed, PoolBroken, PoolError
from embedpool.executor import BatchResult, Counters, WorkBatch
from embedpool.faults import Assembly, FailureKind, FaultPolicy, Task
from embedpool.types import Vectors


class WorkQueue:
    """Batches in, tasks out, under one fault policy (see the module docstring)."""

    def __init__(
        self,
        wake: Callable[[], None],
        emit: events.Emitter,
        policy: FaultPolicy | None = None,
        counters: Counters | None = None,
    ) -> None:
        self.policy = policy or FaultPolicy()
        self.counters = counters or Counters()
        #: Vector width; set by the executor once its first worker is ready.
        self.dim = 0
        self._wake = wake
        self._emit = emit
        self._lock = threading.Lock()  # guards _inbox, _open, _broken
        self._inbox: deque[tuple[Assembly, Future[BatchResult]]] = deque()
        self._open = True
        self._broken: PoolBroken | None = None
        self._tasks: deque[Task] = deque()  # manager only
        self._running: dict[Assembly, Future[BatchResult]] = {}  # manager only

    # -- any thread ----------------------------------------------------------------------

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        fut: Future[BatchResult] = Future()
        asm = Assembly.of(batch, self.dim)
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if not self._open:
                raise IntakeClosed("the executor is stopping and takes no new batches")
            if asm.complete:  # an empty batch
                fut.set_running_or_notify_cancel()
                fut.set_result(asm.result())
                return fut
            self._inbox.append((asm, fut))
        self._wake()
        return fut

    def close_intake(self) -> None:
        """No new batches from now on (submit raises IntakeClosed)."""
        with self._lock:
            self._open = False
        self._wake()

    @property
    def accepting(self) -> bool:
        return self._open

    @property
    def broken(self) -> PoolBroken | None:
        return self._broken

    @property
    def queued_batches(self) -> int:
        """Batches submitted and not started."""
        return len(self._inbox)

    # -- the manager thread -----------------------------------------------------------------

    @property
    def queued_tasks(self) -> int:
        """Tasks waiting for a worker, and batches not yet cut into tasks."""
        return len(self._tasks) + len(self._inbox)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing in flight."""
        return not self._inbox and not self._tasks and not self._running

    def next_task(self, budget: int | None) -> Task | None:
        """The next task to run: retried tasks first, then the next batch, cut to ``budget``
        padded tokens (None: as submitted). A queued task cut before the budget was lowered
        is cut again: sending it whole would repeat the failure the lower budget avoids."""
        while not self._tasks:
            with self._lock:
                if not self._inbox:
                    return None
                asm, fut = self._inbox.popleft()
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled while queued
            self._running[asm] = fut
            self._tasks.extend(faults.cut_to_budget(faults.whole(asm), budget))
        task = self._tasks.popleft()
        parts = faults.cut_to_budget(task, budget)
        self._tasks.extendleft(reversed(parts[1:]))
        return parts[0]

    def complete(self, task: Task, rows: Vectors) -> bool:
        """A task's rows arrived. Returns False (and fails the task as an engine error) when
        they have the wrong shape: a broken engine, not a crash."""
        want = (len(task.positions), self.dim)
        if rows.shape != want:
            self.fail(
                task,
                FailureKind.ENGINE_ERROR,
                f"engine returned shape {rows.shape}, expected {want}",
            )
            return False
        c = self.counters
        c.sequences_done += len(task.positions)
        c.tokens_done += task.tokens
        if task.assembly.fill(task.positions, rows):
            self._finish(task.assembly)
        return True

    def deliver(self, task: Task, result: BatchResult) -> bool:
        """The ``result`` of an executor this one hands the task's positions to, in order (the
        device executor's members, which do their own fault handling): its rows, its
        given-up items as given up here, and the precision that made them. Returns False
        (the task failed as an engine error) when its rows have the wrong shape."""
        asm = task.assembly
        if result.precision is not None:
            asm.precision = result.precision
        if not result.failed:
            return self.complete(task, result.vectors)
        want = (len(task.positions), self.dim)
        if result.vectors.shape != want:
            self.fail(
                task,
                FailureKind.ENGINE_ERROR,
                f"engine returned shape {result.vectors.shape}, expected {want}",
            )
            return False
        keep = [i for i in range(len(task.positions)) if i not in result.failed]
        done = False
        if keep:
            positions = tuple(task.positions[i] for i in keep)
            self.counters.sequences_done += len(keep)
            self.counters.tokens_done += sum(len(asm.batch.sequences[p]) for p in positions)
            done = asm.fill(positions, result.vectors[keep])
        for i, message in sorted(result.failed.items()):
            done = asm.give_up(task.positions[i], message)
        if done:
            self._finish(asm)
        return True

    def fail_batch(self, task: Task, exc: BaseException) -> None:
        """The task's whole batch fails with ``exc``: what an executor this one hands it to
        raised, where running it elsewhere would not help (``faults.falls_back``)."""
        asm = task.assembly
        self._tasks = deque(t for t in self._tasks if t.assembly is not asm)
        fut = self._running.pop(asm, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def fail(self, task: Task, kind: FailureKind, error: str) -> faults.Decision:
        """A task failed: split it, retry it, or give up on its one item (``faults.decide``)."""
        task.tries += 1
        task.last_error = error
        task.suspect = True
        decision = faults.decide(
            kind,
            items=len(task.positions),
            tries=task.tries,
            padded_tokens=task.padded_tokens,
            policy=self.policy,
        )
        c = self.counters
        if decision.action == "split":
            a, b = faults.halves(task)
            c.splits += 1
            self._emit(
                events.SPLIT,
                batch_id=task.batch_id,
                items=len(task.positions),
                halves=[len(a.positions), len(b.positions)],
                kind=str(kind),
                reason=error,
            )
            self._tasks.extendleft((b, a))
        elif decision.action == "fall_back":
            # the device failed, not the input: back to the front for the transport to run
            # elsewhere once it has left the device (faults.decide charges it one try)
            c.retries += 1
            self._emit(
                events.RETRY,
                attempt=task.tries + 1,
                kind=str(kind),
                reason=error,
                item_id=task.item_id(),
                **task.describe(),
            )
            self._tasks.appendleft(task)
        elif decision.action == "retry":
            c.retries += 1
            self._emit(
                events.RETRY,
                attempt=task.tries + 1,
                kind=str(kind),
                reason=error,
                item_id=task.item_id(),
                **task.describe(),
            )
            self._tasks.appendleft(task)
        else:
            message = faults.give_up_message(task, kind, error)
            c.poison_items += 1
            self._emit(
                events.POISON_ITEM,
                batch_id=task.batch_id,
                position=task.positions[0],
                item_id=task.item_id(),
                kind=str(kind),
                tries=task.tries,
                error=message,
            )
            if task.assembly.give_up(task.positions[0], message):
                self._finish(task.assembly)
        return decision

    def requeue(self, task: Task, reason: str, *, suspect: bool = False) -> None:
        """Put back, unblamed, a task that may not have run (it was queued on a worker that
        died); ``suspect`` when it may also have been the one running."""
        task.suspect = task.suspect or suspect
        self.counters.retries += 1
        self._emit(
            events.RETRY,
            attempt=task.tries + 1,
            kind="not_blamed",
            reason=reason,
            item_id=task.item_id(),
            **task.describe(),
        )
        self._tasks.appendleft(task)

    def unget(self, task: Task) -> None:
        """Put back a task ``next_task`` just gave out and the transport could not place."""
        self._tasks.appendleft(task)

    def break_(self, exc: PoolBroken) -> None:
        """The executor cannot go on: refuse new batches and fail every one not finished."""
        with self._lock:
            if self._broken is None:
                self._broken = exc
            self._open = False
        self._emit(events.POOL_BROKEN, error=str(exc))
        self.fail_unfinished(self._broken or exc)

    def fail_unfinished(self, exc: BaseException | None = None) -> None:
        """Fail every batch not finished (shutdown): running ones with ``exc`` or a message
        naming what was left, queued ones with ``exc`` or "closed"."""
        for asm, fut in list(self._running.items()):
            del self._running[asm]
            if not fut.done():
                n = len(asm.batch.sequences)
                fut.set_exception(
                    exc
                    or PoolError(
                        f"the executor closed with batch {asm.batch.batch_id} unfinished "
                        f"({asm.remaining} of {n} items left)"
                    )
                )
        self._tasks.clear()
        self.cancel_unstarted(exc)

    def cancel_unstarted(self, exc: BaseException | None = None) -> None:
        with self._lock:
            leftover = list(self._inbox)
            self._inbox.clear()
        for _, fut in leftover:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc or PoolError("the executor closed"))

    def _finish(self, asm: Assembly) -> None:
        fut = self._running.pop(asm, None)
        self.counters.batches_done += 1
        if fut is not None and not fut.done():
            fut.set_result(asm.result())
