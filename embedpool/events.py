"""Structured events: one flat dict per thing that happened, for callbacks, logs and progress.

Every event has ``event`` (one of the names below) and ``ts`` (Unix time, float); the other
keys are plain JSON-serialisable values, so ``--log-json`` can write them as they come.

    name                  emitted when                                 notable keys
    pool_start            the first worker is ready                    workers, threads, batch_tokens
    worker_ready          a worker loaded its engine                   worker_id, pid, rss, seconds
    worker_start_failed   a worker failed while loading                worker_id, pid, error, traceback
    worker_death          a worker died without saying Leaving         worker_id, pid, exit, cause, items, tokens
    worker_exit           a worker left cooperatively                  worker_id, pid, reason
    worker_hung_warning   a busy worker silent for 60% of its deadline worker_id, pid, silent_s, deadline_s
    worker_hung_kill      ... and past its deadline: killed            worker_id, pid, silent_s, deadline_s
    retry                 a batch goes back to the queue               batch_id, items, tokens, attempt, reason
    split                 a failed batch is cut in two                 batch_id, items, halves, reason
    poison_item           one input kept killing workers; given up     batch_id, position, key, error
    recycle               a worker's RSS grew past its bound           worker_id, pid, rss, limit
    scale                 target workers or batch budget changed       workers_from/to, batch_tokens_from/to, reason, reading
    emergency             emergency mode switched on or off            on, reason, reading
    status                periodically                                 batches_done, sequences_done, seq_per_s, workers, supervisor_rss, worker_rss
    pool_broken           no worker can be started any more            error
    pool_stop             the pool closed                              counters

Callbacks run on the supervisor's manager thread: they must be quick and must not block on
the pool (``Pool.stats()`` is fine). An exception in a callback is logged and ignored.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Final

from embedpool.types import Event

POOL_START: Final = "pool_start"
WORKER_READY: Final = "worker_ready"
WORKER_START_FAILED: Final = "worker_start_failed"
WORKER_DEATH: Final = "worker_death"
WORKER_EXIT: Final = "worker_exit"
WORKER_HUNG_WARNING: Final = "worker_hung_warning"
WORKER_HUNG_KILL: Final = "worker_hung_kill"
RETRY: Final = "retry"
SPLIT: Final = "split"
POISON_ITEM: Final = "poison_item"
RECYCLE: Final = "recycle"
SCALE: Final = "scale"
EMERGENCY: Final = "emergency"
STATUS: Final = "status"
POOL_BROKEN: Final = "pool_broken"
POOL_STOP: Final = "pool_stop"

ALL_EVENTS: Final = (
    POOL_START, WORKER_READY, WORKER_START_FAILED, WORKER_DEATH, WORKER_EXIT,
    WORKER_HUNG_WARNING, WORKER_HUNG_KILL, RETRY, SPLIT, POISON_ITEM, RECYCLE, SCALE,
    EMERGENCY, STATUS, POOL_BROKEN, POOL_STOP,
)


def make_event(name: str, **fields: Any) -> Event:
    """``{"event": name, "ts": now, **fields}``."""
    if name not in ALL_EVENTS:
        raise ValueError(f"unknown event {name!r}; known: {', '.join(ALL_EVENTS)}")
    return {"event": name, "ts": time.time(), **fields}


def exit_name(exitcode: int | None) -> str:
    """A process exit code as people read it: ``"SIGKILL(-9)"``, ``"exit 1"``, ``"running"``.

    ``multiprocessing`` reports death by signal N as exit code -N.
    """
    if exitcode is None:
        return "running"
    if exitcode < 0:
        try:
            return f"{signal.Signals(-exitcode).name}({exitcode})"
        except ValueError:
            return f"signal {-exitcode}({exitcode})"
    return f"exit {exitcode}"


def death_cause(exitcode: int | None, *, killed_by_pool: str | None = None) -> str:
    """The likely reason a worker died, for messages and the ``cause`` key of worker_death."""
    if killed_by_pool:
        return f"killed by the pool ({killed_by_pool})"
    if exitcode == -signal.SIGKILL:
        return ("SIGKILL from outside the pool: most likely the kernel's OOM killer "
                "(memory limit reached); the batch is retried split in half")
    if exitcode is not None and exitcode < 0:
        return "crashed on a signal (a bug in native code, or killed from outside)"
    return "exited without saying it was leaving (a crash in the worker)"
