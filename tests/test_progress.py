"""embedpool.progress: the RSS tracker that reports peak memory in the CLI and in bench."""

from __future__ import annotations

import subprocess
import sys

from embedpool.progress import RssTracker

MiB = 1024 * 1024
CHILD_BYTES = 200 * MiB
_CHILD = ("import sys\n"
          f"block = b'x' * {CHILD_BYTES}  # written, so resident\n"
          "print('ready', flush=True)\n"
          "sys.stdin.read()\n")


def test_tracker_counts_a_child_and_keeps_the_peak_after_it_exits() -> None:
    tracker = RssTracker(interval_s=0.05)
    alone = tracker.sample(relist=True)
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with_child = tracker.sample(relist=True)
        assert with_child >= alone + CHILD_BYTES, (alone, with_child)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    after = tracker.sample(relist=True)  # the exited child is no longer listed
    assert after < with_child - CHILD_BYTES // 2
    assert tracker.close() >= with_child
