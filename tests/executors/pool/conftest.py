"""Fixtures of the pool tests: event capture and a leak check (helpers: pool_support.py).

Every pool test runs real worker processes. ``no_leftover_processes`` (applied with
``pytestmark`` by the pool and fault tests) fails a test that leaves any child process
behind, and kills them so one leak does not cascade: "no orphans, ever" is checked on every
pool test, not only in one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psutil
import pytest
from pool_support import EventLog


@pytest.fixture
def event_log() -> EventLog:
    return EventLog()


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def no_leftover_processes() -> Iterator[None]:
    before = _children()
    yield
    deadline = time.monotonic() + 15.0
    left: set[int] = set()
    while time.monotonic() < deadline:
        left = set()
        for pid in _children() - before:
            try:
                proc = psutil.Process(pid)
                # multiprocessing's resource tracker and fork server are per-interpreter
                # singletons that live until the interpreter exits: not leaks
                cmd = " ".join(proc.cmdline())
                if proc.status() != psutil.STATUS_ZOMBIE and not any(
                    name in cmd for name in ("resource_tracker", "forkserver")
                ):
                    left.add(pid)
            except psutil.NoSuchProcess:
                pass
        if not left:
            return
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    pytest.fail(f"child processes left behind: {sorted(left)}")
