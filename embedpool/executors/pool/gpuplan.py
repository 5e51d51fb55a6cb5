"""How the pool uses GPUs and many cores: pure functions from what is there to a plan.

Nothing here reads the machine; ``doctor``, the CLI and the library detect (``device_choice``,
``limits``) and ask. Table-tested in ``tests/executors/pool/test_gpuplan.py`` for 4, 16, 64 and 96 cores
and 1-4 GPUs::

    cores, GPUs (free memory), the model's size, --cpu-workers
        └─ plan_devices ──> DevicesPlan: one GpuWorkerPlan per GPU (its token budget and ORT
                            arena cap), the CPU workers alongside (0 unless asked), the cores
                            kept for the parent, and the reasons

**One worker per GPU.** One ONNX Runtime session keeps a GPU busy when its batches are big
(tens of thousands of padded tokens); a second process on the same GPU would only add a CUDA
context (hundreds of MB of GPU memory) and contend for the same SMs.

**The budget from the GPU's free memory**, not from host RAM (``gpu_batch_tokens``): what is
free now (nvidia-smi), less the CUDA context and a margin, less the weights, divided by an
activation estimate per padded token from the model's shape (``activation_bytes_per_token``),
and capped at ``GPU_MAX_BATCH_TOKENS``. ORT's arena is capped at the same share of free memory
(``gpu_mem_limit``), so a batch that does not fit fails as a CUDA out-of-memory error in a live
worker (split, budget halved: ``faults``) instead of taking memory another program holds.

**Cores.** Every GPU worker takes one core: its Python loop, the copies and kernel launches,
and CUDA's spin-wait for results. The parent tokenises for every worker; with a GPU it must
produce tokens at the GPU's rate, which is many cores' worth of tokenizers' Rust (it runs
``encode_batch`` on a thread pool sized to the machine), so with GPUs, CPU workers alongside
are started only when asked (``cpu_workers``), and then leave ``TOKENIZER_CORES_PER_GPU``
cores per GPU to the parent. On the CPU alone, the parent keeps ``parent_reserve(cpus)``
cores (one per ``PARENT_WORKERS_PER_CORE`` workers, rounded): see that constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from embedpool.budget import (
    DEFAULT_BATCH_TOKENS,
    GPU_MAX_BATCH_TOKENS,
    BatchBudget,
    batch_budget,
)
from embedpool.errors import ConfigError

MiB = 1024 * 1024
GiB = 1024 * MiB

#: Single-threaded workers one parent core keeps fed. Measured with
#: benchmarks/tokenize_rate.py on a 2-core AMD EPYC (AVX2, no AVX-512; other jobs kept it at a
#: load of ~10, so only the ratio means anything), twice: the job's prepare step (dedupe,
#: tokenise, plan) ran 119,885 and 75,255 tokens/s on one core, one int8 worker (1 thread)
#: 813 and 883 tokens/s: one parent core per ~85-147 workers. About half the lower figure is
#: kept: the parent also dispatches every batch, unpickles every result and writes the
#: cache, which that probe does not count. Smaller: fewer workers on big machines; larger:
#: workers waiting for tokens at 100+ cores.
PARENT_WORKERS_PER_CORE = 48
#: Cores one GPU worker takes (see the module docstring).
GPU_WORKER_CORES = 1
#: Cores kept for the parent's tokenisation per GPU when CPU workers run alongside. An
#: estimate, not a measurement (no GPU here): a GPU embedding a MiniLM-sized model at ~1M
#: tokens/s needs several cores of the rate measured above; benchmarks/gpu_check.sh measures
#: both on a GPU machine. More: fewer CPU workers; fewer: a GPU waiting for tokens.
TOKENIZER_CORES_PER_GPU = 4
#: Share of the GPU's free memory the worker may use (its arena cap): the rest absorbs other
#: programs' growth between our reading and our allocations.
GPU_MEMORY_FRACTION = 0.85
#: GPU memory the CUDA context, cuBLAS/cuDNN handles and workspaces take outside ORT's arena
#: (several hundred MB on recent GPUs; an estimate, not measured here).
CUDA_CONTEXT_BYTES = 1 * GiB
#: Live activations per padded token are this many times the sum of the tensors one layer
#: holds at once (``activation_bytes_per_token``): the arena's rounding and tensors kept
#: across ops. 2: the CPU's measured ~45 KiB/token for MiniLM fp32 is 1.3x its per-layer sum.
ACTIVATION_SAFETY = 2.0
#: The host RSS of one GPU worker: the CUDA runtime, cuBLAS and cuDNN mapped in, no
#: activations (they are on the GPU). An estimate until benchmarks/gpu_check.sh measures it.
GPU_WORKER_HOST_RSS = 1 * GiB


def parent_reserve(cpus: int) -> int:
    """Cores kept free of workers for the parent: one per PARENT_WORKERS_PER_CORE, rounded
    half up (4, 16 cores: 0; 24-71: 1; 72-119: 2)."""
    return (cpus + PARENT_WORKERS_PER_CORE // 2) // PARENT_WORKERS_PER_CORE


@dataclass(frozen=True)
class ModelShape:
    """What the GPU budget needs to know about a model."""

    hidden: int
    intermediate: int
    heads: int
    max_length: int
    #: Bytes of the weights as the GPU graph holds them (fp16: half the fp32 safetensors).
    weight_bytes: int
    #: Bytes per activation element: 2 for fp16, 4 for fp32.
    dtype_bytes: int = 2

    @classmethod
    def of(
        cls, config: Mapping[str, object], max_length: int, fp32_weight_bytes: int, precision: str
    ) -> ModelShape:
        """From a transformers config.json (BERT, RoBERTa, ModernBERT and NomicBert names)."""

        def num(*names: str, default: int) -> int:
            for n in names:
                v = config.get(n)
                if isinstance(v, int) and v > 0:
                    return v
            return default

        hidden = num("hidden_size", "n_embd", "d_model", default=768)
        dtype = 2 if precision == "fp16" else 4
        return cls(
            hidden=hidden,
            intermediate=num("intermediate_size", "n_inner", default=4 * hidden),
            heads=num("num_attention_heads", "n_head", default=max(1, hidden // 64)),
            max_length=max_length,
            weight_bytes=fp32_weight_bytes * dtype // 4,
            dtype_bytes=dtype,
        )


def activation_bytes_per_token(shape: ModelShape) -> int:
    """Bytes of live activations per padded token of a batch: one layer's tensors at once
    (the residual stream and its norms ~8 x hidden, Q/K/V and attention output, the feed-forward
    intermediate twice (in and activated), one row of attention scores per head at the
    longest length), times ACTIVATION_SAFETY. Layers run one after the other and the arena
    reuses their memory, so the depth does not multiply it."""
    per_layer = 8 * shape.hidden + 2 * shape.intermediate + shape.heads * shape.max_length
    return int(per_layer * shape.dtype_bytes * ACTIVATION_SAFETY)


def gpu_mem_limit(free_bytes: int) -> int:
    """ORT's arena cap on a GPU with ``free_bytes`` free: GPU_MEMORY_FRACTION of it, less the
    CUDA context (which is outside the arena)."""
    return max(0, int(free_bytes * GPU_MEMORY_FRACTION) - CUDA_CONTEXT_BYTES)


def gpu_budget(
    free_bytes: int | None, shape: ModelShape, requested: int | None = None
) -> BatchBudget:
    """The batch budget on a GPU with ``free_bytes`` free: the padded tokens its memory holds
    (``activation_bytes_per_token``), made a budget by ``budget.batch_budget`` (whole
    sequences, the cap, the floor; ``requested``: ``--batch-tokens``, capped at what fits);
    tokens 0 when not even one full-length sequence fits."""
    if free_bytes is None:
        b = batch_budget(device="cuda", max_length=shape.max_length, requested=requested)
        return dataclasses.replace(b, reason=f"{b.tokens} tokens: {b.reason}")
    per_token = activation_bytes_per_token(shape)
    room = gpu_mem_limit(free_bytes) - shape.weight_bytes
    fits = max(0, room) // per_token
    b = batch_budget(device="cuda", max_length=shape.max_length, requested=requested, gpu_fit=fits)
    how = (
        f"({GPU_MEMORY_FRACTION:.0%} of {_gib(free_bytes)} free - {_gib(CUDA_CONTEXT_BYTES)} "
        f"CUDA context - {_gib(shape.weight_bytes)} weights) / "
        f"{per_token / 1024:.0f} KiB per token = {fits} tokens"
    )
    if not b.fits:
        why = f"too little free GPU memory: {how}, under one {b.floor}-token sequence"
    elif requested is not None:
        why = f"{b.tokens} tokens {b.reason}; memory allows {how}"
    elif b.tokens >= GPU_MAX_BATCH_TOKENS:
        why = f"{b.tokens} tokens (the cap); memory allows {how}"
    else:
        why = how
    return dataclasses.replace(b, reason=why)


def gpu_batch_tokens(free_bytes: int | None, shape: ModelShape) -> tuple[int, str]:
    """(padded tokens per batch, why) on a GPU with ``free_bytes`` free (``gpu_budget``)."""
    b = gpu_budget(free_bytes, shape)
    return b.tokens, b.reason


@dataclass(frozen=True)
class GpuInput:
    """One GPU as the planner needs it (``device_choice.Gpu`` has these fields and more)."""

    index: int
    name: str
    memory_free: int | None


@dataclass(frozen=True)
class GpuWorkerPlan:
    index: int
    name: str
    #: Its batch budget (``gpu_budget``): tokens, the OOM floor, items, why.
    budget: BatchBudget
    #: ORT's arena cap in bytes; None when free memory is unknown (no cap).
    mem_limit: int | None

    @property
    def batch_tokens(self) -> int:
        return self.budget.tokens

    @property
    def reason(self) -> str:
        return self.budget.reason


@dataclass(frozen=True)
class DevicesPlan:
    """What runs where. ``gpu_workers`` one per used GPU; ``cpu_workers`` x ``cpu_threads``
    alongside; ``parent_cores`` kept for the parent. Invariant (tested):
    len(gpu_workers) x GPU_WORKER_CORES + cpu_workers x cpu_threads + parent_cores <= cpus,
    except on one core, where one worker shares it with the parent."""

    cpus: int
    gpu_workers: tuple[GpuWorkerPlan, ...]
    cpu_workers: int
    cpu_threads: int
    parent_cores: int
    reasons: tuple[str, ...]

    @property
    def batch_tokens(self) -> int:
        """The job's batch size: the largest GPU budget (smaller pools cut batches down)."""
        return max((g.batch_tokens for g in self.gpu_workers), default=DEFAULT_BATCH_TOKENS)

    @property
    def cores_used(self) -> int:
        return (
            len(self.gpu_workers) * GPU_WORKER_CORES
            + self.cpu_workers * self.cpu_threads
            + self.parent_cores
        )


