"""Several models in one server and one memory budget (``serve --model A --model B
--reranker R``): which models are loaded, loading one on its first request, unloading idle
ones. Embedders and rerankers are members alike: the same plan, keep-alive and LRU order.

Two parts, kept apart:

* :func:`plan_load`, the pure policy: given the loaded models (their planned bytes, requests
  in flight, last use), the bytes the models may use and the new model's planned bytes, it
  answers *load now*, *unload these least recently used idle models first*, *wait for a busy
  one*, or *refuse* (the model cannot fit even alone). Table-tested in
  tests/server/test_multi_model.py.
* :class:`ModelRegistry`, the plumbing on the event loop: one :class:`Member` a model (an
  embedder's :class:`ModelSlot`: its tokenizer, names and embedding service; a reranker's
  :class:`RerankerSlot`: its rerank service; each service's every call goes through
  :meth:`ModelRegistry.use`), loads serialised by one lock, requests for a loading model
  waiting on that load (bounded by ``request_timeout_s``, never dropped), a model with
  requests in flight never unloaded, and a reaper that unloads a model idle past its
  keep-alive.

The budget is the planner's figure (``graph.prebuild.available_memory``: the memory
cgroup's limit minus its use, MemAvailable, under ``--max-memory``) read once when the server
starts, before any model is loaded, or ``ServerSettings.model_memory_bytes`` when set. A
model's planned bytes are the pool's own estimate of one worker
(``pool.memory.worker_mem_estimate`` of ``graph.families.catalog.model_memory``) times the workers it
starts with: the pool grows only while its readings allow, so the plan covers what a load
costs, and the pool's own limits keep the rest. Planned figures, not live readings, decide:
memory a stopped pool freed shows up late in the readings, and the next load must not wait
for it.

Keep-alive: the server's (``--keep-alive``) applies when the server serves more than one
model: a single model has nothing to make room for, so it stays loaded (as before);
``keep_alive_s <= 0``: never unloaded for idleness (only to make room). A request may carry
its own (Ollama's ``keep_alive``, :meth:`ModelRegistry.use`): it holds for that model until
its next request, which sets its own (none: the server's), as in Ollama: seconds, ``0``
unloads the model once its requests are done, ``inf`` (Ollama's negative) never for
idleness. Whatever the keep-alive, an idle model is unloaded when another needs its memory.

``--preload``: ``first`` loads the default embedder and the default reranker at start,
``all`` every model in order while they fit, ``none`` nothing; the rest load on demand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.concurrency import run_in_threadpool

from embedpool.config import format_bytes
from embedpool.errors import ConfigError
from embedpool.metrics import ModelReadings, ServerMetrics, pool_counters
from embedpool.microbatcher import SubmitExecutor, stats_dict
from embedpool.models import ResolvedModel
from embedpool.prepare import VectorCacheHook
from embedpool.server.openai import ApiError, ServedModel
from embedpool.server.rerank import RerankerSetup, RerankService
from embedpool.server.service import EmbeddingService, Runtime
from embedpool.server.settings import ServerSettings
from embedpool.tokenization import TextTokenizer
from embedpool.types import Precision

State = Literal["loaded", "loading", "unloaded", "unloading"]
Preload = Literal["all", "first", "none"]

#: How often the reaper looks for models idle past their keep-alive (at most; a shorter
#: keep-alive looks 4 times per keep-alive).
REAP_INTERVAL_S = 5.0


# ----------------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class Resident:
    """A loaded (or loading) model, as the policy sees it."""

    name: str
    planned_bytes: int
    inflight: int  # requests using it now (a loading model counts as busy)
    last_used: float
    #: Its last request's keep-alive in seconds (0: unload when idle, inf: never for
    #: idleness); None: the server's.
    keep_alive_s: float | None = None


@dataclass(frozen=True)
class LoadPlan:
    """What to do to load a model: ``load`` now; ``unload`` the named idle models first (least
    recently used first), then plan again; ``wait`` for a busy model to finish; ``refuse``:
    it needs more than the whole budget."""

    action: Literal["load", "unload", "wait", "refuse"]
    needed: int
    available: int
    unload: tuple[str, ...] = ()


def plan_load(resident: Sequence[Resident], budget: int, needed: int) -> LoadPlan:
    """The decision for loading a model of ``needed`` planned bytes beside ``resident`` under
    ``budget`` bytes for all models (see :class:`LoadPlan`). Idle models go least recently
    used first, and only as many as make room; a busy model is never chosen."""
    if needed > budget:
        return LoadPlan("refuse", needed, budget)
    free = budget - sum(r.planned_bytes for r in resident)
    if needed <= free:
        return LoadPlan("load", needed, free)
    chosen: list[str] = []
    room = free
    for r in sorted((r for r in resident if r.inflight == 0), key=lambda r: r.last_used):
        if room >= needed:
            break
        chosen.append(r.name)
        room += r.planned_bytes
    if room >= needed:
        return LoadPlan("unload", needed, free, tuple(chosen))
    return LoadPlan("wait", needed, free)


def keep_alive_of(r: Resident, keep_alive_s: float) -> float:
    """How long ``r`` stays loaded idle: its request's keep-alive, else the server's
    ``keep_alive_s`` (``<= 0``: forever)."""
    if r.keep_alive_s is not None:
        return max(0.0, r.keep_alive_s)
    return keep_alive_s if keep_alive_s > 0 else math.inf


def idle_expired(resident: Iterable[Resident], now: float, keep_alive_s: float) -> list[str]:
    """The models idle (nothing in flight) for at least their keep-alive (:func:`keep_alive_of`:
    the server's ``keep_alive_s``, ``<= 0`` never, unless a request gave its own)."""
    return [
        r.name
        for r in resident
        if r.inflight == 0 and now - r.last_used >= keep_alive_of(r, keep_alive_s)
    ]


def next_expiry(resident: Iterable[Resident], now: float, keep_alive_s: float) -> float | None:
    """Seconds until the first idle model's keep-alive runs out (None: none will)."""
    left = [r.last_used + keep_alive_of(r, keep_alive_s) - now for r in resident if r.inflight == 0]
    soonest = min(left, default=math.inf)
    return None if math.isinf(soonest) else max(0.0, soonest)


def planned_bytes(
    model: ResolvedModel,
    precision: str,
    batch_tokens: int,
    workers: int = 1,
    runtime: str = "onnxruntime",
) -> int:
    """A model's planned memory: the pool's estimate of one worker's peak on ``runtime``,
    times ``workers``."""
    from embedpool.executors.pool.memory import worker_mem_estimate
    from embedpool.graph.families.catalog import model_memory

    memory = model_memory(model, precision, runtime)
    return max(1, workers) * worker_mem_estimate(
        precision,  # type: ignore[arg-type]
        batch_tokens,
        memory,
    )


# ----------------------------------------------------------------------------- the plumbing
@dataclass(frozen=True)
class ModelSetup:
    """One model the server serves: the model, how to start its executor, its vector cache,
    its planned bytes (None: :func:`planned_bytes` of one worker), the names clients may use
    besides its own."""

    model: ResolvedModel
    factory: Callable[[], SubmitExecutor]
    cache: VectorCacheHook | None = None
    planned_bytes: int | None = None
    aliases: tuple[str, ...] = ()
    #: The precision its placement chose (None: the server's).
    precision: Precision | None = None


class Member:
    """One model the registry loads and unloads (an embedder's :class:`ModelSlot` or a
    reranker's :class:`RerankerSlot`): its runtime (executor and batcher), planned bytes and
    load state."""

    kind = "embedding"

    def __init__(
        self,
        settings: ServerSettings,
        name: str,
        model: ResolvedModel,
        factory: Callable[[], SubmitExecutor],
        planned: int,
        metrics: ServerMetrics,
        *,
        normalize_windows: bool,
    ) -> None:
        self.settings = settings
        self.name = name
        self.model = model
        self.factory = factory
        self.planned = planned
        self.metrics = metrics
        self.normalize_windows = normalize_windows
        #: Unique among the registry's models (its plans and metrics): the name, unless an
        #: embedder and a reranker share it (then "name (kind)").
        self.key = name
        self.runtime = Runtime()
        self.state: State = "unloaded"
        self.inflight = 0
        self.last_used = time.monotonic()
        self.loaded_at: float | None = None
        self.loading: asyncio.Task[None] | None = None
        #: The keep-alive its last request asked for (seconds; None: the server's).
        self.keep_alive_s: float | None = None
        #: The pool counters (OOM kills, deaths, ...) of this model's pools already closed.
        self.closed_counts: dict[str, float] = {}

    @property
    def names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def pool_counts(self) -> dict[str, float]:
        """This model's pool counters: its pools closed so far and the running one."""
        counts = dict(self.closed_counts)
        for name, value in pool_counters(self.pool_stats()).items():
            counts[name] = counts.get(name, 0.0) + value
        return counts

    def pool_stats(self) -> dict[str, Any]:
        executor = self.runtime.executor
        try:
            return stats_dict(executor.stats()) if executor is not None else {}
        except Exception:  # a scrape must not fail because the pool is closing
            return {}

    def readings(self) -> ModelReadings:
        batcher = self.runtime.batcher
        return ModelReadings(
            self.key,
            self.state,
            batcher.stats() if batcher else None,
            self.pool_stats(),
            self.closed_counts,
        )

    def resident(self) -> Resident:
        busy = self.inflight + (1 if self.state in ("loading", "unloading") else 0)
        return Resident(self.key, self.planned, busy, self.last_used, self.keep_alive_s)

    async def start(self) -> None:
        rt = self.runtime
        await rt.start(
            self.factory, self.settings, self.metrics, normalize_windows=self.normalize_windows
        )
        rt.started = time.time()
        self.loaded_at = time.monotonic()

    async def stop(self) -> None:
        rt = self.runtime
        await rt.stop_batcher(self.settings.graceful_timeout_s)
        if rt.executor is not None:
            self.closed_counts = self.pool_counts()
        await rt.close_executor()


class ModelSlot(Member):
    """One served embedding model: what the dialects' routes need of it
    (``dialects.ModelContext``) and its load state. Its service's every embedding passes
    through the registry's ``use``."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: ServerSettings,
        setup: ModelSetup,
        served: ServedModel,
        tokenizer: TextTokenizer,
        metrics: ServerMetrics,
    ) -> None:
        super().__init__(
            settings,
            served.names[0],
            setup.model,
            setup.factory,
            setup.planned_bytes
            if setup.planned_bytes is not None
            else planned_bytes(setup.model, settings.precision, settings.batch_tokens),
            metrics,
            normalize_windows=setup.model.normalize,
        )
        self.setup = setup
        self.served = served
        self.tokenizer = tokenizer
        self.service = EmbeddingService(
            settings, tokenizer, served, self.runtime, metrics, setup.cache
        )
        self.service.guard = lambda keep_alive_s: registry.use(self, keep_alive_s)

    @property
    def names(self) -> tuple[str, ...]:
        return self.served.names


class RerankerSlot(Member):
    """One served reranker (``serve --reranker``): its rerank service, whose every scoring
    passes through the registry's ``use``."""

    kind = "rerank"

    def __init__(
        self,
        registry: ModelRegistry,
        settings: ServerSettings,
        setup: RerankerSetup,
        metrics: ServerMetrics,
    ) -> None:
        service = RerankService(settings, setup, metrics)
        precision = setup.precision or settings.precision
        super().__init__(
            settings,
            service.names[0],
            setup.model,
            setup.factory,
            setup.planned_bytes
            if setup.planned_bytes is not None
            else planned_bytes(setup.model, precision, settings.batch_tokens),
            metrics,
            normalize_windows=False,
        )
        self.setup = setup
        self.service = service
        service.runtime = self.runtime
        service.guard = lambda: registry.use(self)

    @property
    def names(self) -> tuple[str, ...]:
        return self.service.names


class ModelRegistry:
    """The served models (the first embedder is the default; then the rerankers), their loads
    and unloads."""

    def __init__(
        self,
        settings: ServerSettings,
        setups: Sequence[ModelSetup],
        served: Callable[[ServerSettings, ModelSetup, TextTokenizer], ServedModel],
        metrics: ServerMetrics,
        rerankers: Sequence[RerankerSetup] = (),
    ) -> None:
        if not setups:
            raise ValueError("a server serves at least one model")
        self.settings = settings
        self.slots: list[ModelSlot] = []
        for i, setup in enumerate(setups):
            tokenizer = TextTokenizer.for_model(setup.model)
            # only the first model answers to --model's spelling and --served-model-name
            own = (
                settings
                if i == 0
                else dataclasses.replace(
                    settings, model=setup.model.name, served_model_names=setup.aliases
                )
            )
            mine = (
                settings
                if setup.precision is None
                else dataclasses.replace(settings, precision=setup.precision)
            )
            self.slots.append(
                ModelSlot(self, mine, setup, served(own, setup, tokenizer), tokenizer, metrics)
            )
        for i, slot in enumerate(self.slots):
            for other in self.slots[:i]:
                if other.served.lookup(slot.name) is not None:
                    raise ConfigError(
                        f"two models are both named {slot.name!r} "
                        f"({other.model.directory} and {slot.model.directory}): "
                        "each model served needs its own name"
                    )
        #: ``serve --reranker``: the rerankers, in the same budget (the first is the default).
        self.rerankers = [
            RerankerSlot(
                self,
                settings
                if r.precision is None
                else dataclasses.replace(settings, precision=r.precision),
                r,
                metrics,
            )
            for r in rerankers
        ]
        #: Every model: the embedders, then the rerankers.
        self.members: list[Member] = [*self.slots, *self.rerankers]
        # An embedder and a reranker may share a name (each kind's routes pick among their
        # own); the registry, its plans and the metrics' label tell them apart by key.
        keys: set[str] = set()
        for i, m in enumerate(self.members):
            if m.key in keys:
                m.key = f"{m.name} ({m.kind})"
            if m.key in keys:
                m.key = f"{m.name} ({m.kind} {i})"
            keys.add(m.key)
        self.default = self.slots[0]
        #: Bytes for all models; one model alone is never held to it (nothing to make room
        #: for: it loads as a single-model server always did).
        self.budget = settings.model_memory_bytes or sys.maxsize
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        #: True between start (its preloads done) and stop.
        self.started = False
        metrics.set_models(lambda: [m.readings() for m in self.members])

    # ------------------------------------------------------------ names
    def find(self, name: str) -> ModelSlot | None:
        """The embedder serving ``name`` (its names, exact then case-insensitive)."""
        for slot in self.slots:
            if slot.served.lookup(name) is not None:
                return slot
        return None

    def all_names(self) -> list[str]:
        return [n for slot in self.slots for n in slot.served.names]

    def not_found(self, name: str) -> ApiError:
        return ApiError(
            404,
            f"The model '{name}' does not exist on this server. Served "
            f"models: {', '.join(self.all_names())}.",
            param="model",
            code="model_not_found",
        )

    # ------------------------------------------------------------ lifespan
    async def start(self) -> None:
        if self.settings.model_memory_bytes is None and len(self.members) > 1:
            from embedpool.graph.prebuild import available_memory

            self.budget = await run_in_threadpool(available_memory, self.settings.max_memory_bytes)
        preload = self.settings.preload
        chosen: list[Member] = (
            list(self.members)
            if preload == "all"
            else [*self.slots[:1], *self.rerankers[:1]]
            if preload == "first"
            else []
        )
        for member in chosen:
            if (
                plan_load([s.resident() for s in self.loaded()], self.budget, member.planned).action
                != "load"
            ):
                continue  # preload fills the budget in order; the rest load on demand
            await self._load(member)
        self._reaper = asyncio.create_task(self._reap_loop())
        self.started = True

    async def stop(self) -> None:
        self.started = False
        if self._reaper is not None:
            self._reaper.cancel()
            with suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for member in self.members:
            if member.loading is not None:
                with suppress(Exception):  # a failed load leaves nothing to stop
                    await member.loading
            await member.stop()
            member.state = "unloaded"

    def loaded(self) -> list[Member]:
        return [s for s in self.members if s.state != "unloaded"]

    def keep_alive(self, member: Member) -> float:
        """How long ``member`` stays loaded idle now (seconds; inf: not for idleness)."""
        server = self.settings.keep_alive_s if len(self.members) > 1 else 0.0
        return keep_alive_of(member.resident(), server)

    def expires_in(self, member: Member) -> float:
        """Seconds until ``member`` is unloaded for idleness if no request comes (inf:
        never; counted from now while requests are in flight)."""
        keep = self.keep_alive(member)
        if member.inflight or member.state != "loaded":
            return keep
        return max(0.0, member.last_used + keep - time.monotonic())

    # ------------------------------------------------------------ use
    @asynccontextmanager
    async def use(self, slot: Member, keep_alive_s: float | None = None) -> AsyncIterator[None]:
        """``slot`` loaded (waiting for its load, loading it) and counted in flight while the
        block runs: never unloaded under a request. ``keep_alive_s``: the request's
        keep-alive (None: the server's), the model's from the end of this request on."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        while slot.state != "loaded":
            if slot.loading is None:
                slot.loading = asyncio.create_task(self._load(slot))
                # its error reaches every waiter; this keeps a load nobody awaits quiet
                slot.loading.add_done_callback(lambda t: t.cancelled() or t.exception())
            task = slot.loading
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise ApiError(
                    503,
                    f"the model {slot.name} did not load within "
                    f"{self.settings.request_timeout_s:g} s",
                    type="server_error",
                    code="timeout",
                    headers={"Retry-After": "5"},
                ) from None
            except ApiError:
                raise
            except Exception as exc:  # its executor failed to start: the next request retries
                raise ApiError(
                    503,
                    f"the model {slot.name} could not be loaded: {type(exc).__name__}: {exc}",
                    type="server_error",
                    code="model_load_failed",
                    headers={"Retry-After": "5"},
                ) from exc
        slot.inflight += 1
        slot.last_used = time.monotonic()
        try:
            yield
        finally:
            slot.inflight -= 1
            slot.last_used = time.monotonic()
            changed, slot.keep_alive_s = slot.keep_alive_s != keep_alive_s, keep_alive_s
            self._changed.set()
            if slot.inflight == 0 and (changed or keep_alive_s == 0):
                # a new keep-alive: the reaper plans its next look again (else its timer,
                # at most REAP_INTERVAL_S, finds a later expiry by itself)
                self._wake.set()

    async def _load(self, slot: Member) -> None:
        """Make room by the policy, then start ``slot``'s executor (one load at a time)."""
        try:
            async with self._lock:
                deadline = time.monotonic() + self.settings.request_timeout_s
                slot.state = "loading"
                while True:
                    self._changed.clear()
                    others = [s.resident() for s in self.loaded() if s is not slot]
                    plan = plan_load(others, self.budget, slot.planned)
                    if plan.action == "load":
                        await slot.start()
                        slot.state = "loaded"
                        slot.last_used = time.monotonic()
                        return
                    if plan.action == "refuse":
                        raise ApiError(
                            503,
                            f"the model {slot.name} needs {format_bytes(plan.needed)} of "
                            f"memory (the pool's plan) and only {format_bytes(plan.available)} "
                            "is available to models here: raise the memory limit or serve a "
                            "smaller model",
                            type="server_error",
                            code="model_too_large",
                        )
                    if plan.action == "unload":
                        # one at a time, then plan again: while one stops, a request may
                        # take another of the chosen (planned and checked with no await
                        # between, so this one is idle)
                        await self._unload(self._slot(plan.unload[0]))
                        continue
                    left = deadline - time.monotonic()
                    try:
                        await asyncio.wait_for(self._changed.wait(), max(0.0, left))
                    except TimeoutError:
                        raise ApiError(
                            503,
                            f"the model {slot.name} needs {format_bytes(plan.needed)} and "
                            f"{format_bytes(plan.available)} is free beside models busy with "
                            f"requests for {self.settings.request_timeout_s:g} s",
                            type="server_error",
                            code="model_busy",
                            headers={"Retry-After": "5"},
                        ) from None
        except BaseException:
            if slot.state == "loading":
                slot.state = "unloaded"
            raise
        finally:
            slot.loading = None
            self._changed.set()

    def _slot(self, key: str) -> Member:
        return next(s for s in self.members if s.key == key)

    async def _unload(self, slot: Member) -> None:
        """Stop an idle model (the caller checked it idle with no await since)."""
        assert slot.inflight == 0
        slot.state = "unloading"
        try:
            await slot.stop()
        finally:
            slot.state = "unloaded"
            slot.loaded_at = None
            self._changed.set()

    def _server_keep_alive(self) -> float:
        """The server's keep-alive for :func:`idle_expired` (one model: never for idleness)."""
        return self.settings.keep_alive_s if len(self.members) > 1 else 0.0

    async def reap(self) -> list[str]:
        """Unload the models idle past their keep-alive (after a load that holds the lock)."""
        async with self._lock:
            server = self._server_keep_alive()
            names = idle_expired(
                [s.resident() for s in self.members if s.state == "loaded"],
                time.monotonic(),
                server,
            )
            done: list[str] = []
            for name in names:
                slot = self._slot(name)
                # checked again: a request may have used it while the one before stopped
                if idle_expired(
                    [slot.resident()] if slot.state == "loaded" else [], time.monotonic(), server
                ):
                    await self._unload(slot)
                    done.append(name)
            return done

    async def _reap_loop(self) -> None:
        """Reap, then sleep until the next model's keep-alive runs out or a model's last
        request ends (``use`` wakes it: a new keep-alive, perhaps 0), whichever is first."""
        while True:
            self._wake.clear()
            await self.reap()
            soonest = next_expiry(
                [s.resident() for s in self.members if s.state == "loaded"],
                time.monotonic(),
                self._server_keep_alive(),
            )
            # a timer, not synchronisation: at most REAP_INTERVAL_S late for a model whose
            # keep-alive a request did not change, never busy (10 ms at least)
            timeout = REAP_INTERVAL_S if soonest is None else min(REAP_INTERVAL_S, soonest + 0.01)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
