"""``RayExecutor``: embedpool's batches on a pool of Ray actors, one engine per actor.

The job is the same as on the local pool: it resolves the model, tokenises, plans
``WorkBatch``es by padded-token budget and caches vectors on the driver. Only
``Engine.embed`` moves into Ray actors::

    caller threads             WorkQueue             manager thread (Ray calls)             Ray cluster
    submit(WorkBatch) -> Future ─> inbox ─────────>  dispatch: next_task(budget) ─embed──>  EmbedActor
    run(batches)                   tasks, retries <─ ray.wait(results, starts, deadline)     (<= 2 queued
                                   Future results     ├ rows       -> complete                each)
                                                      ├ embed raised -> fail(engine error)
                                                      ├ actor died -> fail(its running task,
                                                      │   OOM if Ray's OutOfMemoryError or its
                                                      │   cgroup's oom_kill rose); requeue the
                                                      │   tasks queued behind it; replace it
                                                      └ silent past its deadline -> kill it,
                                                          fail(hung); replace it
    prepare_onnx once --ray.put--> [object store: ONNX bytes + sha256] (shipping.py)

What a failure means (split, retry, give up, lower the budget) is ``faults.py``'s, the same
rules as the local pool's; the hung-actor deadline is the pool's too (``FaultPolicy``: base +
per-token, warning at 60%, kill and replace at 100%). This module only moves bytes and reads
what Ray reports (``cluster.failure_of``).

Why an actor pool driven by ``ray.wait`` rather than ``ray.util.ActorPool`` or Ray Data
    Ray Data ``map_batches(Callable, concurrency=(min, max))`` owns the batch boundaries and
    the retries: a task whose actor dies is retried *at the same size*, so an out-of-memory
    kill repeats itself (ray #45257), and one input that kills its actor fails the whole
    dataset. embedpool splits the dead batch, bounds the retries per input and returns a
    per-item error; none of that is reachable from inside ``map_batches``, which would also
    re-plan batches already cut by token budget and pull Arrow into a path that moves token
    ids. ``ray.util.ActorPool`` keeps a dead actor in its idle list and cannot replace it.
    So actors run with ``max_restarts=0, max_task_retries=0``: Ray reports a death once and
    embedpool decides.

Which task killed the actor
    An actor runs one task at a time (``max_concurrency=1``) in submission order, so when it
    dies the oldest of its unfinished tasks was the one running; the others were only queued
    behind it and go back to the queue without blame. The running task's clock (for the hang
    deadline) starts when the task before it returned.

Resources per actor
    ``num_cpus=cpus_per_actor`` (the engine gets ``max(1, round(cpus_per_actor))`` intra-op
    threads) and, if given, ``memory=memory_per_actor`` bytes, which Ray uses for scheduling
    only. With ``actors=None`` the executor starts ``floor(cluster CPUs / cpus_per_actor)``
    actors; ``actors=(min, max)`` starts ``min`` and adds one at a time, up to ``max``, while
    work is waiting and the cluster has a free ``cpus_per_actor``. One CPU per actor by
    default: 2 processes x 1 thread beat 1 x 2 here.

The token budget
    Tasks are cut to ``batch_tokens`` (the job plans its batches to the same budget, so
    normally nothing is cut). An out-of-memory failure halves it; it is doubled back after
    ``BUDGET_CALM_S`` without one, never to a size that ran out of memory (``faults``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from embedpool import events, executor, faults
from embedpool.backends.ray import cluster
from embedpool.backends.ray.actor import EmbedActor
from embedpool.backends.ray.shipping import ModelShipment, ship_model
from embedpool.batching import DEFAULT_BATCH_TOKENS
from embedpool.errors import ConfigError, PoolBroken, PoolError, WorkerStartError
from embedpool.executor import BatchResult, ExecutorStats, WorkBatch, WorkerInfo
from embedpool.faults import FailureKind, FaultPolicy, Task
from embedpool.pool.cgroups import OomEvidence
from embedpool.types import EventCallback, Vectors
from embedpool.workqueue import WorkQueue

log = logging.getLogger("embedpool.ray")

#: Batches queued on one actor: one running plus one waiting hides the round trip between
#: batches (result to driver, next batch to actor). More only puts more batches at risk
#: when the actor dies and holds more token ids in the object store.
MAX_INFLIGHT_PER_ACTOR = 2
#: Longest ray.wait blocks when every actor is busy: results wake it at once, this only
#: bounds how late growth and deadlines are looked at.
WAIT_TICK_S = 1.0
#: ray.wait's timeout while an actor has room and nothing is queued: ray.wait cannot be woken
#: by a submit, so this is the most a new batch waits for an idle actor. 20 ms is below one
#: batch's time (~50-500 ms) and costs ~50 cheap local calls a second while idle.
IDLE_POLL_S = 0.02
#: After an actor dies, how long to let the results it sent before dying arrive: a result
#: still on its way would make the task that produced it look like the one that was running
#: (one wrong blame: an extra split and a repeat of the real death). Every ref of a dead
#: actor resolves (to a result or to ActorDiedError) within milliseconds; this only bounds it.
DEATH_SETTLE_S = 2.0
#: Minimum seconds between two asks for the cluster's free CPUs (a GCS round trip).
GROW_CHECK_S = 1.0
#: First actor start: a fresh node may need to start a worker process, fetch ~25-90 MB of
#: ONNX from the object store and load it; an autoscaling cluster may need minutes to add
#: a node. Beyond this the cluster cannot place the actor, and we say so.
ACTOR_START_TIMEOUT_S = 300.0
#: Replacement actors that fail to start in a row before the executor breaks (PoolBroken).
MAX_START_FAILURES = 3
#: Time without an out-of-memory failure before the lowered budget is doubled back: the
#: local pool's calm period (scaling: 20 s on the cloud and local profiles). Ray gives the
#: driver no memory readings of the cluster, so calm is measured in time alone.
BUDGET_CALM_S = 20.0
#: Smallest budget an OOM lowers it to: one full-length sequence of the default model.
MIN_BUDGET_TOKENS = 256


@dataclass(eq=False)
class _Slot:
    """One actor: its handle and its unfinished tasks, in submission order."""

    handle: Any
    name: str
    worker_id: int
    ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    inflight: deque[tuple[Any, Task]] = field(default_factory=deque)
    started: float = field(default_factory=time.monotonic)
    head_started: float = 0.0  # when its oldest unfinished task began to run
    warned: bool = False
    batches_done: int = 0

    def fields(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "actor": self.name, "pid": self.info.get("pid"),
                "node": self.info.get("node")}


@dataclass
class _Budget:
    """The padded-token budget in force, lowered on OOM and restored after calm."""

    planned: int
    current: int
    floor: int
    forbidden: int | None = None
    last_oom_at: float | None = None


class RayExecutor:
    """Runs WorkBatches on a pool of Ray actors (see the module docstring)."""

    def __init__(self, spec: Any, *, address: str | None = None,
                 actors: int | tuple[int, int] | None = None, cpus_per_actor: float = 1.0,
                 memory_per_actor: int | None = None,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, policy: FaultPolicy | None = None,
                 on_event: EventCallback | None = None) -> None:
        if cpus_per_actor <= 0:
            raise ConfigError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
        if memory_per_actor is not None and memory_per_actor <= 0:
            raise ConfigError(f"memory_per_actor must be > 0 bytes, got {memory_per_actor}")
        if batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if isinstance(actors, int | tuple):
            cluster.actor_range(actors, 1.0, cpus_per_actor)  # validate before touching Ray
        self._ray = cluster.require_ray()
        self._spec = spec
        self._cpus = cpus_per_actor
        self._memory = memory_per_actor
        self._threads = max(1, round(cpus_per_actor))
        self._emit = events.Emitter(on_event, log, backend="ray")
        self._wake = threading.Event()
        self._work = WorkQueue(self._wake.set, self._emit, policy)
        floor = min(MIN_BUDGET_TOKENS, batch_tokens)
        self._budget = _Budget(batch_tokens, batch_tokens, floor)
        self._slots: list[_Slot] = []
        self._inflight: dict[Any, _Slot] = {}
        self._starting: dict[Any, _Slot] = {}
        self._oom = OomEvidence()
        self._node = ""
        self._start_failures = 0
        self._ever_ready = False
        self._worker_ids = itertools.count()
        self._last_grow_check = 0.0
        self._closing = False
        self._grace_deadline = float("inf")
        self._closed = False
        self._snapshot: tuple[WorkerInfo, ...] = ()
        self._handles: tuple[Any, ...] = ()
        self._thread: threading.Thread | None = None
        self._shipment: ModelShipment | None = None
        self._owns_ray = cluster.connect(self._ray, address)
        try:
            self._node = self._ray.get_runtime_context().get_node_id()
            from embedpool.engine import EngineSpec

            if isinstance(spec, EngineSpec):
                self._shipment = ship_model(spec, self._ray)
            cpus = float(self._ray.cluster_resources().get("CPU", 0.0))
            self.min_actors, self.max_actors = cluster.actor_range(actors, cpus, cpus_per_actor)
            self._remote = self._ray.remote(EmbedActor)
            for _ in range(self.min_actors):
                self._start_actor()
            self.dim = self._work.dim = self._await_first_ready()
        except BaseException:
            self._shutdown_actors()
            self._disconnect()
            raise
        self._emit(events.POOL_START, workers=self.min_actors, threads=self._threads,
                   batch_tokens=self._budget.current, max_workers=self.max_actors)
        self._publish()
        self._thread = threading.Thread(target=self._manage, name="embedpool-ray-manager",
                                        daemon=True)
        self._thread.start()

    # -- the executor contract ------------------------------------------------------------

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        return self._work.submit(batch)

    def run(self, batches: Iterable[WorkBatch], max_pending: int | None = None
            ) -> Generator[BatchResult, None, None]:
        """``executor.run`` over these actors (bounded look-ahead, any order)."""
        if self._closed:
            raise PoolError("RayExecutor.run after close()")
        return executor.run(self, batches, max_pending)

    def stats(self) -> ExecutorStats:
        return ExecutorStats.of(self._work.counters, backend="ray", workers=self._snapshot,
                                target_workers=len(self._snapshot), max_workers=self.max_actors,
                                threads=self._threads, batch_tokens=self._budget.current,
                                queued=self._work.queued_batches)

    @property
    def broken(self) -> str | None:
        exc = self._work.broken
        if exc is not None:
            return str(exc)
        if self._thread is not None and not self._thread.is_alive() and not self._closing:
            return "the Ray executor's manager thread is gone"
        return None

    @property
    def handles(self) -> list[Any]:
        """Handles of the live actors (for operators and fault tests)."""
        return list(self._handles)

    def close(self, grace_s: float = 10.0) -> None:
        """Finish submitted batches within ``grace_s``, kill the actors, free the shipped
        model, and shut Ray down if this executor started it. Idempotent."""
        if self._closed:
            return
        self._work.close_intake()
        if not self._closing:
            self._grace_deadline = time.monotonic() + grace_s
            self._closing = True
        self._wake.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(grace_s + 30.0)
        self._closed = True
        self._shipment = None
        self._disconnect()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the manager thread -----------------------------------------------------------------

    def _manage(self) -> None:
        try:
            while not (self._closing and (self._work.idle
                                          or time.monotonic() >= self._grace_deadline)):
                self._dispatch()
                self._maybe_grow()
                self._check_starved()
                self._check_deadlines()
                self._maybe_restore_budget()
                self._publish()
                self._wait()
        except PoolBroken as exc:
            self._work.break_(exc)
        except BaseException as exc:
            log.exception("embedpool Ray manager crashed")
            self._work.break_(PoolBroken(f"the Ray executor's manager failed: {exc!r}"))
        finally:
            self._work.close_intake()
            self._work.fail_unfinished(self._work.broken)
            self._shutdown_actors()
            self._publish()
            self._emit(events.POOL_STOP, **vars(self._work.counters))

    def _wait(self) -> None:
        waiting = list(self._inflight) + list(self._starting)
        timeout = self._wait_timeout()
        if not waiting:
            if not self._slots and not self._work.idle:
                raise PoolBroken("no Ray actor is alive or starting, with work left")
            self._wake.wait(timeout)
            self._wake.clear()
            return
        done, _ = self._ray.wait(waiting, num_returns=1, timeout=timeout)
        for ref in done:
            if ref in self._starting:
                self._on_started(ref)
            elif ref in self._inflight:
                self._collect(ref)

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        due = [now + WAIT_TICK_S, self._grace_deadline]
        policy = self._work.policy
        for s in self._slots:
            if s.ready and s.inflight:
                due.append(s.head_started
                           + policy.next_hang_check_s(s.inflight[0][1].padded_tokens, s.warned))
        room = any(s.ready and len(s.inflight) < MAX_INFLIGHT_PER_ACTOR for s in self._slots)
        if room and not self._work.queued_tasks:
            due.append(now + IDLE_POLL_S)  # a submit cannot wake ray.wait
        return max(0.0, min(due) - now)

    def _dispatch(self) -> None:
        """Fill every ready actor up to MAX_INFLIGHT_PER_ACTOR, least loaded first. A suspect
        task (``faults.Task.suspect``) goes only to an idle actor, and nothing is queued
        behind it: if its actor dies, it is the one that was running."""
        while True:
            free = [s for s in self._slots if s.ready and len(s.inflight) < MAX_INFLIGHT_PER_ACTOR
                    and not (s.inflight and s.inflight[-1][1].suspect)]
            if not free:
                return
            task = self._work.next_task(self._budget.current)
            if task is None:
                return
            slot = min(free, key=lambda s: len(s.inflight))
            if task.suspect and slot.inflight:
                self._work.unget(task)  # no idle actor now: it waits for one
                return
            ref = slot.handle.embed.remote(task.sequences)
            if not slot.inflight:
                slot.head_started, slot.warned = time.monotonic(), False
            slot.inflight.append((ref, task))
            self._inflight[ref] = slot

    def _collect(self, ref: Any) -> None:
        slot = self._inflight[ref]
        task = next(t for r, t in slot.inflight if r == ref)
        try:
            rows: Vectors = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            failure = cluster.failure_of(exc, self._ray)
            if failure in ("oom_death", "death"):
                self._actor_died(slot, exc, FailureKind.OOM_KILL if failure == "oom_death"
                                 else None)
                return
            self._forget(slot, ref)
            kind = (cluster.task_error_kind(exc) if failure == "task_error"
                    else FailureKind.CRASH)
            self._fail(task, kind, cluster.first_line(getattr(exc, "cause", None) or exc))
            return
        self._forget(slot, ref)
        if self._work.complete(task, rows):
            slot.batches_done += 1

    def _forget(self, slot: _Slot, ref: Any) -> None:
        self._inflight.pop(ref, None)
        was_head = bool(slot.inflight) and slot.inflight[0][0] == ref
        slot.inflight = deque((r, t) for r, t in slot.inflight if r != ref)
        if was_head:  # the next one starts running now
            slot.head_started, slot.warned = time.monotonic(), False

    def _fail(self, task: Task, kind: FailureKind, error: str) -> None:
        decision = self._work.fail(task, kind, error)
        if decision.lower_budget:
            self._lower_budget(kind, decision.forbid_tokens)

    def _lower_budget(self, kind: FailureKind, forbid_tokens: int | None) -> None:
        b = self._budget
        old = b.current
        b.current = faults.lowered_budget(b.current, b.floor)
        b.forbidden = faults.forbidden_after(b.forbidden, forbid_tokens)
        b.last_oom_at = time.monotonic()
        self._scale_event(old, f"{kind}: budget halved" + (
            f"; never again {b.forbidden} tokens or more" if b.forbidden else ""))

    def _maybe_restore_budget(self) -> None:
        b = self._budget
        now = time.monotonic()
        if b.last_oom_at is None or now - b.last_oom_at < BUDGET_CALM_S:
            return
        old, b.current = b.current, faults.restored_budget(b.current, b.planned, b.forbidden)
        b.last_oom_at = now if b.current < b.planned else None
        if b.current != old:
            self._scale_event(old, f"no out-of-memory failure for {BUDGET_CALM_S:.0f} s")

    def _scale_event(self, old_tokens: int, reason: str) -> None:
        n = len(self._slots)
        self._emit(events.SCALE, action="hold", workers_from=n, workers_to=n,
                   batch_tokens_from=old_tokens, batch_tokens_to=self._budget.current,
                   reason=reason, reading=None)

    def _actor_died(self, slot: _Slot, exc: BaseException, kind: FailureKind | None,
                    hung: str = "") -> None:
        """The oldest unfinished task was running: fail it; requeue the rest unblamed;
        replace the actor. Results that left the actor before it died are kept."""
        tasks: list[Task] = []
        refs = [ref for ref, _ in slot.inflight]
        settled = set() if hung else set(self._ray.wait(
            refs, num_returns=len(refs), timeout=DEATH_SETTLE_S)[0])
        for ref, task in list(slot.inflight):
            if ref in settled:
                with contextlib.suppress(self._ray.exceptions.RayError):  # lost with the actor
                    rows = self._ray.get(ref)
                    self._forget(slot, ref)
                    self._work.complete(task, rows)
                    continue
            tasks.append(task)
        if kind is None:  # a death Ray did not attribute: the cgroup's counter may
            confirmed, evidence = self._oom.confirm(slot)
            kind = faults.death_kind(hung=False, oom_confirmed=confirmed, sigkill=False)
        else:
            self._oom.forget(slot)
            evidence = hung or "Ray's memory monitor (OutOfMemoryError)"
        c = self._work.counters
        c.deaths += 1
        if kind is FailureKind.OOM_KILL:
            c.oom_kills += 1
        # With two or more unfinished, the oldest may have finished and its result died with
        # the actor (sent after the next task began), so the one running is unknown: blame
        # none, and run each alone next (suspect). A hang kill knows its task: the head's.
        ambiguous = len(tasks) > 1 and not hung
        running = None if ambiguous or not tasks else tasks[0]
        error = hung or cluster.first_line(exc)
        shown = running or (tasks[0] if tasks else None)
        self._emit(events.WORKER_DEATH, **slot.fields(), exit="actor died", kind=str(kind),
                   cause=faults.death_cause(kind, evidence), error=error, blamed=not ambiguous,
                   **cluster.exit_detail(exc),
                   **(shown.describe() if shown else {"items": 0, "tokens": 0}))
        self._remove(slot)
        if not self._closing:
            self._start_actor()
        for queued in reversed(tasks if ambiguous else tasks[1:]):
            self._work.requeue(queued, f"unfinished on dead actor {slot.name}",
                               suspect=ambiguous)
        if running is not None:
            self._fail(running, kind, error)
        elif ambiguous and kind in faults.OOM_KINDS:
            # one of the two oldest was running: never again the smaller of their sizes
            self._lower_budget(kind, min(t.padded_tokens for t in tasks[:2]))

    def _check_deadlines(self) -> None:
        """The hang rule of the local pool (``FaultPolicy.hang_check``) for each actor's
        running task: warn at 60% of its deadline, kill and replace the actor at 100%."""
        now = time.monotonic()
        policy = self._work.policy
        for slot in list(self._slots):
            if not slot.ready or not slot.inflight:
                continue
            task = slot.inflight[0][1]
            silent = now - slot.head_started
            verdict = policy.hang_check(silent, task.padded_tokens, slot.warned)
            if verdict == "ok":
                continue
            deadline = policy.deadline_s(task.padded_tokens)
            fields = {**slot.fields(), "silent_s": round(silent, 2),
                      "deadline_s": round(deadline, 2), **task.describe()}
            if verdict == "warn":
                slot.warned = True
                self._emit(events.WORKER_HUNG_WARNING, **fields)
                continue
            self._work.counters.hung_kills += 1
            self._emit(events.WORKER_HUNG_KILL, **fields)
            reason = f"hung: silent {silent:.1f} s, deadline {deadline:.1f} s"
            self._actor_died(slot, PoolError(reason), FailureKind.HUNG, hung=reason)

    # -- actors ---------------------------------------------------------------------------

    def _start_actor(self) -> _Slot:
        wid = next(self._worker_ids)
        name = f"embedpool-{os.getpid()}-{id(self):x}-{wid}"
        opts: dict[str, Any] = {"num_cpus": self._cpus, "max_restarts": 0,
                                "max_task_retries": 0, "max_concurrency": 1, "name": name}
        if self._memory is not None:
            opts["memory"] = self._memory
        handle = self._remote.options(**opts).remote(self._spec, self._shipment, self._threads)
        slot = _Slot(handle, name, wid)
        self._slots.append(slot)
        self._starting[handle.ready.remote()] = slot
        self._publish()
        self._emit(events.WORKER_START, worker_id=wid, actor=name, cpus=self._cpus,
                   memory=self._memory)
        return slot

    def _on_started(self, ref: Any) -> None:
        slot = self._starting.pop(ref)
        try:
            slot.info = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            self._remove(slot)
            c = self._work.counters
            c.start_failures += 1
            self._start_failures += 1
            msg = f"Ray actor {slot.name} failed while loading its engine: {exc}"
            self._emit(events.WORKER_START_FAILED, worker_id=slot.worker_id, actor=slot.name,
                       pid=None, error=cluster.first_line(exc), exit="actor died",
                       traceback="")
            if not self._ever_ready:
                raise WorkerStartError(msg) from exc
            if self._start_failures >= MAX_START_FAILURES:
                raise PoolBroken(f"{self._start_failures} replacement Ray actors in a row "
                                 f"failed to start; the last: {msg}") from exc
            self._start_actor()
            return
        slot.ready = True
        self._ever_ready = True
        self._start_failures = 0
        if slot.info.get("node") == self._node and slot.info.get("pid"):
            self._oom.watch(slot, int(slot.info["pid"]))  # on our node: its cgroup is readable
        self._emit(events.WORKER_READY, **slot.fields(), rss=0,
                   seconds=round(time.monotonic() - slot.started, 3),
                   model_source=slot.info.get("model_source"),
                   startup_s=slot.info.get("startup_s"))

    def _await_first_ready(self) -> int:
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        while not self._ever_ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerStartError(
                    f"no Ray actor became ready in {ACTOR_START_TIMEOUT_S:.0f} s. Each asks "
                    f"for {self._cpus} CPU and {self._memory or 'no'} memory; the cluster "
                    f"has {self._ray.cluster_resources()} and "
                    f"{self._ray.available_resources()} free. Lower cpus_per_actor/"
                    "memory_per_actor or add nodes.")
            done, _ = self._ray.wait(list(self._starting), num_returns=1,
                                     timeout=min(left, WAIT_TICK_S))
            for ref in done:
                self._on_started(ref)
        return int(next(s.info["dim"] for s in self._slots if s.ready))

    def _check_starved(self) -> None:
        """No ready actor, and the replacements cannot be placed: say so instead of waiting."""
        if any(s.ready for s in self._slots) or not self._slots:
            return
        waited = time.monotonic() - min(s.started for s in self._slots)
        if waited > ACTOR_START_TIMEOUT_S:
            raise PoolBroken(
                f"no Ray actor has been ready for {waited:.0f} s: the replacements for dead "
                f"actors cannot be placed ({self._cpus} CPU, {self._memory or 'no'} memory "
                f"each; free: {self._ray.available_resources()}). Did a node leave?")

    def _maybe_grow(self) -> None:
        backlog = self._work.queued_tasks > 0
        if not backlog or len(self._slots) >= self.max_actors or self._starting:
            return
        if any(len(s.inflight) < MAX_INFLIGHT_PER_ACTOR for s in self._slots if s.ready):
            return
        now = time.monotonic()
        if now - self._last_grow_check < GROW_CHECK_S:
            return
        self._last_grow_check = now
        if float(self._ray.available_resources().get("CPU", 0.0)) >= self._cpus:
            self._start_actor()

    def _remove(self, slot: _Slot) -> None:
        if slot in self._slots:
            self._slots.remove(slot)
        for ref, _ in slot.inflight:
            self._inflight.pop(ref, None)
        slot.inflight.clear()
        for ref in [r for r, s in self._starting.items() if s is slot]:
            del self._starting[ref]
        self._oom.forget(slot)
        with contextlib.suppress(Exception):  # already gone: nothing to free
            self._ray.kill(slot.handle, no_restart=True)
        self._publish()

    def _shutdown_actors(self) -> None:
        for slot in list(self._slots):
            self._remove(slot)

    def _disconnect(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False

    def _publish(self) -> None:
        """Refresh what stats() and handles read from other threads (atomic stores)."""
        self._snapshot = tuple(
            WorkerInfo(s.worker_id, s.info.get("pid"),
                       "starting" if not s.ready else "busy" if s.inflight else "idle",
                       0, s.batches_done, str(s.info.get("node") or ""))
            for s in self._slots)
        self._handles = tuple(s.handle for s in self._slots)

