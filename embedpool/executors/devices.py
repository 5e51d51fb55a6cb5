"""The device executor: one pool per GPU, CPU workers alongside when asked, and the CPU when
the GPUs are lost, behind the one executor contract.

::

    job ──submit(batch)──> DeviceExecutor: queue ── dispatcher thread ──> the first member with room:
                                                                            cuda:0  Pool, 1 worker
                                                                            cuda:1  Pool, 1 worker
                                                                            cpu     Pool, N workers (if asked)
    a member's future ──> the caller's future (results as they come, any order)
    DeviceLost (the member's pool broke: its GPU is gone), or WorkersCannotStart on a GPU
        (``faults.falls_back``) ──> its batches back to the front of the queue, the member
        closed, one line and a ``device_fallback`` event; no GPU left ──> the CPU pool
        (``fallback``) is started and takes over; any other failure fails the batch

Each member is an ordinary ``Pool`` with its own token budget, fault handling and scaling, so
a GPU's out-of-memory error splits and lowers *that* GPU's budget (``faults``), and a lost GPU
only breaks its own pool (``manager``: DEVICE_LOST -> ``DeviceLost``). Dispatch is pull-based:
a member gets a batch when it has fewer than ``capacity`` in flight, so a faster device takes
more of them without any speed estimate. Members are tried in order, GPUs first.

``start`` builds one from recipes (``PoolRecipe``): it starts the GPU pools side by side, and
a GPU whose CUDA provider does not load (``DeviceUnavailable`` in its worker) is dropped with a
note under ``auto``, or fails the start under ``cuda`` (``DeviceError``). A member whose
precision differs from the job's (CPU workers next to an fp16 GPU run fp32) marks its results
(``BatchResult.precision``), so the job caches only vectors of its own graph.

Our own code, not a library's: Ray or a work-stealing executor would bring a scheduler to
solve what a deque and a capacity per member solve here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

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
from embedpool.types import EventCallback

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
        return Member(self.name, pool, capacity, self.precision,
                      on_gpu=self.config.device != "cpu")


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


Job = tuple[WorkBatch, "Future[BatchResult]"]


@dataclass
class _Outcome:
    """What a finished member future means for the caller's future (set outside the lock)."""

    result: BatchResult | None = None
    error: BaseException | None = None
    requeued: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)


