"""``PoolConfig``: every knob of the process pool in one frozen, validated dataclass.

``None`` means "let the machine decide": worker count, threads and the batch token budget then
come from ``plan.plan()`` over the detected limits. Only the CLI and ``embedpool.config``
read ``EMBEDPOOL_*`` variables; this class takes plain values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from embedpool.budget import BatchBudget
from embedpool.errors import ConfigError
from embedpool.executor import PENDING_PER_WORKER
from embedpool.executors.pool.memory import ModelMemory
from embedpool.faults import FaultPolicy
from embedpool.types import Precision, Profile

StartMethod = Literal["spawn", "forkserver"]


@dataclass(frozen=True)
class PoolConfig:
    #: Fixed worker count; None = adaptive (start and maximum from the profile's plan).
    workers: int | None = None
    #: Intra-op threads per worker; None = planned (workers x threads <= usable cores).
    threads: int | None = None
    #: Initial padded-token budget per batch sent to a worker, as the user asked for it; None =
    #: planned. Larger incoming WorkBatches are cut to this budget and reassembled, so callers
    #: never notice.
    batch_tokens: int | None = None
    #: The budget already decided (``budget.batch_budget``, through ``placement.place``): its
    #: tokens, its OOM floor and its reason; wins over ``batch_tokens``.
    budget: BatchBudget | None = None
    profile: Profile | None = None
    #: The engine's precision: plan() uses it for the per-worker memory estimate.
    precision: Precision = "int8"
    #: The model's memory shape for that estimate (weights, widths, max length, attention
    #: kernel); None = the default model's constants. Pool fills it in from an EngineSpec.
    model_memory: ModelMemory | None = None
    #: Where the workers run: "cpu", or "cuda:N" (one GPU: the device executor runs one pool
    #: per GPU, ``executors/devices.py``). A GPU pool's workers hold no activations in host RAM,
    #: and a lost GPU breaks the pool with ``DeviceLost``.
    device: str = "cpu"
    #: Memory the pool may use in all (supervisor + workers); None = the detected limit.
    max_memory_bytes: int | None = None
    #: spawn is the most robust (no inherited state); forkserver respawns faster after a crash.
    start_method: StartMethod = "spawn"
    #: A worker must send Ready within this. Loading int8 MiniLM takes ~1 s; the margin is for
    #: a busy machine and a cold disk, and it is only paid when something is badly wrong.
    start_timeout_s: float = 120.0
    #: The fault policy's numbers (``faults.FaultPolicy``, where each is explained): the hung
    #: worker deadline (base + per token of its task, warned at the fraction) and the retries
    #: of a single input.
    hang_base_s: float = FaultPolicy.hang_base_s
    hang_per_token_s: float = FaultPolicy.hang_per_token_s
    hang_warn_fraction: float = FaultPolicy.hang_warn_fraction
    max_retries: int = FaultPolicy.max_retries
    #: Recycle a worker (between batches) whose RSS, after gc, exceeds this many bytes ...
    recycle_rss_bytes: int | None = None
    #: ... or grew by more than this since it was ready, beyond the activations of one batch
    #: of the planned budget that ONNX Runtime's arena keeps (loky's 300 MB rule: a leak).
    recycle_growth_bytes: int | None = 300 * 1024 * 1024
    #: How often the manager samples resources and asks the scaling policy (the policy's
    #: thresholds and look-ahead are tuned for 1 s: scaling.SAMPLE_INTERVAL_S).
    sample_interval_s: float = 1.0
    #: Calm time before leaving emergency mode; None = the profile's (plan.plan()).
    emergency_exit_s: float | None = None
    #: How often a 'status' event is emitted (0 = never).
    status_interval_s: float = 5.0
    #: How long a worker asked to leave may take before it is killed.
    leave_timeout_s: float = 5.0
    #: Consecutive failed starts (no worker alive) before the pool is declared broken
    #: (``faults.start_failure``).
    max_start_failures: int = FaultPolicy.max_start_failures
    #: Default look-ahead of Pool.run(): batches in flight or queued per worker.
    pending_per_worker: int = PENDING_PER_WORKER

    def __post_init__(self) -> None:
        positive_ints = {
            "workers": self.workers,
            "threads": self.threads,
            "batch_tokens": self.batch_tokens,
            "max_memory_bytes": self.max_memory_bytes,
            "recycle_rss_bytes": self.recycle_rss_bytes,
            "recycle_growth_bytes": self.recycle_growth_bytes,
            "max_start_failures": self.max_start_failures,
            "pending_per_worker": self.pending_per_worker,
        }
        for name, value in positive_ints.items():
            if value is not None and value < 1:
                raise ConfigError(f"PoolConfig.{name} must be >= 1 or None, got {value}")
        if self.start_method not in ("spawn", "forkserver"):
            raise ConfigError(
                f"PoolConfig.start_method must be spawn or forkserver, got {self.start_method!r}"
            )
        if self.profile is not None and self.profile not in ("cloud", "local", "wsl2"):
            raise ConfigError(
                f"PoolConfig.profile must be cloud, local or wsl2, got {self.profile!r}"
            )
        positive_floats = {
            "start_timeout_s": self.start_timeout_s,
            "sample_interval_s": self.sample_interval_s,
            "leave_timeout_s": self.leave_timeout_s,
        }
        for name, fvalue in positive_floats.items():
            if not fvalue > 0:
                raise ConfigError(f"PoolConfig.{name} must be > 0, got {fvalue}")
        if self.precision not in ("int8", "fp32", "fp16"):
            raise ConfigError(
                f"PoolConfig.precision must be int8, fp32 or fp16, got {self.precision!r}"
            )
        if self.device != "cpu" and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"PoolConfig.device must be cpu or cuda:N, got {self.device!r}")
        if self.emergency_exit_s is not None and self.emergency_exit_s < 0:
            raise ConfigError(
                f"PoolConfig.emergency_exit_s must be >= 0, got {self.emergency_exit_s}"
            )
        if self.status_interval_s < 0:
            raise ConfigError("PoolConfig.status_interval_s must be >= 0")
        try:
            self.fault_policy  # noqa: B018 - validates the fault policy's fields
        except ConfigError as exc:
            raise ConfigError(f"PoolConfig.{exc}") from None

    @property
    def fault_policy(self) -> FaultPolicy:
        return FaultPolicy(
            max_retries=self.max_retries,
            hang_base_s=self.hang_base_s,
            hang_per_token_s=self.hang_per_token_s,
            hang_warn_fraction=self.hang_warn_fraction,
            max_start_failures=self.max_start_failures,
        )
