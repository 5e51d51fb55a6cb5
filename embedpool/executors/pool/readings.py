"""Live readings of the machine and the pool, once per sample interval, for the scaling policy.

- ``memory_used(limits)``: bytes used against the *real* limit (``Limits.real_memory_bytes``,
  the host's or a cgroup's), in its scope: the cgroup's usage minus its reclaimable
  ``inactive_file`` when a cgroup limit is below the host's memory, else the host's
  ``MemTotal - MemAvailable``. Every program's memory counts here: the OOM killer counts it.
- An override (``--max-memory`` / ``EMBEDPOOL_MAX_MEMORY``, ``Limits.pool_memory_bytes``) limits
  what the *pool* uses: against it counts the pool's own RSS (supervisor + workers), not the
  host's usage, so ``--max-memory 1G`` on a shared 16 GB machine with 12 GB in use means "use at
  most 1 GB", not ">100% used". The real limit still counts total usage; the reading that
  binds is the one with the larger fraction (``machine.memory_in_scope``).
- ``sample(pids)``: RSS per pid, vanished pids skipped.
- ``Sampler.read(pids, queue_depth, done_count) -> Reading``: one reading. ``cpu_percent`` is
  the busy share of the *usable* CPUs (the cgroup's quota when that is the binding limit, else
  the allowed CPUs), 0-100; ``pool_cpu_percent`` is the share our own processes (this
  supervisor and the given worker pids) used in the same units, so the policy can tell CPU
  taken by *other* programs from our own busy workers (see ``scaling``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import psutil

from embedpool.executors.pool import cgroups
from embedpool.executors.pool.limits import meminfo
from embedpool.executors.pool.machine import Limits, Reading, memory_in_scope
from embedpool.proc import rss_bytes


def memory_used(limits: Limits) -> int:
    """Bytes in use against ``limits.real_memory_bytes``, by every program in its scope (see
    the module docstring)."""
    if limits.memory_cgroup is not None:
        used = cgroups.memory_used(limits.memory_cgroup)
        if used is not None:
            return used
    info = meminfo(limits.root)
    if "MemTotal" in info and "MemAvailable" in info:
        return max(0, info["MemTotal"] - info["MemAvailable"])
    vm = psutil.virtual_memory()
    return int(vm.total - vm.available)


def own_rss() -> int:
    """RSS of this process (the supervisor), in bytes."""
    return rss_bytes() or 0


def sample(pids: Sequence[int]) -> dict[int, int]:
    """RSS in bytes per pid; pids that are gone (or not ours to read) are left out."""
    out: dict[int, int] = {}
    for pid in pids:
        rss = rss_bytes(pid)
        if rss is not None:
            out[pid] = rss
    return out


class Sampler:
    """Stateful reader: CPU shares and throughput are rates over the time since the previous
    ``read()`` (or construction).

    CPU time is counted from counters, not from ``psutil.cpu_percent()``'s module-wide state
    (which any other caller in the process would reset): the cgroup's usage when its quota is
    the binding limit, else ``/proc/stat`` per-CPU busy time of the allowed CPUs; our own
    share from each process's user+system time. A worker seen for the first time is counted
    from its creation if that was within the interval (a fresh worker's load time), else from
    now on."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._last_ts = time.monotonic()
        self._last_wall = time.time()
        self._last_done = 0
        self._last_busy = self._busy_seconds()
        self._procs: dict[int, tuple[psutil.Process, float]] = {}
        self._self = psutil.Process()
        self._self_cpu = _cpu_seconds(self._self) or 0.0

    def _busy_seconds(self) -> float:
        """CPU-seconds used so far in the scope of the CPU limit."""
        cg = self.limits.cpu_cgroup
        if cg is not None:
            used = cgroups.cpu_seconds(cg)
            if used is not None:
                return used
        per_cpu = psutil.cpu_times(percpu=True)
        ids = [i for i in self.limits.cpu_ids if i < len(per_cpu)] or list(range(len(per_cpu)))
        busy = 0.0
        for i in ids:
            t = per_cpu[i]
            busy += float(
                t.user
                + t.system
                + getattr(t, "nice", 0.0)
                + getattr(t, "irq", 0.0)
                + getattr(t, "softirq", 0.0)
                + getattr(t, "steal", 0.0)
            )
        return busy

    def _pool_cpu_seconds(self, pids: Sequence[int]) -> float:
        """CPU-seconds this supervisor and the given workers used since the last read."""
        now_self = _cpu_seconds(self._self) or self._self_cpu
        used = now_self - self._self_cpu
        self._self_cpu = now_self
        live = set(pids)
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]
        for pid in live:
            known = self._procs.get(pid)
            if known is None:
                try:
                    proc = psutil.Process(pid)
                    total = _cpu_seconds(proc)
                    born_in_interval = proc.create_time() >= self._last_wall
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if total is None:
                    continue
                self._procs[pid] = (proc, total)
                if born_in_interval:
                    used += total
                continue
            proc, before = known
            total = _cpu_seconds(proc)
            if total is None:
                del self._procs[pid]
                continue
            used += total - before
            self._procs[pid] = (proc, total)
        return max(0.0, used)

    def read(self, pids: Sequence[int], queue_depth: int, done_count: int) -> Reading:
        """One reading of the machine and the workers ``pids``; ``done_count`` is the running
        total of sequences embedded."""
        now, wall = time.monotonic(), time.time()
        elapsed = now - self._last_ts
        rss = sample(pids)
        busy = self._busy_seconds()
        pool = self._pool_cpu_seconds(list(rss))
        capacity = elapsed * self.limits.cpus
        cpu = min(100.0, 100.0 * (busy - self._last_busy) / capacity) if capacity > 0 else 0.0
        pool_cpu = min(100.0, 100.0 * pool / capacity) if capacity > 0 else 0.0
        throughput = (done_count - self._last_done) / elapsed if elapsed > 0 else 0.0
        pool_used = own_rss() + sum(rss.values())
        used, limit, scope = memory_in_scope(self.limits, memory_used(self.limits), pool_used)
        reading = Reading(
            ts=now,
            cpu_percent=max(0.0, cpu),
            mem_used=used,
            mem_limit=limit,
            mem_scope=scope,
            worker_rss=tuple(rss[p] for p in pids if p in rss),
            queue_depth=queue_depth,
            workers=len(rss),
            throughput=max(0.0, throughput),
            pool_cpu_percent=pool_cpu,
        )
        self._last_ts, self._last_wall, self._last_done, self._last_busy = (
            now,
            wall,
            done_count,
            busy,
        )
        return reading


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return float(t.user + t.system)
