"""Run embedpool's batches in Ray actors, one embedpool engine per actor.

The job is the same as on the local pool: it resolves the model, tokenises, plans
``WorkBatch``es by padded-token budget and caches vectors on the driver. Only
``Engine.embed`` moves into Ray actors::

    driver (RayExecutor.run)                           Ray cluster
    ------------------------                           -----------
    prepare_onnx(model) --ray.put once--> [object store: ONNX bytes + sha256 manifest]
                                                   |  (fetched only by a node that lacks it)
    start actors ------------------------------->  _EmbedActor(spec, shipment, threads)
                                                   |  locate_model: driver path, node cache,
                                                   |  or object store -> node cache (sha256)
                                                   |  engine = Engine(onnx, threads)
    WorkBatch --split into _Task--> dispatch ----> actor.embed(sequences)  <= 2 in flight each
    ray.wait(results + actor starts, 1 s tick)     |
        vectors -> assemble rows -> BatchResult  <-+   (yielded as soon as a batch is whole)
        actor died -> blame its oldest task: split it in half, or retry a single item up
                      to max_retries times, then report that item as poison; requeue the
                      actor's other tasks unchanged; start a replacement actor
        task raised -> the same bisection, without replacing the actor

Why an actor pool driven by ``ray.wait`` rather than ``ray.util.ActorPool`` or Ray Data
---------------------------------------------------------------------------------------
* Ray Data ``map_batches(Callable, concurrency=(min, max))`` owns the batch boundaries and
  the retries: a task whose actor dies is retried *at the same size* (``max_restarts`` /
  ``max_task_retries``), so an out-of-memory kill repeats itself, and one input that kills
  its actor fails the whole dataset. embedpool needs to split the dead batch, bound the
  retries per input and return a per-item error; none of that is reachable from inside
  ``map_batches``. It would also re-plan batches that embedpool has already cut by token
  budget, and pull a Dataset/Arrow dependency into a path that only moves token ids.
* ``ray.util.ActorPool`` keeps a dead actor in its idle list and has no way to replace it,
  and its ``get_next_unordered`` raises the actor's error with no handle on which batch
  died. Our loop is about the same size and knows, for every object ref, the actor and
  the rows it carries.
So actors are created with ``max_restarts=0, max_task_retries=0``: Ray reports a death
once and embedpool decides what to retry and at what size. ``actors=(min, max)`` gives the
same elasticity as ``concurrency=(min, max)``: start ``min`` and add one actor at a time,
up to ``max``, while work is waiting and the cluster has a free ``cpus_per_actor``.

Which task killed the actor
    An actor runs one task at a time (``max_concurrency=1``) in submission order, so when
    it dies the oldest of its unfinished tasks was the one running; the others were only
    queued behind it and go back to the queue without blame.

Resources per actor
    ``num_cpus=cpus_per_actor`` (the engine gets ``max(1, round(cpus_per_actor))``
    intra-op threads) and, if given, ``memory=memory_per_actor`` bytes, which Ray uses for
    scheduling only. With ``actors=None`` the executor starts
    ``floor(cluster CPUs / cpus_per_actor)`` actors. The issue 3 measurements (2 processes x
    1 thread beat 1 x 2) are why the default is one CPU per actor.

How the model gets to the nodes
    A node needs ``embedpool`` (same version) and ``onnxruntime`` installed, but not the
    model package or the hub. The driver builds or finds the ONNX graph once
    (``embedpool.graph.prepare_onnx``) and puts its bytes in the object store with one
    ``ray.put``; actors receive the reference *nested* in a ``ModelShipment``, so Ray does
    not fetch it unless needed. An actor uses, in order: the driver's own file if that path
    exists on its node with the same sha256 (a single-machine cluster copies nothing); the
    node cache ``$EMBEDPOOL_CACHE_DIR/ray-models/<digest>/`` from an earlier actor; else it
    fetches the bytes, checks every sha256 and writes them there atomically (temp file +
    rename, so concurrent actors on one node are safe). No node rebuilds or quantises the
    graph. If ``prepare_onnx`` cannot run on the driver (``NotImplementedError``) the model
    directory's files are shipped instead (config.json, tokenizer.json, the weights,
    modules.json, 1_Pooling/config.json, sentence_bert_config.json) and each node builds
    its graph with ``EngineSpec.build``.

Connecting
    ``address=None``: reuse ``ray.init`` if the caller already connected; else join
    ``$RAY_ADDRESS`` if set; else start a private local instance (all usable cores,
    dashboard off, workers at nice 0 like the local pool's rather than Ray's default 15)
    that ``close()`` shuts down. ``address="auto"`` or ``"host:port"`` joins
    an existing cluster; ``"ray://host:10001"`` goes through Ray Client.

Not done here: a hung (not dead) actor is not detected; a batch waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

import numpy as np

from embedpool.config import cache_root
from embedpool.engine import Engine, EngineSpec, usable_cores
from embedpool.errors import (
    ConfigError,
    ModelIntegrityError,
    PoolBroken,
    PoolError,
    WorkerStartError,
)
from embedpool.executor import BatchResult, WorkBatch
from embedpool.models import ResolvedModel, load_directory
from embedpool.types import Event, EventCallback, TokenIds, Vectors

INSTALL_HINT = "pip install 'embedpool[ray]'"
#: Batches queued on one actor: one running plus one waiting hides the round trip between
#: batches (result to driver, next batch to actor). More only puts more batches at risk
#: when the actor dies and holds more token ids in the object store.
MAX_INFLIGHT_PER_ACTOR = 2
#: How long ray.wait blocks before the loop looks at growth again. Results wake it at once.
WAIT_TICK_S = 1.0
#: Minimum seconds between two asks for the cluster's free CPUs (a GCS round trip).
GROW_CHECK_S = 1.0
#: First actor start: a fresh node may need to start a worker process, fetch ~25-90 MB of
#: ONNX from the object store and load it; an autoscaling cluster may need minutes to add
#: a node. Beyond this the cluster cannot place the actor, and we say so.
ACTOR_START_TIMEOUT_S = 300.0
#: Replacement actors that fail to start in a row before the job gives up (PoolBroken).
MAX_START_FAILURES = 3
#: Ray's knob for its worker processes' niceness (default 15), read when a raylet starts.
RAY_NICENESS_ENV = "RAY_worker_niceness"
#: Files of a sentence-transformers directory that an engine build reads.
MODEL_FILES = ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json",
               "sentence_bert_config.json")


class MissingExtraError(ConfigError, ImportError):
    """An optional extra is not installed. (Lead: candidate for embedpool.errors.)"""


def require_ray() -> ModuleType:
    """The ``ray`` module, or an error that names the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError(
            f"the Ray backend needs the 'ray' extra, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT}") from exc
    return ray


