"""The Ray actors of one executor, and what is queued on each: the Ray counterpart of the pool
manager's worker records.

``ActorSet`` starts actors (``max_restarts=0``: a death is reported once and embedpool
decides), turns their ``ready()`` answers into ready slots or start failures, grows from
``min`` to ``max`` actors while work waits and the cluster has a free CPU, sends a task to an
actor and remembers which actor holds which result, and removes (kills) an actor. It decides
nothing about failed tasks: that is the executor's, through ``faults``.

What a start failure means is ``faults.start_failure``'s, the local pool's rule: before any
actor was ready it raises ``WorkerStartError`` (a bad spec fails at once); later the
replacement is started again after a backoff (0.25 s doubling to 10 s), and only
``max_start_failures`` in a row with no actor alive raise ``WorkersCannotStart``.
``ACTOR_START_TIMEOUT_S`` with no ready actor (the cluster cannot place one) raises
``PoolBroken``. An actor of this node that died while idle (its pid gone) is found by
``idle_deaths`` on each pass of the manager: Ray reports nothing for an actor with no call in
flight.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from embedpool import events, faults
from embedpool.errors import PoolBroken, WorkersCannotStart, WorkerStartError
from embedpool.executor import Counters, EngineRecipe, WorkerInfo
from embedpool.executors.pool.cgroups import OomEvidence
from embedpool.executors.ray import cluster
from embedpool.executors.ray.actor import EmbedActor
from embedpool.executors.ray.shipping import ModelShipment
from embedpool.faults import FaultPolicy, Task

#: Batches queued on one actor: one running plus one waiting hides the round trip between
#: batches (result to driver, next batch to actor). More only puts more batches at risk
#: when the actor dies and holds more token ids in the object store.
MAX_INFLIGHT_PER_ACTOR = 2
#: First actor start: a fresh node may need to start a worker process, fetch ~25-90 MB of
#: ONNX from the object store and load it; an autoscaling cluster may need minutes to add
#: a node. Beyond this the cluster cannot place the actor, and we say so.
ACTOR_START_TIMEOUT_S = 300.0
#: Minimum seconds between two asks for the cluster's free CPUs (a GCS round trip).
GROW_CHECK_S = 1.0
#: How long one wait for the first actor blocks before the start deadline is looked at.
START_TICK_S = 1.0


@dataclass(eq=False)
class Slot:
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
        """The fields every event about this actor carries."""
        return {
            "worker_id": self.worker_id,
            "actor": self.name,
            "pid": self.info.get("pid"),
            "node": self.info.get("node"),
        }

    def has_room(self) -> bool:
        """Ready, below MAX_INFLIGHT_PER_ACTOR, and not running a suspect task (which runs
        alone, so that a death is charged to it for sure)."""
        return (
            self.ready
            and len(self.inflight) < MAX_INFLIGHT_PER_ACTOR
            and not (self.inflight and self.inflight[-1][1].suspect)
        )


class ActorSet:
    """The actors of one executor (see the module docstring). Used by one thread at a time:
    the constructor's until the first actor is ready, the executor's manager thread after."""

    def __init__(
        self,
        ray: ModuleType,
        spec: EngineRecipe,
        shipment: ModelShipment | None,
        *,
        cpus: float,
        memory: int | None,
        threads: int,
        max_actors: int,
        emit: events.Emitter,
        counters: Counters,
        policy: FaultPolicy | None = None,
    ) -> None:
        self._ray = ray
        self._remote = ray.remote(EmbedActor)
        self._spec = spec
        self.shipment = shipment
        self._cpus = cpus
        self._memory = memory
        self._threads = threads
        self.max_actors = max_actors
        self._emit = emit
        self._counters = counters
        self._node = ray.get_runtime_context().get_node_id()
        self.oom = OomEvidence()
        self.slots: list[Slot] = []
        self._starting: dict[Any, Slot] = {}
        self._owner: dict[Any, Slot] = {}  # result ref -> the actor computing it
        self._ids = itertools.count()
        self._policy = policy or FaultPolicy()
        #: Replacements waiting out a start failure's backoff: when each may start.
        self._restarts: list[float] = []
        self._start_failures = 0
        self._ever_ready = False
        self._last_grow_check = 0.0
        #: What stats() and handles read from other threads (atomic stores).
        self.snapshot: tuple[WorkerInfo, ...] = ()
        self.handles: tuple[Any, ...] = ()

    # -- starting ----------------------------------------------------------------------------

    def start(self) -> Slot:
        wid = next(self._ids)
        name = f"embedpool-{os.getpid()}-{id(self):x}-{wid}"
        opts: dict[str, Any] = {
            "num_cpus": self._cpus,
            "max_restarts": 0,
            "max_task_retries": 0,
            "max_concurrency": 1,
            "name": name,
        }
        if self._memory is not None:
            opts["memory"] = self._memory
        handle = self._remote.options(**opts).remote(self._spec, self.shipment, self._threads)
        slot = Slot(handle, name, wid)
        self.slots.append(slot)
        self._starting[handle.ready.remote()] = slot
        self.publish()
        self._emit(
            events.WORKER_START, worker_id=wid, actor=name, cpus=self._cpus, memory=self._memory
        )
        return slot

    def on_started(self, ref: Any) -> None:
        """An actor answered ``ready()``, or failed to start."""
        slot = self._starting.pop(ref)
        try:
            slot.info = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            self.remove(slot)
            self._counters.start_failures += 1
            self._start_failures += 1
            msg = f"Ray actor {slot.name} failed while loading its engine: {exc}"
            self._emit(
                events.WORKER_START_FAILED,
                worker_id=slot.worker_id,
                actor=slot.name,
                pid=None,
                error=cluster.first_line(exc),
                exit="actor died",
                traceback="",
            )
            decision = faults.start_failure(
                self._policy,
                failures_in_row=self._start_failures,
                ever_ready=self._ever_ready,
                alive=sum(s.ready for s in self.slots),
            )
            if decision.action == "retry":
                self._restarts.append(time.monotonic() + decision.backoff_s)
                return
            if not self._ever_ready:
                raise WorkerStartError(msg) from exc
            raise WorkersCannotStart(f"{decision.reason}; the last: {msg}") from exc
        slot.ready = True
        self._ever_ready = True
        self._start_failures = 0
        if slot.info.get("node") == self._node and slot.info.get("pid"):
            self.oom.watch(slot, int(slot.info["pid"]))  # on our node: its cgroup is readable
        self._emit(
            events.WORKER_READY,
            **slot.fields(),
            rss=0,
            seconds=round(time.monotonic() - slot.started, 3),
            model_source=slot.info.get("model_source"),
            startup_s=slot.info.get("startup_s"),
        )
        self.publish()

    def await_first_ready(self) -> int:
        """Block until one actor is ready; its vector width."""
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        while not self._ever_ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerStartError(
                    f"no Ray actor became ready in {ACTOR_START_TIMEOUT_S:.0f} s. Each asks "
                    f"for {self._cpus} CPU and {self._memory or 'no'} memory; the cluster "
                    f"has {self._ray.cluster_resources()} and "
                    f"{self._ray.available_resources()} free. Lower cpus_per_actor/"
                    "memory_per_actor or add nodes."
                )
            done, _ = self._ray.wait(
                list(self._starting), num_returns=1, timeout=min(left, START_TICK_S)
            )
            for ref in done:
                self.on_started(ref)
        return int(next(s.info["dim"] for s in self.slots if s.ready))

    def start_due(self) -> None:
        """Start the replacements whose start-failure backoff is over."""
        now = time.monotonic()
        due = [t for t in self._restarts if t <= now]
        self._restarts = [t for t in self._restarts if t > now]
        for _ in due:
            self.start()

    @property
    def next_restart(self) -> float | None:
        """When the next replacement may start (None: none waits)."""
        return min(self._restarts, default=None)

    def idle_deaths(self) -> list[Slot]:
        """Ready actors of this node with nothing in flight whose process is gone."""
        import psutil

        return [
            s
            for s in self.slots
            if s.ready
            and not s.inflight
            and s.info.get("node") == self._node
            and s.info.get("pid")
            and not psutil.pid_exists(int(s.info["pid"]))
        ]

    def check_starved(self) -> None:
        """No ready actor, and the replacements cannot be placed: say so instead of waiting."""
        if any(s.ready for s in self.slots) or not self.slots:
            return
        waited = time.monotonic() - min(s.started for s in self.slots)
        if waited > ACTOR_START_TIMEOUT_S:
            raise PoolBroken(
                f"no Ray actor has been ready for {waited:.0f} s: the replacements for dead "
                f"actors cannot be placed ({self._cpus} CPU, {self._memory or 'no'} memory "
                f"each; free: {self._ray.available_resources()}). Did a node leave?"
            )

    def maybe_grow(self, backlog: bool) -> None:
        """One more actor, up to ``max_actors``, while work waits, every ready actor is full
        and the cluster has a free ``cpus_per_actor``."""
        if not backlog or len(self.slots) >= self.max_actors or self._starting:
            return
        if any(s.has_room() for s in self.slots):
            return
        now = time.monotonic()
        if now - self._last_grow_check < GROW_CHECK_S:
            return
        self._last_grow_check = now
        if float(self._ray.available_resources().get("CPU", 0.0)) >= self._cpus:
            self.start()

    # -- running -----------------------------------------------------------------------------

    def pending(self) -> list[Any]:
        """Every ref the manager waits on: results and actor starts."""
        return [*self._owner, *self._starting]

    def is_start(self, ref: Any) -> bool:
        return ref in self._starting

    def owner(self, ref: Any) -> Slot | None:
        return self._owner.get(ref)

    def send(self, slot: Slot, task: Task) -> None:
        ref = slot.handle.embed.remote(task.sequences, task.prompt_lengths)
        if not slot.inflight:
            slot.head_started, slot.warned = time.monotonic(), False
        slot.inflight.append((ref, task))
        self._owner[ref] = slot

    def forget(self, slot: Slot, ref: Any) -> None:
        """A result arrived (or failed): the next task on that actor runs from now on."""
        self._owner.pop(ref, None)
        was_head = bool(slot.inflight) and slot.inflight[0][0] == ref
        slot.inflight = deque((r, t) for r, t in slot.inflight if r != ref)
        if was_head:
            slot.head_started, slot.warned = time.monotonic(), False

    def remove(self, slot: Slot) -> None:
        """Kill an actor and forget it (a dead one: nothing left to free)."""
        if slot in self.slots:
            self.slots.remove(slot)
        for ref, _ in slot.inflight:
            self._owner.pop(ref, None)
        slot.inflight.clear()
        for ref in [r for r, s in self._starting.items() if s is slot]:
            del self._starting[ref]
        self.oom.forget(slot)
        with contextlib.suppress(Exception):  # already gone
            self._ray.kill(slot.handle, no_restart=True)
        self.publish()

    def remove_all(self) -> None:
        for slot in list(self.slots):
            self.remove(slot)

    def publish(self) -> None:
        self.snapshot = tuple(
            WorkerInfo(
                s.worker_id,
                s.info.get("pid"),
                "starting" if not s.ready else "busy" if s.inflight else "idle",
                0,
                s.batches_done,
                str(s.info.get("node") or ""),
            )
            for s in self.slots
        )
        self.handles = tuple(s.handle for s in self.slots)
