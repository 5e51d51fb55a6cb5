"""The OOM killer's counter: where it is for a process (fake trees), and the evidence it gives
on this machine's real cgroups (a kernel OOM kill is confirmed, our own SIGKILL is not)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from machine_tree import OWN, Tree

from embedpool.executors.pool.cgroups import OomEvidence, oom_kill_counter, read_oom_kills

try:
    import cgroup_util
except ImportError:  # tests/ is not on sys.path unless pytest's pythonpath says so
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import cgroup_util

WORKER = 4242
OTHER = "user.slice/worker.scope"
V1_OOM = "oom_kill_disable 0\nunder_oom 0\noom_kill {n}"
V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill {n}\noom_group_kill 0"


@pytest.mark.parametrize(
    ("tree", "want"),
    [
        pytest.param(
            Tree(
                version=1,
                pids={WORKER: OTHER},
                files={f"memory/{OTHER}": {"memory.oom_control": V1_OOM.format(n=2)}},
            ),
            f"sys/fs/cgroup/memory/{OTHER}/memory.oom_control",
            id="v1-the-workers-own-cgroup",
        ),
        pytest.param(
            Tree(
                version=2,
                pids={WORKER: OTHER},
                files={OTHER: {"memory.events": V2_EVENTS.format(n=2)}},
            ),
            f"sys/fs/cgroup/{OTHER}/memory.events",
            id="v2-the-workers-own-cgroup",
        ),
        pytest.param(
            Tree(version=2, pids={WORKER: "/"}), "proc/vmstat", id="root-cgroup-host-wide-counter"
        ),
        pytest.param(Tree(version=None, pids={WORKER: "/"}), "proc/vmstat", id="no-cgroups"),
    ],
)
def test_oom_kill_counter_of_a_process(tmp_path: Path, tree: Tree, want: str) -> None:
    root = tree.build(tmp_path)
    assert oom_kill_counter(root, WORKER) == root / want


def test_read_oom_kills_parses_both_versions(tmp_path: Path) -> None:
    for name, text, n in (("v1", V1_OOM, 5), ("v2", V2_EVENTS, 7), ("vmstat", "oom_kill {n}", 9)):
        path = tmp_path / name
        path.write_text(text.format(n=n) + "\n")
        assert read_oom_kills(path) == n
    assert read_oom_kills(tmp_path / "missing") is None


def test_evidence_is_used_up_one_death_at_a_time(tmp_path: Path) -> None:
    tree = Tree(
        version=2,
        own=OWN,
        pids={1: OTHER, 2: OTHER, 3: OTHER},
        files={OTHER: {"memory.events": V2_EVENTS.format(n=4)}},
    )
    root = tree.build(tmp_path)
    events = root / "sys/fs/cgroup" / OTHER / "memory.events"
    evidence = OomEvidence(root)
    for pid in (1, 2, 3):
        evidence.watch(pid, pid)
    events.write_text(V2_EVENTS.format(n=5))  # one kill in the cgroup ...
    assert evidence.confirm(1)[0] is True
    assert evidence.confirm(2)[0] is False  # ... credits one death, not two
    assert "did not rise" in evidence.confirm(3)[1]
    assert evidence.confirm(99) == (False, "no oom_kill counter was known for it")


# --- on this machine's cgroups ---------------------------------------------------------------

#: Waits for a line on stdin, then allocates (and touches) argv[1] MiB.
_ALLOCATE = r"""
import sys
print("ready", flush=True)
sys.stdin.readline()
hold = [b"x" * (1 << 20) for _ in range(int(sys.argv[1]))]
print("survived", flush=True)
"""


@pytest.mark.slow
@pytest.mark.cgroup
def test_kernel_oom_kill_is_confirmed_and_our_sigkill_is_not() -> None:
    """Two processes in one 96 MiB cgroup, watched while alive: the one the kernel kills for
    allocating 400 MiB is confirmed by the cgroup's counter; the one we SIGKILL after it is
    not (its death finds no unexplained rise)."""
    with cgroup_util.memory_cgroup(96 * cgroup_util.MiB) as cg:
        evidence = OomEvidence()
        procs = []
        for _ in range(2):
            proc = subprocess.Popen(
                cg.wrap([sys.executable, "-c", _ALLOCATE, "400"]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            evidence.watch(proc, proc.pid)
            procs.append(proc)
        oom, ours = procs
        assert oom.stdin is not None
        oom.stdin.write("go\n")
        oom.stdin.flush()
        assert oom.wait(60) == -signal.SIGKILL
        confirmed, why = evidence.confirm(oom)
        assert confirmed, why
        ours.kill()
        assert ours.wait(60) == -signal.SIGKILL
        confirmed, why = evidence.confirm(ours)
        assert not confirmed and "did not rise" in why
        for proc in procs:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        assert cg.oom_kills() == 1