# --- the engine, as the actor sees it --------------------------------------------------

class Embedder(Protocol):
    dim: int

    def embed(self, sequences: Sequence[TokenIds]) -> Vectors: ...


class EngineRecipe(Protocol):
    """What an actor needs: EngineSpec, or a test fake with the same shape."""

    def build(self) -> Embedder: ...


def with_threads(spec: EngineRecipe, threads: int) -> EngineRecipe:
    """The spec with ``threads`` intra-op threads, if it has such a field."""
    if dataclasses.is_dataclass(spec) and any(f.name == "threads"
                                              for f in dataclasses.fields(spec)):
        replaced: EngineRecipe = dataclasses.replace(spec, threads=threads)  # type: ignore[type-var]
        return replaced
    return spec


# --- shipping the model ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShipment:
    """A model's files in the object store, as handed to every actor.

    ``payload`` holds the ObjectRef of a ``dict[relpath, bytes]`` inside a list so that Ray
    passes it as a reference instead of fetching it before ``__init__`` runs.
    """

    kind: Literal["onnx", "files"]
    manifest: tuple[tuple[str, str], ...]  # (relative path, sha256)
    origin: str  # the directory the files came from on the driver
    payload: list[Any]
    nbytes: int

    @property
    def digest(self) -> str:
        text = "|".join(f"{p}={h}" for p, h in self.manifest)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_path(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def model_files(model: ResolvedModel) -> dict[str, Path]:
    """The files of a model directory that an engine build needs, by relative path."""
    found = {rel: model.directory / rel for rel in MODEL_FILES
             if (model.directory / rel).is_file()}
    for p in (model.weights_path, model.onnx_path, model.tokenizer_path):
        if p is not None and p.is_file():
            try:
                found[str(p.relative_to(model.directory))] = p
            except ValueError:  # outside the directory: keep the name only
                found[p.name] = p
    return found


def has_files(directory: Path, manifest: Iterable[tuple[str, str]]) -> bool:
    return all(_sha256_path(directory / rel) == digest for rel, digest in manifest)


def write_files(directory: Path, files: Mapping[str, bytes],
                manifest: Iterable[tuple[str, str]]) -> None:
    """Check every sha256, then write each file atomically (temp name + rename)."""
    for rel, digest in manifest:
        data = files.get(rel)
        if data is None or sha256_bytes(data) != digest:
            got = "missing" if data is None else sha256_bytes(data)
            raise ModelIntegrityError(
                f"model file {rel} from the Ray object store has sha256 {got}, expected "
                f"{digest}; the object was damaged in transit or the driver's file changed.")
    for rel, digest in manifest:
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if _sha256_path(target) == digest:
            continue
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(files[rel])
        os.replace(tmp, target)


def node_cache_dir(digest: str) -> Path:
    """Where this node keeps shipped models; the temp dir if the cache is not writable."""
    for base in (cache_root(), Path(tempfile.gettempdir()) / "embedpool"):
        target = base / "ray-models" / digest
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(target, os.W_OK):
            return target
    raise ModelIntegrityError(f"no writable directory for the shipped model {digest}: tried "
                              f"{cache_root()} and {tempfile.gettempdir()}")


def locate_model(shipment: ModelShipment, fetch: Callable[[], Mapping[str, bytes]],
                 cache_dir: Path | None = None) -> tuple[Path, str]:
    """(directory holding the shipment's files, where they came from) on this node."""
    origin = Path(shipment.origin)
    if has_files(origin, shipment.manifest):
        return origin, "driver path"
    target = cache_dir if cache_dir is not None else node_cache_dir(shipment.digest)
    if has_files(target, shipment.manifest):
        return target, "node cache"
    write_files(target, fetch(), shipment.manifest)
    return target, "object store"


def ship_model(spec: EngineSpec, ray: ModuleType) -> ModelShipment:
    """Put the spec's ready ONNX graph (or, failing that, its model files) in the store."""
    from embedpool.graph import prepare_onnx

    kind: Literal["onnx", "files"]
    try:
        onnx_path = prepare_onnx(spec.model, spec.precision)
        paths = {onnx_path.name: onnx_path}
        origin, kind = onnx_path.parent, "onnx"
    except NotImplementedError:
        paths = model_files(spec.model)
        origin, kind = spec.model.directory, "files"
    files = {rel: p.read_bytes() for rel, p in paths.items()}
    manifest = tuple(sorted((rel, sha256_bytes(b)) for rel, b in files.items()))
    nbytes = sum(len(b) for b in files.values())
    ref = ray.put(files)
    return ModelShipment(kind, manifest, str(origin), [ref], nbytes)


# --- the actor ---------------------------------------------------------------------------

class _EmbedActor:
    """One engine in one Ray worker process. Made remote with ``ray.remote`` at run time,
    so that defining it needs no ray import."""

    def __init__(self, spec: EngineRecipe, shipment: ModelShipment | None, threads: int) -> None:
        started = time.perf_counter()
        import ray

        spec = with_threads(spec, threads)
        self.model_source = "built on the node"
        if shipment is None:
            self.engine: Embedder = spec.build()
        else:
            assert isinstance(spec, EngineSpec)
            where, self.model_source = locate_model(shipment,
                                                    lambda: ray.get(shipment.payload[0]))
            if shipment.kind == "onnx":
                self.engine = Engine(where / shipment.manifest[0][0], pooling=spec.model.pooling,
                                     dim=spec.model.dim, threads=spec.threads)
            else:
                model = spec.model
                if where != spec.model.directory:
                    model = load_directory(where, name=spec.model.name,
                                           expected_sha256=spec.model.weights_sha256,
                                           source=f"Ray object store (from {shipment.origin})")
                self.engine = dataclasses.replace(spec, model=model).build()
        self.info = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                     "dim": int(self.engine.dim), "model_source": self.model_source,
                     "startup_s": round(time.perf_counter() - started, 3)}

    def ready(self) -> dict[str, Any]:
        return self.info

    def embed(self, sequences: Sequence[TokenIds]) -> Vectors:
        return self.engine.embed(sequences)


