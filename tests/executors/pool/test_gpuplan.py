"""The planner's choices on machines this one is not: 4, 16, 64 and 96 cores, 1-4 GPUs.

Two tables: the CPU-only pool (``plan.plan``, with the parent's reserve) and the GPU plan
(``gpuplan.plan_devices``). Each row states what the planner must choose, and every row is
also checked against the invariants: workers x threads never exceed the usable cores, and the
parent keeps cores where its tokenisation would otherwise starve.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpool.budget import GPU_MAX_BATCH_TOKENS, GPU_UNKNOWN_MEMORY_TOKENS
from embedpool.errors import ConfigError
from embedpool.executors.pool import gpuplan
from embedpool.executors.pool.gpuplan import (
    TOKENIZER_CORES_PER_GPU,
    GpuInput,
    ModelShape,
    activation_bytes_per_token,
    gpu_batch_tokens,
    gpu_mem_limit,
    parent_reserve,
    plan_devices,
)
from embedpool.executors.pool.machine import Limits
from embedpool.executors.pool.plan import plan
from embedpool.types import Profile

MiB = 1024**2
GiB = 1024**3
#: all-MiniLM-L6-v2: hidden 384, intermediate 1536, 12 heads, 256 tokens, 90.9 MB fp32.
MINILM_FP16 = ModelShape(
    hidden=384, intermediate=1536, heads=12, max_length=256, weight_bytes=45 * MiB, dtype_bytes=2
)
#: bge-large-sized: hidden 1024, intermediate 4096, 16 heads, 512 tokens, 1.3 GB fp32.
LARGE_FP16 = ModelShape(
    hidden=1024, intermediate=4096, heads=16, max_length=512, weight_bytes=670 * MiB, dtype_bytes=2
)


def limits(cpus: int, memory: int = 512 * GiB, profile: Profile = "cloud") -> Limits:
    return Limits(
        cpus=cpus,
        cpus_source="test",
        memory_bytes=memory,
        memory_source="test",
        profile=profile,
        profile_source="test",
        host_cpus=cpus,
        host_memory_bytes=memory,
        root=Path("/"),
    )


# -- the CPU-only pool on many cores -----------------------------------------------------------

# cores, --workers, --threads -> reserve for the parent, max workers, threads each
CPU_PLANS = [
    pytest.param(4, None, None, 0, 4, 1, id="4-cores-auto"),
    pytest.param(16, None, None, 0, 16, 1, id="16-cores-auto"),
    pytest.param(64, None, None, 1, 63, 1, id="64-cores-auto"),
    pytest.param(96, None, None, 2, 94, 1, id="96-cores-auto"),
    pytest.param(96, 200, None, 2, 94, 1, id="96-cores-workers-capped"),
    pytest.param(64, 8, None, 1, 8, 7, id="64-cores-8-workers-share-the-rest"),
    pytest.param(96, None, 4, 2, 23, 4, id="96-cores-4-threads"),
    pytest.param(16, None, 4, 0, 4, 4, id="16-cores-4-threads"),
    pytest.param(4, 8, None, 0, 4, 1, id="4-cores-8-workers-capped"),
]


@pytest.mark.parametrize(("cpus", "workers", "threads", "reserve", "max_workers", "t"), CPU_PLANS)
def test_cpu_plan_on_many_cores(
    cpus: int, workers: int | None, threads: int | None, reserve: int, max_workers: int, t: int
) -> None:
    p = plan(limits(cpus), workers=workers, threads=threads)
    assert parent_reserve(cpus) == reserve
    assert (p.policy.max_workers, p.policy.threads_per_worker) == (max_workers, t)
    assert p.policy.max_workers * p.policy.threads_per_worker <= cpus - reserve
    if reserve:
        assert any(f"{reserve} of {cpus} cores kept for the parent" in r for r in p.reasons)


@pytest.mark.parametrize(
    ("cpus", "reserve"),
    [
        (1, 0),
        (2, 0),
        (4, 0),
        (16, 0),
        (23, 0),
        (24, 1),
        (64, 1),
        (71, 1),
        (72, 2),
        (96, 2),
        (192, 4),
    ],
)
def test_parent_reserve(cpus: int, reserve: int) -> None:
    assert parent_reserve(cpus) == reserve
    # the reserve feeds at least PARENT_WORKERS_PER_CORE workers per core, give or take half
    assert (cpus - reserve) <= (reserve + 0.5) * gpuplan.PARENT_WORKERS_PER_CORE


def test_cpu_plan_never_oversubscribes_at_any_core_count() -> None:
    for cpus in range(1, 129):
        for threads in (None, 1, 2, 3, 8):
            p = plan(limits(cpus), threads=threads).policy
            assert p.max_workers * p.threads_per_worker <= max(1, cpus - parent_reserve(cpus))


# -- the GPU plan --------------------------------------------------------------------------------


def h200(i: int, free: int | None = 140 * GiB) -> GpuInput:
    return GpuInput(i, "NVIDIA H200", free)


def laptop(i: int, free: int | None = 3 * GiB) -> GpuInput:
    return GpuInput(i, "RTX 3050 Laptop", free)


# cores, GPUs, --cpu-workers -> GPU workers, CPU workers, parent cores
GPU_PLANS = [
    pytest.param(4, 1, None, 1, 0, 3, id="4-cores-1-gpu"),
    pytest.param(4, 2, None, 2, 0, 2, id="4-cores-2-gpus"),
    pytest.param(4, 4, None, 3, 0, 1, id="4-cores-4-gpus-one-core-stays-with-the-parent"),
    pytest.param(4, 1, 8, 1, 0, 3, id="4-cores-1-gpu-cpu-workers-do-not-fit"),
    pytest.param(16, 1, None, 1, 0, 15, id="16-cores-1-gpu"),
    pytest.param(16, 1, 4, 1, 4, 11, id="16-cores-1-gpu-4-cpu-workers"),
    pytest.param(16, 1, 16, 1, 11, 4, id="16-cores-1-gpu-cpu-workers-capped"),
    pytest.param(16, 2, 16, 2, 6, 8, id="16-cores-2-gpus-cpu-workers-capped"),
    pytest.param(16, 4, 16, 4, 0, 12, id="16-cores-4-gpus-no-room-for-cpu-workers"),
    pytest.param(64, 1, None, 1, 0, 63, id="64-cores-1-gpu"),
    pytest.param(64, 4, 64, 4, 44, 16, id="64-cores-4-gpus-cpu-workers-capped"),
    pytest.param(96, 1, 96, 1, 91, 4, id="96-cores-1-gpu-cpu-workers-capped"),
    pytest.param(96, 2, 32, 2, 32, 62, id="96-cores-2-gpus-32-cpu-workers"),
    pytest.param(96, 4, 96, 4, 76, 16, id="96-cores-4-gpus-cpu-workers-capped"),
    pytest.param(96, 3, None, 3, 0, 93, id="96-cores-3-gpus"),
]


@pytest.mark.parametrize(
    ("cpus", "n_gpus", "cpu_workers", "gpu_workers", "want_cpu", "parent"), GPU_PLANS
)
def test_gpu_plan(
    cpus: int, n_gpus: int, cpu_workers: int | None, gpu_workers: int, want_cpu: int, parent: int
) -> None:
    p = plan_devices(cpus, [h200(i) for i in range(n_gpus)], MINILM_FP16, cpu_workers=cpu_workers)
    assert (len(p.gpu_workers), p.cpu_workers, p.parent_cores) == (gpu_workers, want_cpu, parent)
    assert p.cores_used <= cpus  # never oversubscribed
    if p.cpu_workers:  # the parent keeps its tokenisers when CPU workers run alongside
        assert p.parent_cores >= min(
            cpus - gpu_workers, max(parent_reserve(cpus), TOKENIZER_CORES_PER_GPU * gpu_workers)
        )
    assert [g.index for g in p.gpu_workers] == list(range(gpu_workers))
    assert all(g.batch_tokens == GPU_MAX_BATCH_TOKENS for g in p.gpu_workers)  # an H200 is big
    assert p.batch_tokens == GPU_MAX_BATCH_TOKENS


def test_gpu_plan_invariants_over_every_machine() -> None:
    for cpus in (1, 2, 4, 8, 16, 32, 64, 96, 128):
        for n_gpus in (1, 2, 3, 4, 8):
            for cpu_workers in (None, 0, 1, 7, 200):
                for threads in (1, 2):
                    p = plan_devices(
                        cpus,
                        [h200(i) for i in range(n_gpus)],
                        MINILM_FP16,
                        cpu_workers=cpu_workers,
                        cpu_threads=threads,
                    )
                    assert p.cores_used <= cpus
                    assert 1 <= len(p.gpu_workers) <= max(1, cpus - 1)
                    assert p.cpu_workers <= (cpu_workers or 0)


def test_gpus_differ_each_gets_its_own_budget_and_the_full_ones_are_skipped() -> None:
    p = plan_devices(16, [h200(0), laptop(1), h200(2, free=200 * MiB)], LARGE_FP16)
    assert [g.index for g in p.gpu_workers] == [0, 1]
    h, small = p.gpu_workers
    assert h.batch_tokens == GPU_MAX_BATCH_TOKENS and 0 < small.batch_tokens < h.batch_tokens
    assert small.batch_tokens % 512 == 0  # whole full-length sequences
    assert small.mem_limit == gpu_mem_limit(3 * GiB)
    assert p.batch_tokens == GPU_MAX_BATCH_TOKENS  # the job batches for the biggest
    assert any("cuda:2 NVIDIA H200 skipped: too little free GPU memory" in r for r in p.reasons)


def test_no_usable_gpu_is_an_error_naming_each() -> None:
    with pytest.raises(ConfigError, match=r"no GPU has room for the model: cuda:0 .* skipped"):
        plan_devices(8, [laptop(0, free=300 * MiB)], LARGE_FP16)


# free bytes, shape -> tokens (0: does not fit), a phrase of the reason
BUDGETS = [
    pytest.param(140 * GiB, MINILM_FP16, GPU_MAX_BATCH_TOKENS, "the cap", id="h200-minilm"),
    # (0.85 x 3 GiB - 1 GiB - 45 MiB) / 36 KiB = 43,878 -> whole 256-token sequences
    pytest.param(3 * GiB, MINILM_FP16, 43776, "per token", id="laptop-minilm"),
    # (0.85 x 3 GiB - 1 GiB - 670 MiB) / 96 KiB = 9,783 -> whole 512-token sequences
    pytest.param(3 * GiB, LARGE_FP16, 9728, "per token", id="laptop-large"),
    pytest.param(2560 * MiB, LARGE_FP16, 5120, "per token", id="2.5g-large"),
    pytest.param(2 * GiB, LARGE_FP16, 0, "under one 512-token sequence", id="2g-large"),
    pytest.param(1536 * MiB, LARGE_FP16, 0, "too little free GPU memory", id="1.5g-large"),
    pytest.param(None, LARGE_FP16, GPU_UNKNOWN_MEMORY_TOKENS, "unknown", id="unknown"),
]


@pytest.mark.parametrize(("free", "shape", "tokens", "why"), BUDGETS)
def test_gpu_batch_tokens(free: int | None, shape: ModelShape, tokens: int, why: str) -> None:
    got, reason = gpu_batch_tokens(free, shape)
    assert got == tokens and why in reason
    if free is not None and got:  # what it promises fits in the arena cap
        assert shape.weight_bytes + got * activation_bytes_per_token(shape) <= gpu_mem_limit(free)


def test_activation_estimate_follows_the_shape() -> None:
    # MiniLM fp16: (8 x 384 + 2 x 1536 + 12 x 256) x 2 bytes x 2 = 36 KiB per token
    assert activation_bytes_per_token(MINILM_FP16) == 36 * 1024
    fp32 = ModelShape(384, 1536, 12, 256, 90 * MiB, dtype_bytes=4)
    assert activation_bytes_per_token(fp32) == 2 * activation_bytes_per_token(MINILM_FP16)


def test_model_shape_from_a_config() -> None:
    cfg = {"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 12}
    assert ModelShape.of(cfg, 256, 90 * MiB, "fp16") == MINILM_FP16
    assert ModelShape.of(cfg, 256, 90 * MiB, "fp32").weight_bytes == 90 * MiB
