"""Reading cgroups (v1 and v2): limits, usage, and the OOM killer's counter.

The cgroup directory of a process is found the way the JDK does it: its path from
``/proc/<pid>/cgroup``, made relative to the mount's root from ``/proc/self/mountinfo``
(which is "/" inside a cgroup namespace), then every directory up to the mount point is read,
because a limit on an ancestor binds just as hard. All reads go through files under ``root``,
so tests point it at a fake tree.

``OomEvidence`` is how a SIGKILL is known to be the OOM killer's: the kernel counts every OOM
kill in the victim's memory cgroup (v1 ``memory.oom_control`` and v2 ``memory.events``,
``oom_kill``) *before* it sends the SIGKILL ("raise event before sending signal", mm/oom_kill.c),
so when a worker's death is handled, a rise of its cgroup's counter is already visible.
Where no cgroup counter is readable (the root cgroup), the host-wide ``/proc/vmstat``
``oom_kill`` counter stands in. ``faults.attribute_sigkill`` does the bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from embedpool import faults
from embedpool.executors.pool.machine import Cgroup

#: cgroup v1 reports "no limit" as a page-rounded 2**63-1 (9223372036854771712); anything at
#: or above 2**60 bytes (an exabyte) is no limit, whatever the page size.
NO_LIMIT = 1 << 60


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    """A file holding one integer; None when missing, unreadable, "max" or not a number."""
    text = read_text(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


@dataclass(frozen=True)
class _Mount:
    version: Literal[1, 2]
    root: str  # the mount's root inside the hierarchy ("/" in a cgroup namespace)
    point: str  # where it is mounted
    controllers: frozenset[str]


def _mounts(root: Path) -> list[_Mount]:
    mounts: list[_Mount] = []
    for line in (read_text(root / "proc/self/mountinfo") or "").splitlines():
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


def proc_cgroups(root: Path, pid: int | str = "self") -> tuple[str | None, dict[str, str]]:
    """(v2 path, {v1 controller: path}) from /proc/<pid>/cgroup."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in (read_text(root / f"proc/{pid}/cgroup") or "").splitlines():
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
        rel = path[len(mount.root) :]
    elif mount.root not in ("/", ""):
        rel = "/"  # our cgroup is outside the mount's view: the mount point is the best we have
    return under(root, mount.point) / rel.lstrip("/")


def _ancestors(directory: Path, stop: Path) -> list[Path]:
    """``directory`` and every parent up to and including the mount point ``stop``."""
    out = [directory]
    while directory != stop and stop in directory.parents:
        directory = directory.parent
        out.append(directory)
    return out


def cgroup_dirs(
    root: Path, controller: str, pid: int | str = "self"
) -> list[tuple[Literal[1, 2], Path, Path]]:
    """(version, own directory, mount point) for every hierarchy that may hold ``controller``
    for process ``pid``."""
    v2_path, v1_paths = proc_cgroups(root, pid)
    found: list[tuple[Literal[1, 2], Path, Path]] = []
    for m in _mounts(root):
        if m.version == 2 and v2_path is not None:
            found.append((2, _cgroup_dir(root, m, v2_path), under(root, m.point)))
        elif m.version == 1 and controller in m.controllers and controller in v1_paths:
            found.append((1, _cgroup_dir(root, m, v1_paths[controller]), under(root, m.point)))
    return found


def memory_limit(root: Path) -> tuple[int, Cgroup] | None:
    """The tightest memory limit over every ancestor, with the cgroup that sets it."""
    best: tuple[int, Cgroup] | None = None
    for version, own, stop in cgroup_dirs(root, "memory"):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        for d in _ancestors(own, stop):
            value = read_int(d / name)
            if value is None or value <= 0 or value >= NO_LIMIT:
                continue
            if best is None or value < best[0]:
                best = (value, Cgroup(version, d))
    return best


def cpu_quota(root: Path) -> tuple[int, Cgroup, str] | None:
    """The tightest CPU quota in whole CPUs (ceil), with its cgroup and a description."""
    best: tuple[int, Cgroup, str] | None = None
    for version, own, stop in cgroup_dirs(root, "cpu"):
        for d in _ancestors(own, stop):
            if version == 2:
                text = (read_text(d / "cpu.max") or "").split()
                if len(text) != 2 or text[0] == "max":
                    continue
                quota, period = int(text[0]), int(text[1])
                what = f"cgroup v2 cpu.max {quota} {period}"
            else:
                q, p = read_int(d / "cpu.cfs_quota_us"), read_int(d / "cpu.cfs_period_us")
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