# --- the driver side ----------------------------------------------------------------------

@dataclass
class _Task:
    """Some rows of one WorkBatch, on their way to an actor."""

    batch_id: int
    positions: tuple[int, ...]
    sequences: tuple[TokenIds, ...]
    keys: tuple[str, ...]
    failures: int = 0  # deaths or errors while exactly these rows ran (singles only)

    @property
    def padded_tokens(self) -> int:
        return len(self.sequences) * max((len(s) for s in self.sequences), default=0)

    def key(self, i: int = 0) -> str:
        return self.keys[i] if self.keys else f"batch {self.batch_id} item {self.positions[i]}"


def task_of(batch: WorkBatch) -> _Task:
    keys = batch.keys if len(batch.keys) == len(batch.sequences) else ()
    return _Task(batch.batch_id, tuple(range(len(batch.sequences))), batch.sequences, keys)


def _part(task: _Task, lo: int, hi: int) -> _Task:
    return _Task(task.batch_id, task.positions[lo:hi], task.sequences[lo:hi],
                 task.keys[lo:hi] if task.keys else (), task.failures)


def halve(task: _Task) -> tuple[_Task, _Task]:
    """Two halves of a task of two or more rows."""
    if len(task.positions) < 2:
        raise ValueError("cannot split a task of one row")
    mid = len(task.positions) // 2
    return _part(task, 0, mid), _part(task, mid, len(task.positions))


