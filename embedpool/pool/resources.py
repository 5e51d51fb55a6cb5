"""Knowing the machine: usable CPUs and memory, the profile, and live resource readings.

Every limit is the **minimum of every source** (loky's rule, and cpython #80235: neither
``os.cpu_count()`` nor the host's MemTotal knows about cgroups)::

    cpus   = min(host CPUs online, sched affinity, cgroup CPU quota (ceil), EMBEDPOOL_CPUS / cpus=)
    memory = min(host MemTotal, cgroup memory limit (v1 or v2, every ancestor), EMBEDPOOL_MAX_MEMORY
                 / max_memory=)

An override can only *lower* a limit; one above the hardware is ignored and says so in
``Limits.notes``. Each limit records its source, which ``embedpool doctor`` prints.

All reads go through files under ``root`` (``/proc/self/cgroup``, ``/proc/self/mountinfo``,
``/proc/self/status``, ``/proc/meminfo``, ``/sys/devices/system/cpu/online``, the cgroup
files, ``/sys/class/dmi/id``), so tests point ``root`` at a fake tree in ``tmp_path``. The
cgroup directory is found the way the JDK does it: the process's path from
``/proc/self/cgroup``, made relative to the mount's root from ``mountinfo`` (which is "/"
inside a cgroup namespace), then every directory up to the mount point is read, because a
limit on an ancestor binds just as hard.

The profile (``cloud`` | ``local`` | ``wsl2``) is ``profile=`` or ``EMBEDPOOL_PROFILE`` if
given, else ``wsl2`` when the kernel release says Microsoft/WSL, else ``cloud`` on a container,
Kubernetes or cloud-VM signal, else ``local``. ``scaling.plan()`` turns it into numbers.

Readings (used by the supervisor once per sample interval):

- ``memory_used(limits)``: bytes used against the *real* limit (``Limits.real_memory_bytes``,
  the host's or a cgroup's), in its scope: the cgroup's usage minus its reclaimable
  ``inactive_file`` when a cgroup limit is below the host's memory, else the host's
  ``MemTotal - MemAvailable``. Every program's memory counts here: the OOM killer counts it.
- An override (``--max-memory`` / ``EMBEDPOOL_MAX_MEMORY``, ``Limits.pool_memory_bytes``) limits
  what the *pool* uses: against it counts the pool's own RSS (supervisor + workers), not the
  host's usage, so ``--max-memory 1G`` on a shared 16 GB machine with 12 GB in use means "use at
  most 1 GB", not ">100% used". The real limit still counts total usage; the reading that
  binds is the one with the larger fraction (``memory_in_scope``).
- ``sample(pids)``: RSS per pid (psutil), vanished pids skipped.
- ``Sampler.read(pids, queue_depth, done_count) -> Reading``: one reading. ``cpu_percent`` is
  the busy share of the *usable* CPUs (the cgroup's quota when that is the binding limit, else
  the allowed CPUs), 0-100; ``pool_cpu_percent`` is the share our own processes (this
  supervisor and the given worker pids) used in the same units, so the policy can tell CPU
  taken by *other* programs from our own busy workers (see ``scaling``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from embedpool.config import env_bytes, env_int, env_str
from embedpool.errors import ConfigError
from embedpool.types import Profile

PROFILES: tuple[Profile, ...] = ("cloud", "local", "wsl2")

#: cgroup v1 reports "no limit" as a page-rounded 2**63-1 (9223372036854771712); anything at
#: or above 2**60 bytes (an exabyte) is no limit, whatever the page size.
_NO_LIMIT = 1 << 60

#: Substrings of a cgroup path that mean a container runtime placed us there.
_CONTAINER_CGROUP_MARKS = ("docker", "kubepods", "containerd", "libpod", "crio", "ecs", "lxc",
                           "garden", "actions_job")
#: DMI values (lower case) that name a cloud VM. Hyper-V's "Virtual Machine" alone is not one:
#: a local Hyper-V guest says the same; Azure adds the "7783-7084-3265-9085-8269-3286-77"
#: chassis asset tag, which we check instead.
_CLOUD_DMI = {
    "sys_vendor": ("amazon ec2", "google", "digitalocean", "hetzner", "openstack",
                   "alibaba cloud", "tencent cloud", "scaleway", "linode", "vultr", "exoscale",
                   "oraclecloud"),
    "product_name": ("google compute engine", "openstack", "hvm domu", "droplet", "alibaba cloud ecs",
                     "cvm", "kvm (oci)"),
    "bios_vendor": ("amazon ec2", "google", "hetzner"),
    "chassis_asset_tag": ("7783-7084-3265-9085-8269-3286-77", "oraclecloud.com"),
    "board_vendor": ("amazon ec2", "google"),
}


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
    #: memory_used() reads its usage.
    memory_cgroup: Cgroup | None = None
    #: The cgroup whose CPU quota binds, if any: Sampler reads its CPU usage.
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
            raise ConfigError(f"limits must be positive, got cpus={self.cpus}, "
                              f"memory_bytes={self.memory_bytes}")
        if self.profile not in PROFILES:
            raise ConfigError(f"profile {self.profile!r} is not one of {', '.join(PROFILES)}")

    @property
    def real_memory_bytes(self) -> int:
        """The host's or cgroup's limit, which every program's memory counts against."""
        return self.system_memory_bytes or self.memory_bytes

    @property
    def real_memory_source(self) -> str:
        return self.system_memory_source or self.memory_source