def cpu_usage_cgroup(root: Path, quota_cgroup: Cgroup) -> Cgroup | None:
    """Where to read the CPU time used under a binding quota: v2 ``cpu.stat`` beside the
    quota; v1 ``cpuacct.usage`` in the same directory when cpu and cpuacct are co-mounted
    (the usual ``cpu,cpuacct``), else in our own cpuacct cgroup."""
    if quota_cgroup.version == 2:
        return quota_cgroup if (quota_cgroup.path / "cpu.stat").is_file() else None
    if (quota_cgroup.path / "cpuacct.usage").is_file():
        return quota_cgroup
    for version, own, _ in cgroup_dirs(root, "cpuacct"):
        if version == 1 and (own / "cpuacct.usage").is_file():
            return Cgroup(1, own)
    return None


def cpu_seconds(cgroup: Cgroup) -> float | None:
    """CPU-seconds used so far by everything in ``cgroup`` (v1 cpuacct.usage, v2 cpu.stat)."""
    if cgroup.version == 1:
        ns = read_int(cgroup.path / "cpuacct.usage")
        return None if ns is None else ns / 1e9
    for line in (read_text(cgroup.path / "cpu.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value) / 1e6
    return None


def memory_used(cgroup: Cgroup) -> int | None:
    """A cgroup's usage minus its inactive file cache (what the kernel reclaims before it
    OOM-kills, and what ``docker stats`` and the kubelet subtract too)."""
    current = read_int(
        cgroup.path / ("memory.current" if cgroup.version == 2 else "memory.usage_in_bytes")
    )
    if current is None:
        return None
    stat: dict[str, int] = {}
    for line in (read_text(cgroup.path / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    inactive = stat.get(
        "inactive_file" if cgroup.version == 2 else "total_inactive_file",
        stat.get("inactive_file", 0),
    )
    return max(0, current - inactive)


# --- the OOM killer's counter ---------------------------------------------------------------


def oom_kill_counter(root: Path, pid: int | str = "self") -> Path:
    """The file whose ``oom_kill`` line counts OOM kills in ``pid``'s memory cgroup: v1
    ``memory.oom_control``, v2 ``memory.events``; ``/proc/vmstat`` (host-wide) where the
    process's cgroup has none (the root cgroup, or no memory controller)."""
    for version, own, _ in cgroup_dirs(root, "memory", pid):
        path = own / ("memory.events" if version == 2 else "memory.oom_control")
        if read_oom_kills(path) is not None:
            return path
    return root / "proc/vmstat"


def read_oom_kills(path: Path) -> int | None:
    """The ``oom_kill`` count in one of the files ``oom_kill_counter`` names."""
    for line in (read_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


class OomEvidence:
    """Ties the SIGKILL deaths of workers to the OOM killer, through the ``oom_kill`` counter
    of each worker's memory cgroup (see the module docstring).

    ``watch(worker, pid)`` when a worker is ready (its cgroup is read while it lives; the
    first worker seen in a cgroup sets the baseline); ``confirm(worker)`` when it died of a
    SIGKILL: (whether the counter rose, the evidence in words). A rise is used up by one death.
    Limits: an OOM kill of another process in the same cgroup (not one of our workers) leaves
    a rise that the next SIGKILL death is credited with."""

    def __init__(self, root: Path = Path("/")) -> None:
        self._root = root
        self._files: dict[object, Path] = {}
        self._credited: dict[Path, int | None] = {}

    def watch(self, worker: object, pid: int) -> None:
        path = oom_kill_counter(self._root, pid)
        self._files[worker] = path
        if path not in self._credited:
            self._credited[path] = read_oom_kills(path)

    def forget(self, worker: object) -> None:
        self._files.pop(worker, None)

    def confirm(self, worker: object) -> tuple[bool, str]:
        path = self._files.pop(worker, None)
        if path is None:
            return False, "no oom_kill counter was known for it"
        now = read_oom_kills(path)
        before = self._credited.get(path)
        confirmed, self._credited[path] = faults.attribute_sigkill(before, now)
        if now is None:
            return False, f"{path} is not readable"
        verb = "rose" if confirmed else "did not rise"
        return confirmed, f"oom_kill in {path} {verb}: {before} -> {now}"