class DeviceExecutor:
    """Members behind one executor, with the CPU fallback (see the module docstring)."""

    def __init__(self, members: Sequence[Member], *,
                 fallback: Callable[[], Member] | None = None,
                 on_event: EventCallback | None = None, notes: Sequence[str] = ()) -> None:
        if not members:
            raise ValueError("a device executor needs at least one member")
        self._members = list(members)
        self._fallback = fallback
        self._emit = events.Emitter(on_event, log, backend="pool")
        self._cond = threading.Condition()  # an RLock: an event callback may call stats()
        self._queue: deque[Job] = deque()
        self._to_close: list[Member] = []
        self._closed = False
        self._broken: PoolBroken | None = None
        #: Lines people should see once (a GPU dropped at start, a fallback): the job summary.
        self.notes: list[str] = list(notes)
        self.dim = int(self._members[0].executor.dim)
        self._thread = threading.Thread(target=self._run, name="embedpool-devices", daemon=True)
        self._thread.start()

    # -- the executor contract -----------------------------------------------------------------

    def submit(self, batch: WorkBatch) -> Future[BatchResult]:
        fut: Future[BatchResult] = Future()
        with self._cond:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise IntakeClosed("the device executor is stopping and takes no new batches")
            self._queue.append((batch, fut))
            self._cond.notify_all()
        return fut

    def run(self, batches: Iterable[WorkBatch], max_pending: int | None = None
            ) -> Generator[BatchResult, None, None]:
        return executor.run(self, batches, max_pending)

    def stats(self) -> ExecutorStats:
        with self._cond:
            members = list(self._members)
            queued = len(self._queue)
        snaps = [m.executor.stats() for m in members]
        live = [s for m, s in zip(members, snaps, strict=True) if m.lost is None] or snaps
        total = Counters()
        for s in snaps:
            for f in dataclasses.fields(Counters):
                setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
        return ExecutorStats.of(
            total, backend="pool", workers=tuple(w for s in live for w in s.workers),
            target_workers=sum(s.target_workers for s in live),
            max_workers=sum(s.max_workers for s in live), threads=live[0].threads,
            batch_tokens=live[0].batch_tokens, emergency=any(s.emergency for s in live),
            queued=queued + sum(s.queued for s in live))

    @property
    def broken(self) -> str | None:
        if self._broken is not None:
            return str(self._broken)
        if not self._closed and not self._thread.is_alive():
            return "the device executor's dispatcher thread is gone"
        return None

    @property
    def devices(self) -> list[str]:
        """The members that run now, by name."""
        with self._cond:
            return [m.name for m in self._members if m.lost is None]

    def describe(self) -> str:
        """One line for the job summary: where the batches run, and any fallback."""
        text = " + ".join(self.devices) or "nothing"
        return text + "".join(f"; {n}" for n in self.notes)

    def close(self, grace_s: float = 10.0) -> None:
        """Finish what was submitted within ``grace_s``, then close every member."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(grace_s)
        with self._cond:
            members = list(self._members)
            leftover = list(self._queue)
            self._queue.clear()
        for m in members:
            with contextlib.suppress(Exception):
                m.executor.close()
        for _, fut in leftover:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(PoolError("the device executor closed before this batch ran"))

    def __enter__(self) -> DeviceExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the dispatcher ----------------------------------------------------------------------------

    def _live(self) -> list[Member]:
        return [m for m in self._members if m.lost is None]

    def _due(self) -> bool:
        """Whether the dispatcher has something to do now (called with the lock held)."""
        if self._to_close:
            return True
        live = self._live()
        if self._queue and not live:
            return True
        return bool(self._queue) and any(m.inflight < m.capacity for m in live)

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:  # pragma: no cover - a bug; never leave futures hanging
            log.exception("embedpool device executor crashed")
            self._break(PoolBroken(f"the device executor failed: {exc!r}"))

    def _step(self) -> bool:
        sends: list[tuple[Member, Job]] = []
        with self._cond:
            while not self._due():
                if self._closed and not self._queue and not any(m.inflight for m in self._members):
                    return False
                if self._broken is not None:
                    return False
                self._cond.wait()
            closing, self._to_close = self._to_close, []
            live = self._live()
            need_fallback = not live and bool(self._queue)
            for m in live:
                while self._queue and m.inflight < m.capacity:
                    job = self._queue.popleft()
                    if job[1].cancelled():
                        continue
                    m.inflight += 1
                    sends.append((m, job))
        for m in closing:
            with contextlib.suppress(Exception):
                m.executor.close()
        if need_fallback:
            self._start_fallback()
        for m, job in sends:
            self._send(m, job)
        return True

    def _send(self, m: Member, job: Job) -> None:
        try:
            inner = m.executor.submit(job[0])
        except (PoolError, IntakeClosed) as exc:
            self._finish(m, job, None, exc)
            return
        inner.add_done_callback(lambda f: self._finish(m, job, f, None))

    def _finish(self, m: Member, job: Job, inner: Future[BatchResult] | None,
                error: BaseException | None) -> None:
        """A member is done with a batch (this runs on that member's manager thread)."""
        _, fut = job
        if inner is not None:
            error = (PoolUnavailable("the batch was cancelled") if inner.cancelled()
                     else inner.exception())
        out = _Outcome()
        with self._cond:
            m.inflight -= 1
            if error is None and inner is not None:
                result = inner.result()
                out.result = (dataclasses.replace(result, precision=m.precision)
                              if m.precision else result)
            elif not self._closed and (m.lost is not None or faults.falls_back(
                    break_cause(error), on_gpu=m.on_gpu)):
                # DeviceLost (its GPU is gone), or a GPU member that can no longer start
                # workers (one that fell off the bus fails every CUDA init): the others run it
                out.events = self._lose(m, str(error))
                self._queue.appendleft(job)
                out.requeued = True
            else:
                out.error = error
            self._cond.notify_all()
        for ev in out.events:
            self._emit(events.DEVICE_FALLBACK, **ev)
            log.warning("embedpool: %s", ev["message"])
        if out.requeued or not fut.set_running_or_notify_cancel():
            return
        if out.error is not None:
            fut.set_exception(out.error)
        else:
            assert out.result is not None
            fut.set_result(out.result)

    def _lose(self, m: Member, reason: str) -> list[dict[str, Any]]:
        """Drop a member whose device is gone (lock held); the event to emit, once."""
        if m.lost is not None:
            return []
        m.lost = reason
        self._to_close.append(m)
        others = [x.name for x in self._live()]
        to = " + ".join(others) if others else ("cpu" if self._fallback else "nothing")
        first = reason.strip().splitlines()[0][:300] if reason.strip() else "lost"
        message = f"{m.name} lost ({first}); its batches now run on {to}"
        self.notes.append(f"fell back: {message}")
        return [{"device": m.name, "to": to, "reason": first, "message": message}]

    def _start_fallback(self) -> None:
        with self._cond:
            fallback, self._fallback = self._fallback, None
            lost = "; ".join(f"{m.name}: {m.lost}" for m in self._members if m.lost)
        if fallback is None:
            self._break(PoolBroken(f"every device was lost and there is no CPU fallback: {lost}"))
            return
        try:
            member = fallback()
        except Exception as exc:
            self._break(PoolBroken(f"every GPU was lost ({lost}) and the CPU pool did not start: "
                                   f"{exc}"))
            return
        with self._cond:
            self._members.append(member)
            self._cond.notify_all()

    def _break(self, exc: PoolBroken) -> None:
        with self._cond:
            if self._broken is None:
                self._broken = exc
            leftover = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._emit(events.POOL_BROKEN, error=str(exc))
        for _, fut in leftover:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)


def break_cause(error: BaseException | None) -> faults.BreakCause:
    """Why a member's executor failed a batch, for ``faults.falls_back``."""
    if isinstance(error, DeviceLost):
        return "device_lost"
    if isinstance(error, WorkersCannotStart):
        return "start_failures"
    return "other"


def start(gpus: Sequence[PoolRecipe], *, cpu: PoolRecipe | None = None,
          fallback: PoolRecipe | None = None, start_fallback: PoolRecipe | None = None,
          strict: bool = False, on_event: EventCallback | None = None) -> DeviceExecutor:
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
            if not unavailable or r is cpu:
                raise err
            why = _device_unavailable_line(str(err))
            if strict:
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
    return DeviceExecutor(started, fallback=(lambda: recipe.start(on_event)) if recipe else None,
                          on_event=on_event, notes=notes)


def _device_unavailable_line(message: str) -> str:
    """The DeviceUnavailable line out of a WorkerStartError's message (which carries the
    worker's traceback after it)."""
    for line in message.splitlines():
        if "DeviceUnavailable:" in line:
            return line.split("DeviceUnavailable:", 1)[1].strip()
    return message.strip().splitlines()[0] if message.strip() else "unavailable"
