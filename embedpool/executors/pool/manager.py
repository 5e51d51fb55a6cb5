"""The pool's manager thread: owns every worker pipe and all pool state, one verb per step.

::

    WorkQueue (tasks, faults) ──next_task(budget)──> dispatch ── Embed(task) ──> worker_main
    wakeup pipe ─────┐                                                            engine.embed
    worker pipes ────┼─> wait(..., timeout = next deadline) ─┬ Result     -> handle_result
    worker sentinels ┘                                       ├ TaskFailed -> handle_task_failed
                                                             ├ Ready/StartFailed/Leaving
                                                             └ sentinel   -> handle_death
    check_deadlines: warn at 60% of a task's deadline, kill a hung worker at 100%
    apply_scaling:   Sampler reading -> scaling (through Autoscaler) -> spawn / ask to Leave / budget
    shutdown:        fail what is left, Leave to all, kill stragglers

The manager decides nothing about failures or sizes itself: a death is classified from its
evidence (the exit signal, the worker's cgroup ``oom_kill`` counter: ``cgroups.OomEvidence``)
into a ``faults.FailureKind`` and handed to the ``WorkQueue`` (split, retry or give up); an
out-of-memory decision lowers the budget through the ``Autoscaler``. It blocks on
``multiprocessing.connection.wait`` and never polls ``is_alive()``, so a death is seen the
moment the kernel reaps it. Messages are read before deaths in one round: a worker's last
``Result`` or ``Leaving`` is in its pipe before its sentinel fires, and must not be taken for
a crash.

Workers are spawned only from this thread: PR_SET_PDEATHSIG fires when the *thread* that
forked a child exits, so a pool built on a short-lived thread would lose its workers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from embedpool import events, faults
from embedpool.errors import (
    DeviceLost,
    PoolBroken,
    PoolError,
    WorkersCannotStart,
    WorkerStartError,
)
from embedpool.events import Emitter, exit_name
from embedpool.executor import WorkerInfo, WorkerState
from embedpool.executors.pool import memory
from embedpool.executors.pool import protocol as wire
from embedpool.executors.pool.autoscaler import Autoscaler, Changes
from embedpool.executors.pool.cgroups import OomEvidence
from embedpool.executors.pool.config import PoolConfig
from embedpool.executors.pool.worker import worker_main
from embedpool.faults import FailureKind, Task
from embedpool.proc import rss_bytes
from embedpool.workqueue import WorkQueue

log = logging.getLogger("embedpool.executors.pool")

#: Longest the manager sleeps when nothing is due: an upper bound on how late a deadline is
#: noticed if a timer computation is off, not a polling interval (events wake it at once).
MAX_WAIT_S = 1.0


class Waker:
    """A self-pipe: ``wake()`` from any thread makes the manager's ``wait()`` return."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()  # never write to a closed (and perhaps reused) fd
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError, OSError):  # full pipe: already awake
                os.write(self._w, b"x")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.fd, 4096):
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in (self.fd, self._w):
                with contextlib.suppress(OSError):
                    os.close(fd)


@dataclass(eq=False)
class WorkerRecord:
    """The manager's record of one worker process."""

    worker_id: int
    process: BaseProcess
    conn: Connection
    started: float
    state: WorkerState = "starting"
    pid: int | None = None
    conn_open: bool = True
    task: Task | None = None
    task_started: float = 0.0
    warned: bool = False
    rss: int = 0
    ready_rss: int = 0
    batches_done: int = 0
    leave_reason: str | None = None  # set when asked to leave
    leave_asked_at: float = 0.0
    said_leaving: bool = False
    kill_reason: str | None = None  # set when the pool killed it
    hung: bool = False  # killed for a hang: its task failed as HUNG
    start_failure: wire.StartFailed | None = None


