"""The cgroup helper really limits memory: the kernel OOM-kills a child that allocates past a
64 MiB limit (SIGKILL, counted in the cgroup's oom_kill), and leaves one under it alone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import cgroup_util
except ImportError:  # tests/ is not on sys.path unless pytest's pythonpath says so
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import cgroup_util

MiB = cgroup_util.MiB
LIMIT = 64 * MiB
DEADLINE_S = 60.0

# The cgroup marker makes tests/ci_rules.py check for a writable memory cgroup: a skip
# locally, a failure under CI=true unless EMBEDPOOL_CI_ALLOW_SKIP=cgroup.
pytestmark = [pytest.mark.cgroup]

#: Allocates N MiB one page-touching MiB at a time (bytes * n writes every byte, so every page
#: is charged), after saying it started, so an early failure is not mistaken for the kill.
_ALLOCATE = """
import sys
print("started", flush=True)
hold = []
for _ in range(int(sys.argv[1])):
    hold.append(b"\\x01" * (1 << 20))
print("done", flush=True)
"""


def _run_in(cg: cgroup_util.MemoryCgroup, mib: int) -> tuple[int, str]:
    proc = subprocess.Popen(
        cg.wrap([sys.executable, "-c", _ALLOCATE, str(mib)]), stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE_S)
    return proc.returncode, out


@pytest.mark.parametrize(
    ("mib", "killed"),
    [
        pytest.param(256, True, id="256MiB-past-64MiB-limit-is-oom-killed"),
        pytest.param(16, False, id="16MiB-under-64MiB-limit-completes"),
    ],
)
def test_kernel_oom_kills_past_the_limit(mib: int, killed: bool) -> None:
    with cgroup_util.memory_cgroup(LIMIT) as cg:
        assert cg.limit() == LIMIT
        before = cg.oom_kills()
        rc, out = _run_in(cg, mib)
        assert "started" in out
        if killed:
            assert rc == -signal.SIGKILL, f"expected SIGKILL, got {rc}; output {out!r}"
            assert "done" not in out
            assert cg.oom_kills() == before + 1
        else:
            assert rc == 0, out
            assert "done" in out
            assert cg.oom_kills() == before
    assert not cg.path.exists()


def test_child_is_inside_own_cgroup_and_removed() -> None:
    version, own = cgroup_util.own_memory_cgroup()
    with cgroup_util.memory_cgroup(LIMIT) as cg:
        assert cg.version == version
        assert cg.path.parent == own
        proc = subprocess.Popen(
            cg.wrap([sys.executable, "-c", "import sys; sys.stdin.read()"]), stdin=subprocess.PIPE
        )
        try:
            # The wrapper writes its pid before exec, so the pid is inside once it shows up.
            deadline = time.monotonic() + DEADLINE_S
            while proc.pid not in cg.pids():
                assert time.monotonic() < deadline, "process never joined the cgroup"
                time.sleep(0.01)
            assert cg.usage() > 0
        finally:
            proc.kill()
            proc.wait(timeout=DEADLINE_S)
            assert proc.stdin is not None
            proc.stdin.close()
    assert not cg.path.exists()
