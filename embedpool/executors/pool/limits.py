"""What this machine allows: usable CPUs, memory and the profile, read once at start.

Every limit is the **minimum of every source** (loky's rule, and cpython #80235: neither
``os.cpu_count()`` nor the host's MemTotal knows about cgroups)::

    cpus   = min(host CPUs online, sched affinity, cgroup CPU quota (ceil), EMBEDPOOL_CPUS / cpus=)
    memory = min(host MemTotal, cgroup memory limit (v1 or v2, every ancestor), EMBEDPOOL_MAX_MEMORY
                 / max_memory=)

An override can only *lower* a limit; one above the hardware is ignored and says so in
``Limits.notes``. Each limit records its source, which ``embedpool doctor`` prints.

All reads go through files under ``root`` (``/proc/self/cgroup``, ``/proc/self/mountinfo``,
``/proc/self/status``, ``/proc/meminfo``, ``/sys/devices/system/cpu/online``, the cgroup
files (``cgroups``), ``/sys/class/dmi/id``), so tests point ``root`` at a fake tree in
``tmp_path``.

The profile (``cloud`` | ``local`` | ``wsl2``) is ``profile=`` or ``EMBEDPOOL_PROFILE`` if
given, else ``wsl2`` when the kernel release says Microsoft/WSL, else ``cloud`` on a container,
Kubernetes or cloud-VM signal, else ``local``. ``plan.plan()`` turns it into numbers.

Live readings (memory in use, RSS, CPU shares) are ``readings``; the types are ``machine``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from embedpool.config import env_bytes, env_int, env_str, format_bytes
from embedpool.errors import ConfigError
from embedpool.executors.pool import cgroups
from embedpool.executors.pool.cgroups import read_text
from embedpool.executors.pool.machine import PROFILES, Cgroup, Limits
from embedpool.types import Profile

#: Substrings of a cgroup path that mean a container runtime placed us there.
_CONTAINER_CGROUP_MARKS = (
    "docker",
    "kubepods",
    "containerd",
    "libpod",
    "crio",
    "ecs",
    "lxc",
    "garden",
    "actions_job",
)
#: DMI values (lower case) that name a cloud VM. Hyper-V's "Virtual Machine" alone is not one:
#: a local Hyper-V guest says the same; Azure adds the "7783-7084-3265-9085-8269-3286-77"
#: chassis asset tag, which we check instead.
_CLOUD_DMI = {
    "sys_vendor": (
        "amazon ec2",
        "google",
        "digitalocean",
        "hetzner",
        "openstack",
        "alibaba cloud",
        "tencent cloud",
        "scaleway",
        "linode",
        "vultr",
        "exoscale",
        "oraclecloud",
    ),
    "product_name": (
        "google compute engine",
        "openstack",
        "hvm domu",
        "droplet",
        "alibaba cloud ecs",
        "cvm",
        "kvm (oci)",
    ),
    "bios_vendor": ("amazon ec2", "google", "hetzner"),
    "chassis_asset_tag": ("7783-7084-3265-9085-8269-3286-77", "oraclecloud.com"),
    "board_vendor": ("amazon ec2", "google"),
}


# ---------------------------------------------------------------------------------------------
# small readers, each of one file


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
    text = read_text(root / "sys/devices/system/cpu/online")
    if text and text.strip():
        return len(parse_cpu_list(text)), "host CPUs online"
    return max(1, os.cpu_count() or 1), "os.cpu_count()"


def _affinity(root: Path) -> tuple[int, ...] | None:
    text = read_text(root / "proc/self/status")
    for line in (text or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    if root == Path("/") and hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return None


def meminfo(root: Path) -> dict[str, int]:
    """/proc/meminfo as bytes."""
    out: dict[str, int] = {}
    for line in (read_text(root / "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _host_memory(root: Path) -> int:
    total = meminfo(root).get("MemTotal")
    if total:
        return total
    import psutil  # no /proc/meminfo: not Linux

    return int(psutil.virtual_memory().total)


# ---------------------------------------------------------------------------------------------
# the profile


def _detect_profile(root: Path, environ: Mapping[str, str]) -> tuple[Profile, str]:
    release = (read_text(root / "proc/sys/kernel/osrelease") or "").strip()
    if "microsoft" in release.lower() or "wsl" in release.lower():
        return "wsl2", f"kernel release {release!r} names WSL"
    for marker in (".dockerenv", "run/.containerenv"):
        if (root / marker).exists():
            return "cloud", f"container: /{marker} exists"
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return "cloud", "Kubernetes: KUBERNETES_SERVICE_HOST is set"
    for line in (read_text(root / "proc/self/cgroup") or "").splitlines():
        path = line.split(":", 2)[-1]
        low = path.lower()
        for mark in _CONTAINER_CGROUP_MARKS:
            if mark in low:
                return "cloud", f"container: cgroup path {path!r} contains {mark!r}"
    dmi = root / "sys/class/dmi/id"
    for name, needles in _CLOUD_DMI.items():
        value = (read_text(dmi / name) or "").strip()
        low = value.lower()
        if low and any(n in low for n in needles):
            return "cloud", f"cloud VM: DMI {name} {value!r}"
    return "local", "no WSL, container, Kubernetes or cloud-VM signal"


# ---------------------------------------------------------------------------------------------
# the public entry points


def detect_limits(
    *,
    max_memory: int | None = None,
    profile: str | None = None,
    cpus: int | None = None,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
) -> Limits:
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
    quota = cgroups.cpu_quota(root)
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
        cpu_cgroup = cgroups.cpu_usage_cgroup(root, quota[1])

    # -- memory
    host_mem = _host_memory(root)
    mem_candidates: list[tuple[int, str]] = [(host_mem, "host MemTotal")]
    cg_mem = cgroups.memory_limit(root)
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
            notes.append(
                f"{override[1]} ignored: above the {format_bytes(system_bytes)} of {system_source}"
            )

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

    return Limits(
        cpus=n_cpus,
        cpus_source=cpus_source,
        memory_bytes=memory_bytes,
        memory_source=memory_source,
        profile=chosen,
        profile_source=profile_source,
        host_cpus=host_cpus,
        host_memory_bytes=host_mem,
        cpu_ids=cpu_ids,
        memory_cgroup=memory_cgroup,
        cpu_cgroup=cpu_cgroup,
        system_memory_bytes=system_bytes,
        system_memory_source=system_source,
        pool_memory_bytes=pool_bytes,
        notes=tuple(notes),
        root=root,
    )


def _as_profile(value: str, name: str) -> Profile:
    for p in PROFILES:
        if value == p:
            return p
    raise ConfigError(f"{name}={value!r} is not one of {', '.join(PROFILES)}")


def _fmt_ids(ids: Sequence[int]) -> str:
    return ",".join(map(str, ids)) if len(ids) <= 8 else f"{ids[0]}..{ids[-1]} ({len(ids)})"
