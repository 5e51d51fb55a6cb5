"""The device executor: one pool per GPU, CPU workers alongside when asked, and the CPU when
the GPUs are lost, behind the one executor contract.

::

    job ──submit(batch)──> WorkQueue ── dispatcher thread: next_task ──> the first member with room:
                                                                          cuda:0  Pool, 1 worker
                                                                          cuda:1  Pool, 1 worker
                                                                          cpu     Pool, N workers (if asked)
    a member's future ──> settled on the dispatcher: WorkQueue.deliver (rows, given-up items,
        precision) ──> the caller's future (results as they come, any order)
    DeviceLost (the member's pool broke: its GPU is gone), or WorkersCannotStart on a GPU
        (``faults.falls_back``) ──> WorkQueue.requeue (back to the front, unblamed), the
        member closed, one line and a ``device_fallback`` event; no GPU left ──> the CPU pool
        (``fallback``) is started and takes over; any other failure fails the batch
        (``WorkQueue.fail_batch``)

The device executor draws from a ``WorkQueue`` as the pool and Ray do; its tasks are whole
batches (no token budget here: each member cuts its own, and does its own fault handling), and
only its dispatcher thread touches them: a member's future, finished on that member's thread,
is handed over and settled there.

Each member is an ordinary ``Pool`` with its own token budget, fault handling and scaling, so
a GPU's out-of-memory error splits and lowers *that* GPU's budget (``faults``), and a lost GPU
only breaks its own pool (``manager``: DEVICE_LOST -> ``DeviceLost``). Dispatch is pull-based:
a member gets a batch when it has fewer than ``capacity`` in flight, so a faster device takes
more of them without any speed estimate. Members are tried in order, GPUs first.

``start`` builds one from recipes (``PoolRecipe``): it starts the GPU pools side by side, and
a GPU whose CUDA provider does not load (``DeviceUnavailable`` in its worker) is dropped with a
note under ``auto``, or fails the start under ``cuda`` (``DeviceError``), as
``faults.device_start`` rules. A member whose precision differs from the job's (CPU workers next to an fp16 GPU run fp32) marks its results
(``BatchResult.precision``), so the job caches only vectors of its own graph.

Our own code, not a library's: Ray or a work-stealing executor would bring a scheduler to
solve what the shared WorkQueue and a capacity per member solve here. Ray has no counterpart:
its actors run on the CPU, and an actor that reports a lost GPU breaks the Ray executor
(``faults``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from embedpool import events, executor, faults
from embedpool.errors import (
    DeviceError,
    DeviceLost,
    IntakeClosed,
    PoolBroken,
    PoolError,
    PoolUnavailable,
    WorkersCannotStart,
    WorkerStartError,
)
from embedpool.executor import (
    BatchResult,
    Counters,
    EngineRecipe,
    Executor,
    ExecutorStats,
    WorkBatch,
)
from embedpool.executors.pool.config import PoolConfig
from embedpool.faults import Task
from embedpool.types import EventCallback
from embedpool.workqueue import WorkQueue

log = logging.getLogger("embedpool.executors.pool")

#: Batches a member may hold per worker: two keep a worker busy while its last result travels
#: back (executor.PENDING_PER_WORKER); a GPU pool has one worker, so two.
BATCHES_PER_WORKER = executor.PENDING_PER_WORKER


@dataclass(frozen=True)
class PoolRecipe:
    """How to start one member: its name for people ("cuda:0 NVIDIA H200", "cpu"), the
    engine recipe and the pool's config; ``precision`` when it differs from the job's."""

    name: str
    spec: EngineRecipe
    config: PoolConfig
    precision: str | None = None

    def start(self, on_event: EventCallback | None) -> Member:
        from embedpool.executors.pool.pool import Pool

        pool = Pool(self.spec, self.config, on_event=on_event)
        capacity = BATCHES_PER_WORKER * max(1, pool.stats().max_workers)
        return Member(self.name, pool, capacity, self.precision, on_gpu=self.config.device != "cpu")


@dataclass(eq=False)
class Member:
    """One executor of the device executor, and what it holds now."""

    name: str
    executor: Executor
    capacity: int
    precision: str | None = None
    #: It runs on a GPU: a GPU lost or unable to start workers falls back (``faults``).
    on_gpu: bool = False
    inflight: int = 0
    lost: str | None = None


#: A member's future finished (or its submit raised): settled on the dispatcher thread.
Outcome = tuple[Member, Task, "Future[BatchResult] | None", "BaseException | None"]


class DeviceExecutor:
    """Members behind one executor, with the CPU fallback (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[Member],
        *,
        fallback: Callable[[], Member] | None = None,
        on_event: EventCallback | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        if not members:
            raise ValueError("a device executor needs at least one member")
        self._members = list(members)
        self._fallback = fallback
        self._emit = events.Emitter(on_event, log, backend="pool")
        self._cond = threading.Condition()  # guards _outcomes, _closing, _grace_deadline
        self._work = WorkQueue(self._wake, self._emit)
        self.dim = self._work.dim = int(self._members[0].executor.dim)
        self._outcomes: deque[Outcome] = deque()
        self._closing = False
        self._grace_deadline = float("inf")
        #: Lines people should see once (a GPU dropped at start, a fallback): the job summary.
        self.notes: list[str] = list(notes)
        self._thread = threading.Thread(target=self._run, name="embedpool-devices", daemon=True)
        self._thread.start()

    # -- the executor contract -----------------------------------------------------------------

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        return self._work.submit(batch)

    def run(
        self, batches: Iterable[WorkBatch], max_pending: int | None = None
    ) -> Generator[BatchResult, None, None]:
        return executor.run(self, batches, max_pending)

    def stats(self) -> ExecutorStats:
        members = list(self._members)
        snaps = [m.executor.stats() for m in members]
        live = [s for m, s in zip(members, snaps, strict=True) if m.lost is None] or snaps
        total = Counters()
        for s in snaps:
            for f in dataclasses.fields(Counters):
                setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
        total.retries += self._work.counters.retries  # batches moved off a lost device
        return ExecutorStats.of(
            total,
            backend="pool",
            workers=tuple(w for s in live for w in s.workers),
            target_workers=sum(s.target_workers for s in live),
            max_workers=sum(s.max_workers for s in live),
            threads=live[0].threads,
            batch_tokens=live[0].batch_tokens,
            emergency=any(s.emergency for s in live),
            queued=self._work.queued_batches + sum(s.queued for s in live),
        )

    @property
    def broken(self) -> str | None:
        if self._work.broken is not None:
            return str(self._work.broken)
        if not self._closing and not self._thread.is_alive():
            return "the device executor's dispatcher thread is gone"
        return None

    @property
    def devices(self) -> list[str]:
        """The members that run now, by name."""
        return [m.name for m in list(self._members) if m.lost is None]

    def describe(self) -> str:
        """One line for the job summary: where the batches run, and any fallback."""
        text = " + ".join(self.devices) or "nothing"
        return text + "".join(f"; {n}" for n in self.notes)

    def close(self, grace_s: float = 10.0) -> None:
        """Finish what was submitted within ``grace_s``, then close every member."""
        self._work.close_intake()
        with self._cond:
            if not self._closing:
                self._closing = True
                self._grace_deadline = time.monotonic() + grace_s
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(grace_s + 5.0)
        for m in list(self._members):
            with contextlib.suppress(Exception):
                m.executor.close()

    def __enter__(self) -> DeviceExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the dispatcher thread: the only one that touches the WorkQueue's tasks ------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _live(self) -> list[Member]:
        return [m for m in self._members if m.lost is None]

    def _due(self) -> bool:
        """Whether the dispatcher has something to do now (lock held)."""
        if self._outcomes or self._done():
            return True
        if not self._work.queued_tasks:
            return False
        live = self._live()
        return not live or any(m.inflight < m.capacity for m in live)

    def _done(self) -> bool:
        """Broken, or closing with nothing left (or past the grace period)."""
        if self._work.broken is not None:
            return True
        if not self._closing:
            return False
        return (
            self._work.idle and not any(m.inflight for m in self._members)
        ) or time.monotonic() >= self._grace_deadline

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:  # pragma: no cover - a bug; never leave futures hanging
            log.exception("embedpool device executor crashed")
            self._work.break_(PoolBroken(f"the device executor failed: {exc!r}"))
        finally:
            self._work.close_intake()
            self._work.fail_unfinished(self._work.broken)

    def _step(self) -> bool:
        with self._cond:
            while not self._due():
                timeout = (
                    self._grace_deadline - time.monotonic()
                    if self._grace_deadline < float("inf")
                    else None
                )
                self._cond.wait(timeout)
            outcomes, self._outcomes = list(self._outcomes), deque()
        for outcome in outcomes:
            self._settle(*outcome)
        if self._done():
            return False
        live = self._live()
        if not live and self._work.queued_tasks:
            self._start_fallback()
            return True
        sends: list[tuple[Member, Task]] = []
        for m in live:  # GPUs first: each takes what it has room for
            while m.inflight < m.capacity:
                task = self._work.next_task(None)  # whole batches: members cut their own
                if task is None:
                    break
                m.inflight += 1
                sends.append((m, task))
        for m, task in sends:
            self._send(m, task)
        return True

    def _send(self, m: Member, task: Task) -> None:
        try:
            inner = m.executor.submit(_batch_of(task))
        except (PoolError, IntakeClosed) as exc:
            self._outcome(m, task, None, exc)
            return
        inner.add_done_callback(lambda f: self._outcome(m, task, f, None))

    def _outcome(
        self, m: Member, task: Task, inner: Future[BatchResult] | None, error: BaseException | None
    ) -> None:
        """A member is done with a task (on that member's manager thread): to the dispatcher."""
        with self._cond:
            self._outcomes.append((m, task, inner, error))
            self._cond.notify_all()

    def _settle(
        self, m: Member, task: Task, inner: Future[BatchResult] | None, error: BaseException | None
    ) -> None:
        m.inflight -= 1
        if inner is not None:
            error = (
                PoolUnavailable("the batch was cancelled")
                if inner.cancelled()
                else inner.exception()
            )
        if error is None and inner is not None:
            result = inner.result()
            self._work.deliver(
                task, dataclasses.replace(result, precision=m.precision) if m.precision else result
            )
        elif faults.falls_back(
            break_cause(error), on_gpu=m.on_gpu, lost=m.lost is not None, closing=self._closing
        ):
            # DeviceLost (its GPU is gone), or a GPU member that can no longer start
            # workers (one that fell off the bus fails every CUDA init): the others run it
            self._lose(m, str(error))
            self._work.requeue(task, f"{m.name} left: {_first_line(str(error))}")
        else:
            self._work.fail_batch(task, error or PoolError("the member failed the batch"))

    def _lose(self, m: Member, reason: str) -> None:
        """Drop a member whose device is gone and close it; one line and one event."""
        if m.lost is not None:
            return
        m.lost = reason
        with contextlib.suppress(Exception):
            m.executor.close()
        others = [x.name for x in self._live()]
        to = " + ".join(others) if others else ("cpu" if self._fallback else "nothing")
        first = _first_line(reason) or "lost"
        message = f"{m.name} lost ({first}); its batches now run on {to}"
        self.notes.append(f"fell back: {message}")
        self._emit(events.DEVICE_FALLBACK, device=m.name, to=to, reason=first, message=message)
        log.warning("embedpool: %s", message)

    def _start_fallback(self) -> None:
        fallback, self._fallback = self._fallback, None
        lost = "; ".join(f"{m.name}: {m.lost}" for m in self._members if m.lost)
        if fallback is None:
            self._work.break_(
                PoolBroken(f"every device was lost and there is no CPU fallback: {lost}")
            )
            return
        try:
            member = fallback()
        except Exception as exc:
            self._work.break_(
                PoolBroken(f"every GPU was lost ({lost}) and the CPU pool did not start: {exc}")
            )
            return
        self._members.append(member)


def _batch_of(task: Task) -> WorkBatch:
    """The batch of a task's positions (the whole submitted batch when it holds them all)."""
    batch = task.assembly.batch
    if len(task.positions) == len(batch.sequences):
        return batch
    pos = task.positions
    return WorkBatch(
        batch.batch_id,
        tuple(batch.sequences[p] for p in pos),
        tuple(batch.item_ids[p] for p in pos) if batch.item_ids else (),
        tuple(batch.prompt_lengths[p] for p in pos) if batch.prompt_lengths else (),
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def break_cause(error: BaseException | None) -> faults.BreakCause:
    """Why a member's executor failed a batch, for ``faults.falls_back``."""
    if isinstance(error, DeviceLost):
        return "device_lost"
    if isinstance(error, WorkersCannotStart):
        return "start_failures"
    return "other"


def start(
    gpus: Sequence[PoolRecipe],
    *,
    cpu: PoolRecipe | None = None,
    fallback: PoolRecipe | None = None,
    start_fallback: PoolRecipe | None = None,
    strict: bool = False,
    on_event: EventCallback | None = None,
) -> DeviceExecutor:
    """Start the GPU pools side by side (and ``cpu`` alongside), then the device executor.

    A GPU whose CUDA provider does not load is dropped with a note, or, when ``strict``
    (``--device cuda``), fails the start with ``DeviceError``; with no GPU left,
    ``start_fallback`` (default: ``fallback``) is started at once. ``fallback`` is what a
    GPU lost later falls back to. Any other start failure raises, and closes what had
    started."""
    started: list[Member] = []
    notes: list[str] = []
    recipes = list(gpus) + ([cpu] if cpu is not None else [])
    errors: list[tuple[PoolRecipe, BaseException]] = []
    with ThreadPoolExecutor(max(1, len(recipes)), thread_name_prefix="embedpool-start") as ex:
        futures = [ex.submit(r.start, on_event) for r in recipes]
        for r, f in zip(recipes, futures, strict=True):
            try:
                started.append(f.result())
            except BaseException as failure:
                errors.append((r, failure))
    try:
        for r, err in errors:
            unavailable = isinstance(err, WorkerStartError) and "DeviceUnavailable" in str(err)
            action = faults.device_start(
                unavailable=unavailable,
                on_gpu=r is not cpu and r.config.device != "cpu",
                strict=strict,
            )
            if action == "fail":
                raise err
            why = _device_unavailable_line(str(err))
            if action == "refuse":
                raise DeviceError(f"--device {r.name.split()[0]}: {why}", "package") from err
            notes.append(f"auto: {r.name} not used: {why}")
        if len(errors) == len(gpus):  # no GPU started
            now = start_fallback or fallback
            if now is None:
                raise DeviceError("no GPU could be used: " + "; ".join(notes), "device")
            started.append(now.start(on_event))
            fallback = None
            notes.append("running on the CPU" + (f" ({now.precision})" if now.precision else ""))
    except BaseException:
        for m in started:
            with contextlib.suppress(Exception):
                m.executor.close()
        raise
    for n in notes:
        log.warning("embedpool: %s", n)
    recipe = fallback
    return DeviceExecutor(
        started,
        fallback=(lambda: recipe.start(on_event)) if recipe else None,
        on_event=on_event,
        notes=notes,
    )


def _device_unavailable_line(message: str) -> str:
    """The DeviceUnavailable line out of a WorkerStartError's message (which carries the
    worker's traceback after it)."""
    for line in message.splitlines():
        if "DeviceUnavailable:" in line:
            return line.split("DeviceUnavailable:", 1)[1].strip()
    return message.strip().splitlines()[0] if message.strip() else "unavailable"
