"""The suite's one polling helper: wait for a condition another thread or process makes true.

Every wait is bounded: reaching the deadline fails the test and names what was awaited (a
hang, not slowness). Polling, not sleeping for a guessed time: the loop ends the moment the
condition holds.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

#: One wait's default deadline: far beyond any regular step on a loaded 2-core machine.
DEADLINE_S = 120.0


def wait_until(
    cond: Callable[[], object], what: str, timeout: float = DEADLINE_S, interval: float = 0.02
) -> None:
    """Poll ``cond`` every ``interval`` s until it is true; fail the test (naming ``what``)
    after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_ready(proc: subprocess.Popen[str], url: str, timeout: float = 240.0) -> None:
    """Wait until a ``serve`` subprocess answers ``/ready`` with 200; fail with its stderr if
    it exits first."""
    import httpx

    def ready() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return httpx.get(f"{url}/ready", timeout=30).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, "the server's /ready", timeout=timeout, interval=0.2)
