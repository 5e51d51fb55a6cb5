"""Two facts about one process: its resident memory and whether it is alive.

One small reader each, used by the worker (its own RSS after a batch), the pool's readings,
the executors' stats and the output writer. Linux ``/proc/<pid>/statm`` first: one small read
and no object per sample, which matters in a worker after every batch and in a sampler that
runs ten times a second; psutil where ``/proc`` is missing. The worker imports this module
before anything heavy, so it imports nothing at the top but the standard library.
"""

from __future__ import annotations

import os


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size of ``pid`` (this process if None) in bytes; None when it is gone or
    not ours to read."""
    path = f"/proc/{'self' if pid is None else pid}/statm"
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # a Linux /proc without this pid: it is gone
    except (OSError, ValueError, IndexError):
        pass
    import psutil

    try:
        return int((psutil.Process() if pid is None else psutil.Process(pid)).memory_info().rss)
    except psutil.Error:
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours or not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
