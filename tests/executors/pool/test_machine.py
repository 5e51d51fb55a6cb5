"""The value types of the machine (Limits, Reading) and the arithmetic over them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from machine_tree import GiB, MiB

from embedpool.errors import ConfigError
from embedpool.executors.pool.machine import Limits, memory_in_scope


@pytest.mark.parametrize(
    ("cap", "used", "pool_used", "expected"),
    [
        pytest.param(
            None, 600 * MiB, 100 * MiB, (600 * MiB, GiB, "machine"), id="no-cap-total-usage"
        ),
        # 900 MiB of 1 GiB used (88%) is not read as 350% of a 256M cap: the cap counts the
        # pool's 100 MiB (39%); the machine's 88% is the larger fraction and binds
        pytest.param(
            256 * MiB,
            900 * MiB,
            100 * MiB,
            (900 * MiB, GiB, "machine"),
            id="cap-machine-fuller-than-pool",
        ),
        pytest.param(
            256 * MiB,
            300 * MiB,
            200 * MiB,
            (200 * MiB, 256 * MiB, "pool"),
            id="cap-pool-fuller-than-machine",
        ),
        pytest.param(
            512 * MiB,
            800 * MiB,
            50 * MiB,
            (800 * MiB, GiB, "machine"),
            id="cap-real-limit-still-counts-everyone",
        ),
    ],
)
def test_memory_in_scope(
    cap: int | None, used: int, pool_used: int, expected: tuple[int, int, str]
) -> None:
    limits = Limits(
        cpus=2,
        cpus_source="t",
        memory_bytes=cap or GiB,
        memory_source="t",
        profile="local",
        profile_source="t",
        system_memory_bytes=GiB,
        system_memory_source="t",
        pool_memory_bytes=cap,
    )
    assert memory_in_scope(limits, used, pool_used) == expected


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ConfigError, match="profile"):
        Limits(1, "x", 1, "x", "desktop", "x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="positive"):
        Limits(0, "x", 1, "x", "local", "x")


def test_the_policy_imports_no_process_code() -> None:
    """The policy (scaling, plan, memory and the types they read) imports no psutil."""
    code = (
        "import sys, embedpool.executors.pool.scaling, embedpool.executors.pool.plan, embedpool.executors.pool.memory, "
        "embedpool.executors.pool.machine, embedpool.faults; "
        "sys.exit('psutil' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
