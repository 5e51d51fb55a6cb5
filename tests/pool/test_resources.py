"""detect_limits() over fake /proc + /sys trees (cgroup v1, v2, none; quotas; affinity;
overrides; profiles), memory_used() per scope, and the live readers on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from embedpool.errors import ConfigError
from embedpool.pool.resources import (
    Cgroup,
    Limits,
    Sampler,
    detect_limits,
    memory_in_scope,
    memory_used,
    parse_cpu_list,
    sample,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
HOST_MEM = 16 * GiB
V1_UNLIMITED = "9223372036854771712"


@dataclass
class Tree:
    """A fake machine: what /proc and /sys say. Cgroup files are {relative dir: {file: text}}
    under the cgroup mount point."""

    online: str = "0-7"
    affinity: str | None = "0-7"
    memtotal_kb: int = HOST_MEM // 1024
    memavail_kb: int = 12 * GiB // 1024
    osrelease: str = "6.8.0-45-generic"
    version: int | None = None        # cgroup version: None = no cgroup mounts
    own: str = "/user.slice/session-1.scope"   # our path in /proc/self/cgroup
    mount_root: str = "/"             # the mount's root (mountinfo field 4)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    markers: tuple[str, ...] = ()     # e.g. ".dockerenv"
    dmi: dict[str, str] = field(default_factory=dict)

    def build(self, root: Path) -> Path:
        def put(rel: str, text: str) -> None:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)

        put("sys/devices/system/cpu/online", self.online + "\n")
        status = "Name:\tpython\n"
        if self.affinity is not None:
            status += f"Cpus_allowed:\tff\nCpus_allowed_list:\t{self.affinity}\n"
        put("proc/self/status", status)
        put("proc/meminfo", f"MemTotal:       {self.memtotal_kb} kB\nMemFree:  1000 kB\n"
                            f"MemAvailable:   {self.memavail_kb} kB\n")
        put("proc/sys/kernel/osrelease", self.osrelease + "\n")
        mountinfo = ["22 1 259:2 / / rw,relatime - ext4 /dev/root rw"]
        if self.version == 2:
            put("proc/self/cgroup", f"0::{self.own}\n")
            mountinfo.append(f"30 22 0:26 {self.mount_root} /sys/fs/cgroup rw,nosuid - cgroup2 "
                             "cgroup2 rw,nsdelegate")
            base = "sys/fs/cgroup"
        elif self.version == 1:
            put("proc/self/cgroup", f"5:memory:{self.own}\n3:cpu,cpuacct:{self.own}\n"
                                    f"1:name=systemd:{self.own}\n0::/\n")
            mountinfo.append(f"33 31 0:29 {self.mount_root} /sys/fs/cgroup/memory rw - cgroup "
                             "cgroup rw,memory")
            mountinfo.append(f"34 31 0:30 {self.mount_root} /sys/fs/cgroup/cpu,cpuacct rw - "
                             "cgroup cgroup rw,cpu,cpuacct")
            base = "sys/fs/cgroup"
        else:
            put("proc/self/cgroup", "0::/\n")
            base = "sys/fs/cgroup"
        put("proc/self/mountinfo", "\n".join(mountinfo) + "\n")
        for rel_dir, entries in self.files.items():
            for name, text in entries.items():
                put(f"{base}/{rel_dir.strip('/')}/{name}".replace("//", "/"), text + "\n")
        for marker in self.markers:
            put(marker, "")
        for name, text in self.dmi.items():
            put(f"sys/class/dmi/id/{name}", text + "\n")
        return root


OWN = "user.slice/session-1.scope"


@dataclass(frozen=True)
class LimitRow:
    tree: Tree
    cpus: int
    cpus_source: str
    memory: int
    memory_source: str
    env: Mapping[str, str] = field(default_factory=dict)
    kwargs: Mapping[str, int] = field(default_factory=dict)
    memory_cgroup: str | None = None   # expected dir of the usage cgroup, relative to the mount
    note: str | None = None


LIMIT_ROWS = [
    pytest.param(LimitRow(Tree(), 8, "host CPUs online", HOST_MEM, "host MemTotal"), id="bare-host"),
    pytest.param(LimitRow(Tree(affinity="0,2"), 2, "CPU affinity 0,2", HOST_MEM, "host MemTotal"),
                 id="affinity-2-of-8"),
    pytest.param(LimitRow(Tree(version=1, files={f"memory/{OWN}": {"memory.limit_in_bytes": str(512 * MiB)}}),
                          8, "host", 512 * MiB, "cgroup v1 memory.limit_in_bytes",
                          memory_cgroup=f"memory/{OWN}"), id="v1-memory-limit"),
    pytest.param(LimitRow(Tree(version=1, files={f"memory/{OWN}": {"memory.limit_in_bytes": V1_UNLIMITED}}),
                          8, "host", HOST_MEM, "host MemTotal"), id="v1-unlimited-is-ignored"),
    pytest.param(LimitRow(Tree(version=1, files={f"memory/{OWN}": {"memory.limit_in_bytes": str(64 * GiB)}}),
                          8, "host", HOST_MEM, "host MemTotal"), id="v1-limit-above-host"),
    pytest.param(LimitRow(Tree(version=2, files={OWN: {"memory.max": str(GiB)}}),
                          8, "host", GiB, "cgroup v2 memory.max", memory_cgroup=OWN),
                 id="v2-memory-max"),
    pytest.param(LimitRow(Tree(version=2, files={OWN: {"memory.max": "max", "cpu.max": "max 100000"}}),
                          8, "host", HOST_MEM, "host MemTotal"), id="v2-max-means-none"),
    pytest.param(LimitRow(Tree(version=2, files={OWN: {"memory.max": str(GiB)},
                                                 "user.slice": {"memory.max": str(256 * MiB)}}),
                          8, "host", 256 * MiB, "cgroup v2 memory.max", memory_cgroup="user.slice"),
                 id="v2-ancestor-limit-binds"),
    pytest.param(LimitRow(Tree(version=2, own="/", files={"": {"memory.max": str(768 * MiB),
                                                                "cpu.max": "200000 100000"}}),
                          2, "cgroup v2 cpu.max 200000 100000", 768 * MiB, "cgroup v2 memory.max",
                          memory_cgroup=""), id="v2-cgroup-namespace-root"),
    pytest.param(LimitRow(Tree(version=2, files={OWN: {"cpu.max": "150000 100000"}}),
                          2, "cgroup v2 cpu.max 150000 100000", HOST_MEM, "host"),
                 id="v2-cpu-quota-1.5-ceils-to-2"),
    pytest.param(LimitRow(Tree(version=2, files={OWN: {"cpu.max": "20000 100000"}}),
                          1, "cgroup v2 cpu.max", HOST_MEM, "host"), id="v2-cpu-quota-0.2-is-1"),
    pytest.param(LimitRow(Tree(version=1, files={f"cpu,cpuacct/{OWN}": {"cpu.cfs_quota_us": "300000",
                                                                        "cpu.cfs_period_us": "100000"}}),
                          3, "cgroup v1 cpu.cfs_quota_us/cfs_period_us 300000/100000", HOST_MEM, "host"),
                 id="v1-cfs-quota-3"),
    pytest.param(LimitRow(Tree(version=1, files={f"cpu,cpuacct/{OWN}": {"cpu.cfs_quota_us": "-1",
                                                                        "cpu.cfs_period_us": "100000"}}),
                          8, "host CPUs online", HOST_MEM, "host"), id="v1-cfs-quota-unset"),
    pytest.param(LimitRow(Tree(version=1, own="/docker/abc", mount_root="/docker/abc",
                               files={"memory": {"memory.limit_in_bytes": str(300 * MiB)}}),
                          8, "host", 300 * MiB, "cgroup v1 memory.limit_in_bytes", memory_cgroup="memory"),
                 id="v1-container-mount-root-is-own-cgroup"),
    pytest.param(LimitRow(Tree(affinity="0-3", version=2, files={OWN: {"cpu.max": "200000 100000"}}),
                          2, "cgroup v2 cpu.max", HOST_MEM, "host"), id="quota-below-affinity"),
    pytest.param(LimitRow(Tree(version=2, files={OWN: {"cpu.max": "400000 100000", "memory.max": str(GiB)}}),
                          1, "EMBEDPOOL_CPUS=1", 256 * MiB, "EMBEDPOOL_MAX_MEMORY=256M",
                          env={"EMBEDPOOL_CPUS": "1", "EMBEDPOOL_MAX_MEMORY": "256M"}, memory_cgroup=OWN),
                 id="env-overrides-beat-cgroup"),
    pytest.param(LimitRow(Tree(version=2, files={OWN: {"memory.max": str(GiB)}}),
                          8, "host", GiB, "cgroup v2 memory.max",
                          env={"EMBEDPOOL_CPUS": "64", "EMBEDPOOL_MAX_MEMORY": "8G"}, memory_cgroup=OWN,
                          note="EMBEDPOOL_MAX_MEMORY=8G ignored"), id="env-above-hardware-is-ignored"),
    pytest.param(LimitRow(Tree(), 4, "cpus= argument", 128 * MiB, "max_memory= argument",
                          env={"EMBEDPOOL_CPUS": "2", "EMBEDPOOL_MAX_MEMORY": "256M"},
                          kwargs={"cpus": 4, "max_memory": 128 * MiB}), id="kwargs-replace-env"),
]


@pytest.mark.parametrize("row", LIMIT_ROWS)
def test_detect_limits(tmp_path: Path, row: LimitRow) -> None:
    root = row.tree.build(tmp_path)
    limits = detect_limits(root=root, environ=dict(row.env), **row.kwargs)  # type: ignore[arg-type]
    assert (limits.cpus, limits.memory_bytes) == (row.cpus, row.memory)
    assert limits.cpus_source.startswith(row.cpus_source)
    assert limits.memory_source.startswith(row.memory_source)
    if row.memory_cgroup is None:
        assert limits.memory_cgroup is None
    else:
        assert limits.memory_cgroup is not None
        assert limits.memory_cgroup.path == (root / "sys/fs/cgroup" / row.memory_cgroup)
    if row.note is not None:
        assert any(row.note in n for n in limits.notes), limits.notes


@pytest.mark.parametrize(
    ("tree", "env", "kwargs", "profile", "source"),
    [pytest.param(Tree(), {}, {}, "local", "no WSL", id="plain-linux-is-local"),
     pytest.param(Tree(osrelease="5.15.153.1-microsoft-standard-WSL2"), {}, {}, "wsl2",
                  "kernel release", id="wsl2-kernel"),
     pytest.param(Tree(osrelease="4.4.0-19041-Microsoft"), {}, {}, "wsl2", "kernel release",
                  id="wsl1-style-kernel"),
     pytest.param(Tree(markers=(".dockerenv",)), {}, {}, "cloud", "container: /.dockerenv",
                  id="docker"),
     pytest.param(Tree(markers=("run/.containerenv",)), {}, {}, "cloud", "container: /run/.containerenv",
                  id="podman"),
     pytest.param(Tree(), {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, {}, "cloud", "Kubernetes",
                  id="kubernetes-env"),
     pytest.param(Tree(version=2, own="/kubepods.slice/kubepods-burstable.slice/cri-containerd-1.scope"),
                  {}, {}, "cloud", "container: cgroup path", id="kubepods-cgroup"),
     pytest.param(Tree(dmi={"sys_vendor": "Amazon EC2", "product_name": "m6i.large"}), {}, {},
                  "cloud", "cloud VM: DMI sys_vendor 'Amazon EC2'", id="aws-dmi"),
     pytest.param(Tree(dmi={"sys_vendor": "Google", "product_name": "Google Compute Engine"}), {},
                  {}, "cloud", "cloud VM", id="gce-dmi"),
     pytest.param(Tree(dmi={"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"}),
                  {}, {}, "local", "no WSL", id="hyperv-alone-is-not-cloud"),
     pytest.param(Tree(dmi={"sys_vendor": "Microsoft Corporation",
                            "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77"}), {}, {},
                  "cloud", "cloud VM", id="azure-asset-tag"),
     pytest.param(Tree(dmi={"sys_vendor": "LENOVO", "product_name": "20XW"}), {}, {}, "local",
                  "no WSL", id="laptop-dmi"),
     pytest.param(Tree(markers=(".dockerenv",)), {"EMBEDPOOL_PROFILE": "local"}, {}, "local",
                  "EMBEDPOOL_PROFILE=local", id="env-overrides-detection"),
     pytest.param(Tree(), {"EMBEDPOOL_PROFILE": "cloud"}, {"profile": "wsl2"}, "wsl2",
                  "profile= argument", id="kwarg-beats-env")])
def test_profile(tmp_path: Path, tree: Tree, env: dict[str, str], kwargs: dict[str, str],
                 profile: str, source: str) -> None:
    limits = detect_limits(root=tree.build(tmp_path), environ=env, **kwargs)  # type: ignore[arg-type]
    assert limits.profile == profile
    assert limits.profile_source.startswith(source), limits.profile_source


@pytest.mark.parametrize(
    ("env", "kwargs", "names"),
    [pytest.param({"EMBEDPOOL_CPUS": "two"}, {}, "EMBEDPOOL_CPUS='two'", id="cpus-not-int"),
     pytest.param({"EMBEDPOOL_CPUS": "0"}, {}, "EMBEDPOOL_CPUS='0'", id="cpus-zero"),
     pytest.param({"EMBEDPOOL_MAX_MEMORY": "lots"}, {}, "EMBEDPOOL_MAX_MEMORY='lots'",
                  id="memory-not-a-size"),
     pytest.param({"EMBEDPOOL_MAX_MEMORY": "-1G"}, {}, "EMBEDPOOL_MAX_MEMORY", id="memory-negative"),
     pytest.param({"EMBEDPOOL_PROFILE": "laptop"}, {}, "EMBEDPOOL_PROFILE='laptop'",
                  id="profile-unknown"),
     pytest.param({}, {"profile": "desktop"}, "profile='desktop'", id="profile-kwarg-unknown"),
     pytest.param({}, {"cpus": 0}, "cpus=0", id="cpus-kwarg-zero")])
def test_bad_override_names_it(tmp_path: Path, env: dict[str, str], kwargs: dict[str, object],
                               names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("(", r"\(")):
        detect_limits(root=Tree().build(tmp_path), environ=env, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tree", "env", "used"),
    [pytest.param(Tree(memtotal_kb=HOST_MEM // 1024, memavail_kb=12 * GiB // 1024), {}, 4 * GiB,
                  id="host-total-minus-available"),
     pytest.param(Tree(version=1, files={f"memory/{OWN}": {
         "memory.limit_in_bytes": str(GiB), "memory.usage_in_bytes": str(600 * MiB),
         "memory.stat": f"cache 1\ninactive_file 7\ntotal_inactive_file {100 * MiB}"}}), {},
                  500 * MiB, id="v1-usage-minus-total-inactive-file"),
     pytest.param(Tree(version=2, files={OWN: {
         "memory.max": str(GiB), "memory.current": str(700 * MiB),
         "memory.stat": f"anon 1\ninactive_file {200 * MiB}\nactive_file 3"}}), {},
                  500 * MiB, id="v2-current-minus-inactive-file"),
     pytest.param(Tree(version=2, files={OWN: {
         "memory.max": str(GiB), "memory.current": str(300 * MiB), "memory.stat": "anon 1"}}),
                  {"EMBEDPOOL_MAX_MEMORY": "512M"}, 300 * MiB,
                  id="override-counts-the-cgroup-usage"),
     pytest.param(Tree(memavail_kb=15 * GiB // 1024), {"EMBEDPOOL_MAX_MEMORY": "2G"}, GiB,
                  id="override-counts-the-host-usage")])
def test_memory_used(tmp_path: Path, tree: Tree, env: dict[str, str], used: int) -> None:
    limits = detect_limits(root=tree.build(tmp_path), environ=env)
    assert memory_used(limits) == used


@pytest.mark.parametrize(
    ("env", "system", "pool_cap", "note"),
    [pytest.param({"EMBEDPOOL_MAX_MEMORY": "512M"}, GiB, 512 * MiB, None, id="override-below-cgroup"),
     pytest.param({"EMBEDPOOL_MAX_MEMORY": "4G"}, GiB, None, "ignored", id="override-above-cgroup"),
     pytest.param({}, GiB, None, None, id="no-override")])
def test_override_is_a_pool_cap_beside_the_real_limit(
        tmp_path: Path, env: dict[str, str], system: int, pool_cap: int | None,
        note: str | None) -> None:
    tree = Tree(version=2, files={OWN: {"memory.max": str(GiB)}})
    limits = detect_limits(root=tree.build(tmp_path), environ=env)
    assert limits.real_memory_bytes == system
    assert limits.real_memory_source.startswith("cgroup v2 memory.max")
    assert limits.pool_memory_bytes == pool_cap
    assert limits.memory_bytes == (pool_cap or system)
    assert (note is None) == (not limits.notes)


@pytest.mark.parametrize(
    ("cap", "used", "pool_used", "expected"),
    [pytest.param(None, 600 * MiB, 100 * MiB, (600 * MiB, GiB, "machine"), id="no-cap-total-usage"),
     # 900 MiB of 1 GiB used (88%) is not read as 350% of a 256M cap: the cap counts the
     # pool's 100 MiB (39%); the machine's 88% is the larger fraction and binds
     pytest.param(256 * MiB, 900 * MiB, 100 * MiB, (900 * MiB, GiB, "machine"),
                  id="cap-machine-fuller-than-pool"),
     pytest.param(256 * MiB, 300 * MiB, 200 * MiB, (200 * MiB, 256 * MiB, "pool"),
                  id="cap-pool-fuller-than-machine"),
     pytest.param(512 * MiB, 800 * MiB, 50 * MiB, (800 * MiB, GiB, "machine"),
                  id="cap-real-limit-still-counts-everyone")])
def test_memory_in_scope(cap: int | None, used: int, pool_used: int,
                         expected: tuple[int, int, str]) -> None:
    limits = Limits(cpus=2, cpus_source="t", memory_bytes=cap or GiB, memory_source="t",
                    profile="local", profile_source="t", system_memory_bytes=GiB,
                    system_memory_source="t", pool_memory_bytes=cap)
    assert memory_in_scope(limits, used, pool_used) == expected


def test_max_memory_below_host_usage_reads_the_pool_not_the_host() -> None:
    """Regression: --max-memory 256M on this shared machine (GBs in use by others) used to
    read as several hundred percent used; now the pool's own RSS counts against it."""
    # The cap sits 256 MiB above this process's own RSS (which depends on what the test
    # session loaded before), far below what the whole machine uses.
    cap = psutil.Process().memory_info().rss // MiB * MiB + 256 * MiB
    limits = detect_limits(environ={"EMBEDPOOL_MAX_MEMORY": str(cap)})
    assert limits.pool_memory_bytes == cap
    reading = Sampler(limits).read([], 0, 0)
    machine = memory_used(limits) / limits.real_memory_bytes
    assert reading.mem_fraction < 1.0
    assert reading.mem_fraction >= machine - 0.05  # the max of both (the host may move a bit)
    if reading.mem_scope == "pool":
        own = psutil.Process().memory_info().rss
        assert reading.mem_limit == cap
        assert abs(reading.mem_used - own) < 64 * MiB


