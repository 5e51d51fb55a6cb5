"""The value types the scaling policy reads: what this machine allows and how it is doing.

Plain frozen data and arithmetic over it, nothing that reads a file or a process, so that the
pure policy (``scaling``) and the doctor import no process code (no psutil)::

    Limits    what this process may use: CPUs, memory, profile, each with its source
              (built once by limits.detect_limits)
    Reading   one live sample: CPU shares, memory against the binding limit, worker RSS,
              queue depth, throughput (built once per interval by readings.Sampler)
    Cgroup    one cgroup directory that holds a binding limit
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from embedpool.errors import ConfigError
from embedpool.types import Profile

PROFILES: tuple[Profile, ...] = ("cloud", "local", "wsl2")

MemScope = Literal["machine", "pool"]


@dataclass(frozen=True)
class Cgroup:
    """One cgroup directory that holds a binding limit (and so the usage to read)."""

    version: Literal[1, 2]
    path: Path


@dataclass(frozen=True)
class Limits:
    """What this process may use. ``cpus`` and ``memory_bytes`` are already the minimum of
    every limit; the ``*_source`` strings say which one won, for ``embedpool doctor``."""

    cpus: int
    cpus_source: str
    memory_bytes: int
    memory_source: str
    profile: Profile
    profile_source: str
    host_cpus: int = 0
    host_memory_bytes: int = 0
    #: CPU ids this process may run on (affinity), for per-CPU busy readings.
    cpu_ids: tuple[int, ...] = ()
    #: The cgroup whose memory limit is the tightest real one (below the host's), if any:
    #: readings.memory_used() reads its usage.
    memory_cgroup: Cgroup | None = None
    #: The cgroup whose CPU quota binds, if any: readings.Sampler reads its CPU usage.
    cpu_cgroup: Cgroup | None = None
    #: The real limit (min of host and cgroups) and its source; 0/"" = memory_bytes/its source
    #: (no override below it). Total usage (memory_used()) counts against it.
    system_memory_bytes: int = 0
    system_memory_source: str = ""
    #: --max-memory / EMBEDPOOL_MAX_MEMORY where it is below the real limit: the pool's own RSS
    #: counts against it. None: no override in force.
    pool_memory_bytes: int | None = None
    #: Overrides that were ignored and other remarks, for the doctor.
    notes: tuple[str, ...] = ()
    root: Path = field(default=Path("/"), compare=False)

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.memory_bytes < 1:
            raise ConfigError(
                f"limits must be positive, got cpus={self.cpus}, memory_bytes={self.memory_bytes}"
            )
        if self.profile not in PROFILES:
            raise ConfigError(f"profile {self.profile!r} is not one of {', '.join(PROFILES)}")

    @property
    def real_memory_bytes(self) -> int:
        """The host's or cgroup's limit, which every program's memory counts against."""
        return self.system_memory_bytes or self.memory_bytes

    @property
    def real_memory_source(self) -> str:
        return self.system_memory_source or self.memory_source


def memory_in_scope(limits: Limits, used: int, pool_used: int) -> tuple[int, int, MemScope]:
    """(used, limit, scope) of the memory limit that binds hardest: total ``used`` against the
    real limit, or, under an override, the pool's own ``pool_used`` against it, whichever is
    the larger fraction."""
    real: tuple[int, int, MemScope] = (used, limits.real_memory_bytes, "machine")
    if limits.pool_memory_bytes is None:
        return real
    pool: tuple[int, int, MemScope] = (pool_used, limits.pool_memory_bytes, "pool")
    return max(real, pool, key=lambda r: r[0] / r[1])


@dataclass(frozen=True)
class Reading:
    """One sample of the machine and the pool, the input of ``scaling.decide()``.

    ``cpu_percent`` and ``pool_cpu_percent`` are shares (0-100) of the *usable* CPUs
    (``Limits.cpus``); ``mem_used`` against ``mem_limit`` is the memory limit that binds
    (``memory_in_scope``): ``memory_used()`` against the real limit (``mem_scope``
    "machine"), or the pool's own RSS against ``--max-memory`` ("pool");
    ``worker_rss`` the RSS of each live worker; ``queue_depth`` the batches waiting for a
    worker; ``workers`` the live, ready workers; ``throughput`` sequences per second done
    over the interval that ends at ``ts``."""

    ts: float
    cpu_percent: float
    mem_used: int
    mem_limit: int
    worker_rss: tuple[int, ...]
    queue_depth: int
    workers: int
    throughput: float
    pool_cpu_percent: float = 0.0
    mem_scope: MemScope = "machine"

    @property
    def mem_fraction(self) -> float:
        return self.mem_used / self.mem_limit if self.mem_limit > 0 else 1.0

    @property
    def foreign_cpu_percent(self) -> float:
        """CPU busy share taken by processes other than the pool."""
        return max(0.0, self.cpu_percent - self.pool_cpu_percent)
