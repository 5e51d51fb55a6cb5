"""The on-disk cache of generated ONNX files: content keys, one builder per key, atomic files.

Several worker processes often start at once and all ask for the same graph. The protocol:

1. ``path`` exists            -> use it (a file only ever appears complete, see 3).
2. take ``<path>.lock`` (an exclusive ``filelock.FileLock``: flock on POSIX, released by the
   kernel when its holder dies); look again: another process may have finished the file
   while this one waited, in which case it is used and nothing is built.
3. build into a private temporary file in the same directory, fsync it, ``os.replace`` it
   onto ``path`` (atomic on POSIX), release the lock.

A crashed builder leaves at most a stray ``.tmp`` file (its lock dies with it), never a
half-written graph under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from embedpool.errors import ModelError

#: How long a process waits for another to finish building before it gives up. Building
#: and quantising a base-sized BERT takes well under a minute on 2 cores; ten minutes
#: means "the holder is stuck", not "the holder is slow".
LOCK_TIMEOUT_S = 600.0
#: Poll interval while waiting for the lock: short next to a build, long next to a syscall.
_LOCK_POLL_S = 0.05


def cache_key(parts: Mapping[str, object]) -> str:
    """sha256 of a canonical JSON rendering of ``parts`` (key order and spacing ignored)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def file_lock(
    path: Path, timeout_s: float = LOCK_TIMEOUT_S, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    """Exclusive lock on ``path`` (created if missing), bounded by ``timeout_s``; ``on_wait``
    is called once if another process holds it (so a caller can say it is waiting)."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the lock is the process's (a build may be awaited from any thread)
    lock = FileLock(str(path), thread_local=False)
    try:
        try:
            lock.acquire(blocking=False)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire(timeout=timeout_s, poll_interval=_LOCK_POLL_S)
    except Timeout:
        raise ModelError(
            f"waited {timeout_s:.0f} s for {path} held by another embedpool process "
            "building the same graph; if none is running, delete the lock file and retry"
        ) from None
    try:
        yield
    finally:
        lock.release()


def get_or_build(
    path: Path, build: Callable[[Path], None], on_wait: Callable[[], None] | None = None
) -> Path:
    """``path``, after calling ``build(tmp)`` to write it if no process has done so yet;
    ``on_wait``: called once if another process is building it now (see ``file_lock``)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock"), on_wait=on_wait):
        if path.is_file():
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            build(tmp)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path