@pytest.mark.parametrize(("text", "ids"), [
    pytest.param("0-3", (0, 1, 2, 3), id="range"),
    pytest.param("0,2,4-5\n", (0, 2, 4, 5), id="mixed"),
    pytest.param("7", (7,), id="single")])
def test_parse_cpu_list(text: str, ids: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == ids


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ConfigError, match="profile"):
        Limits(1, "x", 1, "x", "desktop", "x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="positive"):
        Limits(0, "x", 1, "x", "local", "x")


# -- this machine, for real -------------------------------------------------------------------


def test_real_machine_limits_are_within_the_host() -> None:
    limits = detect_limits(environ={})
    assert 1 <= limits.cpus <= (os.cpu_count() or 1)
    assert limits.cpus <= len(os.sched_getaffinity(0))
    assert 0 < limits.memory_bytes <= limits.host_memory_bytes
    assert 0 < memory_used(limits) < limits.host_memory_bytes
    capped = detect_limits(environ={"EMBEDPOOL_CPUS": "1", "EMBEDPOOL_MAX_MEMORY": "100M"})
    assert (capped.cpus, capped.memory_bytes) == (1, 100 * MiB)


def _busy_child() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time\nx = bytearray(8 << 20)\n"
                             "end = time.monotonic() + 60\nwhile time.monotonic() < end: pass"])


