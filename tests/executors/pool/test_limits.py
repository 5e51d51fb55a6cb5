"""detect_limits() over fake /proc + /sys trees (cgroup v1, v2, none; quotas; affinity;
overrides; profiles), and on this machine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from machine_tree import HOST_MEM, OWN, V1_UNLIMITED, GiB, MiB, Tree

from embedpool.errors import ConfigError
from embedpool.executors.pool.limits import detect_limits, parse_cpu_list
from embedpool.executors.pool.readings import memory_used


@dataclass(frozen=True)
class LimitRow:
    tree: Tree
    cpus: int
    cpus_source: str
    memory: int
    memory_source: str
    env: Mapping[str, str] = field(default_factory=dict)
    kwargs: Mapping[str, int] = field(default_factory=dict)
    memory_cgroup: str | None = None  # expected dir of the usage cgroup, relative to the mount
    note: str | None = None


LIMIT_ROWS = [
    pytest.param(
        LimitRow(Tree(), 8, "host CPUs online", HOST_MEM, "host MemTotal"), id="bare-host"
    ),
    pytest.param(
        LimitRow(Tree(affinity="0,2"), 2, "CPU affinity 0,2", HOST_MEM, "host MemTotal"),
        id="affinity-2-of-8",
    ),
    pytest.param(
        LimitRow(
            Tree(version=1, files={f"memory/{OWN}": {"memory.limit_in_bytes": str(512 * MiB)}}),
            8,
            "host",
            512 * MiB,
            "cgroup v1 memory.limit_in_bytes",
            memory_cgroup=f"memory/{OWN}",
        ),
        id="v1-memory-limit",
    ),
    pytest.param(
        LimitRow(
            Tree(version=1, files={f"memory/{OWN}": {"memory.limit_in_bytes": V1_UNLIMITED}}),
            8,
            "host",
            HOST_MEM,
            "host MemTotal",
        ),
        id="v1-unlimited-is-ignored",
    ),
    pytest.param(
        LimitRow(
            Tree(version=1, files={f"memory/{OWN}": {"memory.limit_in_bytes": str(64 * GiB)}}),
            8,
            "host",
            HOST_MEM,
            "host MemTotal",
        ),
        id="v1-limit-above-host",
    ),
    pytest.param(
        LimitRow(
            Tree(version=2, files={OWN: {"memory.max": str(GiB)}}),
            8,
            "host",
            GiB,
            "cgroup v2 memory.max",
            memory_cgroup=OWN,
        ),
        id="v2-memory-max",
    ),
    pytest.param(
        LimitRow(
            Tree(version=2, files={OWN: {"memory.max": "max", "cpu.max": "max 100000"}}),
            8,
            "host",
            HOST_MEM,
            "host MemTotal",
        ),
        id="v2-max-means-none",
    ),
    pytest.param(
        LimitRow(
            Tree(
                version=2,
                files={OWN: {"memory.max": str(GiB)}, "user.slice": {"memory.max": str(256 * MiB)}},
            ),
            8,
            "host",
            256 * MiB,
            "cgroup v2 memory.max",
            memory_cgroup="user.slice",
        ),
        id="v2-ancestor-limit-binds",
    ),
    pytest.param(
        LimitRow(
            Tree(
                version=2,
                own="/",
                files={"": {"memory.max": str(768 * MiB), "cpu.max": "200000 100000"}},
            ),
            2,
            "cgroup v2 cpu.max 200000 100000",
            768 * MiB,
            "cgroup v2 memory.max",
            memory_cgroup="",
        ),
        id="v2-cgroup-namespace-root",
    ),
    pytest.param(
        LimitRow(
            Tree(version=2, files={OWN: {"cpu.max": "150000 100000"}}),
            2,
            "cgroup v2 cpu.max 150000 100000",
            HOST_MEM,
            "host",
        ),
        id="v2-cpu-quota-1.5-ceils-to-2",
    ),
    pytest.param(
        LimitRow(
            Tree(version=2, files={OWN: {"cpu.max": "20000 100000"}}),
            1,
            "cgroup v2 cpu.max",
            HOST_MEM,
            "host",
        ),
        id="v2-cpu-quota-0.2-is-1",
    ),
    pytest.param(
        LimitRow(
            Tree(
                version=1,
                files={
                    f"cpu,cpuacct/{OWN}": {
                        "cpu.cfs_quota_us": "300000",
                        "cpu.cfs_period_us": "100000",
                    }
                },
            ),
            3,
            "cgroup v1 cpu.cfs_quota_us/cfs_period_us 300000/100000",
            HOST_MEM,
            "host",
        ),
        id="v1-cfs-quota-3",
    ),
    pytest.param(
        LimitRow(
            Tree(
                version=1,
                files={
                    f"cpu,cpuacct/{OWN}": {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"}
                },
            ),
            8,
            "host CPUs online",
            HOST_MEM,
            "host",
        ),
        id="v1-cfs-quota-unset",
    ),
    pytest.param(
        LimitRow(
            Tree(
                version=1,
                own="/docker/abc",
                mount_root="/docker/abc",
                files={"memory": {"memory.limit_in_bytes": str(300 * MiB)}},
            ),
            8,
            "host",
            300 * MiB,
            "cgroup v1 memory.limit_in_bytes",
            memory_cgroup="memory",
        ),
        id="v1-container-mount-root-is-own-cgroup",
    ),
    pytest.param(
        LimitRow(
            Tree(affinity="0-3", version=2, files={OWN: {"cpu.max": "200000 100000"}}),
            2,
            "cgroup v2 cpu.max",
            HOST_MEM,
            "host",
        ),
        id="quota-below-affinity",
    ),
    pytest.param(
        LimitRow(
            Tree(version=2, files={OWN: {"cpu.max": "400000 100000", "memory.max": str(GiB)}}),
            1,
            "EMBEDPOOL_CPUS=1",
            256 * MiB,
            "EMBEDPOOL_MAX_MEMORY=256M",
            env={"EMBEDPOOL_CPUS": "1", "EMBEDPOOL_MAX_MEMORY": "256M"},
            memory_cgroup=OWN,
        ),
        id="env-overrides-beat-cgroup",
    ),
    pytest.param(
        LimitRow(
            Tree(version=2, files={OWN: {"memory.max": str(GiB)}}),
            8,
            "host",
            GiB,
            "cgroup v2 memory.max",
            env={"EMBEDPOOL_CPUS": "64", "EMBEDPOOL_MAX_MEMORY": "8G"},
            memory_cgroup=OWN,
            note="EMBEDPOOL_MAX_MEMORY=8G ignored",
        ),
        id="env-above-hardware-is-ignored",
    ),
    pytest.param(
        LimitRow(
            Tree(),
            4,
            "cpus= argument",
            128 * MiB,
            "max_memory= argument",
            env={"EMBEDPOOL_CPUS": "2", "EMBEDPOOL_MAX_MEMORY": "256M"},
            kwargs={"cpus": 4, "max_memory": 128 * MiB},
        ),
        id="kwargs-replace-env",
    ),
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
    [
        pytest.param(Tree(), {}, {}, "local", "no WSL", id="plain-linux-is-local"),
        pytest.param(
            Tree(osrelease="5.15.153.1-microsoft-standard-WSL2"),
            {},
            {},
            "wsl2",
            "kernel release",
            id="wsl2-kernel",
        ),
        pytest.param(
            Tree(osrelease="4.4.0-19041-Microsoft"),
            {},
            {},
            "wsl2",
            "kernel release",
            id="wsl1-style-kernel",
        ),
        pytest.param(
            Tree(markers=(".dockerenv",)), {}, {}, "cloud", "container: /.dockerenv", id="docker"
        ),
        pytest.param(
            Tree(markers=("run/.containerenv",)),
            {},
            {},
            "cloud",
            "container: /run/.containerenv",
            id="podman",
        ),
        pytest.param(
            Tree(),
            {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
            {},
            "cloud",
            "Kubernetes",
            id="kubernetes-env",
        ),
        pytest.param(
            Tree(version=2, own="/kubepods.slice/kubepods-burstable.slice/cri-containerd-1.scope"),
            {},
            {},
            "cloud",
            "container: cgroup path",
            id="kubepods-cgroup",
        ),
        pytest.param(
            Tree(dmi={"sys_vendor": "Amazon EC2", "product_name": "m6i.large"}),
            {},
            {},
            "cloud",
            "cloud VM: DMI sys_vendor 'Amazon EC2'",
            id="aws-dmi",
        ),
        pytest.param(
            Tree(dmi={"sys_vendor": "Google", "product_name": "Google Compute Engine"}),
            {},
            {},
            "cloud",
            "cloud VM",
            id="gce-dmi",
        ),
        pytest.param(
            Tree(dmi={"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"}),
            {},
            {},
            "local",
            "no WSL",
            id="hyperv-alone-is-not-cloud",
        ),
        pytest.param(
            Tree(
                dmi={
                    "sys_vendor": "Microsoft Corporation",
                    "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77",
                }
            ),
            {},
            {},
            "cloud",
            "cloud VM",
            id="azure-asset-tag",
        ),
        pytest.param(
            Tree(dmi={"sys_vendor": "LENOVO", "product_name": "20XW"}),
            {},
            {},
            "local",
            "no WSL",
            id="laptop-dmi",
        ),
        pytest.param(
            Tree(markers=(".dockerenv",)),
            {"EMBEDPOOL_PROFILE": "local"},
            {},
            "local",
            "EMBEDPOOL_PROFILE=local",
            id="env-overrides-detection",
        ),
        pytest.param(
            Tree(),
            {"EMBEDPOOL_PROFILE": "cloud"},
            {"profile": "wsl2"},
            "wsl2",
            "profile= argument",
            id="kwarg-beats-env",
        ),
    ],
)
def test_profile(
    tmp_path: Path,
    tree: Tree,
    env: dict[str, str],
    kwargs: dict[str, str],
    profile: str,
    source: str,
) -> None:
    limits = detect_limits(root=tree.build(tmp_path), environ=env, **kwargs)  # type: ignore[arg-type]
    assert limits.profile == profile
    assert limits.profile_source.startswith(source), limits.profile_source


@pytest.mark.parametrize(
    ("env", "kwargs", "names"),
    [
        pytest.param({"EMBEDPOOL_CPUS": "two"}, {}, "EMBEDPOOL_CPUS='two'", id="cpus-not-int"),
        pytest.param({"EMBEDPOOL_CPUS": "0"}, {}, "EMBEDPOOL_CPUS='0'", id="cpus-zero"),
        pytest.param(
            {"EMBEDPOOL_MAX_MEMORY": "lots"},
            {},
            "EMBEDPOOL_MAX_MEMORY='lots'",
            id="memory-not-a-size",
        ),
        pytest.param(
            {"EMBEDPOOL_MAX_MEMORY": "-1G"}, {}, "EMBEDPOOL_MAX_MEMORY", id="memory-negative"
        ),
        pytest.param(
            {"EMBEDPOOL_PROFILE": "laptop"}, {}, "EMBEDPOOL_PROFILE='laptop'", id="profile-unknown"
        ),
        pytest.param({}, {"profile": "desktop"}, "profile='desktop'", id="profile-kwarg-unknown"),
        pytest.param({}, {"cpus": 0}, "cpus=0", id="cpus-kwarg-zero"),
    ],
)
def test_bad_override_names_it(
    tmp_path: Path, env: dict[str, str], kwargs: dict[str, object], names: str
) -> None:
    with pytest.raises(ConfigError, match=names.replace("(", r"\(")):
        detect_limits(root=Tree().build(tmp_path), environ=env, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("env", "system", "pool_cap", "note"),
    [
        pytest.param(
            {"EMBEDPOOL_MAX_MEMORY": "512M"}, GiB, 512 * MiB, None, id="override-below-cgroup"
        ),
        pytest.param(
            {"EMBEDPOOL_MAX_MEMORY": "4G"}, GiB, None, "ignored", id="override-above-cgroup"
        ),
        pytest.param({}, GiB, None, None, id="no-override"),
    ],
)
def test_override_is_a_pool_cap_beside_the_real_limit(
    tmp_path: Path, env: dict[str, str], system: int, pool_cap: int | None, note: str | None
) -> None:
    tree = Tree(version=2, files={OWN: {"memory.max": str(GiB)}})
    limits = detect_limits(root=tree.build(tmp_path), environ=env)
    assert limits.real_memory_bytes == system
    assert limits.real_memory_source.startswith("cgroup v2 memory.max")
    assert limits.pool_memory_bytes == pool_cap
    assert limits.memory_bytes == (pool_cap or system)
    assert (note is None) == (not limits.notes)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        pytest.param("0-3", (0, 1, 2, 3), id="range"),
        pytest.param("0,2,4-5\n", (0, 2, 4, 5), id="mixed"),
        pytest.param("7", (7,), id="single"),
    ],
)
def test_parse_cpu_list(text: str, ids: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == ids


# -- this machine, for real -------------------------------------------------------------------


def test_real_machine_limits_are_within_the_host() -> None:
    limits = detect_limits(environ={})
    assert 1 <= limits.cpus <= (os.cpu_count() or 1)
    assert limits.cpus <= len(os.sched_getaffinity(0))
    assert 0 < limits.memory_bytes <= limits.host_memory_bytes
    assert 0 < memory_used(limits) < limits.host_memory_bytes
    capped = detect_limits(environ={"EMBEDPOOL_CPUS": "1", "EMBEDPOOL_MAX_MEMORY": "100M"})
    assert (capped.cpus, capped.memory_bytes) == (1, 100 * MiB)