class Manager:
    """The body of the pool's manager thread (see the module docstring)."""

    def __init__(
        self,
        spec_blob: bytes,
        config: PoolConfig,
        work: WorkQueue,
        emit: Emitter,
        waker: Waker,
        ctx: BaseContext,
    ) -> None:
        self.config = config
        self.work = work
        self.emit = emit
        self.waker = waker
        self.scaler = Autoscaler(config)
        self.threads = self.scaler.threads
        self.dim = 0
        #: Set once the first worker is ready (or the pool failed to start).
        self.first_ready = threading.Event()
        self.start_error: BaseException | None = None
        #: Set by the facade: finish what is submitted, by ``grace_deadline``, then stop.
        self.closing = False
        self.grace_deadline = float("inf")
        self.finished = False
        #: Refreshed after every step; what stats() reads from other threads.
        self.snapshot: tuple[WorkerInfo, ...] = ()
        self._spec_blob = spec_blob
        self._ctx = ctx
        self._workers: dict[int, WorkerRecord] = {}
        self._worker_ids = itertools.count()
        self._oom = OomEvidence()
        self._start_failures_in_row = 0
        self._spawn_not_before = 0.0
        self._next_sample = 0.0
        self._next_status = 0.0
        self._status_mark = (time.monotonic(), 0)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.apply_scaling(force=True)
            while not self.finished:
                self.dispatch()
                ready = wait(self._wait_objects(), timeout=self._wait_timeout())
                self._handle_ready(ready)
                self.check_deadlines()
                self.apply_scaling()
                self._maybe_status()
                self._maybe_shutdown()
                self._publish()
        except BaseException as exc:
            log.exception("embedpool pool manager crashed")
            self._break(PoolBroken(f"the pool's manager failed: {exc!r}\n{traceback.format_exc()}"))
            self.shutdown()
        finally:
            self.first_ready.set()  # never leave Pool() waiting
            self.waker.close()

    def _wait_objects(self) -> list[Any]:
        objs: list[Any] = [self.waker.fd]
        for w in self._workers.values():
            if w.conn_open:
                objs.append(w.conn)
            objs.append(w.process.sentinel)
        return objs

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        due = [self._next_sample, self.grace_deadline]
        if self._spawn_not_before > now:  # a respawn backoff is running (0.0: none is);
            # an expired one must not count, or wait() gets timeout 0 and this thread spins
            due.append(self._spawn_not_before)
        if self.config.status_interval_s:
            due.append(self._next_status)
        for w in self._workers.values():
            if w.state == "starting":
                due.append(w.started + self.config.start_timeout_s)
            elif w.state == "leaving":
                due.append(w.leave_asked_at + self.config.leave_timeout_s)
        return faults.wait_s(self.work.policy, self._running(), now, list(due), MAX_WAIT_S)

    def _handle_ready(self, ready: list[Any]) -> None:
        by_conn = {id(w.conn): w for w in self._workers.values()}
        by_sentinel = {w.process.sentinel: w for w in self._workers.values()}
        dead: list[WorkerRecord] = []
        for obj in ready:
            if obj == self.waker.fd:
                self.waker.drain()
            elif id(obj) in by_conn:
                self._receive(by_conn[id(obj)])
            elif obj in by_sentinel:
                dead.append(by_sentinel[obj])
        for w in dead:  # messages first, deaths after (see the module docstring)
            self.handle_death(w)

    def _receive(self, w: WorkerRecord) -> None:
        """Read every message the worker has sent so far."""
        while w.conn_open:
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                w.conn_open = False  # the sentinel tells how it ended
                return
            if isinstance(msg, wire.Result):
                self.handle_result(w, msg)
            elif isinstance(msg, wire.Ready):
                self._on_ready(w, msg)
            elif isinstance(msg, wire.TaskFailed):
                self.handle_task_failed(w, msg)
            elif isinstance(msg, wire.Leaving):
                w.said_leaving = True
            elif isinstance(msg, wire.StartFailed):
                w.start_failure = msg

    # -- verbs ----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Give every idle worker a task, cut to the budget in force."""
        for w in self._workers.values():
            if w.state != "idle" or w.leave_reason is not None:
                continue
            task = self.work.next_task(self.scaler.batch_tokens)
            if task is None:
                return
            try:
                w.conn.send(wire.Embed(task.task_id, task.sequences, task.prompt_lengths))
            except (OSError, ValueError):  # it just died; the sentinel will say how
                w.conn_open = False
                self.work.requeue(task, f"worker {w.worker_id} died before it got the task")
                continue
            w.state, w.task, w.task_started, w.warned = "busy", task, time.monotonic(), False
        self._publish()

    def handle_result(self, w: WorkerRecord, msg: wire.Result) -> None:
        task = w.task
        if task is None or task.task_id != msg.task_id:  # pragma: no cover - protocol bug
            log.error(
                "worker %s sent a result for task %s it was not given", w.worker_id, msg.task_id
            )
            return
        w.task, w.state, w.rss = None, "idle", msg.rss
        if self.work.complete(task, msg.vectors):
            w.batches_done += 1
            self.scaler.on_success(w.task_started)
        self._maybe_recycle(w)
        if w.leave_reason is not None:  # asked to leave while busy
            self._ask_leave(w, w.leave_reason)

    def handle_task_failed(self, w: WorkerRecord, msg: wire.TaskFailed) -> None:
        task = w.task
        w.task, w.state = None, "idle"
        if task is None:  # pragma: no cover - protocol bug
            return
        log.warning("worker %s: embed raised %s\n%s", w.worker_id, msg.error, msg.traceback)
        self._fail(task, FailureKind(msg.kind), msg.error)
        if w.leave_reason is not None:
            self._ask_leave(w, w.leave_reason)

    def handle_death(self, w: WorkerRecord) -> None:
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
        how = faults.exit_kind(
            said_leaving=w.said_leaving,
            asked_to_leave=w.leave_reason is not None,
            holding_task=w.task is not None,
            starting=w.state == "starting",
            exit_code=code,
        )
        if how == "left":
            self._oom.forget(w)
            self.emit(
                events.WORKER_EXIT,
                worker_id=w.worker_id,
                pid=w.pid,
                reason=w.leave_reason or "asked",
                exit=exit_name(code),
            )
            self._publish()
            return
        if how == "stopped_while_starting":
            self.emit(
                events.WORKER_EXIT,
                worker_id=w.worker_id,
                pid=w.pid,
                reason="stopped while starting",
                exit=exit_name(code),
            )
            self._publish()
            return
        if how == "start_failure":
            self._on_start_failure(w, code)
            return
        sigkill = code == -signal.SIGKILL and w.kill_reason is None
        oom, evidence = self._oom.confirm(w) if sigkill else (False, exit_name(code))
        kind = faults.death_kind(hung=w.hung, oom_confirmed=oom, sigkill=sigkill)
        if kind is FailureKind.HUNG:
            evidence = w.kill_reason or evidence
        c = self.work.counters
        c.deaths += 1
        c.oom_kills += kind is FailureKind.OOM_KILL
        c.external_sigkills += kind is FailureKind.EXTERNAL_SIGKILL
        task = w.task
        # who is charged: faults.blame (a worker holds one task; none: memory is tight after
        # an OOM kill whatever it was doing)
        who = faults.blame([task.padded_tokens] if task else [], kind, hung=w.hung)
        self.emit(
            events.WORKER_DEATH,
            worker_id=w.worker_id,
            pid=w.pid,
            exit=exit_name(code),
            exitcode=code,
            kind=str(kind),
            cause=faults.death_cause(kind, evidence),
            blamed=who.running is not None or task is None,
            **(task.describe() if task else {"items": 0, "tokens": 0}),
        )
        if task is not None and who.running is not None:
            self._fail(task, kind, f"worker pid {w.pid} died: {exit_name(code)}")
        elif who.lower_budget:
            self._apply(self.scaler.on_oom(who.forbid_tokens))
        self._publish()

    def check_deadlines(self) -> None:
        """Hung workers, workers that never became ready, workers that never left."""
        now = time.monotonic()
        cfg = self.config
        for v in faults.hang_verdicts(self.work.policy, self._running(), now):
            w = v.key
            assert w.task is not None
            fields = {"worker_id": w.worker_id, "pid": w.pid, **v.fields(), **w.task.describe()}
            if v.verdict == "warn":
                w.warned = True
                self.emit(events.WORKER_HUNG_WARNING, **fields)
            else:
                self.work.counters.hung_kills += 1
                self.emit(events.WORKER_HUNG_KILL, **fields)
                w.hung = True
                self._kill_worker(w, v.reason)
        for w in list(self._workers.values()):
            if w.kill_reason is not None:
                continue
            if w.state == "starting" and now - w.started >= cfg.start_timeout_s:
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
            queued = self.work.queued_tasks + sum(1 for w in live if w.state == "busy")
            self._apply(
                self.scaler.sample(
                    [w.pid for w in live if w.pid is not None],
                    queued,
                    self.work.counters.sequences_done,
                )
            )
        self._ensure_workers()

    def shutdown(self) -> None:
        """Fail what is left, ask every worker to leave, kill the ones that do not."""
        self.finished = True
        self.work.close_intake()
        self.work.fail_unfinished(self.work.broken)
        for w in self._workers.values():
            if w.state == "idle" and w.conn_open:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(wire.Leave("shutdown"))
            else:
                kill(w.process)
        deadline = time.monotonic() + self.config.leave_timeout_s
        procs = [w.process for w in self._workers.values()]
        while procs and time.monotonic() < deadline:
            wait([p.sentinel for p in procs], timeout=deadline - time.monotonic())
            procs = [p for p in procs if p.exitcode is None]
        for p in procs:
            kill(p)
        for w in self._workers.values():
            w.process.join(timeout=5.0)
            w.conn.close()
        self._workers.clear()
        self._publish()
        self.emit(events.POOL_STOP, **vars(self.work.counters))

    def kill_all(self) -> None:
        """Last resort from another thread when this one is stuck."""
        for w in list(self._workers.values()):
            kill(w.process)

    # -- helpers of the verbs --------------------------------------------------------------

    def _fail(self, task: Task, kind: FailureKind, error: str) -> None:
        decision = self.work.fail(task, kind, error)
        if decision.lower_budget:
            self._apply(self.scaler.on_oom(decision.forbid_tokens))
        elif decision.action == "fall_back":
            # The GPU is gone for every worker of this pool; the CPU is not: the device
            # executor (executors/devices.py) takes the batches this fails and runs them there.
            self._break(DeviceLost(f"{self.config.device} was lost: {error}"))
            self.shutdown()

    def _spawn(self) -> None:
        wid = next(self._worker_ids)
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            name=f"embedpool-worker-{wid}",
            daemon=True,
            args=(
                child_conn,
                self._spec_blob,
                wid,
                self.threads,
                os.getpid(),
                self.config.recycle_rss_bytes,
            ),
        )
        proc.start()
        child_conn.close()  # ours is closed so that the worker's death gives us EOF
        self._workers[wid] = WorkerRecord(wid, proc, parent_conn, time.monotonic(), pid=proc.pid)
        self.emit(events.WORKER_START, worker_id=wid, pid=proc.pid)
        self._publish()

    def _ensure_workers(self) -> None:
        if self.finished or self.closing or self.work.broken is not None:
            return
        staying = [w for w in self._workers.values() if w.leave_reason is None]
        missing = self.scaler.target_workers - len(staying)
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

    def _on_ready(self, w: WorkerRecord, msg: wire.Ready) -> None:
        w.state, w.pid, w.rss, w.ready_rss = "idle", msg.pid, msg.rss, msg.rss
        self._oom.watch(w, msg.pid)
        self._start_failures_in_row = 0
        self._spawn_not_before = 0.0
        self.emit(
            events.WORKER_READY,
            worker_id=w.worker_id,
            pid=msg.pid,
            rss=msg.rss,
            seconds=round(time.monotonic() - w.started, 3),
        )
        if not self.dim:
            self.dim = self.work.dim = msg.dim
            self.emit(
                events.POOL_START,
                workers=self.scaler.target_workers,
                threads=self.threads,
                batch_tokens=self.scaler.batch_tokens,
                start_method=self.config.start_method,
                **self.scaler.describe(),
            )
            self.first_ready.set()
            self._ensure_workers()  # now start the rest
        elif msg.dim != self.dim:  # pragma: no cover - a spec that is not deterministic
            raise PoolError(f"worker {w.worker_id} reports dim {msg.dim}, pool has {self.dim}")
        self._publish()

    def _on_start_failure(self, w: WorkerRecord, code: int | None) -> None:
        c = self.work.counters
        c.start_failures += 1
        self._start_failures_in_row += 1
        sf = w.start_failure
        if sf is not None:
            error, tb = sf.error, sf.traceback
        else:
            error = f"worker died while starting: {exit_name(code)}" + (
                f" ({w.kill_reason})" if w.kill_reason else ""
            )
            tb = ""
        self.emit(
            events.WORKER_START_FAILED,
            worker_id=w.worker_id,
            pid=w.pid,
            error=error,
            exit=exit_name(code),
            traceback=tb,
        )
        message = f"worker {w.worker_id} (pid {w.pid}) failed to load its engine: {error}" + (
            f"\n\nworker traceback:\n{tb}" if tb else ""
        )
        alive = sum(x.state in ("idle", "busy") for x in self._workers.values())
        decision = faults.start_failure(
            self.work.policy,
            failures_in_row=self._start_failures_in_row,
            ever_ready=bool(self.dim),
            alive=alive,
        )
        if decision.action == "retry":
            self._spawn_not_before = time.monotonic() + decision.backoff_s
            return
        if not self.dim:
            self.start_error = WorkerStartError(message)
            self._break(PoolBroken(message))
            self.first_ready.set()
        else:
            self._break(WorkersCannotStart(f"{decision.reason}; last: {message}"))
        self.shutdown()

    def _maybe_recycle(self, w: WorkerRecord) -> None:
        cfg = self.config
        # the arena legitimately keeps one batch's activations (for a long-context model, one
        # max-length sequence's): growth beyond that counts
        limit = faults.recycle(
            rss=w.rss,
            ready_rss=w.ready_rss,
            rss_limit=cfg.recycle_rss_bytes,
            growth_limit=cfg.recycle_growth_bytes,
            arena_bytes=memory.activation_estimate(
                self.scaler.planned_batch_tokens, cfg.model_memory
            ),
            leaving=w.leave_reason is not None,
        )
        if limit is None:
            return
        self.work.counters.recycles += 1
        self.emit(
            events.RECYCLE,
            worker_id=w.worker_id,
            pid=w.pid,
            rss=w.rss,
            limit=limit,
            ready_rss=w.ready_rss,
        )
        self._ask_leave(w, "recycle")

    def _ask_leave(self, w: WorkerRecord, reason: str) -> None:
        w.leave_reason = reason
        if w.state == "busy":
            return  # it leaves after its current task (see handle_result)
        if w.state == "starting":
            self._kill_worker(w, reason)
            return
        w.state, w.leave_asked_at = "leaving", time.monotonic()
        try:
            w.conn.send(wire.Leave(reason))
        except (OSError, ValueError):
            w.conn_open = False
        self._publish()

    def _running(self) -> list[faults.Running]:
        """The busy workers' tasks, for the hang rule (``faults.hang_verdicts``)."""
        return [
            faults.Running(w, w.task_started, w.task.padded_tokens, w.warned)
            for w in self._workers.values()
            if w.state == "busy" and w.task is not None and w.kill_reason is None
        ]

    def _kill_worker(self, w: WorkerRecord, reason: str) -> None:
        w.kill_reason = reason
        kill(w.process)

    def _apply(self, changes: Changes) -> None:
        """Emit the events of a policy change (the scaler already holds the new values)."""
        for name, fields in changes:
            self.emit(name, **fields)
        self._ensure_workers()

    def _break(self, exc: PoolBroken) -> None:
        self.work.break_(exc)

    def _maybe_shutdown(self) -> None:
        if not self.closing or self.finished:
            return
        if self.work.idle or time.monotonic() >= self.grace_deadline:
            self.shutdown()

    def _maybe_status(self) -> None:
        interval = self.config.status_interval_s
        now = time.monotonic()
        if not interval or now < self._next_status or not self.dim:
            return
        self._next_status = now + interval
        t0, n0 = self._status_mark
        c = self.work.counters
        done = c.sequences_done
        self._status_mark = (now, done)
        self.emit(
            events.STATUS,
            batches_done=c.batches_done,
            sequences_done=done,
            seq_per_s=round((done - n0) / max(now - t0, 1e-9), 2),
            workers=len(self._workers),
            target_workers=self.scaler.target_workers,
            batch_tokens=self.scaler.batch_tokens,
            emergency=self.scaler.emergency,
            supervisor_rss=rss_bytes() or 0,
            worker_rss={str(w.pid): w.rss for w in self._workers.values()},
        )

    def _publish(self) -> None:
        """Refresh the snapshot that stats() reads from other threads (one atomic store)."""
        self.snapshot = tuple(
            WorkerInfo(w.worker_id, w.pid, w.state, w.rss, w.batches_done)
            for w in self._workers.values()
        )


def kill(proc: BaseProcess) -> None:
    with contextlib.suppress(Exception):
        if proc.exitcode is None:
            proc.kill()
