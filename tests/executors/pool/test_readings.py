"""memory_used() per scope over fake trees, and the live readers (RSS, the Sampler) on this
machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from machine_tree import HOST_MEM, OWN, GiB, MiB, Tree

from embedpool.executors.pool.limits import detect_limits
from embedpool.executors.pool.machine import Cgroup
from embedpool.executors.pool.readings import Sampler, memory_used, sample


@pytest.mark.parametrize(
    ("tree", "env", "used"),
    [
        pytest.param(
            Tree(memtotal_kb=HOST_MEM // 1024, memavail_kb=12 * GiB // 1024),
            {},
            4 * GiB,
            id="host-total-minus-available",
        ),
        pytest.param(
            Tree(
                version=1,
                files={
                    f"memory/{OWN}": {
                        "memory.limit_in_bytes": str(GiB),
                        "memory.usage_in_bytes": str(600 * MiB),
                        "memory.stat": f"cache 1\ninactive_file 7\ntotal_inactive_file {100 * MiB}",
                    }
                },
            ),
            {},
            500 * MiB,
            id="v1-usage-minus-total-inactive-file",
        ),
        pytest.param(
            Tree(
                version=2,
                files={
                    OWN: {
                        "memory.max": str(GiB),
                        "memory.current": str(700 * MiB),
                        "memory.stat": f"anon 1\ninactive_file {200 * MiB}\nactive_file 3",
                    }
                },
            ),
            {},
            500 * MiB,
            id="v2-current-minus-inactive-file",
        ),
        pytest.param(
            Tree(
                version=2,
                files={
                    OWN: {
                        "memory.max": str(GiB),
                        "memory.current": str(300 * MiB),
                        "memory.stat": "anon 1",
                    }
                },
            ),
            {"EMBEDPOOL_MAX_MEMORY": "512M"},
            300 * MiB,
            id="override-counts-the-cgroup-usage",
        ),
        pytest.param(
            Tree(memavail_kb=15 * GiB // 1024),
            {"EMBEDPOOL_MAX_MEMORY": "2G"},
            GiB,
            id="override-counts-the-host-usage",
        ),
    ],
)
def test_memory_used(tmp_path: Path, tree: Tree, env: dict[str, str], used: int) -> None:
    limits = detect_limits(root=tree.build(tmp_path), environ=env)
    assert memory_used(limits) == used


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


def _busy_child() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nx = bytearray(8 << 20)\n"
            "end = time.monotonic() + 60\nwhile time.monotonic() < end: pass",
        ]
    )


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
        assert reading.foreign_cpu_percent == max(
            0.0, reading.cpu_percent - reading.pool_cpu_percent
        )
        assert reading.mem_limit == limits.memory_bytes and reading.queue_depth == 3
    finally:
        child.kill()
        child.wait(timeout=60)
    after = sampler.read([child.pid], queue_depth=0, done_count=done)
    assert after.workers == 0 and after.worker_rss == ()


def test_sampler_reads_cgroup_cpu_usage(tmp_path: Path) -> None:
    """Under a binding v1 quota the busy share comes from cpuacct.usage deltas."""
    tree = Tree(
        version=1,
        files={
            f"cpu,cpuacct/{OWN}": {
                "cpu.cfs_quota_us": "100000",
                "cpu.cfs_period_us": "100000",
                "cpuacct.usage": "0",
            }
        },
    )
    root = tree.build(tmp_path)
    limits = detect_limits(root=root, environ={})
    assert limits.cpu_cgroup == Cgroup(1, root / "sys/fs/cgroup/cpu,cpuacct" / OWN)
    sampler = Sampler(limits)
    usage = root / "sys/fs/cgroup/cpu,cpuacct" / OWN / "cpuacct.usage"
    usage.write_text(str(10**12))  # far more than the interval: capped at 100%
    assert sampler.read([], 0, 0).cpu_percent == 100.0
    assert sampler.read([], 0, 0).cpu_percent == 0.0  # no change since