# ---------------------------------------------------------------------------------------------
# small readers, each of one file


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11): the kernel's CPU list format."""
    ids: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(ids)))


def _host_cpus(root: Path) -> tuple[int, str]:
    text = _read(root / "sys/devices/system/cpu/online")
    if text and text.strip():
        return len(parse_cpu_list(text)), "host CPUs online"
    return max(1, os.cpu_count() or 1), "os.cpu_count()"


def _affinity(root: Path) -> tuple[int, ...] | None:
    text = _read(root / "proc/self/status")
    for line in (text or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    if root == Path("/") and hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return None


def _meminfo(root: Path) -> dict[str, int]:
    """/proc/meminfo as bytes."""
    out: dict[str, int] = {}
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _host_memory(root: Path) -> int:
    total = _meminfo(root).get("MemTotal")
    if total:
        return total
    return int(psutil.virtual_memory().total)


# ---------------------------------------------------------------------------------------------
# cgroups


@dataclass(frozen=True)
class _Mount:
    version: Literal[1, 2]
    root: str           # the mount's root inside the hierarchy ("/" in a cgroup namespace)
    point: str          # where it is mounted
    controllers: frozenset[str]


def _mounts(root: Path) -> list[_Mount]:
    mounts: list[_Mount] = []
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        fstype, superopts = after[0], after[2]
        point = fields[4].replace("\\040", " ")
        if fstype == "cgroup2":
            mounts.append(_Mount(2, fields[3], point, frozenset()))
        elif fstype == "cgroup":
            mounts.append(_Mount(1, fields[3], point, frozenset(superopts.split(","))))
    return mounts


def _proc_cgroups(root: Path) -> tuple[str | None, dict[str, str]]:
    """(v2 path, {v1 controller: path}) from /proc/self/cgroup."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        else:
            for c in controllers.split(","):
                v1[c] = path
    return v2, v1


def _cgroup_dir(root: Path, mount: _Mount, path: str) -> Path:
    """Directory of ``path`` under ``mount``: strip the mount's root, as in a namespace."""
    rel = path
    if mount.root not in ("/", "") and (path == mount.root or path.startswith(mount.root + "/")):
        rel = path[len(mount.root):]
    elif mount.root not in ("/", ""):
        rel = "/"  # our cgroup is outside the mount's view: the mount point is the best we have
    return _under(root, mount.point) / rel.lstrip("/")


def _ancestors(directory: Path, stop: Path) -> list[Path]:
    """``directory`` and every parent up to and including the mount point ``stop``."""
    out = [directory]
    while directory != stop and stop in directory.parents:
        directory = directory.parent
        out.append(directory)
    return out


def _cgroup_dirs(root: Path, controller: str) -> list[tuple[Literal[1, 2], Path, Path]]:
    """(version, own directory, mount point) for every hierarchy that may hold ``controller``."""
    v2_path, v1_paths = _proc_cgroups(root)
    found: list[tuple[Literal[1, 2], Path, Path]] = []
    for m in _mounts(root):
        if m.version == 2 and v2_path is not None:
            found.append((2, _cgroup_dir(root, m, v2_path), _under(root, m.point)))
        elif m.version == 1 and controller in m.controllers and controller in v1_paths:
            found.append((1, _cgroup_dir(root, m, v1_paths[controller]), _under(root, m.point)))
    return found


def _int_file(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_memory_limit(root: Path) -> tuple[int, Cgroup] | None:
    """The tightest memory limit over every ancestor, with the cgroup that sets it."""
    best: tuple[int, Cgroup] | None = None
    for version, own, stop in _cgroup_dirs(root, "memory"):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        for d in _ancestors(own, stop):
            value = _int_file(d / name)
            if value is None or value <= 0 or value >= _NO_LIMIT:
                continue
            if best is None or value < best[0]:
                best = (value, Cgroup(version, d))
    return best


def _cgroup_cpu_quota(root: Path) -> tuple[int, Cgroup, str] | None:
    """The tightest CPU quota in whole CPUs (ceil), with its cgroup and a description."""
    best: tuple[int, Cgroup, str] | None = None
    for version, own, stop in _cgroup_dirs(root, "cpu"):
        for d in _ancestors(own, stop):
            if version == 2:
                text = (_read(d / "cpu.max") or "").split()
                if len(text) != 2 or text[0] == "max":
                    continue
                quota, period = int(text[0]), int(text[1])
                what = f"cgroup v2 cpu.max {quota} {period}"
            else:
                q, p = _int_file(d / "cpu.cfs_quota_us"), _int_file(d / "cpu.cfs_period_us")
                if q is None or p is None or q <= 0:
                    continue
                quota, period = q, p
                what = f"cgroup v1 cpu.cfs_quota_us/cfs_period_us {quota}/{period}"
            if period <= 0:
                continue
            # ceil: a 1.5-CPU quota still lets two single-threaded workers run, each throttled
            # a little; floor would leave half a CPU unused. max(1): a 0.2-CPU quota still runs.
            cpus = max(1, math.ceil(quota / period))
            if best is None or cpus < best[0]:
                best = (cpus, Cgroup(version, d), f"{what} ({d})")
    return best


def _cpu_usage_cgroup(root: Path, quota_cgroup: Cgroup) -> Cgroup | None:
    """Where to read the CPU time used under a binding quota: v2 ``cpu.stat`` beside the
    quota; v1 ``cpuacct.usage`` in the same directory when cpu and cpuacct are co-mounted
    (the usual ``cpu,cpuacct``), else in our own cpuacct cgroup."""
    if quota_cgroup.version == 2:
        return quota_cgroup if (quota_cgroup.path / "cpu.stat").is_file() else None
    if (quota_cgroup.path / "cpuacct.usage").is_file():
        return quota_cgroup
    for version, own, _ in _cgroup_dirs(root, "cpuacct"):
        if version == 1 and (own / "cpuacct.usage").is_file():
            return Cgroup(1, own)
    return None


# ---------------------------------------------------------------------------------------------
# the profile


def _detect_profile(root: Path, environ: Mapping[str, str]) -> tuple[Profile, str]:
    release = (_read(root / "proc/sys/kernel/osrelease") or "").strip()
    if "microsoft" in release.lower() or "wsl" in release.lower():
        return "wsl2", f"kernel release {release!r} names WSL"
    for marker in (".dockerenv", "run/.containerenv"):
        if (root / marker).exists():
            return "cloud", f"container: /{marker} exists"
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return "cloud", "Kubernetes: KUBERNETES_SERVICE_HOST is set"
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        path = line.split(":", 2)[-1]
        low = path.lower()
        for mark in _CONTAINER_CGROUP_MARKS:
            if mark in low:
                return "cloud", f"container: cgroup path {path!r} contains {mark!r}"
    dmi = root / "sys/class/dmi/id"
    for name, needles in _CLOUD_DMI.items():
        value = (_read(dmi / name) or "").strip()
        low = value.lower()
        if low and any(n in low for n in needles):
            return "cloud", f"cloud VM: DMI {name} {value!r}"
    return "local", "no WSL, container, Kubernetes or cloud-VM signal"


# ---------------------------------------------------------------------------------------------
# the public entry points


def detect_limits(*, max_memory: int | None = None, profile: str | None = None,
                  cpus: int | None = None, root: Path = Path("/"),
                  environ: Mapping[str, str] | None = None) -> Limits:
    """Read the machine. Keyword arguments (the CLI's flags) take precedence over the
    ``EMBEDPOOL_CPUS`` / ``EMBEDPOOL_MAX_MEMORY`` / ``EMBEDPOOL_PROFILE`` variables; either
    only ever lowers a hardware limit. A malformed variable raises ConfigError naming it."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    notes: list[str] = []

    # -- CPUs
    host_cpus, host_src = _host_cpus(root)
    cpu_candidates: list[tuple[int, str]] = [(host_cpus, host_src)]
    affinity = _affinity(root)
    cpu_ids = affinity if affinity else tuple(range(host_cpus))
    if affinity:
        cpu_candidates.append((len(affinity), f"CPU affinity {_fmt_ids(affinity)}"))
    quota = _cgroup_cpu_quota(root)
    if quota is not None:
        cpu_candidates.append((quota[0], quota[2]))
    cpu_override: tuple[int, str] | None = None
    if cpus is not None:
        if cpus < 1:
            raise ConfigError(f"cpus={cpus} must be >= 1")
        cpu_override = (cpus, "cpus= argument (--cpus)")
    else:
        env_cpus = env_int("EMBEDPOOL_CPUS", None, minimum=1, environ=env)
        if env_cpus is not None:
            cpu_override = (env_cpus, f"EMBEDPOOL_CPUS={env_cpus}")
    if cpu_override is not None:
        cpu_candidates.append(cpu_override)
    # min() keeps the first of equal values: the hardware source wins a tie with an override.
    n_cpus, cpus_source = min(cpu_candidates, key=lambda c: c[0])
    if cpu_override is not None and cpu_override[0] > n_cpus:
        notes.append(f"{cpu_override[1]} ignored: above the {n_cpus} CPUs of {cpus_source}")
    # CPU busy shares are read from the cgroup only where its quota is what binds; otherwise
    # the per-CPU counters of the allowed CPUs tell the truth.
    cpu_cgroup: Cgroup | None = None
    if quota is not None and cpus_source == quota[2]:
        cpu_cgroup = _cpu_usage_cgroup(root, quota[1])

    # -- memory
    host_mem = _host_memory(root)
    mem_candidates: list[tuple[int, str]] = [(host_mem, "host MemTotal")]
    cg_mem = _cgroup_memory_limit(root)
    memory_cgroup: Cgroup | None = None
    if cg_mem is not None:
        name = "memory.max" if cg_mem[1].version == 2 else "memory.limit_in_bytes"
        mem_candidates.append((cg_mem[0], f"cgroup v{cg_mem[1].version} {name} ({cg_mem[1].path})"))
        if cg_mem[0] < host_mem:
            memory_cgroup = cg_mem[1]
    override: tuple[int, str] | None = None
    if max_memory is not None:
        if max_memory < 1:
            raise ConfigError(f"max_memory={max_memory} must be >= 1 byte")
        override = (max_memory, "max_memory= argument (--max-memory)")
    else:
        env_mem = env_bytes("EMBEDPOOL_MAX_MEMORY", environ=env)
        if env_mem is not None:
            override = (env_mem, f"EMBEDPOOL_MAX_MEMORY={env['EMBEDPOOL_MAX_MEMORY']}")
    system_bytes, system_source = min(mem_candidates, key=lambda c: c[0])
    memory_bytes, memory_source = system_bytes, system_source
    pool_bytes: int | None = None
    if override is not None:
        if override[0] < system_bytes:
            pool_bytes = memory_bytes = override[0]
            memory_source = f"{override[1]}, counted against the pool's own RSS"
        elif override[0] > system_bytes:
            notes.append(f"{override[1]} ignored: above the {_fmt_bytes(system_bytes)} of "
                         f"{system_source}")

    # -- profile
    if profile is not None:
        chosen: Profile = _as_profile(profile, "profile")
        profile_source = "profile= argument (--profile)"
    else:
        env_profile = env_str("EMBEDPOOL_PROFILE", None, choices=PROFILES, environ=env)
        if env_profile is not None:
            chosen = _as_profile(env_profile, "EMBEDPOOL_PROFILE")
            profile_source = f"EMBEDPOOL_PROFILE={env_profile}"
        else:
            chosen, profile_source = _detect_profile(root, env)

    return Limits(cpus=n_cpus, cpus_source=cpus_source, memory_bytes=memory_bytes,
                  memory_source=memory_source, profile=chosen, profile_source=profile_source,
                  host_cpus=host_cpus, host_memory_bytes=host_mem, cpu_ids=cpu_ids,
                  memory_cgroup=memory_cgroup, cpu_cgroup=cpu_cgroup,
                  system_memory_bytes=system_bytes, system_memory_source=system_source,
                  pool_memory_bytes=pool_bytes,
                  notes=tuple(notes), root=root)


def _as_profile(value: str, name: str) -> Profile:
    for p in PROFILES:
        if value == p:
            return p
    raise ConfigError(f"{name}={value!r} is not one of {', '.join(PROFILES)}")


def cgroup_memory_used(cgroup: Cgroup) -> int | None:
    """A cgroup's usage minus its inactive file cache (what the kernel reclaims before it
    OOM-kills, and what ``docker stats`` and the kubelet subtract too)."""
    current = _int_file(cgroup.path / ("memory.current" if cgroup.version == 2
                                       else "memory.usage_in_bytes"))
    if current is None:
        return None
    stat: dict[str, int] = {}
    for line in (_read(cgroup.path / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    inactive = stat.get("inactive_file" if cgroup.version == 2 else "total_inactive_file",
                        stat.get("inactive_file", 0))
    return max(0, current - inactive)


def memory_used(limits: Limits) -> int:
    """Bytes in use against ``limits.real_memory_bytes``, by every program in its scope (see
    the module docstring)."""
    if limits.memory_cgroup is not None:
        used = cgroup_memory_used(limits.memory_cgroup)
        if used is not None:
            return used
    info = _meminfo(limits.root)
    if "MemTotal" in info and "MemAvailable" in info:
        return max(0, info["MemTotal"] - info["MemAvailable"])
    vm = psutil.virtual_memory()
    return int(vm.total - vm.available)


MemScope = Literal["machine", "pool"]


def memory_in_scope(limits: Limits, used: int, pool_used: int) -> tuple[int, int, MemScope]:
    """(used, limit, scope) of the memory limit that binds hardest: total ``used`` against the
    real limit, or, under an override, the pool's own ``pool_used`` against it, whichever is
    the larger fraction."""
    real: tuple[int, int, MemScope] = (used, limits.real_memory_bytes, "machine")
    if limits.pool_memory_bytes is None:
        return real
    pool: tuple[int, int, MemScope] = (pool_used, limits.pool_memory_bytes, "pool")
    return max(real, pool, key=lambda r: r[0] / r[1])


def own_rss() -> int:
    """RSS of this process (the supervisor), in bytes."""
    return int(psutil.Process().memory_info().rss)


def sample(pids: Sequence[int]) -> dict[int, int]:
    """RSS in bytes per pid; pids that are gone (or not ours to read) are left out."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            out[pid] = int(psutil.Process(pid).memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


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
            if cg.version == 1:
                ns = _int_file(cg.path / "cpuacct.usage")
                if ns is not None:
                    return ns / 1e9
            else:
                for line in (_read(cg.path / "cpu.stat") or "").splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec" and value.strip().isdigit():
                        return int(value) / 1e6
        per_cpu = psutil.cpu_times(percpu=True)
        ids = [i for i in self.limits.cpu_ids if i < len(per_cpu)] or list(range(len(per_cpu)))
        busy = 0.0
        for i in ids:
            t = per_cpu[i]
            busy += float(t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0)
                          + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0))
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
        reading = Reading(ts=now, cpu_percent=max(0.0, cpu), mem_used=used, mem_limit=limit,
                          mem_scope=scope,
                          worker_rss=tuple(rss[p] for p in pids if p in rss),
                          queue_depth=queue_depth, workers=len(rss),
                          throughput=max(0.0, throughput), pool_cpu_percent=pool_cpu)
        self._last_ts, self._last_wall, self._last_done, self._last_busy = now, wall, done_count, busy
        return reading


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return float(t.user + t.system)


def _fmt_ids(ids: Sequence[int]) -> str:
    return ",".join(map(str, ids)) if len(ids) <= 8 else f"{ids[0]}..{ids[-1]} ({len(ids)})"


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
