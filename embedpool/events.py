"""Structured events: one flat dict per thing that happened, for callbacks, logs and progress.

Every event has ``event`` (one of the names below) and ``ts`` (Unix time, float); the other
keys are plain JSON-serialisable values, so ``--log-json`` can write them as they come.

    name                  emitted when                                 notable keys
    progress              a job's batch is done (job.py)               done, total, tokens
    pool_start            the first worker is ready                    workers, threads, batch_tokens
    worker_start          a worker (process or Ray actor) is started   worker_id
    worker_ready          a worker loaded its engine                   worker_id, pid, rss, seconds
    worker_start_failed   a worker failed while loading                worker_id, pid, error, traceback
    worker_death          a worker died without saying Leaving         worker_id, pid, exit, kind, cause, items, tokens
    worker_exit           a worker left cooperatively                  worker_id, pid, reason
    worker_hung_warning   a busy worker silent for 60% of its deadline worker_id, pid, silent_s, deadline_s
    worker_hung_kill      ... and past its deadline: killed            worker_id, pid, silent_s, deadline_s
    retry                 a task goes back to the queue                batch_id, items, tokens, attempt, kind, reason
    split                 a failed task is cut in two                  batch_id, items, halves, kind, reason
    poison_item           one input kept failing; given up             batch_id, position, item_id, kind, error
    recycle               a worker's RSS grew past its bound           worker_id, pid, rss, limit
    scale                 target workers or batch budget changed       workers_from/to, batch_tokens_from/to, reason, reading
    emergency             emergency mode switched on or off            on, reason, reading
    status                periodically                                 batches_done, sequences_done, seq_per_s, workers, supervisor_rss, worker_rss
    pool_broken           no worker can be started any more            error
    device_fallback       a GPU was lost (or its provider does not     device, to, reason, message
                          load): its work moves to the CPU
    pool_stop             the pool closed                              counters
    graph_build           a graph build starts or enters a stage       model, precision, stage, step, steps, estimate_bytes, available_bytes
    graph_built           ... and is done (built False: another        model, precision, seconds, peak_rss, size_bytes, path, built
                          process built it while this one waited)
    graph_fallback        the int8 build cannot fit: fp32 this run     model, requested, precision, reason, message
                          (DEBUG in the log: displays print its message, once)

Both backends emit these names (Ray's events add ``backend="ray"`` and the actor's name and
node). ``kind`` is a ``faults.FailureKind`` value. Callbacks run on the executor's manager
thread: they must be quick and must not block on the executor (``stats()`` is fine). An
exception in a callback is logged and ignored (``Emitter``).
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any, Final

from embedpool.types import Event, EventCallback

PROGRESS: Final = "progress"
POOL_START: Final = "pool_start"
WORKER_START: Final = "worker_start"
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
DEVICE_FALLBACK: Final = "device_fallback"
GRAPH_BUILD: Final = "graph_build"
GRAPH_BUILT: Final = "graph_built"
GRAPH_FALLBACK: Final = "graph_fallback"

ALL_EVENTS: Final = (
    PROGRESS,
    POOL_START,
    WORKER_START,
    WORKER_READY,
    WORKER_START_FAILED,
    WORKER_DEATH,
    WORKER_EXIT,
    WORKER_HUNG_WARNING,
    WORKER_HUNG_KILL,
    RETRY,
    SPLIT,
    POISON_ITEM,
    RECYCLE,
    SCALE,
    EMERGENCY,
    STATUS,
    POOL_BROKEN,
    POOL_STOP,
    DEVICE_FALLBACK,
    GRAPH_BUILD,
    GRAPH_BUILT,
    GRAPH_FALLBACK,
)


def make_event(name: str, **fields: Any) -> Event:
    """``{"event": name, "ts": now, **fields}``."""
    if name not in ALL_EVENTS:
        raise ValueError(f"unknown event {name!r}; known: {', '.join(ALL_EVENTS)}")
    return {"event": name, "ts": time.time(), **fields}


#: Events logged at WARNING (the rest at DEBUG): something went wrong or changed mode.
WARNINGS: Final = frozenset(
    {
        WORKER_DEATH,
        WORKER_HUNG_WARNING,
        WORKER_HUNG_KILL,
        WORKER_START_FAILED,
        POISON_ITEM,
        POOL_BROKEN,
        EMERGENCY,
        DEVICE_FALLBACK,
    }
)


class Emitter:
    """Makes, logs and delivers events for one executor; ``extra`` fields go into every
    event. A callback that raises is logged and ignored: a broken callback must not break
    the executor (or abort a job)."""

    def __init__(
        self, on_event: EventCallback | None, logger: logging.Logger, **extra: Any
    ) -> None:
        self._on_event = on_event
        self._log = logger
        self._extra = extra

    def __call__(self, name: str, **fields: Any) -> Event:
        event = make_event(name, **self._extra, **fields)
        level = logging.WARNING if name in WARNINGS else logging.DEBUG
        self._log.log(level, "%s %s", name, fields)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                self._log.exception("embedpool on_event callback failed for %s", name)
        return event


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
