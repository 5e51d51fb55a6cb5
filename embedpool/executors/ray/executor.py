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
    the actors themselves (start, ready, grow, replace): actors.py

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
    Tasks are cut to ``budget`` (``budget.batch_budget``: the placement's, which the job plans
    its batches to, so normally nothing is cut). An out-of-memory failure halves it, not below
    its floor; it is doubled back after
    ``BUDGET_CALM_S`` without one, never to a size that ran out of memory (``faults``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterable
from concurrent.futures import Future
from typing import Any

from embedpool import events, executor, faults
from embedpool.budget import BatchBudget, batch_budget
from embedpool.errors import ConfigError, DeviceLost, PoolBroken, PoolError
from embedpool.executor import BatchResult, EngineRecipe, ExecutorStats, WorkBatch
from embedpool.executors.ray import cluster
from embedpool.executors.ray.actors import ActorSet, Slot
from embedpool.executors.ray.shipping import ship_model
from embedpool.faults import FailureKind, FaultPolicy, Task
from embedpool.types import EventCallback, Vectors
from embedpool.workqueue import WorkQueue

log = logging.getLogger("embedpool.ray")

#: Longest ray.wait blocks when every actor is busy: results wake it at once, this only
#: bounds how late growth and deadlines are looked at.
WAIT_TICK_S = 1.0
#: ray.wait's timeout while an actor has room and nothing is queued: ray.wait cannot be woken
#: by a submit, so this is the most a new batch waits for an idle actor. 20 ms is below one
#: batch's time (~50-500 ms) and costs ~50 cheap local calls a second while idle.
IDLE_POLL_S = 0.02
#: After an actor dies, how long to let the results it sent before dying arrive: a result
#: still on its way would make the task that produced it look like the one that was running.
#: Every ref of a dead actor resolves (to a result or to ActorDiedError) within milliseconds;
#: this only bounds it.
DEATH_SETTLE_S = 2.0
#: Time without an out-of-memory failure before the lowered budget is doubled back: the
#: local pool's calm period. Ray gives the driver no memory readings of the cluster, so calm
#: is measured in time alone (``faults.TimedBudget``).
BUDGET_CALM_S = faults.BUDGET_CALM_S
#: The manager loop comes round at least every WAIT_TICK_S, or DEATH_SETTLE_S after a death;
#: silent for this long, it is stuck (in a Ray call to a GCS that stopped answering, or in an
#: on_event callback) and ``broken`` says so, which turns a server's /health red. A minute is
#: far beyond any regular pass, and short enough for an orchestrator to act on.
MANAGER_SILENT_S = 60.0


class RayExecutor:
    """Runs WorkBatches on a pool of Ray actors (see the module docstring)."""

    def __init__(
        self,
        spec: EngineRecipe,
        *,
        address: str | None = None,
        actors: int | tuple[int, int] | None = None,
        cpus_per_actor: float = 1.0,
        memory_per_actor: int | None = None,
        batch_tokens: int | None = None,
        budget: BatchBudget | None = None,
        policy: FaultPolicy | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        if cpus_per_actor <= 0:
            raise ConfigError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
        if memory_per_actor is not None and memory_per_actor <= 0:
            raise ConfigError(f"memory_per_actor must be > 0 bytes, got {memory_per_actor}")
        # the budget and its OOM floor: the placement's, else decided the same way
        self.budget = budget or batch_budget(requested=batch_tokens)
        if isinstance(actors, int | tuple):
            cluster.actor_range(actors, 1.0, cpus_per_actor)  # validate before touching Ray
        self._ray = cluster.require_ray()
        self._threads = max(1, round(cpus_per_actor))
        self._emit = events.Emitter(on_event, log, backend="ray")
        self._wake = threading.Event()
        self._work = WorkQueue(self._wake.set, self._emit, policy)
        #: The budget after OOM failures (``faults.BudgetState``, the pool's too), calm after
        #: BUDGET_CALM_S without one (Ray gives the driver no memory readings of the cluster).
        self._oom_budget = faults.TimedBudget.of(
            self.budget.tokens, self.budget.floor, BUDGET_CALM_S
        )
        self._closing = False
        self._last_pass = time.monotonic()  # when the manager loop last came round
        self._grace_deadline = float("inf")
        self._closed = False
        self._thread: threading.Thread | None = None
        self._actors: ActorSet | None = None
        self._owns_ray = cluster.connect(self._ray, address)
        try:
            from embedpool.engine import EngineSpec

            shipment = ship_model(spec, self._ray) if isinstance(spec, EngineSpec) else None
            cpus = float(self._ray.cluster_resources().get("CPU", 0.0))
            self.min_actors, self.max_actors = cluster.actor_range(actors, cpus, cpus_per_actor)
            self._actors = ActorSet(
                self._ray,
                spec,
                shipment,
                cpus=cpus_per_actor,
                memory=memory_per_actor,
                threads=self._threads,
                max_actors=self.max_actors,
                emit=self._emit,
                counters=self._work.counters,
                policy=self._work.policy,
            )
            for _ in range(self.min_actors):
                self._actors.start()
            self.dim = self._work.dim = self._actors.await_first_ready()
        except BaseException:
            if self._actors is not None:
                self._actors.remove_all()
            self._disconnect()
            raise
        self._emit(
            events.POOL_START,
            workers=self.min_actors,
            threads=self._threads,
            batch_tokens=self._oom_budget.tokens,
            max_workers=self.max_actors,
            budget_floor=self.budget.floor,
            budget_reason=self.budget.reason,
        )
        self._thread = threading.Thread(
            target=self._manage, name="embedpool-ray-manager", daemon=True
        )
        self._thread.start()

    # -- the executor contract ------------------------------------------------------------

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        return self._work.submit(batch)

    def run(
        self, batches: Iterable[WorkBatch], max_pending: int | None = None
    ) -> Generator[BatchResult, None, None]:
        """``executor.run`` over these actors (bounded look-ahead, any order)."""
        if self._closed:
            raise PoolError("RayExecutor.run after close()")
        return executor.run(self, batches, max_pending)

    def stats(self) -> ExecutorStats:
        workers = self._actors.snapshot if self._actors is not None else ()
        return ExecutorStats.of(
            self._work.counters,
            backend="ray",
            workers=workers,
            target_workers=len(workers),
            max_workers=self.max_actors,
            threads=self._threads,
            batch_tokens=self._oom_budget.tokens,
            queued=self._work.queued_batches,
            emergency=self._oom_budget.state.emergency,
        )

    @property
    def broken(self) -> str | None:
        exc = self._work.broken
        if exc is not None:
            return str(exc)
        if self._thread is None or self._closing:
            return None
        if not self._thread.is_alive():
            return "the Ray executor's manager thread is gone"
        silent = time.monotonic() - self._last_pass
        if silent > MANAGER_SILENT_S:
            return (
                f"the Ray executor's manager has been stuck for {silent:.0f} s (a Ray call "
                "that does not return, or an on_event callback that blocks)"
            )
        return None

    @property
    def handles(self) -> list[Any]:
        """Handles of the live actors (for operators and fault tests)."""
        return list(self._actors.handles) if self._actors is not None else []

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
        if self._actors is not None:
            self._actors.shipment = None
        self._disconnect()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the manager thread -----------------------------------------------------------------

    def _manage(self) -> None:
        actors = self._actors
        assert actors is not None
        try:
            while not (
                self._closing and (self._work.idle or time.monotonic() >= self._grace_deadline)
            ):
                self._last_pass = time.monotonic()
                actors.start_due()
                for slot in actors.idle_deaths():
                    self._actor_died(actors, slot, PoolError("the actor's process is gone"), None)
                self._dispatch(actors)
                actors.maybe_grow(self._work.queued_tasks > 0)
                actors.check_starved()
                self._check_deadlines(actors)
                self._maybe_restore()
                actors.publish()
                self._wait(actors)
        except PoolBroken as exc:
            self._work.break_(exc)
        except BaseException as exc:
            log.exception("embedpool Ray manager crashed")
            self._work.break_(PoolBroken(f"the Ray executor's manager failed: {exc!r}"))
        finally:
            self._work.close_intake()
            self._work.fail_unfinished(self._work.broken)
            actors.remove_all()
            self._emit(events.POOL_STOP, **vars(self._work.counters))

    def _wait(self, actors: ActorSet) -> None:
        waiting = actors.pending()
        timeout = self._wait_timeout(actors)
        if not waiting:
            if not actors.slots and actors.next_restart is None and not self._work.idle:
                raise PoolBroken("no Ray actor is alive or starting, with work left")
            self._wake.wait(timeout)
            self._wake.clear()
            return
        done, _ = self._ray.wait(waiting, num_returns=1, timeout=timeout)
        for ref in done:
            if actors.is_start(ref):
                actors.on_started(ref)
            elif (slot := actors.owner(ref)) is not None:
                self._collect(actors, slot, ref)

    def _wait_timeout(self, actors: ActorSet) -> float:
        now = time.monotonic()
        due: list[float | None] = [self._grace_deadline, actors.next_restart]
        if any(s.has_room() for s in actors.slots) and not self._work.queued_tasks:
            due.append(now + IDLE_POLL_S)  # a submit cannot wake ray.wait
        return faults.wait_s(self._work.policy, self._running(actors), now, due, WAIT_TICK_S)

    def _dispatch(self, actors: ActorSet) -> None:
        """Fill every ready actor up to its room, least loaded first. A suspect task
        (``faults.Task.suspect``) goes only to an idle actor, and nothing is queued behind
        it: if its actor dies, it is the one that was running."""
        while True:
            free = [s for s in actors.slots if s.has_room()]
            if not free:
                return
            task = self._work.next_task(self._oom_budget.tokens)
            if task is None:
                return
            slot = min(free, key=lambda s: len(s.inflight))
            if task.suspect and slot.inflight:
                self._work.unget(task)  # no idle actor now: it waits for one
                return
            actors.send(slot, task)

    def _collect(self, actors: ActorSet, slot: Slot, ref: Any) -> None:
        task = next(t for r, t in slot.inflight if r == ref)
        try:
            rows: Vectors = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            failure = cluster.failure_of(exc, self._ray)
            if failure in ("oom_death", "death"):
                self._actor_died(
                    actors, slot, exc, FailureKind.OOM_KILL if failure == "oom_death" else None
                )
                return
            actors.forget(slot, ref)
            kind = cluster.task_error_kind(exc) if failure == "task_error" else FailureKind.CRASH
            self._fail(task, kind, cluster.first_line(getattr(exc, "cause", None) or exc))
            return
        started = slot.head_started
        actors.forget(slot, ref)
        if self._work.complete(task, rows):
            slot.batches_done += 1
            self._oom_budget.after_success(started)

    def _fail(self, task: Task, kind: FailureKind, error: str) -> None:
        decision = self._work.fail(task, kind, error)
        if decision.lower_budget:
            self._lower_budget(kind, decision.forbid_tokens)
        elif decision.action == "fall_back":
            # an actor's GPU is lost (a recipe of the caller's: start_executor gives Ray the
            # CPU's). Ray has no device fallback: the executor breaks, as a pool does
            raise DeviceLost(
                f"a Ray actor's device was lost: {error}. The Ray backend has no "
                "device fallback; run its actors on the CPU"
            )

    def _lower_budget(self, kind: FailureKind, forbid_tokens: int | None) -> None:
        self._emit_all(
            self._oom_budget.after_oom(kind, forbid_tokens, time.monotonic(), self._workers())
        )

    def _maybe_restore(self) -> None:
        """After ``BUDGET_CALM_S`` without an OOM failure: emergency mode ends, then the
        budget doubles, once per calm period, up to the plan's but never to a size that ran
        out of memory (``faults.TimedBudget``)."""
        self._emit_all(self._oom_budget.after_time(time.monotonic(), self._workers()))

    def _workers(self) -> int:
        return len(self._actors.slots) if self._actors is not None else 0

    def _emit_all(self, changes: faults.BudgetChanges) -> None:
        for name, fields in changes:
            self._emit(name, **fields)

    def _actor_died(
        self,
        actors: ActorSet,
        slot: Slot,
        exc: BaseException,
        kind: FailureKind | None,
        hung: str = "",
    ) -> None:
        """The actor's running task failed; the others queued on it go back unblamed; it is
        replaced. Results that left the actor before it died are kept."""
        tasks: list[Task] = []
        refs = [ref for ref, _ in slot.inflight]
        settled = (
            set()
            if hung
            else set(self._ray.wait(refs, num_returns=len(refs), timeout=DEATH_SETTLE_S)[0])
        )
        for ref, task in list(slot.inflight):
            if ref in settled:
                try:
                    rows = self._ray.get(ref)
                except self._ray.exceptions.RayError:  # lost with the actor
                    pass
                else:
                    actors.forget(slot, ref)
                    self._work.complete(task, rows)
                    continue
            tasks.append(task)
        if kind is None:  # a death Ray did not attribute: the cgroup's counter may
            confirmed, evidence = actors.oom.confirm(slot)
            kind = faults.death_kind(hung=False, oom_confirmed=confirmed, sigkill=False)
        else:
            evidence = hung or "Ray's memory monitor (OutOfMemoryError)"
        c = self._work.counters
        c.deaths += 1
        if kind is FailureKind.OOM_KILL:
            c.oom_kills += 1
        # who was running: faults.blame (several unfinished: unknown, each runs alone next)
        who = faults.blame([t.padded_tokens for t in tasks], kind, hung=bool(hung))
        running = tasks[who.running] if who.running is not None else None
        error = hung or cluster.first_line(exc)
        shown = running or (tasks[0] if tasks else None)
        self._emit(
            events.WORKER_DEATH,
            **slot.fields(),
            exit="actor died",
            kind=str(kind),
            cause=faults.death_cause(kind, evidence),
            error=error,
            blamed=running is not None or not tasks,
            **cluster.exit_detail(exc),
            **(shown.describe() if shown else {"items": 0, "tokens": 0}),
        )
        actors.remove(slot)
        if not self._closing:
            actors.start()
        for queued in reversed([t for t in tasks if t is not running]):
            self._work.requeue(
                queued, f"unfinished on dead actor {slot.name}", suspect=who.suspects
            )
        if running is not None:
            self._fail(running, kind, error)
        elif who.lower_budget:
            # an OOM kill nobody is charged with (one of the two oldest was running), or one
            # of an idle actor: memory is tight; never again the size that may have run
            self._lower_budget(kind, who.forbid_tokens)

    def _check_deadlines(self, actors: ActorSet) -> None:
        """The local pool's hang rule (``faults.hang_verdicts``) for each actor's running task:
        warn at 60% of its deadline, kill and replace the actor at 100%."""
        for v in faults.hang_verdicts(self._work.policy, self._running(actors), time.monotonic()):
            slot: Slot = v.key
            fields = {**slot.fields(), **v.fields(), **slot.inflight[0][1].describe()}
            if v.verdict == "warn":
                slot.warned = True
                self._emit(events.WORKER_HUNG_WARNING, **fields)
                continue
            self._work.counters.hung_kills += 1
            self._emit(events.WORKER_HUNG_KILL, **fields)
            self._actor_died(actors, slot, PoolError(v.reason), FailureKind.HUNG, hung=v.reason)

    @staticmethod
    def _running(actors: ActorSet) -> list[faults.Running]:
        """Each actor's running task (the oldest unfinished), for the hang rule."""
        return [
            faults.Running(s, s.head_started, s.inflight[0][1].padded_tokens, s.warned)
            for s in actors.slots
            if s.ready and s.inflight
        ]

    def _disconnect(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False