def cut_to_budget(task: _Task, token_cap: int | None) -> list[_Task]:
    """Pieces of at most ``token_cap`` padded tokens (at least one row each)."""
    if token_cap is None or task.padded_tokens <= token_cap:
        return [task]
    longest = max(len(s) for s in task.sequences)
    rows = max(1, token_cap // max(1, longest))
    return [_part(task, i, i + rows) for i in range(0, len(task.positions), rows)]


@dataclass
class _Assembly:
    vectors: Vectors
    remaining: int
    failed: dict[int, str] = field(default_factory=dict)


@dataclass
class _Slot:
    """One actor: its handle, and the refs of its unfinished tasks in submission order."""

    handle: Any
    name: str
    ready: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    inflight: deque[Any] = field(default_factory=deque)
    started: float = field(default_factory=time.monotonic)


def actor_range(actors: int | tuple[int, int] | None, cluster_cpus: float,
                cpus_per_actor: float) -> tuple[int, int]:
    """(actors to start, most actors to grow to)."""
    if actors is None:
        n = max(1, math.floor(cluster_cpus / cpus_per_actor + 1e-9))
        return n, n
    lo, hi = (actors, actors) if isinstance(actors, int) else actors
    if lo < 1 or hi < lo:
        raise ConfigError(f"actors must be N >= 1 or (min, max) with 1 <= min <= max, got {actors!r}")
    return lo, hi


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:limit]}"


def exit_detail(exc: BaseException) -> dict[str, str]:
    """Ray's 'Worker exit type/detail' of a dead actor (signal, OOM hint), when it gives them."""
    text = " ".join(str(exc).split())
    out: dict[str, str] = {}
    for key, pattern in (("exit_type", r"Worker exit type: (\w+)"),
                         ("exit_detail", r"Worker exit detail: (.{1,200}?)(?: Some common|$)")):
        m = re.search(pattern, text)
        if m:
            out[key] = m.group(1).strip()
    return out


def _looks_oom(exc: BaseException) -> bool:
    """Ray's memory monitor, or a SIGKILL that Ray attributes to a possible OOM kill."""
    text = str(exc).lower()
    return type(exc).__name__ == "OutOfMemoryError" or "memory" in text or "oom" in text