def test_sample_rss_skips_vanished_pids() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    rss = sample([os.getpid(), gone.pid])
    assert set(rss) == {os.getpid()}
    assert rss[os.getpid()] > 10 * MiB


def test_sampler_counts_workers_cpu_and_throughput() -> None:
    limits = detect_limits(environ={})
    child = _busy_child()
    try:
        sampler = Sampler(limits)
        deadline = time.monotonic() + 60
        reading = sampler.read([child.pid], queue_depth=3, done_count=0)
        # Poll until the busy child has been seen using CPU over an interval (the machine may
        # be shared, so no amount is asserted, only that it is counted as ours).
        done = 0
        while reading.pool_cpu_percent <= 0 or reading.throughput <= 0:
            assert time.monotonic() < deadline, reading
            time.sleep(0.1)
            done += 10
            reading = sampler.read([child.pid], queue_depth=3, done_count=done)
        assert reading.workers == 1 and len(reading.worker_rss) == 1
        assert reading.worker_rss[0] > 8 * MiB
        assert 0 <= reading.pool_cpu_percent <= 100 and 0 <= reading.cpu_percent <= 100
        assert reading.foreign_cpu_percent == max(0.0, reading.cpu_percent - reading.pool_cpu_percent)
        assert reading.mem_limit == limits.memory_bytes and reading.queue_depth == 3
    finally:
        child.kill()
        child.wait(timeout=60)
    after = sampler.read([child.pid], queue_depth=0, done_count=done)
    assert after.workers == 0 and after.worker_rss == ()


def test_sampler_reads_cgroup_cpu_usage(tmp_path: Path) -> None:
    """Under a binding v1 quota the busy share comes from cpuacct.usage deltas."""
    tree = Tree(version=1, files={f"cpu,cpuacct/{OWN}": {
        "cpu.cfs_quota_us": "100000", "cpu.cfs_period_us": "100000", "cpuacct.usage": "0"}})
    root = tree.build(tmp_path)
    limits = detect_limits(root=root, environ={})
    assert limits.cpu_cgroup == Cgroup(1, root / "sys/fs/cgroup/cpu,cpuacct" / OWN)
    sampler = Sampler(limits)
    usage = root / "sys/fs/cgroup/cpu,cpuacct" / OWN / "cpuacct.usage"
    usage.write_text(str(10**12))  # far more than the interval: capped at 100%
    assert sampler.read([], 0, 0).cpu_percent == 100.0
    assert sampler.read([], 0, 0).cpu_percent == 0.0  # no change since
