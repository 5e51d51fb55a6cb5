"""Test helper: a child memory cgroup of this process's own, so the kernel's OOM killer is real.

Works on cgroup v1 (``memory`` hierarchy) and v2 (unified), found through
``/proc/self/cgroup`` and ``/proc/self/mountinfo``::

    reason = unavailable_reason()            # None, or why no child cgroup can be made here
    with memory_cgroup(64 * MiB) as cg:      # creates <own cgroup>/embedpool-test-<pid>-<n>
        argv = cg.wrap([sys.executable, "-c", "..."])   # the command joins the cgroup, then execs
        proc = subprocess.Popen(argv)
        ...
        cg.oom_kills()                       # v1 memory.oom_control / v2 memory.events oom_kill
    # on exit: processes still inside are SIGKILLed (they were started by the test), the
    # directory is removed

Why a wrapper rather than moving a pid after ``Popen``: the process is charged from its first
page, and nothing it spawns (spawn/forkserver workers) can escape the limit before the move.
``add_pid()`` is there for a process that already runs.

v2 caveat: a cgroup with processes cannot give the memory controller to children (the
"no internal processes" rule), so unless ``memory`` is already in our cgroup's
``cgroup.subtree_control`` (a delegated cgroup, e.g. ``systemd-run --user --scope -p
Delegate=yes pytest``), ``unavailable_reason()`` says so; the ``cgroup``-marked tests then
skip locally and fail under CI=true (tests/ci_rules.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MiB = 1024 * 1024
_counter = itertools.count()


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup here; the message says why (ci_rules reports it)."""


def _mount_points() -> list[tuple[str, str, str, str]]:
    """(fstype, mount root, mount point, super options) of every cgroup mount."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) >= 5 and len(after) >= 3 and after[0] in ("cgroup", "cgroup2"):
            out.append((after[0], fields[3], fields[4].replace("\\040", " "), after[2]))
    return out


def own_memory_cgroup() -> tuple[Literal[1, 2], Path]:
    """(version, directory) of this process's memory cgroup; v1's memory hierarchy is
    preferred where both exist (hybrid hosts mount an empty v2 beside it)."""
    v2_path: str | None = None
    v1_path: str | None = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    mounts = _mount_points()
    if v1_path is not None:
        for fstype, root, point, opts in mounts:
            if fstype == "cgroup" and "memory" in opts.split(","):
                return 1, _join(point, root, v1_path)
    if v2_path is not None:
        for fstype, root, point, _ in mounts:
            if fstype == "cgroup2":
                directory = _join(point, root, v2_path)
                if (directory / "cgroup.controllers").is_file() and "memory" in (
                    directory / "cgroup.controllers"
                ).read_text().split():
                    return 2, directory
    raise CgroupUnavailable(
        "no memory cgroup controller is mounted (checked /proc/self/cgroup "
        "and /proc/self/mountinfo)"
    )


def _join(point: str, root: str, path: str) -> Path:
    if root not in ("/", "") and path.startswith(root):
        path = path[len(root) :]
    return Path(point) / path.lstrip("/")


@dataclass
class MemoryCgroup:
    """One child memory cgroup made by a test."""

    version: Literal[1, 2]
    path: Path

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def set_limit(self, limit_bytes: int) -> None:
        """Hard memory limit, with swap closed so the kernel kills rather than swaps."""
        if self.version == 1:
            self._write("memory.limit_in_bytes", str(limit_bytes))
            with contextlib.suppress(OSError):  # no swap accounting on this kernel
                self._write("memory.memsw.limit_in_bytes", str(limit_bytes))
            with contextlib.suppress(OSError):
                self._write("memory.swappiness", "0")
        else:
            self._write("memory.max", str(limit_bytes))
            with contextlib.suppress(OSError):
                self._write("memory.swap.max", "0")

    def limit(self) -> int | None:
        text = self._read("memory.limit_in_bytes" if self.version == 1 else "memory.max").strip()
        value = None if text == "max" else int(text)
        return None if value is None or value >= 1 << 60 else value

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def add_pid(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        return [int(x) for x in self._read("cgroup.procs").split()]

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run through ``/bin/sh`` that first moves itself into this cgroup, then
        ``exec``s: the command and everything it spawns start inside the limit."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs_file), *argv]

    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current"))

    def events(self) -> dict[str, int]:
        """Counters, the same names on both versions: ``oom_kill`` (processes the OOM killer
        killed here), ``oom`` (times the limit was hit with nothing reclaimable; v2 only,
        v1 reports under_oom as a state), ``max`` (times usage hit the limit: v1
        memory.failcnt, v2 memory.events max)."""
        out: dict[str, int] = {}
        if self.version == 1:
            for line in self._read("memory.oom_control").splitlines():
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    out[key] = int(value)
            out["max"] = int(self._read("memory.failcnt"))
        else:
            for line in self._read("memory.events").splitlines():
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    out[key] = int(value)
        out.setdefault("oom_kill", 0)
        return out

    def oom_kills(self) -> int:
        return self.events()["oom_kill"]

    def kill_all(self, timeout_s: float = 10.0) -> None:
        """SIGKILL every process still inside (all started by the test) and wait until the
        cgroup is empty; a process that will not go raises with its pid."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {pids} still in {self.path} after {timeout_s} s")
            time.sleep(0.02)

    def remove(self, timeout_s: float = 10.0) -> None:
        """Kill what is left, then remove the directory (retrying while the kernel finishes
        tearing the dead processes down)."""
        self.kill_all(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def create_child(limit_bytes: int | None = None, *, name: str | None = None) -> MemoryCgroup:
    """A new child of this process's memory cgroup, with ``limit_bytes`` if given."""
    version, parent = own_memory_cgroup()
    if version == 2:
        control = parent / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            try:
                control.write_text("+memory")
            except OSError as exc:
                raise CgroupUnavailable(
                    f"cgroup v2 {parent}: memory is not delegated to children and cannot be "
                    f"({exc.strerror}; a cgroup with processes cannot enable it). Run the "
                    "tests in a delegated cgroup, e.g. systemd-run --user --scope -p "
                    "Delegate=yes pytest"
                ) from exc
    path = parent / (name or f"embedpool-test-{os.getpid()}-{next(_counter)}")
    try:
        path.mkdir()
    except OSError as exc:
        raise CgroupUnavailable(
            f"cannot create a child cgroup in {parent}: {exc.strerror or exc}"
        ) from exc
    cg = MemoryCgroup(version, path)
    if limit_bytes is not None:
        try:
            cg.set_limit(limit_bytes)
        except OSError as exc:
            cg.remove()
            raise CgroupUnavailable(
                f"cannot set a memory limit in {path}: {exc.strerror or exc}"
            ) from exc
    return cg


def unavailable_reason() -> str | None:
    """None when a limited child cgroup can be made and removed here, else why not."""
    try:
        cg = create_child(64 * MiB)
    except (CgroupUnavailable, OSError) as exc:
        return str(exc)
    cg.remove()
    return None


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[MemoryCgroup]:
    """A limited child cgroup for the ``with`` block; emptied and removed afterwards."""
    cg = create_child(limit_bytes)
    try:
        yield cg
    finally:
        cg.remove()