class RayExecutor:
    """Runs WorkBatches on a pool of Ray actors (see the module docstring)."""

    def __init__(self, spec: EngineRecipe, *, address: str | None = None,
                 actors: int | tuple[int, int] | None = None, cpus_per_actor: float = 1.0,
                 memory_per_actor: int | None = None, max_retries: int = 3,
                 on_event: EventCallback | None = None) -> None:
        if cpus_per_actor <= 0:
            raise ConfigError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
        if memory_per_actor is not None and memory_per_actor <= 0:
            raise ConfigError(f"memory_per_actor must be > 0 bytes, got {memory_per_actor}")
        if isinstance(actors, int | tuple):
            actor_range(actors, 1.0, cpus_per_actor)  # validate before touching Ray
        self._ray = require_ray()
        self._spec = spec
        self._cpus = cpus_per_actor
        self._memory = memory_per_actor
        self._threads = max(1, round(cpus_per_actor))
        self._max_retries = max_retries
        self._on_event = on_event
        self._slots: list[_Slot] = []
        self._inflight: dict[Any, tuple[_Slot, _Task]] = {}
        self._starting: dict[Any, _Slot] = {}
        self._start_failures = 0
        self._ever_ready = False
        self._serial = 0
        self._token_cap: int | None = None
        self._last_grow_check = 0.0
        self._closed = False
        self._owns_ray = self._connect(address)
        try:
            self._shipment = ship_model(spec, self._ray) if isinstance(spec, EngineSpec) else None
            cpus = float(self._ray.cluster_resources().get("CPU", 0.0))
            self.min_actors, self.max_actors = actor_range(actors, cpus, cpus_per_actor)
            self._remote = self._ray.remote(_EmbedActor)
            for _ in range(self.min_actors):
                self._start_actor()
            self.dim = self._await_first_ready()
        except BaseException:
            self.close()
            raise

    # -- connection and actors ------------------------------------------------------------

    def _connect(self, address: str | None) -> bool:
        """Join or start Ray; True if this executor must shut it down at close."""
        ray = self._ray
        if ray.is_initialized():
            return False
        if address is None and not os.environ.get("RAY_ADDRESS"):
            # Ray runs its workers at nice 15 by default, which on a machine shared with
            # other work (the single-machine case this instance serves) halved throughput
            # against the nice-0 local pool in ray_bench.py. Ours get the pool's priority.
            saved = os.environ.get(RAY_NICENESS_ENV)
            os.environ.setdefault(RAY_NICENESS_ENV, "0")
            try:
                ray.init(address="local", num_cpus=usable_cores(), include_dashboard=False,
                         log_to_driver=False)
            finally:
                if saved is None:
                    os.environ.pop(RAY_NICENESS_ENV, None)
            return True
        target = address or os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {target!r}: {_first_line(exc)}. Check "
                "the address (`ray status` on the head prints it). A cluster with token "
                "authentication also needs RAY_AUTH_MODE=token and its token "
                "(~/.ray/auth_token or RAY_AUTH_TOKEN) on this machine.") from exc
        return True

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is not None:
            ev: Event = {"event": event, "ts": time.time(), "backend": "ray", **fields}
            self._on_event(ev)

    def _start_actor(self) -> _Slot:
        self._serial += 1
        name = f"embedpool-{os.getpid()}-{id(self):x}-{self._serial}"
        opts: dict[str, Any] = {"num_cpus": self._cpus, "max_restarts": 0,
                                "max_task_retries": 0, "max_concurrency": 1, "name": name}
        if self._memory is not None:
            opts["memory"] = self._memory
        handle = self._remote.options(**opts).remote(self._spec, self._shipment, self._threads)
        slot = _Slot(handle, name)
        self._slots.append(slot)
        self._starting[handle.ready.remote()] = slot
        self._emit("actor_start", actor=name, cpus=self._cpus, memory=self._memory)
        return slot

    def _on_started(self, ref: Any) -> None:
        slot = self._starting.pop(ref)
        try:
            slot.info = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            self._remove(slot)
            self._start_failures += 1
            msg = (f"Ray actor {slot.name} failed while loading its engine: {exc}")
            self._emit("worker_start_failed", actor=slot.name, error=_first_line(exc))
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
        self._emit("actor_ready", actor=slot.name, **slot.info)

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

    def _remove(self, slot: _Slot) -> None:
        if slot in self._slots:
            self._slots.remove(slot)
        for ref in slot.inflight:
            self._inflight.pop(ref, None)
        slot.inflight.clear()
        for ref in [r for r, s in self._starting.items() if s is slot]:
            del self._starting[ref]
        with contextlib.suppress(Exception):  # already gone: nothing to free
            self._ray.kill(slot.handle, no_restart=True)

    @property
    def handles(self) -> list[Any]:
        """Handles of the live actors (for operators and fault tests)."""
        return [s.handle for s in self._slots]

    def _maybe_grow(self, backlog: bool) -> None:
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

    # -- the job loop -------------------------------------------------------------------

    def run(self, batches: Iterable[WorkBatch]) -> Iterator[BatchResult]:
        """Yield one BatchResult per batch, in completion order, as each batch is whole."""
        if self._closed:
            raise PoolError("RayExecutor.run after close()")
        job = _Job(self, iter(batches))
        try:
            while True:
                yield from job.dispatch()
                self._maybe_grow(job.backlog)
                self._check_starved()
                waiting = list(self._inflight) + list(self._starting)
                if not waiting:
                    if job.finished:
                        return
                    raise PoolBroken("no Ray actor is alive or starting, with work left")
                done, _ = self._ray.wait(waiting, num_returns=1, timeout=WAIT_TICK_S)
                for ref in done:
                    if ref in self._starting:
                        self._on_started(ref)
                    elif ref in self._inflight:
                        yield from job.collect(ref)
        finally:
            if not job.finished:  # abandoned or failed: do not leave stale work queued
                for ref in list(self._inflight):
                    with contextlib.suppress(Exception):  # finished, or the actor is gone
                        self._ray.cancel(ref)
                for slot in self._slots:
                    slot.inflight.clear()
                self._inflight.clear()

    def close(self) -> None:
        """Kill the actors, free the shipped model, and shut Ray down if we started it."""
        if self._closed:
            return
        self._closed = True
        for slot in list(self._slots):
            self._remove(slot)
        self._shipment = None
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Job:
    """The state of one ``run``: queued tasks, half-assembled batches, the input iterator."""

    def __init__(self, ex: RayExecutor, source: Iterator[WorkBatch]) -> None:
        self.ex = ex
        self.source = source
        self.exhausted = False
        self.todo: deque[_Task] = deque()  # retries first: they hold back a whole batch
        self.partial: dict[int, _Assembly] = {}

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.todo and not self.partial

    @property
    def backlog(self) -> bool:
        return bool(self.todo) or not self.exhausted

    def _next_task(self) -> tuple[_Task | None, BatchResult | None]:
        if self.todo:
            return self.todo.popleft(), None
        if self.exhausted:
            return None, None
        batch = next(self.source, None)
        if batch is None:
            self.exhausted = True
            return None, None
        n = len(batch.sequences)
        if n == 0:
            return None, BatchResult(batch.batch_id, np.zeros((0, self.ex.dim), np.float32))
        self.partial[batch.batch_id] = _Assembly(np.zeros((n, self.ex.dim), np.float32), n)
        task = task_of(batch)
        pieces = cut_to_budget(task, self.ex._token_cap)
        if len(pieces) > 1:
            self.ex._emit("split", batch_id=batch.batch_id, items=n, into=[len(p.positions)
                          for p in pieces], reason="token budget lowered after an OOM kill")
        self.todo.extend(pieces[1:])
        return pieces[0], None

    def dispatch(self) -> Iterator[BatchResult]:
        """Fill every ready actor up to MAX_INFLIGHT_PER_ACTOR, least loaded first."""
        while True:
            free = [s for s in self.ex._slots
                    if s.ready and len(s.inflight) < MAX_INFLIGHT_PER_ACTOR]
            if not free:
                return
            task, empty = self._next_task()
            if empty is not None:
                yield empty
                continue
            if task is None:
                return
            slot = min(free, key=lambda s: len(s.inflight))
            ref = slot.handle.embed.remote(task.sequences)
            slot.inflight.append(ref)
            self.ex._inflight[ref] = (slot, task)

    def collect(self, ref: Any) -> Iterator[BatchResult]:
        ray = self.ex._ray
        slot, task = self.ex._inflight[ref]
        try:
            vectors = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.OutOfMemoryError) as exc:
            yield from self._actor_died(slot, ref, exc)
            return
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
            self._forget(slot, ref)
            self.ex._emit("retry", batch_id=task.batch_id, items=len(task.positions),
                          reason=_first_line(exc))
            self.todo.appendleft(task)
            return
        except ray.exceptions.RayTaskError as exc:  # embed raised; the actor lives on
            self._forget(slot, ref)
            yield from self._blame(task, exc, died=False)
            return
        self._forget(slot, ref)
        yield from self._fill(task, vectors)

    def _forget(self, slot: _Slot, ref: Any) -> None:
        self.ex._inflight.pop(ref, None)
        if ref in slot.inflight:
            slot.inflight.remove(ref)

    def _fill(self, task: _Task, vectors: Vectors | None = None,
              errors: Mapping[int, str] | None = None) -> Iterator[BatchResult]:
        asm = self.partial[task.batch_id]
        if vectors is not None:
            asm.vectors[list(task.positions)] = vectors
        for pos, msg in (errors or {}).items():
            asm.failed[pos] = msg
        asm.remaining -= len(task.positions)
        if asm.remaining == 0:
            del self.partial[task.batch_id]
            yield BatchResult(task.batch_id, asm.vectors, asm.failed)

    def _actor_died(self, slot: _Slot, ref: Any, exc: BaseException) -> Iterator[BatchResult]:
        """The oldest unfinished task was running: blame it; requeue the rest; replace the
        actor. Results that left the actor before it died are kept, not blamed."""
        ray = self.ex._ray
        finished: list[tuple[_Task, Vectors]] = []
        tasks: list[_Task] = []
        for r in [r for r in slot.inflight if r in self.ex._inflight]:
            task = self.ex._inflight[r][1]
            if r != ref and ray.wait([r], timeout=0)[0]:
                try:
                    finished.append((task, ray.get(r)))
                    continue
                except ray.exceptions.RayError:  # lost with the actor
                    pass
            tasks.append(task)
        for task, vectors in finished:
            yield from self._fill(task, vectors)
        oom = _looks_oom(exc)
        running = tasks[0]
        self.ex._emit("worker_death", actor=slot.name, pid=slot.info.get("pid"),
                      node=slot.info.get("node"), error=_first_line(exc), oom=oom,
                      **exit_detail(exc),
                      batch_id=running.batch_id, items=len(running.positions),
                      tokens=running.padded_tokens)
        self.ex._remove(slot)
        self.ex._start_actor()
        if oom and len(running.positions) > 1:
            cap = max(1, running.padded_tokens // 2)
            self.ex._token_cap = min(cap, self.ex._token_cap or cap)
        for queued in reversed(tasks[1:]):
            self.ex._emit("retry", batch_id=queued.batch_id, items=len(queued.positions),
                          reason=f"queued on dead actor {slot.name}")
            self.todo.appendleft(queued)
        yield from self._blame(running, exc, died=True)

    def _blame(self, task: _Task, exc: BaseException, *, died: bool) -> Iterator[BatchResult]:
        """Split a failed multi-row task; retry a single row, then report it as poison."""
        what = "killed its Ray actor" if died else "raised in the engine"
        if len(task.positions) > 1:
            a, b = halve(task)
            self.ex._emit("split", batch_id=task.batch_id, items=len(task.positions),
                          into=[len(a.positions), len(b.positions)], reason=_first_line(exc))
            self.todo.appendleft(b)
            self.todo.appendleft(a)
            return
        task.failures += 1
        if task.failures <= self.ex._max_retries:
            self.ex._emit("retry", batch_id=task.batch_id, items=1, key=task.key(),
                          attempt=task.failures + 1, reason=_first_line(exc))
            self.todo.appendleft(task)
            return
        detail = exit_detail(exc).get("exit_detail")
        msg = (f"input {task.key()!r} {what} {task.failures} times "
               f"(isolated by bisection; every other input was embedded). "
               f"Last error: {_first_line(exc)}" + (f" ({detail})" if detail else ""))
        self.ex._emit("poison", batch_id=task.batch_id, key=task.key(),
                      position=task.positions[0], failures=task.failures, error=_first_line(exc))
        yield from self._fill(task, None, {task.positions[0]: msg})
