"""The pool's plan: the limits and the user's options in, the numbers of the scaling policy
out (``ProfilePolicy``) with a reason for each, for the pool and ``embedpool doctor``.

Pure and table-tested (``tests/executors/pool/test_scaling.py``, ``tests/executors/pool/test_gpuplan.py``): the
profiles' numbers and why, the threads and the worker bound from cores and from memory
(``memory.worker_mem_estimate``), and the batch budget (``budget.batch_budget``). The state
machine that runs the plan is ``scaling``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from embedpool.budget import BatchBudget, batch_budget
from embedpool.errors import ConfigError
from embedpool.executors.pool.gpuplan import PARENT_WORKERS_PER_CORE, parent_reserve
from embedpool.executors.pool.machine import Limits
from embedpool.executors.pool.memory import (
    SUPERVISOR_BASELINE,
    MiB,
    ModelMemory,
    shared_weight_bytes,
    worker_mem_estimate,
)
from embedpool.types import Precision, Profile


@dataclass(frozen=True)
class ProfilePolicy:
    """The numbers a profile stands for. Fractions are of the usable limit (0-1)."""

    #: Workers at start. cloud: all of them (a dedicated box, paid by the hour); local/wsl2: 1,
    #: then grow while the readings allow (someone is using this machine).
    start_workers: int
    #: Never more (<= cores // threads, and bounded by memory in plan()).
    max_workers: int
    #: Memory fraction at which growth stops and the pool shrinks. Headroom above it must
    #: hold one batch's activation spike and 2 s of growth before the next reading acts.
    mem_stop: float
    #: Growth resumes (and emergency mode ends) only below this; the gap stops flapping.
    mem_resume: float
    #: Other programs' CPU share at which growth stops ...
    cpu_stop: float
    #: ... and below which it resumes.
    cpu_resume: float
    #: Intra-op threads per worker: 1, since processes beat threads here (2x1 70.7 chunks/s
    #: vs 1x2 63.7): no intra-op sync barriers, and one worker's GIL-bound glue overlaps the
    #: other's GEMMs.
    threads_per_worker: int
    #: Padded tokens per batch (``budget.batch_budget``: small batches are faster *and*
    #: lighter).
    batch_tokens: int
    #: The floor for halving after OOM kills (``BatchBudget.floor``).
    min_batch_tokens: int
    #: Calm time (memory below mem_resume) before leaving emergency mode, and between two
    #: doublings of the batch budget afterwards: long enough to see a transient hog's
    #: next spike, short enough that a minutes-long job gets back to speed.
    emergency_exit_s: float
    #: Memory one more worker is expected to add until one is observed (worker_mem_estimate()).
    worker_mem_estimate: int = 268 * MiB
    #: Usable cores (for the "room for one more worker" check); 0 = do not check.
    cpus: int = 0
    #: Readings at the target count before the next growth or plateau judgement: the first
    #: interval after a start is partly load time, and two more samples average the noise.
    settle_readings: int = 3
    #: One more worker must beat the last count's throughput by this factor to be kept adding.
    plateau_gain: float = 1.05
    #: How long a throughput plateau blocks growth before it is probed again.
    reprobe_s: float = 60.0
    #: False when the user fixed the worker count: throughput never shrinks it (memory still
    #: does, and the pool grows back to it when memory allows, whatever the CPU readings).
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.start_workers <= self.max_workers:
            raise ConfigError(
                f"need 1 <= start_workers <= max_workers, got "
                f"{self.start_workers}, {self.max_workers}"
            )
        for lo, hi, what in (
            (self.mem_resume, self.mem_stop, "mem"),
            (self.cpu_resume, self.cpu_stop, "cpu"),
        ):
            if not 0 < lo < hi <= 1:
                raise ConfigError(f"need 0 < {what}_resume < {what}_stop <= 1, got {lo}, {hi}")
        if self.threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if not 1 <= self.min_batch_tokens <= self.batch_tokens:
            raise ConfigError(
                f"need 1 <= min_batch_tokens <= batch_tokens, got "
                f"{self.min_batch_tokens}, {self.batch_tokens}"
            )
        if self.emergency_exit_s < 0 or self.settle_readings < 1 or self.plateau_gain < 1:
            raise ConfigError("emergency_exit_s >= 0, settle_readings >= 1, plateau_gain >= 1")


@dataclass(frozen=True)
class _ProfileDefaults:
    start_all: bool
    max_workers_cap: int | None
    mem_stop: float
    mem_resume: float
    cpu_stop: float
    cpu_resume: float
    emergency_exit_s: float


#: Per profile, and why:
#: - cloud: a dedicated container/VM, usually with a cgroup limit whose OOM kill is the only
#:   warning. memory_used() there excludes reclaimable cache, so 85% still leaves 15% of the
#:   limit (>= 150 MB in a 1 GiB pod: a worker's start plus a batch spike) for the two
#:   seconds the look-ahead covers. Other programs are sidecars: block growth only when they
#:   take 85% of the CPUs.
#: - local: someone's desktop; browsers and IDEs grow without warning, so stop at 80% and
#:   resume at 70% (the predecessor's 79%, rounded: the measured spike sizes below leave the
#:   same margin). Yield CPU early: stop growing when others use 69% (the issue's example).
#: - wsl2: the VM gets ~50% of the host's RAM by default and hands freed memory back to
#:   Windows lazily (microsoft/WSL #4166, #7429), so the VM's own "available" overstates what
#:   the host can give; a WSL OOM takes the whole distro down. Stop at 50%, at most 2
#:   workers, and a longer calm period before recovering (its smaller batch budget:
#:   ``budget.PROFILE_BATCH_TOKENS``).
PROFILE_DEFAULTS: Mapping[Profile, _ProfileDefaults] = {
    "cloud": _ProfileDefaults(
        start_all=True,
        max_workers_cap=None,
        mem_stop=0.85,
        mem_resume=0.75,
        cpu_stop=0.85,
        cpu_resume=0.75,
        emergency_exit_s=20.0,
    ),
    "local": _ProfileDefaults(
        start_all=False,
        max_workers_cap=None,
        mem_stop=0.80,
        mem_resume=0.70,
        cpu_stop=0.69,
        cpu_resume=0.59,
        emergency_exit_s=20.0,
    ),
    "wsl2": _ProfileDefaults(
        start_all=False,
        max_workers_cap=2,
        mem_stop=0.50,
        mem_resume=0.40,
        cpu_stop=0.69,
        cpu_resume=0.59,
        emergency_exit_s=30.0,
    ),
}


@dataclass(frozen=True)
class Plan:
    """The policy for this machine and the reasons behind each number (for the doctor)."""

    policy: ProfilePolicy
    reasons: tuple[str, ...]


def plan(
    limits: Limits,
    *,
    workers: int | None = None,
    threads: int | None = None,
    batch_tokens: int | None = None,
    precision: Precision = "int8",
    mem_used: int | None = None,
    pool_used: int | None = None,
    model: ModelMemory | None = None,
    device: str = "cpu",
    budget: BatchBudget | None = None,
) -> Plan:
    """Turn the limits (and the user's ``--workers/--threads/--batch-tokens``) into a policy.

    The batch budget and its floor are ``budget`` (decided by ``budget.batch_budget``, as
    ``placement.place`` does for every job and server), else decided here the same way from
    the profile and ``batch_tokens``.

    Invariant: ``max_workers x threads_per_worker <= limits.cpus - parent_reserve(cpus)``
    (``gpuplan``: the parent keeps a core per 48 workers on big machines). ``device`` "cuda:N"
    counts a GPU worker's host memory (``GPU_WORKER_HOST_RSS``, activations on the GPU);
    ``gpuplan`` sizes its batches. An explicit ``workers``
    fixes the size (start = max) but memory can still shrink it, and is capped by cores and
    memory with a reason. ``mem_used`` is memory already in use against the real limit
    (``memory_used(limits)``), ``pool_used`` the pool's own RSS so far, counted against a
    ``--max-memory`` override (``limits.pool_memory_bytes``); the tighter budget wins. Either
    defaults to the supervisor's own baseline. ``model``: the model's memory shape (else the
    default model's measured constants; see worker_mem_estimate)."""
    d = PROFILE_DEFAULTS[limits.profile]
    cpus = limits.cpus
    reasons = [f"profile {limits.profile}: {limits.profile_source}"]
    for name, value in (("workers", workers), ("threads", threads)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if budget is None:
        budget = batch_budget(
            device="cpu" if device == "cpu" else "cuda",
            profile=limits.profile,
            requested=batch_tokens,
        )

    # -- cores for workers: on big machines the parent keeps some for tokenising and dispatch
    all_cpus = cpus
    reserve = parent_reserve(cpus)
    if reserve:
        cpus -= reserve
        reasons.append(
            f"{reserve} of {all_cpus} cores kept for the parent (tokenising, "
            f"dispatch): one per {PARENT_WORKERS_PER_CORE} workers"
        )

    # -- threads per worker
    if threads is not None:
        t = min(threads, cpus)
        if t < threads:
            reasons.append(
                f"threads {threads} capped at {cpus} usable cores ({limits.cpus_source})"
            )
        else:
            reasons.append(f"threads {t} per worker as requested")
    elif workers is not None:
        t = max(1, cpus // max(1, min(workers, cpus)))
        reasons.append(
            f"threads {t} per worker: {cpus} cores shared by {min(workers, cpus)} requested workers"
        )
    else:
        t = 1
        reasons.append(
            "threads 1 per worker: processes beat threads here (2x1 70.7 vs 1x2 63.7 chunks/s)"
        )

    # -- worker bound from cores
    by_cpu = max(1, cpus // t)
    if workers is not None:
        n_max = min(workers, by_cpu)
        if n_max < workers:
            reasons.append(
                f"workers {workers} capped at {n_max}: {n_max} x {t} threads "
                f"fill {cpus} cores ({limits.cpus_source})"
            )
    else:
        n_max = by_cpu
        reasons.append(f"max workers {n_max} = {cpus} cores // {t} threads ({limits.cpus_source})")
    if d.max_workers_cap is not None and workers is None and n_max > d.max_workers_cap:
        n_max = d.max_workers_cap
        reasons.append(f"max workers {n_max}: the {limits.profile} profile's cap")

    bt = budget.tokens

    # -- worker bound from memory
    per_worker = worker_mem_estimate(precision, bt, model, device)
    scopes = [
        (
            limits.real_memory_bytes,
            limits.real_memory_source,
            SUPERVISOR_BASELINE if mem_used is None else mem_used,
        )
    ]
    if limits.pool_memory_bytes is not None:
        scopes.append(
            (
                limits.pool_memory_bytes,
                limits.memory_source,
                SUPERVISOR_BASELINE if pool_used is None else pool_used,
            )
        )
    mem_limit, mem_source, baseline = min(scopes, key=lambda sc: d.mem_stop * sc[0] - sc[2])
    room = d.mem_stop * mem_limit - baseline
    # mapped weights every worker shares: once for the pool, not per worker
    shared = shared_weight_bytes(model, device)
    by_mem = int((room - shared) // (per_worker - shared))
    if by_mem < n_max:
        n_max = max(1, by_mem)
        reasons.append(
            f"max workers {n_max}: ({d.mem_stop:.0%} of {_mib(mem_limit)} "
            f"[{mem_source}] - {_mib(baseline)} in use"
            + (f" - {_mib(shared)} of weights the workers share" if shared else "")
            + f") / {_mib(per_worker - shared)} per {precision} worker at {bt} tokens"
            + (
                " (not even one fits: relying on small batches and emergency mode)"
                if by_mem < 1
                else ""
            )
        )

    start = n_max if (workers is not None or d.start_all) else 1
    reasons.append(
        f"start with {start} worker(s): "
        + (
            "fixed by --workers"
            if workers is not None
            else "cloud starts at full size"
            if d.start_all
            else f"{limits.profile} starts small and grows while the readings allow"
        )
    )

    reasons.append(f"batch budget {bt} padded tokens: {budget.reason}")
    min_bt = budget.floor
    policy = ProfilePolicy(
        start_workers=start,
        max_workers=n_max,
        mem_stop=d.mem_stop,
        mem_resume=d.mem_resume,
        cpu_stop=d.cpu_stop,
        cpu_resume=d.cpu_resume,
        threads_per_worker=t,
        batch_tokens=bt,
        min_batch_tokens=min_bt,
        emergency_exit_s=d.emergency_exit_s,
        worker_mem_estimate=per_worker - shared,
        cpus=all_cpus,
        adaptive=workers is None,
    )
    return Plan(policy, tuple(reasons))


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if n < 10 * 1024 * MiB else f"{n / (1024 * MiB):.1f} GiB"