def plan_devices(
    cpus: int,
    gpus: Sequence[GpuInput],
    shape: ModelShape,
    *,
    cpu_workers: int | None = None,
    cpu_threads: int = 1,
    batch_tokens: int | None = None,
) -> DevicesPlan:
    """Workers for ``gpus`` and, when asked (``cpu_workers``), CPU workers alongside.

    Every GPU with room for one full-length sequence gets one worker, up to cpus - 1 of them
    (a core stays with the parent). ``cpu_workers`` is capped so that the GPU workers, the
    CPU workers' threads and the parent's cores (TOKENIZER_CORES_PER_GPU per GPU worker, at
    least parent_reserve(cpus)) fit in ``cpus``; None or 0 starts none. ``batch_tokens``:
    ``--batch-tokens``, capped per GPU at what its memory holds. Raises ConfigError
    when no GPU is usable (the caller decides whether that means the CPU or an error)."""
    if cpus < 1 or cpu_threads < 1 or (cpu_workers is not None and cpu_workers < 0):
        raise ConfigError(
            f"need cpus >= 1, cpu_threads >= 1, cpu_workers >= 0; got {cpus}, "
            f"{cpu_threads}, {cpu_workers}"
        )
    reasons: list[str] = []
    plans: list[GpuWorkerPlan] = []
    for g in gpus:
        b = gpu_budget(g.memory_free, shape, batch_tokens)
        if not b.fits:
            reasons.append(f"cuda:{g.index} {g.name} skipped: {b.reason}")
            continue
        limit = None if g.memory_free is None else gpu_mem_limit(g.memory_free)
        plans.append(GpuWorkerPlan(g.index, g.name, b, limit))
        reasons.append(f"cuda:{g.index} {g.name}: 1 worker, batch budget {b.reason}")
    if not plans:
        raise ConfigError("no GPU has room for the model: " + "; ".join(reasons))
    most = max(1, cpus - 1)
    if len(plans) > most:
        reasons.append(
            f"{len(plans)} GPUs but {cpus} cores: {most} GPU worker(s), one core "
            f"for the parent's tokenisation"
        )
        plans = plans[:most]
    n_gpu = len(plans)
    left = max(0, cpus - n_gpu * GPU_WORKER_CORES)
    wanted = cpu_workers or 0
    if not wanted:
        reasons.append(
            f"no CPU workers alongside (not asked): {left} core(s) tokenise for "
            f"{n_gpu} GPU worker(s)"
        )
        return DevicesPlan(cpus, tuple(plans), 0, cpu_threads, left, tuple(reasons))
    parent = min(left, max(parent_reserve(cpus), TOKENIZER_CORES_PER_GPU * n_gpu))
    fit = (left - parent) // cpu_threads
    n_cpu = min(wanted, fit)
    if n_cpu < wanted:
        reasons.append(
            f"CPU workers {wanted} capped at {n_cpu}: {cpus} cores - {n_gpu} GPU "
            f"worker(s) - {parent} for the parent's tokenisation "
            f"({TOKENIZER_CORES_PER_GPU} per GPU) leave {left - parent}, "
            f"{cpu_threads} thread(s) each"
        )
    else:
        reasons.append(f"{n_cpu} CPU worker(s) x {cpu_threads} thread(s) alongside, as asked")
    spare = left - n_cpu * cpu_threads
    reasons.append(f"{spare} core(s) for the parent (tokenising for the GPUs)")
    return DevicesPlan(cpus, tuple(plans), n_cpu, cpu_threads, spare, tuple(reasons))


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"
