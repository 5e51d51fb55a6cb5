"""Where a job's model runs: --device, --precision and --cpu-workers resolved once, and the
executor that runs there.

::

    place(model, device="auto", precision="auto", cpu_workers=None, batch_tokens=None)
        device_choice.resolve_device ─> DevicePlan (cpu, or the GPUs)        DeviceError: exit 2
        precision_for         ──> int8 on the CPU, fp16 on a GPU (fp32 runs on both)
        runtimes.choose       ──> the CPU's runtime (--engine: ONNX Runtime or OpenVINO) and
                                  precision, from the measured table for its feature set
        gpuplan.plan_devices  ──> per GPU: budget and arena cap; CPU workers alongside
        = Placement (the job's batch size, the summary line)

    prepare_graphs(model, placement, emit)   the graphs built before any worker starts
                                             (int8 may fall back to fp32)
    start_executor(model, placement, workers=..., backend=..., engine=...)
        ray   a RayExecutor (one actor per cluster CPU, or --workers N)
        cpu   workers None: in-process; else the adaptive Pool
        cuda  workers None: in-process on the first GPU; else pool/devices.start: one pool per
              GPU, the CPU workers asked for, and a CPU pool to fall back on

``start_executor`` is the one construction path of every executor: the CLI's ``embed`` and
``bench``, the library's ``Embedder`` and ``serve`` (``executor_factory``) all call it. An
engine recipe other than the model's ``EngineSpec`` (a custom engine, ``embedpool.testing``'s
fakes) enters here too, as ``engine=``, and runs in the same executors.

What runs where on a GPU machine: the parent tokenises and plans batches (on every core it
has: tokenizers' own thread pool), one worker per GPU runs the model in fp16, CPU workers
run only when ``cpu_workers`` asks for them (in fp32, the precision fp16 is checked against,
so one job's vectors stay within its tolerance), and a lost GPU's batches move to a CPU pool
(fp32 too). ``auto`` with a GPU whose CUDA provider does not load runs on the CPU in int8,
as on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedpool.budget import BatchBudget, batch_budget
from embedpool.config import env_str
from embedpool.device_choice import DevicePlan, DeviceRequest, resolve_device
from embedpool.errors import ConfigError, DeviceError, EmbedpoolError, ModelError
from embedpool.executor import Executor
from embedpool.executors.pool.gpuplan import (
    DevicesPlan,
    GpuInput,
    ModelShape,
    plan_devices,
)
from embedpool.models import ResolvedModel
from embedpool.types import EventCallback, Precision, Profile, Runtime

if TYPE_CHECKING:
    from embedpool.faults import FaultPolicy
    from embedpool.graph.prebuild import Emit
    from embedpool.runtimes import RuntimeChoice

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "int8", "fp32", "fp16", "bf16")


def graph_precisions(model: ResolvedModel | None = None) -> tuple[str, ...]:
    """The precisions the graph builder makes (``graph.GRAPH_PRECISIONS``), for ``model``
    where one is given (``graph.model_precisions``: no fp16 for a family whose activations
    overflow it, e.g. EmbeddingGemma's)."""
    from embedpool.graph import GRAPH_PRECISIONS, model_precisions

    return GRAPH_PRECISIONS if model is None else model_precisions(model)


def precision_for(requested: str, kind: str, available: tuple[str, ...]) -> Precision:
    """The precision to run: ``auto`` is int8 on the CPU and fp16 on a GPU (fp32 where the
    graph builder has no fp16); an explicit one must run on the device. Pure."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if kind == "cpu":
            return "int8"
        return "fp16" if "fp16" in available else "fp32"
    if requested == "bf16":  # OpenVINO's, on the fp32 graph: runtimes.choose checks the CPU
        if kind != "cpu":
            raise ConfigError(
                "precision bf16 runs on the CPU (OpenVINO) only; on a GPU use "
                "fp16 (the default there) or fp32, or --device cpu"
            )
        return "bf16"
    if requested == "int8" and kind != "cpu":
        raise ConfigError(
            "precision int8 runs on the CPU only; on a GPU use fp16 (the default "
            "there) or fp32, or --device cpu"
        )
    if requested == "fp16" and kind == "cpu":
        raise ConfigError(
            "precision fp16 runs on a GPU only; on the CPU use int8 (the default there) or fp32"
        )
    if requested not in available:
        raise ConfigError(
            f"precision {requested}: this embedpool's graph builder makes only "
            f"{', '.join(available)} for this model"
        )
    return requested  # type: ignore[return-value]


@dataclass(frozen=True)
class Placement:
    """Where the model runs and with which numbers (see the module docstring)."""

    device: DevicePlan
    precision: Precision
    #: The GPU plan (cuda only): budgets per GPU, CPU workers alongside, the parent's cores.
    devices: DevicesPlan | None
    #: The job's batch budget (``budget.batch_budget``: a GPU's batches are much bigger);
    #: every executor and the server run it.
    budget: BatchBudget
    #: What auto or the request asked for, for the fallbacks.
    request: DeviceRequest
    #: The machine's profile the budget was decided for (None: Ray, where none applies).
    profile: Profile | None = None
    #: The CPU's inference runtime and why (runtimes.choose; a GPU's is ONNX Runtime).
    runtime: Runtime = "onnxruntime"
    runtime_reason: str = ""

    @property
    def batch_tokens(self) -> int:
        return self.budget.tokens

    @property
    def max_batch_items(self) -> int:
        return self.budget.max_items

    @property
    def on_gpu(self) -> bool:
        return self.device.kind == "cuda"

    def describe(self) -> str:
        """The summary's device line: the device, the precision and why."""
        extra = ""
        if self.devices is not None and self.devices.cpu_workers:
            extra = f" + {self.devices.cpu_workers} CPU worker(s) in fp32"
        on = " on OpenVINO" if self.runtime == "openvino" else ""
        return f"{self.device.describe()}{extra}, {self.precision}{on}"


def model_shape(model: ResolvedModel, precision: str) -> ModelShape:
    """The GPU budget's view of a model: its config's widths and its weights' size, counted
    as the pool's host-memory estimate counts them (``graph.families.catalog.model_memory``: the
    safetensors headers, every shard of a sharded checkpoint); a shipped ONNX file, which
    embedpool does not build, by its size on disk."""
    from embedpool.graph.families.catalog import model_memory

    try:
        memory = model_memory(model, "fp32")
        size = memory.weights if memory is not None else model.weights_path.stat().st_size
    except (ModelError, OSError):
        size = 0
    return ModelShape.of(model.config, model.max_length, size, precision)


def place(
    model: ResolvedModel,
    *,
    device: str | DeviceRequest = "auto",
    precision: str = "auto",
    cpu_workers: int | None = None,
    batch_tokens: int | None = None,
    max_batch_items: int | None = None,
    backend: str = "local",
    cpus: int | None = None,
    plan: DevicePlan | None = None,
    profile: str | None = None,
    engine: str | None = None,
) -> Placement:
    """Resolve the device, the precision, the GPU plan and the batch budget
    (DeviceError/ConfigError: exit 2). ``plan`` skips detection (tests, and callers that
    resolved it already); ``profile`` (``--profile``; None: ``EMBEDPOOL_PROFILE`` or detected,
    as the pool detects it) sizes the CPU's budget on the local backend; ``engine``
    (``--engine``: auto, onnxruntime, openvino; None: ``EMBEDPOOL_ENGINE``, else auto) the
    CPU's runtime (``runtimes.choose``)."""
    engine = engine or env_str("EMBEDPOOL_ENGINE") or "auto"
    request_plan = plan or resolve_device(device)
    for note in request_plan.notes:
        log.warning("embedpool: %s", note)
    if backend != "local" and request_plan.kind == "cuda":
        if request_plan.request.kind == "cuda":
            raise DeviceError(
                f"--device {request_plan.request}: the {backend} backend runs its "
                "actors on the CPU; use --backend local for a GPU",
                "device",
            )
        request_plan = DevicePlan(
            "cpu",
            (),
            f"auto: the {backend} backend runs on the CPU",
            request_plan.request,
            request_plan.notes,
        )
    chosen = precision_for(precision, request_plan.kind, graph_precisions(model))
    devices: DevicesPlan | None = None
    if request_plan.kind == "cuda":
        n_cpus = cpus or _usable_cpus()
        try:
            devices = plan_devices(
                n_cpus,
                [GpuInput(g.index, g.name, g.memory_free) for g in request_plan.gpus],
                model_shape(model, chosen),
                cpu_workers=cpu_workers,
                batch_tokens=batch_tokens,
            )
        except ConfigError as exc:
            if request_plan.request.kind == "cuda":
                raise DeviceError(f"--device {request_plan.request}: {exc}", "device") from exc
            request_plan = DevicePlan(
                "cpu", (), f"auto: {exc}", request_plan.request, request_plan.notes
            )
            chosen = precision_for(precision, "cpu", graph_precisions(model))
    elif cpu_workers:
        raise ConfigError(
            "--cpu-workers adds CPU workers next to a GPU; on the CPU alone use --workers"
        )
    chosen_profile = machine_profile(profile) if backend == "local" else None
    if devices is not None:
        # the job batches for the biggest GPU (smaller pools cut its batches down)
        biggest = max(devices.gpu_workers, key=lambda g: g.batch_tokens).budget
        budget = dataclasses.replace(biggest, max_items=max_batch_items or biggest.max_items)
    else:
        budget = batch_budget(
            device="cpu",
            profile=chosen_profile,
            max_length=model.max_length,
            requested=batch_tokens,
            requested_items=max_batch_items,
        )
    runtime = _runtime(model, engine, precision, request_plan.kind)
    if request_plan.kind == "cpu":
        chosen = runtime.precision
    return Placement(
        request_plan,
        chosen,
        devices,
        budget,
        request_plan.request,
        chosen_profile,
        runtime.runtime,
        runtime.reason,
    )


def _runtime(model: ResolvedModel, engine: str, precision: str, kind: str) -> RuntimeChoice:
    """``runtimes.choose`` for this model, this machine's CPU and installed packages."""
    from embedpool.graph.ov_graph import reads_fused
    from embedpool.runtimes import choose, cpu_features, openvino_installed

    return choose(
        engine,
        precision,
        device_kind=kind,
        cpu=cpu_features(),
        openvino=openvino_installed(),
        # only auto on the CPU reads it: no family config parsed for other requests
        fused_graph=engine != "auto" or kind != "cpu" or reads_fused(model),
    )


def machine_profile(profile: str | None = None) -> Profile:
    """The profile the pool will run: ``profile`` if given, else ``EMBEDPOOL_PROFILE`` or
    detected (``limits.detect_limits``, which the pool's autoscaler calls the same way)."""
    from embedpool.executors.pool.limits import detect_limits

    return detect_limits(profile=profile).profile


def _usable_cpus() -> int:
    from embedpool.executors.pool.limits import detect_limits

    return detect_limits().cpus


def engine_recipe(
    model: ResolvedModel,
    precision: Precision,
    threads: int,
    *,
    device: str = "cpu",
    gpu_mem_limit: int | None = None,
    engine: Any = None,
    runtime: Runtime = "onnxruntime",
) -> Any:
    """The recipe one executor's engines are built from: ``engine.EngineSpec`` for the model,
    or ``engine`` (any picklable recipe with ``build()``: a custom engine, the test doubles of
    ``embedpool.testing``) given the same threads and device where it has such fields."""
    if engine is None:
        from embedpool.engine import EngineSpec

        return EngineSpec(model, precision, threads, device, gpu_mem_limit, runtime)
    from embedpool.executor import with_threads

    recipe = with_threads(engine, threads)
    if (
        device != "cpu"
        and dataclasses.is_dataclass(recipe)
        and not isinstance(recipe, type)
        and any(f.name == "device" for f in dataclasses.fields(recipe))
    ):
        recipe = dataclasses.replace(recipe, device=device)
    return recipe


def prepare_graphs(
    model: ResolvedModel, placement: Placement, emit: Emit, *, max_memory: int | None = None
) -> Placement:
    """Build the graphs ``placement`` runs, now, before any worker starts (``graph.prebuild``:
    a first run's build in one child process, on screen through ``emit``), and return the
    placement in the precision that was built: int8 may fall back to fp32 where the build
    does not fit. CPU workers next to a GPU run fp32: that graph too. The one place the CLI,
    the library and ``serve`` build graphs (ConfigError/ModelError: the model cannot be
    built)."""
    from embedpool.graph.ov_graph import graph_precision
    from embedpool.graph.prebuild import ensure_graph

    if placement.runtime == "openvino" and placement.devices is None:
        # OpenVINO's graph (graph.ov_graph; bf16 reads the fp32 one): unfused where need be
        graph = graph_precision(placement.precision)
        ensure_graph(model, graph, emit, max_memory=max_memory, runtime="openvino")
        return placement
    if placement.precision == "bf16":  # runs on OpenVINO only (runtimes.choose)
        raise ConfigError("precision bf16 runs on the openvino engine only")
    precision = ensure_graph(model, placement.precision, emit, max_memory=max_memory)
    if placement.devices is not None and placement.devices.cpu_workers:
        ensure_graph(model, "fp32", emit, max_memory=max_memory)
    return dataclasses.replace(placement, precision=precision)


def _hang_per_token_s(model: ResolvedModel) -> float:
    from embedpool.faults import hang_per_token_s
    from embedpool.graph.families.catalog import parameter_count

    try:
        return hang_per_token_s(parameter_count(model))
    except (OSError, ValueError, EmbedpoolError):  # an unreadable header: the default
        return hang_per_token_s(None)


def start_executor(
    model: ResolvedModel,
    placement: Placement,
    *,
    workers: int | str | None,
    threads: int | None = None,
    pool_options: dict[str, Any] | None = None,
    on_event: EventCallback | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    engine: Any = None,
    policy: FaultPolicy | None = None,
) -> Executor:
    """The executor for ``placement``: the one construction path of every backend, for the
    CLI, the library (``Embedder``) and ``serve`` (see the module docstring). ``engine``
    replaces the model's ``EngineSpec`` by another recipe (``engine_recipe``); ``policy``
    overrides Ray's fault policy (tests; a pool's comes from ``pool_options``)."""
    from embedpool.engine import usable_cores
    from embedpool.executors.inprocess import InProcessExecutor
    from embedpool.executors.pool.pool import pool_config_for

    def recipe(
        precision: Precision, n_threads: int, device: str = "cpu", mem_limit: int | None = None
    ) -> Any:
        return engine_recipe(
            model,
            precision,
            n_threads,
            device=device,
            gpu_mem_limit=mem_limit,
            engine=engine,
            runtime=placement.runtime
            if device == "cpu" and precision == placement.precision
            else "onnxruntime",
        )

    options = dict(pool_options or {})
    # the hang deadline's allowance per token follows the model's size (faults.hang_per_token_s)
    options.setdefault("hang_per_token_s", _hang_per_token_s(model))
    if backend == "ray":
        if policy is None:
            from embedpool.faults import FaultPolicy

            policy = FaultPolicy(hang_per_token_s=options["hang_per_token_s"])
        return ray_executor(
            recipe(placement.precision, threads or 1),
            address=ray_address,
            actors=None if workers in (None, "auto") else int(workers),
            budget=placement.budget,
            policy=policy,
            on_event=on_event,
        )
    if backend != "local":
        raise ConfigError(f"backend must be 'local' or 'ray', got {backend!r}")
    if not placement.on_gpu:
        if workers is None:
            return InProcessExecutor(
                recipe(placement.precision, threads or usable_cores()), on_event=on_event
            )
        from embedpool.executors.pool.pool import Pool

        cfg = pool_config_for(
            workers=workers,
            threads=threads,
            budget=placement.budget,
            precision=placement.precision,
            **options,
        )
        return Pool(recipe(placement.precision, threads or 1), cfg, on_event=on_event)
    assert placement.devices is not None
    gpus = placement.devices.gpu_workers
    if workers is None:  # in this process, on the first GPU
        g = gpus[0]
        return InProcessExecutor(
            recipe(placement.precision, 1, f"cuda:{g.index}", g.mem_limit), on_event=on_event
        )
    from embedpool.executors import devices
    from embedpool.executors.devices import PoolRecipe

    recipes = [
        PoolRecipe(
            f"cuda:{g.index} {g.name}",
            recipe(placement.precision, 1, f"cuda:{g.index}", g.mem_limit),
            pool_config_for(
                workers=1,
                threads=1,
                budget=g.budget,
                precision=placement.precision,
                device=f"cuda:{g.index}",
                **options,
            ),
        )
        for g in gpus
    ]
    cpu_precision: Precision = "fp32"
    cpu = None
    if placement.devices.cpu_workers:
        cpu = PoolRecipe(
            "cpu",
            recipe(cpu_precision, 1),
            pool_config_for(
                workers=placement.devices.cpu_workers,
                threads=placement.devices.cpu_threads,
                precision=cpu_precision,
                **options,
            ),
            precision=None if placement.precision == cpu_precision else cpu_precision,
        )

    def cpu_pool(precision: Precision) -> PoolRecipe:
        return PoolRecipe(
            "cpu",
            recipe(precision, 1),
            pool_config_for(workers=workers, precision=precision, **options),
            precision=None if placement.precision == precision else precision,
        )

    # a GPU lost mid-job: fp32, within fp16's tolerance of the vectors already made; no GPU
    # usable at the start (auto): int8, what this machine runs without a GPU
    return devices.start(
        recipes,
        cpu=cpu,
        fallback=cpu_pool("fp32"),
        start_fallback=None if placement.request.kind == "cuda" else cpu_pool("int8"),
        strict=placement.request.kind == "cuda",
        on_event=on_event,
    )


def executor_factory(
    model: ResolvedModel, placement: Placement, *, workers: int | str | None, **kwargs: Any
) -> Callable[[], Executor]:
    """``start_executor`` deferred: what ``serve``'s lifespan calls when the server starts."""
    return functools.partial(start_executor, model, placement, workers=workers, **kwargs)


class _DropSigtermNote(logging.Filter):
    """``ray.init`` off the main thread logs that it leaves SIGTERM alone: what the server
    wants (``server/on_ray.py``), so not worth a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


_SIGTERM_NOTE_FILTER = _DropSigtermNote()


def ray_executor(
    recipe: Any,
    *,
    address: str | None = None,
    actors: int | None = None,
    batch_tokens: int | None = None,
    budget: BatchBudget | None = None,
    policy: FaultPolicy | None = None,
    on_event: EventCallback | None = None,
) -> Executor:
    """``start_executor``'s Ray backend: a ``RayExecutor`` running ``recipe`` (an
    ``EngineSpec``'s graph is shipped through the object store; any other recipe is built in
    each actor) on ``actors`` actors (None: one per cluster CPU), joining ``address`` (None:
    ``$RAY_ADDRESS``, else a private local Ray that ``close`` stops)."""
    from embedpool.executors.ray.executor import RayExecutor

    logging.getLogger("ray._private.worker").addFilter(_SIGTERM_NOTE_FILTER)
    executor: Executor = RayExecutor(
        recipe,
        address=address,
        actors=actors,
        batch_tokens=batch_tokens,
        budget=budget,
        policy=policy,
        on_event=on_event,
    )
    return executor
